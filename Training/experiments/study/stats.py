"""Numbers for the report: mean ± sd over seeds, times, the end of a pre-training run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from study.settings import REPO


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results.md gets committed)."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def short_names(paths: list[str]) -> list[str]:
    """Paths relative to their common folder (``aorta_report/example_ct.nii.gz``, ``example_ct_dicom``)."""
    if len(paths) < 2:
        return [Path(p).name for p in paths]
    root = os.path.commonpath([str(Path(p).parent) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def fmt_time(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt_ms(values: list[float], digits: int = 3) -> str:
    m, s = mean_sd(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


#: Pre-training metrics reported at the end of a run: the loss, MiM's alignment terms and its
#: collapse monitor (cosine of matched and of mismatched child/parent pairs; equal = no information).
FINAL_KEYS = ("loss", "a12", "a23", "cos12_match", "cos12_mismatch", "cos23_match", "cos23_mismatch")


def final_metrics(path: Path, fraction: float = 0.1) -> dict:
    """Mean of each of :data:`FINAL_KEYS` over the last ``fraction`` of a run's metrics.jsonl rows
    (at least one row); {} without the file."""
    if not path.is_file():
        return {}
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    tail = rows[-max(1, round(fraction * len(rows))):] if rows else []
    return {k: sum(r[k] for r in tail) / len(tail) for k in FINAL_KEYS if tail and all(k in r for r in tail)}
