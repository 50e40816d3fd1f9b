"""The cache of networks converted for OpenVINO (:mod:`mimcore.inference.openvino_net`).

One folder per weights, architecture, window size and library versions (``net.xml`` +
``net.bin``, fp32 weights: ~70 MB for ``small``, ~330 MB for ``base``) under
``$MIM_OPENVINO_CACHE`` or the per-user cache ``.../mimcore/openvino``. Every model a user
runs adds one, so the cache is kept within a size budget (``$MIM_OPENVINO_CACHE_GB``, default
:data:`DEFAULT_BUDGET_GB`): after a new entry is written, the least recently used entries
(a hit touches its folder) are removed until the rest fits; the entry in use is always kept,
and so is a budget of 0 keeping only it. Temporary folders of interrupted writes older than
:data:`STALE_TMP_S` go too. A removed entry only costs its model the conversion (seconds)
on its next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import platformdirs
import torch

from mimcore.errors import MimError
from mimcore.files import atomic_dir

DEFAULT_BUDGET_GB = 2.0
STALE_TMP_S = 3600.0


def cache_dir() -> Path:
    """Where converted networks are kept: ``$MIM_OPENVINO_CACHE`` or the per-user cache."""
    env = os.environ.get("MIM_OPENVINO_CACHE")
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("mimcore")) / "openvino"


def budget_bytes() -> int:
    """The cache's size budget from ``$MIM_OPENVINO_CACHE_GB`` (GB, default :data:`DEFAULT_BUDGET_GB`).

    Raises:
        MimError: the variable is not a number of GB >= 0."""
    raw = os.environ.get("MIM_OPENVINO_CACHE_GB", "").strip()
    if not raw:
        return int(DEFAULT_BUDGET_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise MimError(f"MIM_OPENVINO_CACHE_GB must be a size in GB of 0 or more (e.g. 2), got {raw!r}; "
                       "unset it for the default")
    return int(gb * 1e9)


def entry_key(ov_version: str, weights_sha256: str, architecture: dict, roi: int) -> str:
    """The folder name of one converted network."""
    blob = json.dumps({"weights": weights_sha256, "architecture": architecture, "roi": roi,
                       "openvino": ov_version, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_entry(core, folder: Path):
    """The cached OpenVINO model in ``folder`` (its use recorded), or None (absent or
    unreadable: the caller converts again)."""
    xml = folder / "net.xml"
    if not xml.is_file():
        return None
    try:
        model = core.read_model(str(xml))
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
        return None
    try:
        os.utime(folder)  # last used: what pruning keeps
    except OSError:
        pass
    return model


def write_entry(ov, model, folder: Path, budget: int) -> None:
    """Keep the converted model (fp32 weights) for later runs, then prune the cache to
    ``budget`` bytes; a cache that cannot be written only costs the next run the conversion."""
    try:
        with atomic_dir(folder, replace=True, what="OpenVINO cache folder") as tmp:
            ov.save_model(model, str(Path(tmp) / "net.xml"), compress_to_fp16=False)
    except Exception:  # noqa: BLE001
        return
    prune(folder.parent, budget, keep=folder)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prune(root: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries of ``root`` until the rest (``keep`` always
    among them) takes at most ``budget`` bytes, and temporary folders older than
    :data:`STALE_TMP_S`. -> the folders removed (newest use first)."""
    removed: list[Path] = []
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return removed
    now = time.time()
    entries = []
    for p in folders:
        try:
            used = p.stat().st_mtime
            if p.name.startswith("."):  # atomic_dir's temporary folder (".<key>.<random>.tmp")
                if now - used > STALE_TMP_S:
                    shutil.rmtree(p, ignore_errors=True)
                continue
            entries.append((used, p, _size(p)))
        except OSError:  # removed meanwhile by another process
            continue
    keep = keep.resolve() if keep is not None else None
    total = sum(size for p_used, p, size in entries if p.resolve() == keep)
    for _used, p, size in sorted(entries, key=lambda e: e[0], reverse=True):
        if p.resolve() == keep:
            continue
        if total + size <= budget:
            total += size
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
