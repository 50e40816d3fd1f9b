"""Bridges between :class:`~mimcore.data.volume_io.Volume` and MONAI.

A volume becomes a ``monai.data.MetaTensor`` of shape ``(1, X, Y, Z)`` (channel first)
whose ``affine`` is the RAS voxel->mm matrix, so MONAI's spatial transforms
(``Orientationd``, ``Spacingd``, ``SpatialPadd``, ``RandSpatialCropd``, ...) keep
tracking where every voxel is in the patient.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils.enums import MetaKeys, SpaceKeys

from mimcore.data.volume_io import Volume, load_volume
from mimcore.errors import MimError


def volume_to_metatensor(vol: Volume) -> MetaTensor:
    """``(1, X, Y, Z)`` float32 MetaTensor with ``affine`` (float64, RAS) and file metadata.

    The tensor shares memory with ``vol.array`` (no copy) when that is float32 and contiguous.
    """
    affine = torch.as_tensor(np.asarray(vol.affine, dtype=np.float64))
    meta = {
        "filename_or_obj": vol.source,
        MetaKeys.SPATIAL_SHAPE: np.asarray(vol.array.shape),
        MetaKeys.ORIGINAL_AFFINE: affine.clone(),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: "no_channel",
    }
    data = torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32))[None]
    return MetaTensor(data, affine=affine, meta=meta)


def metatensor_to_volume(tensor: torch.Tensor, affine=None, source: str = "") -> Volume:
    """Back from a ``(1, X, Y, Z)`` or ``(X, Y, Z)`` tensor to a Volume (float32, RAS affine).

    The affine is taken from the MetaTensor unless given explicitly.
    """
    if affine is None:
        if not isinstance(tensor, MetaTensor):
            raise MimError("A plain tensor has no geometry: pass its affine as well.")
        affine = tensor.affine
        source = source or str(tensor.meta.get("filename_or_obj", ""))
    array = tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise MimError(f"Expected a (1, X, Y, Z) or (X, Y, Z) tensor, got shape {tuple(array.shape)}.")
    affine = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=np.float64)
    return Volume(np.ascontiguousarray(array, dtype=np.float32), affine, source)


class LoadVolumed(MapTransform):
    """Dictionary transform: ``d[key]`` (a path, or a Volume) -> ``(1, X, Y, Z)`` MetaTensor.

    Paths may be volume files or DICOM series folders (see :func:`load_volume`).
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor):
                continue
            if isinstance(value, (str, os.PathLike)):
                value = load_volume(value)
            if not isinstance(value, Volume):
                raise MimError(f"LoadVolumed: '{key}' must be a path or a Volume, got {type(value).__name__}.")
            d[key] = volume_to_metatensor(value)
        return d
