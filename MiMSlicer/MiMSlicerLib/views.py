"""Where the mask-in-mask preview looks and how it borrows the user's views (MRML only, no Qt).

* :func:`preview_center_ras` - the centre of the region to reconstruct: the selected
  point, else the crosshair (``vtkMRMLCrosshairNode.GetCrosshairRAS``: where the user put
  it with Shift+move or a click, not where the mouse happens to hover), else the
  volume's centre. A crosshair outside the volume counts as unset.
* :func:`save_views` / :func:`restore_views` - the user's layout, and per slice view of
  the preview its orientation, slice position/field of view and the volumes it showed.
* :func:`preview_layout` - a layout that shows the Red, Yellow and Green views (the
  current one if it does, else the four-up), read from the layout descriptions Slicer
  registers.
* :func:`show_preview_volumes` - hidden input / reconstruction / original of one level in
  Red / Yellow / Green, axial.
* :func:`level_index_range` - the range of the "volume of the level" spin box.

The Qt module only adds what needs views on screen (fitting the slices to the volumes).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import slicer
import vtk

PREVIEW_VIEWS = (("Red", "input"), ("Yellow", "reconstruction"), ("Green", "original"))
LEVEL_VOLUMES = {1: 1, 2: 4, 3: 16}  # volumes of each mask-in-mask level
PREVIEW_DEFAULT_LAYOUT = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
CENTER_SOURCES = ("point", "crosshair", "volume centre")


def _world_bounds(volume_node) -> list[float]:
    bounds = [0.0] * 6
    volume_node.GetRASBounds(bounds)  # world coordinates (parent transforms applied)
    return bounds


def volume_center_ras(volume_node) -> list[float]:
    """World RAS of the centre of ``volume_node``'s extent."""
    b = _world_bounds(volume_node)
    return [(b[0] + b[1]) / 2.0, (b[2] + b[3]) / 2.0, (b[4] + b[5]) / 2.0]


def _inside(ras, bounds, tolerance: float = 1e-6) -> bool:
    return all(bounds[2 * i] - tolerance <= ras[i] <= bounds[2 * i + 1] + tolerance for i in range(3))


def crosshair_node(scene):
    """The scene's crosshair (Slicer has one, singleton tag ``default``), or None."""
    node = scene.GetSingletonNode("default", "vtkMRMLCrosshairNode")
    return node if node is not None else scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")


def preview_center_ras(scene, volume_node, markups_node=None) -> tuple[list[float], str]:
    """``(ras, source)``: the preview's centre in world RAS mm, and where it came from
    (one of :data:`CENTER_SOURCES`): the first control point of ``markups_node``; else the
    crosshair if it lies within the volume; else the centre of the volume."""
    if markups_node is not None and markups_node.GetNumberOfControlPoints() > 0:
        ras = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(0, ras)
        return [float(c) for c in ras], "point"
    crosshair = crosshair_node(scene)
    if crosshair is not None:
        ras = [float(c) for c in crosshair.GetCrosshairRAS()]
        if _inside(ras, _world_bounds(volume_node)):
            return ras, "crosshair"
    return volume_center_ras(volume_node), "volume centre"


# --------------------------------------------------------------------------- layouts


def layout_node(scene):
    """The scene's layout node (``vtkMRMLLayoutNode``), or None outside a layout-managed scene."""
    return scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode") or \
        scene.GetFirstNodeByClass("vtkMRMLLayoutNode")


def layout_slice_views(layout, arrangement: int) -> set[str]:
    """The slice view names (``Red``, ...) that layout ``arrangement`` shows, read from the
    description registered in the layout node (empty when it has none)."""
    text = layout.GetLayoutDescription(arrangement) if layout.IsLayoutDescription(arrangement) else ""
    if not text:
        return set()
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return set()
    return {view.get("singletontag") for view in root.iter("view")
            if view.get("class") == "vtkMRMLSliceNode" and view.get("singletontag")}


def preview_layout(layout) -> int:
    """The arrangement for the preview: the current one if it shows Red, Yellow and Green,
    else the four-up layout."""
    current = layout.GetViewArrangement()
    wanted = {name for name, _role in PREVIEW_VIEWS}
    return current if wanted <= layout_slice_views(layout, current) else PREVIEW_DEFAULT_LAYOUT


def slice_node(scene, name: str):
    """The slice node of view ``name`` (``Red``, ...), or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() == name:
            return node
    return None


def composite_node(scene, name: str):
    """The slice composite node of view ``name`` (what it displays), or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == name:
            return node
    return None


@dataclass
class SliceViewState:
    orientation: str
    slice_to_ras: list[float]  # 16 values
    field_of_view: tuple[float, float, float]
    volumes: tuple[str | None, str | None, str | None]  # background, foreground, label volume IDs


@dataclass
class ViewState:
    """What :func:`save_views` keeps of the user's views."""

    arrangement: int | None
    slices: dict[str, SliceViewState] = field(default_factory=dict)


def save_views(scene, names=tuple(name for name, _role in PREVIEW_VIEWS)) -> ViewState:
    """The current layout and, per slice view in ``names``, its orientation, position, field of
    view and volumes."""
    layout = layout_node(scene)
    state = ViewState(layout.GetViewArrangement() if layout is not None else None)
    for name in names:
        node = slice_node(scene, name)
        if node is None:
            continue
        matrix = node.GetSliceToRAS()
        comp = composite_node(scene, name)
        volumes = (comp.GetBackgroundVolumeID(), comp.GetForegroundVolumeID(), comp.GetLabelVolumeID()) \
            if comp is not None else (None, None, None)
        state.slices[name] = SliceViewState(node.GetOrientation(), [matrix.GetElement(r, c) for r in range(4)
                                                                    for c in range(4)],
                                            tuple(node.GetFieldOfView()), volumes)
    return state


def restore_views(scene, state: ViewState | None) -> None:
    """Put back what :func:`save_views` kept. Volumes removed since are not shown again."""
    if state is None:
        return
    layout = layout_node(scene)
    if layout is not None and state.arrangement is not None:
        layout.SetViewArrangement(state.arrangement)
    for name, saved in state.slices.items():
        node = slice_node(scene, name)
        if node is not None:
            was = node.StartModify()
            node.SetOrientation(saved.orientation)
            matrix = vtk.vtkMatrix4x4()
            matrix.DeepCopy(saved.slice_to_ras)
            node.GetSliceToRAS().DeepCopy(matrix)
            node.SetFieldOfView(*saved.field_of_view)
            node.UpdateMatrices()
            node.EndModify(was)
        comp = composite_node(scene, name)
        if comp is not None:
            ids = [i if i and scene.GetNodeByID(i) is not None else None for i in saved.volumes]
            comp.SetBackgroundVolumeID(ids[0])
            comp.SetForegroundVolumeID(ids[1])
            comp.SetLabelVolumeID(ids[2])


def show_preview_volumes(scene, nodes: dict) -> list[str]:
    """Show ``nodes["input"]``, ``["reconstruction"]``, ``["original"]`` in the Red, Yellow and
    Green views, axial, alone (no foreground, no label map), and switch to
    :func:`preview_layout`. Returns the names of the views that show one (the GUI fits them)."""
    layout = layout_node(scene)
    if layout is not None:
        arrangement = preview_layout(layout)
        if arrangement != layout.GetViewArrangement():
            layout.SetViewArrangement(arrangement)
    shown = []
    for name, role in PREVIEW_VIEWS:
        node, comp, view = nodes.get(role), composite_node(scene, name), slice_node(scene, name)
        if node is None or comp is None or view is None:
            continue
        comp.SetBackgroundVolumeID(node.GetID())
        comp.SetForegroundVolumeID(None)
        comp.SetLabelVolumeID(None)
        view.SetOrientation("Axial")
        shown.append(name)
    return shown


def level_index_range(preview_result: dict | None, level: int) -> tuple[int, int]:
    """``(0, last index)`` for the "volume of the level" spin box: from the loaded preview
    (``{level: {"volumes": [...]}}``) when there is one, else the level's size."""
    entry = (preview_result or {}).get(level)
    if entry and entry.get("volumes"):
        return 0, len(entry["volumes"]) - 1
    return 0, LEVEL_VOLUMES.get(int(level), 16) - 1
