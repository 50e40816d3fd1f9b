"""First-use dependency check for MiMSlicer inside 3D Slicer (no ``qt``).

The steps, each usable and tested on its own:

1. :func:`load_requirements` reads ``Resources/requirements.txt``.
2. :func:`find_problems` lists the packages that are missing or whose installed version
   does not satisfy the requirement (``importlib.metadata`` + ``packaging``); markers
   that do not apply to this platform are skipped.
3. :func:`plan_install` turns the problems into :class:`InstallStep` s: torch through the
   PyTorch extension's ``PyTorchUtils`` when it is installed (it picks the CUDA build that
   matches the driver), everything else through ``slicer.packaging.pip_ensure`` where
   this Slicer has it, ``slicer.util.pip_install`` otherwise; with an offline folder of
   wheels, everything through ``pip install --no-index --find-links FOLDER``.
4. :func:`run_plan` executes the steps with the installer callables it is given
   (:func:`slicer_installers` returns Slicer's own; tests pass a real ``pip`` runner).
5. :func:`check_device` runs a tiny tensor computation on the chosen device in a child
   process (Slicer's own Python) and says plainly when the GPU cannot run it.

The widget asks the user once, showing :func:`describe_plan`, before calling
:func:`run_plan`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
TORCH = "torch"
# Default offline wheel folder (the module's settings override it).
WHEELHOUSE_ENV = "MIM_WHEELHOUSE"
DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")

VIA_PYTORCHUTILS = "PyTorchUtils"
VIA_PIP_ENSURE = "slicer.packaging.pip_ensure"
VIA_PIP_INSTALL = "slicer.util.pip_install"


class DependencyError(RuntimeError):
    """A requirement file, install plan or install step that cannot go on; the message
    is meant for the user."""


# ---------------------------------------------------------------------------------------
# 1-2. requirements and what is wrong with the current environment


def load_requirements(path: str | os.PathLike | None = None) -> list[Requirement]:
    """Requirements from a ``requirements.txt`` (comments, blank lines and pip options
    such as ``-r``/``--index-url`` are skipped, as ``slicer.packaging`` does)."""
    path = Path(path) if path is not None else REQUIREMENTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DependencyError(f"cannot read the requirements file {path}: {exc}") from exc
    requirements = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            requirements.append(Requirement(line))
        except InvalidRequirement as exc:
            raise DependencyError(f"{path}:{number}: not a valid requirement {line!r}: {exc}") from exc
    return requirements


def installed_version(name: str, search_path: Sequence[str] | None = None) -> str | None:
    """Installed version of distribution ``name`` (``None`` if absent); ``search_path``
    looks in those folders instead of ``sys.path``."""
    wanted = canonicalize_name(name)
    if search_path is None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    for dist in importlib.metadata.distributions(path=list(search_path)):
        if canonicalize_name(dist.metadata["Name"] or "") == wanted:
            return dist.version
    return None


@dataclass(frozen=True)
class Problem:
    """A requirement that the environment does not satisfy."""

    requirement: Requirement
    installed: str | None  # None: not installed at all

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.requirement}: not installed"
        return f"{self.requirement}: version {self.installed} is installed"


def find_problems(requirements: Iterable[Requirement], search_path: Sequence[str] | None = None,
                  environment: dict | None = None) -> list[Problem]:
    """Requirements that are missing or not satisfied by the installed version.

    A requirement whose marker does not hold here (``; sys_platform == "win32"``) is not
    needed and not reported. Pre-releases and local versions (``2.13.0+cu126``) count as
    the version they are."""
    importlib.invalidate_caches()
    env = environment if environment is not None else default_environment()
    problems = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        version = installed_version(req.name, search_path)
        if version is None or not req.specifier.contains(version, prereleases=True):
            problems.append(Problem(req, version))
    return problems


# ---------------------------------------------------------------------------------------
# 3. the install plan


@dataclass
class InstallStep:
    """One call to one installer.

    ``via`` names the installer; ``requirements`` are the requirement strings;
    ``pip_args`` the arguments after ``pip install`` (for ``slicer.util.pip_install``);
    ``torch_version`` the version requirement handed to ``PyTorchUtils`` (``">=2.2"``)."""

    via: str
    requirements: list[str]
    pip_args: list[str] = field(default_factory=list)
    torch_version: str = ""
    note: str = ""

    def describe(self) -> str:
        what = ", ".join(self.requirements)
        if self.via == VIA_PYTORCHUTILS:
            text = f"{what} through the PyTorch extension (the build that matches this computer's GPU)"
        elif self.via == VIA_PIP_ENSURE:
            text = f"{what} with pip (slicer.packaging.pip_ensure)"
        else:
            text = f"{what} with: pip install {' '.join(self.pip_args)}"
        return f"{text}. {self.note}" if self.note else text


def wheels_in(folder: str | os.PathLike) -> list[Path]:
    """The wheel files of an offline folder; a clear error if it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DependencyError(f"the offline package folder {folder} does not exist")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise DependencyError(f"the offline package folder {folder} holds no .whl files; "
                              f"fill it on a computer with internet access with: "
                              f"pip download -d {folder} -r requirements.txt")
    return wheels


def plan_install(problems: Sequence[Problem], *, wheelhouse: str | os.PathLike | None = None,
                 have_pytorchutils: bool = False, have_pip_ensure: bool = False) -> list[InstallStep]:
    """Steps that fix ``problems``: torch first (its own step), then the rest in one step.

    Without ``wheelhouse``: torch through ``PyTorchUtils`` when ``have_pytorchutils``,
    else pip (with a note that the build may not match the GPU); the others through
    ``pip_ensure`` when ``have_pip_ensure``, else ``pip_install``.
    With ``wheelhouse`` (an offline folder of wheels): everything through
    ``pip install --no-index --find-links FOLDER``, nothing from the internet."""
    torch_problems = [p for p in problems if p.name == TORCH]
    other = [str(p.requirement) for p in problems if p.name != TORCH]
    steps: list[InstallStep] = []
    if wheelhouse is not None:
        wheels_in(wheelhouse)
        offline = ["--no-index", "--find-links", str(Path(wheelhouse).resolve())]
        if torch_problems:
            req = str(torch_problems[0].requirement)
            steps.append(InstallStep(VIA_PIP_INSTALL, [req], offline + [req],
                                     note="Offline: the torch wheel in the folder must be the build for this "
                                          "computer's GPU (or the CPU build)."))
        if other:
            steps.append(InstallStep(VIA_PIP_INSTALL, other, offline + other))
        return steps
    if torch_problems:
        req = torch_problems[0].requirement
        if have_pytorchutils:
            steps.append(InstallStep(VIA_PYTORCHUTILS, [str(req)], torch_version=str(req.specifier)))
        else:
            steps.append(InstallStep(VIA_PIP_INSTALL, [str(req)], [str(req)],
                                     note="The PyTorch extension is not installed: pip picks its default torch "
                                          "build, which may not use this computer's GPU. Install the PyTorch "
                                          "extension from the Extension Manager to get the matching build."))
    if other:
        if have_pip_ensure:
            steps.append(InstallStep(VIA_PIP_ENSURE, other))
        else:
            steps.append(InstallStep(VIA_PIP_INSTALL, other, list(other)))
    return steps


def describe_plan(problems: Sequence[Problem], steps: Sequence[InstallStep]) -> str:
    """The text the user reads before agreeing to the install."""
    lines = ["MiMSlicer needs these Python packages:"]
    lines += [f"  - {p.describe()}" for p in problems]
    lines.append("")
    lines.append("They will be installed into Slicer's Python environment:")
    lines += [f"  {i}. {s.describe()}" for i, s in enumerate(steps, start=1)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# 4. running the plan


@dataclass
class Installers:
    """The callables that install; :func:`slicer_installers` gives Slicer's.

    ``pip_install(args)``: the arguments after ``pip install``;
    ``pip_ensure(requirements)``: requirement strings;
    ``install_torch(version_requirement)``: e.g. ``">=2.2"``."""

    pip_install: Callable[[list[str]], object]
    pip_ensure: Callable[[list[str]], object] | None = None
    install_torch: Callable[[str], object] | None = None


def run_plan(steps: Sequence[InstallStep], installers: Installers,
             log: Callable[[str], None] = logging.info) -> None:
    """Run each step with its installer; a failing step raises :class:`DependencyError`
    naming the step (the installer's own output went to ``log`` or Slicer's log)."""
    for number, step in enumerate(steps, start=1):
        log(f"Installing ({number}/{len(steps)}): {step.describe()}")
        try:
            if step.via == VIA_PYTORCHUTILS:
                if installers.install_torch is None:
                    raise DependencyError("the plan uses the PyTorch extension but it is not available")
                if installers.install_torch(step.torch_version) is None:
                    raise DependencyError("PyTorch was not installed (the PyTorch extension returned nothing)")
            elif step.via == VIA_PIP_ENSURE:
                if installers.pip_ensure is None:
                    raise DependencyError("the plan uses slicer.packaging.pip_ensure but it is not available")
                installers.pip_ensure(list(step.requirements))
            else:
                installers.pip_install(list(step.pip_args))
        except DependencyError:
            raise
        except subprocess.CalledProcessError as exc:
            tail = _tail(exc.stderr) or _tail(exc.output)  # pip writes its errors to stderr
            raise DependencyError(f"installing {', '.join(step.requirements)} failed "
                                  f"(exit code {exc.returncode}){': ' + tail if tail else ''}") from exc
        except Exception as exc:  # an installer's own error: keep its message, name the step
            raise DependencyError(f"installing {', '.join(step.requirements)} failed: {exc}") from exc
    importlib.invalidate_caches()


def slicer_installers(requester: str = "MiMSlicer") -> Installers:
    """Slicer's installers: ``slicer.packaging`` where this Slicer has it (5.11+),
    ``slicer.util.pip_install`` otherwise, and ``PyTorchUtils`` when the PyTorch
    extension is installed. Runs only inside Slicer."""
    import slicer

    packaging_module, pydeps = _slicer_pip_module()

    if packaging_module is not None and hasattr(packaging_module, "pip_install"):
        def pip_install(args):
            return packaging_module.pip_install(args, requester=requester)
    else:
        def pip_install(args):
            return slicer.util.pip_install(args)

    pip_ensure = None
    if packaging_module is not None and hasattr(packaging_module, "pip_ensure"):
        def _pip_ensure(requirements):
            # the user was asked once already (describe_plan), so no second prompt here;
            # slicer.pydeps (5.11) takes Requirement objects, the earlier slicer.packaging strings
            if pydeps:  # MiMSlicer asks about restarting once, after all steps (fields.restart_needed)
                return packaging_module.pip_ensure([Requirement(r) for r in requirements], requester=requester,
                                                   prompt_install=False, prompt_restart=False)
            return packaging_module.pip_ensure(list(requirements), requester=requester, prompt_install=False)

        pip_ensure = _pip_ensure

    install_torch = None
    if has_pytorchutils():
        import PyTorchUtils

        torch_logic = PyTorchUtils.PyTorchUtilsLogic()

        def _install_torch(version_requirement):
            return torch_logic.installTorch(askConfirmation=False,
                                            torchVersionRequirement=version_requirement or None)

        install_torch = _install_torch

    return Installers(pip_install=pip_install, pip_ensure=pip_ensure, install_torch=install_torch)


def has_pytorchutils() -> bool:
    """True inside a Slicer where the PyTorch extension's ``PyTorchUtils`` module is loaded."""
    try:
        import slicer

        return hasattr(slicer, "modules") and hasattr(slicer.modules, "pytorchutils")
    except ImportError:
        return False


def _slicer_pip_module():
    """``(module, is_pydeps)``: Slicer's package manager - ``slicer.pydeps`` (Slicer 5.11), else
    the earlier ``slicer.packaging`` - or ``(None, False)`` (Slicer 5.10 and older, slicer-core)."""
    import slicer

    for name in ("pydeps", "packaging"):
        module = getattr(slicer, name, None)
        if module is None:
            try:
                module = importlib.import_module(f"slicer.{name}")
            except ImportError:
                module = None
        if module is not None and hasattr(module, "pip_ensure"):
            return module, name == "pydeps"
    return None, False


def has_pip_ensure() -> bool:
    try:
        return _slicer_pip_module()[0] is not None
    except ImportError:
        return False


def default_wheelhouse() -> Path | None:
    value = os.environ.get(WHEELHOUSE_ENV, "").strip()
    return Path(value) if value else None


def pip_command(step: InstallStep, python: str | None = None) -> list[str] | None:
    """The child-process command line of a plain pip step (``PythonSlicer -m pip install ...``,
    as ``slicer.util.pip_install`` runs it). None for a step that goes through Slicer's own
    installers: ``PyTorchUtils``, and ``pip_ensure`` (``slicer.pydeps``/``slicer.packaging``,
    which keeps Slicer's own packages within its constraints and shows its own progress)."""
    if step.via == VIA_PIP_INSTALL:
        from MiMSlicerLib.jobs import default_python

        return [python or default_python(), "-m", "pip", "install", *step.pip_args]
    return None


class InstallRun:
    """:func:`run_plan` without freezing the GUI: ``poll()`` from a timer runs the steps one
    after another. Plain pip steps run as child processes (:func:`pip_command`), their output
    reported line by line as ``log`` events; a PyTorchUtils or ``pip_ensure`` step calls its
    installer of ``installers`` when it is reached: Slicer's own installers, which run in its
    main thread (they pump events while pip prints, and newer Slicers show a progress
    dialog); the caller says so first (``blocking_next``, ``next_step``).

    Events (``on_event``): ``{"event": "progress", "stage": "installing <what>", "step": i,
    "total": n}`` before each step, ``log`` events of pip, then ``done`` or ``error``.
    State: ``done``, ``error`` (None or a readable message), ``cancelled``, ``installed``
    (the requirements of the steps that succeeded)."""

    def __init__(self, steps: Sequence[InstallStep], installers: Installers | None = None,
                 python: str | None = None, on_event: Callable[[dict], None] | None = None,
                 env: dict | None = None, extra_pip_args: Sequence[str] = ()):
        self.steps = list(steps)
        self.installers = installers
        self.python = python
        self.on_event = on_event
        self.env = env
        self.extra_pip_args = list(extra_pip_args)  # e.g. ["--target", DIR] (tests)
        self.index = -1
        self.job = None
        self.done = False
        self.cancelled = False
        self.error: str | None = None
        self.installed: list[str] = []
        self.stage = "installing"
        self.eta_s = None  # the task protocol the GUI polls (see MiMSlicerLib.tasks.Task)
        self.last_metrics: dict = {}
        self.result = None

    @property
    def total(self) -> int:
        return len(self.steps)

    @property
    def step(self) -> int:
        return max(0, self.index)

    @property
    def next_step(self) -> InstallStep | None:
        """The step the next :meth:`poll` starts (None while one runs, or at the end)."""
        nxt = self.index + 1
        return self.steps[nxt] if not self.done and self.job is None and nxt < len(self.steps) else None

    @property
    def blocking_next(self) -> bool:
        """True when the next step is one that runs in this thread (PyTorchUtils)."""
        nxt = self.index + 1
        return not self.done and self.job is None and nxt < len(self.steps) and pip_command(self.steps[nxt]) is None

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def poll(self) -> bool:
        """Advance; True while steps remain or run. Never blocks, except for a PyTorchUtils step."""
        if self.done:
            return False
        if self.job is not None:
            if self.job.poll():
                return True
            job, self.job = self.job, None
            if job.error or job.returncode != 0:
                return self._fail(f"installing {', '.join(self.steps[self.index].requirements)} failed: "
                                  f"{job.error or f'exit code {job.returncode}'}")
            self.installed += self.steps[self.index].requirements
        self.index += 1
        if self.index >= len(self.steps):
            self.done = True
            self.result = list(self.installed)
            importlib.invalidate_caches()
            self._emit({"event": "done", "installed": list(self.installed)})
            return False
        step = self.steps[self.index]
        self.stage = f"installing {', '.join(step.requirements)}"
        self._emit({"event": "progress", "stage": self.stage, "step": self.index + 1, "total": len(self.steps),
                    "eta_s": None, "metrics": {}, "message": step.describe()})
        command = pip_command(step, self.python)
        if command is None:
            try:
                run_plan([step], self.installers or Installers(pip_install=_no_pip), log=lambda text: None)
            except DependencyError as exc:
                return self._fail(str(exc))
            self.installed += step.requirements
            return True
        from MiMSlicerLib.jobs import CommandJob

        command = command[:4] + ["--disable-pip-version-check", *self.extra_pip_args] + command[4:]
        self.job = CommandJob(command, name="pip install", on_event=self._emit, env=self.env)
        try:
            self.job.start()
        except Exception as exc:
            self.job = None
            return self._fail(str(exc))
        return True

    def cancel(self, wait: bool = False) -> None:
        """Stop after killing the running pip (``wait``: until it is dead); steps done stay installed."""
        if self.done:
            return
        self.cancelled = True
        if self.job is not None:
            self.job.cancel(wait=wait)
            self.job = None
        self._fail("Cancelled.")

    def _fail(self, message: str) -> bool:
        self.error = message
        self.done = True
        self._emit({"event": "error", "message": message})
        return False


def _no_pip(args):
    raise DependencyError("no pip installer was given")


# ---------------------------------------------------------------------------------------
# 5. can the chosen device run torch?

# Runs in a child process: prints one JSON line. A CUDA build that does not support the
# GPU ("no kernel image is available"), a driver that is too old or a broken install
# shows up here instead of in the middle of a segmentation.
_DEVICE_CHECK_CODE = r"""
import json, sys
wanted = sys.argv[1]
out = {"ok": False, "requested": wanted, "device": None, "torch": None, "cuda_build": None, "gpu": None,
       "stage": "import", "error": None}
def done():
    print("MIM_DEVICE_CHECK " + json.dumps(out), flush=True)
    sys.exit(0)
try:
    import torch
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
    done()
out["torch"] = torch.__version__
out["cuda_build"] = torch.version.cuda
out["stage"] = "resolve"
mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
try:
    cuda = torch.cuda.is_available()
except Exception as exc:
    cuda = False
    out["cuda_error"] = f"{type(exc).__name__}: {exc}"
if wanted == "auto":
    device = "cuda" if cuda else ("mps" if mps else "cpu")
elif wanted.startswith("cuda") and not cuda:
    out["error"] = out.get("cuda_error") or "PyTorch sees no CUDA GPU"
    done()
elif wanted == "mps" and not mps:
    out["error"] = "Apple's Metal (mps) backend is not available"
    done()
else:
    device = wanted
out["device"] = device
out["stage"] = "run"
try:
    dev = torch.device(device)
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    x = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64) / 4096.0
    vol = torch.ones(1, 1, 8, 8, 8)
    w = torch.ones(1, 1, 3, 3, 3)
    want_mm = x @ x.T
    want_conv = torch.nn.functional.conv3d(vol, w, padding=1)
    got_mm = (x.to(dev) @ x.to(dev).T).cpu()
    got_conv = torch.nn.functional.conv3d(vol.to(dev), w.to(dev), padding=1).cpu()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    if not torch.allclose(got_mm, want_mm, rtol=1e-2, atol=1e-2) or not torch.allclose(got_conv, want_conv):
        out["error"] = "the test computation gave wrong numbers on this device"
        done()
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
    done()
out["ok"] = True
out["stage"] = "done"
done()
"""
_MARK = "MIM_DEVICE_CHECK "


@dataclass
class DeviceCheck:
    ok: bool
    requested: str
    device: str | None = None  # the device that ran (or was to run) the computation
    torch_version: str | None = None
    cuda_build: str | None = None  # CUDA version torch was built with; None for CPU-only builds
    gpu: str | None = None
    stage: str = ""  # import | resolve | run | done | process
    error: str | None = None
    message: str = ""


def check_device(device: str = "auto", python: str | Sequence[str] | None = None, timeout: float = 180.0,
                 env: dict | None = None) -> DeviceCheck:
    """Run a tiny matmul and 3D convolution on ``device`` in a child process of
    ``python`` (default: this interpreter, which inside Slicer is PythonSlicer) and
    compare them with the CPU. Never raises for a device problem: the result says what
    happened in ``message``."""
    run = DeviceCheckRun(device, python=python, timeout=timeout, env=env).start()
    while run.poll():
        time.sleep(0.05)
    return run.result


class DeviceCheckRun:
    """:func:`check_device` without blocking: ``start()``, then ``poll()`` (True while it runs)
    from a GUI timer; ``result`` is the :class:`DeviceCheck` once ``poll()`` returned False.
    ``cancel()`` kills the child. Output goes to temporary files (nothing to drain)."""

    def __init__(self, device: str = "auto", python: str | Sequence[str] | None = None, timeout: float = 180.0,
                 env: dict | None = None):
        if device not in DEVICE_CHOICES and not device.startswith("cuda:"):
            raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
        self.device, self.timeout, self.env = device, timeout, env
        self.command = ([python] if isinstance(python, str) else list(python or [sys.executable]))
        self.command += ["-c", _DEVICE_CHECK_CODE, device]
        self.result: DeviceCheck | None = None
        self.process: subprocess.Popen | None = None
        self._files = None
        self._started = 0.0
        # the task protocol the GUI polls (see MiMSlicerLib.tasks.Task): a failed check is a
        # result (``result.ok`` False, ``result.message`` says why), not an ``error``
        self.stage = f"testing PyTorch on '{device}'"
        self.step, self.total, self.eta_s, self.last_metrics, self.error = 0, 0, None, {}, None

    @property
    def done(self) -> bool:
        return self.result is not None

    def start(self) -> "DeviceCheckRun":
        import tempfile

        self._files = (tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace"),
                       tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace"))
        self._started = time.monotonic()
        try:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self._files[0],
                                            stderr=self._files[1], text=True, env=self.env)
        except OSError as exc:
            self._end(DeviceCheck(False, self.device, stage="process", error=f"cannot start {self.command[0]}: {exc}"))
        return self

    def poll(self) -> bool:
        """True while the check runs; never blocks."""
        if self.result is not None:
            return False
        if self.process.poll() is None:
            if time.monotonic() - self._started <= self.timeout:
                return True
            self._kill()
            self._end(DeviceCheck(False, self.device, stage="process",
                                  error=f"the check did not finish in {self.timeout:.0f} s"))
            return False
        out, err = (self._read(f) for f in self._files)
        report = None
        for line in out.splitlines():
            if line.startswith(_MARK):
                report = json.loads(line[len(_MARK):])
        if report is None:
            detail = _tail(err) or _tail(out) or "no output"
            self._end(DeviceCheck(False, self.device, stage="process",
                                  error=f"the check process exited with code {self.process.returncode}: {detail}"))
        else:
            self._end(DeviceCheck(ok=bool(report["ok"]), requested=self.device, device=report.get("device"),
                                  torch_version=report.get("torch"), cuda_build=report.get("cuda_build"),
                                  gpu=report.get("gpu"), stage=report.get("stage", ""), error=report.get("error")))
        return False

    def cancel(self, wait: bool = True) -> None:
        """Stop the check (``result``: not ok, "cancelled"); it is killed at once either way."""
        if self.result is None:
            self._kill()
            self._end(DeviceCheck(False, self.device, stage="process", error="the check was cancelled"))

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @staticmethod
    def _read(file) -> str:
        file.seek(0)
        return file.read()

    def _end(self, check: DeviceCheck) -> None:
        self.result = _finish(check)
        for file in self._files or ():
            file.close()


def _finish(check: DeviceCheck) -> DeviceCheck:
    check.message = _device_message(check)
    return check


def _device_message(c: DeviceCheck) -> str:
    torch_text = f"PyTorch {c.torch_version}" if c.torch_version else "PyTorch"
    build = f"CUDA {c.cuda_build} build" if c.cuda_build else "CPU-only build"
    if c.ok:
        where = f"{c.device} ({c.gpu})" if c.gpu else c.device
        return f"{torch_text} ({build}) ran a test computation on {where}."
    if c.stage == "import":
        return (f"PyTorch cannot be imported ({c.error}). Install it from the PyTorch extension "
                f"or let MiMSlicer install its dependencies.")
    if c.stage == "resolve":
        hint = ("this torch is a CPU-only build: reinstall it from the PyTorch extension to get the CUDA build "
                "for this GPU" if not c.cuda_build else
                "check the NVIDIA driver, or reinstall torch from the PyTorch extension")
        return f"The device '{c.requested}' cannot be used: {c.error} ({torch_text}, {build}); {hint}. " \
               f"Choose 'cpu' (or 'auto') to run on the processor."
    if c.stage == "run":
        target = f"the GPU ({c.gpu})" if c.gpu else f"the device '{c.device}'"
        return (f"{target} cannot run {torch_text} ({build}): {c.error}. The build may not support this GPU or the "
                f"driver may be too old: reinstall torch from the PyTorch extension, or choose 'cpu'.")
    return f"The device check failed: {c.error}"


def _tail(text, lines: int = 8) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------
# 6. the module's self-test on machines without the packages


def self_test_skip_reason(problems: Sequence[Problem]) -> str | None:
    """Why ``MiMSlicerTest`` cannot run here, or None. Slicer's testing mode (the Extensions
    build servers) does not install Python packages, so there the test is skipped with this
    message instead of failing."""
    if not problems:
        return None
    return ("MiMSlicerTest skipped: the Python packages MiMSlicer runs on are not installed in this Slicer "
            "(testing mode does not install them): " + "; ".join(p.describe() for p in problems)
            + ". Install them (MiM Segmentation > Python packages and device > Check and install packages) "
              "and run the test again.")
