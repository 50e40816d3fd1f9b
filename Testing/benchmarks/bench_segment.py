#!/usr/bin/env python
"""Whole-volume segmentation speed and peak memory of MiM, with nnU-Net and SwinUNETR as yardsticks.

Cases (``--cases``):

- ``sample``  the sample CT of the sample datalist's ``held_out`` entry (233 x 167 x 191 chest CT,
  1.5 mm, as read from disk), preprocessed to RAS and ``--spacing`` (default 1.5 x 1.5 x 2 mm, the
  fine-tuning default and the bundles' preprocessing spacing) and the HU window [-175, 250] -> [0, 1].
- ``big``     a synthetic CT-like volume of 512 x 512 x 400 voxels at 0.8 x 0.8 x 1 mm (LPS-stored
  like a DICOM-derived CT: air, body, lungs, spine, liver, noise), written by the parent as an
  int16 ``.nrrd``; our runs and nnU-Net's are timed end to end from reading that file to writing
  the label map (ours: the ``.seg.nrrd``); at 1.5 x 1.5 x 2 mm it is ~273 x 273 x 200.
  ``--quick``: 160 x 160 x 128 voxels of the same size (validates everything in minutes).

Models (``--models``; random weights, 14 output channels, seeded):

- ``*-fast``  the same model through the fast profile (``mim segment --fast``,
  :mod:`mimcore.inference.profiles`: OpenVINO fp32 for windows up to 64^3, else PyTorch
  with bf16 autocast on CPUs with native bf16 and channels-last; air windows skipped;
  ``--precision bf16`` for PyTorch's bf16). The parent prints the per-class Dice of its labels against the reference
  run's (same model, same volume) -- with random weights many voxels sit near a tie between
  classes, so that Dice understates what trained models give: ``bundle`` / ``bundle-fast`` run a
  trained ``--bundle`` (e.g. the demo's) for the real comparison.
- ``nnunet``  nnU-Net's 3d_fullres network, its own plans and ``nnUNetPredictor``
  (``segment_nnunet``; optional: ``pip install -e "MiMCore[bench]"``, else reported as skipped);
  ours / nnU-Net end to end is printed at equal spacing.

- ``base`` / ``small``  ``MiMSegNet(convvit.preset(name), 14)`` saved as a real model bundle
  (``save_bundle`` in a temporary folder), loaded back with ``load_bundle`` and run through our
  real inference path ``mimcore.inference.segment.Segmenter(bundle).segment(volume)``:
  preprocessing (MONAI Orientation / Spacing / ScaleIntensityRange), slab-by-slab sliding window
  with Gaussian blending of softmax probabilities and per-slab argmax
  (``mimcore.inference.window.WindowSegmenter``), resampling of the labels onto the input grid.
  ``base`` takes 96^3 windows, ``small`` 64^3 windows (so ``small`` is not comparable with
  SwinUNETR window for window; compare ``base``).
- ``swin``  MONAI ``SwinUNETR(in_channels=1, out_channels=14, feature_size=48)``, 96^3 windows, on the
  very same preprocessed tensor (our ``preprocess``, same settings), through MONAI's own
  ``sliding_window_inference`` over the whole volume at once (``mode="gaussian"``, same overlap,
  same window batch, network on ``--device``, blended output on the CPU as in our path; logits
  blended, MONAI's usual way), then argmax, then -- for an end-to-end figure only -- the same
  label resampling onto the input grid as ours.

What is timed, per measurement (each in a fresh child process of this script, so that its peak
RSS belongs to that measurement alone):

- ``prep s``   preprocessing of the volume (the same function for all models);
- ``sw s``     the network part: sliding window + network + blending + argmax to a label map
  (ours: ``WindowSegmenter.__call__`` over all slabs; swin: ``sliding_window_inference`` + argmax);
- ``post s``   labels back onto the input grid (SimpleITK nearest neighbour);
- ``e2e s``    all of it: ours is one ``Segmenter.segment(volume)`` call (the parts are measured
  through its ``timer`` hook, the network through its ``forward`` hook); swin is prep + sw + post;
- ``net s``    the network forwards alone (inside ``sw s``), ``windows`` the number of windows the
  network saw (ours counts the slabs' context too), ``s/win`` = ``sw s / windows``.

Before the timed run each child does one warm-up forward of ``--sw-batch`` windows (first-call
kernel set-up stays out of the figures; model building, bundle loading and reading the volume are
not timed). Memory: ``peak RSS`` is the child process's peak resident memory
(``ru_maxrss`` before the run, then ``VmHWM`` after resetting it through ``/proc/self/clear_refs``:
the max of the two), ``inf. RSS`` the peak during the segmentation only (including what was already
resident: model, volume), ``base RSS`` the resident memory just before it. On CUDA also
``torch.cuda.max_memory_allocated`` (and reserved) over the segmentation.

Time guard (``--max-minutes``, default 15, per measurement; 0 = off): after the warm-up the child
estimates the run as (windows x warm-up seconds per window, an upper bound). Past the limit -- on a
2-core CPU that is every model on ``big``: ~160 windows x 5-20 s for ``base``, 96 x 10-25 s for
``swin``, ~430 x 2-4 s for ``small`` (ours runs more windows than one MONAI pass: every slab carries
roi/2 of context on both sides) -- it does a *memory-only* run instead: the same path on the same
volume, but the network really runs only for the first ``--memory-only-batches`` (default 2) window
batches of every slab (ours) / of the volume (swin), and returns zeros of the right shape and dtype
for the rest. Two batches are needed because MONAI allocates its blending buffers after the first
one: the second runs with the buffers in place, which is when the real peak occurs. Peak memory is
then close to that of the full run but may read a little low (allocator fragmentation over many
windows: ``small`` on the sample CT read 1513 MiB memory-only vs 1662 MiB full); times are estimates
(``~``): measured time + skipped windows x the network time per window measured on the real ones
(the same run: ~193 s estimated vs 205 s measured). On ``big`` the peak is usually reached in the
preprocessing (MONAI ``Spacing`` of the full-resolution volume), which a memory-only run does in full. ``--memory-only`` forces
this for every measurement. The parent prints an estimate of every measurement before starting
(from rough per-window priors measured on this project's 2-core CPU; CPU only).

Defaults: ``--overlap 0.25`` -- not the bundle default 0.5 -- to keep CPU runs finite (0.5 doubles the
windows: sample 36 instead of 18 at 96^3); ``--sw-batch 2`` (the bundle default). Precision: fp32 on
the CPU; on CUDA ``--precision auto`` is bf16 autocast (fp16 where bf16 is unsupported), what
``Segmenter`` does by itself, and SwinUNETR gets the same autocast; ``--precision fp32`` turns it off
for both. Threads: torch's default (``--threads`` to set). Other processes sharing the cores make
CPU timings noisy; the load average is printed.

Targets (PASS/FAIL lines, not assertions): ``base`` faster than SwinUNETR on the 1.5 mm sample CT
(``sw s``); peak RSS for the 512 x 512 x 400 volume under 6 GB (6e9 bytes) on the CPU (our models);
on a GPU, ``base`` under 4 GB (4e9 bytes) of ``max_memory_allocated`` with mixed precision.

Achieved FLOP/s: FLOPs of one window (``torch.utils.flop_counter``) x windows run / network
seconds, against this machine's 2048^3 matmul rate measured in the same child (bf16 for bf16 runs).

Modules (next to this script, which is the command line): ``segment_cases`` (the volumes),
``segment_measure`` (memory, the network probe, progress, the time guard), ``segment_runs`` (one
measurement in a child process), ``segment_nnunet`` (nnU-Net), ``segment_flops`` (FLOPs, matmul
rate), ``segment_report`` and ``segment_fast_report`` (plan, tables, ratios, Dice, targets).

Examples::

    python Testing/benchmarks/bench_segment.py --quick --cases big          # validate, a few minutes
    python Testing/benchmarks/bench_segment.py --cases big --max-minutes 0  # the issue's 512x512x400 run
    python Testing/benchmarks/bench_segment.py --cases sample --models bundle bundle-fast \
        --bundle demo_output/finetune/model --overlap 0.5                   # Dice of fast with trained weights
    python Testing/benchmarks/bench_segment.py                              # everything, CPU, guarded
    python Testing/benchmarks/bench_segment.py --cases sample --models base swin
    python Testing/benchmarks/bench_segment.py --cases big --models small --max-minutes 0   # full run
    python Testing/benchmarks/bench_segment.py --cases big --memory-only --json big.json
    python Testing/benchmarks/bench_segment.py --device cuda --overlap 0.5 --sw-batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench_common import RESULT_TAG, machine_info, spawn_child
from segment_cases import BIG_SPACING, N_CLASSES, PREP, big_shape, ras_shape, write_big
from segment_fast_report import fast_report, fast_targets, flops_report, nnunet_report
from segment_report import CPU_PRIOR_S_PER_WINDOW, plan, ratios, results_table, table, targets
from segment_runs import run_child


MODELS = ("small", "small-fast", "base", "base-fast", "bundle", "bundle-fast", "swin", "nnunet")
DEFAULT_MODELS = ["small", "small-fast", "base-fast", "swin", "nnunet"]


def spawn(spec: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", spec, "--device", args.device,
           "--overlap", repr(args.overlap), "--sw-batch", str(args.sw_batch), "--precision", args.precision,
           *(["--fast-overlap", repr(args.fast_overlap)] if args.fast_overlap is not None else []),
           "--runtime", args.runtime, "--max-minutes", repr(args.max_minutes),
           "--memory-only-batches", str(args.memory_only_batches),
           "--seed", str(args.seed), "--spacing", *map(repr, args.spacing), "--_labels-dir", args.labels_dir]
    if args.quick:
        cmd.append("--quick")
    if args.bundle:
        cmd += ["--bundle", args.bundle]
    if args.big_path:
        cmd += ["--_big-path", args.big_path]
    if args.sample_path:
        cmd += ["--_sample-path", args.sample_path]
    if args.memory_only:
        cmd.append("--memory-only")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return spawn_child(cmd, {"label": spec}, args.child_timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["sample", "big"], choices=("sample", "big"),
                    help="sample: the held-out sample CT at 1.5 mm; big: synthetic 512x512x400 CT (default: both).")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=MODELS,
                    help="Our presets through Segmenter (-fast: the fast profile, `mim segment --fast`; bundle: "
                         "--bundle), MONAI SwinUNETR, nnU-Net 3d_fullres (default: %(default)s).")
    ap.add_argument("--bundle", help="A trained model bundle (e.g. the demo's demo_output/finetune/model) for the "
                                     "models bundle / bundle-fast: Dice of fast against reference with real weights.")
    ap.add_argument("--spacing", nargs=3, type=float, default=[1.5, 1.5, 2.0], metavar=("X", "Y", "Z"),
                    help="Model spacing of the random-weight models, SwinUNETR and nnU-Net's generated dataset "
                         "(default 1.5 1.5 2, the fine-tuning default).")
    ap.add_argument("--quick", action="store_true",
                    help="big = a 160x160x128 CT of the same voxel size (validates the whole "
                         "benchmark in minutes; targets for the 512x512x400 CT are then not judged).")
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu).")
    ap.add_argument("--overlap", type=float, default=0.25,
                    help="Sliding-window overlap for every model (default 0.25, not the bundle default 0.5, "
                         "to keep CPU runs finite).")
    ap.add_argument("--fast-overlap", type=float, default=None,
                    help="Overlap of the -fast models only (default: --overlap): the speed and the agreement "
                         "of fewer windows with the reference path, e.g. --overlap 0.5 --fast-overlap 0.25.")
    ap.add_argument("--sw-batch", type=int, default=2, help="Windows per network call (default 2, the bundle default).")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="auto: what `mim segment` does -- bf16 autocast on CUDA, fp32 on the CPU, except -fast "
                         "models in PyTorch (no OpenVINO, or windows over 64^3) where the CPU has native bf16: "
                         "bf16; fp32: no autocast; bf16: everywhere (-fast: PyTorch's bf16).")
    ap.add_argument("--runtime", choices=("auto", "torch", "openvino"), default="auto",
                    help="What runs our network (mim segment --runtime): auto = OpenVINO for -fast models on the CPU "
                         "where it is installed, else PyTorch.")
    ap.add_argument("--max-minutes", type=float, default=15.0,
                    help="Per measurement: if the warm-up-based estimate is longer, do a memory-only run "
                         "(default 15; 0 = always the full run).")
    ap.add_argument("--memory-only", action="store_true", help="Memory-only runs for every measurement.")
    ap.add_argument("--memory-only-batches", type=int, default=2,
                    help="Real window batches per slab in a memory-only run (default 2; at least 2 to see "
                         "the network run next to the blending buffers).")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in each child (default: torch's default).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child-timeout", type=float, help="Seconds allowed per measurement (default: none).")
    ap.add_argument("--json", metavar="FILE", help="Also write all results to FILE as JSON.")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_sample-path", dest="sample_path", help=argparse.SUPPRESS)
    ap.add_argument("--_big-path", dest="big_path", help=argparse.SUPPRESS)
    ap.add_argument("--_labels-dir", dest="labels_dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    PREP["spacing"] = list(args.spacing)
    if any(m.startswith("bundle") for m in args.models) and not args.bundle:
        ap.error("the models bundle / bundle-fast need --bundle PATH")
    if not 0 <= args.overlap < 1 or not 0 <= (args.fast_overlap or 0) < 1:
        ap.error("--overlap and --fast-overlap must be in [0, 1)")
    if args.sw_batch < 1 or args.memory_only_batches < 1:
        ap.error("--sw-batch and --memory-only-batches must be at least 1")

    if args._child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        try:
            res = run_child(args._child, args)
        except Exception as e:  # noqa: BLE001 -- reported in the parent's table
            import traceback

            traceback.print_exc()
            print(RESULT_TAG + json.dumps({"label": args._child, "error": f"{type(e).__name__}: {e}"}), flush=True)
            return 1
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    import numpy as np
    import torch

    from mimcore.devices import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.device = str(resolve_device(args.device))
    except Exception as e:  # noqa: BLE001 -- MimError with a clear message
        ap.error(str(e))
    cuda = args.device.startswith("cuda")

    sample_shape = None
    if "sample" in args.cases:
        from mimcore.data.datalist import datalist_entries
        from mimcore.data.samples import fetch_samples
        from mimcore.data.volume_io import load_volume

        args.sample_path = str(datalist_entries(fetch_samples(quiet=True), "held_out")[0]["image"])
        v = load_volume(args.sample_path)
        sample_shape = tuple(int(n) for n in ras_shape(v))
        sample_desc = f"{'x'.join(map(str, v.shape))} at {'x'.join(f'{s:g}' for s in np.round(v.spacing, 3))} mm"
        del v

    info = machine_info()
    load0 = os.getloadavg()
    prec = "fp32"
    if cuda and args.precision != "fp32":
        prec = "bf16 autocast" if torch.cuda.is_bf16_supported() else "fp16 autocast"
    print("== machine")
    for k, v in info.items():
        print(f"  {k}: {v}")
    print(f"  device: {args.device} ({prec}); load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print("== settings")
    fast_overlap = f" (-fast models: {args.fast_overlap:g})" if args.fast_overlap is not None else ""
    print(f"  overlap {args.overlap:g}{' (default; the bundle default is 0.5)' if args.overlap == 0.25 else ''}"
          f"{fast_overlap}, "
          f"window batch {args.sw_batch}, Gaussian blending, {N_CLASSES} output channels, random weights")
    print(f"  preprocessing {PREP}")
    if sample_shape:
        print(f"  sample: {args.sample_path} ({sample_desc})")
    if "big" in args.cases:
        shape = big_shape(args.quick)
        print(f"  big: synthetic {'x'.join(map(str, shape))} CT at {'x'.join(map(str, BIG_SPACING))} mm"
              + (" (--quick; the target volume is 512x512x400)" if args.quick else "")
              + ", read from an int16 .nrrd and written as .seg.nrrd (end to end)")
    if args.bundle:
        print(f"  bundle: {args.bundle}")
    guard = "off" if args.max_minutes <= 0 else f"{args.max_minutes:g} min per measurement"
    print(f"  time guard: {'memory-only for all' if args.memory_only else guard}")

    plan_rows = plan(args, sample_shape)
    print()
    print("== plan (estimate from rough CPU priors of "
          + ", ".join(f"{m} {CPU_PRIOR_S_PER_WINDOW[m]:g}" for m in args.models)
          + " s/window; each child re-estimates after its warm-up)" if args.device == "cpu" else "== plan")
    print(table(["measurement", "model-space shape", "roi", "windows", "ours: slabs", "est. min", "run"], plan_rows))
    if args.device == "cpu":
        total = sum(float(row[5].lstrip("~")) for row in plan_rows if row[5] != "?")
        print(f"  rough total: ~{total:.0f} min (plus model building and volume loading)", flush=True)

    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="bench_segment_")
    args.labels_dir = tmp.name
    if "big" in args.cases:
        args.big_path = write_big(os.path.join(tmp.name, "big_ct.nrrd"), args.quick)
    results = []
    t_all = time.perf_counter()
    for case in args.cases:
        for model in args.models:
            spec = f"{model}@{case}"
            print(f"== running {spec} ...", flush=True)
            results.append(spawn(spec, args))
    total_wall = time.perf_counter() - t_all
    load1 = os.getloadavg()

    print()
    print("== results (s; ~ = estimated from a memory-only run; sw = network + sliding window + argmax; "
          "e2e = prep + sw + post; peak RSS = whole child process, inf. RSS = during the segmentation, "
          "base RSS = resident before it)")
    print(results_table(results, cuda))
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
          + ("  (other processes share these cores: timings are noisy)" if not cuda else ""))
    for r in results:
        for w in r.get("warnings", []):
            print(f"  {r['label']}: {w}")

    by = {r["label"]: r for r in results if "error" not in r and "skipped" not in r}
    for r in results:
        if "skipped" in r:
            print(f"  {r['label']}: skipped -- {r['skipped']}")
    ratio_values = ratios(by, args.cases)
    ratio_values.update(fast_report(by, args.cases, args.labels_dir))
    ratio_values.update(nnunet_report(by, args.cases))
    flops_report(by)

    verdicts = targets(by, args, cuda) + fast_targets(by, args)
    print()
    print("== targets")
    for verdict, name, detail in verdicts:
        print(f"  [{verdict}] {name}: {detail}")
    print(f"total wall time: {total_wall:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "device": args.device, "precision": prec, "overlap": args.overlap,
                       "fast_overlap": args.fast_overlap,
                       "sw_batch": args.sw_batch, "load_average_start": load0, "load_average_end": load1,
                       "results": results, "ratios": ratio_values,
                       "targets": [{"verdict": v, "target": n, "detail": d} for v, n, d in verdicts],
                       "total_wall_s": total_wall}, f, indent=2)
        print(f"wrote {args.json}")
    tmp.cleanup()
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
