"""Regression guards for the widget's own bugs of issue 13, read from MiMSlicer.py with ``ast``
(it imports qt, which exists only inside Slicer; the behaviour behind each call is tested
at the logic level in the other files: test_add_model_task, test_preview_views,
test_install_run, test_cancel_time, test_finetune_plot)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE_FILE = ROOT / "MiMSlicer" / "MiMSlicer.py"


def widget_class() -> ast.ClassDef:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    return next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "MiMSlicerWidget")


def method(name: str) -> ast.FunctionDef:
    return next(f for f in widget_class().body if isinstance(f, ast.FunctionDef) and f.name == name)


def calls(node) -> list[str]:
    """Dotted names of every call under ``node`` (``self.logic.add_model``, ``qt.QInputDialog.getItem``)."""
    names = []
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        parts, func = [], call.func
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if isinstance(func, ast.Name):
            parts.append(func.id)
        names.append(".".join(reversed(parts)))
    return names


def test_cancelling_the_registry_dialog_adds_nothing():
    """Bug 1: PythonQt's static getItem returns the current item on Cancel; the dialog's exec_()
    result must decide, before any _addModel."""
    body = method("onAddModelFromRegistry")
    names = calls(body)
    assert "qt.QInputDialog.getItem" not in names
    assert "qt.QInputDialog" in names and "dialog.setComboBoxItems" in names and "dialog.textValue" in names
    gate = next(n for n in ast.walk(body) if isinstance(n, ast.If) and "dialog.exec_" in calls(n.test))
    assert isinstance(gate.test, ast.UnaryOp) and isinstance(gate.test.op, ast.Not)
    assert isinstance(gate.body[0], ast.Return)  # cancelled -> return
    exec_line = gate.lineno
    add_lines = [n.lineno for n in ast.walk(body) if isinstance(n, ast.Call) and calls(n)[0] == "self._addModel"]
    assert add_lines and min(add_lines) > exec_line


def test_the_preview_centre_is_not_the_mouse_position():
    """Bug 2: the hover position (GetCursorPositionRAS) is gone; the logic chooses point/crosshair/centre."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "GetCursorPositionRAS" not in source
    assert "views.preview_center_ras" in calls(method("onPreviewButton"))


def test_nothing_long_runs_on_the_gui_thread():
    """Bug 3: adding a model, checking the device and installing packages are polled tasks."""
    names = set(calls(widget_class()))
    for blocking in ("self.logic.add_model", "dependencies.check_device", "dependencies.run_plan"):
        assert blocking not in names, f"the widget calls the blocking {blocking}"
    assert "self.logic.start_add_model" in names and "dependencies.DeviceCheckRun" in names
    assert "dependencies.InstallRun" in names
    finish = method("_finishTask")
    handlers = {k.value for d in ast.walk(finish) if isinstance(d, ast.Dict) for k in d.keys}
    assert {"segment", "preview", "finetune", "addmodel", "install", "device"} <= handlers


def test_cancel_does_not_wait_for_the_process_tree():
    body = method("_cancelIfRunning")
    cancel = next(n for n in ast.walk(body) if isinstance(n, ast.Call) and calls(n)[0] == "task.cancel")
    assert [(k.arg, k.value.value) for k in cancel.keywords] == [("wait", False)]


def test_finetune_nodes_come_after_the_start():
    body = method("onFinetuneButton")
    names = calls(body)
    assert "start_with_plot" in names and "slicer.mrmlScene.AddNewNodeByClass" not in names
    assert "self.logic.start_finetune" in names  # inside the lambda start_with_plot calls first
