"""``mim pretrain``: self-supervised pre-training (MiM by default; MAE, SimMIM, GMIM) on a
datalist or a folder of CT volumes.

Under ``torchrun --nproc_per_node N mim-pretrain-args...`` (``torchrun -m mimcore
pretrain ...``) the same command trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mimcore.errors import MimError
from mimcore.methods.registry import ALL_BACKBONES, BACKBONES, METHODS, resolve_backbone


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain", help="Self-supervised pre-training (MiM, MAE, SimMIM or GMIM).",
        description="Pre-train an encoder on unlabeled CT volumes: MiM (default; three-level mask-in-mask "
                    "reconstruction + cross-level alignment on ConvViT3D), MAE or SimMIM (75% of the tokens "
                    "hidden, L1 reconstruction; ViT-B/16 or ConvViT3D), GMIM (entropy-selected grid masking "
                    "on the Swin encoder). Writes safetensors checkpoints, metrics.jsonl, TensorBoard logs "
                    "and loss_curve.png into --output.")
    src = p.add_argument_group("data")
    src.add_argument("--datalist", metavar="JSON", help="MONAI-style datalist (e.g. the one `mim data samples` prints).")
    src.add_argument("--section", help="Datalist section (default: 'pretraining' if present, else 'training').")
    src.add_argument("--data-dir", metavar="DIR", help="Folder of NIfTI/NRRD volumes or DICOM series subfolders.")
    src.add_argument("--hu-window", nargs=2, type=float, default=(-1000.0, 1000.0), metavar=("MIN", "MAX"),
                     help="HU window scaled to [0, 1] (default -1000 1000, as published).")
    src.add_argument("--spacing", nargs=3, type=float, metavar=("X", "Y", "Z"),
                     help="Resample every volume to this voxel size in mm (along its axes once reoriented to "
                          "RAS) before cropping. Default: "
                          "no resampling, as MiM and GMIM are published; the MAE/SimMIM BTCV recipe uses "
                          "1.5 1.5 2.")
    run = p.add_argument_group("run")
    run.add_argument("--config", metavar="JSON",
                     help="Recipe file (e.g. Training/configs/mim_base_paper.json): its \"args\" replace the "
                          "defaults of the options below (options given on the command line win); its "
                          "\"effective_batch\" sets --accum = effective_batch / (batch x processes).")
    run.add_argument("--output", "-o", required=True, metavar="DIR", help="Run folder (checkpoints, logs).")
    run.add_argument("--method", default="mim", choices=METHODS, help="Pre-training method (default mim).")
    run.add_argument("--backbone", choices=ALL_BACKBONES,
                     help="Encoder: " + "; ".join(f"{m}: {' or '.join(b)}" for m, b in BACKBONES.items())
                          + " (default: the first).")
    run.add_argument("--preset", default="base", choices=("base", "small", "tiny"), help="Model size (default base).")
    run.add_argument("--steps", type=int, help="Optimizer steps in the whole run.")
    run.add_argument("--epochs", type=float, help="Length in epochs instead of --steps.")
    run.add_argument("--batch", type=int, default=1, help="Crops per process per micro-batch (default 1).")
    run.add_argument("--accum", type=int, default=1, help="Gradient accumulation micro-batches (default 1).")
    run.add_argument("--base-lr", type=float, default=1e-4, help="lr = base-lr x effective batch / 256 (default 1e-4).")
    run.add_argument("--lr", type=float, help="Absolute learning rate (overrides --base-lr scaling).")
    run.add_argument("--weight-decay", type=float, default=0.05)
    run.add_argument("--warmup-epochs", type=float, default=40.0, help="Linear warm-up length (default 40 epochs).")
    run.add_argument("--warmup-steps", type=int, help="Warm-up length in steps (overrides --warmup-epochs).")
    run.add_argument("--clip-grad", type=float, default=0.0, help="Clip the gradient norm to this (0 = off).")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto).")
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                     help="auto = bf16 (or fp16 + grad scaler) on CUDA, fp32 on the CPU.")
    run.add_argument("--workers", type=int, default=0, help="Data-loader worker processes (default 0).")
    run.add_argument("--save-every", type=int, default=0, metavar="N", help="Also checkpoint every N steps.")
    run.add_argument("--log-every", type=int, default=1, metavar="N", help="Report progress every N steps.")
    run.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                     help="Continue exactly from the latest checkpoint in --output, or from CKPT.")
    run.add_argument("--no-tensorboard", action="store_true")
    run.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                     help="bar (default), json (one event per line on stdout, for GUIs) or none.")
    run.add_argument("--mim", type=json.loads, default={}, metavar="JSON",
                     help='MiM settings, e.g. \'{"level2_mask_ratio": 0.6, "loss_weights": {...}}\'.')
    run.add_argument("--method-config", type=json.loads, default={}, metavar="JSON",
                     help='Settings of the method, e.g. \'{"mask_ratio": 0.6}\' for MAE/SimMIM.')
    p.set_defaults(func=lambda args: handler(args, p))
    return p


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill options still at their default from a recipe JSON ``{"args": {...}, "effective_batch": N}``."""
    path = Path(args.config)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        recipe = dict(cfg["args"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise MimError(f"cannot use recipe {path}: {e}; it must be JSON with an \"args\" object") from None
    for key, value in recipe.items():
        dest = key.replace("-", "_")
        if not hasattr(args, dest):
            raise MimError(f"recipe {path} sets unknown option {key!r}")
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, value)
    eff = cfg.get("effective_batch")
    if eff and args.accum == parser.get_default("accum"):
        per_step = args.batch * int(os.environ.get("WORLD_SIZE", "1"))
        if eff % per_step:
            raise MimError(f"effective_batch {eff} of {path} is not a multiple of batch x processes = {per_step}")
        args.accum = eff // per_step


def handler(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from mimcore.training.pretrain import PretrainArgs, run_pretrain

    if args.config:
        apply_config(args, parser)
    resolve_backbone(args.method, args.backbone)  # exit code 2 with the allowed pairs

    summary = run_pretrain(PretrainArgs(
        output=args.output, datalist=args.datalist, data_dir=args.data_dir, section=args.section,
        preset=args.preset, batch=args.batch, accum=args.accum, steps=args.steps, epochs=args.epochs,
        warmup_steps=args.warmup_steps, warmup_epochs=args.warmup_epochs, base_lr=args.base_lr, lr=args.lr,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, seed=args.seed, device=args.device,
        precision=args.precision, workers=args.workers, save_every=args.save_every, log_every=args.log_every,
        resume=args.resume, progress=args.progress, tensorboard=not args.no_tensorboard,
        hu_window=tuple(args.hu_window), spacing=tuple(args.spacing) if args.spacing else None,
        mim=args.mim, method=args.method, backbone=args.backbone,
        method_config=args.method_config,
    ))
    if args.progress != "json" and "checkpoint" in summary:
        print(f"final checkpoint: {summary['checkpoint']}")
        print(f"loss curve:       {summary['loss_curve']}")
    return 0
