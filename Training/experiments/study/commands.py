"""The ``mim`` command lines of the study's steps."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from study.settings import Arm, StudyError


def shell(cmd: list) -> str:
    return shlex.join(str(c) for c in cmd)


def flags(args: dict) -> list[str]:
    """``{"lr": 1e-3, "spacing": [3, 3, 3], "no-tensorboard": True}`` -> CLI options."""
    out = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        out.append(f"--{key}")
        if value is True:
            continue
        out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return out


def launcher(cfg: dict) -> list[str]:
    return list(cfg.get("launcher") or [sys.executable, "-m", "mimcore"])


def mim(*args) -> list[str]:
    """A single-process ``mim`` command (segment, evaluate)."""
    return [sys.executable, "-m", "mimcore", *map(str, args)]


def pretrain_command(cfg: dict, data: dict, arm: Arm, seed: int, steps: int, output: Path,
                     probe: bool = False) -> list[str]:
    pre = cfg["pretrain"]
    args = dict(pre.get("args", {}))
    args.update(pre.get("methods", {}).get(arm.method, {}))
    eff = args.pop("effective_batch", None)
    frac = args.pop("warmup_fraction", pre.get("warmup_fraction"))
    if eff:
        per_step = int(args.get("batch", 1)) * int(cfg.get("processes", 1))
        if eff % per_step:
            raise StudyError(f"effective_batch {eff} of {arm.method} is not a multiple of batch x processes "
                             f"= {per_step}")
        args["accum"] = eff // per_step
    if "warmup-steps" not in args and frac is not None:  # without: the method's published fraction
        args["warmup-steps"] = max(1, round(frac * steps)) if isinstance(steps, int) else f"<{frac:.0%} of the steps>"
    if probe:
        args.update({"warmup-steps": 1, "log-every": 1, "save-every": None})
    cmd = launcher(cfg) + ["pretrain", "--datalist", str(data["paths"]["pretrain"])]
    if data.get("pretrain_section"):
        cmd += ["--section", data["pretrain_section"]]
    cmd += ["--method", arm.method, "--backbone", arm.backbone, "--preset", cfg["preset"], "--steps", str(steps),
            "--seed", str(seed), "--device", cfg.get("device", "auto"), "--output", str(output),
            "--progress", "json"] + flags(args)
    return cmd


def finetune_command(cfg: dict, data: dict, arm: Arm, seed: int, init: Path | None, output: Path) -> list[str]:
    ft = cfg["finetune"]
    args = dict(ft.get("args", {}))
    args.update(ft.get("backbones", {}).get(arm.backbone, {}))
    cmd = launcher(cfg) + ["finetune", "--datalist", str(data["paths"]["finetune"]), "--section", "training",
                           "--val-section", "validation"]
    if cfg.get("labels"):
        cmd += ["--labels", cfg["labels"]]
    cmd += ["--init", str(init)] if init else ["--preset", cfg["preset"], "--backbone", arm.backbone]
    cmd += ["--steps", str(ft["steps"]), "--val-every", str(ft["val_every"]), "--seed", str(seed),
            "--device", cfg.get("device", "auto"), "--output", str(output), "--name", f"study-{arm.key}-seed{seed}",
            "--progress", "json"] + flags(args)
    return cmd
