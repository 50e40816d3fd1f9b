"""Run logs shared by pre-training and fine-tuning: metrics.jsonl lines and TensorBoard scalars."""

from __future__ import annotations

import json
import warnings
from pathlib import Path


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
    """Keep only the metric lines up to ``step`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in lines))


def log_metrics(path: Path, writer, step: int, metrics: dict, tag: str = "pretrain") -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f"{tag}/{k}", v, step)
