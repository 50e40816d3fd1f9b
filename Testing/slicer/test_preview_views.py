"""The preview's centre and views (issue 13, bug 2 and the layout items), with real MRML:
Slicer's crosshair node, its layout logic (which registers the layouts and creates the
Red/Yellow/Green slice nodes) and slice logics (which create the composite nodes).
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from mimslicer_testing import add_volume

from MiMSlicerLib import views

FOUR_UP = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
ONE_UP_3D = slicer.vtkMRMLLayoutNode.SlicerLayoutOneUp3DView
CONVENTIONAL = slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView


@pytest.fixture()
def volume(scene):
    # 20 x 10 x 5 voxels of 2 mm from (-10, 30, 100): RAS extent x -10..28, y 30..48, z 100..108
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-10.0, 30.0, 100.0)
    return add_volume(scene, np.zeros((5, 10, 20), dtype=np.int16), affine)


@pytest.fixture()
def crosshair(scene):
    node = scene.GetSingletonNode("default", "vtkMRMLCrosshairNode")
    if node is None:
        node = slicer.vtkMRMLCrosshairNode()
        node.SetSingletonTag("default")
        scene.AddNode(node)
    return node


@pytest.fixture()
def layout(slicer_app, scene):
    """Slicer's layout logic on the scene, plus one slice logic per view (what the views'
    widgets hold in the application): real slice and slice composite nodes."""
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    node = layout_logic.GetLayoutNode()
    node.SetViewArrangement(CONVENTIONAL)
    slice_logics = []
    for name in ("Red", "Yellow", "Green"):
        logic = slicer.vtkMRMLSliceLogic()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(slicer_app.app_logic)
        logic.SetSliceNode(views.slice_node(scene, name))
        slice_logics.append(logic)
    yield node
    for logic in slice_logics:
        logic.SetMRMLScene(None)
    layout_logic.SetMRMLScene(None)


def test_the_centre_is_the_first_point_when_one_is_selected(scene, volume, crosshair):
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "centre")
    markups.AddControlPointWorld(1.5, 35.0, 104.0)
    crosshair.SetCrosshairRAS(0.0, 40.0, 102.0)
    assert views.preview_center_ras(scene, volume, markups) == ([1.5, 35.0, 104.0], "point")


def test_the_centre_is_the_crosshair_not_the_mouse(scene, volume, crosshair):
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "no points")
    crosshair.SetCrosshairRAS(4.0, 41.0, 103.0)
    crosshair.SetCursorPositionRAS([20.0, 31.0, 101.0])  # where the mouse hovers: must not count
    assert views.preview_center_ras(scene, volume, empty) == ([4.0, 41.0, 103.0], "crosshair")
    assert views.preview_center_ras(scene, volume) == ([4.0, 41.0, 103.0], "crosshair")


def test_a_crosshair_outside_the_volume_gives_its_centre(scene, volume, crosshair):
    crosshair.SetCrosshairRAS(0.0, 0.0, 0.0)  # Slicer's initial crosshair, far from this CT
    ras, source = views.preview_center_ras(scene, volume)
    assert source == "volume centre"
    np.testing.assert_allclose(ras, [9.0, 39.0, 104.0])  # the middle of the voxel centres' extent


def test_the_centre_follows_a_parent_transform(scene, volume, crosshair):
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    crosshair.SetCrosshairRAS(4.0, 41.0, 103.0)  # inside the volume's local extent, not its world one
    ras, source = views.preview_center_ras(scene, volume)
    assert source == "volume centre"
    np.testing.assert_allclose(ras, [109.0, 39.0, 104.0])
    crosshair.SetCrosshairRAS(104.0, 41.0, 103.0)
    assert views.preview_center_ras(scene, volume) == ([104.0, 41.0, 103.0], "crosshair")


def test_the_preview_layout_shows_the_three_views(layout):
    assert views.layout_slice_views(layout, FOUR_UP) == {"Red", "Yellow", "Green"}
    assert views.layout_slice_views(layout, ONE_UP_3D) == set()
    layout.SetViewArrangement(CONVENTIONAL)
    assert views.preview_layout(layout) == CONVENTIONAL  # already shows them: kept
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
    assert views.preview_layout(layout) == FOUR_UP  # two of three would be invisible


def test_preview_then_restore_gives_back_the_users_views(scene, layout, volume):
    other = add_volume(scene, np.ones((3, 3, 3), dtype=np.int16), np.eye(4), name="user's CT")
    layout.SetViewArrangement(ONE_UP_3D)
    yellow = views.slice_node(scene, "Yellow")
    yellow.SetOrientation("Sagittal")
    yellow.SetFieldOfView(123.0, 77.0, 1.0)
    views.composite_node(scene, "Red").SetBackgroundVolumeID(other.GetID())
    views.composite_node(scene, "Red").SetLabelVolumeID(other.GetID())
    saved = views.save_views(scene)

    shown = views.show_preview_volumes(scene, {"input": volume, "reconstruction": volume, "original": volume})
    assert shown == ["Red", "Yellow", "Green"]
    assert layout.GetViewArrangement() == FOUR_UP
    assert yellow.GetOrientation() == "Axial"
    red = views.composite_node(scene, "Red")
    assert (red.GetBackgroundVolumeID(), red.GetLabelVolumeID()) == (volume.GetID(), None)

    views.restore_views(scene, saved)
    assert layout.GetViewArrangement() == ONE_UP_3D
    assert yellow.GetOrientation() == "Sagittal"
    assert yellow.GetFieldOfView()[:2] == pytest.approx((123.0, 77.0))
    assert (red.GetBackgroundVolumeID(), red.GetLabelVolumeID()) == (other.GetID(), other.GetID())


def test_restore_skips_volumes_removed_meanwhile(scene, layout, volume):
    views.composite_node(scene, "Green").SetBackgroundVolumeID(volume.GetID())
    saved = views.save_views(scene)
    views.show_preview_volumes(scene, {"original": volume})
    scene.RemoveNode(volume)
    views.restore_views(scene, saved)
    assert views.composite_node(scene, "Green").GetBackgroundVolumeID() is None


def test_the_level_spin_box_range_comes_from_the_preview_not_a_fixed_15():
    result = {1: {"volumes": [{}]}, 2: {"volumes": [{}] * 4}, 3: {"volumes": [{}] * 16}}
    assert [views.level_index_range(result, level) for level in (1, 2, 3)] == [(0, 0), (0, 3), (0, 15)]
    assert views.level_index_range(None, 2) == (0, 3)  # before any preview: the level's size
    assert views.level_index_range({3: {"volumes": [{}] * 5}}, 3) == (0, 4)
