"""``mim reconstruct``: show what a pre-trained model reconstructs on one crop - the three
mask-in-mask levels of MiM, the single masked crop of MAE, SimMIM and GMIM (hidden input,
reconstruction and original, as NIfTI files placed in the patient, a PNG sheet and a
summary.json). The logic is in :mod:`mimcore.reconstruct`. ``--progress`` takes the choices of
the other commands (bar, json, none; "text", its old name, still means bar).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``reconstruct`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "reconstruct",
        help="Show what a pre-trained model reconstructs on one crop (MiM: its three levels).",
        description="Cut a crop of a CT around a RAS position and reconstruct it, masked, with a pre-training "
                    "checkpoint. MiM: the crop is twice the network input and its three mask-in-mask levels "
                    "are reconstructed; MAE, SimMIM and GMIM: one masked crop (level 1 only). Writes, per "
                    "level and volume, the hidden input, the reconstruction and the original as NIfTI files "
                    "in HU placed at their true position in the patient (they overlay on the CT in 3D "
                    "Slicer), a PNG sheet levels.png and summary.json.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="C",
                        help="Pre-training checkpoint: a run folder (latest checkpoint) or a "
                             "checkpoint_NNNNNNNN.json/.safetensors file written by `mim pretrain`, or the "
                             "authors' published MiM pre-training .pth (read as plain tensors only).")
    parser.add_argument("--image", required=True, metavar="V",
                        help="CT volume: NIfTI, NRRD, MetaImage file or a DICOM series folder.")
    parser.add_argument("--center", nargs=3, type=float, metavar=("X", "Y", "Z"),
                        help="Crop centre in RAS millimetres, as 3D Slicer shows it (default: the volume's centre).")
    parser.add_argument("--output", metavar="DIR",
                        help="Output folder (default: ./mim_reconstruction_<image name>); files are overwritten.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random masks (default: 0).")
    parser.add_argument("--device", default="auto", help="auto (default: a GPU if there is one), cpu, cuda, cuda:N, mps.")
    parser.add_argument("--spacing", nargs="+", metavar="MM", default=["auto"],
                        help="Voxel size of the preview: 'auto' (default: the spacing the checkpoint was pre-trained "
                             "at, if it records one, else native), 'native' (no resampling), or X Y Z in mm along "
                             "the RAS axes (e.g. 1.5 1.5 1.5 for a thick-slice CT and a model pre-trained at native "
                             "spacing). The files are placed in the patient whatever the grid.")
    # "text" is the old name of "bar", still accepted but not shown
    parser.add_argument("--progress", choices=("bar", "json", "none", "text"), default="bar",
                        metavar="{bar,json,none}",
                        help="bar (default): a progress bar and a line per level; json: JSON lines (for the Slicer "
                             "module); none: only the final summary lines.")
    parser.set_defaults(func=handler)
    return parser


def handler(args: argparse.Namespace) -> int:
    """Handler of ``mim reconstruct``; returns 0 (MimError is turned into exit code 2 by main)."""
    from mimcore import events
    from mimcore.reconstruct import reconstruct
    from mimcore.reconstruct.spacing import parse_spacing_arg
    from mimcore.training.progress import Progress

    mode = "bar" if args.progress == "text" else args.progress
    as_json = mode == "json"
    spacing = parse_spacing_arg(args.spacing)  # MimError (exit 2) before any work
    report: Progress | None = None

    def progress(step: int, total: int, metrics: dict) -> None:
        nonlocal report
        if step == 0:  # the crop is ready: from here on the time per level gives the ETA
            report = Progress("reconstruct", total, mode)
            report.event("start", stage="reconstruct", step=0, total=total,
                         message=f"reconstructing {total} level(s) of {Path(args.image).name}")
            return
        report.update(step, metrics)
        if mode == "bar":
            loss = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            report.bar.write(f"level {step}/{total} reconstructed ({loss})", file=sys.stdout)

    def tell(kind: str, message: str) -> None:
        """A note or warning: a JSON event, or a line on stderr (through the bar, if one is drawn)."""
        if as_json:
            events.emit(kind, message=message)
        elif report is not None and report.bar is not None:
            report.bar.write(f"mim: {kind}: {message}", file=sys.stderr)
        else:
            print(f"mim: {kind}: {message}", file=sys.stderr, flush=True)

    def notice(message: str) -> None:
        tell("note", message)

    def warn(message: str) -> None:
        tell("warning", message)

    try:
        result = reconstruct(args.checkpoint, args.image, center_ras=args.center, output_dir=args.output,
                             seed=args.seed, device=args.device, progress=progress, notice=notice,
                             spacing=spacing, warn=warn)
    finally:
        if report is not None:
            report.close()
    if as_json:
        events.emit("done", outputs=result.outputs())
    else:
        for i, folder in enumerate(result.level_dirs, start=1):
            n = sum(1 for f in result.files if f.parent == folder)
            print(f"level {i}: {n} NIfTI files (hidden/reconstruction/original, HU) in {folder}")
        print(f"sheet:   {result.sheet}")
        print(f"summary: {result.summary}")
    return 0
