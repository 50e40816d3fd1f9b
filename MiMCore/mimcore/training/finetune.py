"""``mim finetune``: train a segmentation network on labelled CT cases.

The network is MiMSegNet (ConvViT3D), UNETR (ViT) or SwinUNETR (Swin), following what it
starts from (:mod:`mimcore.training.finetune_init`).

DiceCE loss, AdamW (layer-wise lr decay optional) with warm-up + cosine, and the training
loop of :class:`mimcore.training.engine.Engine` (mixed precision on CUDA, DDP under
``torchrun``, exact resume from atomic checkpoints); around it, validation every
``val_every`` steps by sliding-window inference with per-class Dice, the best model (or,
with ``keep="last"``, the last validated one) kept as a model bundle (``<output>/model``),
early stopping, TensorBoard, ``--progress json``
events, and a PNG of the curves at the end.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from monai.optimizers import WarmupCosineSchedule
from torch.utils.data import DataLoader

from mimcore import __version__
from mimcore.data.preprocess import Preprocessing
from mimcore.errors import MimError
from mimcore.inference.window import WindowSegmenter
from mimcore.models import segnet
from mimcore.training import distributed
from mimcore.models.checkpoint import find_checkpoint, read_checkpoint
from mimcore.training.engine import Engine, LossScaler, autocast_dtype, replay_schedule, weights_digest, wrap_ddp
from mimcore.training.finetune_data import LabelledCrops, cached_cases, collate_crops, find_cases
from mimcore.training.finetune_labels import resolve_labels
from mimcore.training.finetune_init import build_network, param_groups
from mimcore.training.finetune_plot import plot_curves
from mimcore.training.logs import append_jsonl, tensorboard_writer, truncate_metrics
from mimcore.training.pretrain_data import StepBatches, stream_seed
from mimcore.training.progress import Progress
from mimcore.training.run_folder import RunFolder, run_holding_folder

FORMAT = "mimcore.finetune.v1"


@dataclass
class FinetuneArgs:
    output: str
    datalist: str | None = None
    images: str | None = None
    label_dir: str | None = None
    section: str = "training"
    val_section: str = "validation"
    label_names: str | None = None
    labels: str | None = None  # subset / remap spec, see mimcore.data.labels.parse_label_selection
    init: str | None = None  # pre-training checkpoint, authors' .pth, or a segmentation bundle
    preset: str | None = None
    backbone: str | None = None  # network without --init: convvit (MiMSegNet), vit (UNETR), swin (SwinUNETR)
    spacing: tuple[float, float, float] | None = None  # None: the --init bundle's, else DEFAULT_SPACING
    hu_window: tuple[float, float] | None = None  # None: the --init bundle's, else DEFAULT_HU_WINDOW
    steps: int | None = None
    epochs: float | None = None
    batch: int = 1  # cases per step
    samples_per_case: int = 2  # crops drawn from each case
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int | None = None
    layer_decay: float = 1.0
    drop_path: float = 0.1
    freeze_encoder: bool = False
    grad_checkpoint: bool = False
    clip_grad: float = 0.0
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    val_every: int | None = None
    early_stop: int = 0  # validations without improvement before stopping; 0 = never
    keep: str = "best"  # the bundle holds the best-validated model ("best") or the last validated one ("last")
    overlap: float = 0.5
    sw_batch: int = 2
    save_every: int = 0
    resume: str | None = None  # "auto": the run folder's latest checkpoint (none yet: start at step 0)
    overwrite: bool = False  # delete a previous run's files in the run folder (run_folder.RunFolder)
    keep_checkpoints: int = 0  # keep the N latest checkpoints (0: all) and the best-validated step's
    progress: str = "bar"
    tensorboard: bool = True
    workers: int = 0
    name: str | None = None
    extra: dict = field(default_factory=dict)


def run_finetune(args: FinetuneArgs, folder: RunFolder | None = None) -> dict:
    """Run (or resume) fine-tuning. Returns a summary dict (also the ``done`` event).
    ``folder``: the run folder, already claimed (:func:`run_folder.claim_before_launch`)."""
    return distributed.launch(args.device, lambda device, info: _run(args, device, info, folder))


def validate(net: torch.nn.Module, cases, n_classes: int, device: torch.device, overlap: float, sw_batch: int,
             amp_dtype) -> np.ndarray:
    """Per-case, per-class Dice (n_cases, n_classes - 1); NaN where the class is absent from the reference."""
    net.eval()
    window = WindowSegmenter(net, segnet.input_size(net), device, overlap, sw_batch, amp_dtype=amp_dtype)
    rows = []
    for i in range(len(cases)):
        case = cases[i]
        pred = torch.from_numpy(window(torch.as_tensor(case["image"]), n_classes).astype(np.int64))[None, None]
        ref = torch.as_tensor(case["label"]).long()[None]
        d = compute_dice(one_hot(pred, n_classes), one_hot(ref, n_classes), include_background=False,
                         ignore_empty=True)
        rows.append(d[0].numpy())
    net.train()
    return np.stack(rows)


DEFAULT_SPACING = (1.5, 1.5, 2.0)  # mm, BTCV's fine-tuning spacing
DEFAULT_HU_WINDOW = (-175.0, 250.0)


def _mm(spacing) -> str:
    return " x ".join(f"{v:g}" for v in spacing) + " mm" if spacing else "native"


def finetune_preprocessing(args: FinetuneArgs, init_bundle=None) -> tuple[dict, list[str]]:
    """-> (the run's preprocessing dict, notes). Starting from a bundle (``init_bundle``) keeps
    its preprocessing, except what ``args`` gives explicitly (``spacing``, ``hu_window``): a
    bundle trained at 6 mm continued at 1.5 mm resamples to 1.5 mm, and a note says so. Without
    a bundle: ``args``' values, else :data:`DEFAULT_SPACING` and :data:`DEFAULT_HU_WINDOW`.

    Raises:
        MimError: a spacing or HU window that is not valid."""
    notes: list[str] = []
    if init_bundle is None:
        spacing, hu = args.spacing or DEFAULT_SPACING, args.hu_window or DEFAULT_HU_WINDOW
        prep = Preprocessing(hu_min=float(hu[0]), hu_max=float(hu[1]), spacing=tuple(spacing)).to_dict()
        return prep, notes
    prep = dict(init_bundle.description["preprocessing"])
    kept = []
    if args.spacing is not None and list(map(float, args.spacing)) != list(prep.get("spacing") or []):
        notes.append(f"resampling to --spacing {_mm(args.spacing)}, not the --init bundle's {_mm(prep.get('spacing'))}")
        prep["spacing"] = [float(v) for v in args.spacing]
    else:
        kept.append((f"spacing {_mm(prep.get('spacing'))}", "--spacing"))
    if args.hu_window is not None and [float(v) for v in args.hu_window] != [prep["hu_min"], prep["hu_max"]]:
        notes.append(f"HU window {args.hu_window[0]:g}..{args.hu_window[1]:g} (--hu-window), not the --init "
                     f"bundle's {prep['hu_min']:g}..{prep['hu_max']:g}")
        prep["hu_min"], prep["hu_max"] = float(args.hu_window[0]), float(args.hu_window[1])
    else:
        kept.append((f"HU window {prep['hu_min']:g}..{prep['hu_max']:g}", "--hu-window"))
    Preprocessing.from_dict(prep)  # validated
    if kept:
        notes.append(f"from the --init bundle: {' and '.join(k for k, _ in kept)} "
                     f"({' / '.join(f for _, f in kept)} change{'s it' if len(kept) == 1 else ' them'})")
    return prep, notes


def _run(args: FinetuneArgs, device: torch.device, dist_info: distributed.DistInfo,
         folder: RunFolder | None = None) -> dict:
    """The run, holding its run folder (:func:`run_folder.run_holding_folder`)."""
    return run_holding_folder("finetune", args, dist_info, folder, lambda held: _train(args, device, dist_info, held))


def _train(args: FinetuneArgs, device: torch.device, dist_info: distributed.DistInfo, folder: RunFolder) -> dict:
    run_dir = Path(args.output)
    train_cases = find_cases(args.datalist, args.images, args.label_dir, args.section)
    if not train_cases:
        raise MimError(f"no training cases in section '{args.section}' of {args.datalist}")
    val_cases = find_cases(args.datalist, None, None, args.val_section) if args.datalist else []
    val_note = None
    if not val_cases:
        val_cases = train_cases
        val_note = "no validation cases: validating on the training cases (Dice measures fit, not generalisation)"

    resume_from = folder.resume_point(args.resume)

    labels, mapping, init_bundle = resolve_labels(args)
    preset = args.preset or (init_bundle.description["architecture"].get("preset") if init_bundle else None) \
        or _init_preset(args.init) or "base"
    torch.manual_seed(args.seed)
    net, init_report, build_notes = build_network(args, preset, len(labels) + 1, labels, init_bundle)
    net = net.to(device)
    roi = segnet.input_size(net)
    kind = segnet.kind_of(net)
    prep, prep_notes = finetune_preprocessing(args, init_bundle if args.extra.get("prep_from_bundle", True) else None)
    build_notes = prep_notes + build_notes

    train_cache = cached_cases(train_cases, mapping, prep, roi)
    val_cache = train_cache if val_cases is train_cases else cached_cases(val_cases, mapping, prep, roi)
    dataset = LabelledCrops(train_cache, roi, args.samples_per_case)

    groups = param_groups(net, args.lr, args.weight_decay, args.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    amp_dtype = autocast_dtype(args.precision, device)
    scaler = LossScaler(amp_dtype)
    per_rank = math.ceil(len(dataset) / dist_info.world)
    steps_per_epoch = max(1, math.ceil(per_rank / args.batch))
    if args.steps is None and args.epochs is None:
        raise MimError("give the length of the run: --steps N or --epochs E")
    total = args.steps if args.steps is not None else math.ceil(args.epochs * steps_per_epoch)
    warmup = min(total // 2, args.warmup_steps if args.warmup_steps is not None else max(1, total // 20))
    val_every = args.val_every or max(1, total // 5)
    if args.keep not in ("best", "last"):
        raise MimError(f"keep must be 'best' or 'last', not {args.keep!r}")

    start, best, best_step, stale = 0, -1.0, 0, 0
    if resume_from is not None:
        meta, weights, optim_state = read_checkpoint(resume_from, with_optimizer=True, fmt=FORMAT)
        if meta["labels"] != [lab.to_dict() for lab in labels] or meta["total_steps"] != total:
            raise MimError(f"{resume_from} was made with other labels or another run length; resume with the "
                           "same --labels/--label-names and --steps/--epochs as the interrupted run")
        net.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
        scaler.load_state_dict(meta.get("scaler"))
        start, best, best_step, stale = int(meta["step"]), meta["best_dice"], meta["best_step"], meta["stale"]
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total)
    replay_schedule(scheduler, start)

    model = wrap_ddp(net, device, dist_info, find_unused_parameters=args.freeze_encoder)
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), args.batch, start * args.batch,
                                                           max(0, total - start), args.seed, dist_info.rank,
                                                           dist_info.world),
                        num_workers=args.workers, collate_fn=collate_crops, pin_memory=device.type == "cuda")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    names = [lab.name for lab in labels]
    bundle_desc = {
        "name": args.name or run_dir.name, "architecture": segnet.describe(net, preset),
        "labels": [lab.to_dict() for lab in labels], "preprocessing": prep,
        "inference": {"roi_size": [roi] * 3, "overlap": args.overlap, "sw_batch_size": args.sw_batch,
                      "mode": "gaussian", "tta_flips": False, "keep_largest": False},
    }
    meta_base = {"args": _jsonable(asdict(args)), "labels": bundle_desc["labels"], "preprocessing": prep,
                 "total_steps": total, "warmup_steps": warmup, "world_size": dist_info.world,
                 "init": init_report.to_dict() if init_report else None}
    if dist_info.is_main:  # --overwrite: the previous run goes now, once the inputs are checked
        folder.start(fresh=resume_from is None)
    writer = tensorboard_writer(run_dir, args) if dist_info.is_main else None
    metrics_path, val_path = run_dir / "metrics.jsonl", run_dir / "validation.jsonl"
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics_path, start)
        truncate_metrics(val_path, start)
    report = Progress("finetune", total, args.progress, start=start, enabled=dist_info.is_main)
    report.event("start", stage="finetune", total=total, step=start, device=str(device), labels=names,
                 cases=len(train_cases), validation_cases=len(val_cases), architecture=kind,
                 message=f"{len(train_cases)} training case(s), labels: {', '.join(names)}")
    if resume_from is not None:
        report.event("resume", path=str(resume_from), step=start)
    for note in ([init_report.summary()] if init_report else ["no --init: the encoder starts from random weights"]) \
            + build_notes + ([val_note] if val_note else []) + folder.notes:
        report.event("note", message=note)

    engine = Engine(net, model, optimizer, scheduler, scaler, device, amp_dtype, dist_info, report, run_dir,
                    checkpoint_meta=lambda metrics: dict(meta_base, metrics=metrics, best_dice=best,
                                                         best_step=best_step, stale=stale),
                    metrics_path=metrics_path, writer=writer, fmt=FORMAT, log_tag="finetune/train",
                    clip_grad=args.clip_grad, lr_group=-1, save_every=args.save_every,
                    keep_checkpoints=args.keep_checkpoints, protected=lambda: (best_step,))

    def save_bundle_now(step: int, dice: float | None, per_class: dict) -> None:
        from mimcore.bundles.bundle import save_bundle

        desc = dict(bundle_desc, training={
            "method": "mim-finetune", "mimcore_version": __version__, "step": step, "total_steps": total,
            "validation_dice": dice, "validation_per_class": per_class, "validated_on_training_cases": bool(val_note),
            "kept": args.keep,
            "init": init_report.to_dict() if init_report else None, "train_cases": len(train_cases),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "args": _jsonable(asdict(args))})
        save_bundle(run_dir / "model", {k: v.detach().cpu() for k, v in net.state_dict().items()}, desc)

    def seed_step(step: int) -> None:
        torch.manual_seed(stream_seed(args.seed, step, dist_info.rank))  # drop-path: same draws on resume

    def dice_ce(logits: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        return {"loss": loss_fn(logits.float(), batch[1])}

    def validate_every(step: int, metrics: dict) -> bool:
        """Every ``val_every`` steps and at the end: validate (rank 0), keep the bundle, adds
        ``dice`` to the metrics; True to stop early (told to every rank)."""
        nonlocal best, best_step, stale
        if not (step % val_every == 0 or step == total):
            return False
        flag = torch.zeros(1)
        if dist_info.is_main:
            dice = validate(net, val_cache, segnet.out_channels(net), device, args.overlap, args.sw_batch, amp_dtype)
            mean_class = _nanmean_rows(dice)
            per_class = {n: (None if math.isnan(v) else round(float(v), 4)) for n, v in zip(names, mean_class)}
            score = float(np.nanmean(mean_class)) if np.isfinite(mean_class).any() else 0.0
            improved = score > best
            if improved:
                best, best_step, stale = score, step, 0
            else:
                stale += 1
            if improved if args.keep == "best" else True:
                save_bundle_now(step, score, per_class)
            record = {"step": step, "dice": round(score, 4), "per_class": per_class,
                      "best_dice": round(best, 4), "best_step": best_step}
            append_jsonl(val_path, record)
            if writer is not None:
                writer.add_scalar("finetune/val/dice", score, step)
            metrics["dice"] = round(score, 4)
            report.event("validation", **record)
            if args.early_stop and stale >= args.early_stop:
                report.event("note", message=f"early stop at step {step}: no better Dice in "
                                             f"{stale} validations (best {best:.4f} at step {best_step})")
                flag[0] = 1
        if dist_info.enabled:
            dist.broadcast(flag, src=0)
        return bool(flag[0])

    step, metrics, stop = engine.run(start, total, iter(loader), lambda model, batch, step, micro: model(batch[0]),
                                     loss=dice_ce, before_step=seed_step, after_step=validate_every)
    summary = {"step": step, "total": total, "metrics": metrics, "best_dice": best, "best_step": best_step,
               "kept": args.keep,
               "weights_sha256": weights_digest(net), "output": str(run_dir), "rank": dist_info.rank,
               "early_stopped": stop}
    if dist_info.is_main:
        summary["model"] = str(run_dir / "model")
        summary["checkpoint"] = str(find_checkpoint(run_dir))
        summary["curves"] = str(plot_curves(metrics_path, val_path, run_dir / "curves.png"))
    return engine.done(summary)


def _init_preset(init: str | None) -> str | None:
    """The size of a pre-training checkpoint given as ``--init`` (so --preset may be left out)."""
    from mimcore.training.encoder_init import source_kind

    if not init or source_kind(init) != "pretrain":
        return None
    return json.loads(find_checkpoint(Path(init)).read_text(encoding="utf-8")).get("preset")


def _nanmean_rows(dice: np.ndarray) -> np.ndarray:
    """Mean over cases per class, NaN only where no case has the class."""
    out = np.full(dice.shape[1], np.nan)
    for c in range(dice.shape[1]):
        col = dice[:, c][~np.isnan(dice[:, c])]
        if col.size:
            out[c] = col.mean()
    return out


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
