"""Fine-tuning data: labelled cases, their preprocessing and MiM's augmentations.

Pipeline (MONAI dictionary transforms), per METHODS.md "Fine-tuning as published":

- cached, once per case: load image + label, remap the labels to the model's label set,
  orient both to RAS *together*, resample to the model's spacing (bilinear / nearest),
  clip + scale the HU window to [0, 1], pad to at least one window;
- random, per sample: positive/negative-balanced crops of the network's input size
  (``RandCropByPosNegLabeld``, pos = neg = 1), flips along each axis (p = 0.1 each), 90°
  rotations (p = 0.1), intensity shift by up to ±0.1 (p = 0.5) — the SwinUNETR / MiM
  BTCV recipe.

Random draws are a pure function of (seed, position in the sample stream) as in
pre-training, so a resumed run sees exactly the crops it would have seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import (Compose, EnsureTyped, Orientationd, RandCropByPosNegLabeld, RandFlipd,
                              RandRotate90d, RandShiftIntensityd, ScaleIntensityRanged, Spacingd, SpatialPadd)
from torch.utils.data import Dataset

from mimcore.data.datalist import datalist_entries, read_datalist, volumes_from_folder
from mimcore.data.labels import RemapLabelsd, labels_from_json
from mimcore.data.preprocess import Preprocessing
from mimcore.data.transforms import LoadVolumed
from mimcore.data.volume_io import volume_stem
from mimcore.errors import MimError, user_error_in

KEYS = ("image", "label")


def case_transforms(mapping: dict[int, int], prep: "dict | Preprocessing", roi: int) -> Compose:
    """{"image": path, "label": path} -> image (1, X, Y, Z) float in [0, 1], label (1, X, Y, Z)
    with values 0..n, at the spacing of ``prep`` (a :class:`Preprocessing` or its dict) in RAS,
    every side >= ``roi``."""
    prep = Preprocessing.from_dict(prep)
    if prep.spacing is None:
        raise MimError("fine-tuning resamples every case to the model's spacing; give --spacing X Y Z (mm)")
    return Compose([
        LoadVolumed(keys=KEYS),
        RemapLabelsd(keys="label", mapping=mapping),
        Orientationd(keys=KEYS, axcodes=prep.orientation, labels=None),
        Spacingd(keys=KEYS, pixdim=prep.spacing, mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=prep.hu_min, a_max=prep.hu_max, b_min=0.0, b_max=1.0,
                             clip=True),
        SpatialPadd(keys=KEYS, spatial_size=(roi,) * 3, mode="constant", value=0),
        EnsureTyped(keys="image", dtype=torch.float32),
        EnsureTyped(keys="label", dtype=torch.float32),
    ])


def augmentations(roi: int, samples_per_case: int) -> Compose:
    """The random part: crops (list of ``samples_per_case`` dicts) and MiM's augmentations."""
    return Compose([
        RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=(roi,) * 3, pos=1, neg=1,
                               num_samples=samples_per_case, image_key="image", image_threshold=0),
        RandFlipd(keys=KEYS, prob=0.1, spatial_axis=0),
        RandFlipd(keys=KEYS, prob=0.1, spatial_axis=1),
        RandFlipd(keys=KEYS, prob=0.1, spatial_axis=2),
        RandRotate90d(keys=KEYS, prob=0.1, max_k=3),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
    ])


def cached_cases(cases: list[dict], mapping: dict[int, int], prep: dict, roi: int) -> CacheDataset:
    """Preprocessed cases held in memory (MONAI ``CacheDataset``), clear errors for bad files."""
    try:
        return CacheDataset([{k: c[k] for k in KEYS} for c in cases], transform=case_transforms(mapping, prep, roi),
                            cache_rate=1.0, num_workers=None, progress=False)
    except Exception as err:  # MONAI wraps our clear messages into RuntimeErrors
        user = user_error_in(err)
        if user is None:
            raise
        raise MimError(str(user)) from None


class LabelledCrops(Dataset):
    """Item ``(index, seed)`` -> (image (n, 1, R, R, R), label (n, 1, R, R, R)): ``n`` random
    crops of cached case ``index`` drawn from ``seed``."""

    def __init__(self, cache: CacheDataset, roi: int, samples_per_case: int):
        self.cache, self.aug = cache, augmentations(roi, samples_per_case)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        self.aug.set_random_state(seed=seed)
        crops = self.aug(self.cache[index])
        image = torch.stack([torch.as_tensor(c["image"]).float() for c in crops])
        label = torch.stack([torch.as_tensor(c["label"]).float() for c in crops])
        return image, label


def collate_crops(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the crops of several cases: -> (B*n, 1, R, R, R) twice."""
    return torch.cat([b[0] for b in batch]), torch.cat([b[1] for b in batch])


def find_cases(datalist: str | None, image_dir: str | None, label_dir: str | None,
               section: str = "training") -> list[dict]:
    """``[{"image": path, "label": path}, ...]`` from a datalist section or two folders
    (images and label maps paired by file name)."""
    if datalist:
        if image_dir or label_dir:
            raise MimError("give either --datalist or --images/--labels folders, not both")
        data = read_datalist(datalist)
        if not data.get(section):
            return []
        entries = datalist_entries(datalist, section)
        missing = [e.get("image") for e in entries if not e.get("label")]
        if missing:
            raise MimError(f"{len(missing)} case(s) in '{section}' of {datalist} have no 'label' "
                           f"(e.g. {missing[0]}); fine-tuning needs a label map for every image")
        return entries
    if not (image_dir and label_dir):
        raise MimError("give the training data: --datalist FILE, or --images FOLDER and --labels FOLDER")
    images, labels = volumes_from_folder(image_dir), volumes_from_folder(label_dir)
    by_name = {_case_name(p): p for p in labels}
    cases, unpaired = [], []
    for img in images:
        lab = by_name.get(_case_name(img))
        (cases.append({"image": str(img), "label": str(lab)}) if lab else unpaired.append(img.name))
    if unpaired:
        raise MimError(f"no label map for {len(unpaired)} image(s) in {label_dir} (e.g. {unpaired[0]}): "
                       "label files must have the same name as their image (suffixes like _0000 or _seg aside)")
    return cases


def _case_name(path: Path) -> str:
    name = volume_stem(path.name, seg=True)
    for tail in ("_0000", "_seg", "_label", "_labels", "_ct", "_image"):
        if name.endswith(tail):
            name = name[: -len(tail)]
    return name


def label_table(datalist: str | None, names_flag: str | None) -> tuple[dict[int, str], dict[int, tuple]]:
    """The label map's classes as ``({value: name}, {value: (r, g, b)})``, the second only for
    the values given a colour. ``--label-names`` ("1:liver,2:spleen" or a JSON file) wins
    over the datalist's ``labels`` section. Either JSON form may be ``{"1": "liver", ...}``
    or ``[{"value": 1, "name": "liver", "color": [r, g, b]}, ...]`` (a colour, 0-255, is
    optional per entry); value 0 (background) is ignored."""
    import json

    if names_flag:
        p = Path(names_flag)
        if p.is_file():
            raw = json.loads(p.read_text(encoding="utf-8"))
            raw = raw.get("labels", raw) if isinstance(raw, dict) else raw
        else:
            try:
                raw = dict(item.split(":", 1) for item in names_flag.split(","))
            except ValueError:
                raise MimError(f"--label-names {names_flag!r}: write value:name pairs like 1:liver,2:spleen "
                               "or give a JSON file") from None
        source = f"--label-names {names_flag}"
    elif datalist:
        raw = read_datalist(datalist).get("labels", {})
        source = f"the 'labels' of {datalist}"
    else:
        return {}, {}

    def is_background(value) -> bool:
        return str(value).strip() == "0"

    if isinstance(raw, dict):
        if any(not str(k).strip().lstrip("-").isdigit() for k in raw):
            raise MimError(f"label names must map integer values to names, got {list(raw)[:4]}")
        raw = {str(int(k)): str(v) for k, v in raw.items() if not is_background(k)}
    elif isinstance(raw, list):
        raw = [d for d in raw if not (isinstance(d, dict) and is_background(d.get("value")))]
    labels = labels_from_json(raw, source)
    given = set() if isinstance(raw, dict) else {int(d["value"]) for d in raw if d.get("color") is not None}
    colors = {lab.value: lab.color for lab in labels if lab.value in given}
    return {lab.value: lab.name for lab in labels}, colors


def foreground_fraction(cache: CacheDataset) -> float:
    """Share of labelled voxels over the cached cases (a sanity check for empty label maps)."""
    fg = sum(float((np.asarray(cache[i]["label"]) > 0).mean()) for i in range(len(cache)))
    return fg / max(1, len(cache))
