"""``mim finetune``: fine-tune a segmentation network (MiMSegNet, UNETR or SwinUNETR) on labelled cases."""

from __future__ import annotations

import argparse

from mimcore.devices import DEVICE_CHOICES
from mimcore.methods.registry import ALL_BACKBONES, PRESET_NAMES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a segmentation model on labelled CT cases",
        description="Fine-tune a segmentation network from a pre-trained encoder or an existing model bundle: "
                    "the MiM network (ConvViT3D encoder + SwinUNETR-style decoder) for MiM and ConvViT3D "
                    "checkpoints, UNETR for ViT checkpoints (MAE, SimMIM), SwinUNETR for Swin checkpoints "
                    "(GMIM). The best model (validation Dice; or the last, --keep last) is written as a model bundle "
                    "to OUTPUT/model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--datalist", help="MONAI-style datalist JSON ('training'/'validation' entries with "
                                         "'image' and 'label', optional 'labels' names)")
    data.add_argument("--images", help="folder of images (instead of --datalist)")
    data.add_argument("--label-dir", help="folder of label maps named like their images")
    data.add_argument("--section", default="training", help="datalist section to train on")
    data.add_argument("--val-section", default="validation", help="datalist section to validate on "
                      "(the training cases when empty)")
    data.add_argument("--label-names", help="names of the label values: 1:liver,2:spleen or a JSON file "
                                            "(default: the datalist's 'labels')")
    data.add_argument("--labels", help="learn a subset and renumber: 'liver,spleen' (names), '5,1' (values) "
                                       "or '5:1,1:2' (old:new)")
    model = p.add_argument_group("model")
    model.add_argument("--init", help="start from: a `mim pretrain` run folder or checkpoint, an authors' MiM "
                                      ".pth, or a segmentation model bundle (folder, zip or library name)")
    model.add_argument("--preset", choices=sorted(PRESET_NAMES), help="model size (default: the --init's, else base)")
    model.add_argument("--backbone", choices=ALL_BACKBONES,
                       help="network when starting without pre-trained weights: convvit (MiM network, the "
                            "default), vit (UNETR) or swin (SwinUNETR); with --init it follows the checkpoint")
    model.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate of the transformer")
    model.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and head (the "
                       "pre-trained encoder stays as loaded)")
    model.add_argument("--grad-checkpoint", action="store_true", help="recompute encoder blocks in the "
                                                                     "backward pass (less memory, slower)")
    prep = p.add_argument_group("preprocessing")
    prep.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                      help="resample to this spacing in mm (default: an --init bundle's, else 1.5 1.5 2, the "
                           "BTCV setting)")
    prep.add_argument("--hu-window", type=float, nargs=2, metavar=("MIN", "MAX"),
                      help="HU window scaled to [0, 1] (default: an --init bundle's, else -175 250)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, help="optimizer steps")
    opt.add_argument("--epochs", type=float, help="passes over the training cases (instead of --steps)")
    opt.add_argument("--batch", type=int, default=1, help="cases per step")
    opt.add_argument("--samples-per-case", type=int, default=2, help="random crops drawn from each case")
    opt.add_argument("--lr", type=float, default=1e-4)
    opt.add_argument("--weight-decay", type=float, default=1e-5)
    opt.add_argument("--warmup-steps", type=int, help="default: 5%% of the steps")
    opt.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay (e.g. 0.75; 1 = off)")
    opt.add_argument("--clip-grad", type=float, default=0.0, help="gradient norm clipping (0 = off)")
    opt.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                     help="auto = bf16 (or fp16) on CUDA, fp32 on the CPU")
    opt.add_argument("--seed", type=int, default=0)
    val = p.add_argument_group("validation")
    val.add_argument("--val-every", type=int, help="validate every N steps (default: 5 times per run)")
    val.add_argument("--early-stop", type=int, default=0, help="stop after N validations without a better Dice")
    val.add_argument("--keep", choices=("best", "last"), default="best",
                     help="which model OUTPUT/model holds: the best validation Dice, or the last validated one "
                          "(use 'last' when the validation cases are also the reported ones, so that the "
                          "choice does not flatter the result)")
    val.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    val.add_argument("--sw-batch", type=int, default=2, help="windows per network call")
    job = p.add_argument_group("run")
    job.add_argument("--output", required=True, help="run folder (checkpoints, logs, OUTPUT/model bundle)")
    job.add_argument("--name", help="model name stored in the bundle (default: the run folder's name)")
    job.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    job.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    job.add_argument("--resume", nargs="?", const="auto", help="continue from the run folder's last checkpoint "
                                                               "(none yet: start at step 0), or from the one given")
    job.add_argument("--overwrite", action="store_true", help="replace a previous run in --output: delete its "
                     "checkpoints, logs, curves and model bundle (other files are kept); without it (or --resume) "
                     "a non-empty --output is refused")
    job.add_argument("--keep-checkpoints", type=int, default=0, metavar="N",
                     help="keep only the N latest checkpoints (and the best-validated step's); 0 keeps all")
    job.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    job.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    job.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    from mimcore.training.run_folder import claim_before_launch

    with claim_before_launch(ns.output, "finetune", resume=ns.resume, overwrite=ns.overwrite) as folder:
        return _finetune(ns, folder)


def _finetune(ns: argparse.Namespace, folder) -> int:
    """Run the fine-tuning that ``ns`` describes in the claimed run ``folder`` (None: the run claims it)."""
    from mimcore.training.finetune import FinetuneArgs, run_finetune

    fields = FinetuneArgs.__dataclass_fields__
    values = {k: v for k, v in vars(ns).items() if k in fields}
    for key in ("spacing", "hu_window"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    summary = run_finetune(FinetuneArgs(**values), folder)
    if ns.progress != "json" and summary.get("model"):
        kept = "" if summary["kept"] == "best" else f"; the bundle holds step {summary['step']} (--keep last)"
        print(f"best validation Dice {summary['best_dice']:.4f} (step {summary['best_step']}){kept}; "
              f"model bundle: {summary['model']}; curves: {summary['curves']}")
    return 0
