"""The pre-training engine: one function, :func:`run_pretrain`, used by ``mim pretrain``.

The method (MiM, MAE, SimMIM, GMIM) and its backbone come from
:mod:`mimcore.methods.registry`; the loop is the same for all of them, and for fine-tuning
(:class:`mimcore.training.engine.Engine`; this module supplies the model, crops and seeds). Per optimizer
step: ``accum`` micro-batches of ``batch`` crops per process, each through the method's
``forward(crop, generator)`` (the three levels for MiM); AdamW with warm-up + cosine;
mixed precision on CUDA (bf16 where supported, else fp16 with a gradient scaler);
optional clipping; DDP under ``torchrun``. Checkpoints record the method, backbone and
settings; resuming continues exactly and refuses a checkpoint of another method.

Every optimisation and data setting left unset (None) takes the method's published value
(:mod:`mimcore.methods.recipes`); :func:`resolve_settings` fills them in and
:func:`choose_lr` says how the learning rate was chosen.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimcore.data.preprocess import Preprocessing
from mimcore.errors import MimError
from mimcore.methods.recipes import recipe
from mimcore.methods.registry import METHOD_NAMES, build_pretrain_model, checkpoint_method, resolve_backbone
from mimcore.training import distributed
from mimcore.models.checkpoint import find_checkpoint, read_checkpoint
from mimcore.training.engine import (Engine, LossScaler, autocast_dtype, replay_schedule,  # noqa: F401 (re-exported)
                                     weights_digest, wrap_ddp)
from mimcore.training.optim import make_optimizer, scaled_lr, warmup_cosine
from mimcore.training.pretrain_data import RandomCrops, StepBatches, find_volumes, stream_seed, volumes_summary
from mimcore.training.logs import tensorboard_writer, truncate_metrics
from mimcore.training.progress import Progress
from mimcore.training.run_folder import RunFolder, run_holding_folder


@dataclass
class PretrainArgs:
    """Everything that defines a pre-training run (saved in every checkpoint).

    Learning rate: ``lr`` as given, or ``lr x crops per step / lr_batch`` with ``lr_batch``;
    ``base_lr x crops per step / 256``; or, with neither, the method's published rule.
    ``spacing``: "native" keeps the voxel size; None takes the method's recipe.
    Other None fields take the method's published value (:func:`resolve_settings`).
    """

    output: str
    datalist: str | None = None
    data_dir: str | None = None
    section: str | None = None
    preset: str = "base"
    batch: int = 1
    accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    base_lr: float | None = None
    lr: float | None = None
    lr_batch: int | None = None
    min_lr: float | None = None
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    crops_per_volume: int | None = None
    crop_foreground: bool | None = None
    clip_grad: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = 0
    save_every: int = 0
    log_every: int = 1
    resume: str | None = None  # "auto": the run folder's latest checkpoint (none yet: start at step 0)
    overwrite: bool = False  # delete a previous run's files in the run folder (run_folder.RunFolder)
    keep_checkpoints: int = 0  # keep the N latest checkpoints (0: all)
    progress: str = "bar"
    tensorboard: bool = True
    hu_window: tuple[float, float] | None = None
    spacing: tuple[float, float, float] | str | None = None  # mm; "native": keep; None: the recipe's
    mim: dict = field(default_factory=dict)  # MiM settings (--mim), kept for existing recipes
    method: str = "mim"
    backbone: str | None = None  # None: the method's default (registry.DEFAULT_BACKBONE)
    method_config: dict = field(default_factory=dict)  # settings of the method (--method-config)


def resolve_settings(args: PretrainArgs) -> PretrainArgs:
    """``args`` with every unset optimisation/data setting taken from the method's recipe
    (the learning rate is chosen later, by :func:`choose_lr`, once the batch is known)."""
    r = recipe(args.method)
    filled = {k: getattr(r, k) for k in ("weight_decay", "betas", "min_lr", "crops_per_volume", "crop_foreground",
                                          "hu_window") if getattr(args, k) is None}
    if args.spacing is None:
        filled["spacing"] = r.spacing or "native"
    out = dataclasses.replace(args, **filled)
    if out.crops_per_volume < 1:
        raise MimError(f"--crops-per-volume must be at least 1, not {out.crops_per_volume}")
    if out.min_lr < 0:
        raise MimError(f"--min-lr must be >= 0, not {out.min_lr:g}")
    return out


def choose_lr(args: PretrainArgs, crops_per_step: int) -> tuple[float, str]:
    """(peak learning rate, a sentence saying how it was chosen) for ``crops_per_step``."""
    name = METHOD_NAMES.get(args.method, args.method)
    if args.lr is not None and args.lr_batch:
        lr = args.lr * crops_per_step / args.lr_batch
        return lr, f"lr {lr:.3g} = --lr {args.lr:g} x {crops_per_step} crops per step / --lr-batch {args.lr_batch}"
    if args.lr is not None:
        return args.lr, f"lr {args.lr:.3g} (--lr, used as given)"
    if args.base_lr is not None:
        lr = scaled_lr(args.base_lr, crops_per_step)
        return lr, f"lr {lr:.3g} = --base-lr {args.base_lr:g} x {crops_per_step} crops per step / 256"
    r = recipe(args.method)
    return r.lr_for(crops_per_step), r.lr_rule(name, crops_per_step)


def _schedule_steps(args: PretrainArgs, steps_per_epoch: int) -> tuple[int, int]:
    if args.steps is None and args.epochs is None:
        raise MimError("give the length of the run: --steps N or --epochs E")
    total = args.steps if args.steps is not None else math.ceil(args.epochs * steps_per_epoch)
    if total < 1:
        raise MimError("the run must have at least one step")
    if args.warmup_steps is not None:
        warm = args.warmup_steps
    elif args.warmup_epochs is not None:
        warm = round(args.warmup_epochs * steps_per_epoch)
    else:  # the published fraction of the run (MiM 40 of 800 epochs = 5 %)
        warm = round(recipe(args.method).warmup_fraction * total)
    return total, min(warm, total)


def run_pretrain(args: PretrainArgs, folder: RunFolder | None = None) -> dict:
    """Run (or resume) pre-training. Returns a summary dict (also the ``done`` event).
    ``folder``: the run folder, already claimed (:func:`run_folder.claim_before_launch`)."""
    resolve_backbone(args.method, args.backbone)  # a wrong pair fails before anything starts
    return distributed.launch(args.device, lambda device, info: _run(args, device, info, folder))


def method_options(args: PretrainArgs) -> dict:
    """The method settings of a run: ``--method-config``, plus ``--mim`` for MiM."""
    if args.mim and args.method != "mim":
        raise MimError(f"--mim sets MiM's settings; for --method {args.method} use --method-config")
    return {**args.mim, **args.method_config}


def check_resumable(meta: dict, run_meta: dict, path: Path) -> None:
    """MimError unless the checkpoint ``meta`` was made by the same method, backbone, size and
    preprocessing (``run_meta["preprocessing"]``, a :class:`Preprocessing`) as this run."""
    method, backbone = checkpoint_method(meta)
    if (method, backbone) != (run_meta["method"], run_meta["backbone"]):
        raise MimError(f"{path} was pre-trained with --method {method} --backbone {backbone} "
                       f"({METHOD_NAMES.get(method, method)}); it cannot be resumed with --method "
                       f"{run_meta['method']} --backbone {run_meta['backbone']}. Resume with the same method, "
                       "or start a new run in another --output folder")
    if meta.get("model") != run_meta["model"]:
        if meta.get("preset") != run_meta.get("preset"):
            raise MimError(f"{path} was made with another model size; resume with --preset {meta.get('preset')}")
        changed = sorted(k for k in set(meta["model"]) | set(run_meta["model"])
                         if meta["model"].get(k) != run_meta["model"].get(k))
        raise MimError(f"{path} was made with other model or method settings ({', '.join(changed)}), e.g. by an "
                       "older mimcore or another --method-config; resume with those settings, or start a new run "
                       "in another --output folder")
    old, new = Preprocessing(**meta.get("preprocessing", {})), run_meta["preprocessing"]
    if old != new:
        raise MimError(f"{path} was pre-trained on other preprocessing ({_prep_options(old)}) than this run "
                       f"({_prep_options(new)}); resume with the same options, or start a new run in another "
                       "--output folder")


def _prep_options(prep: Preprocessing) -> str:
    """The command-line options that give ``prep``."""
    spacing = "--spacing " + " ".join(f"{v:g}" for v in prep.spacing) if prep.spacing else "--spacing native"
    fg = "--crop-foreground" if prep.crop_foreground else "--no-crop-foreground"
    return f"--hu-window {prep.hu_min:g} {prep.hu_max:g}, {spacing}, {fg}"


def _run(args: PretrainArgs, device: torch.device, dist_info: distributed.DistInfo,
         folder: RunFolder | None = None) -> dict:
    """The run, holding its run folder (:func:`run_folder.run_holding_folder`)."""
    return run_holding_folder("pretrain", args, dist_info, folder, lambda held: _train(args, device, dist_info, held))


def _train(args: PretrainArgs, device: torch.device, dist_info: distributed.DistInfo, folder: RunFolder) -> dict:
    run_dir = Path(args.output)
    options = method_options(args)
    args = resolve_settings(args)
    prep = Preprocessing(hu_min=args.hu_window[0], hu_max=args.hu_window[1],
                         spacing=None if args.spacing == "native" else args.spacing,
                         crop_foreground=bool(args.crop_foreground))
    volumes = find_volumes(args.datalist, args.data_dir, args.section)
    resume_from = folder.resume_point(args.resume)

    torch.manual_seed(args.seed)
    model, crop_size, model_meta = build_pretrain_model(args.method, args.backbone, args.preset, options)
    model = model.to(device)
    eff_batch = args.batch * args.accum * dist_info.world
    lr, lr_rule = choose_lr(args, eff_batch)
    optimizer = make_optimizer(model, lr, args.weight_decay, args.betas, recipe(args.method).decay_exempt)
    amp_dtype = autocast_dtype(args.precision, device)
    scaler = LossScaler(amp_dtype)

    start = 0
    if resume_from is not None:  # checked before the volumes are loaded and cached (minutes for many)
        meta, weights, optim_state = read_checkpoint(resume_from, with_optimizer=True)
        check_resumable(meta, {**model_meta, "preprocessing": prep}, resume_from)
        model.load_state_dict(weights)
        if optim_state is None:
            raise MimError(f"{resume_from} holds no optimizer state; it cannot be resumed exactly")
        try:
            optimizer.load_state_dict(optim_state)
        except ValueError as err:  # parameter groups of another mimcore version or method setting
            raise MimError(f"{resume_from} holds optimizer state that does not fit this run's parameter groups "
                           f"({err}); it was made by another mimcore version or other method settings. Resume "
                           "with the version that made it, or start a new run in another --output folder") from None
        scaler.load_state_dict(meta.get("scaler"))
        start = int(meta["step"])

    dataset = RandomCrops(volumes, crop_size, prep)
    per_rank = math.ceil(len(dataset) / dist_info.world) * args.crops_per_volume  # crops in one epoch
    steps_per_epoch = max(1, math.ceil(per_rank / (args.batch * args.accum)))
    total, warmup = _schedule_steps(args, steps_per_epoch)
    scheduler = warmup_cosine(optimizer, warmup, total, floor=args.min_lr)
    replay_schedule(scheduler, start)

    net = wrap_ddp(model, device, dist_info)
    n_micro = max(0, total - start) * args.accum
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), args.batch, start * args.accum * args.batch,
                                                           n_micro, args.seed, dist_info.rank, dist_info.world,
                                                           args.crops_per_volume),
                        num_workers=args.workers, pin_memory=device.type == "cuda")

    meta_base = {**model_meta, "crop_size": crop_size, "preprocessing": prep.to_dict(), "args": asdict(args),
                 "lr": lr, "effective_batch": eff_batch, "total_steps": total, "warmup_steps": warmup,
                 "world_size": dist_info.world}
    if dist_info.is_main:  # --overwrite: the previous run goes now, once the inputs are checked
        folder.start(fresh=resume_from is None)
    writer = tensorboard_writer(run_dir, args) if dist_info.is_main else None
    metrics_path = run_dir / "metrics.jsonl"
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, start)
    report = Progress("pretrain", total, args.progress, start=start, enabled=dist_info.is_main)
    report.event("start", stage="pretrain", message=volumes_summary(volumes), total=total, step=start,
                 device=str(device), lr=lr, effective_batch=eff_batch, method=model_meta["method"],
                 backbone=model_meta["backbone"], crop_size=crop_size)
    report.event("note", message=f"{lr_rule}; warm-up {warmup} of {total} steps, cosine to {args.min_lr:g}; "
                                 f"AdamW betas {tuple(args.betas)}, weight decay {args.weight_decay:g}",
                 lr_rule=lr_rule)
    for note in folder.notes:
        report.event("note", message=note)
    if resume_from is not None:
        report.event("resume", path=str(resume_from), step=start)

    engine = Engine(model, net, optimizer, scheduler, scaler, device, amp_dtype, dist_info, report, run_dir,
                    checkpoint_meta=lambda metrics: dict(meta_base, metrics=metrics), metrics_path=metrics_path,
                    writer=writer, accum=args.accum, clip_grad=args.clip_grad, log_every=args.log_every,
                    save_every=args.save_every, keep_checkpoints=args.keep_checkpoints)

    def forward(net: torch.nn.Module, crop: torch.Tensor, step: int, micro: int) -> dict:
        """The method's losses on one micro-batch, its masks drawn from this micro-batch's own seed."""
        gen = torch.Generator().manual_seed(stream_seed(args.seed, step * args.accum + micro, dist_info.rank))
        return net(crop, gen)

    step, metrics, _ = engine.run(start, total, iter(loader), forward)
    summary = {"step": step, "total": total, "metrics": metrics, "rank": dist_info.rank,
               "weights_sha256": weights_digest(model), "output": str(run_dir)}
    if dist_info.is_main:
        summary["checkpoint"] = str(find_checkpoint(run_dir))
        summary["loss_curve"] = str(plot_loss_curve(metrics_path, run_dir / "loss_curve.png"))
    return engine.done(summary)  # every rank reports, so DDP runs can be compared


def plot_loss_curve(metrics_path: Path, png: Path) -> Path:
    """PNG of the losses against the step, from ``metrics.jsonl``: the total and MiM's per-level
    losses (or any other loss a method reports) on the left, MiM's alignment terms next, and
    MiM's collapse monitor on the right: the child/parent cosine of matched pairs (solid)
    against mismatched ones (dashed), ``cos12_match`` ... (module doc of
    :mod:`mimcore.methods.mim`); with ``--alignment ce`` also the classifier's accuracy and its
    chance level on a second axis. Methods and older files without these keys get fewer panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every key, in first-seen order

    def series(key: str) -> list[float]:
        return [r.get(key, float("nan")) for r in rows]

    align = [k for k in ("a12", "a23") if k in keys]
    cosines = [k for k in keys if k.startswith(("cos12_", "cos23_"))]
    accs = [k for k in keys if k.startswith(("acc12", "acc23"))]
    recon = ["loss"] + [k for k in keys if k not in ("step", "loss", "lr", "grad_norm", *align, *cosines, *accs)]
    n_panels = 1 + bool(align) + bool(cosines or accs)
    fig, axes = plt.subplots(1, n_panels, figsize=(6 + 5 * (n_panels - 1), 4), squeeze=False)
    ax1 = axes[0][0]
    steps = series("step")
    for key in recon:
        ax1.plot(steps, series(key), label=key, lw=1, alpha=0.45 if key == "loss" else 0.6)
    window = max(1, len(rows) // 10)  # crops differ a lot (padding, air): show a running mean too
    running = np.convolve(series("loss"), np.ones(window) / window, mode="valid")
    ax1.plot(steps[window - 1:], running, color="k", lw=2, label=f"loss, mean of {window}")
    handles = {}
    if align:
        ax2 = axes[0][1]
        for key in align:
            ax2.plot(steps, series(key), label=key)
        ax1.set(title="reconstruction (norm-pix MSE) and total", xlabel="step")
        kind = "cross-entropy" if accs else "2 - 2 cos"
        ax2.set(title=f"cross-level alignment ({kind})", xlabel="step")
    else:
        ax1.set(title="pre-training loss", xlabel="step")
    if cosines or accs:
        ax3 = axes[0][-1]
        colors = {"12": "tab:blue", "23": "tab:orange"}
        for pair, color in colors.items():
            for part, style, lw, alpha in (("match", "-", 1.2, 1.0), ("mismatch", "--", 2.6, 0.5)):
                if f"cos{pair}_{part}" in keys:  # a thick pale dashed line stays visible under a collapse
                    ax3.plot(steps, series(f"cos{pair}_{part}"), style, color=color, lw=lw, alpha=alpha,
                             label=f"A{pair} {part}ed")
        title = "collapse monitor: child/parent cosine" + (" and accuracy" if accs else "")
        ax3.set(title=title, xlabel="step", ylabel="cosine")
        if accs:
            ax4 = ax3.twinx()
            for pair, color in colors.items():
                if f"acc{pair}" in keys:
                    ax4.plot(steps, series(f"acc{pair}"), ":", color=color, lw=2, label=f"A{pair} accuracy")
                if f"acc{pair}_chance" in keys:
                    ax4.plot(steps, series(f"acc{pair}_chance"), "-.", color=color, lw=0.8, label=f"A{pair} chance")
            ax4.set(ylabel="classifier accuracy (ce)", ylim=(0, 1.05))
            h3, l3 = ax3.get_legend_handles_labels()
            h4, l4 = ax4.get_legend_handles_labels()
            handles[ax3] = (h3 + h4, l3 + l4)
    for ax in axes[0]:
        ax.legend(*handles.get(ax, ()), fontsize="small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
