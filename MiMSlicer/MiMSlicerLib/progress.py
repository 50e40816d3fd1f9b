"""What a task's progress says, as text and as curves: shared by the Qt module and MiM Studio.

Both front ends show the same line under their progress bar ("segmenting with liver-v2 -
3/10 - about 12 s left - loss 0.41") and plot the same loss / Dice curves of a
fine-tuning task; this module turns a :class:`MiMSlicerLib.tasks.Task` into them. No Qt,
no trame, no mimcore.
"""

from __future__ import annotations

import math

CURVE_METRICS = ("loss", "dice")  # the metrics a progress line and the curves show


def format_seconds(seconds) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``; ``""`` for None, NaN or a negative time."""
    if seconds is None:
        return ""
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        return ""
    if math.isnan(seconds) or seconds < 0 or math.isinf(seconds):
        return ""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def progress_text(task) -> str:
    """One line for a status label: stage, step/total, time left, latest loss and Dice."""
    parts = [str(task.stage or "working")]
    if task.total:
        parts.append(f"{int(task.step or 0)}/{int(task.total)}")
    eta = "" if task.done else format_seconds(task.eta_s)
    if eta:
        parts.append(f"about {eta} left")
    metrics = task.last_metrics or {}
    parts += [f"{k} {v:.4g}" for k, v in metrics.items()
              if k in CURVE_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " - ".join(parts)


def progress_fraction(task) -> float:
    """0..1 for a progress bar (0 while the total is unknown, 1 once the task succeeded)."""
    if task.done and task.error is None:
        return 1.0
    if not task.total:
        return 0.0
    return max(0.0, min(1.0, float(task.step or 0) / float(task.total)))


def curves(task) -> dict[str, list[tuple[int, float]]]:
    """``{"loss": [(step, value), ...], "dice": [...]}`` from the task's history (progress
    events and validations), each sorted by step; a metric never reported is absent."""
    found: dict[str, dict[int, float]] = {}
    for step, metrics in task.history:
        for name in CURVE_METRICS:
            value = (metrics or {}).get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                found.setdefault(name, {})[int(step)] = float(value)
    return {name: sorted(points.items()) for name, points in found.items()}
