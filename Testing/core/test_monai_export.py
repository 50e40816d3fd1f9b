"""The exported MONAI bundle, run by MONAI's own runner as its users run it.

``python -m monai.bundle run`` (a real subprocess, with ``fire`` and ``pytorch-ignite`` from
MiMCore's ``test`` extra) runs the bundle that ``mim models export NAME DEST --format monai``
writes, from a working directory that is not the bundle, on a folder of one NIfTI and one
NRRD CT; its label maps are compared with ``mim segment``'s on the same folder: same grid,
labels that agree except at organ boundaries. An input folder without volumes exits with
code 2 and a message; the exported files name no folder of the exporting machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from mimcore.bundles.bundle import save_bundle
from mimcore.data.labels import labels_from_names
from mimcore.data.volume_io import save_volume
from mimcore.models.convvit import preset as convvit_preset
from mimcore.models.mim_segnet import MiMSegNet, architecture_dict

PREP = {"orientation": "RAS", "spacing": [2.0, 2.0, 2.0], "hu_min": -175.0, "hu_max": 250.0}
#: Dice (liver, spleen) between MONAI's runner and mim segment, measured on the two phantoms
#: below (2026-12-02): 0.916/0.899 (NIfTI) and 0.908/0.916 (NRRD), about 99 % of voxels equal.
#: They differ at organ boundaries only: MONAI resamples the class probabilities onto the
#: input grid (bilinear) and takes the argmax there, mim segment takes the argmax at the
#: model's 2 mm and resamples the labels (nearest neighbour). The test also checks that a
#: map flipped along any axis scores below this bound, so the bound does tell misplaced maps.
MIN_DICE = 0.8


def phantom(shape, spacing, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CT-like volume on a non-RAS (x and z flipped), anisotropic, shifted grid: air, a
    soft-tissue body and two brighter organs placed off every axis' centre, with noise.
    Returns (HU array, RAS affine, organ labels 0/1/2)."""
    affine = np.diag([-spacing[0], spacing[1], -spacing[2], 1.0])
    affine[:3, 3] = [40.0, -25.0, 60.0]
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu, truth = np.full(shape, -1000.0), np.zeros(shape, np.uint8)
    hu[x**2 + y**2 < 0.8] = -100.0
    liver = (x + 0.35) ** 2 + (y - 0.1) ** 2 + (z - 0.2) ** 2 < 0.2
    spleen = (x - 0.4) ** 2 + (y + 0.25) ** 2 + (z + 0.3) ** 2 < 0.1
    hu[liver], truth[liver] = 100.0, 1
    hu[spleen], truth[spleen] = 240.0, 2
    hu += 20 * np.random.default_rng(seed).standard_normal(shape)
    return hu.astype(np.float32), affine, truth


def organ_model(hu: np.ndarray, affine: np.ndarray, truth: np.ndarray) -> MiMSegNet:
    """The tiny MiM network, random but for its output layer, which is fitted (logistic
    regression on the blended decoder features) to one phantom's organs: its label maps have
    organ-shaped boundaries, as a trained model's do, in a few seconds."""
    from monai.inferers import sliding_window_inference

    from mimcore.data.regrid import labels_to_grid
    from mimcore.data.volume_io import Volume
    from mimcore.inference.segment import preprocess

    torch.manual_seed(0)
    net = MiMSegNet(convvit_preset("tiny"), 3).eval()
    img = preprocess(Volume(hu, affine), PREP)
    target = labels_to_grid(truth, affine, Volume(np.zeros(img.shape[1:], np.float32), np.asarray(img.affine)))
    captured = {}

    def features(x):
        hook = net.head.register_forward_hook(lambda module, args, out: captured.update(f=args[0]))
        net(x)
        hook.remove()
        return captured["f"]

    with torch.no_grad():  # the head is linear: blended features -> blended logits
        feats = sliding_window_inference(img.as_tensor()[None], (32,) * 3, 2, features, overlap=0.25, mode="gaussian")
    f = feats[0].reshape(feats.shape[1], -1).T
    y = torch.from_numpy(target.astype(np.int64)).reshape(-1)
    weight = torch.zeros(3, f.shape[1], requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    balance = 1.0 / torch.bincount(y, minlength=3).float().clamp(min=1)
    opt = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(f @ weight.T + bias, y, weight=balance)
        loss.backward()
        return loss

    opt.step(closure)
    conv = net.head.conv.conv
    with torch.no_grad():
        conv.weight.copy_(weight.detach().reshape(conv.weight.shape))
        conv.bias.copy_(bias.detach())
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny organ model as a bundle whose description holds local absolute paths (as mim
    finetune writes them), exported as a MONAI bundle (what `mim models export NAME DEST
    --format monai` runs); an input folder with a NIfTI and an NRRD phantom."""
    from mimcore.bundles.library import export_model

    root = tmp_path_factory.mktemp("monai_export")
    inputs = root / "inputs"
    inputs.mkdir()
    hu, affine, truth_a = phantom((44, 40, 22), (1.45, 1.6, 2.7), seed=2)
    save_volume(inputs / "a.nii.gz", hu, affine)
    hu_b, affine_b, truth_b = phantom((36, 44, 30), (1.9, 1.3, 2.1), seed=3)
    save_volume(inputs / "b.nrrd", hu_b, affine_b)
    net = organ_model(hu, affine, truth_a)
    labels = labels_from_names({1: "liver", 2: "spleen"})
    desc = {"name": "tiny-test", "architecture": architecture_dict(net, "tiny"),
            "labels": [lab.to_dict() for lab in labels], "preprocessing": PREP,
            "inference": {"overlap": 0.25, "sw_batch_size": 2},
            "training": {"args": {"datalist": str(root / "data" / "datalist.json"), "output": str(root / "runs"),
                                  "init": f"file://{root}/pretrain/checkpoint.safetensors"},
                         "init": {"path": "C:\\Users\\me\\runs\\mim"}, "data": ["case_0"]}}
    bundle = save_bundle(root / "tiny", net.state_dict(), desc)
    dest = export_model(str(bundle), root / "exported", fmt="monai", library=root / "library")
    return {"root": root, "bundle": bundle, "monai": dest, "inputs": inputs, "truth": {"a": truth_a, "b": truth_b}}


def monai_runner(bundle: Path, cwd: Path, *args: str) -> list[str]:
    """The ``python -m monai.bundle run`` command line of the exported bundle (absolute paths)."""
    cwd.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
            "--meta_file", str(bundle / "configs" / "metadata.json"), *args]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    return 2 * float((x & y).sum()) / max(1, int(x.sum() + y.sum()))


@pytest.fixture(scope="module")
def runs(exported):
    """Three real processes at once (they are mostly start-up time): MONAI's runner on the input
    folder and on a folder without volumes, each started in a folder that is not the bundle,
    and ``mim segment`` on the input folder. -> {name: (exit code, output)} and their folders."""
    root, inputs = exported["root"], exported["inputs"]
    empty = root / "no_volumes"
    empty.mkdir()
    (empty / "notes.txt").write_text("no CT here")
    folders = {"out_monai": root / "out_monai", "out_mim": root / "out_mim", "out_empty": root / "out_empty",
               "elsewhere": root / "elsewhere", "elsewhere2": root / "elsewhere2"}
    commands = {
        "monai": (monai_runner(exported["monai"], folders["elsewhere"], "--dataset_dir", str(inputs),
                               "--output_dir", str(folders["out_monai"])), folders["elsewhere"]),
        "empty": (monai_runner(exported["monai"], folders["elsewhere2"], "--dataset_dir", str(empty),
                               "--output_dir", str(folders["out_empty"])), folders["elsewhere2"]),
        "mim": ([sys.executable, "-m", "mimcore", "segment", str(inputs), "--model", str(exported["bundle"]),
                 "--output", str(folders["out_mim"]), "--device", "cpu", "--progress", "none"], root),
    }
    procs = {name: subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for name, (cmd, cwd) in commands.items()}
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            proc.kill()
    return dict(results, **folders)


def test_monai_runner_from_another_folder_matches_mim_segment(exported, runs):
    """MONAI's runner, started outside the bundle, segments the NIfTI and the NRRD input onto
    each input's own grid, agreeing with mim segment (Dice >= MIN_DICE per organ)."""
    inputs = exported["inputs"]
    rc, out, err = runs["monai"]
    assert rc == 0, (out + err)[-4000:]
    assert runs["mim"][0] == 0, runs["mim"][2]
    out_monai, out_mim = runs["out_monai"], runs["out_mim"]
    assert sorted(p.name for p in out_monai.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert not list(runs["elsewhere"].iterdir())  # nothing written where the runner was started
    scores = {}
    for case in ("a", "b"):
        ct = sitk.ReadImage(str(next(inputs.glob(f"{case}.*"))))
        ours = sitk.ReadImage(str(out_mim / f"{case}_seg.nii.gz"))
        theirs = sitk.ReadImage(str(out_monai / f"{case}_seg.nii.gz"))
        for image in (ours, theirs):  # exactly the input's grid
            assert image.GetSize() == ct.GetSize()
            np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-5)
            np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)
        a = sitk.GetArrayFromImage(ours).transpose(2, 1, 0)  # (X, Y, Z) as the phantom
        b = sitk.GetArrayFromImage(theirs).transpose(2, 1, 0)
        truth = exported["truth"][case]
        assert set(np.unique(b).tolist()) <= {0, 1, 2}
        for labels in (a, b):  # the model does find the organs: the comparison means something
            assert min(dice(labels, truth, v) for v in (1, 2)) > 0.6
        scores[case] = [round(dice(a, b, v), 3) for v in (1, 2)]
        for axis in range(3):  # a map on a flipped grid would not pass
            assert min(dice(np.flip(a, axis), b, v) for v in (1, 2)) < MIN_DICE, (case, axis)
        assert float((a == b).mean()) > 0.95, (case, scores)
    print("Dice MONAI runner vs mim segment (liver, spleen):", scores)
    assert min(min(s) for s in scores.values()) >= MIN_DICE, scores


def test_monai_runner_without_volumes_exits_2_with_a_message(runs):
    """A folder holding no volume (here: only a text file) is not a successful run without output."""
    rc, out, err = runs["empty"]
    assert rc == 2, (out + err)[-3000:]
    assert "No volumes found" in err and "--dataset_dir" in err
    assert "Traceback" not in err
    assert not runs["out_empty"].exists()


def test_exported_bundle_names_its_runner_packages_and_no_local_path(exported):
    """fire and pytorch-ignite (the runner's needs) are in the metadata and the README at the
    versions installed here; no exported file holds a path of the exporting machine."""
    from mimcore.bundles.monai_export import RUNNER_PACKAGES

    dest, root = exported["monai"], exported["root"]
    meta = json.loads((dest / "configs" / "metadata.json").read_text(encoding="utf-8"))
    required = meta["required_packages_version"]
    assert "optional_packages_version" not in meta  # MONAI would rename it onto required_packages_version
    readme = (dest / "docs" / "README.md").read_text(encoding="utf-8")
    for name, pinned in RUNNER_PACKAGES.items():
        assert required[name] == pinned and version(name) == pinned, name
        assert f"{name}=={pinned}" in readme
    assert "mimcore" in required
    for path in dest.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for local in (str(root), "C:\\Users", "file://"):
                assert local.encode() not in data, (path, local)
    training = meta["mimcore"]["training"]
    assert training["args"]["datalist"] == "datalist.json" and training["init"]["path"] == "mim"
    assert training["data"] == ["case_0"]


def test_export_again_with_overwrite_replaces_the_monai_bundle(exported, tmp_path):
    """`mim models export NAME DEST --format monai --overwrite` onto an earlier export replaces
    it (instead of nesting a second bundle inside it); without --overwrite it is refused."""
    from mimcore.bundles.library import export_model
    from mimcore.errors import MimError

    dest = tmp_path / "monai"
    assert export_model(str(exported["bundle"]), dest, fmt="monai") == dest
    (dest / "eval").mkdir()  # what an earlier run left in it
    assert export_model(str(exported["bundle"]), dest, fmt="monai", overwrite=True) == dest
    assert sorted(p.name for p in dest.iterdir()) == ["configs", "docs", "models"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monai"]  # no temporary folder left
    with pytest.raises(MimError, match="already exists; pass --overwrite"):
        export_model(str(exported["bundle"]), dest, fmt="monai")
