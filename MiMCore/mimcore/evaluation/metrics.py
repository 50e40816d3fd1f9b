"""Per-class segmentation metrics (Dice, HD95 in mm, volumes) for label maps, and their summary.

Dice and the 95th-percentile Hausdorff distance come from MONAI (``compute_dice``,
``compute_hausdorff_distance`` with ``percentile=95`` and the voxel ``spacing``): HD95 is
the larger of the two directed 95th percentiles of the distances between the surface
voxels of prediction and reference, in millimetres.

Every (case, class) row says what happened in ``status``:

* ``"ok"``: the class is in both: Dice and HD95 are numbers.
* ``"absent_in_both"``: nothing to score; ``dice`` and ``hd95_mm`` are None and the row is
  left out of the means (and counted as excluded).
* ``"missing_in_prediction"``: in the reference only: Dice 0 (counted in the Dice mean);
  HD95 is undefined (infinite), reported as None and left out of the HD95 mean (counted).
* ``"false_positive"``: in the prediction only: Dice 0 (counted), HD95 None (counted as
  excluded).

Summaries never average NaNs silently: each mean comes with the number of cases it is
over and the number left out, by reason.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from mimcore.data.labels import Label, default_color, present_values, remap_array, to_label_array
from mimcore.data.volume_io import Volume, load_volume
from mimcore.errors import MimError

OK = "ok"
ABSENT_IN_BOTH = "absent_in_both"
MISSING_IN_PREDICTION = "missing_in_prediction"
FALSE_POSITIVE = "false_positive"
STATUSES = (OK, MISSING_IN_PREDICTION, FALSE_POSITIVE, ABSENT_IN_BOTH)

ROW_FIELDS = ("value", "name", "status", "dice", "hd95_mm", "pred_voxels", "ref_voxels",
              "pred_volume_ml", "ref_volume_ml")

# Grids closer than this are the same grid (NIfTI stores geometry as float32).
SPACING_TOL_MM = 1e-4
ORIGIN_TOL_MM = 1e-3
DIRECTION_TOL = 1e-4


def _box(box_a: tuple[slice, ...] | None, box_b: tuple[slice, ...] | None,
         shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The union of two bounding boxes grown by one voxel (so surface voxels stay surface voxels)."""
    boxes = [b for b in (box_a, box_b) if b is not None]
    return tuple(slice(max(0, min(b[d].start for b in boxes) - 1), min(shape[d], max(b[d].stop for b in boxes) + 1))
                 for d in range(len(shape)))


def _boxes(labels: np.ndarray) -> list[tuple[slice, ...] | None]:
    return ndimage.find_objects(labels) if labels.size else []


def _channel(mask: np.ndarray) -> torch.Tensor:
    """``(X, Y, Z)`` bool -> ``(1, 1, X, Y, Z)`` bool tensor, the one-hot layout MONAI's metrics take
    (bool: MONAI's Dice then counts voxels in int64, exact for any organ size)."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None, None]


def _float32_value(x: torch.Tensor) -> float:
    """A float32 result as the shortest decimal that is that float32 (1.6, not 1.600000023841858)."""
    return float(str(np.float32(x.item())))


def evaluate_case(pred, ref, spacing: Sequence[float], labels: Sequence[Label]) -> list[dict]:
    """Per-class metrics of one case.

    pred, ref: ``(X, Y, Z)`` integer label maps on the same grid (0 = background; whole-
               number floats are accepted).
    spacing:   ``(3,)`` voxel size in mm along X, Y, Z (for HD95 and volumes).
    labels:    the classes to score; each gives one row.
    Returns one dict per label with :data:`ROW_FIELDS`: ``dice`` and ``hd95_mm`` (float or
    None), ``status`` (see the module docstring), voxel counts and volumes in ml.
    """
    pred, ref = to_label_array(pred), to_label_array(ref)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise MimError(f"Prediction and reference must be (X, Y, Z) label maps of the same shape, got "
                       f"{pred.shape} and {ref.shape}.")
    spacing = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise MimError(f"The voxel spacing must be three positive numbers (mm), got {spacing.tolist()}.")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pred_boxes, ref_boxes = _boxes(pred), _boxes(ref)
    rows = []
    for label in labels:
        v = int(label.value)
        pred_box = pred_boxes[v - 1] if v <= len(pred_boxes) else None
        ref_box = ref_boxes[v - 1] if v <= len(ref_boxes) else None
        row = _absent_row(label)
        rows.append(row)
        if pred_box is None and ref_box is None:
            continue
        box = _box(pred_box, ref_box, pred.shape)
        pred_mask, ref_mask = pred[box] == v, ref[box] == v
        n_pred, n_ref = int(np.count_nonzero(pred_mask)), int(np.count_nonzero(ref_mask))
        row.update(pred_voxels=n_pred, ref_voxels=n_ref,  # volumes to 1 nanolitre
                   pred_volume_ml=round(n_pred * voxel_ml, 6), ref_volume_ml=round(n_ref * voxel_ml, 6))
        y_pred, y = _channel(pred_mask), _channel(ref_mask)
        dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
        row["dice"] = _float32_value(dice[0, 0])  # MONAI divides in float32
        if n_pred and n_ref:
            row["status"] = OK
            with warnings.catch_warnings():  # MONAI's own call of a deprecated argument of get_mask_edges
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
                hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                  spacing=spacing.tolist())
            row["hd95_mm"] = _float32_value(hd95[0, 0])  # MONAI computes distances in float32
        else:
            row["status"] = MISSING_IN_PREDICTION if n_ref else FALSE_POSITIVE
    return rows


def _stats(values: list[float]) -> dict:
    """Mean and (population) std of the values, with their count; None when there are none."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def summarize(rows: Sequence[dict], labels: Sequence[Label]) -> list[dict]:
    """Per-class summary over cases of the rows of :func:`evaluate_case` (all cases together).

    For each label: ``dice`` ``{mean, std, n, excluded}`` over the cases where it is
    defined (every status but ``absent_in_both``); ``hd95_mm`` ``{mean, std, n, excluded}``
    over ``ok`` cases only, ``excluded`` counting the others by status; ``status_counts``.
    ``std`` is the population standard deviation (ddof 0); means are None when n is 0.
    """
    summary = []
    for label in labels:
        mine = [r for r in rows if r["value"] == label.value]
        counts = {status: sum(r["status"] == status for r in mine) for status in STATUSES}
        dice = _stats([r["dice"] for r in mine if r["status"] != ABSENT_IN_BOTH])
        dice["excluded"] = {ABSENT_IN_BOTH: counts[ABSENT_IN_BOTH]}
        hd95 = _stats([r["hd95_mm"] for r in mine if r["status"] == OK])
        hd95["excluded"] = {s: counts[s] for s in STATUSES if s != OK}
        summary.append({"value": label.value, "name": label.name, "cases": len(mine), "dice": dice,
                        "hd95_mm": hd95, "status_counts": counts})
    return summary


@dataclass
class CaseResult:
    """The rows of one case and where its files are."""

    case_id: str
    prediction: str
    reference: str
    rows: list[dict]


@dataclass
class Evaluation:
    """What :func:`evaluate_files` found: labels scored, per-case rows, per-class summary, notes."""

    labels: list[Label]
    cases: list[CaseResult]
    summary: list[dict]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One flat dict per case x class: ``case_id`` then :data:`ROW_FIELDS`."""
        return [{"case_id": case.case_id, **row} for case in self.cases for row in case.rows]

    def to_dict(self) -> dict:
        """JSON-ready: labels, per case (files and per-class rows), summary, notes."""
        return {"labels": [label.to_dict() for label in self.labels],
                "cases": [{"case_id": c.case_id, "prediction": c.prediction, "reference": c.reference,
                           "classes": c.rows} for c in self.cases],
                "summary": self.summary,
                "notes": self.notes}


#: with --resample-ref, a case whose reference loses more than this fraction of its labelled
#: volume on the way to the prediction's grid gets a note (nearest neighbour alone changes
#: volumes by a few per cent)
LOST_VOLUME_NOTE = 0.05


def grid_differences(pred: Volume, ref: Volume) -> list[str]:
    """How two grids differ (empty when they are one grid: same shape, and spacing, origin and
    axis directions equal within float32-storage tolerance)."""
    problems = []
    if pred.shape != ref.shape:
        problems.append(f"shape {pred.shape} vs {ref.shape}")
    else:
        if not np.allclose(pred.spacing, ref.spacing, rtol=0, atol=SPACING_TOL_MM):
            problems.append(f"spacing {np.round(pred.spacing, 5).tolist()} vs {np.round(ref.spacing, 5).tolist()} mm")
        if not np.allclose(pred.origin_ras, ref.origin_ras, rtol=0, atol=ORIGIN_TOL_MM):
            problems.append(f"origin (RAS) {np.round(pred.origin_ras, 4).tolist()} vs "
                            f"{np.round(ref.origin_ras, 4).tolist()} mm")
        if not np.allclose(pred.direction_ras, ref.direction_ras, rtol=0, atol=DIRECTION_TOL):
            problems.append("axis directions differ (e.g. one is flipped, reoriented or oblique)")
    return problems


def check_same_grid(pred: Volume, ref: Volume) -> None:
    """Raise MimError (saying what differs and what to do) unless both volumes share one grid."""
    problems = grid_differences(pred, ref)
    if problems:
        raise MimError(f"Prediction {pred.source} and reference {ref.source} are not on the same voxel grid: "
                       f"{'; '.join(problems)}. Metrics need both on one grid: pass --resample-ref to move "
                       "the reference onto the prediction's grid (nearest neighbour, in world space), or "
                       "check that the files belong together.")


def reference_on_grid(ref: Volume, pred: Volume) -> tuple[Volume, float]:
    """``ref``'s labels on ``pred``'s grid (nearest neighbour in world space), and the
    fraction of the reference's labelled volume (mm³) that the move lost (outside the
    prediction's grid, or thin structures missed by a coarser grid; 0 when nothing was).
    Raises MimError when the reference has labels but none falls inside the prediction's grid."""
    from mimcore.data.regrid import labels_to_grid

    moved = labels_to_grid(ref.array, ref.affine, pred)
    before = float(np.count_nonzero(ref.array)) * float(np.prod(ref.spacing))
    after = float(np.count_nonzero(moved)) * float(np.prod(pred.spacing))
    if before > 0 and after == 0:
        raise MimError(f"The reference {ref.source} does not overlap the prediction {pred.source} in space: "
                       "none of its labelled voxels lies inside the prediction's grid. Check that the files "
                       "belong to the same image.")
    lost = max(0.0, 1.0 - after / before) if before > 0 else 0.0
    return Volume(moved, pred.affine.copy(), ref.source), lost


def _load_labels(path: str | os.PathLike) -> tuple[Volume, list[Label]]:
    """A label-map file as a Volume of integer labels, with the segments of a ``.seg.nrrd``."""
    if str(path).lower().endswith((".seg.nrrd", ".seg.nhdr")):
        from mimcore.data.segfile import read_seg_nrrd
        labels, affine, segments = read_seg_nrrd(path)
        return Volume(labels, affine, str(path)), segments
    volume = load_volume(path)
    try:
        volume.array = to_label_array(volume.array)
    except MimError as err:
        raise MimError(f"{path}: {err}") from None
    return volume, []


def evaluate_files(pairs: Sequence[tuple[str | os.PathLike, str | os.PathLike, str]],
                   labels: Sequence[Label] | None = None, label_map_ref: dict[int, int] | None = None,
                   progress: Callable[[int, int, str], None] | None = None,
                   resample_ref: bool = False) -> Evaluation:
    """Score prediction files against reference files.

    pairs:         ``(prediction path, reference path, case id)`` per case; any volume
                   :func:`~mimcore.data.volume_io.load_volume` reads, or a ``.seg.nrrd``.
    labels:        the classes to score; None: every value present in any file, named after
                   the reference's ``.seg.nrrd`` segments or ``label_<v>``.
    label_map_ref: ``{reference value: value in labels}`` applied to each reference before
                   scoring (e.g. a TotalSegmentator reference against a 5-class model);
                   reference values not in it become background. None: used as is.
    progress:      called as ``progress(i, n, case_id)`` after each case.
    resample_ref:  a reference on another grid than its prediction is moved onto the
                   prediction's grid (nearest neighbour, world space; noted in ``notes``)
                   instead of being refused.
    Raises MimError for an unreadable file, a non-label-map, or a prediction and reference
    on different grids (without ``resample_ref``). Values in the files that are not in ``labels`` are ignored, with a
    note in ``Evaluation.notes``.
    """
    if not pairs:
        raise MimError("No cases to evaluate: give at least one prediction/reference pair.")
    ids = [str(case_id) for _, _, case_id in pairs]
    if len(set(ids)) != len(ids):
        raise MimError(f"Case ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}.")
    wanted = {label.value for label in labels} if labels is not None else None
    cases: list[CaseResult] = []
    seen: set[int] = set()
    ignored: dict[int, list[str]] = {}
    resampled: list[str] = []
    lost_notes: list[str] = []
    names: dict[int, str] = {}
    for i, (pred_path, ref_path, case_id) in enumerate(pairs, start=1):
        pred, _ = _load_labels(pred_path)
        ref, ref_segments = _load_labels(ref_path)
        if resample_ref and grid_differences(pred, ref):
            ref, lost = reference_on_grid(ref, pred)
            resampled.append(str(case_id))
            if lost > LOST_VOLUME_NOTE:
                lost_notes.append(f"{case_id}: {100 * lost:.0f}% of the reference's labelled volume was lost when "
                                  "it was moved onto the prediction's grid (it lies outside that grid, or is "
                                  "thinner than its voxels); its scores cover the rest only")
        check_same_grid(pred, ref)
        ref_array = ref.array if label_map_ref is None else remap_array(ref.array, label_map_ref)
        if label_map_ref is None:
            names.update({s.value: s.name for s in ref_segments})
        present = set(present_values(pred.array)) | set(present_values(ref_array))
        seen |= present
        if wanted is not None:
            for value in sorted(present - wanted):
                ignored.setdefault(value, []).append(str(case_id))
            case_labels = list(labels)
        else:
            case_labels = [Label(v, names.get(v, f"label_{v}"), default_color(names.get(v, f"label_{v}"), v))
                           for v in sorted(present)]
        rows = evaluate_case(pred.array, ref_array, ref.spacing, case_labels)
        cases.append(CaseResult(str(case_id), str(Path(pred_path)), str(Path(ref_path)), rows))
        del pred, ref, ref_array
        if progress is not None:
            progress(i, len(pairs), str(case_id))
    if labels is None:  # every value seen anywhere; a case without it is absent_in_both there
        labels = [Label(v, names.get(v, f"label_{v}"), default_color(names.get(v, f"label_{v}"), v))
                  for v in sorted(seen)]
        for case in cases:
            by_value = {row["value"]: row for row in case.rows}
            case.rows = [by_value.get(label.value) or _absent_row(label) for label in labels]
            for row in case.rows:
                row["name"] = names.get(row["value"], row["name"])
    notes = []
    if resampled:
        notes.append(f"reference resampled onto the prediction's grid (nearest neighbour, world space) for "
                     f"{len(resampled)} case(s): {', '.join(resampled[:10])}{' ...' if len(resampled) > 10 else ''}")
        notes.extend(lost_notes)
    if ignored:
        listing = ", ".join(f"{v} (in {len(c)} case{'s' if len(c) > 1 else ''})" for v, c in sorted(ignored.items()))
        notes.append(f"label values not in the label list were ignored: {listing}")
    if not seen:
        notes.append("no labelled voxel in any prediction or reference: nothing was scored")
    labels = list(labels)
    all_rows = [row for case in cases for row in case.rows]
    return Evaluation(labels, cases, summarize(all_rows, labels), notes)


def _absent_row(label: Label) -> dict:
    return {"value": label.value, "name": label.name, "status": ABSENT_IN_BOTH, "dice": None, "hd95_mm": None,
            "pred_voxels": 0, "ref_voxels": 0, "pred_volume_ml": 0.0, "ref_volume_ml": 0.0}
