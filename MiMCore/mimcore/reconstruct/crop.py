"""Where ``mim reconstruct``'s crop and level volumes lie in the patient: the RAS affines of the
crop and of every level volume (:func:`level_affines`), the crop itself cut from the
preprocessed volume (:func:`extract_crop`), and which of its voxels are padding
(:meth:`Crop.padding_mask`). The geometry is described in :mod:`mimcore.reconstruct`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mimcore.errors import MimError


# ---------------------------------------------------------------------------- geometry

def _translation(offset) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = np.asarray(offset, dtype=np.float64)
    return t


def _scaling(factor: float, shift: float) -> np.ndarray:
    """Index map ``j -> factor * j + shift`` on every axis, as a 4x4 matrix."""
    m = np.diag([factor, factor, factor, 1.0])
    m[:3, 3] = shift
    return m


def ras_bounds(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box (min, max) in mm of a grid's voxel *edges* (index -0.5 .. n-0.5)."""
    lo, hi = -0.5, np.asarray(shape, dtype=np.float64) - 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo, hi[0]) for y in (lo, hi[1]) for z in (lo, hi[2])])
    world = (np.asarray(affine, dtype=np.float64) @ corners.T)[:3]
    return world.min(axis=1), world.max(axis=1)


def grid_center(affine: np.ndarray, shape) -> np.ndarray:
    """RAS position (mm) of the centre of a grid (continuous index (n - 1) / 2)."""
    idx = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return (np.asarray(affine, dtype=np.float64) @ np.append(idx, 1.0))[:3]


def level_affines(crop_affine: np.ndarray, octants, blocks, input_size: int,
                  patch_size: int = 16) -> list[list[np.ndarray]]:
    """RAS affines of every level volume of one crop.

    crop_affine: (4, 4) index -> RAS of the (2S)^3 crop; octants: (n2,) octant ids of
    the level-2 volumes; blocks: (n2, n3) level-2 token ids of the level-3 volumes
    (level-3 volume ``v * n3 + j`` is token ``blocks[v, j]`` of level-2 volume ``v``).
    Returns ``[[A1], [A2_0, ...], [A3_0, ...]]``.
    """
    a = np.asarray(crop_affine, dtype=np.float64)
    s, p = input_size, patch_size
    g, f = s // p, s / p
    octants = np.asarray(octants, dtype=np.int64).reshape(-1)
    blocks = np.asarray(blocks, dtype=np.int64).reshape(len(octants), -1)
    level1 = [a @ _scaling(2.0, 0.5)]
    oct_off = [np.array([o // 4, (o // 2) % 2, o % 2]) * s for o in octants]
    level2 = [a @ _translation(off) for off in oct_off]
    level3 = []
    for v, off in enumerate(oct_off):
        for t in blocks[v]:
            tok = np.array([t // (g * g), (t // g) % g, t % g]) * p
            level3.append(a @ _translation(off + tok) @ _scaling(1.0 / f, 0.5 / f - 0.5))
    return [level1, level2, level3]


# ---------------------------------------------------------------------------- the crop

@dataclass
class Crop:
    """A preprocessed crop: ``tensor`` (1, C, C, C) in [0, 1], ``affine`` (4, 4) index -> RAS.

    ``grid_affine``/``grid_shape``: the preprocessed volume's grid (oriented, resampled,
    foreground-cropped) before any padding; crop voxels off it are padding.
    """

    tensor: torch.Tensor
    affine: np.ndarray
    center_ras: np.ndarray
    padded_fraction: float
    volume_bounds: tuple[np.ndarray, np.ndarray]
    grid_affine: np.ndarray | None = None
    grid_shape: tuple[int, int, int] | None = None

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return ras_bounds(self.affine, self.tensor.shape[1:])

    def padding_mask(self, affine: np.ndarray, size: int) -> np.ndarray:
        """(size, size, size) bool, True on the voxels of a grid (``affine``, e.g. a level
        volume's) whose centres lie off the preprocessed volume, i.e. on padding."""
        inside = _inside_axes(affine, size, self.grid_affine, self.grid_shape)
        return ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in np.asarray(v, dtype=np.float64)) + ")"


def _inside_axes(crop_affine: np.ndarray, crop_size: int, vol_affine: np.ndarray, shape) -> list[np.ndarray]:
    """Per crop axis, a (crop_size,) bool: whether that index lies on the volume's grid.

    The crop's axes run along the volume grid's (orientation only flips/permutes axes,
    resampling scales them, padding/cropping shift them), so the crop index -> volume index
    map is a scaled signed permutation plus a translation and "inside" separates by axis.
    """
    t = np.linalg.inv(vol_affine) @ crop_affine
    steps = np.arange(crop_size)
    out = []
    for axis in range(3):
        src = int(np.argmax(np.abs(t[:3, axis])))
        idx = t[src, 3] + t[src, axis] * steps
        out.append((idx > -0.5) & (idx < shape[src] - 0.5))
    return out


def _inside_fraction(crop_affine: np.ndarray, crop_size: int, vol_affine: np.ndarray, shape) -> float:
    """Fraction of crop voxels that lie on voxels of the volume's grid (the rest is padding)."""
    return float(np.prod([a.mean() for a in _inside_axes(crop_affine, crop_size, vol_affine, shape)]))


def extract_crop(volume, crop_size: int, prep, center_ras=None) -> Crop:
    """Preprocess ``volume`` (a :class:`~mimcore.data.volume_io.Volume`) as pre-training
    does and cut the ``crop_size^3`` crop centred (to the nearest voxel) at ``center_ras``
    (RAS mm; default: the volume's centre). Parts outside the volume are padded with 0
    (air). Raises MimError when the centre lies outside the volume, or when the whole crop
    is padding (the preprocessing cut the centre's region away, e.g. its foreground crop).
    """
    from monai.transforms import BorderPadd, SpatialCropd

    from mimcore.data.preprocess import deterministic_transforms

    vol_affine = np.asarray(volume.affine, dtype=np.float64)
    lo, hi = ras_bounds(vol_affine, volume.shape)
    if center_ras is None:
        center = grid_center(vol_affine, volume.shape)
    else:
        center = np.asarray(center_ras, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(center)):
            raise MimError(f"The centre {center.tolist()} is not a finite RAS position.")
        idx = (np.linalg.inv(vol_affine) @ np.append(center, 1.0))[:3]
        if np.any(idx < -0.5) or np.any(idx > np.asarray(volume.shape) - 0.5):
            raise MimError(
                f"The centre {_fmt(center)} (RAS mm) lies outside the volume {volume.source or ''}, whose "
                f"RAS bounding box is x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, "
                f"z {lo[2]:.1f}..{hi[2]:.1f} mm. Pass a --center inside it (the coordinates 3D Slicer "
                f"shows, in RAS), e.g. the volume's centre {_fmt(grid_center(vol_affine, volume.shape))}.")

    # crop_size 1: no padding by the pipeline, so `image` is the preprocessed volume itself
    data = deterministic_transforms(1, prep)({"image": volume})
    image = data["image"]
    grid_affine = np.asarray(image.affine, dtype=np.float64)
    shape = np.asarray(image.shape[1:])
    c_idx = (np.linalg.inv(np.asarray(image.affine, dtype=np.float64)) @ np.append(center, 1.0))[:3]
    start = np.floor(c_idx - (crop_size - 1) / 2 + 0.5).astype(int)
    end = start + crop_size
    before, after = np.maximum(-start, 0), np.maximum(end - shape, 0)
    if np.any(before) or np.any(after):
        border = [int(v) for pair in zip(before, after) for v in pair]
        data = BorderPadd(keys="image", spatial_border=border, mode="constant", value=0.0)(data)
        start, end = start + before, end + before
    data = SpatialCropd(keys="image", roi_start=start.tolist(), roi_end=end.tolist())(data)
    crop = data["image"]
    if tuple(crop.shape[1:]) != (crop_size,) * 3:  # cannot happen: padded above
        raise MimError(f"internal error: crop of shape {tuple(crop.shape)} instead of {crop_size}^3")
    affine = np.asarray(crop.affine, dtype=np.float64)
    inside = _inside_fraction(affine, crop_size, grid_affine, tuple(shape))
    if inside <= 0:
        raise MimError(
            f"The {crop_size}^3 crop around {_fmt(center)} (RAS mm) holds no voxel of the volume once preprocessed "
            f"(orientation {prep.orientation}, spacing {'native' if prep.spacing is None else prep.spacing}"
            f"{', cropped to its foreground' if prep.crop_foreground else ''}): it would be all padding, nothing "
            f"to reconstruct. Pass a --center inside the patient, e.g. the volume's centre "
            f"{_fmt(grid_center(vol_affine, volume.shape))}.")
    return Crop(crop.as_tensor().float().contiguous(), affine, grid_center(affine, (crop_size,) * 3),
                1.0 - inside, (lo, hi), grid_affine, tuple(int(n) for n in shape))
