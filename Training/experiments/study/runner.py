"""Running the study's steps: one child process each, its events and log kept next to it,
a marker file that makes a finished step skipped next time."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

from study.commands import shell
from study.events import parse_event
from study.settings import StudyError
from study.stats import fmt_time


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Runner:
    """Runs (or, with dry_run, prints) the CLI steps; a step's marker makes it skipped next time."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.ran = []  # (stage, folder) of the steps run in this invocation
        self.skipped = []

    def done(self, folder: Path, stage: str) -> dict | None:
        return read_json(folder / f"study_{stage}.json")

    def step(self, folder: Path, stage: str, cmd: list[str], what: str, resume_flag: list[str] | None = None,
             extra: dict | None = None) -> dict | None:
        """Run ``cmd`` for ``stage`` in ``folder`` unless its marker exists. ``resume_flag`` is
        always added: ``mim pretrain/finetune --resume`` continues an interrupted run from its
        last checkpoint, or starts at step 0 when there is none yet (and the folder, which holds
        this runner's logs, is not refused as a used one). Returns the marker."""
        marker = self.done(folder, stage)
        if marker is not None:
            self.skipped.append((stage, str(folder)))
            print(f"[skip] {what}: done ({fmt_time(marker.get('wall_s'))})", flush=True)
            return marker
        if resume_flag:
            cmd = cmd + resume_flag
        if self.dry_run:
            print(f"[dry-run] {what}\n$ {shell(cmd)}", flush=True)
            return None
        print(f"[run] {what}\n$ {shell(cmd)}", flush=True)
        result = run_cli(cmd, folder, stage)
        attempts = folder / f"study_{stage}.attempts.jsonl"
        walls = [json.loads(ln)["wall_s"] for ln in attempts.read_text().splitlines() if ln.strip()]
        marker = {"stage": stage, "command": [str(c) for c in cmd], "wall_s": round(sum(walls), 2),
                  "attempts": len(walls), "finished": now(), **(extra or {}), **result.get("extra", {})}
        write_json(folder / f"study_{stage}.json", marker)
        self.ran.append((stage, str(folder)))
        print(f"      done in {fmt_time(result['wall_s'])}", flush=True)
        return marker


def run_cli(cmd: list[str], folder: Path, stage: str) -> dict:
    """Run one command; its JSON events go to ``study_<stage>.events.jsonl`` (with ``t``, seconds
    since the start), other output to ``study_<stage>.log``. StudyError when it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    events_path, log_path = folder / f"study_{stage}.events.jsonl", folder / f"study_{stage}.log"
    t0 = time.perf_counter()
    error, rc = None, None
    with open(events_path, "a", encoding="utf-8") as ev, open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {now()} $ {shell(cmd)}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            for line in proc.stdout:
                event = parse_event(line)
                if event is None:
                    log.write(line)
                    continue
                ev.write(json.dumps({"t": round(time.perf_counter() - t0, 3), **event}) + "\n")
                ev.flush()
                kind = event.get("event")
                if kind == "validation":
                    classes = ", ".join(f"{k} {v:.3f}" for k, v in (event.get("per_class") or {}).items()
                                        if v is not None)
                    print(f"      step {event.get('step')}: validation Dice {event.get('dice', 0):.3f} ({classes})",
                          flush=True)
                elif kind == "error":
                    error = event.get("message")
            rc = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too: let it write its checkpoint and stop by itself
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.terminate()
                rc = proc.wait()
            raise
        except BaseException:
            proc.terminate()
            rc = proc.wait()
            raise
        finally:
            wall = time.perf_counter() - t0
            with open(folder / f"study_{stage}.attempts.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"wall_s": round(wall, 2), "rc": rc, "date": now()}) + "\n")
    if rc != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise StudyError(f"`{shell(cmd[:4])} ...` failed (exit code {rc}): {error or 'see the log'}\n"
                         f"log: {log_path}\n{tail}")
    return {"wall_s": wall}
