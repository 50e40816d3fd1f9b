"""Tests of mimcore.data.volume_io / transforms on synthetic volumes written with SimpleITK."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Orientationd, RandSpatialCropd, ScaleIntensityRanged, SpatialPadd

from mimcore.data.transforms import LoadVolumed, metatensor_to_volume, volume_to_metatensor
from mimcore.data.volume_io import Volume, load_volume, save_volume
from mimcore.errors import MimError


def rotation(a, b, c):
    """A proper rotation from three angles (radians)."""
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_affine(direction, spacing, origin):
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


# origins chosen to be exact in float32, since NIfTI stores geometry as float32
OBLIQUE = make_affine(rotation(0.3, -0.2, 0.5), [0.7, 1.3, 2.9], [-123.5, 87.25, 301.125])
# left-handed, non-RAS (axes point L, P, I after a small rotation), anisotropic
OBLIQUE_LPI = make_affine(rotation(0.1, 0.05, -0.2) @ np.diag([-1, -1, -1]), [0.5, 0.9, 5.0], [10.0, -20.5, 33.75])
# pure axis permutation with flips: i -> S, j -> L, k -> P (axcodes "SLP")
PERMUTED = make_affine([[0, -1, 0], [0, 0, -1], [1, 0, 0]], [2.0, 0.8, 1.5], [5.0, 6.0, -7.0])
SHEARED = make_affine([[1, 0.5, 0], [0, 1, 0], [0, 0, 1]], [1, 1, 1], [0, 0, 0])


def sitk_image(array_xyz, affine, vector=False):
    """A SimpleITK image from an (X, Y, Z) array and a RAS affine (independent of save_volume)."""
    arr = np.moveaxis(array_xyz, [0, 1, 2], [2, 1, 0])  # (X, Y, Z[, C]) -> (Z, Y, X[, C])
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=vector)
    flip = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin((flip @ affine[:3, 3]).tolist())
    image.SetDirection((flip @ (affine[:3, :3] / spacing)).ravel().tolist())
    return image


def ramp(shape, scale=(10000, 100, 1)):
    """(X, Y, Z) float32 array whose value encodes its index: 10000 i + 100 j + k."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (scale[0] * i + scale[1] * j + scale[2] * k).astype(np.float32)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_load_matches_sitk_geometry_and_axis_order(tmp_path, suffix):
    array = ramp((6, 5, 4))
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(sitk_image(array, OBLIQUE), str(path))
    vol = load_volume(path)
    assert vol.array.shape == (6, 5, 4) and vol.array.dtype == np.float32
    assert vol.array[3, 2, 1] == 30201  # index (i, j, k) along (x, y, z)
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-6)
    assert vol.affine.dtype == np.float64
    np.testing.assert_allclose(vol.spacing, [0.7, 1.3, 2.9], atol=1e-6)
    np.testing.assert_allclose(vol.origin_ras, [-123.5, 87.25, 301.125], atol=1e-6)
    np.testing.assert_allclose(vol.direction_ras, rotation(0.3, -0.2, 0.5), atol=1e-6)
    assert vol.source == str(path)


def test_ras_affine_agrees_with_itk_physical_points(tmp_path):
    image = sitk_image(ramp((4, 4, 4)), OBLIQUE_LPI)
    sitk.WriteImage(image, str(tmp_path / "v.nrrd"))
    vol = load_volume(tmp_path / "v.nrrd")
    for index in [(0, 0, 0), (3, 1, 2), (1, 3, 3)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = vol.affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("affine", [OBLIQUE, OBLIQUE_LPI, PERMUTED], ids=["oblique", "oblique_LPI", "permuted"])
def test_round_trip_is_exact(tmp_path, suffix, affine):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(7, 5, 3)).astype(np.float32) * 1000
    vol = load_volume(save_volume(tmp_path / f"a{suffix}", array, affine))
    np.testing.assert_allclose(vol.affine, affine, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(vol.array, array)
    again = load_volume(save_volume(tmp_path / f"b{suffix}", vol.array, vol.affine))
    np.testing.assert_allclose(again.affine, affine, atol=1e-6, rtol=0)


def test_nifti_stores_origin_as_float32_nrrd_as_float64(tmp_path):
    affine = OBLIQUE.copy()
    affine[:3, 3] = [-123.456789, 87.654321, 301.1234567]
    nifti = load_volume(save_volume(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)), affine))
    nrrd = load_volume(save_volume(tmp_path / "a.nrrd", np.zeros((2, 2, 2)), affine))
    assert np.abs(nifti.affine - affine).max() < 3e-5  # float32 header fields
    assert np.abs(nrrd.affine - affine).max() < 1e-9


def test_save_dtype_reference_and_torch_input(tmp_path):
    ref_path = save_volume(tmp_path / "ct.nrrd", ramp((4, 3, 2)), PERMUTED, dtype=np.int32)
    assert sitk.ReadImage(str(ref_path)).GetPixelID() == sitk.sitkInt32
    labels = torch.zeros((1, 4, 3, 2))
    labels[0, 1, 1, 1] = 2.0000001
    out = save_volume(tmp_path / "seg.nii.gz", labels, reference=ref_path, dtype=np.uint8)
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkUInt8
    seg = load_volume(out)
    assert seg.array[1, 1, 1] == 2 and seg.array.sum() == 2
    np.testing.assert_allclose(seg.affine, PERMUTED, atol=1e-6)
    mask = load_volume(save_volume(tmp_path / "mask.nrrd", np.ones((2, 2, 2), bool), np.eye(4)))
    assert mask.array.sum() == 8


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(path="x.png", array=np.zeros((2, 2, 2)), affine=np.eye(4)), "Cannot write"),
        (dict(path="x.nrrd", array=np.zeros((2, 2)), affine=np.eye(4)), "(X, Y, Z)"),
        (dict(path="x.nrrd", array=np.zeros((2, 2, 2)), affine=SHEARED), "shear"),
        (dict(path="x.nrrd", array=np.zeros((2, 2, 2)), affine=np.diag([1, 0, 1, 1])), "zero-length"),
        (dict(path="x.nrrd", array=np.full((2, 2, 2), 300.0), affine=np.eye(4), dtype=np.uint8), "do not fit"),
        (dict(path="x.nrrd", array=np.zeros((2, 2, 2))), "needs an affine"),
    ],
)
def test_save_errors(tmp_path, kwargs, needle):
    kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(MimError) as info:
        save_volume(**kwargs)
    assert needle in str(info.value)


def test_save_reference_shape_mismatch(tmp_path):
    ref = Volume(np.zeros((3, 3, 3), np.float32), np.eye(4), "ref")
    with pytest.raises(MimError, match="does not match the reference grid"):
        save_volume(tmp_path / "x.nrrd", np.zeros((3, 3, 4)), reference=ref)


# ----------------------------------------------------------------------------- DICOM


def write_dicom_series(folder: Path, array_xyz, affine, series_uid, prefix="IM"):
    """Write an int16 (X, Y, Z) array as a CT DICOM series with SimpleITK's GDCM writer."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(sitk_image(array_xyz, affine), sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(f"{direction[i]:.8f}" for i in (0, 3, 6, 1, 4, 7)),  # row, column cosines
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:04d}.dcm"))
        writer.Execute(slice_)


def test_dicom_series_round_trip(tmp_path):
    affine = make_affine(rotation(0.0, 0.2, 0.1), [0.8, 0.6, 2.5], [100.0, -50.0, 20.0])
    array = ramp((6, 5, 4), (1000, 10, 1))  # fits int16
    write_dicom_series(tmp_path / "series", array, affine, "1.2.826.0.1.3680043.2.1125.7")
    vol = load_volume(tmp_path / "series")
    assert vol.array.shape == (6, 5, 4)
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-4)


def test_dicom_slices_are_sorted_along_the_slice_normal(tmp_path):
    """DICOM has no left-handed grids: a series written with k against the slice normal
    comes back with k reversed, i.e. the same voxels at the same world positions."""
    affine = make_affine(rotation(0.0, 0.2, 0.1) @ np.diag([1, -1, 1]), [0.8, 0.6, 2.5], [100.0, -50.0, 20.0])
    array = ramp((6, 5, 4), (1000, 10, 1))
    write_dicom_series(tmp_path / "series", array, affine, "1.2.826.0.1.3680043.2.1125.8")
    vol = load_volume(tmp_path / "series")
    np.testing.assert_array_equal(vol.array, array[:, :, ::-1])
    flip_k = make_affine(np.diag([1, 1, -1]), [1, 1, 1], [0, 0, array.shape[2] - 1])
    np.testing.assert_allclose(vol.affine, affine @ flip_k, atol=1e-4)


def test_dicom_folder_with_two_series_takes_the_larger_and_warns(tmp_path):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, ramp((4, 4, 5), (1000, 10, 1)), np.eye(4), "1.2.826.0.1.3680043.2.1125.10", "A")
    write_dicom_series(folder, np.zeros((4, 4, 3)), np.eye(4), "1.2.826.0.1.3680043.2.1125.11", "B")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        vol = load_volume(folder)
    assert vol.array.shape == (4, 4, 5) and vol.array.max() == 3034


# ----------------------------------------------------------------------------- errors


def test_missing_path():
    with pytest.raises(MimError, match="No such file or folder"):
        load_volume("/nonexistent/ct.nii.gz")


def test_unsupported_file_type(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MimError, match="Unsupported file type '.txt'.*NIfTI"):
        load_volume(tmp_path / "notes.txt")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / "slice.png"))
    with pytest.raises(MimError, match="Unsupported file type '.png'"):
        load_volume(tmp_path / "slice.png")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_damaged_file(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(MimError, match="Could not read .*damaged or not a valid") as info:
        load_volume(path)
    assert "Traceback" not in str(info.value) and ".cxx" not in str(info.value)
    assert info.value.__cause__ is None


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, suffix):
    """ITK reads a truncated NIfTI without complaint (zeros); load_volume must not."""
    good = save_volume(tmp_path / f"good{suffix}", np.random.default_rng(0).normal(size=(20, 20, 20)), np.eye(4))
    data = good.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(MimError, match="truncated|Could not read"):
        load_volume(tmp_path / f"cut{suffix}")


def test_2d_image(tmp_path):
    image = sitk.Image(16, 12, sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "flat.nrrd"))
    with pytest.raises(MimError, match="is a 2D image of size 16x12.*3D volume"):
        load_volume(tmp_path / "flat.nrrd")


def test_4d_image_is_refused_but_trailing_singleton_is_squeezed(tmp_path):
    frame = sitk.Image(6, 5, 4, sitk.sitkFloat32)
    sitk.WriteImage(sitk.JoinSeries([frame] * 3), str(tmp_path / "t3.nii.gz"))
    with pytest.raises(MimError, match="4D image of size 6x5x4x3"):
        load_volume(tmp_path / "t3.nii.gz")
    single = sitk.JoinSeries([sitk.GetImageFromArray(np.arange(120, dtype=np.float32).reshape(4, 5, 6))])
    single.SetSpacing((0.5, 0.75, 2.0, 1.0))
    single.SetOrigin((1.0, 2.0, 3.0, 0.0))
    sitk.WriteImage(single, str(tmp_path / "t1.nii.gz"))
    vol = load_volume(tmp_path / "t1.nii.gz")
    assert vol.array.shape == (6, 5, 4)
    assert vol.array[1, 2, 3] == 3 * 30 + 2 * 6 + 1
    np.testing.assert_allclose(vol.affine, make_affine(np.diag([-1, -1, 1]), [0.5, 0.75, 2.0], [-1, -2, 3]), atol=1e-6)


def test_vector_image(tmp_path):
    rgb = sitk_image(np.zeros((4, 4, 4, 3), np.uint8), np.eye(4), vector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(MimError, match="3 values per voxel"):
        load_volume(tmp_path / "rgb.nrrd")
    one = sitk_image(np.full((4, 4, 4, 1), 7, np.int16), np.eye(4), vector=True)
    assert one.GetNumberOfComponentsPerPixel() == 1
    sitk.WriteImage(one, str(tmp_path / "one.mha"))
    vol = load_volume(tmp_path / "one.mha")
    assert vol.array.shape == (4, 4, 4) and np.all(vol.array == 7)


def test_nan_and_inf_are_counted(tmp_path):
    array = np.zeros((5, 5, 5), np.float32)
    array[0, 0, 0] = np.nan
    array[1, 2, 3] = np.nan
    array[4, 4, 4] = -np.inf
    sitk.WriteImage(sitk_image(array, np.eye(4)), str(tmp_path / "nan.nrrd"))
    with pytest.raises(MimError, match="has 3 NaN or infinite voxel"):
        load_volume(tmp_path / "nan.nrrd")


def test_folder_without_dicom(tmp_path):
    with pytest.raises(MimError, match="No DICOM series found"):
        load_volume(tmp_path)
    save_volume(tmp_path / "ct.nii.gz", np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(MimError, match=r"pass one of them instead"):
        load_volume(tmp_path)


def test_single_dicom_file_points_to_its_folder(tmp_path):
    write_dicom_series(tmp_path / "s", ramp((4, 4, 2), (1000, 10, 1)), np.eye(4), "1.2.826.0.1.3680043.2.1125.12")
    with pytest.raises(MimError, match="single DICOM file"):
        load_volume(tmp_path / "s" / "IM0000.dcm")


# ----------------------------------------------------------------------------- MONAI


def test_volume_to_metatensor_and_back():
    vol = Volume(ramp((4, 3, 2)), PERMUTED.copy(), "mem")
    tensor = volume_to_metatensor(vol)
    assert isinstance(tensor, MetaTensor) and tuple(tensor.shape) == (1, 4, 3, 2)
    assert tensor.affine.dtype == torch.float64
    np.testing.assert_array_equal(tensor.affine.numpy(), PERMUTED)
    back = metatensor_to_volume(tensor)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_array_equal(back.affine, vol.affine)
    assert back.source == "mem"


@pytest.mark.parametrize("affine", [PERMUTED, OBLIQUE_LPI], ids=["permuted", "oblique_LPI"])
def test_orientation_keeps_world_points(tmp_path, affine):
    array = ramp((5, 4, 3))
    path = save_volume(tmp_path / "v.nii.gz", array, affine)
    pipeline = Compose([LoadVolumed("image"), Orientationd("image", axcodes="RAS", labels=None)])
    out = pipeline({"image": str(path)})["image"]
    new_affine = out.affine.numpy()
    assert np.all(np.diag(new_affine)[:3] > 0)  # axes now point R, A, S (nearest)
    for index in [(0, 0, 0), (4, 3, 2), (2, 1, 1), (1, 3, 0)]:
        world = affine @ np.array([*index, 1.0])
        new_index = np.linalg.solve(new_affine, world)[:3]
        np.testing.assert_allclose(new_index, np.round(new_index), atol=1e-4)
        assert out[0][tuple(int(v) for v in np.round(new_index))] == array[index]


def test_monai_pipeline_tracks_geometry(tmp_path):
    array = ramp((9, 7, 5))
    path = save_volume(tmp_path / "v.nrrd", array, PERMUTED)
    pipeline = Compose([
        LoadVolumed(["image"]),
        Orientationd("image", axcodes="RAS", labels=None),
        ScaleIntensityRanged("image", a_min=0, a_max=100000, b_min=0.0, b_max=1.0, clip=True),
        SpatialPadd("image", spatial_size=(8, 12, 10)),
        RandSpatialCropd("image", roi_size=(6, 6, 6), random_size=False),
    ])
    pipeline.set_random_state(3)
    out = pipeline({"image": path})["image"]
    assert tuple(out.shape) == (1, 6, 6, 6)
    # every output voxel that lies inside the original grid holds that voxel's scaled value
    idx = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    src = np.linalg.solve(PERMUTED, out.affine.numpy() @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    src_int = np.round(src).astype(int)
    np.testing.assert_allclose(src, src_int, atol=1e-4)
    inside = np.all((src_int >= 0) & (src_int < array.shape), axis=1)
    assert inside.sum() > 50
    values = out[0].numpy()[tuple(idx[inside].T)]
    np.testing.assert_allclose(values, array[tuple(src_int[inside].T)] / 100000, atol=1e-6)


def test_load_volumed_accepts_volume_and_reports_bad_input():
    vol = Volume(np.zeros((2, 2, 2), np.float32), np.eye(4), "mem")
    d = LoadVolumed(["image"])({"image": vol, "other": 1})
    assert tuple(d["image"].shape) == (1, 2, 2, 2) and d["other"] == 1
    with pytest.raises(MimError, match="must be a path or a Volume"):
        LoadVolumed("image")({"image": 3})

