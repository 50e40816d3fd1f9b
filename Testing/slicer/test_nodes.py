"""MRML nodes <-> files with geometry (MiMSlicerLib.volumes, .segmentations), on a real scene.

Everything is written and read back with Slicer's own storage nodes and checked again
with mimcore's reader (SimpleITK), the consumer of these files.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from mimslicer_testing import add_segment, add_volume, node_ids, oblique_affine, scene_state

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.segmentations import (export_labelmap, import_labelmap, labelmap_array, match_segments,
                                        normalize_name, segments)
from MiMSlicerLib.volumes import array_to_matrix, ijk_to_ras, load_volume, matrix_to_array, write_volume

SHAPE_KJI = (9, 11, 13)  # K, J, I: a non-cubic grid, so that any axis mix-up shows


def _ct(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=SHAPE_KJI).astype(np.int16)


def _geometry(matrix: np.ndarray):
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    return spacing, matrix[:3, 3], matrix[:3, :3] / spacing


def _linear_transform(scene, matrix, name="T", parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(array_to_matrix(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def _to_parent(transform) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToParent(matrix)
    return matrix_to_array(matrix)


def _read_with_mimcore(path):
    from mimcore.data.volume_io import load_volume as mim_load

    volume = mim_load(path)
    return volume.array, volume.affine  # (I, J, K), voxel -> RAS


# --------------------------------------------------------------------------- volumes

@pytest.mark.parametrize("suffix, atol", [(".nrrd", 1e-9), (".nii.gz", 1e-5)])  # NIfTI holds float32 geometry
def test_volume_round_trip_keeps_oblique_anisotropic_geometry(scene, tmp_path, suffix, atol):
    affine = oblique_affine()
    ct = _ct()
    volume = add_volume(scene, ct, affine)
    before = scene_state(scene)

    path = write_volume(volume, tmp_path / f"ct{suffix}")
    assert scene_state(scene) == before  # writing touched nothing in the scene

    back = load_volume(path, scene, name="back")
    got = ijk_to_ras(back)
    np.testing.assert_allclose(got, affine, rtol=0, atol=atol)
    for mine, theirs in zip(_geometry(got), _geometry(affine)):  # spacing, origin, direction
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=atol)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(back), ct)
    assert back.GetStorageNode() is None  # new, unsaved data: the file may be temporary

    array, mim_affine = _read_with_mimcore(path)  # the job's view of the same file
    np.testing.assert_allclose(mim_affine, affine, rtol=0, atol=atol)
    np.testing.assert_array_equal(array, ct.transpose(2, 1, 0))


def test_linear_parent_transforms_are_hardened_into_the_file(scene, tmp_path):
    affine = oblique_affine()
    volume = add_volume(scene, _ct(1), affine)
    outer = _linear_transform(scene, oblique_affine(spacing=(1, 1, 1), angles_deg=(0, 10, 0), origin=(0, 20, -5)))
    inner = _linear_transform(scene, oblique_affine(spacing=(1, 1, 1), angles_deg=(30, 0, 45), origin=(7, -3, 11)),
                              parent=outer)
    volume.SetAndObserveTransformNodeID(inner.GetID())
    world = _to_parent(outer) @ _to_parent(inner) @ affine
    before = scene_state(scene)

    path = write_volume(volume, tmp_path / "ct.nrrd")

    _, mim_affine = _read_with_mimcore(path)
    np.testing.assert_allclose(mim_affine, world, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ijk_to_ras(volume), world, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ijk_to_ras(volume, world=False), affine, rtol=0, atol=0)  # the node is untouched
    assert volume.GetParentTransformNode() is inner and scene_state(scene) == before


def test_non_linear_transform_is_refused_with_what_to_do(scene, tmp_path):
    volume = add_volume(scene, _ct(2), oblique_affine())
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    displacement = slicer.vtkOrientedGridTransform()
    field = vtk.vtkImageData()
    field.SetDimensions(4, 4, 4)
    field.SetSpacing(50, 50, 50)
    field.SetOrigin(-75, -75, -75)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    field.GetPointData().GetScalars().Fill(2.0)
    displacement.SetDisplacementGridData(field)
    grid.SetAndObserveTransformFromParent(displacement)
    rigid = _linear_transform(scene, np.eye(4), parent=grid)  # non-linear further up the chain
    volume.SetAndObserveTransformNodeID(rigid.GetID())

    with pytest.raises(MiMSlicerError) as err:
        write_volume(volume, tmp_path / "ct.nrrd")
    message = str(err.value)
    assert "non-linear" in message and "'warp'" in message and "Harden transform" in message
    assert not (tmp_path / "ct.nrrd").exists()


def test_shearing_transform_is_refused(scene, tmp_path):
    volume = add_volume(scene, _ct(3), np.diag([1.0, 1.0, 3.0, 1.0]))
    shear = np.eye(4)
    shear[0, 1] = 0.4
    volume.SetAndObserveTransformNodeID(_linear_transform(scene, shear).GetID())
    with pytest.raises(MiMSlicerError, match="shears"):
        write_volume(volume, tmp_path / "ct.nrrd")


def test_wrong_nodes_get_clear_messages(scene, tmp_path):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    with pytest.raises(MiMSlicerError, match="scalar volume"):
        write_volume(segmentation, tmp_path / "x.nrrd")
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(MiMSlicerError, match="no voxels"):
        write_volume(empty, tmp_path / "x.nrrd")


# --------------------------------------------------------------------------- segmentations

def _annotated(scene, transform=None):
    """A CT with three segments: 'LIVER' (a box), 'Kidney Left' (another box), 'tumour' (one voxel)."""
    volume = add_volume(scene, _ct(4), oblique_affine())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "annotation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = np.zeros(SHAPE_KJI, bool)
    liver[2:6, 3:8, 4:10] = True
    kidney = np.zeros(SHAPE_KJI, bool)
    kidney[6:8, 1:4, 1:4] = True
    tumour = np.zeros(SHAPE_KJI, bool)
    tumour[4, 5, 6] = True
    add_segment(segmentation, volume, "LIVER", liver, (0.8, 0.5, 0.4))
    add_segment(segmentation, volume, "Kidney Left", kidney, (0.7, 0.4, 0.3))
    add_segment(segmentation, volume, "tumour", tumour)
    if transform is not None:
        volume.SetAndObserveTransformNodeID(transform.GetID())
        segmentation.SetAndObserveTransformNodeID(transform.GetID())
    return volume, segmentation, liver, kidney


def test_segment_names_match_labels_case_insensitively():
    assert normalize_name("  Kidney  Left ") == normalize_name("kidney_left") == normalize_name("KIDNEY-left")
    assert normalize_name("liver") != normalize_name("liver2")


def test_export_on_the_volume_grid_in_the_models_label_order(scene, tmp_path):
    transform = _linear_transform(scene, oblique_affine(spacing=(1, 1, 1), angles_deg=(5, -15, 25), origin=(3, 4, 5)))
    volume, segmentation, liver, kidney = _annotated(scene, transform)
    before = scene_state(scene)

    labels = ["spleen", "kidney_left", "liver"]
    with pytest.raises(MiMSlicerError) as err:  # strict: a label without a segment is refused
        export_labelmap(segmentation, volume, tmp_path / "strict.nrrd", labels)
    assert "'spleen'" in str(err.value) and "add a segment" in str(err.value)
    assert not (tmp_path / "strict.nrrd").exists()

    match = export_labelmap(segmentation, volume, tmp_path / "labels.nrrd", labels, allow_missing=True)
    assert match.missing == ["spleen"] and match.unknown == ["tumour"]
    assert list(match.segment_ids) == ["kidney_left", "liver"]
    assert scene_state(scene) == before  # nothing added, nothing modified

    array, affine = _read_with_mimcore(tmp_path / "labels.nrrd")
    volume_array, volume_affine = _read_with_mimcore(write_volume(volume, tmp_path / "ct.nrrd"))
    np.testing.assert_allclose(affine, volume_affine, rtol=0, atol=1e-9)  # the two files pair up
    assert array.shape == volume_array.shape
    expected = np.where(liver, 3, np.where(kidney, 2, 0)).transpose(2, 1, 0)  # liver is label 3 of the list
    np.testing.assert_array_equal(array, expected)

    values, _ = labelmap_array(segmentation, volume, labels, values=[10, 20, 30], allow_missing=True)
    np.testing.assert_array_equal(values, np.where(liver, 30, np.where(kidney, 20, 0)))


def test_ambiguous_or_unknown_names_are_reported(scene, tmp_path):
    volume, segmentation, liver, _ = _annotated(scene)
    with pytest.raises(MiMSlicerError, match="'tumour'"):
        export_labelmap(segmentation, volume, tmp_path / "x.nrrd", ["liver", "kidney_left"], allow_unknown=False)
    add_segment(segmentation, volume, "liver", liver)
    with pytest.raises(MiMSlicerError, match="both match the label 'liver'"):
        match_segments(segmentation, ["liver"])
    with pytest.raises(MiMSlicerError, match="distinct"):
        match_segments(segmentation, ["Liver", "liver "])


def test_import_label_map_as_named_coloured_segments_on_the_volume_grid(scene, tmp_path):
    transform = _linear_transform(scene, oblique_affine(spacing=(1, 1, 1), angles_deg=(0, 0, 90), origin=(1, 2, 3)))
    volume, annotation, liver, kidney = _annotated(scene, transform)
    export_labelmap(annotation, volume, tmp_path / "labels.nrrd", ["liver", "kidney_left", "tumour"])
    labels = [{"value": 1, "name": "liver", "color": [221, 130, 101]},
              {"value": 2, "name": "kidney_left", "color": [185, 102, 83]},
              {"value": 4, "name": "spleen", "color": [157, 108, 162]}]  # absent from the file; 3 is unlisted
    before = node_ids(scene)

    result = import_labelmap(tmp_path / "labels.nrrd", labels, volume, scene, name="result")

    assert result.GetName() == "result" and result.GetID() not in before
    assert [name for _, name in segments(result)] == ["liver", "kidney_left", "spleen", "label_3"]
    seg = result.GetSegmentation()
    np.testing.assert_allclose(seg.GetSegment("liver").GetColor(), np.array([221, 130, 101]) / 255, atol=1e-6)
    assert result.GetParentTransformNode() is transform  # moves with its volume
    for segment_id, _ in segments(result):  # every segment sits on exactly the volume's grid
        image = seg.GetSegment(segment_id).GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        np.testing.assert_array_equal(matrix_to_array(matrix), ijk_to_ras(volume, world=False))
        assert image.GetExtent() == (0, SHAPE_KJI[2] - 1, 0, SHAPE_KJI[1] - 1, 0, SHAPE_KJI[0] - 1)
    back, _ = labelmap_array(result, volume, ["liver", "kidney_left", "spleen", "label_3"])
    expected = np.where(liver, 1, np.where(kidney, 2, 0))
    expected[4, 5, 6] = 4  # the tumour voxel, exported after liver (the later label wins), came back as label_3
    np.testing.assert_array_equal(back, expected)

    # replacing the contents of a given node keeps the node (ID, name, display node)
    target = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    target.CreateDefaultDisplayNodes()
    target.GetSegmentation().AddEmptySegment("old", "old")
    display = target.GetDisplayNode()
    same = import_labelmap(tmp_path / "labels.nrrd", labels[:2], volume, scene, segmentation_node=target)
    assert same is target and target.GetName() == "mine" and target.GetDisplayNode() is display
    assert [name for _, name in segments(target)] == ["liver", "kidney_left", "label_3"]


def test_import_refuses_a_missing_file_and_adds_nothing(scene, tmp_path):
    volume = add_volume(scene, _ct(5), oblique_affine())
    before = scene_state(scene)
    with pytest.raises(MiMSlicerError, match="does not exist"):
        import_labelmap(tmp_path / "nope.nrrd", [{"value": 1, "name": "liver"}], volume, scene)
    assert scene_state(scene) == before
