"""Run logs shared by pre-training and fine-tuning: metrics.jsonl lines and TensorBoard scalars."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from mimcore.errors import MimError


def tensorboard_writer(run_dir: Path, args):
    if not args.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; no TensorBoard logs are written")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (a resumed run rewrites what follows); the
    file is replaced atomically. A last line cut short by a kill is dropped."""
    from mimcore.files import atomic_write_text

    if not path.exists():
        return
    lines = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(ln)
        except ValueError:
            continue  # a line cut short when the run was killed
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            lines.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in lines), what="metrics log")


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line to a run log; MimError (what to do) when it cannot be written."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise MimError(f"cannot write the run log {path}: {err.strerror or err}. Free some space or make the "
                       "folder writable, then continue with --resume") from None


def log_metrics(path: Path, writer, step: int, metrics: dict, tag: str = "pretrain") -> None:
    """One step's metrics: a line of ``metrics.jsonl`` and TensorBoard scalars under ``tag``."""
    append_jsonl(path, {"step": step, **metrics})
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f"{tag}/{k}", v, step)
