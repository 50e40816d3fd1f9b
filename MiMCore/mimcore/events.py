"""The progress protocol of ``--progress json``: its events, the one writer, the one reader.

A command run with ``--progress json`` prints one JSON object per line on stdout, each with
an ``"event"`` key naming its kind, always the first key (``{"event": "done", ...``)::

    {"event": "start", "v": 1, "stage": "finetune", "step": 0, "total": 100, ...}
    {"event": "progress", "stage": "finetune", "step": 3, "total": 100, "eta_s": 41.2, "metrics": {...}}
    {"event": "done", ...}

:data:`EVENTS` lists every kind with its fields and when it is sent; ``start`` carries the
protocol version (``"v"``, :data:`PROTOCOL_VERSION`), raised when a field changes meaning
or goes away (new kinds and new fields do not raise it: readers ignore what they do not
know). :func:`emit` is the only place in mimcore that writes an event
(``Testing/core/test_events.py`` enforces it); :func:`parse_event` and :func:`read_events`
read them back. This module imports only the standard library, so GUIs (MiMSlicerLib) and
scripts read events without loading torch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class EventKind:
    """One kind of event: its name, its fields (beyond ``event``; optional ones end in ``?``)
    and when a command sends it."""

    name: str
    fields: tuple[str, ...]
    when: str


EVENTS: dict[str, EventKind] = {e.name: e for e in (
    EventKind("start", ("v", "stage", "step?", "total?", "message?", "device?", "..."),
              "once, when the work begins (after loading); step > 0 on a resumed run. The command's "
              "own fields: pretrain lr, effective_batch, method, backbone, crop_size; finetune labels, "
              "cases, validation_cases, architecture; segment cases, model, device, runtime (torch or "
              "openvino)"),
    EventKind("progress", ("stage", "step", "total", "eta_s", "metrics"),
              "after a step (pretrain: every --log-every steps and the last), a level (reconstruct) or "
              "sliding-window batches (segment); eta_s is null until it can be estimated"),
    EventKind("checkpoint", ("path", "step"), "a training checkpoint was written (the JSON path)"),
    EventKind("validation", ("step", "dice", "per_class", "best_dice", "best_step"),
              "finetune: after each validation (Dice of every label, None where it is absent)"),
    EventKind("note", ("message", "lr_rule?"), "information worth showing (how the lr was chosen, the "
              "initialisation, early stopping, ...)"),
    EventKind("resume", ("path", "step"), "training continues from this checkpoint"),
    EventKind("warning", ("message",), "segment, reconstruct: something was worked around or looks wrong (GPU out of "
              "memory, a failed input of a batch, non-HU input, a model that has not learned yet)"),
    EventKind("case", ("input", "outputs", "seconds", "labels_present"), "segment: one input volume is done"),
    EventKind("done", ("...",), "the command succeeded; the summary: training step, total, metrics, "
              "weights_sha256, rank (every DDP rank sends one), checkpoint ...; segment/reconstruct "
              "outputs; models add name, path"),
    EventKind("error", ("message",), "the command failed with a user error (exit code 2): what is wrong "
              "and what to do"),
)}


def format_event(kind: str, /, **fields) -> str:
    """The line (without newline) of one event; ``start`` gets the protocol version.
    ValueError for a kind that is not in :data:`EVENTS`."""
    if kind not in EVENTS:
        raise ValueError(f"unknown progress event {kind!r}; known: {', '.join(EVENTS)}")
    head = {"event": kind, "v": PROTOCOL_VERSION} if kind == "start" else {"event": kind}
    return json.dumps({**head, **fields})


def emit(kind: str, /, **fields) -> None:
    """Write one event as a line on stdout (``sys.stdout`` as it is at the call), flushed.

    The line and its newline go out in one write: with unbuffered output (``python -u``,
    ``PYTHONUNBUFFERED``) a ``print`` writes them separately, and the lines of processes
    sharing one pipe (the ranks under ``torchrun``) could run into each other."""
    sys.stdout.write(format_event(kind, **fields) + "\n")
    sys.stdout.flush()


def parse_event(line: str) -> dict | None:
    """The event on one output line, or None if the line is not one (any other output: logs,
    warnings, tracebacks). Unknown kinds are returned too: readers skip what they do not know."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


def read_events(path: str | Path, kind: str | None = None) -> list[dict]:
    """The events in a file of output lines (other lines skipped), only those of ``kind`` if
    given; [] if the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    events = (parse_event(line) for line in path.read_text(encoding="utf-8").splitlines())
    return [e for e in events if e is not None and (kind is None or e["event"] == kind)]
