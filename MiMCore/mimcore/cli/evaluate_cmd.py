"""``mim evaluate``: Dice and HD95 of predicted label maps against reference label maps.

``--pred`` and ``--ref`` are two files (one case) or two folders, whose volume files are
paired by name (``case_001.nii.gz`` with ``case_001.nrrd``: the name without its volume
suffix, and without ``.seg`` for Slicer's ``.seg.nrrd``). The metrics are in
:mod:`mimcore.evaluation.metrics`, the files and the table in :mod:`mimcore.evaluation.report`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mimcore.errors import MimError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Score predicted label maps against references (Dice, HD95 in mm, volumes).",
        description="Compare predicted label maps with reference label maps, per case and per label: Dice, "
                    "95th-percentile Hausdorff distance in mm (MONAI), voxel counts and volumes in ml. Prints a "
                    "per-label summary (mean ± std with the number of cases each is over); --out/--csv/--json "
                    "also write the per-case table and everything as JSON. Prediction and reference must be on "
                    "the same voxel grid, unless --resample-ref moves the reference onto the prediction's.",
    )
    parser.add_argument("--pred", required=True, metavar="FILE_OR_DIR",
                        help="Predicted label map (NIfTI, NRRD, .seg.nrrd, MetaImage) or a folder of them.")
    parser.add_argument("--ref", required=True, metavar="FILE_OR_DIR",
                        help="Reference label map, or a folder whose files have the same names as --pred's "
                             "(suffixes may differ: case1.nii.gz pairs with case1.nrrd).")
    parser.add_argument("--labels", metavar="SPEC",
                        help="Labels to score: a model bundle folder (its model.json), a labels JSON file "
                             "([{\"value\": 1, \"name\": \"liver\"}, ...] or {\"1\": \"liver\"}), or "
                             "'1:liver,2:spleen'. Default: every value present, named label_<v>.")
    parser.add_argument("--ref-map", metavar="OLD:NEW,...",
                        help="Renumber the reference first, e.g. '5:1,1:2' to score a TotalSegmentator map "
                             "(liver 5, spleen 1) against a model with liver 1, spleen 2; other values "
                             "become background.")
    parser.add_argument("--resample-ref", action="store_true",
                        help="A reference on another voxel grid than its prediction (another spacing, a "
                             "flipped or reordered axis, a crop) is resampled onto the prediction's grid "
                             "(nearest neighbour, in world space) instead of being refused.")
    parser.add_argument("--out", metavar="DIR", help="Write DIR/evaluation.csv and DIR/evaluation.json.")
    parser.add_argument("--csv", metavar="FILE", help="Write the per case x label table here (CSV).")
    parser.add_argument("--json", metavar="FILE", help="Write per-case results and the summary here (JSON).")
    parser.set_defaults(func=handler)
    return parser


def case_key(path: Path) -> str:
    """The name a file is paired by: without its volume suffix, and without a trailing ``.seg``."""
    from mimcore.data.volume_io import volume_stem

    return volume_stem(path.name, seg=True)


def _volume_files(folder: Path) -> dict[str, Path]:
    from mimcore.data.volume_io import VOLUME_SUFFIXES, volume_suffix

    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or volume_suffix(path) not in VOLUME_SUFFIXES:
            continue
        key = case_key(path)
        if key in files:
            raise MimError(f"{folder} holds two files for case {key!r}: {files[key].name} and {path.name}. "
                           "Keep one of them.")
        files[key] = path
    if not files:
        raise MimError(f"{folder} holds no label-map files ({', '.join(VOLUME_SUFFIXES)}).")
    return files


def _listing(names: list[str], limit: int = 10) -> str:
    more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def pair_files(pred: str | Path, ref: str | Path) -> list[tuple[Path, Path, str]]:
    """``(prediction, reference, case id)`` for two files, or for two folders paired by :func:`case_key`.

    Raises MimError for a missing path, a file given with a folder, a folder without volume
    files, two files of one case in a folder, or files without a partner (listed).
    """
    pred, ref = Path(pred).expanduser(), Path(ref).expanduser()
    for what, path in (("--pred", pred), ("--ref", ref)):
        if not path.exists():
            raise MimError(f"{what}: no such file or folder: {path}. Check the path (relative paths are "
                           f"relative to {Path.cwd()}).")
    if pred.is_file() and ref.is_file():
        return [(pred, ref, case_key(ref))]
    if pred.is_dir() != ref.is_dir():
        raise MimError(f"--pred and --ref must both be files or both be folders; got "
                       f"{'a folder' if pred.is_dir() else 'a file'} ({pred}) and "
                       f"{'a folder' if ref.is_dir() else 'a file'} ({ref}).")
    preds, refs = _volume_files(pred), _volume_files(ref)
    no_ref = sorted(set(preds) - set(refs))
    no_pred = sorted(set(refs) - set(preds))
    if no_ref or no_pred:
        parts = []
        if no_ref:
            parts.append(f"{len(no_ref)} prediction(s) in {pred} have no reference in {ref}: "
                         f"{_listing([preds[k].name for k in no_ref])}")
        if no_pred:
            parts.append(f"{len(no_pred)} reference(s) in {ref} have no prediction in {pred}: "
                         f"{_listing([refs[k].name for k in no_pred])}")
        raise MimError("; ".join(parts) + ". Files are paired by name without the suffix (case1.nii.gz with "
                       "case1.nrrd); rename them, or move the extra files out of the folders.")
    return [(preds[key], refs[key], key) for key in sorted(preds)]


def handler(args: argparse.Namespace) -> int:
    """Handler of ``mim evaluate``; returns 0 (MimError is turned into exit code 2 by main)."""
    from mimcore.data.labels import load_labels
    from mimcore.evaluation.metrics import evaluate_files
    from mimcore.evaluation.report import format_summary, write_csv, write_json

    pairs = pair_files(args.pred, args.ref)
    labels = load_labels(args.labels) if args.labels else None
    csv_path = Path(args.csv) if args.csv else (Path(args.out) / "evaluation.csv" if args.out else None)
    json_path = Path(args.json) if args.json else (Path(args.out) / "evaluation.json" if args.out else None)

    def progress(i: int, n: int, case_id: str) -> None:
        if n > 1:
            print(f"evaluated {i}/{n}: {case_id}", file=sys.stderr, flush=True)

    ref_map = None
    if args.ref_map:
        try:
            ref_map = {int(a): int(b) for a, b in (item.split(":") for item in args.ref_map.split(","))}
        except ValueError:
            raise MimError(f"--ref-map {args.ref_map!r}: write old:new value pairs, e.g. 5:1,1:2") from None
    evaluation = evaluate_files(pairs, labels, label_map_ref=ref_map, progress=progress,
                                resample_ref=args.resample_ref)
    for note in evaluation.notes:
        print(f"mim: note: {note}", file=sys.stderr, flush=True)
    print(format_summary(evaluation))
    if csv_path is not None:
        print(f"per-case table: {write_csv(csv_path, evaluation)}")
    if json_path is not None:
        print(f"results (JSON): {write_json(json_path, evaluation)}")
    return 0
