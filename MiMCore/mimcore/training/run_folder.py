"""The run folder of ``mim pretrain`` and ``mim finetune``: one run at a time, never silently reused.

:func:`claim_run_folder` is the first thing a training run does with its ``--output``:

- **Lock.** The folder is locked for the whole run (:mod:`filelock`, an OS lock on
  ``.mim-run.lock`` that the system releases when the process dies, ``kill -9`` included).
  The holder's pid, host, start time and command line are written next to it
  (``.mim-run.holder.json``), so a second run into the same folder stops at once with a
  message that names the first one.
- **Orphans.** Temporary files that a process killed mid-save left behind
  (:func:`mimcore.files.clean_orphans`) are removed, safely, because the lock is held.
- **No silent reuse.** A folder that holds anything (hidden names aside) is refused unless
  the run continues it (``--resume``) or replaces it (``--overwrite``). ``--overwrite``
  removes only what a training run writes (:func:`run_files`: checkpoints, metrics,
  TensorBoard logs, curves, the fine-tuned model bundle); anything else in the folder is
  kept. The removal waits until the run has checked its inputs (:meth:`RunFolder.start`).
- **Resume.** ``--resume`` without a checkpoint path continues from the folder's latest
  checkpoint or, when there is none yet (a crash before the first save), starts from step 0
  and says so (:meth:`RunFolder.resume_point`); a checkpoint path given explicitly must exist.
- **Retention.** ``--keep-checkpoints N`` keeps the N most recent checkpoints plus those
  the run protects (fine-tuning: the best-validated step); older ones are deleted only after
  a newer one is completely written (:func:`prune_checkpoints`).

Under ``torchrun`` rank 0 does all of this; the other ranks learn its outcome (an error is
raised on every rank), so that no rank trains into a folder that was refused.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mimcore.errors import MimError

LOCK_FILE = ".mim-run.lock"
HOLDER_FILE = ".mim-run.holder.json"
#: checkpoint_<8 digits>.json / .safetensors / .optim.safetensors (mimcore.models.checkpoint)
CHECKPOINT_FILE = re.compile(r"^checkpoint_(\d{8})\.(json|safetensors|optim\.safetensors)$")
#: the other files and folders a training run writes into its folder
RUN_OUTPUTS = ("metrics.jsonl", "validation.jsonl", "loss_curve.png", "curves.png", "tensorboard")
#: the fine-tuned model bundle (removed only when it holds a bundle description)
BUNDLE_DIR, BUNDLE_DESCRIPTION = "model", "model.json"


def run_files(folder: Path) -> list[Path]:
    """What a training run wrote in ``folder`` (sorted): checkpoint files, metrics and
    validation logs, TensorBoard logs, the loss/curve PNGs and a ``model/`` bundle folder
    (only if it holds ``model.json``). Symbolic links are never counted as the run's."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            continue
        name = entry.name
        if CHECKPOINT_FILE.match(name) and entry.is_file():
            own.append(entry)
        elif name in RUN_OUTPUTS and (entry.is_dir() if name == "tensorboard" else entry.is_file()):
            own.append(entry)
        elif name == BUNDLE_DIR and entry.is_dir() and (entry / BUNDLE_DESCRIPTION).is_file():
            own.append(entry)
    return own


def other_entries(folder: Path) -> list[Path]:
    """The visible entries of ``folder`` that are not :func:`run_files` (hidden names, such as
    the lock and editor or file-system files, are not counted)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own = set(run_files(folder))
    return [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and p not in own]


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder`` (those whose JSON exists), ascending."""
    return sorted(int(m.group(1)) for p in Path(folder).glob("checkpoint_*.json")
                  if (m := CHECKPOINT_FILE.match(p.name)) and p.is_file())


def _checkpoint_files(folder: Path, step: int) -> list[Path]:
    """The files of checkpoint ``step``, the JSON first (it makes a checkpoint exist)."""
    stem = f"checkpoint_{step:08d}"
    return [Path(folder) / f"{stem}{suffix}" for suffix in (".json", ".safetensors", ".optim.safetensors")]


def prune_checkpoints(folder: Path, keep: int, newest: int, protect: Iterable[int] = ()) -> list[int]:
    """Delete the checkpoints of ``folder`` older than ``newest`` (the one just written) except
    the ``keep`` most recent complete ones (``newest`` included) and the steps in ``protect``.

    Call it only after checkpoint ``newest`` is completely written. Each checkpoint's JSON is
    deleted first, so an interrupted deletion never leaves something that looks like a
    checkpoint; files of older steps without a JSON (an interrupted save or deletion) go too.
    Checkpoints newer than ``newest`` (an abandoned continuation) are not touched. ``keep``
    < 1 keeps everything. Returns the deleted steps."""
    if keep < 1:
        return []
    folder = Path(folder)
    complete = [s for s in checkpoint_steps(folder) if s <= newest]
    kept = set(complete[-keep:]) | set(protect) | {newest}
    steps = {int(m.group(1)) for p in folder.iterdir() if (m := CHECKPOINT_FILE.match(p.name))}
    removed = []
    for step in sorted(s for s in steps if s < newest and s not in kept):
        for path in _checkpoint_files(folder, step):
            if path.is_file() and not path.is_symlink():
                path.unlink()
        removed.append(step)
    return removed


def _describe(paths: list[Path], limit: int = 4) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _command_line(limit: int = 300) -> str:
    """This process's command line, shortened, for the holder description."""
    argv = list(sys.argv) or ["?"]
    head = "python -m mimcore" if argv[0].endswith("__main__.py") else Path(argv[0]).name
    text = " ".join([head, *argv[1:]])
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _holder_text(info: dict | None) -> str:
    if not info:
        return "another process (it left no description of itself)"
    started = f", started {info['started']}" if info.get("started") else ""
    command = f": `{info['command']}`" if info.get("command") else ""
    return f"process {info.get('pid', '?')} on host {info.get('host', '?')}{started}{command}"


@dataclass
class RunFolder:
    """A claimed run folder (see the module doc). ``notes`` collects what the claim did, for
    the run to report (as ``note`` events) once it reports anything."""

    path: Path
    command: str = "pretrain"
    is_main: bool = True
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)
    created: bool = False  # the claim made the folder (removed again if the run leaves nothing in it)
    _lock: object = None

    # ------------------------------------------------------------------ lock
    def lock(self) -> None:
        """Take the folder's lock (created with the folder if needed) or raise MimError naming
        the run that holds it; then record this process as the holder."""
        from filelock import FileLock, Timeout

        from mimcore.files import atomic_write_text

        if self.path.exists() and not self.path.is_dir():
            raise MimError(f"--output {self.path} is a file, not a folder; give a folder for the run")
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MimError(f"cannot create the run folder {self.path}: {err.strerror or err}; choose a writable "
                           "--output folder") from None
        lock = FileLock(str(self.path / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise MimError(f"another run is writing into {self.path}: {_holder_text(self.holder())}. Two runs "
                           "in one folder would overwrite each other's checkpoints and logs: wait for that run "
                           "to finish (or stop it), or give this one another --output folder") from None
        except OSError as err:
            raise MimError(f"cannot lock the run folder {self.path}: {err.strerror or err}; choose a writable "
                           "--output folder") from None
        self._lock = lock
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        try:
            atomic_write_text(self.path / HOLDER_FILE, json.dumps(info) + "\n")
        except Exception:
            self.release()
            raise

    def holder(self) -> dict | None:
        """The description of the process holding the lock (None if unreadable)."""
        try:
            info = json.loads((self.path / HOLDER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def release(self) -> None:
        """Forget the holder description, then release the lock (idempotent). A folder the
        claim created and the run left empty (it failed before writing) is removed."""
        if self._lock is None:
            return
        try:
            (self.path / HOLDER_FILE).unlink(missing_ok=True)
            if self.created and {p.name for p in self.path.iterdir()} <= {LOCK_FILE}:
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ checks
    def clean_orphans(self) -> None:
        """Remove temporary files left by a process killed during a save (lock held)."""
        from mimcore.files import clean_orphans

        removed = clean_orphans(self.path)
        bundle = self.path / BUNDLE_DIR
        if bundle.is_dir() and not bundle.is_symlink():
            removed += clean_orphans(bundle)
        if removed:
            self.notes.append(f"removed {len(removed)} temporary file(s) left by an interrupted save: "
                              f"{_describe(removed)}")

    def check_new_run(self, resume: str | None, overwrite: bool) -> None:
        """MimError if the folder holds anything and the run neither continues it (``resume``)
        nor replaces it (``overwrite``)."""
        if resume and overwrite:
            raise MimError("--resume continues the run in --output and --overwrite deletes it: give one of them")
        if resume or overwrite:
            return
        own, other = run_files(self.path), other_entries(self.path)
        if own:
            steps = checkpoint_steps(self.path)
            last = f" (its last checkpoint is step {steps[-1]})" if steps else ""
            also = f"; it also holds {_describe(other)}, which --overwrite keeps" if other else ""
            raise MimError(f"the run folder {self.path} already holds a run{last}: {_describe(own)}{also}. "
                           "Continue it with --resume, replace it with --overwrite (deletes that run's "
                           "checkpoints, logs and model), or choose a new --output folder")
        if other:
            raise MimError(f"the run folder {self.path} is not empty: it holds {_describe(other)}. Choose a new "
                           "or empty --output folder, or pass --overwrite to write the run next to these files "
                           "(they are kept)")

    def resume_point(self, resume: str | None) -> Path | None:
        """The checkpoint JSON to continue from: None without ``resume``; for ``"auto"`` the
        folder's latest, or None (with a note: the run starts at step 0) when there is none
        yet; otherwise the checkpoint given, which must exist (MimError)."""
        from mimcore.models.checkpoint import find_checkpoint

        if not resume:
            return None
        if resume == "auto":
            if not checkpoint_steps(self.path):
                self.notes.append(f"--resume: no checkpoint in {self.path} yet (the run stopped before its first "
                                  "save, or never ran); starting from step 0")
                return None
            return find_checkpoint(self.path)
        return find_checkpoint(Path(resume))

    def start(self, fresh: bool) -> None:
        """Just before the run writes anything: with ``--overwrite`` (and ``fresh``: not
        resuming) delete what the previous run wrote, keeping every other file."""
        if not (self.is_main and self.overwrite and fresh):
            return
        own = run_files(self.path)
        for path in own:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        if own:
            self.notes.append(f"--overwrite: deleted the previous run in {self.path} ({_describe(own, 6)})")


def claim_before_launch(output: str | os.PathLike, command: str, *, resume: str | None, overwrite: bool):
    """For the command line: claim the folder at once, before torch is even imported (a second
    run is refused within a second), when the run is one process; under ``torchrun`` the ranks
    claim it together inside the run, and this is a context giving None."""
    import contextlib

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return contextlib.nullcontext(None)
    return claim_run_folder(output, command, resume=resume, overwrite=overwrite)


def claim_run_folder(output: str | os.PathLike, command: str, *, resume: str | None, overwrite: bool,
                     dist_info=None) -> RunFolder:
    """Lock ``output`` (rank 0), clean its orphaned temporary files and refuse it if it holds
    anything without ``resume``/``overwrite``; returns the held :class:`RunFolder` (use it as a
    context manager, so the lock goes with the run). Under ``torchrun`` every rank raises the
    same MimError when rank 0's claim fails."""
    is_main = dist_info is None or dist_info.is_main
    folder = RunFolder(Path(output), command, is_main=is_main, overwrite=overwrite)
    error = None
    if is_main:
        try:
            folder.lock()
            folder.clean_orphans()
            folder.check_new_run(resume, overwrite)
        except MimError as err:
            folder.release()
            error = str(err)
    if dist_info is not None and dist_info.enabled:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise MimError(error)
    return folder


def run_holding_folder(command: str, args, dist_info, folder: "RunFolder | None",
                       train: "Callable[[RunFolder], dict]") -> dict:
    """Run ``train(folder)`` holding the run folder ``args.output`` (lock, no silent reuse,
    orphans cleaned): ``folder`` if the caller claimed it already (the command line, before
    torch is imported), else claimed here by every rank together. ``args`` has ``output``,
    ``resume``, ``overwrite`` and ``keep_checkpoints``."""
    if args.keep_checkpoints < 0:
        raise MimError(f"--keep-checkpoints must be 0 (keep all) or more, not {args.keep_checkpoints}")
    if folder is not None:
        return train(folder)
    with claim_run_folder(args.output, command, resume=args.resume, overwrite=args.overwrite,
                          dist_info=dist_info) as held:
        return train(held)
