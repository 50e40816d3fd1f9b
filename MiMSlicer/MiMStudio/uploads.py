"""Uploads from the browser: size-limited, into a private temporary folder of the server.

The page checks a file's size before sending it (so an oversized file is refused at once,
with the limit in the message); the server checks again on arrival, since a client can
skip the page's check. Names are reduced to a safe file name; the folder (mode 0700) is
removed when the server stops.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from MiMSlicerLib.errors import MiMSlicerError
from MiMStudio.catalog import VOLUME_SUFFIXES

MB = 1024 * 1024  # a megabyte, as --max-upload-mb counts it


def too_large_message(name: str, size: int, limit: int) -> str:
    return (f"'{name}' is {size / MB:.1f} MB; this server accepts uploads up to {limit / MB:.1f} MB. "
            "Ask its administrator to copy the file into a data folder, or to raise --max-upload-mb.")


def safe_name(name: str) -> str:
    """The last path component of ``name``, with only letters, digits, '.', '_', '-'."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base or "upload"


class UploadFolder:
    """A private folder for uploaded volumes (``path``), with a byte limit per file."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.path = Path(tempfile.mkdtemp(prefix="mimstudio-uploads-"))  # mkdtemp: mode 0700

    def save(self, file: dict) -> Path:
        """Write one file the page sent (``{"name", "size", "content": bytes}``); returns its path."""
        name = safe_name(file.get("name"))
        content = file.get("content")
        if isinstance(content, list):  # sent in chunks
            content = b"".join(bytes(c) for c in content)
        if content is None:
            raise MiMSlicerError(f"'{name}' arrived without content; try again.")
        size = len(content)
        if size > self.max_bytes:
            raise MiMSlicerError(too_large_message(name, size, self.max_bytes))
        if not name.lower().endswith(VOLUME_SUFFIXES):
            raise MiMSlicerError(f"'{name}' is not a volume file MiM Studio reads: upload "
                                 + ", ".join(VOLUME_SUFFIXES) + ".")
        target = self.path / name
        target.write_bytes(bytes(content))
        return target

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
