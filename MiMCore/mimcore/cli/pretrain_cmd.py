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
from mimcore.methods.recipes import RECIPES
from mimcore.methods.registry import ALL_BACKBONES, BACKBONES, METHODS, resolve_backbone

ALIGNMENTS = ("region", "published", "ce")


def _per_method(field: str, fmt=lambda v: f"{v:g}") -> str:
    """'mim 0.05, mae 0.05, ...': a recipe field of every method, for the help texts."""
    return ", ".join(f"{m} {fmt(getattr(r, field))}" for m, r in RECIPES.items())


def _lr_defaults() -> str:
    return "; ".join(f"{m} {r.lr:g}" + (f" at {r.lr_batch} crops per step, scaled linearly" if r.lr_batch else "")
                     for m, r in RECIPES.items())


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
    src.add_argument("--hu-window", nargs=2, type=float, metavar=("MIN", "MAX"),
                     help="HU window scaled to [0, 1]. Default: the method's published window (MiM, GMIM "
                          "-1000 1000; MAE, SimMIM -175 250).")
    src.add_argument("--spacing", nargs="+", metavar="MM",
                     help="Resample every volume to this voxel size in mm, X Y Z (along its axes once reoriented "
                          "to RAS) before cropping, or 'native' to keep it. Default: as published: native for "
                          "MiM and GMIM, 1.5 1.5 2 for MAE and SimMIM (BTCV).")
    src.add_argument("--crop-foreground", action=argparse.BooleanOptionalAction, default=None,
                     help="Cut each windowed volume to its foreground (MONAI CropForegroundd) before cropping. "
                          "Default: as published (on for MAE and SimMIM, off for MiM and GMIM).")
    src.add_argument("--crops-per-volume", type=int, metavar="K",
                     help="Consecutive crops cut from one volume (MAE/SimMIM: 4 volumes x 4 crops per step). "
                          "Default: as published (" + _per_method("crops_per_volume", str) + ").")
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
    run.add_argument("--lr", type=float,
                     help="Peak learning rate, used as given (or scaled with --lr-batch). Default: the method's "
                          "published rule: " + _lr_defaults() + ".")
    run.add_argument("--lr-batch", type=int, metavar="N",
                     help="--lr is the rate at N crops per step: lr x (batch x accum x processes) / N.")
    run.add_argument("--base-lr", type=float, help="lr = base-lr x effective batch / 256 (instead of --lr).")
    run.add_argument("--min-lr", type=float,
                     help="Floor of the cosine schedule. Default: as published (" + _per_method("min_lr") + ").")
    run.add_argument("--weight-decay", type=float,
                     help="AdamW weight decay. Default: as published (" + _per_method("weight_decay") + ").")
    run.add_argument("--betas", nargs=2, type=float, metavar=("B1", "B2"),
                     help="AdamW betas. Default: as published (" + _per_method("betas", lambda b: "%g %g" % b) + ").")
    run.add_argument("--warmup-epochs", type=float,
                     help="Linear warm-up length in epochs. Default: the published fraction of the run (MiM "
                          "40 of 800 epochs, MAE 300 of 3,000, SimMIM 50 of 1,000, GMIM 500 of 4,000 steps).")
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
                     help="Continue exactly from the latest checkpoint in --output (none yet: start at step 0), "
                          "or from CKPT.")
    run.add_argument("--overwrite", action="store_true",
                     help="Replace a previous run in --output: delete its checkpoints, logs and curves (other "
                          "files are kept). Without it (or --resume) a non-empty --output is refused.")
    run.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                     help="Keep only the N latest checkpoints (the final one among them); 0 (default) keeps all.")
    run.add_argument("--no-tensorboard", action="store_true")
    run.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                     help="bar (default), json (one event per line on stdout, for GUIs) or none.")
    run.add_argument("--alignment", choices=ALIGNMENTS,
                     help="MiM's cross-level alignment: region (default; child vs its parent region), published "
                          "(the released 'byol' terms) or ce (the released default: classify the child's octant).")
    run.add_argument("--mim", type=json.loads, default={}, metavar="JSON",
                     help='MiM settings, e.g. \'{"level2_mask_ratio": 0.6, "loss_weights": {...}}\'.')
    run.add_argument("--method-config", type=json.loads, default={}, metavar="JSON",
                     help='Settings of the method, e.g. \'{"mask_ratio": 0.6}\' for MAE/SimMIM.')
    defaults = defer_defaults(p)
    p.set_defaults(func=lambda args: handler(args, defaults))
    return p


class _Unset:
    """The parsed value of an option not given on the command line (see :func:`defer_defaults`)."""

    def __repr__(self) -> str:
        return "<not given>"


UNSET = _Unset()


def defer_defaults(parser: argparse.ArgumentParser) -> dict:
    """Make every option of ``parser`` parse to :data:`UNSET` unless given on the command line,
    and return the built-in defaults: so that a value given on the command line (even one equal
    to the default, e.g. ``--workers 0``) wins over ``--config``, which wins over the default
    (:func:`resolve_options`). The defaults are also kept as ``parser.built_in_defaults``."""
    defaults = {a.dest: a.default for a in parser._actions
                if a.dest not in ("help", "config") and a.default is not argparse.SUPPRESS}
    parser.set_defaults(**{dest: UNSET for dest in defaults})
    parser.built_in_defaults = defaults
    return defaults


def resolve_options(args: argparse.Namespace, defaults: dict) -> None:
    """Give every option its value, in order of precedence: the command line, the ``--config``
    recipe (:func:`apply_config`), the built-in default."""
    unset = {dest for dest, value in vars(args).items() if value is UNSET}
    recipe = apply_config(args, unset) if getattr(args, "config", None) else {}
    for dest in unset - set(recipe):
        setattr(args, dest, defaults[dest])
    if recipe.get("effective_batch") and "accum" in unset and "accum" not in recipe:
        eff = recipe["effective_batch"]
        per_step = args.batch * int(os.environ.get("WORLD_SIZE", "1"))
        if eff % per_step:
            raise MimError(f"effective_batch {eff} of {args.config} is not a multiple of batch x processes = "
                           f"{per_step}")
        args.accum = eff // per_step


def apply_config(args: argparse.Namespace, unset: set[str]) -> dict:
    """Set the options in ``unset`` (not given on the command line) that a recipe JSON
    ``{"args": {...}, "effective_batch": N}`` sets. Returns ``{dest: value}`` of the recipe's
    options (plus ``effective_batch``, if it has one)."""
    path = Path(args.config)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        recipe = dict(cfg["args"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise MimError(f"cannot use recipe {path}: {e}; it must be JSON with an \"args\" object") from None
    given = {}
    for key, value in recipe.items():
        if key.startswith("_"):
            continue  # a comment
        dest = key.replace("-", "_")
        if not hasattr(args, dest) or dest in ("func", "command", "config"):
            raise MimError(f"recipe {path} sets unknown option {key!r}")
        given[dest] = value
        if dest in unset:
            setattr(args, dest, value)
    if cfg.get("effective_batch"):
        given["effective_batch"] = cfg["effective_batch"]
    return given


def parse_spacing(values) -> tuple[float, float, float] | str | None:
    """``--spacing``: None (the method's recipe), "native", or three sizes in mm."""
    from mimcore.data.preprocess import parse_spacing_option

    return None if values is None else parse_spacing_option(values, ("native",))


def handler(args: argparse.Namespace, defaults: dict) -> int:
    from mimcore.training.run_folder import claim_before_launch

    resolve_options(args, defaults)
    with claim_before_launch(args.output, "pretrain", resume=args.resume, overwrite=args.overwrite) as folder:
        return _pretrain(args, folder)


def _pretrain(args: argparse.Namespace, folder) -> int:
    """Run the pre-training that ``args`` describe in the claimed run ``folder`` (None: the run claims it)."""
    from mimcore.training.pretrain import PretrainArgs, run_pretrain

    resolve_backbone(args.method, args.backbone)  # exit code 2 with the allowed pairs
    mim_settings = dict(args.mim)
    if args.alignment is not None:
        if args.method != "mim":
            raise MimError(f"--alignment is a MiM setting; --method {args.method} has no cross-level alignment")
        mim_settings["alignment"] = args.alignment

    summary = run_pretrain(PretrainArgs(
        output=args.output, datalist=args.datalist, data_dir=args.data_dir, section=args.section,
        preset=args.preset, batch=args.batch, accum=args.accum, steps=args.steps, epochs=args.epochs,
        warmup_steps=args.warmup_steps, warmup_epochs=args.warmup_epochs, base_lr=args.base_lr, lr=args.lr,
        lr_batch=args.lr_batch, min_lr=args.min_lr, betas=tuple(args.betas) if args.betas else None,
        crops_per_volume=args.crops_per_volume, crop_foreground=args.crop_foreground,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, seed=args.seed, device=args.device,
        precision=args.precision, workers=args.workers, save_every=args.save_every, log_every=args.log_every,
        resume=args.resume, overwrite=args.overwrite, keep_checkpoints=args.keep_checkpoints,
        progress=args.progress, tensorboard=not args.no_tensorboard,
        hu_window=tuple(args.hu_window) if args.hu_window else None, spacing=parse_spacing(args.spacing),
        mim=mim_settings, method=args.method, backbone=args.backbone,
        method_config=args.method_config,
    ), folder)
    if args.progress != "json" and "checkpoint" in summary:
        print(f"final checkpoint: {summary['checkpoint']}")
        print(f"loss curve:       {summary['loss_curve']}")
    return 0
