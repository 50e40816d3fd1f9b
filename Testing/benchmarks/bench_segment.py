#!/usr/bin/env python
"""Whole-volume segmentation speed and peak memory of MiM, with MONAI's SwinUNETR as a yardstick.

Cases (``--cases``):

- ``sample``  the sample CT of the sample datalist's ``held_out`` entry (233 x 167 x 191 chest CT,
  1.5 mm, as read from disk), preprocessed to RAS and 1.5 mm isotropic -- the bundle's
  preprocessing spacing -- and the HU window [-175, 250] -> [0, 1].
- ``big``     a synthetic CT-like volume of 512 x 512 x 400 voxels at 0.8 x 0.8 x 1.5 mm (LPS-stored
  like a DICOM-derived CT: air, body, lungs, spine, liver, noise; float32 HU), built slice by slice
  with numpy so that no large temporary inflates the peak; resampled to 1.5 mm it is
  ~273 x 273 x 400.

Models (``--models``; random weights, 14 output channels, seeded):

- ``base`` / ``small``  ``MiMSegNet(get_preset(name), 14)`` saved as a real model bundle
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
- ``e2e s``    all of it: ours is one ``Segmenter.segment(volume)`` call (the parts are measured by
  wrapping the functions it calls); swin is prep + sw + post;
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

Examples::

    python Testing/benchmarks/bench_segment.py                              # everything, CPU, guarded
    python Testing/benchmarks/bench_segment.py --cases sample --models base swin
    python Testing/benchmarks/bench_segment.py --cases big --models small --max-minutes 0   # full run
    python Testing/benchmarks/bench_segment.py --cases big --memory-only --json big.json
    python Testing/benchmarks/bench_segment.py --device cuda --overlap 0.5 --sw-batch 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time

from bench_common import RESULT_TAG, machine_info, spawn_child, sync

N_CLASSES = 14
PREP = {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "hu_min": -175, "hu_max": 250}
BIG_SHAPE = (512, 512, 400)
BIG_SPACING = (0.8, 0.8, 1.5)
ROI = {"base": 96, "small": 64, "swin": 96}
# rough seconds per window on this project's 2-core CPU (fp32, sw-batch 2, shared machine): for the
# estimate printed before starting only; the children measure their own
CPU_PRIOR_S_PER_WINDOW = {"base": 12.0, "small": 2.7, "swin": 18.0}
CPU_LIMIT_BYTES = 6e9
GPU_LIMIT_BYTES = 4e9
MIB = 2**20


# ----------------------------------------------------------------------------- helpers


def _status_kib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def big_volume():
    """The synthetic 512 x 512 x 400 CT (float32 HU, 0.8 x 0.8 x 1.5 mm, LPS-stored), slice by slice."""
    import numpy as np

    from mimcore.data.volume_io import Volume

    nx, ny, nz = BIG_SHAPE
    sx, sy, sz = BIG_SPACING
    arr = np.empty(BIG_SHAPE, dtype=np.float32)
    rng = np.random.default_rng(0)
    x = ((np.arange(nx, dtype=np.float32) - nx / 2) * sx)[:, None]  # mm from the centre
    y = ((np.arange(ny, dtype=np.float32) - ny / 2) * sy)[None, :]
    body = (x / 170) ** 2 + (y / 120) ** 2 <= 1
    spine = (x / 18) ** 2 + ((y - 75) / 18) ** 2 <= 1
    for k in range(nz):
        z = k * sz  # mm from the bottom slice; lungs in the upper half, liver below them
        s = np.full((nx, ny), -1000.0, dtype=np.float32)
        s[body] = 40.0
        for cx in (-75.0, 75.0):
            f = 1 - ((z - 430) / 150) ** 2
            if f > 0:
                s[((x - cx) / (60 * math.sqrt(f))) ** 2 + ((y + 5) / (80 * math.sqrt(f))) ** 2 <= 1] = -850.0
        f = 1 - ((z - 230) / 90) ** 2
        if f > 0:
            s[((x + 60) / (95 * math.sqrt(f))) ** 2 + ((y + 10) / (75 * math.sqrt(f))) ** 2 <= 1] = 60.0
        s[spine] = 700.0
        s += rng.standard_normal((nx, ny), dtype=np.float32) * 20.0
        arr[:, :, k] = s
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [nx / 2 * sx, ny / 2 * sy, -300.0]
    return Volume(arr, affine, source="synthetic 512x512x400 CT")


def load_case(case: str, sample_path: str | None):
    if case == "big":
        return big_volume()
    from mimcore.data.volume_io import load_volume

    return load_volume(sample_path)


def make_probe(net, device):
    """Wrap a network: time every forward; in a memory-only run return zeros (of the real output's
    shape and dtype) once ``real_left`` real calls are spent."""
    import torch

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net  # a submodule: parameters(), .to() reach the real network
            self.real_left = None  # None: always real
            self.out_dtype = self.out_channels = None
            self.reset_stats()

        def reset_stats(self):
            self.times, self.windows_real, self.windows_stub = [], 0, 0

        def forward(self, x):
            if self.real_left is None or self.real_left > 0 or self.out_dtype is None:
                if self.real_left is not None:
                    self.real_left -= 1
                sync(device)
                t0 = time.perf_counter()
                y = self.net(x)
                sync(device)
                self.times.append(time.perf_counter() - t0)
                self.windows_real += x.shape[0]
                self.out_dtype, self.out_channels = y.dtype, y.shape[1]
                return y
            self.windows_stub += x.shape[0]
            return torch.zeros((x.shape[0], self.out_channels) + tuple(x.shape[2:]), dtype=self.out_dtype,
                               device=x.device)

    return Probe()


# ----------------------------------------------------------------------------- child mode

class _Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0, self.next = label, max(1, total), 0, time.perf_counter(), 0.1

    def __call__(self, n: int) -> None:
        self.done += n
        if self.done / self.total >= self.next or self.done == self.total:
            el = time.perf_counter() - self.t0
            eta = el / self.done * max(0, self.total - self.done)
            print(f"[{self.label}] {self.done}/{self.total} windows, {el:.0f} s, ~{eta:.0f} s left",
                  file=sys.stderr, flush=True)
            while self.done / self.total >= self.next:
                self.next += 0.1


def _mem_before_run(device) -> dict:
    import torch

    out = {"setup_peak_rss_mib": _maxrss_mib(), "rss_before_mib": (_status_kib("VmRSS") or 0) / 1024}
    out["hwm_reset"] = _reset_peak_rss()
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    return out


def _mem_after_run(device, before: dict) -> dict:
    import torch

    out = dict(before)
    if before["hwm_reset"]:
        out["inference_peak_rss_mib"] = _status_kib("VmHWM") / 1024
        out["peak_rss_mib"] = max(before["setup_peak_rss_mib"], out["inference_peak_rss_mib"])
    else:  # no reset possible: the whole process's peak only
        out["inference_peak_rss_mib"] = None
        out["peak_rss_mib"] = max(before["setup_peak_rss_mib"], _maxrss_mib())
    if str(device).startswith("cuda"):
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / MIB
    return out


def _decide_mode(label: str, windows: int, warm_s_per_window: float, args) -> tuple[str, float]:
    est = windows * warm_s_per_window
    memory_only = args.memory_only or (args.max_minutes > 0 and est > args.max_minutes * 60)
    why = ("--memory-only" if args.memory_only else f"over --max-minutes {args.max_minutes:g}") if memory_only else ""
    print(f"[{label}] {windows} windows x {warm_s_per_window:.2f} s/window (warm-up) ~ {est / 60:.1f} min"
          + (f" -> memory-only run ({why})" if memory_only else " -> full run"), file=sys.stderr, flush=True)
    return ("memory-only" if memory_only else "full"), est


def run_ours(preset: str, case: str, device, args) -> dict:
    import torch

    import mimcore.inference.segment as segmod
    from mimcore.bundles.bundle import load_bundle, save_bundle
    from mimcore.models.presets import get_preset
    from mimcore.models.segnet import MiMSegNet, architecture_dict

    label = f"{preset}@{case}"
    vol = load_case(case, args.sample_path)
    tmp = tempfile.TemporaryDirectory(prefix="bench_segment_")
    torch.manual_seed(args.seed)
    net = MiMSegNet(get_preset(preset), N_CLASSES)
    n_params = sum(p.numel() for p in net.parameters())
    desc = {
        "name": f"bench-{preset}",
        "architecture": architecture_dict(net, preset),
        "labels": [{"value": i, "name": f"c{i}", "color": [i, 0, 0]} for i in range(1, N_CLASSES)],
        "preprocessing": dict(PREP),
        "inference": {"overlap": args.overlap, "sw_batch_size": args.sw_batch},
        "training": {},
    }
    path = save_bundle(os.path.join(tmp.name, "bundle"), net.state_dict(), desc)
    del net
    bundle = load_bundle(path)

    warnings: list[str] = []
    counter = {"n": 0, "progress": None}

    def windows_cb(n):
        counter["n"] += n
        if counter["progress"] is not None:
            counter["progress"](n)

    seg = segmod.Segmenter(bundle, device=str(device), precision=args.precision,
                           events=lambda ev, **f: warnings.append(f"{ev}: {f.get('message')}"), windows=windows_cb)
    win = seg.window
    roi = win.roi
    windows_planned = seg.total_windows(vol)
    probe = make_probe(win.net, seg.device)
    win.net = probe

    # warm-up: one batch through the real per-window function (autocast, softmax)
    t0 = time.perf_counter()
    win._predict(torch.zeros(args.sw_batch, 1, roi, roi, roi))
    sync(seg.device)
    warmup_s = time.perf_counter() - t0
    mode, est = _decide_mode(label, windows_planned, warmup_s / args.sw_batch, args)
    probe.reset_stats()
    counter["n"] = 0
    if mode == "memory-only":
        run_slab = win._run_slab

        def run_slab_limited(slab):
            probe.real_left = args.memory_only_batches
            return run_slab(slab)

        win._run_slab = run_slab_limited

    # time the parts of Segmenter.segment by wrapping what it calls
    parts = {"prep_s": 0.0, "sw_s": 0.0, "post_s": 0.0}
    shapes = {}

    def timed(key, fn):
        def inner(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            sync(seg.device)
            parts[key] += time.perf_counter() - t
            if key == "prep_s":
                shapes["model_space"] = list(r.shape[1:])
            return r

        return inner

    segmod.preprocess = timed("prep_s", segmod.preprocess)
    segmod.labels_to_grid = timed("post_s", segmod.labels_to_grid)
    seg.window = timed("sw_s", win)
    counter["progress"] = _Progress(label, windows_planned)

    mem0 = _mem_before_run(seg.device)
    t0 = time.perf_counter()
    labels = seg.segment(vol)
    sync(seg.device)
    e2e = time.perf_counter() - t0
    mem = _mem_after_run(seg.device, mem0)
    if labels.shape != vol.shape:  # the path's own contract; reported as an error row, not a target
        raise RuntimeError(f"labels {labels.shape} do not match the input {vol.shape}")
    tmp.cleanup()
    slabs = win.slabs(tuple(shapes["model_space"]), N_CLASSES)
    return _result(label, preset, case, str(seg.device), mode, roi, n_params, warmup_s, est, e2e, parts,
                   probe, counter["n"], windows_planned, mem, vol, shapes, warnings,
                   {"slab_axis": slabs[0], "slab_cores": slabs[1],
                    "amp": str(win.amp_dtype).replace("torch.", "") if win.amp_dtype else "fp32"})


def _ras_shape(vol):
    import numpy as np

    from mimcore.inference.segment import ras_order

    shape, spacing = ras_order(vol, vol.shape), ras_order(vol, vol.spacing)
    return np.array([max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, PREP["spacing"])])


def run_swin(case: str, device, args) -> dict:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    from mimcore.devices import resolve_device
    from mimcore.data.regrid import labels_to_grid
    from mimcore.inference.segment import preprocess
    from mimcore.inference.window import count_windows

    label = f"swin@{case}"
    dev = resolve_device(str(device))
    vol = load_case(case, args.sample_path)
    torch.manual_seed(args.seed)
    net = SwinUNETR(in_channels=1, out_channels=N_CLASSES, feature_size=48).eval().to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    amp = None
    if dev.type == "cuda" and args.precision != "fp32":  # what Segmenter picks
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    probe = make_probe(net, dev)
    roi = ROI["swin"]
    progress = {"cb": None}

    @torch.no_grad()
    def predictor(x):
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            y = probe(x)
        if progress["cb"] is not None:
            progress["cb"](x.shape[0])
        return y

    t0 = time.perf_counter()
    predictor(torch.zeros(args.sw_batch, 1, roi, roi, roi, device=dev))
    sync(dev)
    warmup_s = time.perf_counter() - t0
    windows_planned = count_windows(tuple(int(n) for n in _ras_shape(vol)), roi, args.overlap)
    mode, est = _decide_mode(label, windows_planned, warmup_s / args.sw_batch, args)
    probe.reset_stats()
    if mode == "memory-only":
        probe.real_left = args.memory_only_batches
    progress["cb"] = _Progress(label, windows_planned)

    parts = {"prep_s": 0.0, "sw_s": 0.0, "post_s": 0.0}
    mem0 = _mem_before_run(dev)
    t0 = time.perf_counter()
    img = preprocess(vol, PREP)
    parts["prep_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(img.as_tensor()[None], (roi,) * 3, args.sw_batch, predictor,
                                       overlap=args.overlap, mode="gaussian", sw_device=dev,
                                       device=torch.device("cpu"))
        labels = out[0].argmax(0).numpy().astype(np.uint8)
        del out
    sync(dev)
    parts["sw_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    grid = labels_to_grid(labels, np.asarray(img.affine, dtype=np.float64), vol)
    parts["post_s"] = time.perf_counter() - t2
    e2e = time.perf_counter() - t0
    mem = _mem_after_run(dev, mem0)
    if grid.shape != vol.shape:
        raise RuntimeError(f"labels {grid.shape} do not match the input {vol.shape}")
    shapes = {"model_space": list(img.shape[1:])}
    return _result(label, "swin", case, str(dev), mode, roi, n_params, warmup_s, est, e2e, parts, probe,
                   probe.windows_real + probe.windows_stub, windows_planned, mem, vol, shapes, [],
                   {"amp": str(amp).replace("torch.", "") if amp else "fp32"})


def _result(label, model, case, device, mode, roi, n_params, warmup_s, est, e2e, parts, probe, windows,
            windows_planned, mem, vol, shapes, warnings, extra) -> dict:
    import torch

    net_s = sum(probe.times)
    per_window_net = net_s / max(1, probe.windows_real)
    skipped = probe.windows_stub * per_window_net  # memory-only: network time not spent
    res = {
        "label": label, "model": model, "case": case, "device": device, "mode": mode, "roi": roi,
        "threads": torch.get_num_threads(), "params_m": n_params / 1e6,
        "input_shape": list(vol.shape), "input_spacing": [float(s) for s in vol.spacing], **shapes,
        "windows": windows, "windows_planned": windows_planned,
        "windows_real": probe.windows_real, "windows_stubbed": probe.windows_stub,
        "warmup_s": warmup_s, "estimate_from_warmup_s": est,
        "prep_s": parts["prep_s"], "sw_s": parts["sw_s"] + skipped, "post_s": parts["post_s"],
        "e2e_s": e2e + skipped, "net_s": net_s + skipped, "net_s_per_window": per_window_net,
        "measured_e2e_s": e2e, "measured_sw_s": parts["sw_s"], "estimated": probe.windows_stub > 0,
        **mem, "warnings": warnings, **extra, "load_average_end": os.getloadavg(),
    }
    res["s_per_window"] = res["sw_s"] / max(1, windows)
    return res


def run_child(spec: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, case = spec.split("@")
    t0 = time.perf_counter()
    res = run_swin(case, args.device, args) if model == "swin" else run_ours(model, case, args.device, args)
    res["child_wall_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- parent mode

def spawn(spec: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", spec, "--device", args.device,
           "--overlap", repr(args.overlap), "--sw-batch", str(args.sw_batch), "--precision", args.precision,
           "--max-minutes", repr(args.max_minutes), "--memory-only-batches", str(args.memory_only_batches),
           "--seed", str(args.seed)]
    if args.sample_path:
        cmd += ["--_sample-path", args.sample_path]
    if args.memory_only:
        cmd.append("--memory-only")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return spawn_child(cmd, {"label": spec}, args.child_timeout)


def _table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _results_table(results: list[dict], cuda: bool) -> str:
    head = ["measurement", "mode", "model-space shape", "roi", "windows", "prep s", "sw s", "post s", "e2e s",
            "net s", "s/win", "peak RSS MiB", "inf. RSS MiB", "base RSS MiB"]
    if cuda:
        head += ["CUDA alloc MiB", "CUDA resv MiB"]
    head.append("wall s")
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["label"], "ERROR: " + r["error"]] + [""] * (len(head) - 3) + [f"{r['process_wall_s']:.0f}"])
            continue
        t = "~" if r["estimated"] else ""
        inf = r["inference_peak_rss_mib"]
        row = [r["label"], r["mode"], "x".join(str(n) for n in r.get("model_space", [])), r["roi"], r["windows"],
               f"{r['prep_s']:.1f}", f"{t}{r['sw_s']:.1f}", f"{r['post_s']:.1f}", f"{t}{r['e2e_s']:.1f}",
               f"{t}{r['net_s']:.1f}", f"{r['s_per_window']:.2f}", f"{r['peak_rss_mib']:.0f}",
               "?" if inf is None else f"{inf:.0f}", f"{r['rss_before_mib']:.0f}"]
        if cuda:
            row += [f"{r.get('cuda_peak_allocated_mib', 0):.0f}", f"{r.get('cuda_peak_reserved_mib', 0):.0f}"]
        row.append(f"{r['process_wall_s']:.0f}")
        rows.append(row)
    return _table(head, rows)


def _plan(args, sample_shape) -> list[list]:
    """Rows of the pre-run estimate."""
    import torch

    from mimcore.inference.window import WindowSegmenter, count_windows

    rows = []
    for case in args.cases:
        if case == "big":
            shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(BIG_SHAPE, BIG_SPACING, PREP["spacing"]))
        else:
            shape = sample_shape
        for model in args.models:
            roi = ROI[model]
            if model == "swin":
                n = count_windows(shape, roi, args.overlap)
                note = "one pass"
            else:
                w = WindowSegmenter(torch.nn.Identity(), roi, torch.device("cpu"), args.overlap, args.sw_batch)
                n = w.total_windows(shape, N_CLASSES)
                note = f"{len(w.slabs(shape, N_CLASSES)[1])} slab(s)"
            if args.device == "cpu":
                prior = CPU_PRIOR_S_PER_WINDOW[model]
                est = n * prior / 60
                guard = args.memory_only or (args.max_minutes > 0 and est > args.max_minutes)
                if guard:  # warm-up + the real batches (per slab for ours), plus ~1 min of the rest
                    slabs = 1 if model == "swin" else len(w.slabs(shape, N_CLASSES)[1])
                    est = (1 + slabs * args.memory_only_batches) * args.sw_batch * prior / 60 + 1
                rows.append([f"{model}@{case}", "x".join(map(str, shape)), roi, n, note, f"~{est:.0f}",
                             f"memory-only (full ~{n * prior / 60:.0f} min)" if guard else "full"])
            else:
                rows.append([f"{model}@{case}", "x".join(map(str, shape)), roi, n, note, "?",
                             "memory-only" if args.memory_only else "full (guard checked in the child)"])
    return rows


def _targets(by: dict, args, cuda: bool) -> list[tuple[str, str, str]]:
    """[(PASS|FAIL|SKIP, target, detail)]."""
    out = []
    name = "base faster than SwinUNETR on the 1.5 mm sample CT (sw s: network + sliding window)"
    b, s = by.get("base@sample"), by.get("swin@sample")
    if b and s:
        est = " (estimated: memory-only run)" if b["estimated"] or s["estimated"] else ""
        out.append(("PASS" if b["sw_s"] < s["sw_s"] else "FAIL", name,
                    f"base {b['sw_s']:.1f} s vs SwinUNETR {s['sw_s']:.1f} s, base/swin {b['sw_s'] / s['sw_s']:.2f}{est}"))
    else:
        out.append(("SKIP", name, "needs --cases sample and --models base swin"))
    name = f"peak memory for the 512x512x400 volume under 6 GB ({CPU_LIMIT_BYTES / MIB:.0f} MiB) on the CPU"
    ours = [by[f"{m}@big"] for m in ("base", "small") if f"{m}@big" in by]
    if args.device != "cpu":
        out.append(("SKIP", name, f"device is {args.device}"))
    elif not ours:
        out.append(("SKIP", name, "needs --cases big and --models base and/or small"))
    for r in ours if args.device == "cpu" else []:
        note = " (memory-only run)" if r["mode"] == "memory-only" else ""
        out.append(("PASS" if r["peak_rss_mib"] * MIB < CPU_LIMIT_BYTES else "FAIL", f"{name}: {r['model']}",
                    f"peak RSS {r['peak_rss_mib']:.0f} MiB = {r['peak_rss_mib'] * MIB / 1e9:.2f} GB{note}"))
    name = f"GPU: base inference under 4 GB ({GPU_LIMIT_BYTES / MIB:.0f} MiB) device memory with mixed precision"
    base_runs = [by[k] for k in ("base@sample", "base@big") if k in by]
    if not cuda:
        out.append(("SKIP", name, "no CUDA run (--device cuda)"))
    elif args.precision == "fp32":
        out.append(("SKIP", name, "--precision fp32 (mixed precision is --precision auto)"))
    elif not base_runs:
        out.append(("SKIP", name, "needs --models base"))
    for r in base_runs if cuda and args.precision != "fp32" else []:
        a = r["cuda_peak_allocated_mib"]
        out.append(("PASS" if a * MIB < GPU_LIMIT_BYTES else "FAIL", f"{name}: {r['case']}",
                    f"max_memory_allocated {a:.0f} MiB ({a * MIB / 1e9:.2f} GB), reserved "
                    f"{r['cuda_peak_reserved_mib']:.0f} MiB, {r['amp']}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["sample", "big"], choices=("sample", "big"),
                    help="sample: the held-out sample CT at 1.5 mm; big: synthetic 512x512x400 CT (default: both).")
    ap.add_argument("--models", nargs="+", default=["base", "small", "swin"], choices=("base", "small", "swin"),
                    help="Our presets through Segmenter and/or MONAI SwinUNETR (default: all three).")
    ap.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto (default cpu).")
    ap.add_argument("--overlap", type=float, default=0.25,
                    help="Sliding-window overlap for every model (default 0.25, not the bundle default 0.5, "
                         "to keep CPU runs finite).")
    ap.add_argument("--sw-batch", type=int, default=2, help="Windows per network call (default 2, the bundle default).")
    ap.add_argument("--precision", choices=("auto", "fp32"), default="auto",
                    help="auto: bf16 autocast on CUDA (as Segmenter does), fp32 on the CPU; fp32: no autocast.")
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
    args = ap.parse_args(argv)
    if not 0 <= args.overlap < 1:
        ap.error("--overlap must be in [0, 1)")
    if args.sw_batch < 1 or args.memory_only_batches < 1:
        ap.error("--sw-batch and --memory-only-batches must be at least 1")

    if args._child:
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
        sample_shape = tuple(int(n) for n in _ras_shape(v))
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
    print(f"  overlap {args.overlap:g}{' (default; the bundle default is 0.5)' if args.overlap == 0.25 else ''}, "
          f"window batch {args.sw_batch}, Gaussian blending, {N_CLASSES} output channels, random weights")
    print(f"  preprocessing {PREP}")
    if sample_shape:
        print(f"  sample: {args.sample_path} ({sample_desc})")
    if "big" in args.cases:
        print(f"  big: synthetic {'x'.join(map(str, BIG_SHAPE))} CT at {'x'.join(map(str, BIG_SPACING))} mm")
    guard = "off" if args.max_minutes <= 0 else f"{args.max_minutes:g} min per measurement"
    print(f"  time guard: {'memory-only for all' if args.memory_only else guard}")

    plan = _plan(args, sample_shape)
    print()
    print("== plan (estimate from rough CPU priors of "
          + ", ".join(f"{m} {CPU_PRIOR_S_PER_WINDOW[m]:g}" for m in args.models)
          + " s/window; each child re-estimates after its warm-up)" if args.device == "cpu" else "== plan")
    print(_table(["measurement", "model-space shape", "roi", "windows", "ours: slabs", "est. min", "run"], plan))
    if args.device == "cpu":
        total = sum(float(row[5].lstrip("~")) for row in plan)
        print(f"  rough total: ~{total:.0f} min (plus model building and volume loading)", flush=True)

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
    print(_results_table(results, cuda))
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
          + ("  (other processes share these cores: timings are noisy)" if not cuda else ""))
    for r in results:
        for w in r.get("warnings", []):
            print(f"  {r['label']}: {w}")

    by = {r["label"]: r for r in results if "error" not in r}
    ratios: dict[str, float] = {}
    print()
    print("== base / SwinUNETR (same 96^3 window, overlap, window batch, device)")
    rows = []
    for case in args.cases:
        b, s = by.get(f"base@{case}"), by.get(f"swin@{case}")
        if not (b and s):
            continue
        row = [case]
        for key, name in (("sw_s", "sw s"), ("e2e_s", "e2e s"), ("net_s", "net s"), ("s_per_window", "s/win"),
                          ("windows", "windows"), ("peak_rss_mib", "peak RSS"),
                          ("inference_peak_rss_mib", "inf. RSS"), ("cuda_peak_allocated_mib", "CUDA alloc")):
            if b.get(key) is None or s.get(key) is None or not s[key]:
                continue
            x = b[key] / s[key]
            ratios[f"base_over_swin_{case}_{key}"] = x
            row.append(f"{name} {x:.2f}")
        if b["estimated"] or s["estimated"]:
            row.append("(times estimated)")
        rows.append(row)
        print("  " + ", ".join(row))
    if not rows:
        print("  (needs --models base swin)")
    for case in args.cases:
        b, s = by.get(f"base@{case}"), by.get(f"small@{case}")
        if b and s:
            x = s["sw_s"] / b["sw_s"]
            ratios[f"small_over_base_{case}_sw_s"] = x
            print(f"  small/base on {case}: sw s {x:.2f} ({s['windows']} windows of 64^3 vs {b['windows']} of 96^3)")

    targets = _targets(by, args, cuda)
    print()
    print("== targets")
    for verdict, name, detail in targets:
        print(f"  [{verdict}] {name}: {detail}")
    print(f"total wall time: {total_wall:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "device": args.device, "precision": prec, "overlap": args.overlap,
                       "sw_batch": args.sw_batch, "load_average_start": load0, "load_average_end": load1,
                       "results": results, "ratios": ratios,
                       "targets": [{"verdict": v, "target": n, "detail": d} for v, n, d in targets],
                       "total_wall_s": total_wall}, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
