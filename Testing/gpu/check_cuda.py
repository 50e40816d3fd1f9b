#!/usr/bin/env python
"""Every CUDA path of mimcore in one run on one GPU (under 8 minutes), one table at the end.

Checks (each a row: PASS / FAIL / SKIP with its figures):

- ``pretrain <method> <precision>``: ``mim pretrain`` steps of each method (mim, mae, simmim,
  gmim; ``small`` on a GPU, ``tiny`` with ``--tiny``) under bf16 autocast, plus ``mim`` under
  fp16 autocast with the gradient scaler; s/step, peak GPU memory, the loss finite.
- ``finetune <precision>``: ``mim finetune`` steps (bf16, and fp16 with the scaler).
- ``OOM -> smaller batch``: a real CUDA out-of-memory (``torch.cuda.set_per_process_memory_fraction``
  under a window batch that cannot fit): the segmenter halves the batch and finishes on the GPU.
- ``OOM -> CPU``: a memory cap that not even one window fits under: the network moves to the
  CPU and the labels still come out on the input's grid.
- ``base inference memory``: ``max_memory_allocated`` of ``base`` segmenting the 512x512x400 CT
  (target < 4 GB) and its seconds, reference and fast profile.
- ``bench_pretrain.py --device cuda`` and ``bench_segment.py --device cuda`` (their own
  tables are in the log; the row says whether they ran and how long).

``--device cpu --tiny`` is the dry run ``make test`` runs (Testing/core/test_check_cuda_dry_run.py):
the same checks at tiny sizes on the CPU, fp32 (CPU autocast is not what these check), the
out-of-memory errors simulated (raised by the network hook: there is no CUDA allocator to
exhaust), the benchmarks and the fp16 rows skipped.

Training runs go through ``mimcore.cli.main.main`` in this process, so that the peak GPU memory
is this process's ``torch.cuda.max_memory_allocated``. Synthetic CT volumes (no download: GPU
machines may be offline).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("mim", "mae", "simmim", "gmim")
MIB = 2**20


class Table:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, check: str, ok: bool | None, **figures):
        row = {"check": check, "result": "SKIP" if ok is None else ("PASS" if ok else "FAIL"), **figures}
        self.rows.append(row)
        print(f"[check_cuda] {row['result']:4s} {check} {json.dumps(figures)}", file=sys.stderr, flush=True)

    def render(self) -> str:
        head = ["check", "result", "precision", "s/step", "peak GPU MiB", "seconds", "note"]
        cells = [[r["check"], r["result"], r.get("precision", ""),
                  "" if r.get("s_per_step") is None else f"{r['s_per_step']:.3f}",
                  "" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}",
                  "" if r.get("seconds") is None else f"{r['seconds']:.1f}", r.get("note", "")] for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *cells)]
        line = lambda row: "| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |"  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(c) for c in cells])


def synthetic_cts(folder: Path, n: int, shape, spacing) -> Path:
    """n CT-like volumes (HU) with a labelled sphere: images in folder/images, labels in folder/labels."""
    from mimcore.data.volume_io import save_volume

    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    for i in range(n):
        body = x**2 / 0.8 + y**2 / 0.6 < 1
        organ = (x - 0.2) ** 2 + y**2 + (z * 0.8) ** 2 < 0.15
        hu = np.where(body, 40.0, -1000.0) + np.where(organ, 80.0, 0.0) + 20 * rng.standard_normal(shape)
        aff = np.diag([*spacing, 1.0])
        save_volume(folder / "images" / f"ct{i}.nii.gz", hu.astype(np.float32), aff)
        save_volume(folder / "labels" / f"ct{i}.nii.gz", organ.astype(np.uint8), aff, dtype=np.uint8)
    return folder


class Gpu:
    """Peak-memory bookkeeping (no-ops on the CPU)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def reset(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self):
        if not self.cuda:
            return None
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated() / MIB


def cli(args: list[str]) -> tuple[int, list[dict]]:
    """``mim ARGS --progress json`` in this process -> (exit code, its events)."""
    from mimcore.cli.main import main
    from mimcore.events import parse_event

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(args + ["--progress", "json"])
    return rc, [e for e in map(parse_event, out.getvalue().splitlines()) if e]


def last_loss(run: Path) -> float:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return float(json.loads(lines[-1]).get("loss", math.nan))


def check_training(table: Table, gpu: Gpu, args, data: Path, work: Path) -> None:
    preset = "tiny" if args.tiny else "small"
    steps = args.steps
    precisions = ["bf16", "fp16"] if gpu.cuda else ["fp32"]
    for method in METHODS:
        for prec in precisions:
            if prec == "fp16" and method != "mim":
                continue  # the scaler is shared by every method: one fp16 run checks it
            name = f"pretrain {method} {'fp16 + GradScaler' if prec == 'fp16' else prec}"
            run = work / f"pre_{method}_{prec}"
            gpu.reset()
            t0 = time.perf_counter()
            try:
                rc, _ = cli(["pretrain", "--data-dir", str(data / "images"), "--method", method, "--preset", preset,
                             "--steps", str(steps), "--warmup-steps", "1", "--lr", "1e-4", "--precision", prec,
                             "--device", args.device, "--output", str(run), "--no-tensorboard"])
                secs = time.perf_counter() - t0
                loss = last_loss(run) if rc == 0 else math.nan
                table.add(name, rc == 0 and math.isfinite(loss), precision=prec, s_per_step=secs / steps,
                          peak_mib=gpu.peak_mib(), seconds=secs, note=f"{preset}, loss {loss:.4f}")
            except Exception as e:  # noqa: BLE001 -- a row, not a crash
                table.add(name, False, precision=prec, note=f"{type(e).__name__}: {e}"[:120])
    if not gpu.cuda:
        table.add("pretrain mim fp16 + GradScaler", None, note="CUDA only (the CPU trains in fp32)")
    for prec in precisions:
        name = f"finetune {'fp16 + GradScaler' if prec == 'fp16' else prec}"
        run = work / f"ft_{prec}"
        gpu.reset()
        t0 = time.perf_counter()
        try:
            rc, _ = cli(["finetune", "--images", str(data / "images"), "--label-dir", str(data / "labels"),
                         "--label-names", "1:organ", "--preset", preset, "--steps", str(steps), "--val-every",
                         str(steps), "--precision", prec, "--device", args.device, "--output", str(run),
                         "--spacing", *(["4", "4", "4"] if args.tiny else ["1.5", "1.5", "2"]), "--no-tensorboard"])
            secs = time.perf_counter() - t0
            loss = last_loss(run) if rc == 0 else math.nan
            table.add(name, rc == 0 and math.isfinite(loss), precision=prec, s_per_step=secs / steps,
                      peak_mib=gpu.peak_mib(), seconds=secs, note=f"{preset}, loss {loss:.4f}")
        except Exception as e:  # noqa: BLE001
            table.add(name, False, precision=prec, note=f"{type(e).__name__}: {e}"[:120])
    if not gpu.cuda:
        table.add("finetune fp16 + GradScaler", None, note="CUDA only")


def random_bundle(preset: str, folder: Path, n_classes: int = 14, spacing=(1.5, 1.5, 2.0)):
    import torch

    from mimcore.bundles.bundle import load_bundle, save_bundle
    from mimcore.models.convvit import preset as convvit_preset
    from mimcore.models.mim_segnet import MiMSegNet, architecture_dict

    torch.manual_seed(0)
    net = MiMSegNet(convvit_preset(preset), n_classes)
    desc = {"name": f"check-{preset}", "architecture": architecture_dict(net, preset),
            "labels": [{"value": i, "name": f"c{i}", "color": [i, 0, 0]} for i in range(1, n_classes)],
            "preprocessing": {"orientation": "RAS", "spacing": list(spacing), "hu_min": -175, "hu_max": 250},
            "inference": {"overlap": 0.25, "sw_batch_size": 2}, "training": {}}
    return load_bundle(save_bundle(folder / f"bundle_{preset}", net.state_dict(), desc))


def check_oom(table: Table, gpu: Gpu, args, work: Path) -> None:
    """The out-of-memory fallbacks of mimcore.inference.window, with real OOMs on CUDA."""
    import torch

    from mimcore.data.volume_io import load_volume
    from mimcore.inference.segment import Segmenter

    vol = load_volume(sorted((work / "data" / "images").glob("*.nii.gz"))[0])
    bundle = random_bundle("tiny" if args.tiny else "small", work, spacing=(3, 3, 3) if args.tiny else (1.5, 1.5, 2))
    for name, target in (("OOM -> smaller window batch", "batch"), ("OOM -> CPU", "cpu")):
        warnings: list[str] = []
        forward = None
        if gpu.cuda:
            seg = Segmenter(bundle, device=args.device, sw_batch=64 if target == "batch" else 2,
                            events=lambda ev, **f: warnings.append(f.get("message", "")))
            # what one window needs, measured: the cap lets 2 windows fit ("batch") or not even one ("cpu")
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            seg.window.predict(torch.zeros((1, 1) + (seg.window.roi,) * 3))
            one = torch.cuda.max_memory_allocated() - held
            total = torch.cuda.get_device_properties(seg.device).total_memory
            cap = (held + (2.5 if target == "batch" else 0.3) * one) / total
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap), seg.device)
        else:  # simulated: raise what CUDA raises, as long as the condition holds
            state = {"calls": 0}

            def forward(net, x, state=state, target=target):
                state["calls"] += 1
                if (target == "batch" and x.shape[0] > 1) or (target == "cpu" and state["calls"] <= 2):
                    raise torch.cuda.OutOfMemoryError("simulated CUDA out of memory")
                return net(x)

            seg = Segmenter(bundle, device="cpu", sw_batch=4, forward=forward,
                            events=lambda ev, **f: warnings.append(f.get("message", "")))
        t0 = time.perf_counter()
        try:
            labels = seg.segment(vol)
            where = next(seg.net.parameters()).device.type
            ok = labels.shape == vol.shape and any("out of memory" in w for w in warnings)
            if gpu.cuda:
                ok = ok and (where == "cuda" if target == "batch" else where == "cpu")
            table.add(name, ok, seconds=time.perf_counter() - t0,
                      note=("simulated; " if not gpu.cuda else "") + f"net ends on {where}, window batch "
                           f"{seg.window.sw_batch}; {len(warnings)} warning(s)")
        except Exception as e:  # noqa: BLE001
            table.add(name, False, note=f"{type(e).__name__}: {e}"[:120])
        finally:
            if gpu.cuda:
                torch.cuda.set_per_process_memory_fraction(1.0, seg.device)
                torch.cuda.empty_cache()


def check_inference_memory(table: Table, gpu: Gpu, args, work: Path) -> None:
    sys.path.insert(0, str(ROOT / "Testing" / "benchmarks"))
    from segment_cases import big_volume

    from mimcore.inference.segment import Segmenter

    preset = "tiny" if args.tiny else "base"
    shape = (48, 48, 40) if args.tiny else None
    vol = big_volume(shape) if shape else big_volume()
    what = "x".join(map(str, shape or (512, 512, 400)))
    bundle = random_bundle(preset, work)
    for profile in ("reference", "fast"):
        name = f"{preset} inference {what} CT ({profile})"
        try:
            seg = Segmenter(bundle, device=args.device, profile=profile)
            gpu.reset()
            t0 = time.perf_counter()
            labels = seg.segment(vol)
            secs = time.perf_counter() - t0
            peak = gpu.peak_mib()
            ok = labels.shape == vol.shape and (peak is None or peak * MIB < 4e9)
            amp = seg.window.amp_dtype if gpu.cuda else seg.window.cpu_amp_dtype
            table.add(name, ok, precision=str(amp).replace("torch.", "") if amp else "fp32", peak_mib=peak,
                      seconds=secs, note="target < 4 GB GPU memory" if gpu.cuda else "CPU dry run")
            del seg
        except Exception as e:  # noqa: BLE001
            table.add(name, False, note=f"{type(e).__name__}: {e}"[:120])


def check_benchmarks(table: Table, args) -> None:
    # sized for the 8-minute budget: base (the paper's size) with its four methods; the 512x512x400
    # CT with base (reference and fast) and nnU-Net
    benches = [("bench_pretrain.py --device cuda", ["bench_pretrain.py", "--device", args.device, "--presets", "base",
                                                     "--repeats", "2"]),
               ("bench_segment.py --device cuda", ["bench_segment.py", "--device", args.device, "--cases", "big",
                                                    "--models", "base", "base-fast", "nnunet", "--max-minutes", "0"])]
    for name, cmd in benches:
        if args.tiny or not args.device.startswith("cuda"):
            table.add(name, None, note="not in the CPU dry run")
            continue
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, str(ROOT / "Testing" / "benchmarks" / cmd[0]), *cmd[1:]],
                                  capture_output=True, text=True, timeout=args.bench_timeout)
            print(proc.stdout[-6000:], flush=True)
            table.add(name, proc.returncode == 0, seconds=time.perf_counter() - t0,
                      note=f"exit {proc.returncode}; its tables are printed above")
        except subprocess.TimeoutExpired:
            table.add(name, False, seconds=time.perf_counter() - t0, note=f"over {args.bench_timeout} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda[:N] (the check) or cpu (the dry run).")
    ap.add_argument("--tiny", action="store_true", help="tiny models and volumes, no benchmarks (the dry run).")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 3; 1 with --tiny).")
    ap.add_argument("--bench-timeout", type=float, default=200, help="seconds allowed to each benchmark.")
    ap.add_argument("--only", nargs="+", choices=("train", "oom", "memory", "bench"),
                    default=["train", "oom", "memory", "bench"])
    ap.add_argument("--json", help="also write the table's rows to this file")
    args = ap.parse_args(argv)
    args.steps = args.steps or (1 if args.tiny else 3)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("check_cuda: no CUDA device here (torch.cuda.is_available() is False); "
              "run `check_cuda.sh --device cpu --tiny` for the dry run", file=sys.stderr)
        return 2
    gpu = Gpu(args.device)
    table = Table()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="check_cuda_") as tmp:
        work = Path(tmp)
        shape, spacing = ((40, 40, 36), (3.0, 3.0, 3.0)) if args.tiny else ((160, 160, 120), (1.5, 1.5, 2.0))
        data = synthetic_cts(work / "data", 2, shape, spacing)
        if "train" in args.only:
            check_training(table, gpu, args, data, work)
        if "oom" in args.only:
            check_oom(table, gpu, args, work)
        if "memory" in args.only:
            check_inference_memory(table, gpu, args, work)
        if "bench" in args.only:
            check_benchmarks(table, args)
    device = torch.cuda.get_device_name(args.device) if gpu.cuda else "CPU (dry run)"
    print(f"\n== check_cuda on {device}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s")
    print(table.render())
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": table.rows}, indent=1))
    return 0 if all(r["result"] != "FAIL" for r in table.rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
