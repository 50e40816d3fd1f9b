"""CT preprocessing for MiM pre-training (methods.md, "Optimisation and data"):
orientation RAS, clip HU to [-1000, 1000] scaled to [0, 1], pad to the crop size,
random crop; no resampling, no augmentation. Built from MONAI dictionary transforms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from monai.transforms import Compose, EnsureTyped, Orientationd, RandSpatialCropd, ScaleIntensityRanged, SpatialPadd

from mimcore.data.transforms import LoadVolumed


@dataclass(frozen=True)
class Preprocessing:
    """Intensity window (HU) mapped to [0, 1] and the orientation every volume is put in."""

    hu_min: float = -1000.0
    hu_max: float = 1000.0
    orientation: str = "RAS"

    def to_dict(self) -> dict:
        return asdict(self)


def deterministic_transforms(crop_size: int, prep: Preprocessing = Preprocessing()) -> Compose:
    """{"image": path} -> {"image": MetaTensor (1, X', Y', Z') in [0, 1], every side >= crop_size}.

    Padding uses 0, i.e. air at the lower end of the window. The MetaTensor's affine
    follows every step, so a crop can be placed back in the patient.
    """
    return Compose([
        LoadVolumed(keys="image"),
        Orientationd(keys="image", axcodes=prep.orientation, labels=None),
        ScaleIntensityRanged(keys="image", a_min=prep.hu_min, a_max=prep.hu_max, b_min=0.0, b_max=1.0, clip=True),
        SpatialPadd(keys="image", spatial_size=(crop_size,) * 3, mode="constant", value=0.0),
        EnsureTyped(keys="image", dtype="float32"),
    ])


def random_crop(crop_size: int) -> RandSpatialCropd:
    """A (1, crop, crop, crop) crop at a uniformly random position."""
    return RandSpatialCropd(keys="image", roi_size=(crop_size,) * 3, random_size=False)
