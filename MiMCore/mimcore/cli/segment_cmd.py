"""``mim segment``: label maps for CT volumes with a model bundle, on each input's own grid."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mimcore.devices import DEVICE_CHOICES
from mimcore.errors import MimError, OutputError

LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "segment", help="segment CT volumes with a model bundle",
        description="Segment a volume (NIfTI/NRRD/MHA file or DICOM series folder) or every volume in a "
                    "folder. The label map has exactly the input's grid (size, spacing, origin, direction).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("input", help="a volume file, a DICOM series folder, or a folder of volumes")
    p.add_argument("--model", required=True, help="model bundle: folder, .zip, or a name in the model library")
    p.add_argument("--output", required=True,
                   help="label map file (.nii.gz, .nrrd, ...) for one input, or a folder (then "
                        "<case>_seg<--format> inside; required for a folder of inputs)")
    p.add_argument("--format", default=".nii.gz", choices=LABEL_SUFFIXES, help="label map format in a folder")
    p.add_argument("--seg-nrrd", action="store_true",
                   help="also write <name>.seg.nrrd, which 3D Slicer opens with segment names and colours")
    p.add_argument("--png", action="store_true",
                   help="also write <name>.png: the labels over axial, coronal and sagittal slices")
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto = bf16/fp16 autocast on CUDA; fp32 on the CPU, except --fast windows that run in "
                        "PyTorch (no OpenVINO, or windows over 64^3) on a CPU with native bf16 (AVX-512 "
                        "BF16/AMX): bf16; bf16 = bf16 on any device (faster on such CPUs, labels within bf16's "
                        "rounding of fp32's)")
    p.add_argument("--fast", action="store_true",
                   help="the fast profile: windows of up to 64^3 in OpenVINO in fp32 where it is installed (pip "
                        "install \"mimcore[fast]\"; the default path's labels), else in PyTorch with channels-last, "
                        "in bf16 on CPUs with native bf16; and the network run only on windows that hold part of "
                        "the body (found at low resolution; windows of air give background). "
                        "Testing/benchmarks/bench_segment.py prints the Dice of fast against the default")
    p.add_argument("--runtime", choices=("auto", "torch", "openvino"), default="auto",
                   help="what runs the network: auto = OpenVINO in fp32 for --fast windows of up to 64^3 on the "
                        "CPU where it is installed, else PyTorch (also for --precision bf16); openvino = OpenVINO "
                        "(any window; bf16 with --precision bf16) or an error (CPU only)")
    p.add_argument("--overlap", type=float, help="sliding-window overlap (default: the bundle's)")
    p.add_argument("--sw-batch", type=int, help="windows per network call (default: the bundle's)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="flip test-time augmentation (x4 slower; default: the bundle's)")
    p.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only the largest connected component of each label (default: the bundle's)")
    p.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    p.set_defaults(func=run)


def output_paths(inputs: list[Path], output: Path, fmt: str, batch: bool) -> list[Path]:
    """Where each case's label map goes."""
    if not batch and output.name.endswith(LABEL_SUFFIXES):
        return [output]
    if output.exists() and not output.is_dir():
        raise MimError(f"--output {output} is a file; for a folder of inputs give a folder")
    return [output / f"{case_name(p)}_seg{fmt}" for p in inputs]


def case_name(path: Path) -> str:
    from mimcore.data.volume_io import volume_stem

    return volume_stem(path.name)


def run(ns: argparse.Namespace) -> int:
    from mimcore import events
    from mimcore.bundles.library import get_model
    from mimcore.data.datalist import volumes_from_folder
    from mimcore.data.labels import Label
    from mimcore.data.volume_io import dicom_series_files
    from mimcore.inference.segment import Segmenter

    source = Path(ns.input).expanduser()
    if not source.exists():
        raise MimError(f"{source} does not exist: give a volume file, a DICOM series folder or a folder of volumes")
    batch = source.is_dir() and not dicom_series_files(source, warn=False)
    inputs = volumes_from_folder(source) if batch else [source]
    outputs = output_paths(inputs, Path(ns.output).expanduser(), ns.format, batch)
    bundle = get_model(ns.model)
    json_mode = ns.progress == "json"

    early: list[tuple[str, dict]] | None = []  # sent while the network is prepared: after "start"

    def event(name, **fields):
        if early is not None and name != "start":
            early.append((name, fields))
        elif json_mode:
            events.emit(name, **fields)
        elif name == "warning":  # also with --progress none (on stderr there): labels may be wrong
            print(f"mim segment: {fields.get('message')}", flush=True,
                  file=sys.stderr if ns.progress == "none" else sys.stdout)
        elif name == "note" and ns.progress == "bar":
            print(f"mim segment: {fields.get('message')}", flush=True)

    state = {"done": 0, "report": None}

    def windows(n):
        state["done"] += n
        if state["report"] is not None:
            state["report"].update(state["done"], {})

    seg = Segmenter(bundle, ns.device, ns.overlap, ns.sw_batch, ns.tta, ns.keep_largest, ns.precision,
                    events=event, windows=windows, profile="fast" if ns.fast else "reference", runtime=ns.runtime)
    segments = [Label.from_dict(lab) for lab in bundle.labels]
    event("start", stage="segment", cases=len(inputs), model=bundle.name, device=str(seg.device), runtime=seg.runtime,
          precision=seg.precision, overlap=float(seg.settings["overlap"]))
    for name, fields in early:
        event(name, **fields)
    early = None
    written, failed = [], []
    for i, (src, dst) in enumerate(zip(inputs, outputs)):
        try:
            written += segment_case(ns, seg, bundle, segments, src, dst, f"{i + 1}/{len(inputs)}", state, event)
        except MimError as err:
            if state["report"] is not None:
                state["report"].close()
                state["report"] = None
            if not batch:
                raise
            failed.append((src, str(err)))
            event("warning", message=f"{src.name} failed: {err}")
            if isinstance(err, OutputError) and err.no_space:  # every case that follows would fail too
                failed += [(rest, "not attempted: the disk is full") for rest in inputs[i + 1:]]
                break
    if failed:
        raise MimError(failure_summary(failed, len(inputs), written))
    event("done", outputs=written)
    return 0


def failure_summary(failed: list[tuple[Path, str]], total: int, written: list[str]) -> str:
    """One line per input that failed, with the reason, after what was written."""
    lines = [f"{len(failed)} of {total} input(s) could not be segmented"
             f"{f' ({len(written)} file(s) written for the others)' if written else ''}:"]
    lines += [f"  {src}: {reason}" for src, reason in failed]
    lines.append("Fix or remove these inputs and run again on them.")
    return "\n".join(lines)


def segment_case(ns, seg, bundle, segments, src: Path, dst: Path, position: str, state, event) -> list[str]:
    """Segment one input and write its outputs (each atomic and verified); returns their paths.
    Raises MimError (OutputError when an output cannot be written)."""
    from mimcore.data.segfile import save_seg_nrrd
    from mimcore.data.volume_io import load_volume, save_volume
    from mimcore.inference.hu_check import hu_warning
    from mimcore.training.progress import Progress

    json_mode = ns.progress == "json"
    t0 = time.perf_counter()
    vol = load_volume(src)
    note = hu_warning(vol.array, bundle.preprocessing, bundle.name, str(src))
    if note:
        event("warning", message=note)
    state["done"] = 0
    state["report"] = Progress(f"segment {position} {case_name(src)}", seg.total_windows(vol), ns.progress)
    labels = seg.segment(vol)
    state["report"].close()
    state["report"] = None
    save_volume(dst, labels, reference=vol, dtype=labels.dtype, what="label map")
    files = [str(dst)]
    if ns.seg_nrrd:
        seg_path = dst.with_name(case_name(dst) + ".seg.nrrd")
        save_seg_nrrd(seg_path, labels, vol.affine, segments)
        files.append(str(seg_path))
    if ns.png:
        from mimcore.inference.overlay import write_overlay_png

        window = (bundle.preprocessing.get("hu_min", -175.0), bundle.preprocessing.get("hu_max", 250.0))
        files.append(str(write_overlay_png(vol, labels, segments, dst.with_name(case_name(dst) + ".png"),
                                           window, title=f"{src.name}: {bundle.name}")))
    present = [int(v) for v in np.flatnonzero(np.bincount(labels.ravel())) if v]
    event("case", input=str(src), outputs=files, seconds=round(time.perf_counter() - t0, 2),
          labels_present=present)
    if not json_mode and ns.progress != "none":
        print(f"{src.name} -> {', '.join(files)} ({time.perf_counter() - t0:.1f} s; network on {seg.device} "
              f"in {'OpenVINO' if seg.runtime == 'openvino' else 'PyTorch'} {seg.precision}, "
              f"overlap {seg.settings['overlap']:g})")
    return files
