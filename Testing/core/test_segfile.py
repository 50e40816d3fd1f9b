"""``.seg.nrrd``: our files open in real 3D Slicer MRML logic (slicer-core) with the right segments
and geometry, and we read the files Slicer writes (cropped, several layers, plain label maps).

The grid is oblique, non-RAS (i -> posterior-ish, j -> inferior, k -> right) and anisotropic,
so any axis, sign or LPS/RAS mix-up shows.
"""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from mimcore.data.labels import Label, labels_from_names
from mimcore.data.segfile import read_seg_nrrd, save_seg_nrrd
from mimcore.data.volume_io import save_volume
from mimcore.errors import MimError

SHAPE = (23, 17, 12)
SPACING = np.array([0.83, 1.31, 2.5])


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine() -> np.ndarray:
    perm = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = _rotation(2, 14.0) @ _rotation(0, -9.0) @ perm @ np.diag(SPACING)
    affine[:3, 3] = [31.7, -12.4, 48.9]
    return affine


AFFINE = _affine()
SEGMENTS = [Label(1, "liver", (221, 130, 101)), Label(2, "spleen", (157, 108, 162)),
            Label(5, "kidney_left", (185, 102, 83)), Label(7, "empty organ", (10, 20, 30))]


def _labels() -> np.ndarray:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[2:9, 3:10, 1:6] = 1
    labels[12:20, 2:6, 4:11] = 2
    labels[15:22, 10:16, 0:3] = 5
    labels[0, 0, 0] = 5  # corner voxel: catches an off-by-one in the extent or the origin
    return labels


def _slicer():
    """The real Slicer MRML logic; a clear failure (not a skip) when it is missing."""
    try:
        import slicer
    except ImportError as err:
        pytest.fail(f"3D Slicer's MRML logic is not installed ({err}). Install mimcore's test extras, which "
                    "bring slicer-core: pip install 'trame-slicer[standalone]==2.0.0' (or pip install -e "
                    "'MiMCore[test]').")
    return slicer


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(array: np.ndarray):
    import vtk
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _image_array(image) -> np.ndarray:
    """``(X, Y, Z)`` numpy view of a vtkImageData (VTK stores x fastest)."""
    from vtk.util import numpy_support
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).transpose(2, 1, 0)


def _load_in_slicer(path):
    slicer = _slicer()
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    return scene, node


def _write_in_slicer(scene, node, path) -> None:
    slicer = _slicer()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1, f"Slicer could not write {path}"


def _header(path) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    return raw[:raw.index(b"\n\n")].decode()


def test_save_and_read_round_trip_keeps_labels_segments_and_exact_geometry(tmp_path):
    path = save_seg_nrrd(tmp_path / "case.seg.nrrd", _labels(), AFFINE, SEGMENTS)
    labels, affine, segments = read_seg_nrrd(path)
    np.testing.assert_array_equal(labels, _labels())
    assert labels.dtype == np.uint8
    np.testing.assert_allclose(affine, AFFINE, rtol=0, atol=1e-12)
    assert segments == SEGMENTS
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary left behind


def test_header_has_the_fields_slicer_reads(tmp_path):
    path = save_seg_nrrd(tmp_path / "case.seg.nrrd", _labels(), AFFINE, SEGMENTS)
    header = _header(path)
    fields = dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)
    assert "space: left-posterior-superior" in header and "encoding: gzip" in header
    assert fields["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert fields["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert fields["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert fields["Segmentation_ConversionParameters"].startswith("Reference image geometry|")
    assert fields["Segment2_ID"] == "Segment_5" and fields["Segment2_Name"] == "kidney_left"
    assert fields["Segment2_LabelValue"] == "5" and fields["Segment2_Layer"] == "0"
    assert fields["Segment2_Extent"] == "0 22 0 16 0 11"
    assert [float(c) for c in fields["Segment0_Color"].split()] == pytest.approx([221 / 255, 130 / 255, 101 / 255],
                                                                                   abs=1e-6)
    assert fields["Segment3_Name"] == "empty organ" and fields["Segment0_NameAutoGenerated"] == "0"
    for i in range(4):
        for key in ("ID", "Name", "NameAutoGenerated", "Color", "ColorAutoGenerated", "Extent", "LabelValue",
                    "Layer", "Tags"):
            assert f"Segment{i}_{key}" in fields
    # the LPS geometry in the header is the RAS affine with x and y negated
    directions = header.split("space directions: ")[1].splitlines()[0]
    columns = np.array([[float(v) for v in col.strip("()").split(",")] for col in directions.split()])
    np.testing.assert_allclose(columns.T, np.diag([-1, -1, 1]) @ AFFINE[:3, :3], atol=1e-12)


def test_slicer_opens_our_file_with_segments_and_geometry(tmp_path):
    slicer = _slicer()
    import vtk
    path = save_seg_nrrd(tmp_path / "case.seg.nrrd", _labels(), AFFINE, SEGMENTS)
    scene, node = _load_in_slicer(path)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(SEGMENTS)
    for i, label in enumerate(SEGMENTS):
        segment = segmentation.GetNthSegment(i)
        assert segment.GetName() == label.name
        assert segment.GetLabelValue() == label.value
        assert segment.GetColor() == pytest.approx(np.array(label.color) / 255.0, abs=1e-6)
        binary = slicer.vtkOrientedImageData()
        node.GetBinaryLabelmapRepresentation(segmentation.GetNthSegmentID(i), binary)
        if label.value == 7:  # the empty segment
            assert binary.GetNumberOfPoints() == 0 or int(_image_array(binary).sum()) == 0
            continue
        # the segment's voxels, indexed in its extent, sit at the same world positions as ours
        matrix = vtk.vtkMatrix4x4()
        binary.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose(_matrix(matrix), AFFINE, atol=1e-9)
        e = binary.GetExtent()
        full = np.zeros(SHAPE, dtype=bool)
        full[e[0]:e[1] + 1, e[2]:e[3] + 1, e[4]:e[5] + 1] = _image_array(binary) > 0
        np.testing.assert_array_equal(full, _labels() == label.value)
    # export to a label map on the reference geometry: same voxels, same IJK->RAS
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    assert logic.ExportAllSegmentsToLabelmapNode(node, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    ijk_to_ras = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(ijk_to_ras)
    np.testing.assert_allclose(_matrix(ijk_to_ras), AFFINE, atol=1e-9)
    exported = _image_array(labelmap.GetImageData())
    assert exported.shape == SHAPE
    # Slicer numbers the exported labels its own way: compare the regions, value by value
    ours = _labels()
    assert not exported[ours == 0].any()
    exported_values = []
    for label in SEGMENTS[:3]:
        values = np.unique(exported[ours == label.value])
        assert len(values) == 1 and values[0] > 0, (label, values)
        exported_values.append(int(values[0]))
    assert len(set(exported_values)) == 3


def test_we_read_what_slicer_writes_including_a_cropped_file(tmp_path):
    ours = _labels()
    ours[0, 0, 0] = 0  # nothing in the corner: Slicer's crop then starts inside the grid
    path = save_seg_nrrd(tmp_path / "ours.seg.nrrd", ours, AFFINE, SEGMENTS[:3])
    scene, node = _load_in_slicer(path)
    node.GetSegmentation().GetSegment("Segment_2").SetName("Spleen (edited in Slicer)")
    node.GetSegmentation().GetSegment("Segment_2").SetColor(0.2, 0.4, 0.6)
    # no reference geometry: Slicer crops the file to the segments' extent
    node.GetSegmentation().SetConversionParameter("Reference image geometry", "")
    storage_path = tmp_path / "from_slicer.seg.nrrd"
    _write_in_slicer(scene, node, storage_path)
    assert "Segmentation_ReferenceImageExtentOffset:=2 2 0" in _header(storage_path)
    labels, affine, segments = read_seg_nrrd(storage_path)
    assert [(s.value, s.name) for s in segments] == [(1, "liver"), (2, "Spleen (edited in Slicer)"),
                                                     (5, "kidney_left")]
    assert segments[1].color == (51, 102, 153) and segments[0].color == (221, 130, 101)
    assert labels.shape == (20, 14, 11)
    # the cropped grid: same axes, origin at our voxel (2, 2, 0)
    np.testing.assert_allclose(affine[:3, :3], AFFINE[:3, :3], atol=1e-9)
    np.testing.assert_allclose(affine[:3, 3], (AFFINE @ [2, 2, 0, 1.0])[:3], atol=1e-9)
    np.testing.assert_array_equal(labels, ours[2:22, 2:16, 0:11])


def test_we_read_overlapping_segments_in_several_layers(tmp_path):
    slicer = _slicer()
    import vtk
    from vtk.util import numpy_support
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    masks = {"liver": np.zeros(SHAPE, np.uint8), "tumor": np.zeros(SHAPE, np.uint8)}
    masks["liver"][2:12, 3:10, 1:8] = 1
    masks["tumor"][8:15, 5:8, 2:4] = 1  # overlaps the liver
    for name, mask in masks.items():
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*SHAPE)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.transpose(2, 1, 0).ravel()
        image.SetImageToWorldMatrix(_vtk_matrix(AFFINE))
        node.AddSegmentFromBinaryLabelmapRepresentation(image, name, [1.0, 0.0, 0.0])
    node.GetSegmentation().SetConversionParameter("Reference image geometry", "")
    path = tmp_path / "layers.seg.nrrd"
    _write_in_slicer(scene, node, path)
    assert "dimension: 4" in _header(path)  # two layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels, affine, segments = read_seg_nrrd(path)
    assert [(s.value, s.name, s.color) for s in segments] == [(1, "liver", (255, 0, 0)), (2, "tumor", (255, 0, 0))]
    overlap = int(((masks["liver"] > 0) & (masks["tumor"] > 0)).sum())
    assert any(f"{overlap} voxels belong to more than one segment" in str(w.message) for w in caught)
    start = np.round(np.linalg.solve(AFFINE, affine[:, 3])[:3]).astype(int)
    full = np.zeros(SHAPE, np.uint8)
    full[start[0]:start[0] + labels.shape[0], start[1]:start[1] + labels.shape[1],
         start[2]:start[2] + labels.shape[2]] = labels
    np.testing.assert_array_equal(full == 2, masks["tumor"] > 0)  # the last segment wins
    np.testing.assert_array_equal(full == 1, (masks["liver"] > 0) & (masks["tumor"] == 0))


def test_wide_label_values_and_plain_nrrd(tmp_path):
    labels = _labels().astype(np.uint16)
    labels[labels == 5] = 300
    segments = labels_from_names({1: "liver", 2: "spleen", 300: "lesion"})
    labels_back, affine, segments_back = read_seg_nrrd(save_seg_nrrd(tmp_path / "w.seg.nrrd", labels, AFFINE, segments))
    assert labels_back.dtype == np.uint16 and segments_back == segments
    np.testing.assert_array_equal(labels_back, labels)
    plain = save_volume(tmp_path / "plain.nrrd", _labels(), AFFINE, dtype=np.uint8)
    labels_back, affine, segments_back = read_seg_nrrd(plain)
    np.testing.assert_array_equal(labels_back, _labels())
    np.testing.assert_allclose(affine, AFFINE, atol=1e-12)
    assert [(s.value, s.name) for s in segments_back] == [(1, "label_1"), (2, "label_2"), (5, "label_5")]


def test_user_errors(tmp_path):
    with pytest.raises(MimError, match=r"values \[5\] that have no segment"):
        save_seg_nrrd(tmp_path / "a.seg.nrrd", _labels(), AFFINE, SEGMENTS[:2])
    with pytest.raises(MimError, match="distinct label values"):
        save_seg_nrrd(tmp_path / "a.seg.nrrd", _labels(), AFFINE, SEGMENTS + [Label(1, "again", (1, 1, 1))])
    with pytest.raises(MimError, match=r"must end in \.seg\.nrrd"):
        save_seg_nrrd(tmp_path / "a.nii.gz", _labels(), AFFINE, SEGMENTS)
    with pytest.raises(MimError, match=r"\(X, Y, Z\) label map"):
        save_seg_nrrd(tmp_path / "a.seg.nrrd", np.zeros((4, 4), np.uint8), AFFINE, [])
    with pytest.raises(MimError, match="non-integer"):
        save_seg_nrrd(tmp_path / "a.seg.nrrd", np.full(SHAPE, 0.5), AFFINE, [])
    with pytest.raises(MimError, match="No such file"):
        read_seg_nrrd(tmp_path / "missing.seg.nrrd")
    (tmp_path / "junk.seg.nrrd").write_bytes(gzip.compress(b"not a nrrd"))
    with pytest.raises(MimError, match="Could not read"):
        read_seg_nrrd(tmp_path / "junk.seg.nrrd")
    assert not (tmp_path / "a.seg.nrrd").exists()


def test_sitk_sees_the_same_geometry_as_our_affine(tmp_path):
    """Independent check of the LPS geometry through plain SimpleITK."""
    path = save_seg_nrrd(tmp_path / "case.seg.nrrd", _labels(), AFFINE, SEGMENTS)
    image = sitk.ReadImage(str(path))
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-12)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), lps @ AFFINE[:3, :3] / SPACING, atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), lps @ AFFINE[:3, 3], atol=1e-12)
    for index in [(0, 0, 0), (22, 16, 11), (3, 7, 5)]:
        ras = AFFINE @ np.append(index, 1.0)
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(index), lps @ ras[:3], atol=1e-9)
