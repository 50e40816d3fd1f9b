"""Volume nodes <-> files, keeping their geometry exactly.

Geometry conventions (Slicer's and mimcore's are the same):

* ``IJK-to-RAS`` is a ``(4, 4)`` float64 matrix mapping a voxel index ``(i, j, k, 1)``
  (``i`` fastest in memory) to the voxel centre in RAS millimetres. Its columns are
  ``direction * spacing``; the last column is the origin.
* ``slicer.util.arrayFromVolume`` returns ``(K, J, I)`` arrays; mimcore's arrays are
  ``(I, J, K)``. Files carry the geometry, so neither layout leaks across.
* A volume under a parent transform is shown in *world* RAS = ``parent_to_world @
  IJK-to-RAS``. Files written here hold the world geometry ("hardened"): a linear
  transform is folded into the written IJK-to-RAS (no resampling, the voxels stay as
  they are); a non-linear one cannot be, and is refused with a message saying what to do.

Files are written and read with MRML storage nodes (``vtkMRMLVolumeArchetypeStorageNode``),
as Slicer itself saves volumes. The storage nodes used here are never added to the
scene and never attached to the user's nodes, so writing a file changes nothing in the scene.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import slicer
import vtk

from MiMSlicerLib.errors import MiMSlicerError

# a hardened grid whose axes are less orthogonal than this (|cos| between columns) is refused
_ORTHOGONALITY_TOLERANCE = 1e-6


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a ``(4, 4)`` float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_matrix(array) -> vtk.vtkMatrix4x4:
    """A ``(4, 4)`` array-like as a new ``vtkMatrix4x4``."""
    array = np.asarray(array, dtype=np.float64)
    if array.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {array.shape}")
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def parent_to_world(node) -> np.ndarray:
    """``(4, 4)`` matrix from ``node``'s coordinates to world RAS (identity without a parent transform).

    Raises MiMSlicerError if the transform to world is not linear (a grid or B-spline
    transform, or a chain holding one): such a transform would need resampling.
    """
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        culprit = transform
        while culprit is not None and culprit.IsLinear():
            culprit = culprit.GetParentTransformNode()
        culprit = culprit or transform
        raise MiMSlicerError(
            f"'{node.GetName()}' is under the non-linear transform '{culprit.GetName()}'. "
            "A non-linear (e.g. grid or B-spline) transform cannot be written into a volume's geometry "
            "without resampling. Harden it first (Data module: right-click the volume -> 'Harden transform', "
            "which resamples the volume), or move the volume out of the transform.")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return matrix_to_array(matrix)


def ijk_to_ras(volume_node, world: bool = True) -> np.ndarray:
    """``(4, 4)`` IJK-to-RAS of a volume node: in world RAS (parent transform applied,
    the default) or in the node's own coordinates (``world=False``)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    local = matrix_to_array(matrix)
    return parent_to_world(volume_node) @ local if world else local


def check_scalar_volume(volume_node, what: str = "the input volume"):
    """``volume_node`` if it is a scalar volume node with voxels, else MiMSlicerError."""
    if volume_node is None:
        raise MiMSlicerError(f"No volume selected for {what}: choose a volume node.")
    if not hasattr(volume_node, "IsA") or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        kind = volume_node.GetClassName() if hasattr(volume_node, "GetClassName") else type(volume_node).__name__
        raise MiMSlicerError(f"{what.capitalize()} must be a scalar volume (a CT), got a {kind}. "
                             "Choose a scalar volume node.")
    image = volume_node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1 or image.GetNumberOfPoints() == 0:
        raise MiMSlicerError(f"'{volume_node.GetName()}' ({what}) has no voxels; load the image first.")
    if image.GetNumberOfScalarComponents() != 1:
        raise MiMSlicerError(f"'{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} components per "
                             "voxel (a colour or vector image); MiM needs a single-component CT volume.")
    return volume_node


def _check_grid(name: str, matrix: np.ndarray) -> None:
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(axes)):
        raise MiMSlicerError(f"'{name}' has a degenerate geometry (a zero or invalid voxel spacing after its "
                             "transform); check the volume's spacing and its parent transform.")
    unit = axes / spacing
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > _ORTHOGONALITY_TOLERANCE:
        raise MiMSlicerError(
            f"The parent transform of '{name}' shears its voxel grid (its axes are no longer perpendicular), "
            "which a volume file cannot hold. Harden the transform in Slicer first (Data module: right-click "
            "the volume -> 'Harden transform', which resamples it), or use a rigid/similarity transform.")


def hardened_copy(volume_node):
    """A volume node (not in any scene) sharing ``volume_node``'s voxels, with its world
    IJK-to-RAS and no parent transform. The voxels are not copied."""
    world = ijk_to_ras(volume_node, world=True)
    _check_grid(volume_node.GetName(), world)
    copy = volume_node.__class__()
    copy.SetName(volume_node.GetName())
    copy.SetAndObserveImageData(volume_node.GetImageData())
    copy.SetIJKToRASMatrix(array_to_matrix(world))
    return copy


def write_volume(volume_node, path: str | os.PathLike, compress: bool = False) -> Path:
    """Write a scalar (or label map) volume node to ``path`` (``.nrrd``, ``.nii.gz``, ``.mha``, ...)
    with its world geometry; returns the path.

    The voxels are written as they are (same type, no resampling); the file's
    IJK-to-RAS equals :func:`ijk_to_ras` ``(volume_node, world=True)`` to double
    precision in NRRD (NIfTI stores it in float32: ~1e-6 mm). A linear parent transform
    is hardened into the geometry; a non-linear one is refused (MiMSlicerError). The
    scene and the node are left untouched.
    """
    check_scalar_volume(volume_node, f"'{volume_node.GetName()}'" if volume_node is not None else "the volume")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    node = hardened_copy(volume_node) if volume_node.GetParentTransformNode() is not None else volume_node
    _check_grid(volume_node.GetName(), ijk_to_ras(node, world=False))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1 if compress else 0)
    if not storage.WriteData(node) or not path.is_file():
        raise MiMSlicerError(f"Could not write '{volume_node.GetName()}' to {path}. Check that the folder is "
                             "writable and the disk is not full.")
    return path


def read_volume_into(node, path: str | os.PathLike):
    """Read the image file ``path`` into the (scalar or label map) volume node ``node``:
    voxels and IJK-to-RAS. No storage node is attached, so the node counts as new,
    unsaved data (the file may be temporary). Returns ``node``."""
    path = Path(path)
    if not path.is_file():
        raise MiMSlicerError(f"Expected the file {path}, but it does not exist (the job may have failed to write it).")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node) or node.GetImageData() is None:
        raise MiMSlicerError(f"Could not read {path} as a volume; the file may be damaged.")
    return node


def load_volume(path: str | os.PathLike, scene, name: str | None = None, labelmap: bool = False):
    """A new scalar (or label map) volume node in ``scene`` holding the file ``path``,
    with a default display node. Nothing is added to the scene if reading fails."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    read_volume_into(node, path)
    node.SetName(scene.GenerateUniqueName(name or Path(path).name.split(".")[0]))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node
