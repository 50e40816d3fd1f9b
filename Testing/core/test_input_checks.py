"""Inputs that used to be segmented silently wrong (issue 15): NaN/Inf voxels in NIfTI (ITK
reads them as 0), non-CT intensities under a CT model, and a batch that stopped at the
first unreadable file. Through the ``mim`` entry point, in-process (fast)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mimcore.cli.main import main as mim_main
from mimcore.data.volume_io import load_volume, nifti_nonfinite_counts
from mimcore.errors import MimError
from mimcore.inference.hu_check import hu_warning

from test_atomic_outputs import PREP, ct_volume, tiny_bundle_at


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return tiny_bundle_at(tmp_path_factory.mktemp("bundle"))


def nifti(path, data):
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.5, 1.0])), str(path))
    return path


def segment(*args):
    return mim_main(["segment", *map(str, args), "--device", "cpu"])


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("part", ["all", "some"])
def test_nan_nifti_is_refused_by_mim_segment(tmp_path, bundle, capsys, suffix, part):
    data = np.full((30, 28, 20), -1000.0, np.float32)
    if part == "all":
        data[:] = np.nan
    else:
        data[3:5, :, :] = np.nan
        data[0, 0, 0] = np.inf
    src = nifti(tmp_path / f"ct{suffix}", data)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(src))).min() == (0 if part == "all" else -1000)  # ITK: 0s
    out = tmp_path / "seg.nii.gz"
    code = segment(src, "--model", bundle, "--output", out, "--progress", "none")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not out.exists()
    expected = "16800 NaN or infinite voxel(s) (16800 NaN) out of 16800 (all)" if part == "all" \
        else "1121 NaN or infinite voxel(s) (1120 NaN, 1 infinite) out of 16800 (6.67 %)"
    assert expected in err and "Replace them" in err, err


def test_nonfinite_counts_are_exact_across_chunks(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(17, 13, 11)).astype(">f8")  # big-endian, odd sizes
    flat = data.reshape(-1)
    flat[rng.choice(flat.size, 37, replace=False)] = np.nan
    flat[[0, flat.size - 1]] = [np.inf, -np.inf]
    path = nifti(tmp_path / "x.nii.gz", data)
    assert nifti_nonfinite_counts(path, chunk_bytes=1000) == (37, 2, data.size)
    ints = nifti(tmp_path / "i.nii", np.zeros((4, 4, 4), np.int16))
    assert nifti_nonfinite_counts(ints) == (0, 0, 64)
    with pytest.raises(MimError, match=r"39 NaN or infinite voxel\(s\) \(37 NaN, 2 infinite\)"):
        load_volume(path)


def test_nan_in_nrrd_is_refused_too(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(data), str(tmp_path / "x.nrrd"))
    with pytest.raises(MimError, match=r"1 NaN or infinite voxel\(s\) \(1 NaN\)"):
        load_volume(tmp_path / "x.nrrd")


def test_batch_segments_the_rest_and_reports_each_failure(tmp_path, bundle, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "a_corrupt.nii.gz").write_bytes(b"not a volume at all" * 10)
    ct_volume(folder / "b_good.nii.gz")
    nifti(folder / "c_nan.nii", np.full((10, 10, 10), np.nan, np.float32))
    out = tmp_path / "out"
    code = segment(folder, "--model", bundle, "--output", out, "--progress", "json")
    captured = capsys.readouterr()
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == ["b_good_seg.nii.gz"]
    assert load_volume(out / "b_good_seg.nii.gz").shape == (40, 36, 30)
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert [e["input"] for e in events if e["event"] == "case"] == [str(folder / "b_good.nii.gz")]
    error = [e for e in events if e["event"] == "error"][-1]["message"]
    lines = error.splitlines()
    assert lines[0].startswith("2 of 3 input(s) could not be segmented (1 file(s) written")
    assert lines[1].startswith(f"  {folder / 'a_corrupt.nii.gz'}: Could not read")
    assert lines[2].startswith(f"  {folder / 'c_nan.nii'}: ") and "(1000 NaN)" in lines[2]
    assert "Traceback" not in captured.err


def test_non_ct_intensities_are_warned_about(tmp_path, bundle, capsys):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in (40, 36, 30)], indexing="ij")
    mri = np.where(x**2 + y**2 + z**2 < 0.6, 180, 10).astype(np.uint8)
    src = nifti(tmp_path / "t1.nii.gz", mri)
    code = segment(src, "--model", bundle, "--output", tmp_path / "t1_seg.nii.gz", "--progress", "bar")
    out = capsys.readouterr().out
    assert code == 0
    assert "mim segment: " in out and "10..180 do not look like CT in Hounsfield units" in out
    assert "8-bit image" in out and "trained on CT, windowed to -175.0..250.0 HU" in out
    code = segment(src, "--model", bundle, "--output", tmp_path / "t1_quiet.nii.gz", "--progress", "none")
    captured = capsys.readouterr()  # no progress asked for, but the warning still reaches the user
    assert code == 0 and captured.out == "" and "do not look like CT in Hounsfield units" in captured.err
    ct = ct_volume(tmp_path / "ct.nii.gz")
    code = segment(ct, "--model", bundle, "--output", tmp_path / "ct_seg.nii.gz", "--progress", "bar")
    assert code == 0 and "Hounsfield" not in capsys.readouterr().out


def test_hu_heuristic_cases():
    air = np.full((20, 20, 20), -1024.0, np.float32)
    air[5:15] = 40.0
    assert hu_warning(air, PREP, "m") is None
    assert "no voxel below -500" in hu_warning(air + 800, PREP, "m")
    assert "MRI, or CT stored without its rescale intercept" in hu_warning(air + 2048, PREP, "m")
    assert hu_warning(air + 2048, dict(PREP, modality="MR"), "m") is None
