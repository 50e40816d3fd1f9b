"""The page's view layouts and what is shown in them (Slicer views, server-rendered).

* ``segment``: the axial view large, the 3D view, coronal and sagittal beside it
  (view group 0): the CT, the segmentation overlay and its 3D surface.
* ``preview``: three axial views (view group 1), hidden input, reconstruction and
  original of one mask-in-mask level, side by side at the same position in the patient.
"""

from __future__ import annotations

import vtk
from trame_slicer.core import LayoutManager
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition, ViewProps, ViewType

from MiMSlicerLib.views import slice_node

# (role in the preview result, view tag - also a name in the page's state, so an identifier -, colour)
PREVIEW_ROLES = (("input", "HiddenInput", "#F34A33"), ("reconstruction", "Reconstruction", "#EFD64D"),
                 ("original", "Original", "#6DAD4A"))
PREVIEW_GROUP = 1


def _preview_view(tag: str, color: str) -> ViewLayoutDefinition:
    return ViewLayoutDefinition(singleton_tag=tag, view_type=ViewType.SLICE_VIEW,
                                properties=ViewProps(orientation="Axial", label=tag, color=color, group=PREVIEW_GROUP))


def layouts() -> dict[str, Layout]:
    axial, coronal = ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view()
    sagittal, threed = ViewLayoutDefinition.sagittal_view(), ViewLayoutDefinition.threed_view()
    preview = [_preview_view(tag, color) for _role, tag, color in PREVIEW_ROLES]
    return {
        "segment": Layout(LayoutDirection.Horizontal,
                          [axial, Layout(LayoutDirection.Vertical, [threed, coronal, sagittal])]),
        "preview": Layout(LayoutDirection.Horizontal, preview),
    }


def register_layouts(layout_manager: LayoutManager) -> None:
    """Register the layouts and create their views now, outside any page section: a view
    created while the page is being built would also be placed in that section (four extra
    views stacked below the layout, where the page can be scrolled to them)."""
    layout_manager.register_layout_dict(layouts(), lazy_initialization=True)
    for name in layouts():
        layout_manager.create_layout_views_if_needed(name)


def ras_at_display_point(scene, layout_name: str, x: float, y: float) -> list[float] | None:
    """World position (RAS, mm) under pixel ``(x, y)`` of a slice view (VTK display coordinates)."""
    node = slice_node(scene, layout_name)
    if node is None:
        return None
    ras = node.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))
    return [float(c) for c in ras[:3]]


def snapshot_png(view) -> bytes:
    """The view as the server renders it (``vtkWindowToImageFilter``), as PNG bytes."""
    view.render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(view.render_window())
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetWriteToMemory(True)
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return bytes(writer.GetResult())
