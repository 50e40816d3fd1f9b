"""The fine-tuning curves as MRML nodes: a table (step, loss, Dice), a chart, two series.

:func:`start_with_plot` starts the job first and makes the nodes only once it has
started, so a start that fails (bad cases, missing init, a child that cannot launch)
leaves the scene as it was; the GUI shows the chart in a plot view only then, too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import vtk

COLUMNS = ("step", "loss", "dice")
SERIES = (("loss", (0.85, 0.33, 0.1)), ("dice", (0.0, 0.45, 0.74)))


class MetricsPlot:
    """A table node with one row per training progress event (loss) or validation (Dice), the
    other column NaN (so each curve only has its own points), and a chart of both."""

    def __init__(self, table, chart, series: list):
        self.table, self.chart, self.series = table, chart, series

    @classmethod
    def create(cls, scene, name: str = "MiM fine-tuning") -> "MetricsPlot":
        table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{name} metrics"))
        for column_name in COLUMNS:
            column = table.AddColumn(vtk.vtkDoubleArray())
            column.SetName(column_name)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(name))
        chart.SetTitle("Fine-tuning: loss and validation Dice")
        chart.SetXAxisTitle("step")
        series = []
        for column_name, color in SERIES:
            node = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{chart.GetName()} {column_name}")
            node.SetAndObserveTableNodeID(table.GetID())
            node.SetXColumnName("step")
            node.SetYColumnName(column_name)
            node.SetPlotType(node.PlotTypeScatter)
            node.SetMarkerStyle(node.MarkerStyleCircle if column_name == "dice" else node.MarkerStyleNone)
            node.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(node.GetID())
            series.append(node)
        return cls(table, chart, series)

    @property
    def nodes(self) -> list:
        return [self.table, self.chart, *self.series]

    def add(self, event: dict) -> bool:
        """Add the loss of a ``progress`` event or the Dice of a ``validation`` event; False if it has neither."""
        if event.get("step") is None:
            return False
        if event.get("event") == "validation":
            loss, dice = None, event.get("dice")
        elif event.get("event") == "progress":
            loss, dice = (event.get("metrics") or {}).get("loss"), None
        else:
            return False
        if loss is None and dice is None:
            return False
        vtable = self.table.GetTable()
        row = vtable.InsertNextBlankRow()
        for column, value in (("step", event["step"]), ("loss", loss), ("dice", dice)):
            vtable.SetValueByName(row, column, vtk.vtkVariant(math.nan if value is None else float(value)))
        self.table.Modified()
        return True

    def rows(self) -> list[tuple[float, float, float]]:
        """The table as ``[(step, loss, dice), ...]`` (NaN where a row has no value)."""
        vtable = self.table.GetTable()
        return [tuple(vtable.GetValueByName(r, c).ToDouble() for c in COLUMNS) for r in range(vtable.GetNumberOfRows())]


def start_with_plot(start: Callable[[], object], scene, name: str = "MiM fine-tuning"):
    """``(start(), MetricsPlot)``: the plot's nodes are created only after ``start`` returned;
    if it raises, nothing was added to ``scene`` and the error propagates."""
    task = start()
    return task, MetricsPlot.create(scene, name)
