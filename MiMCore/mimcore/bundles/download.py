"""Verified, resumable downloads with the standard library (urllib) only.

``download(url, dest, sha256)`` fetches ``url`` into ``dest``:

- ``file://`` URLs and plain local paths are copied (offline use);
- HTTP(S) shows a tqdm progress bar on stderr (``progress``) and writes to ``dest.part``; a later call
  resumes a ``.part`` left by an interrupted download with an HTTP ``Range`` request,
  and starts over when the server ignores it (replies 200 instead of 206);
- one process at a time downloads a given ``dest`` (a lock file ``dest.lock``); a second
  one waits, then finds the verified file and returns it;
- the result must have the expected size and sha256, else it is deleted and a
  :class:`MimError` says expected vs actual; only a verified file is renamed to ``dest``;
- ``on_progress(done, total)`` (optional) is called as bytes arrive: ``done`` bytes are in
  the file (a resumed download starts at the bytes it already had), of ``total`` (the
  expected size, else what the server announced, else None); first when the transfer
  begins, then after every chunk (``mim models add --progress json`` turns these calls
  into ``progress`` events).
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mimcore import __version__
from mimcore.errors import MimError
from mimcore.files import sha256_file

_CHUNK = 1 << 16
_SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")

#: ``on_progress(done_bytes, total_bytes_or_None)``
ProgressCallback = Callable[[int, "int | None"], None]


def is_url(text: str) -> bool:
    """True for ``http://``, ``https://`` and ``file://`` addresses."""
    return urllib.parse.urlsplit(str(text)).scheme.lower() in ("http", "https", "file")


def local_path(url: str | os.PathLike) -> Path | None:
    """The local file a ``file://`` URL or a plain path names, or None for a remote URL."""
    text = str(url)
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise MimError(f"{text}: file:// URLs must name a local file (file:///path/to/file)")
        return Path(urllib.request.url2pathname(parts.path))
    if scheme in ("http", "https"):
        return None
    if Path(text).expanduser().exists():
        return Path(text).expanduser()
    if scheme and len(scheme) > 1:  # one letter: a Windows drive (C:\...)
        raise MimError(f"{text}: unsupported URL scheme {parts.scheme!r}; use https://, http://, file:// or a local path")
    return Path(text).expanduser()


def download(url: str, dest: str | os.PathLike, sha256: str, size: int | None = None,
             progress: bool = True, timeout: float = 60.0, on_progress: ProgressCallback | None = None) -> Path:
    """Fetch ``url`` (http(s), file:// or a local path) into ``dest``; returns ``dest``.

    ``sha256`` (hex) and ``size`` (bytes, optional) are the expected content; a ``dest``
    that already matches is not fetched again (and ``on_progress`` is not called).
    ``progress``: the tqdm bar on stderr; ``on_progress``: see the module doc. Raises
    :class:`MimError` on network errors (an interrupted HTTP download keeps ``dest.part``
    and resumes on the next call) and on a size or sha256 mismatch (the bad file is deleted).
    """
    if not isinstance(sha256, str) or not _SHA_RE.match(sha256):
        raise MimError(f"expected sha256 of {url} must be 64 hex digits, got {sha256!r}")
    sha256 = sha256.lower()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _matches(dest, sha256, size):
        return dest
    from filelock import FileLock, Timeout

    lock = FileLock(dest.with_name(dest.name + ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another download of {dest.name} to finish ...", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if _matches(dest, sha256, size):  # the other download finished it
            return dest
        return _download_locked(url, dest, sha256, size, progress, timeout, on_progress)
    finally:
        lock.release()


def _matches(dest: Path, sha256: str, size: int | None) -> bool:
    return dest.is_file() and (size is None or dest.stat().st_size == size) and sha256_file(dest) == sha256


def _download_locked(url: str, dest: Path, sha256: str, size: int | None, progress: bool, timeout: float,
                     on_progress: ProgressCallback | None) -> Path:
    part = dest.with_name(dest.name + ".part")
    source = local_path(url)
    report = on_progress or (lambda done, total: None)
    if source is not None:
        _copy_local(source, part, progress, report)
    else:
        _fetch_http(url, part, size, progress, timeout, report)
    _verify(part, url, sha256, size)
    os.replace(part, dest)
    return dest


def _bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, dynamic_ncols=True, disable=not enabled, leave=False)


def _copy_local(source: Path, part: Path, progress: bool, report: ProgressCallback) -> None:
    if not source.is_file():
        raise MimError(f"{source} does not exist or is not a file; check the path (or the registry entry)")
    total = source.stat().st_size
    written = 0
    report(written, total)
    with open(source, "rb") as src, open(part, "wb") as out, _bar(total, 0, source.name, progress) as bar:
        while chunk := src.read(1 << 20):
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
            report(written, total)
        out.flush()
        os.fsync(out.fileno())


def _fetch_http(url: str, part: Path, size: int | None, progress: bool, timeout: float,
                report: ProgressCallback) -> None:
    """Download into ``part``, resuming it with a Range request when it already holds bytes."""
    for _attempt in range(2):
        offset = part.stat().st_size if part.is_file() else 0
        if size is not None and offset > size:
            part.unlink()
            offset = 0
        if size is not None and offset == size and offset > 0:
            report(offset, size)
            return  # complete already; the checksum decides
        headers = {"User-Agent": f"mimcore/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and offset:  # our range starts past the end: the .part is bad, start over
                part.unlink()
                continue
            raise MimError(f"could not download {url}: HTTP {e.code} {e.reason}; check the URL "
                           "(or the registry entry) and that you may access it") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            raise MimError(f"could not download {url}: {reason}; check your network connection and proxy "
                           "settings, or download the file yourself and pass its local path") from None
        with response:
            status = response.status
            if offset and status == 206:
                match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
                if not match or int(match.group(1)) != offset:  # a range we did not ask for: start over
                    part.unlink()
                    continue
                mode = "ab"
            else:  # 200: the server ignored the Range header (or there was none): full download
                offset, mode = 0, "wb"
            length = response.headers.get("Content-Length", "")
            end = offset + int(length) if length.isdigit() else None
            _stream(response, part, mode, offset, end, size, url, progress, report)
        return
    raise MimError(f"could not download {url}: the server kept answering the resume request wrongly; "
                   f"delete {part} and try again")


def _stream(response, part: Path, mode: str, offset: int, end: int | None, size: int | None,
            url: str, progress: bool, report: ProgressCallback) -> None:
    """Append the response body to ``part`` from byte ``offset``; ``end``: where the server said it ends."""
    written = offset
    total = size if size is not None else end
    report(written, total)
    reporting = False  # an error of report (e.g. BrokenPipeError on a closed stdout) is not the network's
    try:
        with open(part, mode) as out, _bar(total, offset, Path(urllib.parse.urlsplit(url).path).name, progress) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
                reporting = True
                report(written, total)
                reporting = False
                if size is not None and written > size:
                    break  # longer than expected: the size check below refuses it
            out.flush()
            os.fsync(out.fileno())
    except (OSError, http.client.HTTPException) as e:
        if reporting:
            raise
        _interrupted(url, part, written, total, repr(e))
    if end is not None and written < end:  # http.client returns b"" when the connection drops early
        _interrupted(url, part, written, total, "the connection closed early")


def _interrupted(url: str, part: Path, written: int, total: int | None, why: str) -> None:
    of = f" of {total}" if total else ""
    raise MimError(f"the download of {url} was interrupted after {written}{of} bytes ({why}); run the "
                   f"same command again to resume it (the partial file {part} is kept)") from None


def _verify(path: Path, url: str, sha256: str, size: int | None) -> None:
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        path.unlink()
        raise MimError(f"the file downloaded from {url} has {actual_size} bytes, expected {size}; it was deleted. "
                       "Try again; if this persists, the file on the server differs from what the registry says")
    actual = sha256_file(path)
    if actual != sha256:
        path.unlink()
        raise MimError(f"the file downloaded from {url} has sha256 {actual}, expected {sha256}; it was deleted. "
                       "Try again; if this persists, the file on the server differs from what the registry says")


def read_text(url: str | os.PathLike, timeout: float = 30.0, limit: int = 16 << 20) -> str:
    """The text of a small file named by a local path, ``file://`` or ``http(s)://`` URL (e.g. a registry)."""
    source = local_path(url)
    try:
        if source is not None:
            return source.read_text(encoding="utf-8")
        request = urllib.request.Request(str(url), headers={"User-Agent": f"mimcore/{__version__}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read(limit).decode("utf-8")
    except FileNotFoundError:
        raise MimError(f"{url} does not exist; check the path") from None
    except urllib.error.HTTPError as e:
        raise MimError(f"could not read {url}: HTTP {e.code} {e.reason}; check the URL") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise MimError(f"could not read {url}: {getattr(e, 'reason', e)}; check the address and your "
                       "network connection, or use a local copy of the file") from None
    except UnicodeDecodeError:
        raise MimError(f"{url} is not a UTF-8 text file") from None
