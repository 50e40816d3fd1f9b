"""Progress reporting: a tqdm bar for people, or one JSON event per line for GUIs.

The JSON events (``--progress json``) are the protocol of :mod:`mimcore.events`, which
writes them; this class decides when, and draws the bar otherwise.
"""

from __future__ import annotations

import sys
import time

from mimcore import events


class Progress:
    """Reports the steps of one stage. ``mode`` is ``"bar"``, ``"json"`` or ``"none"``."""

    def __init__(self, stage: str, total: int, mode: str = "bar", start: int = 0, enabled: bool = True):
        self.stage, self.total, self.mode = stage, total, mode if enabled else "none"
        self.requested = mode  # the mode asked for, also on the ranks that do not report (see done)
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
            events.emit(event, **fields)
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

    def done(self, summary: dict) -> None:
        """The ``done`` event, sent in json mode by every DDP rank (so that runs can be compared)."""
        if self.requested == "json":
            events.emit("done", **summary)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
