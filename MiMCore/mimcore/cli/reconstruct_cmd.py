"""``mim reconstruct``: show what a pre-trained model reconstructs on one crop - the three
mask-in-mask levels of MiM, the single masked crop of MAE, SimMIM and GMIM (hidden input,
reconstruction and original, as NIfTI files placed in the patient, a PNG sheet and a
summary.json). The logic is in :mod:`mimcore.reconstruct`.
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
                             "checkpoint_NNNNNNNN.json/.safetensors file written by `mim pretrain`.")
    parser.add_argument("--image", required=True, metavar="V",
                        help="CT volume: NIfTI, NRRD, MetaImage file or a DICOM series folder.")
    parser.add_argument("--center", nargs=3, type=float, metavar=("X", "Y", "Z"),
                        help="Crop centre in RAS millimetres, as 3D Slicer shows it (default: the volume's centre).")
    parser.add_argument("--output", metavar="DIR",
                        help="Output folder (default: ./mim_reconstruction_<image name>); files are overwritten.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random masks (default: 0).")
    parser.add_argument("--device", default="auto", help="auto (default: a GPU if there is one), cpu, cuda, cuda:N, mps.")
    parser.add_argument("--progress", choices=("text", "json"), default="text",
                        help="json: print progress as JSON lines (for the Slicer module); default: text.")
    parser.set_defaults(func=handler)
    return parser


def handler(args: argparse.Namespace) -> int:
    """Handler of ``mim reconstruct``; returns 0 (MimError is turned into exit code 2 by main)."""
    from mimcore import events
    from mimcore.reconstruct import reconstruct
    from mimcore.training.progress import Progress

    as_json = args.progress == "json"
    report: Progress | None = None

    def progress(step: int, total: int, metrics: dict) -> None:
        nonlocal report
        if step == 0:  # the crop is ready: from here on the time per level gives the ETA
            report = Progress("reconstruct", total, "json" if as_json else "none")
            report.event("start", stage="reconstruct", step=0, total=total,
                         message=f"reconstructing {total} level(s) of {Path(args.image).name}")
        elif as_json:
            report.update(step, metrics)
        else:
            loss = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"level {step}/{total} reconstructed ({loss})", flush=True)

    def notice(message: str) -> None:
        print(f"mim: note: {message}", file=sys.stderr, flush=True)

    result = reconstruct(args.checkpoint, args.image, center_ras=args.center, output_dir=args.output,
                         seed=args.seed, device=args.device, progress=progress, notice=notice)
    if as_json:
        events.emit("done", outputs=result.outputs())
    else:
        for i, folder in enumerate(result.level_dirs, start=1):
            n = sum(1 for f in result.files if f.parent == folder)
            print(f"level {i}: {n} NIfTI files (hidden/reconstruction/original, HU) in {folder}")
        print(f"sheet:   {result.sheet}")
        print(f"summary: {result.summary}")
    return 0
