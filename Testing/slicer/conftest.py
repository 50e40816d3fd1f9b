"""Shared fixtures of the Slicer logic tests: a real MRML scene with Slicer's module logic
(``slicer-core``), the sample CTs, and tiny models trained once per session by the real
``mimcore`` CLI in a child process.

The child processes run with one CPU thread (``OMP_NUM_THREADS=1``): on a small shared
machine, PyTorch's thread pool waiting on busy cores made the tiny models ~10x slower.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "MiMSlicer"))  # MiMSlicerLib, as Slicer finds it next to MiMSlicer.py

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402

from MiMSlicerLib.volumes import array_to_matrix  # noqa: E402

# The helpers below are imported by the test modules as ``mimslicer_testing``: every
# conftest.py outside a package is a module named "conftest", so with Testing/core's
# loaded too, "import conftest" could find the wrong one.
sys.modules["mimslicer_testing"] = sys.modules[__name__]


CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SPACING = ("--spacing", "6", "6", "6")  # coarse: the tiny models train and segment in seconds
LABELS = ["liver", "spleen", "kidney_left", "kidney_right"]


# --------------------------------------------------------------------------- sample data, models

@pytest.fixture(scope="session")
def sample_ct(sample_datalist) -> dict[str, Path]:
    """The small abdomen CT of the samples (122x101x30, 3 mm) and its label map."""
    folder = Path(sample_datalist).parent
    return {"image": folder / "example_ct_sm.nii.gz", "label": folder / "example_seg.nii.gz"}


@pytest.fixture(scope="session")
def small_datalist(sample_datalist, sample_ct, tmp_path_factory) -> Path:
    """A datalist of the one small labelled sample case (the DICOM case would take minutes)."""
    names = json.loads(Path(sample_datalist).read_text(encoding="utf-8"))["labels"]
    path = tmp_path_factory.mktemp("datalist") / "small.json"
    path.write_text(json.dumps({"labels": names, "training": [{"image": str(sample_ct["image"]),
                                                              "label": str(sample_ct["label"])}]}))
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The model library of this test session (never the user's)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(slicer_app, models_dir, small_datalist) -> dict:
    """A ``tiny`` segmentation model trained here for 2 steps on the sample CT (liver, spleen,
    kidneys), through the logic's own fine-tuning task on a datalist, added to the library.
    Returns ``{"name", "task"}``."""
    from MiMSlicerLib.logic import MiMLogicCore

    logic = MiMLogicCore(scene=slicer_app.scene, models_dir=str(models_dir), env=CHILD_ENV)
    task = logic.start_finetune(str(small_datalist), None, 2, device="cpu", name="tiny-sample",
                                spacing=(6, 6, 6), extra_args=["--labels", ",".join(LABELS), "--val-every", "2",
                                                               "--samples-per-case", "1"])
    wait(task)
    assert task.error is None, task.error
    return {"name": task.result, "task": task}


@pytest.fixture(scope="session")
def pretrain_run(small_datalist, tmp_path_factory) -> dict:
    """A ``tiny`` MiM pre-training run of 1 step (``mim pretrain`` through a Job).
    Returns ``{"dir", "job", "events"}`` (events as on_event received them)."""
    from MiMSlicerLib.jobs import Job

    out = tmp_path_factory.mktemp("pretrain")
    events: list[dict] = []
    job = Job(["pretrain", "--datalist", str(small_datalist), "--preset", "tiny", "--steps", "1",
               "--output", str(out), "--device", "cpu", "--progress", "json", "--no-tensorboard"],
              on_event=events.append, env=CHILD_ENV).start()
    assert job.wait(timeout=180), "mim pretrain did not finish in 180 s"
    assert job.error is None, job.error
    return {"dir": out, "job": job, "events": events}


def group_processes(pgid: int) -> list[int]:
    """PIDs of the live (not zombie) processes in process group ``pgid`` (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
            except (OSError, psutil.Error):
                pass
        return found
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()  # state ppid pgrp ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def wait_for_processes(job, count: int, timeout: float = 120.0) -> list[int]:
    """Poll ``job`` until its process group holds at least ``count`` processes (the child and
    e.g. its data-loader workers); returns them."""
    start = time.monotonic()
    while True:
        assert job.poll(), f"the job ended early: {job.error}"
        found = group_processes(job.pid)
        if len(found) >= count:
            return found
        assert time.monotonic() - start < timeout, f"only {found} in the job's process group after {timeout} s"
        time.sleep(0.1)


# --------------------------------------------------------------------------- scene

@pytest.fixture(scope="session")
def slicer_app():
    """Slicer's core without its GUI, as ``qSlicerCoreApplication`` sets it up: a scene, the
    application logic with the default colour tables, and the module logic MiMSlicerLib
    relies on (segmentations - it registers the segmentation converters -, subject
    hierarchy, volumes). Returns a namespace with ``scene``, ``app_logic``, ``logics``."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    logics = {}
    for name, cls in (("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    return SimpleNamespace(scene=scene, app_logic=app_logic, logics=logics)


@pytest.fixture()
def scene(slicer_app):
    """The application's scene; nodes a test adds are removed after it."""
    scene = slicer_app.scene
    before = node_ids(scene)
    yield scene
    for node_id in node_ids(scene) - before:
        node = scene.GetNodeByID(node_id)
        if node is not None:
            scene.RemoveNode(node)


def node_ids(scene) -> set[str]:
    """IDs of every node in ``scene``."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def scene_state(scene) -> dict[str, tuple]:
    """Per node: class, name and modified time, to check that a scene did not change."""
    return {n.GetID(): (n.GetClassName(), n.GetName(), n.GetMTime())
            for n in (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))}


def add_volume(scene, array_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "ct"):
    """A scalar volume node holding ``array_kji`` (``(K, J, I)``, slicer.util layout)."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    node.SetIJKToRASMatrix(array_to_matrix(ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def add_segment(segmentation_node, volume_node, name: str, mask_kji: np.ndarray, color=(0.5, 0.5, 0.5)) -> str:
    """Add a segment drawn as ``mask_kji`` on ``volume_node``'s grid (as the Segment Editor
    would store it: a binary labelmap in the volume's geometry). Returns its ID."""
    from vtk.util import numpy_support

    mask = np.ascontiguousarray(mask_kji.astype(np.uint8))
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(mask.ravel(), deep=True,
                                                               array_type=vtk.VTK_UNSIGNED_CHAR))
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image.SetGeometryFromImageToWorldMatrix(matrix)
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*color)
    segment.AddRepresentation("Binary labelmap", image)
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GenerateUniqueSegmentID(name)
    segmentation.AddSegment(segment, segment_id)
    return segment_id


def oblique_affine(spacing=(0.7, 1.3, 2.9), angles_deg=(20.0, -35.0, 50.0), origin=(-12.345678, 98.7654321, -210.123)):
    """An oblique, anisotropic IJK-to-RAS (rotation x, y, z by ``angles_deg``)."""
    a = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
    rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def wait(task, timeout: float = 240.0):
    """Poll ``task`` as the GUI's timer does, until it ends; returns it."""
    start = time.monotonic()
    while task.poll():
        assert time.monotonic() - start < timeout, f"task still running after {timeout} s (stage {task.stage})"
        time.sleep(0.05)
    return task
