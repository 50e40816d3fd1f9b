"""The fine-tuning curves' nodes (issue 13): made only once the job has started, so a failed
start leaves the scene exactly as it was; then one row per loss / Dice event. Real MRML
table, chart and series nodes; a real failing start of the logic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mimslicer_testing import CHILD_ENV, add_volume, scene_state

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.logic import MiMLogicCore
from MiMSlicerLib.plots import MetricsPlot, start_with_plot


@pytest.fixture()
def logic(scene, tmp_path):
    return MiMLogicCore(scene=scene, models_dir=str(tmp_path / "models"), env=CHILD_ENV)


def test_a_failed_start_leaves_the_scene_unchanged(scene, logic, tmp_path):
    volume = add_volume(scene, np.zeros((4, 4, 4), dtype=np.int16), np.eye(4))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no segments")
    before, count = scene_state(scene), scene.GetNumberOfNodes()
    with pytest.raises(MiMSlicerError, match="the segmentations have no segments"):
        start_with_plot(lambda: logic.start_finetune([(volume, segmentation)], None, 5), scene)
    with pytest.raises(MiMSlicerError, match="no such file or folder to start fine-tuning from"):
        start_with_plot(lambda: logic.start_finetune(str(tmp_path), str(tmp_path / "missing.json"), 5), scene)
    (tmp_path / "cases").mkdir()
    (tmp_path / "cases" / "datalist.json").write_text("{}")
    broken = MiMLogicCore(scene=scene, models_dir=str(tmp_path / "models"), python=str(tmp_path / "no-python"))
    with pytest.raises(MiMSlicerError, match="Could not start"):  # the child cannot even launch
        start_with_plot(lambda: broken.start_finetune(str(tmp_path / "cases"), None, 5), scene)
    assert scene.GetNumberOfNodes() == count and scene_state(scene) == before


def test_once_started_the_plot_gets_its_nodes_and_rows(scene):
    count = scene.GetNumberOfNodes()
    started = []
    task, plot = start_with_plot(lambda: started.append("task") or "task", scene)
    assert task == "task" and started == ["task"]
    assert scene.GetNumberOfNodes() == count + 4
    assert [n.GetClassName() for n in plot.nodes] == ["vtkMRMLTableNode", "vtkMRMLPlotChartNode",
                                                       "vtkMRMLPlotSeriesNode", "vtkMRMLPlotSeriesNode"]
    assert plot.chart.GetNumberOfPlotSeriesNodes() == 2
    assert plot.add({"event": "progress", "step": 1, "metrics": {"loss": 0.9}})
    assert plot.add({"event": "validation", "step": 2, "dice": 0.5})
    assert not plot.add({"event": "progress", "step": 3, "metrics": {}})  # nothing to plot
    assert not plot.add({"event": "checkpoint", "step": 3, "path": "x"})
    rows = plot.rows()
    assert rows[0][:2] == (1.0, 0.9) and math.isnan(rows[0][2])
    assert rows[1][0] == 2.0 and math.isnan(rows[1][1]) and rows[1][2] == 0.5
    assert len(rows) == 2
    second = MetricsPlot.create(scene)  # a second run gets its own, uniquely named nodes
    assert second.table.GetName() != plot.table.GetName()
