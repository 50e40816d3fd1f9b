"""The job runner (MiMSlicerLib.jobs.Job) with the real ``python -m mimcore`` in a child process."""

from __future__ import annotations

import os
import signal
import sys
import time

from mimslicer_testing import CHILD_ENV, SPACING, group_processes, wait_for_processes

from MiMSlicerLib.jobs import Job


def test_progress_events_reach_on_event_in_order(pretrain_run):
    job, events = pretrain_run["job"], pretrain_run["events"]
    assert job.returncode == 0 and job.error is None and not job.running
    kinds = [e["event"] for e in events if e["event"] != "log"]
    assert kinds[0] == "start" and kinds[-1] == "done" and "checkpoint" in kinds
    assert [e for e in events if e["event"] != "log"] == job.events  # every JSON event, nothing else
    progress = [e for e in events if e["event"] == "progress"]
    assert [(p["stage"], p["step"], p["total"]) for p in progress] == [("pretrain", 1, 1)]
    assert "loss" in progress[0]["metrics"]
    assert all(isinstance(e["message"], str) and e["stream"] in ("stdout", "stderr")
               for e in events if e["event"] == "log")
    assert (pretrain_run["dir"] / "checkpoint_00000001.json").is_file()
    assert job.poll() is False  # stays ended


def test_a_user_error_becomes_mimcores_own_message(tmp_path):
    job = Job(["segment", str(tmp_path / "missing.nrrd"), "--model", "none", "--output", str(tmp_path / "out.nrrd"),
               "--progress", "json"], env=CHILD_ENV).start()
    assert job.wait(timeout=120)
    assert job.returncode == 2
    assert job.error == f"{tmp_path / 'missing.nrrd'} does not exist: give a volume file, a DICOM series folder " \
                        "or a folder of volumes"
    assert job.last_event["event"] == "error"


def test_a_failure_without_an_error_event_shows_the_last_log_lines(tmp_path):
    job = Job(["segment", "--no-such-option"], env=CHILD_ENV, temp_dirs=[tmp_path / "inputs"])
    (tmp_path / "inputs").mkdir()
    job.start()
    assert job.wait(timeout=120)
    assert job.returncode == 2 and job.events == []
    assert job.error.startswith("The segment job failed (exit code 2):\n")
    assert "the following arguments are required: input, --model, --output" in job.error
    assert len(job.error.splitlines()) <= 21 and job.log_tail()[-1] in job.error
    assert not (tmp_path / "inputs").exists()  # the job's temporary folder went with it


def _long_finetune(small_datalist, out, *extra) -> Job:
    return Job(["finetune", "--datalist", str(small_datalist), "--labels", "liver", "--preset", "tiny", *SPACING,
                "--steps", "5000", "--output", str(out), "--device", "cpu", "--progress", "json",
                "--no-tensorboard", *extra], env=CHILD_ENV)


def test_cancel_kills_the_whole_process_tree_and_removes_temp_dirs(small_datalist, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "volume.nrrd").write_bytes(b"x")
    # Inside Slicer the interpreter is PythonSlicer, a launcher that runs the real Python as
    # its child: killing only the process we started would leave the job running.
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\nexit $?\n')
    launcher.chmod(0o755)
    job = _long_finetune(small_datalist, tmp_path / "run", "--workers", "1")
    job.python = str(launcher)
    job.temp_dirs.append(inputs)
    job.start()
    tree = wait_for_processes(job, 3)  # launcher -> python -> data-loader worker, one process group
    assert job.pid in tree

    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 10
    assert group_processes(job.pid) == []  # nothing of the tree is left
    assert job.cancelled and job.error is None and job.returncode is not None
    assert not inputs.exists()
    assert job.poll() is False


def test_a_child_killed_from_outside_is_reported(small_datalist, tmp_path):
    job = _long_finetune(small_datalist, tmp_path / "run").start()
    wait_for_processes(job, 1)
    os.kill(job.pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    assert job.wait(timeout=30)
    assert job.returncode == -signal.SIGKILL
    assert job.error.startswith("The finetune job was killed by SIGKILL (often the system running out of memory")
