"""Where the patient is: a body mask found at low resolution, so that the sliding window can
skip windows that hold nothing but air (the ``fast`` profile, coarse-to-fine).

The mask is made on the preprocessed (model-space) image, whose values are the HU window
scaled to [0, 1] (``hu_min`` -> 0, ``hu_max`` -> 1, clipped):

1. a voxel is body when its value is above ``threshold_hu`` (default -500 HU: air is about
   -1000, soft tissue 0 … 100, fat about -100) -- or above ``hu_min`` where the window starts
   higher (the usual -175: then anything the network sees as non-constant input is body);
2. max-pooled to a coarse grid of ``coarse`` voxels (4: 6 mm at 1.5 mm), where connected
   components under ``min_fraction`` of the largest are dropped (a stray bright voxel in
   the air) and the rest is dilated by ``margin`` coarse voxels;
3. brought back to the model grid (nearest).

A window is computed when it holds at least one mask voxel; the others give background
(:class:`~mimcore.inference.window.WindowSegmenter`). Every window that covers a mask voxel
is computed exactly as without the mask, so inside the mask the blended probabilities
equal the full path's; only air voxels near skipped windows can differ.

No mask (``None``: compute every window) when nothing or everything is body -- not a CT
in HU, or a volume already cropped to the body.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BODY_THRESHOLD_HU = -500.0
COARSE = 4
MARGIN = 1


def threshold_value(hu_min: float, hu_max: float, threshold_hu: float = BODY_THRESHOLD_HU) -> float:
    """The body threshold in the preprocessed image's units (values above it are body)."""
    return max(0.0, (threshold_hu - hu_min) / (hu_max - hu_min))


def body_mask(image: torch.Tensor, threshold: float, coarse: int = COARSE, margin: int = MARGIN,
              min_fraction: float = 0.01) -> torch.Tensor | None:
    """image (1, X, Y, Z) preprocessed -> mask (X, Y, Z) bool, or None (every window; see the module)."""
    shape = tuple(image.shape[1:])
    low = F.max_pool3d((image[None] > threshold).float(), coarse, coarse, ceil_mode=True)[0, 0] > 0
    if not low.any() or low.all():
        return None
    from scipy import ndimage

    comp, n = ndimage.label(low.numpy())
    if n > 1:
        sizes = torch.from_numpy(comp).flatten().bincount()[1:]
        keep = torch.nonzero(sizes >= min_fraction * sizes.max()).flatten() + 1
        low = torch.isin(torch.from_numpy(comp), keep)
    if margin > 0:
        low = F.max_pool3d(low[None, None].float(), 2 * margin + 1, 1, margin)[0, 0] > 0
    if low.all():
        return None
    full = low.repeat_interleave(coarse, 0).repeat_interleave(coarse, 1).repeat_interleave(coarse, 2)
    return full[: shape[0], : shape[1], : shape[2]].contiguous()
