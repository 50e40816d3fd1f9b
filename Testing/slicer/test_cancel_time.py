"""Cancel never blocks the GUI for long (issue 13): a real child process tree, one member of
which ignores SIGTERM; the GUI's cancel returns at once, the tree is gone within seconds."""

from __future__ import annotations

import sys
import time

import pytest
from mimslicer_testing import group_processes

from MiMSlicerLib.jobs import CommandJob

# a child that ignores SIGTERM (as one stuck in native code may) and starts a grandchild that
# ignores it too (a data-loader worker), then waits: only SIGKILL ends them
TREE = ("import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, "
        "signal.SIG_IGN); print(\"ready\", flush=True); time.sleep(60)'])\n"
        "time.sleep(60)\n")


def _tree(tmp_path) -> CommandJob:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    job = CommandJob([sys.executable, "-c", TREE], name="sleep", temp_dirs=[inputs]).start()
    deadline = time.monotonic() + 10
    while len(group_processes(job.pid)) < 2 or "ready" not in job.log_tail():
        assert job.poll() and time.monotonic() < deadline, "the process tree did not start"
        time.sleep(0.05)
    return job


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_gui_cancel_returns_at_once_and_the_tree_dies_soon(tmp_path):
    job = _tree(tmp_path)
    started = time.monotonic()
    job.cancel(wait=False)
    assert time.monotonic() - started < 0.2
    assert job.cancelled and job.poll() is False
    assert job.wait_reaped(timeout=5), "the tree was not reaped within 5 s"
    assert time.monotonic() - started < 3.0  # SIGTERM, 1 s grace, SIGKILL
    assert group_processes(job.pid) == [] and not (tmp_path / "inputs").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_a_blocking_cancel_takes_about_the_grace_not_eight_seconds(tmp_path):
    job = _tree(tmp_path)
    started = time.monotonic()
    job.cancel()
    assert 0.9 < time.monotonic() - started < 2.5  # the grace (it was 3 s, plus up to 5 s for the readers)
    assert group_processes(job.pid) == [] and not (tmp_path / "inputs").exists()
