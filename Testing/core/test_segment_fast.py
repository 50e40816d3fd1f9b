"""The fast profile (``mim segment --fast``): same grid, labels that agree with the reference
path, and no network call outside the body's box."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from test_atomic_outputs import PREP, tiny_bundle_at

from mimcore.bundles.bundle import load_bundle
from mimcore.data.regrid import labels_to_grid
from mimcore.data.volume_io import Volume, save_volume
from mimcore.inference.body_region import body_mask, threshold_value
from mimcore.inference.profiles import PROFILES, autocast_dtype, cpu_has_bf16
from mimcore.inference.segment import Segmenter, preprocess

DICE_BF16_RANDOM = 0.9


def body_ct(shape=(80, 72, 24), spacing=(2.0, 2.2, 2.5), centre=(0.3, 0.35), seed=0) -> Volume:
    """An LPS-stored CT in HU: air (-1000), an elliptic body (40) off-centre in the xy-plane with a
    brighter organ (120) and a bone (700) in it, noise; the body fills well under half the slice."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    body = ((x - centre[0]) / 0.25) ** 2 + ((y - centre[1]) / 0.2) ** 2 < 1
    hu[body] = 40.0
    organ = ((x - centre[0] + 0.08) / 0.1) ** 2 + ((y - centre[1]) / 0.08) ** 2 + ((z - 0.5) / 0.4) ** 2 < 1
    hu[body & organ] = 120.0
    hu[body & (((x - centre[0]) / 0.04) ** 2 + ((y - centre[1] - 0.12) / 0.04) ** 2 < 1)] = 700.0
    hu += 15 * rng.standard_normal(shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [40.0, 30.0, -50.0]
    return Volume(hu.astype(np.float32), affine, "synthetic body")


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A ``tiny`` MiMSegNet (32^3 windows), random weights, three classes, overlap 0.5."""
    return tiny_bundle_at(tmp_path_factory.mktemp("bundle"), overlap=0.5, name="tiny-fast")


def test_precision_per_profile():
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto", PROFILES["reference"]) is None  # the reference path stays fp32
    assert autocast_dtype(cpu, "auto", PROFILES["fast"]) == (torch.bfloat16 if cpu_has_bf16() else None)
    assert autocast_dtype(cpu, "bf16", PROFILES["reference"]) == torch.bfloat16
    assert autocast_dtype(cpu, "fp32", PROFILES["fast"]) is None


def test_cli_reports_the_overlap_it_ran_with(tmp_path, tiny_bundle, capsys):
    """``mim segment`` says which overlap its windows used: the bundle's unless --overlap is
    given (start event, case line); --fast keeps the bundle's (fewer windows were measured and
    rejected: Dice 0.88-0.92 against the reference for a 1.5 mm model's liver)."""
    import json

    from mimcore.cli.main import main

    vol = body_ct(shape=(60, 50, 20))
    src = save_volume(tmp_path / "ct.nrrd", vol.array, vol.affine)
    assert main(["segment", str(src), "--model", str(tiny_bundle), "--output", str(tmp_path / "a.nii.gz"), "--fast",
                 "--progress", "json"]) == 0
    start = next(json.loads(line) for line in capsys.readouterr().out.splitlines() if '"start"' in line)
    assert start["overlap"] == 0.5
    assert main(["segment", str(src), "--model", str(tiny_bundle), "--output", str(tmp_path / "b.nii.gz"), "--fast",
                 "--overlap", "0.3", "--progress", "bar"]) == 0
    assert "overlap 0.3)" in capsys.readouterr().out


def test_body_mask_holds_the_body_and_leaves_the_air_out():
    vol = body_ct()
    img = preprocess(vol, PREP).as_tensor()
    mask = body_mask(img, threshold_value(PREP["hu_min"], PREP["hu_max"]))
    assert mask is not None and mask.shape == img.shape[1:]
    assert not ((img[0] > 0) & ~mask).any()  # every voxel the network sees as tissue is inside
    assert mask.float().mean() < 0.5  # and most of the air is not
    assert threshold_value(-1000, 1000) == 0.25  # a window that shows air: -500 HU
    assert body_mask(torch.zeros(1, 30, 30, 20), 0.0) is None  # nothing above: every window
    assert body_mask(torch.ones(1, 30, 30, 20), 0.0) is None  # everything above: every window


def windows_touching(mask: torch.Tensor, seg: Segmenter) -> int:
    """Windows of the slab-by-slab sliding window that hold a mask voxel (MONAI's own positions)."""
    win = seg.window
    axis, cores = win.slabs(tuple(mask.shape), seg.n_classes)
    n = 0
    for a, b in cores:
        lo, hi = max(0, a - win.roi // 2), min(mask.shape[axis], b + win.roi // 2)
        sub = mask.narrow(axis, lo, hi - lo)
        pad = [max(0, win.roi - s) for s in sub.shape]
        size = [s + p for s, p in zip(sub.shape, pad)]
        sub = torch.nn.functional.pad(sub, [x for p in reversed(pad) for x in (p // 2, p - p // 2)])
        interval = _get_scan_interval(size, (win.roi,) * 3, 3, (win.overlap,) * 3)
        n += sum(bool(sub[sl].any()) for sl in dense_patch_slices(size, (win.roi,) * 3, interval))
    return n


def counting(calls: list):
    def forward(net, x):  # every network call, with its window batch
        calls.append(x.shape[0])
        return net(x)
    return forward


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """The reference path on :func:`body_ct`: its network calls, model-space labels and affine."""
    calls = []
    ref = Segmenter(load_bundle(tiny_bundle), device="cpu", forward=counting(calls))
    labels, affine = ref.segment_model_space(body_ct())
    assert sum(calls) == ref.total_windows(body_ct())
    return {"calls": sum(calls), "labels": labels, "affine": affine}


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_air_windows_are_not_computed_and_the_body_is_unchanged(tiny_bundle, reference, runtime):
    """fp32 fast path against the reference path: the network runs exactly on the windows that
    hold a body voxel, and inside the body mask the labels are identical (PyTorch), or differ
    on at most 1 voxel in 10^4 (OpenVINO's fp32 sums in another order)."""
    vol = body_ct()
    fast_calls = []
    fast = Segmenter(load_bundle(tiny_bundle), device="cpu", precision="fp32", profile="fast",
                     forward=counting(fast_calls), runtime=runtime)
    assert fast.runtime == runtime
    mask = fast.body_region(preprocess(vol, PREP).as_tensor())
    b, _ = fast.segment_model_space(vol)
    assert sum(fast_calls) == windows_touching(mask, fast) < 0.7 * reference["calls"]
    a, b = reference["labels"][mask.numpy()], b[mask.numpy()]
    if runtime == "torch":
        np.testing.assert_array_equal(a, b)
    else:
        assert (a != b).mean() <= 1e-4, (a != b).sum()


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_fast_bf16_agrees_with_the_reference_on_the_input_grid(tiny_bundle, reference, runtime):
    vol = body_ct()
    a = labels_to_grid(reference["labels"], reference["affine"], vol)
    b = Segmenter(load_bundle(tiny_bundle), device="cpu", precision="bf16", profile="fast",
                  runtime=runtime).segment(vol)
    assert a.shape == b.shape == vol.shape and a.dtype == b.dtype == np.uint8
    body = vol.array > -500
    for c in (1, 2):  # random weights: logits near ties; trained models agree better (the benchmark)
        x, y = (a == c) & body, (b == c) & body
        assert x.sum() > 100
        dice = 2 * (x & y).sum() / (x.sum() + y.sum())
        assert dice > DICE_BF16_RANDOM, (c, dice)


def test_cli_fast_keeps_the_input_grid(tmp_path, tiny_bundle):
    """``mim segment --fast`` (the flag the Slicer module passes), in process."""
    from mimcore.cli.main import main

    vol = body_ct(shape=(60, 50, 20))
    src = save_volume(tmp_path / "ct.nrrd", vol.array, vol.affine)
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(src), "--model", str(tiny_bundle), "--output", str(out), "--fast",
                 "--precision", "bf16", "--progress", "none"]) == 0
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert a.GetSize() == b.GetSize() and a.GetDirection() == b.GetDirection()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
