"""Installing packages and checking the device without freezing Slicer (issue 13, bug 3):
``InstallRun`` runs each pip step as a real child process polled like a job (here offline,
from a hand-made wheel, into a target folder), ``DeviceCheckRun`` the device check."""

from __future__ import annotations

import os
import sys
import time

from packaging.requirements import Requirement

from MiMSlicerLib import dependencies as deps


def _make_wheel(*args, **kwargs):
    # Imported when called, not at import time: slicer-core's package imports every module of any
    # folder named "slicer" on sys.path (so this file too, during Testing/core runs), and only the
    # Slicer suite's own run puts Testing/slicer (and so test_dependencies) on sys.path.
    from test_dependencies import _make_wheel as make
    return make(*args, **kwargs)


def _poll(run, timeout=120.0):
    start, polls = time.monotonic(), 0
    while run.poll():
        polls += 1
        assert time.monotonic() - start < timeout, "still running"
        time.sleep(0.05)
    return polls


def test_pip_steps_run_as_child_processes_with_progress(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    _make_wheel(wheels, "mimtestpkg", "1.0")
    _make_wheel(wheels, "mimtestother", "2.0")
    problems = deps.find_problems([Requirement("mimtestpkg>=1.0"), Requirement("mimtestother")],
                                  search_path=[str(target)])
    steps = deps.plan_install(problems, wheelhouse=wheels)
    assert len(steps) == 1 and deps.pip_command(steps[0], "py")[:4] == ["py", "-m", "pip", "install"]
    events = []
    run = deps.InstallRun(steps, python=sys.executable, on_event=events.append,
                          env={"PIP_CONFIG_FILE": os.devnull}, extra_pip_args=["--no-cache-dir", "--target", str(target)])
    started = time.monotonic()
    assert run.poll() is True and time.monotonic() - started < 1.0  # started, not waited for
    assert _poll(run) > 1  # the GUI's timer polled meanwhile
    assert run.error is None and run.done
    assert deps.find_problems([Requirement("mimtestpkg>=1.0")], search_path=[str(target)]) == []
    progress = [e for e in events if e["event"] == "progress"]
    assert [(e["step"], e["total"]) for e in progress] == [(1, 1)]
    assert progress[0]["stage"] == "installing mimtestpkg>=1.0, mimtestother"
    assert any(e["event"] == "log" and "Successfully installed" in e["message"] for e in events)
    assert events[-1] == {"event": "done", "installed": ["mimtestpkg>=1.0", "mimtestother"]}


def test_a_failing_pip_step_says_which_and_why(tmp_path):
    _make_wheel(tmp_path, "mimtestpkg", "1.0")
    steps = deps.plan_install([deps.Problem(Requirement("mimtestpkg>=2"), None)], wheelhouse=tmp_path)
    run = deps.InstallRun(steps, python=sys.executable, env={"PIP_CONFIG_FILE": os.devnull},
                          extra_pip_args=["--target", str(tmp_path / "site")])
    _poll(run)
    assert run.error.startswith("installing mimtestpkg>=2 failed: The pip install job failed (exit code 1)")
    assert "No matching distribution" in run.error or "Could not find a version" in run.error


def test_slicers_own_installers_are_announced_then_called(tmp_path):
    """PyTorchUtils and pip_ensure (Slicer's constraints on its own packages) run through the
    installers Slicer gives, in its main thread; the GUI says so before polling."""
    calls = []
    steps = deps.plan_install([deps.Problem(Requirement("torch>=2.2"), None),
                               deps.Problem(Requirement("monai>=1.4"), None)],
                              have_pytorchutils=True, have_pip_ensure=True)
    assert [deps.pip_command(s) for s in steps] == [None, None]
    run = deps.InstallRun(steps, deps.Installers(pip_install=None, install_torch=lambda v: calls.append(v) or "torch",
                                                 pip_ensure=lambda r: calls.append(r)))
    assert run.blocking_next and "PyTorch extension" in run.next_step.describe()
    assert run.poll() is True and calls == [">=2.2"]
    assert run.blocking_next and "pip_ensure" in run.next_step.describe()
    assert run.poll() is True and calls == [">=2.2", ["monai>=1.4"]]
    assert run.poll() is False and run.error is None and run.installed == ["torch>=2.2", "monai>=1.4"]


def test_the_device_check_polls_and_cancels(tmp_path):
    run = deps.DeviceCheckRun("cpu", python=[sys.executable, "-c", "import time; time.sleep(30)"]).start()
    assert run.poll() is True and not run.done
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 2 and run.poll() is False
    assert not run.result.ok and "cancelled" in run.result.message
    run = deps.DeviceCheckRun("cpu", python=[sys.executable, "-S", "-I"]).start()  # no torch here: fails fast
    _poll(run, timeout=60)
    assert run.result.stage == "import" and "PyTorch cannot be imported" in run.result.message


def test_the_self_test_skips_with_a_clear_message_where_packages_are_missing():
    assert deps.self_test_skip_reason([]) is None
    reason = deps.self_test_skip_reason(deps.find_problems([Requirement("mimtestabsent>=1")]))
    assert reason.startswith("MiMSlicerTest skipped: the Python packages MiMSlicer runs on are not installed")
    assert "mimtestabsent>=1: not installed" in reason and "Check and install packages" in reason
    # in this environment the requirements are met: the self-test would run
    assert deps.self_test_skip_reason(deps.find_problems(deps.load_requirements())) is None
