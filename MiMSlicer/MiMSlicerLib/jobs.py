"""One ``mimcore`` command in a child process: start, poll its JSON progress events, cancel.

The child is ``<python> -m mimcore <argv...>`` (``python`` defaults to ``sys.executable``,
which inside Slicer is PythonSlicer, so the job uses Slicer's own Python and packages).
The commands print one JSON object per line on stdout with ``--progress json``::

    {"event": "start" | "progress" | "validation" | "checkpoint" | "note" | "done" | "error", ...}
    {"event": "progress", "stage": "finetune", "step": 3, "total": 100, "eta_s": 41.2, "metrics": {...}}

The protocol (every kind, its fields, its version) is defined, written and read by
``mimcore.events``, which imports only the standard library; the lines are parsed with its
``parse_event``. It is imported at the first line a job prints, not when this module is
imported, so the GUI process loads no mimcore until it runs a job. mimcore ships inside the
extension next to MiMSlicer.py (MiMSlicer/CMakeLists.txt), so Slicer's Python finds it; a
development setup whose GUI Python lacks mimcore (its jobs then fail with "No module named
mimcore", see :meth:`Job._error_message`) parses with a copy of the same few lines.

Threads: two reader threads move stdout and stderr lines into a queue as they arrive
(a pipe that nobody reads would block the child). Everything else - parsing, the
``on_event`` callbacks, clean-up - happens in :meth:`Job.poll`, i.e. on the thread that
polls (the GUI's main thread), so callbacks may touch Qt widgets and MRML nodes.

Lines that are not JSON events (warnings, tracebacks, ``mim: error: ...`` on stderr)
are passed on as ``{"event": "log", "stream": "stdout" | "stderr", "message": line}``
and kept in a bounded tail for error messages.

Cancel kills the whole process tree: the child runs in its own process group (POSIX:
a new session; Windows: a new process group, killed with ``taskkill /T /F``), so data
loader workers and anything else it started go with it.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from MiMSlicerLib.errors import MiMSlicerError

LOG_TAIL_LINES = 200  # lines of non-event output kept
ERROR_TAIL_LINES = 20  # of which an error message shows the last ones
# Cancel: SIGTERM, then SIGKILL after this grace (a mimcore child installs no SIGTERM handler,
# so it dies at once; the grace is for what it started), then the output readers get at most
# _READER_JOIN_S to see the pipes close (a grandchild that escaped the group may hold them).
_KILL_GRACE_S = 1.0
_READER_JOIN_S = 1.0


def default_python() -> str:
    """The interpreter for jobs: inside the Slicer application its ``PythonSlicer`` (found on
    Slicer's PATH, as ``slicer.pydeps`` finds it for pip), else this process's own."""
    try:
        from slicer import app  # noqa: F401  (only inside the application)
    except ImportError:
        return sys.executable
    return shutil.which("PythonSlicer") or sys.executable


def mimcore_path_entry() -> str | None:
    """The folder holding the ``mimcore`` package this process would import (found without
    importing it), e.g. the module's folder where the extension bundles it; None if it is
    absent or in site-packages (where the child finds it anyway)."""
    try:
        spec = importlib.util.find_spec("mimcore")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))).parent
    if folder.name in ("site-packages", "dist-packages"):
        return None  # on every Python's path already; putting it first could shadow the standard library
    return str(folder)


class Job:
    """``python -m mimcore <argv>`` in a child process.

    argv:      the ``mim`` command line without ``mim``, e.g. ``["segment", "ct.nrrd", ...,
               "--progress", "json"]``.
    on_event:  called with each event dict (JSON events of the child, and ``log`` events
               for other output lines), from :meth:`poll`.
    cwd, env:  working folder; extra environment variables (on top of this process's).
    python:    the interpreter (default :func:`default_python`).
    temp_dirs: folders the job owns (e.g. its input files); removed when it has ended
               (seen by :meth:`poll`) or is cancelled.

    State: ``returncode`` (None while running), ``cancelled``, ``error`` (None, or a
    readable message once it failed), ``events`` (the JSON events so far),
    ``last_event``, :meth:`log_tail`.
    """

    def __init__(self, argv: Iterable[str], on_event: Callable[[dict], None] | None = None,
                 cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                 python: str | None = None, temp_dirs: Iterable[str | os.PathLike] = ()):
        self.argv = [str(a) for a in argv]
        self.on_event = on_event
        self.cwd = None if cwd is None else str(cwd)
        self.extra_env = dict(env or {})
        self.python = python or default_python()
        self.temp_dirs = [Path(d) for d in temp_dirs]
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.cancelled = False
        self.error: str | None = None
        self.events: list[dict] = []
        self.last_event: dict | None = None
        self._lines: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._log = collections.deque(maxlen=LOG_TAIL_LINES)
        self._finished = False
        self._reaped = threading.Event()

    # ------------------------------------------------------------------ running

    @property
    def command(self) -> list[str]:
        """The full command line of the child."""
        return [self.python, "-m", "mimcore", *self.argv]

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        """True from :meth:`start` until :meth:`poll` has seen the end (or :meth:`cancel`)."""
        return self.process is not None and not self._finished

    def environment(self) -> dict[str, str]:
        """The child's environment: ours, unbuffered UTF-8 output, ``mimcore`` importable, plus ``env``."""
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        entry = mimcore_path_entry()
        if entry and self.python in (sys.executable, default_python()):
            parts = [entry] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != entry]
            env["PYTHONPATH"] = os.pathsep.join(parts)
        env.update(self.extra_env)
        return env

    def start(self) -> "Job":
        """Launch the child in its own process group; returns self. Does not block."""
        if self.process is not None:
            raise RuntimeError("this job was already started")
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own session and process group: killpg reaches every descendant
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self.cwd, env=self.environment(), text=True, encoding="utf-8", errors="replace", bufsize=1,
                **kwargs)
        except OSError as e:
            self._remove_temp_dirs()
            self._finished = True
            self.error = (f"Could not start {self.python} ({e.strerror or e}). Check the Python interpreter "
                          "the module uses (it must be Slicer's own PythonSlicer with mimcore's packages).")
            raise MiMSlicerError(self.error) from None
        for stream, name in ((self.process.stdout, "stdout"), (self.process.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(stream, name), daemon=True,
                                      name=f"mimcore-{name}-{self.process.pid}")
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, stream, name: str) -> None:
        try:
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        except ValueError:  # the stream was closed under us (cancel)
            pass
        finally:
            self._lines.put((name, None))  # end of this stream

    def poll(self) -> bool:
        """Deliver the output so far as events; True while the child runs. Never blocks.

        When the child has exited and its output is read: sets ``returncode`` and
        ``error``, removes ``temp_dirs``, and returns False (also on later calls).
        """
        if self.process is None:
            raise RuntimeError("start() the job before polling it")
        if self._finished:
            return False
        self._drain()
        if self.process.poll() is None or any(r.is_alive() for r in self._readers):
            return True
        for reader in self._readers:
            reader.join()
        self._drain()
        self._finish()
        return False

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> bool:
        """Poll until the job ends (True) or ``timeout`` seconds pass (False). For scripts and tests."""
        return poll_until(self.poll, timeout, interval)

    def _drain(self) -> None:
        while True:
            try:
                stream, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                continue
            event = _parse_event(line) if stream == "stdout" else None
            if event is None:
                if not line.strip():
                    continue
                self._log.append(line)
                event = {"event": "log", "stream": stream, "message": line}
            else:
                self.events.append(event)
                self.last_event = event
            if self.on_event is not None:
                self.on_event(event)

    def _finish(self) -> None:
        self.returncode = self.process.wait()
        self._finished = True
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()
        if self.returncode != 0 and not self.cancelled:
            self.error = self._error_message()
        self._remove_temp_dirs()

    # ------------------------------------------------------------------ cancelling

    def cancel(self, wait: bool = True) -> None:
        """Kill the child and everything it started, remove ``temp_dirs``.

        wait=True (default): returns when the tree is gone (about a second at most).
        wait=False (for a GUI thread): sends SIGTERM to the tree and returns at once; a
        background thread escalates to SIGKILL, reaps the child and removes ``temp_dirs``
        (:meth:`wait_reaped` waits for it). Pending output is dropped (no more
        ``on_event`` calls). Safe to call at any time: before :meth:`start` it just marks
        the job cancelled, after the end it does nothing.
        """
        if self._finished:
            return
        self.cancelled = True
        self._finished = True
        if self.process is None:
            self._reaped.set()
            self._remove_temp_dirs()
            return
        if wait:
            self._reap()
            return
        _signal_tree(self.process, signal.SIGTERM if os.name != "nt" else None)
        threading.Thread(target=self._reap, daemon=True, name=f"mimcore-reap-{self.process.pid}").start()

    def _reap(self) -> None:
        try:
            _kill_tree(self.process)
            for reader in self._readers:
                reader.join(timeout=_READER_JOIN_S)
            self.returncode = self.process.returncode
            for stream in (self.process.stdout, self.process.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
            self._remove_temp_dirs()
        finally:
            self._reaped.set()

    def wait_reaped(self, timeout: float | None = None) -> bool:
        """After :meth:`cancel`: wait until the child is reaped and ``temp_dirs`` are gone (True),
        or ``timeout`` seconds pass (False). True at once for a job that ended by itself."""
        if self.process is None or (self._finished and not self.cancelled):
            return True
        return self._reaped.wait(timeout)

    def _remove_temp_dirs(self) -> None:
        for folder in self.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ errors

    def log_tail(self, lines: int = ERROR_TAIL_LINES) -> list[str]:
        """The last ``lines`` output lines that were not JSON events (stderr and stdout)."""
        return list(self._log)[-lines:]

    def _error_message(self) -> str:
        error_events = [e for e in self.events if e.get("event") == "error"]
        if error_events and error_events[-1].get("message"):
            return str(error_events[-1]["message"])  # mimcore's own message: what is wrong, what to do
        user_errors = [line.split("mim: error: ", 1)[1] for line in self._log if line.startswith("mim: error: ")]
        usage = any(line.startswith("usage:") for line in self._log)  # argparse's own errors: keep the whole tail
        if user_errors and self.returncode == 2 and not usage:  # mimcore's message, printed without --progress json
            return user_errors[-1]
        what = " ".join(self.argv[:1]) or "mimcore"
        rc = self.returncode
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            head = f"The {what} job was killed by {name}"
            if -rc == getattr(signal, "SIGKILL", 9):
                head += " (often the system running out of memory: try a smaller model or volume, or the CPU)"
        else:
            head = f"The {what} job failed (exit code {rc})"
        tail = self.log_tail()
        text = "\n".join(tail)
        if "No module named mimcore" in text or "No module named 'mimcore'" in text:
            head += (f". The Python it ran ({self.python}) cannot import mimcore: install the module's Python "
                     "packages (MiMSlicer: Setup) or add mimcore to that Python")
        return head + (":\n" + text if tail else ", without any output.")


class CommandJob(Job):
    """Any command line (``pip``, ...) run like a :class:`Job`: own process group, output as
    ``log`` events (JSON event lines still parsed), non-blocking poll, tree-killing cancel.
    ``name`` is what error messages call it ("The pip install job failed ...")."""

    def __init__(self, command: Iterable[str], name: str = "command", **kwargs):
        super().__init__([name], **kwargs)
        self._command = [str(c) for c in command]

    @property
    def command(self) -> list[str]:
        return list(self._command)


def _parse_event(line: str) -> dict | None:
    """The progress event on one stdout line of the child, or None (``mimcore.events.parse_event``)."""
    return _event_reader()(line)


@functools.lru_cache(maxsize=None)
def _event_reader() -> Callable[[str], dict | None]:
    try:
        from mimcore.events import parse_event  # torch-free: the standard library only
    except ImportError:
        return _parse_event_without_mimcore
    return parse_event


def _parse_event_without_mimcore(line: str) -> dict | None:
    """``mimcore.events.parse_event``, for a Python that cannot import mimcore (module doc)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


def _kill_tree(process: subprocess.Popen) -> None:
    """Terminate ``process`` and its descendants, then reap it.

    POSIX: SIGTERM to its process group (and to any descendant that left the group),
    SIGKILL after a grace period to whatever is left. Windows: ``taskkill /T /F``.
    """
    if os.name == "nt":
        if process.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        process.wait()
        return
    escaped = [pid for pid in _descendants(process.pid) if _pgid(pid) != process.pid]
    for sig, grace in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, None)):
        for target, send in [(process.pid, os.killpg)] + [(pid, os.kill) for pid in escaped]:
            try:
                send(target, sig)  # the child leads its own group (start_new_session): killpg reaches the tree
            except (ProcessLookupError, PermissionError):
                pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if not _group_alive(process.pid) and not escaped:
            break
    process.wait()


def _signal_tree(process: subprocess.Popen, sig) -> None:
    """Send ``sig`` to the child's process group (POSIX); nothing on Windows (taskkill does it all)."""
    if sig is None or os.name == "nt":
        return
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _descendants(pid: int) -> list[int]:
    """PIDs of the descendants of ``pid`` (psutil if installed, else /proc)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is gone
        return []
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def poll_until(poll: Callable[[], bool], timeout: float | None = None, interval: float = 0.05) -> bool:
    """Call ``poll`` (True while running) until it returns False (-> True) or ``timeout``
    seconds pass (-> False). For scripts and tests; a GUI polls from a timer instead."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while poll():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
