"""The progress protocol (mimcore.events): one writer, one torch-free reader, round trips."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mimcore import events

MIMCORE = Path(__file__).resolve().parents[2] / "MiMCore" / "mimcore"

SAMPLES = {
    "start": {"stage": "finetune", "step": 0, "total": 10, "message": "2 training case(s)", "labels": ["liver"]},
    "progress": {"stage": "pretrain", "step": 3, "total": 10, "eta_s": 4.2, "metrics": {"loss": 0.5, "lr": 1e-4}},
    "checkpoint": {"path": "/runs/a/checkpoint_00000003.json", "step": 3},
    "validation": {"step": 5, "dice": 0.8, "per_class": {"liver": 0.8, "spleen": None}, "best_dice": 0.8,
                   "best_step": 5},
    "note": {"message": "lr 1e-4 (--lr, used as given)", "lr_rule": "lr 1e-4 (--lr, used as given)"},
    "resume": {"path": "/runs/a/checkpoint_00000002.json", "step": 2},
    "warning": {"message": "GPU out of memory: retrying with window batch 1"},
    "case": {"input": "ct.nii.gz", "outputs": ["ct_seg.nii.gz"], "seconds": 1.5, "labels_present": [1]},
    "done": {"step": 10, "total": 10, "metrics": {"loss": 0.1}, "rank": 0, "weights_sha256": "ab" * 32},
    "error": {"message": "no volumes in /data: give --data-dir with .nii.gz files"},
}


def test_every_kind_has_a_sample():
    assert set(SAMPLES) == set(events.EVENTS)


@pytest.mark.parametrize("kind", sorted(events.EVENTS))
def test_writer_output_round_trips_through_the_reader(kind, capsys, tmp_path):
    events.emit(kind, **SAMPLES[kind])
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert out.startswith(f'{{"event": "{kind}"')  # readers may look at the line's start
    event = events.parse_event(out)
    expected = {"event": kind, **({"v": events.PROTOCOL_VERSION} if kind == "start" else {}), **SAMPLES[kind]}
    assert event == expected
    # a file of mixed output: events come back, everything else is skipped
    log = tmp_path / "out.log"
    log.write_text(f"warming up\n{out}  {{not json\n[1, 2]\n{{\"no\": \"event\"}}\n{out}", encoding="utf-8")
    assert events.read_events(log) == [expected, expected]
    assert events.read_events(log, kind) == [expected, expected]
    assert events.read_events(log, "no-such-kind") == []
    assert events.read_events(tmp_path / "missing.log") == []


def test_reader_rejects_non_events_and_writer_unknown_kinds():
    for line in ("", "text", "{", "[]", '{"event": 3}', '{"kind": "start"}', "null"):
        assert events.parse_event(line) is None, line
    assert events.parse_event('  {"event": "future-kind", "x": 1}\n') == {"event": "future-kind", "x": 1}
    with pytest.raises(ValueError, match="unknown progress event"):
        events.format_event("finished")


def test_events_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import mimcore.events as e; "
            "print(sorted(m for m in sys.modules if m.startswith('mimcore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert set(json.loads(out.stdout.replace("'", '"'))) <= {"mimcore", "mimcore.events", "mimcore.errors"}


def _writes_an_event(call: ast.Call) -> bool:
    """A json.dump(s)/print call that serialises a dict with an "event" key (literal or dict(event=...))."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in ("dumps", "dump", "print", "write"):
        return False
    for node in (n for arg in call.args for n in ast.walk(arg)):
        if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "event" for k in node.keys):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" \
                and any(k.arg == "event" for k in node.keywords):
            return True
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and '"event"' in ast.unparse(node):
            return True
    return False


def _event_dict(node: ast.AST) -> bool:
    """A dict literal with an "event" key: an event built by hand (to be passed to some printer)."""
    return isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "event" for k in node.keys)


def test_only_mimcore_events_writes_events():
    offenders = []
    for path in sorted(MIMCORE.rglob("*.py")):
        if path == MIMCORE / "events.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        offenders += [f"{path.relative_to(MIMCORE)}:{n.lineno}" for n in ast.walk(tree)
                      if (isinstance(n, ast.Call) and _writes_an_event(n)) or _event_dict(n)]
    assert not offenders, f"progress events written outside mimcore.events (use mimcore.events.emit): {offenders}"


def test_the_rule_catches_the_old_ways():
    for code in ('print(json.dumps({"event": "done", **summary}), flush=True)',
                 'sys.stdout.write(json.dumps(dict(event="error", message=m)))',
                 "print('{\"event\": \"done\"}')"):
        call = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call))
        assert _writes_an_event(call), code
    assert any(_event_dict(n) for n in ast.walk(ast.parse('_emit({"event": "done", "outputs": out})')))


def test_the_slicer_job_runner_reads_with_mimcore_events():
    """MiMSlicerLib parses job output with mimcore.events.parse_event; its copy for a Python
    without mimcore (MiMSlicerLib/jobs.py) reads every line the same way."""
    sys.path.insert(0, str(MIMCORE.parents[1] / "MiMSlicer"))
    try:
        from MiMSlicerLib import jobs
    finally:
        sys.path.pop(0)
    assert jobs._event_reader() is events.parse_event
    lines = [events.format_event(kind, **SAMPLES[kind]) for kind in SAMPLES]
    lines += ["", "text", "{", "[]", '{"event": 3}', '{"kind": "start"}', "null", ' {"event": "x"} \n']
    for line in lines:
        assert jobs._parse_event_without_mimcore(line) == events.parse_event(line), line
