"""Whole-volume segmentation: geometry survives, slabs stitch exactly, memory stays bounded, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_atomic_outputs import PREP, tiny_bundle_at

from mimcore.bundles.bundle import load_bundle
from mimcore.data.regrid import labels_to_grid
from mimcore.data.volume_io import Volume, load_volume, save_volume
from mimcore.inference.segment import Segmenter, preprocess
from mimcore.inference.window import WindowSegmenter



def oblique_volume(shape=(40, 36, 30), spacing=(1.2, 0.9, 2.5)) -> Volume:
    """A non-RAS (x and z flipped), rotated, anisotropic grid with a bright ellipsoid placed in mm."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1, 1, -1])
    affine = np.eye(4)
    affine[:3, :3] = rot * np.asarray(spacing)
    affine[:3, 3] = [31.0, -12.5, 40.0]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ (np.asarray(shape) / 2) + affine[:3, 3]
    d = (xyz - centre) / np.array([14.0, 10.0, 18.0])
    hu = np.where((d**2).sum(1) < 1, 200.0, -800.0).reshape(shape).astype(np.float32)
    return Volume(hu, affine, "synthetic")


def test_labels_come_back_on_the_input_grid_at_the_right_place():
    vol = oblique_volume()
    img = preprocess(vol, PREP)
    assert np.allclose(np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0), 2.0)
    model_labels = (np.asarray(img[0]) > 0.5).astype(np.uint8)  # "segment" the ellipsoid in model space
    back = labels_to_grid(model_labels, np.asarray(img.affine), vol)
    assert back.shape == vol.shape and back.dtype == np.uint8
    truth = vol.array > 0
    dice = 2 * (back.astype(bool) & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.9, dice  # a misplaced or flipped map would not overlap


def pointwise_net(n_classes: int) -> torch.nn.Module:
    """Per-voxel logits: every window gives a voxel the same value, so blending is exact."""
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, n_classes, 1)


def test_slabs_stitch_exactly_and_bound_memory():
    net = pointwise_net(4)
    image = torch.rand(1, 50, 46, 90)
    whole = WindowSegmenter(net, 16, torch.device("cpu"), overlap=0.25, sw_batch=4)(image, 4)
    small = WindowSegmenter(net, 16, torch.device("cpu"), overlap=0.25, sw_batch=4, slab_budget_bytes=2_000_000)
    axis, cores = small.slabs(tuple(image.shape[1:]), 4)
    assert axis == 2 and len(cores) > 2
    assert cores[0][0] == 0 and cores[-1][1] == 90 and all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    slab_voxels = 50 * 46 * (max(b - a for a, b in cores) + 16)
    assert slab_voxels * 4 * (4 + 2) <= 2_000_000 * 1.5
    np.testing.assert_array_equal(small(image, 4), whole)
    with torch.no_grad():
        expected = net(image[None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(whole, expected)


def test_slab_budget_for_a_large_ct():
    seg = WindowSegmenter(pointwise_net(10), 96, torch.device("cpu"), slab_budget_bytes=1 << 30)
    axis, cores = seg.slabs((341, 341, 400), 10)
    thick = max(b - a for a, b in cores) + 96
    assert axis == 2 and 341 * 341 * thick * 4 * 12 <= (1 << 30) * 1.1


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return tiny_bundle_at(tmp_path_factory.mktemp("bundle"))


def test_segmenter_output_grid_and_tta(tiny_bundle):
    vol = oblique_volume()
    seg = Segmenter(load_bundle(tiny_bundle), device="cpu")
    labels = seg.segment(vol)
    assert labels.shape == vol.shape and labels.dtype == np.uint8 and labels.max() <= 2
    calls = []
    tta = Segmenter(load_bundle(tiny_bundle), device="cpu", tta=True, windows=calls.append)
    assert tta.segment(vol).shape == vol.shape
    assert sum(calls) == tta.total_windows(vol)  # progress totals match the work done


@pytest.mark.parametrize("seed", range(6))
def test_lazy_preprocessing_predicts_the_exact_shape(seed):
    """Progress totals come from the lazy shape: it must equal the resampled one on grids
    where rounding the extent could go either way."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(20, 70, 3))
    affine = np.eye(4)
    affine[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0] * rng.uniform(0.6, 3.1, 3)
    affine[:3, 3] = rng.normal(size=3) * 40
    vol = Volume(np.zeros(shape, np.float32), affine)
    prep = dict(PREP, spacing=[1.5, 1.5, 2.0])
    assert tuple(preprocess(vol, prep, lazy=True).peek_pending_shape()) == tuple(preprocess(vol, prep).shape[1:])


def geometry(path):
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def mim(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "mimcore", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_keeps_geometry_of_an_oblique_non_ras_volume(tmp_path, tiny_bundle):
    vol = oblique_volume()
    src = save_volume(tmp_path / "ct.nrrd", vol.array, vol.affine)
    out = tmp_path / "ct_labels.nrrd"
    proc = mim("segment", src, "--model", tiny_bundle, "--output", out, "--seg-nrrd", "--device", "cpu",
               "--progress", "json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total"]
    size, spacing, origin, direction = geometry(out)
    ref = geometry(src)
    assert size == ref[0]
    np.testing.assert_allclose(spacing, ref[1], atol=1e-6)
    np.testing.assert_allclose(origin, ref[2], atol=1e-6)
    np.testing.assert_allclose(direction, ref[3], atol=1e-6)
    from mimcore.data.segfile import read_seg_nrrd

    seg_labels, seg_affine, segments = read_seg_nrrd(tmp_path / "ct_labels.seg.nrrd")
    assert [(s.value, s.name) for s in segments] == [(1, "liver"), (2, "spleen")]
    np.testing.assert_allclose(seg_affine, load_volume(out).affine, atol=1e-5)
    np.testing.assert_array_equal(seg_labels, load_volume(out).array.astype(seg_labels.dtype))


def test_cli_batch_folder_and_clear_errors(tmp_path, tiny_bundle):
    folder = tmp_path / "cases"
    folder.mkdir()
    for i in range(2):
        vol = oblique_volume(shape=(20 + 4 * i, 18, 12))
        save_volume(folder / f"case{i}.nii.gz", vol.array, vol.affine)
    proc = mim("segment", folder, "--model", tiny_bundle, "--output", tmp_path / "out", "--progress", "none",
               "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0_seg.nii.gz", "case1_seg.nii.gz"]
    assert load_volume(tmp_path / "out" / "case1_seg.nii.gz").shape == (24, 18, 12)
    if not torch.cuda.is_available():
        bad = mim("segment", folder, "--model", tiny_bundle, "--output", tmp_path / "o2", "--device", "cuda")
        assert bad.returncode == 2 and "no CUDA GPU" in bad.stderr and "Traceback" not in bad.stderr
    missing = mim("segment", tmp_path / "nope.nii.gz", "--model", tiny_bundle, "--output", tmp_path / "o3")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    nomodel = mim("segment", folder, "--model", tmp_path / "no_model", "--output", tmp_path / "o4")
    assert nomodel.returncode == 2 and "Traceback" not in nomodel.stderr
