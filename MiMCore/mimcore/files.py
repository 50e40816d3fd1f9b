"""File helpers shared by every writer in ``mimcore``: sha256, the one atomic writer, atomic
folders, umask-respecting permissions and the clean-up of orphaned temporary files.

Every output (label maps, ``.seg.nrrd``, reports, checkpoints, bundles, PNGs) goes through
:func:`atomic_write` (or :func:`atomic_dir` for a folder):

1. the content is written under a temporary name in the destination's folder
   (``.<name>.<8 random characters>.tmp``, optionally followed by a format suffix such as
   ``.nii.gz`` so that writers choosing the format by name still work);
2. the temporary file is ``fsync``-ed and, when a ``verify`` callback is given, re-read
   (e.g. a volume's header and its complete data stream);
3. it gets the permissions a plain ``open()`` would give (``0o666 & ~umask``: ``mkstemp``
   alone gives 0600, which stops a group from sharing the results);
4. it is renamed onto the final name (atomic on one file system) and the folder is
   ``fsync``-ed, so the rename survives a power cut.

Any failure (a full disk, a writer that raised, a writer that printed an error and returned
normally, a file that does not verify) raises :class:`~mimcore.errors.OutputError` (exit code
2 on the command line) naming the path and the cause, removes the temporary file, and leaves
the final name as it was: absent, or the previous complete file.

A process killed during a save leaves its temporary file behind; :func:`clean_orphans`
removes those (call it only while holding the folder's run lock, see there).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mimcore.errors import MimError, OutputError

_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_SPACE_WORDS = ("no space left", "disk quota exceeded", "not enough space", "disk full")
#: below this many free bytes after a failed write, the disk is taken to be full
FULL_DISK_BYTES = 1 << 20
#: what :func:`atomic_write` / :func:`atomic_dir` temporary names look like (and only those)
ORPHAN_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]{1,8}){0,3}$")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux
    ``/proc/self/status``); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the mode ``open()``/``mkdir()`` would have: ``0o666 & ~umask`` for a file,
    ``0o777 & ~umask`` for a folder (``mkstemp``/``mkdtemp`` make 0600/0700)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def fsync_path(path: str | os.PathLike, folder: bool = False) -> None:
    """Flush a file's (or a folder's entries') data to the disk. Folders cannot be opened for
    fsync on every system (Windows): there it is skipped."""
    if folder and (os.name == "nt" or not hasattr(os, "O_DIRECTORY")):
        return
    flags = (os.O_RDONLY | os.O_DIRECTORY) if folder else (os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as err:
        if not folder or err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes available to this user in ``folder``'s file system, or None if unknown."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _reason(err: BaseException) -> str:
    """The useful line of an exception (OS errors: their strerror; ITK: its last line)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror[0].lower() + err.strerror[1:]
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    match = re.search(r"(?:sitk::ERROR|itk::ERROR)[^:]*:\s*(.+)", text)
    return match.group(1).strip() if match else text


def _is_no_space(err: BaseException | None, folder: Path) -> bool:
    """Whether a failed write was caused by a full disk (or quota): by errno, by the message
    (safetensors, ITK), or because (almost) nothing is left free in the folder."""
    if isinstance(err, OSError) and err.errno in _NO_SPACE_ERRNOS:
        return True
    if err is not None and any(word in str(err).lower() for word in _NO_SPACE_WORDS):
        return True
    free = free_bytes(folder)
    return free is not None and free < FULL_DISK_BYTES


def _failure(path: Path, existed: bool, err: BaseException | None, no_space: bool, what: str) -> OutputError:
    """The OutputError for a failed atomic write of ``path``."""
    kept = f"the existing {path.name} was left unchanged" if existed else f"nothing was written at {path}"
    if no_space:
        cause = f"no space left on device (the file system holding {path.parent} is full)"
        advice = "Free some space or write to another folder, then run again"
    else:
        cause = _reason(err) if err is not None else "unknown error"
        advice = "Check that the folder is writable and the disk is not full, then run again"
    return OutputError(f"Could not write {what} {path}: {cause}; {kept}. {advice}.", path=path, no_space=no_space)


class _VerifyFailed(Exception):
    """Raised inside atomic_write when the written temporary file does not verify."""


def atomic_write(path: str | os.PathLike, write, verify=None, *, keep_suffix: str = "",
                 what: str = "") -> Path:
    """Write ``path`` atomically: ``write(tmp_path)``, fsync, ``verify(tmp_path)``, rename.

    write:       writes the whole content to the path it is given (a str). It may raise, or
                 (like some C libraries on a full disk) print an error and return: pass a
                 ``verify`` for writers that can fail silently.
    verify:      optional, called with the temporary path after fsync; raises any exception
                 when the file is incomplete or damaged (its message becomes the cause).
    keep_suffix: appended after ``.tmp`` (e.g. ``".nii.gz"``) for writers that choose the
                 format from the file name.
    what:        a word for messages (``"label map"``); default "file".

    Returns ``Path(path)``. Raises :class:`~mimcore.errors.OutputError` (a MimError: exit 2)
    naming the path and the cause ("no space left on device" on a full disk) when writing,
    syncing, verifying or renaming fails; a programming error in ``write`` (TypeError ...)
    propagates unchanged. In every failure the temporary file is removed and the final name
    keeps what it had (nothing, or the previous complete file).
    """
    path = Path(path)
    what = what or "file"
    existed = path.exists()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + keep_suffix)
        os.close(fd)
        write(tmp)
        fsync_path(tmp)
        if verify is not None:
            try:
                verify(tmp)
            except Exception as err:  # noqa: BLE001 - any verify failure means a bad file
                raise _VerifyFailed(_reason(err)) from err
        apply_umask(tmp)
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):
            fsync_path(path.parent, folder=True)
        return path
    except MimError:
        raise
    except (OSError, RuntimeError, _VerifyFailed) as err:
        no_space = _is_no_space(err, path.parent)  # measured before the temporary file is removed
        raise _failure(path, existed, err, no_space, what) from None
    except Exception as err:
        if any(word in str(err).lower() for word in _NO_SPACE_WORDS):  # e.g. SafetensorError
            raise _failure(path, existed, err, True, what) from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "") -> Path:
    """Write UTF-8 text atomically (see :func:`atomic_write`); verified by its size on disk."""
    data = text.encode("utf-8")
    return atomic_write_bytes(path, data, what=what)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "") -> Path:
    """Write bytes atomically (see :func:`atomic_write`); verified by its size on disk."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    def verify(tmp):
        size = os.path.getsize(tmp)
        if size != len(data):
            raise OSError(errno.EIO, f"{size} of {len(data)} bytes reached the disk")

    return atomic_write(path, write, verify, what=what)


def replace_dir(src: Path, dest: Path) -> None:
    """Rename folder ``src`` onto ``dest`` (same file system), replacing an existing ``dest``:
    the old one is renamed aside and deleted only once ``src`` is in place (put back if not)."""
    if not dest.exists():
        os.rename(src, dest)
        return
    trash = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    os.rmdir(trash)
    os.rename(dest, trash)
    try:
        os.rename(src, dest)
    except OSError:
        os.rename(trash, dest)
        raise
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = False, what: str = ""):
    """Build a folder atomically: ``with atomic_dir(dest) as tmp:`` fill ``tmp``; on a normal
    exit it gets umask permissions (``0o777 & ~umask``, not mkdtemp's 0700), its files are
    fsync-ed and it is renamed onto ``dest``.

    ``replace``: an existing ``dest`` folder is renamed aside, replaced, then deleted (restored
    if the rename fails); without it an existing ``dest`` is an OutputError. On any failure
    (in the block or after) the temporary folder is removed, ``dest`` is left as it was, and
    OS errors (and any error saying the disk is full) become
    :class:`~mimcore.errors.OutputError` ("no space left on device" ...); other exceptions
    raised in the block propagate unchanged.
    """
    dest = Path(path)
    what = what or "folder"
    existed = dest.exists()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    except OSError as err:
        raise _failure(dest, existed, err, _is_no_space(err, dest.parent), what) from None
    try:
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fsync_path(Path(root) / name)
        apply_umask(tmp, folder=True)
        if dest.exists() and not replace:
            raise OutputError(f"Could not write {what} {dest}: it exists. Choose a new name or remove it.",
                              path=dest)
        replace_dir(tmp, dest)
        with contextlib.suppress(OSError):
            fsync_path(dest.parent, folder=True)
    except MimError:
        raise
    except OSError as err:
        no_space = _is_no_space(err, dest.parent)
        raise _failure(dest, existed, err, no_space, what) from None
    except Exception as err:
        if any(word in str(err).lower() for word in _NO_SPACE_WORDS):  # e.g. SafetensorError
            raise _failure(dest, existed, err, True, what) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_orphans(folder: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Remove the temporary files and folders that :func:`atomic_write` / :func:`atomic_dir`
    leave in ``folder`` when a process is killed mid-save; returns what was removed.

    Only names of exactly that form (``.<name>.<8 characters>.tmp[.<suffix>]``, directly in
    ``folder``, not symlinks) older than ``min_age_s`` seconds are touched. A live writer's
    temporary file has the same form: call this only while holding the folder's lock (a run
    folder's run lock at start or resume), or pass a ``min_age_s`` longer than any save.
    A missing folder is not an error.
    """
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        if not ORPHAN_PATTERN.match(entry.name) or entry.is_symlink():
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            continue
    return removed


@contextlib.contextmanager
def captured_c_stderr(sink: list):
    """Capture what C libraries print on file descriptor 2 (e.g. NIfTI's "wrote only N of M
    bytes", which bypasses Python) into ``sink`` (one string appended). Python's own
    ``sys.stderr`` is flushed first. If the capture cannot be set up, nothing is captured."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    try:
        saved = os.dup(2)
        capture = tempfile.TemporaryFile()
    except OSError:
        yield
        return
    os.dup2(capture.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(OSError):
            capture.seek(0)
            sink.append(capture.read(1 << 16).decode("utf-8", "replace"))
        capture.close()
