"""Segmentation nodes -> files a user downloads: ``.seg.nrrd`` (Slicer's own segmentation
file) and a NIfTI label map, both on exactly the reference volume's voxel grid.

The ``.seg.nrrd`` keeps every segment's name and colour (Slicer, ITK-SNAP and 3D viewers
read it); it is written uncropped, so its grid is the CT's grid even where the segments
cover only part of it. The NIfTI label map (``.nii.gz``) is for pipelines: one integer
per voxel, the value of each segment given by ``label_names`` (default: segment order).
Nothing is added to the scene.
"""

from __future__ import annotations

import os
from pathlib import Path

import slicer

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.segmentations import export_labelmap, segments


def _check(segmentation_node) -> None:
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise MiMSlicerError("Nothing to export: choose a segmentation.")


def write_seg_nrrd(segmentation_node, reference_volume, path: str | os.PathLike) -> Path:
    """Write ``segmentation_node`` as a ``.seg.nrrd`` on ``reference_volume``'s grid; returns the path."""
    _check(segmentation_node)
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise MiMSlicerError(f"A segmentation file is named *.seg.nrrd, not {path.name}.")
    if reference_volume is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetCropToMinimumExtent(False)
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node):
        raise MiMSlicerError(f"Could not write the segmentation to {path}.")
    return path


def write_label_nifti(segmentation_node, reference_volume, path: str | os.PathLike,
                      label_names: list[str] | None = None) -> Path:
    """Write ``segmentation_node`` as a NIfTI label map on ``reference_volume``'s grid; returns the path.
    label_names: value ``i + 1`` for the segment named ``label_names[i]`` (default: all segments in order)."""
    _check(segmentation_node)
    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise MiMSlicerError(f"A NIfTI file is named *.nii.gz or *.nii, not {path.name}.")
    names = label_names if label_names is not None else [name for _id, name in segments(segmentation_node)]
    if not names:
        raise MiMSlicerError(f"'{segmentation_node.GetName()}' has no segments to export.")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_labelmap(segmentation_node, reference_volume, path, names, allow_missing=True)
    return path
