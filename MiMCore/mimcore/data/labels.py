"""Segmentation labels: names and colours, the user's choice of a label subset, and remapping.

* :class:`Label` is one class of a label map (``value`` > 0, ``name``, ``color`` 0-255),
  stored in JSON as ``{"value": 1, "name": "liver", "color": [r, g, b]}``.
* :func:`default_color` gives anatomical colours for the common CT organ names (the
  names follow TotalSegmentator's, e.g. ``kidney_left``, ``vertebrae_L1``) and a
  deterministic, well-spread colour for any other value.
* :func:`parse_label_selection` turns ``"liver,spleen"``, ``"5,1,2"`` or ``"5:1,1:2,2:2"``
  into an ``{old value: new value}`` mapping; :func:`remap_array` applies it to an
  integer label map with a lookup table; :class:`RemapLabelsd` does the same inside a
  MONAI ``Compose`` pipeline.
* :func:`load_labels` reads the labels a user names on the command line: a model
  bundle folder (``model.json``), a labels JSON file, or ``"1:liver,2:spleen"``.
"""

from __future__ import annotations

import colorsys
import difflib
import json
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type
from scipy import ndimage

from mimcore.errors import MimError

MAX_LABEL_VALUE = 65535  # label maps are written as uint8 or uint16

# Colours close to 3D Slicer's "GenericAnatomyColors" for the structures a CT
# segmentation model commonly has, keyed by the base name (no _left/_right suffix).
_ANATOMY_COLORS: dict[str, tuple[int, int, int]] = {
    "liver": (221, 130, 101),
    "spleen": (157, 108, 162),
    "kidney": (185, 102, 83),
    "kidney_cyst": (205, 205, 100),
    "pancreas": (249, 180, 111),
    "stomach": (216, 132, 105),
    "gallbladder": (139, 150, 98),
    "aorta": (224, 97, 76),
    "inferior_vena_cava": (0, 151, 206),
    "superior_vena_cava": (0, 141, 196),
    "portal_vein_and_splenic_vein": (0, 122, 171),
    "portal_vein": (0, 122, 171),
    "pulmonary_vein": (0, 151, 206),
    "pulmonary_artery": (0, 122, 171),
    "brachiocephalic_trunk": (196, 121, 79),
    "brachiocephalic_vein": (0, 161, 196),
    "subclavian_artery": (216, 101, 79),
    "common_carotid_artery": (216, 101, 79),
    "iliac_artery": (216, 101, 79),
    "iliac_vena": (0, 151, 206),
    "atrial_appendage": (206, 110, 84),
    "heart": (206, 110, 84),
    "lung": (197, 165, 145),
    "trachea": (182, 228, 255),
    "esophagus": (211, 171, 143),
    "thyroid_gland": (220, 160, 30),
    "duodenum": (255, 253, 229),
    "small_bowel": (205, 167, 142),
    "colon": (204, 142, 178),
    "urinary_bladder": (222, 154, 132),
    "prostate": (230, 158, 140),
    "adrenal_gland": (244, 214, 49),
    "spinal_cord": (244, 214, 49),
    "brain": (250, 250, 225),
    "skull": (241, 213, 144),
    "sacrum": (241, 214, 145),
    "vertebrae": (241, 214, 145),
    "rib": (253, 232, 158),
    "sternum": (244, 217, 154),
    "costal_cartilages": (111, 184, 210),
    "clavicula": (205, 179, 108),
    "scapula": (212, 188, 102),
    "humerus": (214, 194, 120),
    "femur": (255, 237, 145),
    "hip": (230, 220, 160),
    "bone": (241, 214, 145),
    "bones": (241, 214, 145),
    "gluteus_maximus": (192, 104, 88),
    "gluteus_medius": (188, 95, 76),
    "gluteus_minimus": (184, 87, 67),
    "autochthon": (177, 122, 101),
    "iliopsoas": (171, 85, 68),
    "muscle": (192, 104, 88),
    "fat": (230, 220, 70),
    "body": (177, 122, 101),
    "skin": (177, 124, 92),
    "tumor": (255, 0, 0),
    "lesion": (255, 0, 0),
}
_LUNG_LOBES = {  # distinct shades of the lung colour, so neighbouring lobes stay apart
    "lung_upper_lobe": (197, 165, 145),
    "lung_middle_lobe": (172, 138, 115),
    "lung_lower_lobe": (220, 190, 170),
}
_SIDE = re.compile(r"_(left|right)(?=$|_)")
_NUMBERED = re.compile(r"^(vertebrae|rib)_(?:(left|right)_)?([a-z]*)(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Label:
    """One class of a label map: voxels equal to ``value`` (> 0) belong to ``name``."""

    value: int
    name: str
    color: tuple[int, int, int]

    def __post_init__(self):
        if isinstance(self.value, bool) or not isinstance(self.value, (int, np.integer)) \
                or not 0 < int(self.value) <= MAX_LABEL_VALUE:
            raise MimError(f"Label value {self.value!r} for {self.name!r} must be an integer "
                           f"from 1 to {MAX_LABEL_VALUE} (0 is the background).")
        if not isinstance(self.name, str) or not self.name.strip():
            raise MimError(f"Label {self.value} needs a non-empty name, got {self.name!r}.")
        color = tuple(self.color) if self.color is not None else ()
        if len(color) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in color):
            raise MimError(f"Label {self.name!r}: color must be three integers 0-255, got {self.color!r}.")
        object.__setattr__(self, "value", int(self.value))
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "color", tuple(int(c) for c in color))

    def to_dict(self) -> dict:
        """``{"value": 1, "name": "liver", "color": [r, g, b]}``."""
        return {"value": self.value, "name": self.name, "color": list(self.color)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Label:
        """A Label from ``{"value", "name"[, "color"]}`` (a missing colour gets :func:`default_color`)."""
        if not isinstance(d, Mapping) or "value" not in d:
            raise MimError(f"A label must be an object like {{\"value\": 1, \"name\": \"liver\", "
                           f"\"color\": [221, 130, 101]}}, got {d!r}.")
        value = d["value"]
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        name = d.get("name") or f"label_{value}"
        color = d.get("color")
        if color is None:
            color = default_color(name, value if isinstance(value, int) else 0)
        return cls(value, name, tuple(color) if isinstance(color, (list, tuple)) else color)


def _distinct_color(value: int) -> tuple[int, int, int]:
    """A saturated colour whose hue steps by the golden ratio: neighbouring values differ clearly."""
    hue = (int(value) * 0.618033988749895) % 1.0
    sat = 0.55 + 0.25 * ((int(value) * 7) % 3) / 2
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.92)
    return (round(r * 255), round(g * 255), round(b * 255))


def _shade(color: tuple[int, int, int], index: int) -> tuple[int, int, int]:
    """``color`` made a little lighter or darker by ``index`` (cycle of 5), for numbered bones."""
    factor = (0.82, 1.0, 0.9, 1.08, 0.74)[index % 5]
    return tuple(int(min(255, round(c * factor))) for c in color)


def default_color(name: str, value: int) -> tuple[int, int, int]:
    """An RGB colour (0-255) for a class: anatomical for known organ names, else distinct by value.

    Known names follow TotalSegmentator's (``liver``, ``kidney_left``, ``lung_upper_lobe_right``,
    ``vertebrae_L1``, ``rib_left_3`` ...); case and spaces are ignored ("Kidney left" works).
    Numbered bones (vertebrae, ribs) alternate in shade so that neighbours can be told apart.
    """
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    if key in _ANATOMY_COLORS:
        return _ANATOMY_COLORS[key]
    numbered = _NUMBERED.match(key)
    if numbered:
        return _shade(_ANATOMY_COLORS[numbered.group(1).lower()], int(numbered.group(4)))
    base = _SIDE.sub("", key)
    for lobe, color in _LUNG_LOBES.items():
        if base.startswith(lobe):
            return color
    if base in _ANATOMY_COLORS:
        return _ANATOMY_COLORS[base]
    for organ in sorted(_ANATOMY_COLORS, key=len, reverse=True):  # "left_kidney", "liver_tumor"
        if re.search(rf"(^|_){re.escape(organ)}($|_)", base):
            return _ANATOMY_COLORS[organ]
    return _distinct_color(value)


def labels_from_names(names: Mapping[int, str] | list[str] | tuple[str, ...]) -> list[Label]:
    """Labels with default colours from ``{value: name}`` or a list of names (values 1..n).

    Sorted by value; raises MimError for value 0/negative or a repeated name.
    """
    if isinstance(names, Mapping):
        items = []
        for value, name in names.items():
            try:
                items.append((int(value), str(name)))
            except (TypeError, ValueError):
                raise MimError(f"Label value {value!r} (for {name!r}) is not an integer.") from None
    else:
        items = [(i, str(name)) for i, name in enumerate(names, start=1)]
    seen: dict[str, int] = {}
    for value, name in items:
        if name in seen:
            raise MimError(f"Label name {name!r} is used for both {seen[name]} and {value}; names must be unique.")
        seen[name] = value
    return [Label(value, name, default_color(name, value)) for value, name in sorted(items)]


def _listing(available: Mapping[int, str], limit: int = 40) -> str:
    parts = [f"{v}:{n}" for v, n in sorted(available.items())]
    more = f" ... ({len(parts) - limit} more)" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def _resolve(token: str, available: Mapping[int, str], spec: str) -> int:
    """The label value a token (a name or a value) names in ``available``."""
    if re.fullmatch(r"[+-]?\d+", token):
        value = int(token)
        if value not in available:
            raise MimError(f"Label value {value} in {spec!r} is not one of the available labels "
                           f"({_listing(available)}).")
        return value
    by_name = {name: value for value, name in available.items()}
    if token in by_name:
        return by_name[token]
    folded = {name.lower(): value for name, value in by_name.items()}
    if token.lower() in folded:
        return folded[token.lower()]
    close = difflib.get_close_matches(token, list(by_name), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise MimError(f"Unknown label name {token!r} in {spec!r}.{hint} Available labels: {_listing(available)}.")


def parse_label_selection(spec: str, available: Mapping[int, str]) -> dict[int, int]:
    """The ``{old value: new value}`` mapping a user's label selection asks for.

    ``spec`` is one of:

    * ``"liver,spleen,kidney_left"``: these labels (names or values, case-insensitive
      names), renumbered 1..n in the order given;
    * ``"5,1,2"``: the same by value;
    * ``"5:1,1:2,2:2"`` (or ``"liver:1,..."``): explicit old:new pairs; several old
      labels may merge into one new value. New values run from 1 to 65535.

    ``available`` is ``{value: name}`` of the labels there are. Labels left out map to 0
    (background). Raises MimError for unknown names/values (with close matches and the
    list of available labels), a label given twice, or a mix of both forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise MimError(f"The label selection is empty. Give names or values, e.g. "
                       f"'liver,spleen' or '5:1,1:2'. Available labels: {_listing(available)}.")
    available = {int(v): str(n) for v, n in available.items()}
    tokens = [t.strip() for t in spec.split(",")]
    if any(not t for t in tokens):
        raise MimError(f"The label selection {spec!r} has an empty entry (two commas in a row or a trailing comma).")
    explicit = [":" in t for t in tokens]
    if any(explicit) and not all(explicit):
        raise MimError(f"The label selection {spec!r} mixes 'old:new' pairs with plain labels; "
                       "use either 'liver,spleen' or 'liver:1,spleen:2'.")
    mapping: dict[int, int] = {}
    for position, token in enumerate(tokens, start=1):
        if ":" in token:
            old_token, _, new_token = (part.strip() for part in token.partition(":"))
            if not re.fullmatch(r"\d+", new_token) or not 1 <= int(new_token) <= MAX_LABEL_VALUE:
                raise MimError(f"In {token!r} of {spec!r}, the new value {new_token!r} must be an integer "
                               f"from 1 to {MAX_LABEL_VALUE}.")
            old, new = _resolve(old_token, available, spec), int(new_token)
        else:
            old, new = _resolve(token, available, spec), position
        if old in mapping:
            raise MimError(f"Label {old} ({available[old]}) is given twice in {spec!r}.")
        mapping[old] = new
    return mapping


def _check_mapping(mapping: Mapping[int, int]) -> dict[int, int]:
    out = {}
    for old, new in mapping.items():
        old, new = int(old), int(new)
        if old < 0 or not 0 <= new <= MAX_LABEL_VALUE:
            raise MimError(f"Cannot remap {old} -> {new}: old values must be >= 0 and new values "
                           f"0..{MAX_LABEL_VALUE}.")
        out[old] = new
    return out


def to_label_array(array) -> np.ndarray:
    """``array`` (any shape; numpy or torch; integer, bool, or float holding whole numbers as
    :func:`~mimcore.data.volume_io.load_volume` returns) as ``uint8`` or ``uint16`` labels.

    Raises MimError for non-integer, negative or NaN values and values above 65535: such
    an array is an image or a probability map, not a label map.
    """
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.size == 0:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        ints = array
    else:
        with np.errstate(invalid="ignore"):  # NaN / huge values turn into garbage, caught just below
            ints = array.astype(np.int32)
        if not np.array_equal(ints, array):
            raise MimError("The label map holds non-integer values; it must be a label map (one whole "
                           "number per voxel), not an image or a probability map.")
    low, high = int(ints.min()), int(ints.max())
    if low < 0:
        raise MimError(f"The label map holds negative values (min {low}); labels must be >= 0.")
    if high > MAX_LABEL_VALUE:
        raise MimError(f"The label map holds values up to {high}; mimcore supports label values up to "
                       f"{MAX_LABEL_VALUE}. Is this an image rather than a label map?")
    dtype = np.uint8 if high <= 255 else np.uint16
    return ints.astype(dtype, copy=False)


def present_values(labels) -> list[int]:
    """The non-zero values that occur in a label map (any shape), ascending.

    One pass of ``scipy.ndimage.find_objects`` (0.4 s for 512x512x400; ``np.unique`` and
    ``np.bincount`` are several times slower on such arrays).
    """
    labels = to_label_array(labels)
    if labels.size == 0:
        return []
    return [i + 1 for i, box in enumerate(ndimage.find_objects(labels)) if box is not None]


def remap_array(labels: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Map label values through ``mapping`` (``{old: new}``); values not in it become 0.

    ``labels``: a label map of any shape (see :func:`to_label_array` for what is accepted).
    Returns an array of the same shape, ``uint8`` when every new value fits, else
    ``uint16``. Uses one lookup table: a 512x512x400 map takes about 0.3 s.
    """
    mapping = _check_mapping(mapping)
    labels = to_label_array(labels)
    out_dtype = np.uint8 if max(mapping.values(), default=0) <= 255 else np.uint16
    lut = np.zeros(np.iinfo(labels.dtype).max + 1, dtype=out_dtype)
    for old, new in mapping.items():
        if old < lut.size:
            lut[old] = new
    return lut[labels]


class RemapLabelsd(MapTransform):
    """MONAI dictionary transform: remap the label maps under ``keys`` with ``{old: new}``.

    Works on numpy arrays, torch tensors and MetaTensors of any shape (e.g. ``(1, X, Y, Z)``)
    and keeps a MetaTensor's affine and metadata. Values not in ``mapping`` become 0. A
    numpy input gives ``uint8``/``uint16``; a tensor keeps its dtype when that holds every
    new value (float, or an integer type wide enough), else becomes ``int32``.
    """

    def __init__(self, keys: KeysCollection, mapping: Mapping[int, int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mapping = _check_mapping(mapping)
        self._top = max(self.mapping.values(), default=0)

    def _tensor_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype.is_floating_point:
            return dtype
        if dtype == torch.bool or (dtype == torch.uint8 and self._top > 255) or \
                (dtype == torch.int8 and self._top > 127) or (dtype == torch.int16 and self._top > 32767):
            return torch.int32
        return dtype

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if isinstance(img, torch.Tensor):
                remapped = remap_array(img.detach().cpu().numpy(), self.mapping)
                d[key] = convert_to_dst_type(remapped, img, dtype=self._tensor_dtype(img.dtype))[0]
            else:
                d[key] = remap_array(np.asarray(img), self.mapping)
        return d


def labels_from_json(obj, source: str = "the labels") -> list[Label]:
    """Labels from parsed JSON: ``[{"value", "name", "color"}, ...]``, ``{"1": "liver", ...}``,
    or either of them under a ``"labels"`` key (a model bundle's ``model.json``)."""
    if isinstance(obj, Mapping) and "labels" in obj:
        obj = obj["labels"]
    if isinstance(obj, Mapping):
        labels = labels_from_names(obj)
    elif isinstance(obj, list) and all(isinstance(item, Mapping) for item in obj):
        labels = sorted((Label.from_dict(item) for item in obj), key=lambda label: label.value)
    else:
        raise MimError(f"{source} must hold a list like [{{\"value\": 1, \"name\": \"liver\", \"color\": "
                       "[221, 130, 101]}] or an object like {\"1\": \"liver\"} (optionally under \"labels\").")
    values = [label.value for label in labels]
    if len(set(values)) != len(values):
        raise MimError(f"{source} gives label value(s) {sorted({v for v in values if values.count(v) > 1})} "
                       "more than once.")
    return labels


def load_labels(spec: str) -> list[Label]:
    """Labels from what a user passes on the command line, sorted by value.

    ``spec`` is a model bundle folder (its ``model.json`` ``labels``), a JSON file (see
    :func:`labels_from_json`), or inline ``"1:liver,2:spleen"`` (default colours).
    """
    text = str(spec).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model.json").is_file():
            raise MimError(f"{path} is a folder without model.json; pass a model bundle folder, a labels "
                           "JSON file, or labels like '1:liver,2:spleen'.")
        path = path / "model.json"
    if path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MimError(f"Could not read labels from {path}: {err}. It must be a JSON file.") from None
        if path.name == "model.json" and not (isinstance(obj, Mapping) and "labels" in obj):
            raise MimError(f"{path} has no \"labels\" entry; it is not a segmentation model bundle.")
        return labels_from_json(obj, str(path))
    if text.lower().endswith(".json") or "/" in text or not text:
        raise MimError(f"No such labels file or model bundle: {text!r}. Pass a model bundle folder, a labels "
                       "JSON file, or labels like '1:liver,2:spleen'.")
    names: dict[int, str] = {}
    for token in (t.strip() for t in text.split(",")):
        value, sep, name = (part.strip() for part in token.partition(":"))
        if not sep or not re.fullmatch(r"\d+", value) or not name:
            raise MimError(f"Cannot read {token!r} in the labels {text!r}: write value:name pairs like "
                           "'1:liver,2:spleen', or pass a labels JSON file or a model bundle folder.")
        if int(value) in names:
            raise MimError(f"Label value {value} is given twice in {text!r}.")
        names[int(value)] = name
    return labels_from_names(names)
