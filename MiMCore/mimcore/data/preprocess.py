"""CT preprocessing for pre-training (METHODS.md, "Optimisation and data"):
orientation RAS, optional resampling, clip HU to a window scaled to [0, 1], optionally
crop to the foreground, pad to the crop size, random crop; no augmentation. Built from
MONAI dictionary transforms.

MiM and GMIM are published without resampling or foreground cropping; the MAE/SimMIM
BTCV recipe resamples to 1.5 x 1.5 x 2 mm first (``spacing=(1.5, 1.5, 2.0)``) and crops
to the foreground (``crop_foreground=True``) before the random crops.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from monai.transforms import (Compose, CropForegroundd, EnsureTyped, Orientationd, RandSpatialCropd,
                              ScaleIntensityRanged, Spacingd, SpatialPadd)

from mimcore.data.transforms import LoadVolumed
from mimcore.errors import MimError


def positive_spacing(values) -> tuple[float, float, float] | None:
    """Three finite positive voxel sizes (mm) as floats, or None when ``values`` are not that:
    the one check behind every command's ``--spacing`` and :class:`Preprocessing`."""
    try:
        spacing = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return spacing if len(spacing) == 3 and all(0 < v < float("inf") for v in spacing) else None


def parse_spacing_option(values, words: tuple[str, ...] = ("native",)) -> str | tuple[float, float, float]:
    """A ``--spacing`` option's values: one of ``words`` (lower case) or three sizes in mm
    (MimError otherwise, naming the choices)."""
    values = [values] if isinstance(values, str) else list(values)
    given = [str(v).lower() for v in values]
    if len(given) == 1 and given[0] in words:
        return given[0]
    spacing = positive_spacing(values)
    if spacing is None:
        choices = " nor ".join(f"'{w}'" for w in words)
        raise MimError(f"--spacing {' '.join(map(str, values))} is neither three positive sizes in mm "
                       f"(e.g. --spacing 1.5 1.5 2) nor {choices}")
    return spacing


@dataclass(frozen=True)
class Preprocessing:
    """Intensity window (HU) mapped to [0, 1], the orientation every volume is put in,
    the voxel size (mm, along the oriented axes) it is resampled to (None: kept) and
    whether it is cropped to its foreground (voxels above the window's lower end)."""

    hu_min: float = -1000.0
    hu_max: float = 1000.0
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    crop_foreground: bool = False

    def __post_init__(self):
        if self.hu_max <= self.hu_min:
            raise MimError(f"the HU window [{self.hu_min:g}, {self.hu_max:g}] is empty; give MIN < MAX "
                           "(e.g. --hu-window -1000 1000)")
        if self.spacing is not None:
            spacing = positive_spacing(self.spacing)
            if spacing is None:
                raise MimError(f"spacing {self.spacing!r} is not three positive sizes in mm; "
                               "give e.g. --spacing 1.5 1.5 2")
            object.__setattr__(self, "spacing", spacing)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["spacing"] is not None:
            d["spacing"] = list(d["spacing"])
        return d

    @classmethod
    def from_dict(cls, d: "dict | Preprocessing") -> "Preprocessing":
        """The description a checkpoint or a model bundle's ``preprocessing`` holds (keys
        not named by a field are ignored; a missing ``orientation`` is RAS). Validated."""
        if isinstance(d, Preprocessing):
            return d
        missing = [k for k in ("hu_min", "hu_max") if d.get(k) is None]
        if missing:
            raise MimError(f"preprocessing {d!r} lacks {', '.join(missing)} (the HU window in HU); the model or "
                           "checkpoint is incomplete: re-export it, or fine-tune again")
        spacing = d.get("spacing")
        return cls(hu_min=float(d["hu_min"]), hu_max=float(d["hu_max"]), orientation=d.get("orientation") or "RAS",
                   spacing=tuple(spacing) if spacing else None, crop_foreground=bool(d.get("crop_foreground")))


def deterministic_transforms(crop_size: int, prep: Preprocessing = Preprocessing()) -> Compose:
    """{"image": path} -> {"image": MetaTensor (1, X', Y', Z') in [0, 1], every side >= crop_size}.

    With ``prep.spacing`` the volume is resampled (trilinear, on the oriented grid) first;
    with ``prep.crop_foreground`` the windowed volume is cut to the box of its voxels > 0
    (MONAI ``CropForegroundd``, as the MAE/SimMIM BTCV recipe). Padding uses 0, i.e. air at
    the lower end of the window. The MetaTensor's affine follows every step, so a crop can
    be placed back in the patient.
    """
    resample = [Spacingd(keys="image", pixdim=prep.spacing, mode="bilinear")] if prep.spacing else []
    foreground = [CropForegroundd(keys="image", source_key="image", allow_smaller=True)] \
        if prep.crop_foreground else []
    return Compose([
        LoadVolumed(keys="image"),
        Orientationd(keys="image", axcodes=prep.orientation, labels=None),
        *resample,
        ScaleIntensityRanged(keys="image", a_min=prep.hu_min, a_max=prep.hu_max, b_min=0.0, b_max=1.0, clip=True),
        *foreground,
        SpatialPadd(keys="image", spatial_size=(crop_size,) * 3, mode="constant", value=0.0),
        EnsureTyped(keys="image", dtype="float32"),
    ])


def random_crop(crop_size: int) -> RandSpatialCropd:
    """A (1, crop, crop, crop) crop at a uniformly random position."""
    return RandSpatialCropd(keys="image", roi_size=(crop_size,) * 3, random_size=False)
