"""Label maps moved onto another voxel grid: nearest neighbour in world space (SimpleITK).

Used to put a segmentation made on the model's grid back on the input's grid, and to put
a reference on a prediction's grid before scoring (``mim evaluate --resample-ref``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from mimcore.data.volume_io import Volume, sitk_geometry, to_sitk


def labels_to_grid(labels: np.ndarray, affine: np.ndarray, reference: Volume) -> np.ndarray:
    """Nearest-neighbour resampling of a label map ``(X', Y', Z')`` with RAS ``affine`` onto
    ``reference``'s grid: -> ``(X, Y, Z)`` of ``reference.shape``, same dtype. Each voxel
    takes the label at its centre's world position; voxels outside ``labels`` get 0."""
    src = to_sitk(labels, affine)
    grid = sitk.Image([int(s) for s in reference.shape], sitk.sitkUInt8)
    origin, spacing, direction = sitk_geometry(reference.affine)
    grid.SetOrigin(origin)
    grid.SetSpacing(spacing)
    grid.SetDirection(direction)
    out = sitk.Resample(src, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, src.GetPixelID())
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0).astype(labels.dtype, copy=False)
