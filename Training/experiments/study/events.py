"""The ``--progress json`` events of the study's child processes, as JSON lines: read with
:mod:`mimcore.events`, the protocol's one reader (``read_events`` also reads the study's
``study_<stage>.events.jsonl``, events with a ``t`` key added)."""

from __future__ import annotations

from mimcore.events import parse_event, read_events  # noqa: F401 (the protocol's one reader)
