"""What a radiologist gets from Segment (issue 13): standard names (terminology codes of
model.json on the segments), the result in 3D (closed surface, Show 3D), and the "Fast
(CPU)" option reaching ``mim segment`` (issue 16). Real MRML segmentation nodes and
Slicer's own converters and terminology serializer; a real child process for the argv.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import slicer
import vtk
from mimslicer_testing import CHILD_ENV, add_segment, add_volume

from MiMSlicerLib import library
from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.logic import MiMLogicCore, segment_arguments
from MiMSlicerLib.segmentations import export_labelmap, import_labelmap, show_3d, shows_3d, terminology_entry

LIVER = {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}
LIVER_ENTRY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
               "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")


@pytest.fixture()
def labels_file(scene, tmp_path):
    """A CT with a liver block (label 1) and a kidney block (label 2), as a label map file."""
    mask_liver = np.zeros((8, 10, 12), dtype=bool)
    mask_liver[2:6, 2:7, 3:9] = True
    mask_kidney = np.zeros_like(mask_liver)
    mask_kidney[1:3, 7:9, 1:3] = True
    volume = add_volume(scene, np.zeros((8, 10, 12), dtype=np.int16), np.diag([1.5, 1.5, 3.0, 1.0]))
    drawn = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    add_segment(drawn, volume, "liver", mask_liver)
    add_segment(drawn, volume, "kidney", mask_kidney)
    path = tmp_path / "labels.nrrd"
    export_labelmap(drawn, volume, path, ["liver", "kidney"])
    return volume, path


def test_terminology_of_model_json_becomes_the_segments_terminology_entry(scene, labels_file):
    volume, path = labels_file
    labels = [{"value": 1, "name": "liver", "color": [221, 130, 101], "terminology": LIVER},
              {"value": 2, "name": "kidney"}]  # no code: name only
    node = import_labelmap(path, labels, volume, scene)
    seg = node.GetSegmentation()
    liver, kidney = seg.GetSegment("liver"), seg.GetSegment("kidney")
    assert liver.GetTerminology() == LIVER_ENTRY
    tag = vtk.reference("")
    assert liver.GetTag("TerminologyEntry", tag) and tag == LIVER_ENTRY  # the tag Slicer's modules read
    assert kidney.GetTerminology() == slicer.vtkSegment().GetTerminology()  # Slicer's default ("Tissue")
    # Slicer's own parser reads it back as the liver (what the Segment Editor shows)
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(liver.GetTerminology(), entry)
    assert (entry.GetTypeObject().GetCodeValue(), entry.GetTypeObject().GetCodeMeaning()) == ("10200004", "Liver")
    assert entry.GetCategoryObject().GetCodingSchemeDesignator() == "SCT"


def test_terminology_forms_and_clear_refusals():
    assert terminology_entry(LIVER) == LIVER_ENTRY
    as_dicts = {"category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
                "type": {"CodingSchemeDesignator": "SCT", "CodeValue": "10200004", "CodeMeaning": "Liver"}}
    assert terminology_entry(as_dicts) == LIVER_ENTRY
    assert terminology_entry(LIVER_ENTRY) == LIVER_ENTRY  # Slicer's string, kept as it is
    assert terminology_entry(None) is None and terminology_entry({}) is None
    with pytest.raises(MiMSlicerError, match="needs a 'type' code"):
        terminology_entry({"category": LIVER["category"]})
    with pytest.raises(MiMSlicerError, match=r"type must be \[coding scheme, code value, meaning\]"):
        terminology_entry({"category": LIVER["category"], "type": ["SCT", "10200004"]})
    with pytest.raises(MiMSlicerError, match="unknown keys"):
        terminology_entry(dict(LIVER, organ="liver"))


def test_a_malformed_terminology_keeps_the_segment(scene, labels_file):
    volume, path = labels_file
    node = import_labelmap(path, [{"value": 1, "name": "liver", "terminology": {"type": "liver"}}], volume, scene)
    assert [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)] == ["liver", "label_2"]


def test_the_library_entry_carries_the_terminology(tmp_path):
    folder = tmp_path / "liver-model"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"name": "liver", "labels": [
        {"value": 1, "name": "liver", "color": [1, 2, 3], "terminology": LIVER}, {"value": 2, "name": "kidney"}]}))
    entry = library.read_model(folder)
    assert entry["label_table"][0]["terminology"] == LIVER and "terminology" not in entry["label_table"][1]


def test_show_3d_creates_the_closed_surface_and_toggles(scene, labels_file):
    volume, path = labels_file
    node = import_labelmap(path, [{"value": 1, "name": "liver"}, {"value": 2, "name": "kidney"}], volume, scene)
    seg = node.GetSegmentation()
    assert not seg.ContainsRepresentation("Closed surface") and not shows_3d(node)

    assert show_3d(node) is True
    assert seg.ContainsRepresentation("Closed surface") and shows_3d(node)
    surface = seg.GetSegment("liver").GetRepresentation("Closed surface")
    assert surface.GetNumberOfPoints() > 0
    bounds = surface.GetBounds()  # the surface wraps the liver block (x 3..8 voxels of 1.5 mm, z 2..5 of 3 mm)
    assert 3 * 1.5 - 1.5 <= bounds[0] < bounds[1] <= 8 * 1.5 + 1.5 and 2 * 3 - 3 <= bounds[4] < bounds[5] <= 5 * 3 + 3

    assert show_3d(node, False) is False
    assert not shows_3d(node) and seg.ContainsRepresentation("Closed surface")  # kept: showing again is instant
    assert show_3d(node) and shows_3d(node)


def test_show_3d_of_nothing_says_what_to_do(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    assert show_3d(empty) is False
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "not a segmentation")
    with pytest.raises(MiMSlicerError, match="needs a segmentation node"):
        show_3d(volume)


def test_fast_adds_the_option_to_mim_segment(tmp_path):
    slow = segment_arguments("in.nrrd", "/models/liver", "out.nrrd", device="cpu")
    fast = segment_arguments("in.nrrd", "/models/liver", "out.nrrd", device="cpu", fast=True, extra_args=["--tta"])
    assert slow == ["segment", "in.nrrd", "--model", "/models/liver", "--output", "out.nrrd", "--device", "cpu",
                    "--progress", "json"]
    assert fast == slow + ["--fast", "--tta"]


def test_start_segment_passes_fast_to_the_child(slicer_app, scene, labels_file, tmp_path):
    volume, _ = labels_file
    models = tmp_path / "models"
    (models / "liver").mkdir(parents=True)
    (models / "liver" / "model.json").write_text(json.dumps({"name": "liver", "labels": [{"value": 1, "name": "liver"}]}))
    logic = MiMLogicCore(scene=scene, models_dir=str(models), env=CHILD_ENV)
    for fast in (True, False):
        task = logic.start_segment(volume, "liver", device="cpu", fast=fast)
        try:
            assert task.job.argv == [
                "segment", str(task.workdir / "input" / "image.nrrd"), "--model", str(models / "liver"),
                "--output", str(task.workdir / "labels.nrrd"), "--device", "cpu", "--progress", "json",
                *(["--fast"] if fast else [])]
            assert task.job.command[1:3] == ["-m", "mimcore"]  # the real child got exactly that
        finally:
            task.cancel()
        assert task.cancelled and not task.workdir.exists()
