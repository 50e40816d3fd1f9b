"""MiMLogicCore end to end: real scene, real storage nodes and segmentation logic, the real
``mimcore`` CLI in child processes, and ``tiny`` models trained in this session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk
from mimslicer_testing import (CHILD_ENV, LABELS, add_segment, group_processes, oblique_affine, scene_state, wait,
                               wait_for_processes)

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.logic import MiMLogicCore
from MiMSlicerLib.segmentations import labelmap_array, segments
from MiMSlicerLib.volumes import array_to_matrix, ijk_to_ras, load_volume, matrix_to_array


@pytest.fixture()
def logic(scene, models_dir):
    return MiMLogicCore(scene=scene, models_dir=str(models_dir), env=CHILD_ENV)


@pytest.fixture(scope="module")
def segmented(slicer_app, models_dir, tiny_model, sample_ct):
    """The sample CT, under a rigid transform, segmented by the tiny model through the logic.
    Returns ``{"volume", "transform", "task", "events"}``; removed from the scene afterwards."""
    scene = slicer_app.scene
    volume = load_volume(sample_ct["image"], scene, name="sample CT")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "patient motion")
    transform.SetMatrixTransformToParent(array_to_matrix(
        oblique_affine(spacing=(1, 1, 1), angles_deg=(0, 0, 12), origin=(4.0, -2.5, 7.0))))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    logic = MiMLogicCore(scene=scene, models_dir=str(models_dir), env=CHILD_ENV)
    events = []
    task = wait(logic.start_segment(volume, tiny_model["name"], device="cpu", on_event=events.append))
    yield {"volume": volume, "transform": transform, "task": task, "events": events}
    for node in (task.result, volume, transform):
        if node is not None and node.GetScene() is scene:
            scene.RemoveNode(node)


def test_the_library_lists_the_model_trained_from_a_datalist(logic, tiny_model):
    task = tiny_model["task"]
    assert tiny_model["name"] == "tiny-sample"
    entry = {m["name"]: m for m in logic.models()}["tiny-sample"]
    assert entry["labels"] == LABELS and entry["error"] is None and entry["preset"] == "tiny"
    assert [lb["value"] for lb in entry["label_table"]] == [1, 2, 3, 4]
    assert Path(entry["path"], "weights.safetensors").is_file()
    assert logic.model(entry)["path"] == entry["path"] == logic.model("tiny-sample")["path"]
    kinds = [e["event"] for e in task.events]
    assert "validation" in kinds and kinds.count("done") == 1
    assert task.stage == "done" and task.step == task.total == 2 and not task.workdir.exists()


def test_models_are_added_from_a_zip_or_a_registry(logic, tiny_model, tmp_path):
    import hashlib
    import zipfile

    folder = Path(logic.model(tiny_model["name"])["path"])
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in folder.iterdir():
            zf.write(file, f"tiny/{file.name}")
    assert logic.add_model(str(archive), name="from-zip") == "from-zip"

    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"models": [{
        "name": "tiny-registered", "url": archive.name, "size": archive.stat().st_size,
        "sha256": hashlib.sha256(archive.read_bytes()).hexdigest(), "description": "the tiny test model"}]}))
    assert logic.registry_models(str(registry)) == ["tiny-registered"]
    assert logic.add_model(f"{registry}#tiny-registered") == "tiny-registered"
    models = {m["name"]: m for m in logic.models()}
    assert models["from-zip"]["labels"] == models["tiny-registered"]["labels"] == LABELS

    with pytest.raises(MiMSlicerError, match="Could not add 'no-such-model' to the model library: .*registry"):
        logic.add_model("no-such-model")


def test_the_logic_imports_neither_qt_nor_torch():
    code = ("import sys, MiMSlicerLib.logic, MiMSlicerLib.preview; "
            "print(sorted(m for m in ('qt', 'torch', 'mimcore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "MiMSlicer")})
    assert out.stdout.strip() == "[]"  # the GUI process stays light: torch runs in the jobs only


def test_segment_the_sample_ct_onto_its_exact_grid(segmented, tiny_model, models_dir):
    task, volume, events = segmented["task"], segmented["volume"], segmented["events"]
    assert task.error is None and task.done
    node = task.result
    assert node.IsA("vtkMRMLSegmentationNode") and node.GetScene() is volume.GetScene()
    assert node.GetName() == "sample CT - tiny-sample"
    assert [name for _, name in segments(node)] == LABELS
    model = json.loads((Path(models_dir) / "tiny-sample" / "model.json").read_text(encoding="utf-8"))
    seg = node.GetSegmentation()
    for (segment_id, _), label in zip(segments(node), model["labels"]):
        segment = seg.GetSegment(segment_id)
        np.testing.assert_allclose(segment.GetColor(), np.array(label["color"]) / 255.0, atol=1e-6)
        image = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        np.testing.assert_array_equal(matrix_to_array(matrix), ijk_to_ras(volume, world=False))
        dims = volume.GetImageData().GetDimensions()
        assert image.GetExtent() == (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    assert node.GetParentTransformNode() is segmented["transform"]  # moves with its CT

    # the segments hold exactly the labels the child reported writing
    case = next(e for e in events if e["event"] == "case")
    labels, _ = labelmap_array(node, volume, LABELS)
    assert sorted(int(v) for v in np.unique(labels) if v) == case["labels_present"]
    assert [e["event"] for e in events if e["event"] in ("start", "done")] == ["start", "done"]
    assert task.step == task.total > 0 and not task.workdir.exists()


def test_segment_into_a_given_node_replaces_its_segments(logic, segmented, tiny_model):
    target = logic.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my result")
    target.GetSegmentation().AddEmptySegment("old", "old")
    task = wait(logic.start_segment(segmented["volume"], {"name": tiny_model["name"]}, device="cpu",
                                    segmentation_node=target))
    assert task.error is None and task.result is target
    assert target.GetName() == "my result" and [n for _, n in segments(target)] == LABELS


def test_finetune_from_an_edited_segmentation(logic, segmented, tiny_model):
    volume, node = segmented["volume"], segmented["task"].result
    seg = node.GetSegmentation()
    dims = volume.GetImageData().GetDimensions()
    # edits as a user would make them: rename with other case, redraw a segment, add one the model does not know
    seg.GetSegment(seg.GetSegmentIdBySegmentName("liver")).SetName("Liver")
    seg.RemoveSegment(seg.GetSegmentIdBySegmentName("spleen"))
    box = np.zeros(dims[::-1], bool)
    box[8:20, 30:60, 20:50] = True
    add_segment(node, volume, "Spleen", box, (0.6, 0.4, 0.6))
    add_segment(node, volume, "tumour", np.roll(box, 40, axis=2))
    before = scene_state(logic.scene)
    events = []

    task = wait(logic.start_finetune([(volume, node)], tiny_model["name"], 2, device="cpu", name="tiny edited",
                                     spacing=(6, 6, 6), on_event=events.append,
                                     extra_args=["--val-every", "2", "--samples-per-case", "1"]))

    assert task.error is None, task.error
    assert task.result == "tiny-edited"  # made a valid library name, and said so
    entry = {m["name"]: m for m in logic.models()}["tiny-edited"]
    assert entry["labels"] == LABELS  # the starting model's labels, matched to the segments by name
    colors = {row["name"]: row["color"] for row in entry["label_table"]}
    assert colors["spleen"] == [153, 102, 153]  # the colour the user drew "Spleen" in
    first = {m["name"]: m for m in logic.models()}[tiny_model["name"]]
    assert colors["liver"] == {row["name"]: row["color"] for row in first["label_table"]}["liver"]  # kept, via Slicer
    notes = " ".join(e["message"] for e in events if e["event"] == "note")
    assert "'tumour' match no label" in notes and "as 'tiny-edited'" in notes
    assert "segmentation bundle" in notes and "output layer is new" not in notes  # mimcore kept the head
    start = next(e for e in events if e["event"] == "start" and e.get("stage") == "finetune")
    assert start["labels"] == LABELS and start["cases"] == 1
    assert any(e["event"] == "validation" for e in events)
    assert task.history and task.last_metrics.get("loss") is not None
    assert scene_state(logic.scene) == before and not task.workdir.exists()


def test_finetune_refuses_a_case_without_a_segment_for_a_label(logic, segmented, tiny_model):
    volume = segmented["volume"]
    partial = logic.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "liver only")
    partial.GetSegmentation().AddEmptySegment("liver", "liver")
    with pytest.raises(MiMSlicerError) as err:
        logic.start_finetune([(volume, partial)], tiny_model["name"], 2)
    assert "Case 1 ('sample CT')" in str(err.value) and "'spleen'" in str(err.value)
    with pytest.raises(MiMSlicerError, match="already in the library"):
        logic.start_finetune([(volume, partial)], None, 2, name=tiny_model["name"], label_names=["liver"])


def test_cancel_leaves_no_process_and_the_scene_unchanged(logic, segmented, tiny_model):
    volume, node = segmented["volume"], segmented["task"].result
    before = scene_state(logic.scene)

    task = logic.start_finetune([(volume, node)], tiny_model["name"], 5000, device="cpu", spacing=(6, 6, 6),
                                label_names=["liver"], extra_args=["--workers", "1"])
    tree = wait_for_processes(task.job, 2)  # fine-tuning, with a data-loader worker
    task.cancel()
    assert group_processes(task.job.pid) == [] and tree
    assert task.done and task.cancelled and task.error == "Cancelled." and task.poll() is False
    assert not task.workdir.exists()

    task = logic.start_segment(volume, tiny_model["name"], device="cpu")  # cancelled before it ends
    task.cancel()
    assert group_processes(task.job.pid) == [] and task.result is None and not task.workdir.exists()
    assert scene_state(logic.scene) == before
    assert not any(m["name"].startswith("sample-CT-finetuned") for m in logic.models())


def test_preview_places_each_level_where_its_region_is(logic, pretrain_run, sample_ct):
    volume = load_volume(sample_ct["image"], logic.scene, name="preview CT")
    dims = np.array(volume.GetImageData().GetDimensions())
    center = (ijk_to_ras(volume) @ np.append((dims - 1) / 2 + [10, -5, 3], 1))[:3]

    task = wait(logic.start_preview(str(pretrain_run["dir"]), volume, center_ras=center, device="cpu"))

    assert task.error is None, task.error
    result = task.result
    assert sorted(result) == [1, 2, 3] and [len(result[lv]["volumes"]) for lv in (1, 2, 3)] == [1, 4, 16]
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(logic.scene)
    root = sh.GetItemParent(result[1]["folder"])
    assert sh.GetItemName(root) == "MiM preview - preview CT"
    ct = np.clip(slicer.util.arrayFromVolume(volume).astype(np.float64), -1000, 1000)  # (K, J, I)
    ras_to_ct = np.linalg.inv(ijk_to_ras(volume))
    for level in (1, 2, 3):
        entry = result[level]
        assert sh.GetItemName(entry["folder"]) == f"Level {level}" and sh.GetItemParent(entry["folder"]) == root
        for item, written in zip(entry["volumes"], entry["summary"]["volumes"]):
            for key in ("input", "reconstruction", "original"):
                node = item[key]
                assert node.GetParentTransformNode() is None  # the files are in world RAS
                # where mimcore placed the region (NIfTI keeps the affine in float32)
                np.testing.assert_allclose(ijk_to_ras(node), written["affine"], rtol=0, atol=1e-4)
                assert sh.GetItemParent(sh.GetItemByDataNode(node)) == entry["folder"]
                display = node.GetDisplayNode()
                assert not display.GetAutoWindowLevel() and (display.GetWindow(), display.GetLevel()) == (2000, 0)
            if level == 2:  # full-resolution octants: their voxels are the CT's voxels at the same place
                original = slicer.util.arrayFromVolume(item["original"]).astype(np.float64)  # (K, J, I)
                k, j, i = np.indices(original.shape).reshape(3, -1)
                ras = ijk_to_ras(item["original"]) @ np.stack([i, j, k, np.ones_like(i)])
                ci, cj, ck = (ras_to_ct @ ras)[:3]
                assert np.allclose([ci, cj, ck], np.round([ci, cj, ck]), atol=1e-3)  # on the CT's voxel centres
                ci, cj, ck = np.round([ci, cj, ck]).astype(int)
                inside = (ci >= 0) & (ci < dims[0]) & (cj >= 0) & (cj < dims[1]) & (ck >= 0) & (ck < dims[2])
                assert inside.mean() > 0.2
                np.testing.assert_allclose(original.ravel()[inside], ct[ck[inside], cj[inside], ci[inside]], atol=0.1)
        # the level's main volume is the one nearest the requested centre
        centres = [np.linalg.norm(_centre(v["original"]) - center) for v in entry["volumes"]]
        assert entry["original"] is entry["volumes"][int(np.argmin(centres))]["original"]
    lo, hi = np.array(result[1]["summary"]["crop"]["ras_bounds"]["min"]), np.array(
        result[1]["summary"]["crop"]["ras_bounds"]["max"])
    assert np.all(lo < center) and np.all(center < hi)
    assert not task.workdir.exists()


def _centre(node) -> np.ndarray:
    dims = np.array(node.GetImageData().GetDimensions())
    return (ijk_to_ras(node) @ np.append((dims - 1) / 2, 1))[:3]


def test_wrong_inputs_are_refused_before_any_job_starts(logic, segmented, tmp_path):
    volume = segmented["volume"]
    with pytest.raises(MiMSlicerError, match="No model named 'nope'"):
        logic.start_segment(volume, "nope")
    with pytest.raises(MiMSlicerError, match="No pre-training checkpoint"):
        logic.start_preview(str(tmp_path / "missing"), volume)
    with pytest.raises(MiMSlicerError, match="scalar volume"):
        logic.start_segment(segmented["task"].result, "tiny-sample")
    with pytest.raises(MiMSlicerError, match="positive integer"):
        logic.start_finetune([(volume, segmented["task"].result)], None, 0)
