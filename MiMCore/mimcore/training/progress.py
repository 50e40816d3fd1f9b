"""Progress reporting: a tqdm bar for people, or one JSON event per line for GUIs.

Events (``--progress json``), the protocol the Slicer module reads::

    {"event": "start", ...}
    {"event": "progress", "stage": "pretrain", "step": 3, "total": 100, "eta_s": 41.2, "metrics": {...}}
    {"event": "checkpoint", "path": "..."}
    {"event": "done", ...}
    {"event": "error", "message": "..."}
"""

from __future__ import annotations

import json
import sys
import time


class Progress:
    """Reports the steps of one stage. ``mode`` is ``"bar"``, ``"json"`` or ``"none"``."""

    def __init__(self, stage: str, total: int, mode: str = "bar", start: int = 0, enabled: bool = True):
        self.stage, self.total, self.mode = stage, total, mode if enabled else "none"
        self.start_step = start
        self.t0 = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", file=sys.stderr, dynamic_ncols=True)

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def event(self, event: str, **fields) -> None:
        if self.mode == "json":
            print(json.dumps({"event": event, **fields}), flush=True)
        elif self.mode == "bar" and event not in ("progress",):
            msg = fields.get("message") or fields.get("path") or ""
            self.bar.write(f"{event}: {msg}" if msg else event, file=sys.stderr)

    def update(self, step: int, metrics: dict[str, float]) -> None:
        eta = self.eta(step)
        if self.mode == "json":
            self.event("progress", stage=self.stage, step=step, total=self.total,
                       eta_s=None if eta is None else round(eta, 1), metrics=metrics)
        elif self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "lr")}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
