"""``mim reconstruct``: every written level volume sits at its true position in the patient.

A synthetic CT with an oblique, non-RAS (sagittal-like, LPS-ish) direction and anisotropic
spacing holds HU = a linear function of the RAS position. Trilinear interpolation
reproduces a linear function exactly, so every voxel of every written ``original``
file must equal that function at the voxel's world position (from the file's own
affine): this proves the placement end to end. The affines are also compared with
ones computed here independently from the source affine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mimcore.cli.main import main
from mimcore.data.preprocess import Preprocessing
from mimcore.data.volume_io import load_volume, save_volume
from mimcore.methods.mim import MiMPretrainModel
from mimcore.methods.mim import MiMConfig
from mimcore.models.convvit import preset as convvit_preset
from mimcore.models.checkpoint import save_checkpoint

CFG = convvit_preset("tiny")  # input 32^3, crop 64^3, grid 2, level-3 blocks upsampled x2
SHAPE = (70, 66, 72)
SPACING = np.array([0.9, 1.3, 0.7])
GRAD = np.array([4.0, -3.0, 5.0])  # HU per mm along RAS x, y, z
CENTER_INDEX = np.array([35.2, 33.4, 36.7])  # source continuous index of --center (no padding, no rounding tie)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _source_affine() -> np.ndarray:
    # i -> posterior (-y), j -> inferior (-z), k -> right (-x): a sagittal-like LPS-ish layout, then tilted
    perm = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    direction = _rotation(2, 12.0) @ _rotation(0, 7.0) @ perm
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(SPACING)
    affine[:3, 3] = [31.7, -12.4, 48.9]
    return affine


SRC_AFFINE = _source_affine()
WORLD_CENTER = (SRC_AFFINE @ np.append((np.array(SHAPE) - 1) / 2, 1.0))[:3]


def hu_at(world: np.ndarray) -> np.ndarray:
    """The synthetic CT's intensity at RAS positions (..., 3)."""
    return 100.0 + (world - WORLD_CENTER) @ GRAD


def world_of_voxels(affine: np.ndarray, shape, clamp_factor: float | None = None) -> np.ndarray:
    """RAS positions (X, Y, Z, 3) of a grid's voxel centres.

    With ``clamp_factor`` f (a block upsampled by f, ``align_corners=False``): voxel j
    samples block index u = (j + 0.5) / f - 0.5, which the interpolation clamps to
    [0, n / f - 1]; return the positions of the clamped samples instead.
    """
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    if clamp_factor is not None:
        f = clamp_factor
        u = np.clip((idx + 0.5) / f - 0.5, 0, np.array(shape) / f - 1)
        idx = (u + 0.5) * f - 0.5
    return idx @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reconstruct")
    torch.manual_seed(0)
    model = MiMPretrainModel(CFG)
    meta = {"model": CFG.to_dict(), "mim": MiMConfig().to_dict(), "preprocessing": Preprocessing().to_dict(),
            "preset": "tiny"}
    ckpt = save_checkpoint(root / "run", 3, model, meta)
    ct = world_of_voxels(SRC_AFFINE, SHAPE)
    values = hu_at(ct).astype(np.float32)
    assert -990 < values.min() and values.max() < 990  # inside the [-1000, 1000] window: no clipping
    image = save_volume(root / "ct.nrrd", values, SRC_AFFINE)
    center = (SRC_AFFINE @ np.append(CENTER_INDEX, 1.0))[:3]
    return {"root": root, "ckpt": ckpt, "image": image, "center": center}


@pytest.fixture(scope="module")
def result(setup):
    out = setup["root"] / "out"
    rc = main(["reconstruct", "--checkpoint", str(setup["ckpt"]), "--image", str(setup["image"]),
               "--center", *[f"{v:.6f}" for v in setup["center"]], "--output", str(out), "--seed", "3"])
    assert rc == 0
    return out, json.loads((out / "summary.json").read_text(encoding="utf-8"))


def expected_crop_affine(center: np.ndarray, crop: int) -> np.ndarray:
    """Source affine -> RAS-oriented grid (flip/permute only) -> crop of ``crop``^3 nearest ``center``."""
    a = SRC_AFFINE
    t = np.zeros((4, 4))
    t[3, 3] = 1.0
    for r in range(3):  # oriented axis r (R, A, S) runs along the source axis closest to it
        src = int(np.argmax(np.abs(a[r, :3])))
        if a[r, src] > 0:
            t[src, r] = 1.0
        else:
            t[src, r], t[src, 3] = -1.0, SHAPE[src] - 1
    oriented = a @ t
    c = (np.linalg.inv(oriented) @ np.append(center, 1.0))[:3]
    start = np.floor(c - (crop - 1) / 2 + 0.5)
    assert np.all(np.abs(c - (crop - 1) / 2 - start) < 0.45)  # no rounding tie
    shifted = np.eye(4)
    shifted[:3, 3] = start
    return oriented @ shifted


def expected_level_affine(crop_affine, level: int, entry: dict) -> np.ndarray:
    s, g, p = CFG.input_size, CFG.grid, CFG.patch_size
    if level == 1:
        m = np.diag([2.0, 2.0, 2.0, 1.0])
        m[:3, 3] = 0.5  # level-1 voxel i is centred at crop continuous index 2 i + 0.5
        return crop_affine @ m
    o = entry["octant"]
    offset = np.array([o // 4, (o // 2) % 2, o % 2]) * s
    if level == 3:
        t = entry["token"]
        offset = offset + np.array([t // (g * g), (t // g) % g, t % g]) * p
    m = np.eye(4)
    m[:3, 3] = offset
    if level == 2:
        return crop_affine @ m
    f = s / p
    up = np.diag([1 / f, 1 / f, 1 / f, 1.0])
    up[:3, 3] = 0.5 / f - 0.5
    return crop_affine @ m @ up


def test_layout_and_summary(result):
    out, summary = result
    counts = {1: 1, 2: 4, 3: 16}
    for level, n in counts.items():
        names = sorted(p.name for p in (out / f"level{level}").iterdir())
        assert names == sorted(f"vol{v:02d}_{r}.nii.gz" for v in range(n)
                               for r in ("hidden", "reconstruction", "original"))
    assert [lv["level"] for lv in summary["levels"]] == [1, 2, 3]
    assert all(np.isfinite(lv["loss"]) and lv["loss"] > 0 for lv in summary["levels"])
    assert len(summary["files"]) == 3 * 21 and all((out / f).is_file() for f in summary["files"])
    assert summary["crop"]["padded_fraction"] == 0.0
    lo, hi = (np.array(summary["crop"]["ras_bounds"][k]) for k in ("min", "max"))
    assert np.all(hi - lo > 40)


def test_every_original_is_placed_in_the_patient(setup, result):
    out, summary = result
    crop_affine = expected_crop_affine(setup["center"], CFG.crop_size)
    np.testing.assert_allclose(np.array(summary["crop"]["affine"]), crop_affine, atol=1e-6)
    # the crop's centre is within one voxel of the requested one
    assert np.linalg.norm(np.array(summary["crop"]["center_ras"]) - setup["center"]) < np.linalg.norm(SPACING)
    checked = 0
    for lv in summary["levels"]:
        level = lv["level"]
        for entry in lv["volumes"]:
            vol = load_volume(out / entry["files"]["original"])
            assert vol.shape == (CFG.input_size,) * 3
            expected = expected_level_affine(crop_affine, level, entry)
            np.testing.assert_allclose(vol.affine, expected, atol=1e-4, err_msg=f"level {level} vol {entry['index']}")
            # every voxel holds the source's intensity at its world position (the file's own affine)
            want = hu_at(world_of_voxels(vol.affine, vol.shape))
            if level == 3:  # trilinear upsampling (align_corners=False) clamps at the 16^3 block's border
                want = hu_at(world_of_voxels(vol.affine, vol.shape, clamp_factor=CFG.input_size / CFG.patch_size))
            np.testing.assert_allclose(vol.array, want, atol=1e-2, err_msg=f"level {level} vol {entry['index']}")
            checked += 1
    assert checked == 21


def test_hidden_and_reconstruction_files(result):
    out, summary = result
    half = CFG.input_size // 2
    p, g = CFG.patch_size, CFG.grid
    lv1, lv2, lv3 = summary["levels"]
    octants = [e["octant"] for e in lv2["volumes"]]
    assert sorted(octants) == lv1["hidden_level1_octants"] and len(set(octants)) == 4

    def arrays(entry):
        return {r: load_volume(out / entry["files"][r]).array for r in ("original", "hidden", "reconstruction")}

    a = arrays(lv1["volumes"][0])
    for o in range(8):
        sl = tuple(slice(k * half, (k + 1) * half) for k in (o // 4, (o // 2) % 2, o % 2))
        np.testing.assert_allclose(a["hidden"][sl], a["original"].min() if o in octants else a["original"][sl],
                                   atol=1e-3)
        if o not in octants:  # visible tokens show the original
            np.testing.assert_array_equal(a["reconstruction"][sl], a["original"][sl])
        else:  # hidden ones the de-normalised prediction: finite and not the original
            assert np.all(np.isfinite(a["reconstruction"][sl]))
            assert not np.allclose(a["reconstruction"][sl], a["original"][sl])
    # level-3 volumes are cut from hidden level-2 tokens
    for e3 in lv3["volumes"]:
        e2 = lv2["volumes"][e3["parent"]]
        assert e3["octant"] == e2["octant"]
        b = arrays(e2)
        t = e3["token"]
        sl = tuple(slice(k * p, (k + 1) * p) for k in (t // (g * g), (t // g) % g, t % g))
        np.testing.assert_allclose(b["hidden"][sl], b["original"].min(), atol=1e-3)


def test_png_sheet(result):
    import matplotlib.image

    out, summary = result
    img = matplotlib.image.imread(out / summary["sheet"])
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.05


def test_center_outside_the_volume(setup, capsys):
    rc = main(["reconstruct", "--checkpoint", str(setup["ckpt"]), "--image", str(setup["image"]),
               "--center", "500", "-400", "900", "--output", str(setup["root"] / "never")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "outside the volume" in err and "bounding box" in err and "Traceback" not in err
    assert not (setup["root"] / "never").exists()


def test_missing_checkpoint(setup, capsys):
    rc = main(["reconstruct", "--checkpoint", str(setup["root"] / "nope.json"), "--image", str(setup["image"])])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_padding_near_the_edge(setup, capsys):
    corner = (SRC_AFFINE @ np.array([2.0, 3.0, 1.0, 1.0]))[:3]
    out = setup["root"] / "padded"
    rc = main(["reconstruct", "--checkpoint", str(setup["ckpt"]), "--image", str(setup["image"]),
               "--center", *map(str, corner), "--output", str(out)])
    assert rc == 0
    assert "padding" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert 0.5 < summary["crop"]["padded_fraction"] < 1.0
    crop_affine = np.array(summary["crop"]["affine"])
    vol = load_volume(out / summary["levels"][0]["volumes"][0]["files"]["original"])
    np.testing.assert_allclose(vol.affine, expected_level_affine(crop_affine, 1, {}), atol=1e-4)
    # voxels (of level 1, made of 2^3 crop voxels) well inside the source match it; padding is air
    src_idx = world_of_voxels(np.linalg.inv(SRC_AFFINE) @ vol.affine, vol.shape)
    inside = np.all((src_idx > 1) & (src_idx < np.array(SHAPE) - 2), axis=-1)
    outside = np.any((src_idx < -2) | (src_idx > np.array(SHAPE) + 1), axis=-1)
    assert inside.any() and outside.any()
    want = hu_at(world_of_voxels(vol.affine, vol.shape))
    np.testing.assert_allclose(vol.array[inside], want[inside], atol=1e-2)
    np.testing.assert_allclose(vol.array[outside], -1000.0, atol=1e-3)


def test_checkpoint_with_resampling(setup, result, tmp_path):
    """A checkpoint pre-trained with ``--spacing`` is shown on that grid: the crop keeps the
    oriented (tilted) axes at the new voxel size, and every voxel still holds the source's
    intensity at its world position (trilinear resampling of a linear function is exact)."""
    spacing = np.array([0.6, 0.85, 1.1])  # RAS axes; the crop (64 voxels) fits inside the volume
    torch.manual_seed(0)
    meta = {"model": CFG.to_dict(), "mim": MiMConfig().to_dict(), "preset": "tiny",
            "preprocessing": Preprocessing(spacing=tuple(spacing)).to_dict()}
    ckpt = save_checkpoint(tmp_path / "run", 1, MiMPretrainModel(CFG), meta)
    out = tmp_path / "out"
    assert main(["reconstruct", "--checkpoint", str(ckpt), "--image", str(setup["image"]),
                 "--center", *[f"{v:.6f}" for v in WORLD_CENTER], "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["preprocessing"]["spacing"] == spacing.tolist()
    assert summary["crop"]["padded_fraction"] == 0.0
    crop_affine = np.array(summary["crop"]["affine"])
    np.testing.assert_allclose(np.linalg.norm(crop_affine[:3, :3], axis=0), spacing, atol=1e-6)
    plain = np.array(result[1]["crop"]["affine"])[:3, :3]  # the same image without resampling
    np.testing.assert_allclose(crop_affine[:3, :3] / spacing, plain / np.linalg.norm(plain, axis=0),
                               atol=1e-6)  # same oriented axes, only the voxel size differs
    assert np.linalg.norm(np.array(summary["crop"]["center_ras"]) - WORLD_CENTER) < np.linalg.norm(spacing)
    for entry in summary["levels"][1]["volumes"]:  # level 2: crop resolution
        vol = load_volume(out / entry["files"]["original"])
        np.testing.assert_allclose(vol.spacing, spacing, atol=1e-5)
        np.testing.assert_allclose(vol.array, hu_at(world_of_voxels(vol.affine, vol.shape)), atol=2e-2)
    lv1 = load_volume(out / summary["levels"][0]["volumes"][0]["files"]["original"])
    np.testing.assert_allclose(lv1.spacing, 2 * spacing, atol=1e-5)


def test_real_entry_point_json_progress(setup, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "mimcore", "reconstruct", "--checkpoint", str(setup["ckpt"].parent),
         "--image", str(setup["image"]), "--output", str(out), "--progress", "json", "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    progress = [e for e in events if e["event"] == "progress"]
    assert events[0]["event"] == "start" and events[0]["total"] == 3 and events[0]["step"] == 0
    assert [e["step"] for e in progress] == [1, 2, 3]
    assert all(e["stage"] == "reconstruct" and e["total"] == 3 for e in progress)
    assert all(e["eta_s"] >= 0 for e in progress) and progress[-1]["eta_s"] == 0.0
    assert events[-1]["event"] == "done"
    outputs = events[-1]["outputs"]
    assert Path(outputs["sheet"]).is_file() and Path(outputs["summary"]).is_file()
    assert all(Path(d).is_dir() for d in outputs["levels"].values())
    # default centre = the volume's centre, no padding for this volume
    assert outputs["padded_fraction"] == 0.0


# ---------------------------------------------------------------- issue 15: pictures that tell the truth


def test_summary_says_what_the_sheet_shows(result):
    """levels.png's text is in summary.json: the checkpoint's step, the padding, the loss of
    predicting the mean next to each loss, and, for this untrained model, a plain warning."""
    out, summary = result
    assert summary["checkpoint_step"] == 3 and summary["checkpoint_source"] == "mimcore"
    heading = summary["sheet_text"][0]
    assert "step 3" in heading
    assert any("0% of it lies outside the volume" in line for line in summary["sheet_text"])
    for lv in summary["levels"]:
        assert 0.5 < lv["baseline_loss"] <= 1.0  # predicting every norm-pix token as its mean
        lo, hi = lv["display_window_hu"]
        assert -1000 <= lo < hi <= 1000 and hi - lo >= 500  # one window per level, a quarter of the model's at least
        assert all(e["padded_fraction"] == 0.0 for e in lv["volumes"])
    # a random model reconstructs no better than the mean: the sheet and the summary say so
    assert summary["learning"]["loss_to_baseline"] > 0.9
    assert "has not learned yet at step 3" in summary["learning"]["warning"]
    assert summary["sheet_text"][-1].startswith("WARNING: the model has not learned yet")
    assert summary["spacing"] == {"requested": "auto", "used": "native", "trained": "native"}


def test_learning_warning_only_when_no_better_than_the_mean():
    from mimcore.reconstruct.figure import learning_warning

    ratio, text = learning_warning([0.99, 1.0, 1.01], [1.0, 1.0, 1.0], 80, is_mim=True)
    assert ratio > 0.9 and "not learned yet at step 80" in text and "flat blocks" in text
    ratio, text = learning_warning([0.3, 0.4, 0.5], [1.0, 1.0, 1.0], 5000, is_mim=True)
    assert ratio < 0.5 and text is None


def test_one_window_per_level_keeps_air_noise_flat(tmp_path):
    """Air with +-5 HU noise stays one flat dark grey (per-row auto-contrast made it texture),
    and the row's three panels share the window: a reconstruction 400 HU brighter shows brighter."""
    import matplotlib.image

    from mimcore.reconstruct.figure import SheetRow, display_window, write_sheet

    rng = np.random.default_rng(0)
    air = (-1000 + 5 * rng.standard_normal((1, 32, 32, 32))).astype(np.float32)
    pad = np.zeros(air.shape, dtype=bool)
    window = display_window(air, pad, (-1000.0, 1000.0))
    assert window[1] - window[0] >= 500 and window[0] == -1000.0
    arrays = {"original": air[0], "hidden": air[0], "reconstruction": air[0] + 400}
    hidden = np.zeros((32, 32, 32), dtype=bool)
    row = SheetRow("level 1", arrays, np.eye(4), hidden, pad[0], window, 1.0, 1.0)
    path = write_sheet(tmp_path / "levels.png", [row], "test")
    img = matplotlib.image.imread(path)[..., :3].mean(-1)
    # panels: the three dark/grey squares of the one row (columns with many non-white pixels)
    ink = img < 0.9
    cols = np.nonzero(ink.sum(0) > 100)[0]
    runs = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)
    assert len(runs) == 3
    rows = np.nonzero(ink[:, runs[0]].sum(1) > 0.5 * len(runs[0]))[0]
    centre = slice(rows[0] + 20, rows[-1] - 20)
    original, reconstruction = (img[centre, r[10:-10]] for r in (runs[0], runs[2]))
    # noise of +-5 HU in a >= 500 HU window: at most a few grey levels (letters excluded by the margins)
    assert np.percentile(original, 95) - np.percentile(original, 5) < 0.05
    assert np.median(reconstruction) > np.median(original) + 0.3


def test_all_padding_crop_is_refused(tmp_path, capsys):
    """A checkpoint pre-trained with a foreground crop and a centre in air far from the body:
    the crop would hold nothing of the volume, so the command refuses (exit 2) and writes nothing."""
    values = np.full((96, 96, 96), -1000.0, dtype=np.float32)
    values[80:, 80:, 80:] = 40.0  # the "body", in one corner
    image = save_volume(tmp_path / "air.nii.gz", values, np.eye(4))
    meta = {"model": CFG.to_dict(), "mim": MiMConfig().to_dict(), "preset": "tiny",
            "preprocessing": Preprocessing(crop_foreground=True).to_dict()}
    ckpt = save_checkpoint(tmp_path / "run", 1, MiMPretrainModel(CFG), meta)
    out = tmp_path / "out"
    rc = main(["reconstruct", "--checkpoint", str(ckpt), "--image", str(image), "--center", "5", "5", "5",
               "--output", str(out), "--progress", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and "all padding" in err and "--center" in err and "Traceback" not in err
    assert not out.exists()


def test_thick_slices_say_why_and_offer_spacing():
    """A 7 mm-slice CT and a checkpoint pre-trained at native spacing: the 64-voxel crop is 448 mm
    tall against a 210 mm volume; the note says moving --center cannot help and names --spacing."""
    from mimcore.data.volume_io import Volume
    from mimcore.reconstruct import extract_crop
    from mimcore.reconstruct.spacing import padding_note, preview_preprocessing

    affine = np.diag([1.5, 1.5, 7.0, 1.0])
    vol = Volume(np.zeros((160, 160, 30), dtype=np.float32), affine, "thick")  # 240 x 240 x 210 mm
    trained = Preprocessing()
    prep, info = preview_preprocessing(trained, "auto")
    assert prep.spacing is None and info["used"] == "native"
    crop = extract_crop(vol, CFG.crop_size, prep)
    note = padding_note(crop, CFG.crop_size, prep, trained)
    assert crop.padded_fraction > 0.5  # 34 of 64 slices
    assert "cannot avoid it" in note and "S 448 mm against the volume's 210 mm" in note and "--spacing X Y Z" in note
    # with --spacing the crop fits along S and is placed at the same RAS centre
    prep3, info3 = preview_preprocessing(trained, (3.0, 3.0, 3.0))
    assert info3 == {"requested": [3.0, 3.0, 3.0], "used": [3.0, 3.0, 3.0], "trained": "native"}
    crop3 = extract_crop(vol, CFG.crop_size, prep3)
    assert crop3.padded_fraction == 0.0  # 64 x 3 mm = 192 mm: inside the 210 mm
    np.testing.assert_allclose(np.linalg.norm(crop3.affine[:3, :3], axis=0), 3.0, atol=1e-6)
    assert np.linalg.norm(crop3.center_ras - crop.center_ras) < 7.0
    # a checkpoint with a recorded spacing: auto uses it, native opts out
    rec = Preprocessing(spacing=(2.0, 2.0, 2.0))
    assert preview_preprocessing(rec, "auto")[0].spacing == (2.0, 2.0, 2.0)
    assert preview_preprocessing(rec, "native")[0].spacing is None


def test_spacing_option_resamples_the_preview(setup, tmp_path, capsys):
    """`--spacing X Y Z` on a checkpoint pre-trained at native spacing: the preview is on that grid,
    every voxel still holds the source's intensity at its world position, and the crop's RAS centre
    is the requested one. `--progress none` prints no per-level lines."""
    spacing = [0.6, 0.85, 1.1]
    out = tmp_path / "out"
    assert main(["reconstruct", "--checkpoint", str(setup["ckpt"]), "--image", str(setup["image"]),
                 "--center", *[f"{v:.6f}" for v in WORLD_CENTER], "--output", str(out),
                 "--spacing", *map(str, spacing), "--progress", "none"]) == 0
    printed = capsys.readouterr().out
    assert "reconstructed" not in printed and "summary:" in printed
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["spacing"] == {"requested": spacing, "used": spacing, "trained": "native"}
    crop_affine = np.array(summary["crop"]["affine"])
    np.testing.assert_allclose(np.linalg.norm(crop_affine[:3, :3], axis=0), spacing, atol=1e-6)
    assert np.linalg.norm(np.array(summary["crop"]["center_ras"]) - WORLD_CENTER) < np.linalg.norm(spacing)
    entry = summary["levels"][1]["volumes"][0]
    vol = load_volume(out / entry["files"]["original"])
    np.testing.assert_allclose(vol.array, hu_at(world_of_voxels(vol.affine, vol.shape)), atol=2e-2)


@pytest.mark.parametrize("bad", [["--progress", "text2"], ["--spacing", "1", "2"], ["--spacing", "0", "1", "1"]])
def test_bad_options_exit_2(setup, bad, capsys):
    with pytest.raises(SystemExit) as exc:
        rc = main(["reconstruct", "--checkpoint", str(setup["ckpt"]), "--image", str(setup["image"]), *bad])
        raise SystemExit(rc)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("--progress" in err or "--spacing" in err)


def _as_authors(state: dict) -> dict:
    """Our MiMPretrainModel state dict under the authors' names (and 1x1x1 conv shapes)."""
    from mimcore.methods.mim_official import map_name

    ref = json.loads((Path(__file__).parent / "data" / "mim_official_pretrain_state_dict_shapes.json")
                     .read_text(encoding="utf-8"))["tensors"]
    out = {}
    for name, shape in ref.items():
        mapped = map_name(name)
        if mapped is not None and mapped[0] in state:
            t = state[mapped[0]]
            out[name] = t.reshape(*t.shape, 1, 1, 1) if len(shape) == 5 and t.dim() == 2 else t.clone()
    assert {map_name(n)[0] for n in out} == set(state)  # every tensor of ours has an authors' name
    return out


def test_authors_pth_is_imported(setup, result, tmp_path, capsys):
    """`--checkpoint authors.pth` (a UnicodeDecodeError traceback before): read with
    torch.load(weights_only=True), renamed, loaded into the MiM model of its size; the same
    weights as the project checkpoint give the same reconstruction. `--progress text` (the old
    name of bar) is still accepted and prints a line per level."""
    from mimcore.methods.registry import load_pretrain_checkpoint

    model, _ = load_pretrain_checkpoint(setup["ckpt"])
    pth = tmp_path / "authors.pth"
    torch.save({"model": _as_authors(model.state_dict()), "epoch": 799}, pth)
    out = tmp_path / "out"
    rc = main(["reconstruct", "--checkpoint", str(pth), "--image", str(setup["image"]),
               "--center", *[f"{v:.6f}" for v in setup["center"]], "--output", str(out), "--seed", "3",
               "--progress", "text"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "level 3/3 reconstructed" in captured.out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["checkpoint_source"] == "authors" and summary["checkpoint_step"] is None
    assert "authors' published checkpoint" in summary["sheet_text"][0]
    assert summary["preprocessing"]["hu_min"] == -1000 and summary["preprocessing"]["spacing"] is None
    for key, value in result[1]["losses"].items():
        assert summary["losses"][key] == pytest.approx(value, rel=1e-5)


def test_unreadable_checkpoints_say_what_to_pass(setup, tmp_path, capsys):
    garbage = tmp_path / "authors.pth"
    garbage.write_bytes(b"\x80\x04not really a pickle" * 10)
    binary_json = tmp_path / "checkpoint_00000001.json"
    binary_json.write_bytes(b"\xff\xfe\x00binary")
    for path, words in ((garbage, "not a plain tensor checkpoint"), (binary_json, "authors' MiM .pth")):
        rc = main(["reconstruct", "--checkpoint", str(path), "--image", str(setup["image"]),
                   "--output", str(tmp_path / "never")])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err and "UnicodeDecodeError" not in err
    assert not (tmp_path / "never").exists()
