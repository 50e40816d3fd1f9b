"""What a client may open: the sample CTs, volumes in the data folders, pre-training
checkpoints - as lists of ``{"title", "value"}`` for the page's selectors.

A ``value`` is what the page sends back: ``sample:<path inside the sample folder>``,
``data:<path inside a data folder>`` or ``upload:<name>``. :meth:`Catalog.resolve` turns
it into a file path, through :func:`MiMStudio.access.confine`, so a client naming
anything else (``data:../../etc/passwd``, ``/root/...``) is refused.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from MiMSlicerLib.errors import MiMSlicerError
from MiMSlicerLib.jobs import default_python
from MiMStudio.access import confine

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SAMPLE_SECTIONS = ("training", "pretraining", "held_out", "mr")
MAX_LISTED = 500  # files listed per folder


def is_volume_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(VOLUME_SUFFIXES) and not name.endswith(".seg.nrrd")


def sample_datalist(python: str | None = None, env: dict | None = None, timeout: float = 600) -> Path:
    """The sample CTs' ``datalist.json``: ``mim data samples`` in a child process (a quick
    check when they are cached, a pip download the first time)."""
    import os

    run = subprocess.run([python or default_python(), "-m", "mimcore", "data", "samples"], capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    lines = [line.strip() for line in run.stdout.splitlines() if line.strip().endswith("datalist.json")]
    if run.returncode != 0 or not lines:
        raise MiMSlicerError("Could not get the sample CTs (`mim data samples`): "
                             + (run.stderr.strip().splitlines() or ["no output"])[-1])
    return Path(lines[-1])


def _inside(path: Path, root: Path) -> bool:
    """True if ``path`` (links followed) lies in ``root``: a link leading out is not offered."""
    return path.resolve().is_relative_to(root)


class Catalog:
    """The folders a client may read volumes and checkpoints from, and an upload folder."""

    def __init__(self, data_dirs: list[Path], sample_dir: Path | None, upload_dir: Path):
        self.data_dirs = [Path(d).resolve() for d in data_dirs]
        self.sample_dir = Path(sample_dir).resolve() if sample_dir else None
        self.upload_dir = Path(upload_dir).resolve()
        self._samples: list[dict] = []
        if self.sample_dir is not None:
            self._samples = self._read_samples(self.sample_dir / "datalist.json")

    @staticmethod
    def _read_samples(datalist: Path) -> list[dict]:
        try:
            data = json.loads(datalist.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        found, seen = [], set()
        for section in SAMPLE_SECTIONS:
            for entry in data.get(section) or []:
                image = str(entry.get("image") or "")
                if image and image not in seen and is_volume_file(datalist.parent / image):
                    seen.add(image)
                    found.append({"title": f"Sample: {image} ({entry.get('modality', 'CT')})",
                                  "value": f"sample:{image}"})
        return found

    def volumes(self) -> list[dict]:
        """Samples, then data-folder volumes, then uploads."""
        items = list(self._samples)
        for root in self.data_dirs:
            for path in sorted(p for p in root.rglob("*") if is_volume_file(p) and _inside(p, root))[:MAX_LISTED]:
                rel = path.relative_to(root).as_posix()
                items.append({"title": f"Data: {rel}", "value": f"data:{rel}"})
        for path in sorted(p for p in self.upload_dir.iterdir() if is_volume_file(p)):
            items.append({"title": f"Uploaded: {path.name}", "value": f"upload:{path.name}"})
        return items

    def checkpoints(self) -> list[dict]:
        """``mim pretrain`` run folders (holding ``checkpoint_*.json``) in the data folders."""
        items = []
        for root in self.data_dirs:
            runs = sorted({p.parent for p in root.rglob("checkpoint_*.json")})[:MAX_LISTED]
            for run in runs:
                rel = run.relative_to(root).as_posix() or "."
                items.append({"title": f"Pre-training run: {rel}", "value": f"data:{rel}"})
        return items

    def resolve(self, value: str, what: str = "volume") -> Path:
        """The file (or run folder) a selector value names; MiMSlicerError if it is not allowed."""
        kind, _, rest = str(value or "").partition(":")
        if kind == "sample" and self.sample_dir is not None:
            path = confine(rest, [self.sample_dir], what)
        elif kind == "data":
            path = None
            for root in self.data_dirs:
                try:
                    path = confine(rest, [root], what)
                except MiMSlicerError:
                    continue
                if path.exists():
                    break
            if path is None:
                confine(rest, self.data_dirs, what)  # raises the readable refusal
        elif kind == "upload":
            path = confine(rest, [self.upload_dir], what)
        else:
            raise MiMSlicerError(f"Refused: '{value}' names no sample, data-folder or uploaded {what}.")
        if not path.exists():
            raise MiMSlicerError(f"There is no {what} '{rest}' (any more): refresh the list.")
        return path
