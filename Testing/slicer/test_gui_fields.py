"""The GUI's small decisions as pure functions (issue 13 bug 4, issue 16, the PyTorch restart)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from MiMSlicerLib.fields import (default_fast, gpu_found, gpu_requested, path_is_set, path_text, path_value,
                                 restart_needed, runtime_text)


def test_an_unset_path_shows_an_empty_field_not_a_dot():
    # what Slicer's parameterNodeWrapper holds for a Path parameter nobody set, or one reset
    assert path_text(Path()) == "" and path_text(Path("")) == "" and path_text(".") == "" and path_text(None) == ""
    assert not path_is_set(Path()) and not path_is_set(None) and not path_is_set("  ")
    assert path_text(Path("/data/run1")) == "/data/run1" and path_is_set(Path("run1"))
    assert path_value("") == Path() and path_value("  /data/run1 ") == Path("/data/run1")
    assert path_text(path_value("")) == ""  # a cleared field stays empty after the round trip


def test_fast_is_on_by_default_without_a_gpu():
    assert default_fast(False) is True and default_fast(None) is True and default_fast(True) is False
    cpu = SimpleNamespace(ok=True, device="cpu")
    gpu = SimpleNamespace(ok=True, device="cuda:0")
    failed = SimpleNamespace(ok=False, device=None)
    assert gpu_found(cpu) is False and gpu_found(gpu) is True and gpu_found(failed) is None and gpu_found(None) is None
    assert default_fast(gpu_found(cpu)) and not default_fast(gpu_found(gpu))
    # a device setting decides before any check, except auto (MiM Studio's --device)
    assert [gpu_requested(d) for d in ("cpu", "CPU", "cuda", "cuda:1", "mps", "auto", "")] == [
        False, False, True, True, True, None, None]
    assert default_fast(gpu_requested("cpu")) and not default_fast(gpu_requested("cuda:0"))


def test_where_the_segment_network_ran():
    start = {"event": "start", "stage": "segment", "runtime": "openvino"}
    assert runtime_text([start, {"event": "progress"}]) == ", network in OpenVINO"
    assert runtime_text([dict(start, runtime="torch")]) == ", network in PyTorch"
    assert runtime_text([dict(start, runtime="torch", precision="bf16")]) == ", network in PyTorch bf16"
    assert runtime_text([dict(start, precision="fp32")]) == ", network in OpenVINO fp32"
    assert runtime_text([{"event": "start", "stage": "segment"}]) == ""  # an older mimcore does not say
    assert runtime_text([]) == ""


def test_restart_is_needed_only_for_packages_already_imported():
    loaded = ["numpy", "numpy.linalg", "torch", "torch.nn", "yaml", "slicer"]
    assert restart_needed(["torch>=2.2", "monai>=1.3", "PyYAML==6.0"], loaded) == ["torch", "pyyaml"]
    assert restart_needed(["torch>=2.2"], ["numpy"]) == []
    assert restart_needed(["numpy>=1.26; python_version >= '3.9'", "SimpleITK"], loaded) == ["numpy"]


def test_the_minimum_slicer_is_the_first_with_python_3_10():
    from MiMSlicerLib.fields import slicer_version_problem

    assert slicer_version_problem((5, 10), (3, 12)) is None and slicer_version_problem((5, 11), (3, 12)) is None
    problem = slicer_version_problem((5, 8), (3, 9))
    assert problem.startswith("MiMSlicer needs 3D Slicer 5.10 or newer") and "Slicer 5.8 with Python 3.9" in problem
    assert slicer_version_problem((5, 10), (3, 9))  # a custom build with an old Python cannot run mimcore either
