"""A user-level operation (segment, preview, fine-tune): one or more child jobs, then a result.

The GUI keeps a :class:`Task` and calls :meth:`Task.poll` from a timer on the main
thread. The task runs its jobs one after the other (e.g. ``mim finetune``, then
``mim models add``), forwards their events, keeps the latest progress for a progress
bar, and - only when the last job has succeeded - builds its result in the scene, still
in ``poll``, on the main thread. Until then the scene is not touched, so
:meth:`Task.cancel` (kill the child's process tree, remove the task's files) leaves it
exactly as it was; a result that fails half-way is taken out again.

A step is ``(argv, then)``: ``argv`` the ``mim`` command line, ``then(job)`` called when
that job succeeded; it returns the next step, or ``Task.DONE(result)`` to finish.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.jobs import Job, poll_until
from MiMSlicerLib.scenes import node_ids, remove_nodes_added_since


@dataclass
class Finished:
    """What a step's ``then`` returns to end the task with ``result``."""

    result: object


@dataclass
class Step:
    """One child job of a task: ``mim <argv>``; ``then(job)`` -> the next Step or Finished."""

    argv: list[str]
    then: Callable[[Job], "Step | Finished"]
    stage: str | None = None  # shown until the job reports its own stage
    temp_dirs: tuple = ()  # owned by this job (its inputs): removed when it ends


class Task:
    """A running operation, polled from the GUI (see the module doc).

    Progress (for a progress bar and a plot): ``stage``, ``step``, ``total``, ``eta_s``,
    ``last_metrics`` (the latest progress event's metrics), ``history`` (``[(step,
    metrics), ...]`` of progress events and validations), ``events`` (all of them).
    Outcome: ``done``; ``error`` (None or a readable message; "Cancelled." after
    :meth:`cancel`); ``cancelled``; ``result`` (set by the last step's ``Finished``).
    """

    DONE = Finished

    def __init__(self, kind: str, scene, on_event: Callable[[dict], None] | None = None,
                 python: str | None = None, env: dict | None = None):
        self.kind = kind
        self.scene = scene
        self.on_event = on_event
        self.python = python
        self.env = dict(env or {})
        self.workdir = Path(tempfile.mkdtemp(prefix=f"mimslicer-{kind}-"))
        self.done = False
        self.cancelled = False
        self.error: str | None = None
        self.result = None
        self.stage = kind
        self.step = 0
        self.total = 0
        self.eta_s: float | None = None
        self.last_metrics: dict = {}
        self.history: list[tuple[int, dict]] = []
        self.events: list[dict] = []
        self.started = time.monotonic()
        self.job: Job | None = None
        self._step: Step | None = None
        self.on_cancelled: list[Callable[[], None]] = []  # run after the child is dead, on cancel only
        self._deferred_cleanup = False
        self._cleaner: threading.Thread | None = None

    # ------------------------------------------------------------------ running

    def start(self, step: Step) -> "Task":
        """Start the first step; returns self. On failure to start, cleans up and raises."""
        try:
            self._run(step)
        except Exception:
            self._cleanup()
            raise
        return self

    def _run(self, step: Step) -> None:
        self._step = step
        if step.stage:  # step/total keep the previous job's (a full bar while e.g. the model is copied)
            self.stage, self.eta_s = step.stage, None
        self.job = Job(step.argv, on_event=self._on_event, python=self.python, env=self.env,
                       temp_dirs=step.temp_dirs)
        self.job.start()

    def poll(self) -> bool:
        """Forward new events; True while running. When the last job has succeeded, builds
        the result in the scene (this thread) and returns False; on a failure sets ``error``."""
        if self.done:
            return False
        try:
            if self.job.poll():
                return True
            if self.job.error or self.job.returncode != 0:
                self._fail(self.job.error or f"The {self.kind} job failed (exit code {self.job.returncode}).")
                return False
            before = node_ids(self.scene) if self.scene is not None else None
            try:
                following = self._step.then(self.job)
            except Exception:
                if before is not None:
                    remove_nodes_added_since(self.scene, before)
                raise
            if isinstance(following, Finished):
                self.result = following.result
                self._finish()
                return False
            self._run(following)
            return True
        except Exception as e:  # a result that could not be built: a readable error, not a dead timer
            message = str(e) or type(e).__name__
            self._fail(message if isinstance(e, MiMSlicerError) else f"{type(e).__name__}: {message}")
            return False

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> bool:
        """Poll until done (True) or ``timeout`` seconds pass (False). For scripts and tests."""
        return poll_until(self.poll, timeout, interval)

    def cancel(self, wait: bool = True) -> None:
        """Kill the running job and everything it started, remove the task's files. The
        scene is left as it was before the task started. Safe to call twice or after the end.

        wait=False returns at once (a GUI's Cancel button): the job's tree gets SIGTERM now,
        and a background thread kills what is left, then removes the files and runs the
        ``on_cancelled`` clean-ups (:meth:`wait_cleaned` waits for that)."""
        if self.done:
            return
        self.cancelled = True
        self.error = "Cancelled."
        job = self.job
        if job is None or wait:
            if job is not None:
                job.cancel()
            self._finish()
            self._cancel_cleanups()
            return
        job.cancel(wait=False)
        self._deferred_cleanup = True
        self._finish()

        def clean():
            job.wait_reaped(30.0)
            self._cleanup()
            self._cancel_cleanups()

        self._cleaner = threading.Thread(target=clean, daemon=True, name=f"mimslicer-{self.kind}-cancel")
        self._cleaner.start()

    def wait_cleaned(self, timeout: float | None = None) -> bool:
        """After ``cancel(wait=False)``: wait until the job is dead and the files are gone."""
        if self._cleaner is None:
            return True
        self._cleaner.join(timeout)
        return not self._cleaner.is_alive()

    def _cancel_cleanups(self) -> None:
        for cleanup in self.on_cancelled:
            try:
                cleanup()
            except Exception:  # a clean-up must not hide the cancel
                logging.getLogger(__name__).exception("MiMSlicer: a clean-up after cancelling %s failed", self.kind)

    # ------------------------------------------------------------------ events

    def note(self, message: str) -> None:
        """Report a ``note`` event of the task itself (e.g. segments left out of the export)."""
        self._on_event({"event": "note", "message": message})

    def _on_event(self, event: dict) -> None:
        self.events.append(event)
        kind = event.get("event")
        if kind in ("start", "progress"):
            self.stage = str(event.get("stage") or self.stage)
            if event.get("total") is not None:
                self.total = int(event["total"])
            if event.get("step") is not None:
                self.step = int(event["step"])
        if kind == "progress":
            self.eta_s = event.get("eta_s")
            self.last_metrics = dict(event.get("metrics") or {})
            self.history.append((self.step, self.last_metrics))
        elif kind == "validation" and event.get("dice") is not None:
            self.history.append((int(event.get("step") or self.step), {"dice": event["dice"]}))
        if self.on_event is not None:
            self.on_event(event)

    # ------------------------------------------------------------------ ending

    def _fail(self, message: str) -> None:
        self.error = message
        if self.job is not None and self.job.running:
            self.job.cancel()
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if self.error is None:
            self.stage, self.eta_s = "done", 0.0
            if self.total:
                self.step = self.total
        if not self._deferred_cleanup:
            self._cleanup()

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
