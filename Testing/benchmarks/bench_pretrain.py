#!/usr/bin/env python
"""Pre-training speed, memory and efficiency of MiM, MAE, SimMIM and GMIM, side by side.

Configurations (each one runs in a fresh child process of this script, so that peak
memory -- ``ru_maxrss`` on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA -- is that
configuration's own; names as in ``bench_pretrain_methods.py``):

- ``<method>[/<backbone>]:<preset>`` for each of ``--methods`` (default: all four; MAE and
  SimMIM on both of their backbones, ``vit`` and ``convvit``; ``mae/vit`` picks one) at each
  of ``--presets``: one pre-training step of the model ``mim pretrain --method ...`` trains,
  on ``--batch`` crops of the method's crop size (MiM: (2S)^3, all three levels, 1 + 4 + 16
  volumes of S^3; MAE/SimMIM: S^3; GMIM: its region, 160^3 at ``base``).
- ``four96``        (with ``mim``) our ``base`` encoder + decoder on four 96^3 volumes with
  60 % random masking: the configuration the published MiM code was timed on (12.9 s on
  this machine).
- ``monai-mae``     (with ``mim`` or ``mae``) MONAI ``MaskedAutoEncoderViT`` (ViT-B/16 at
  96^3, 75 % masking, decoder 512 x 8), one 96^3 volume: the yardstick MiM is compared
  with. Needs ``einops`` (MONAI's optional dependency).

A step = forward + backward + AdamW update (as ``mim pretrain`` with ``--accum 1``); the
forward + backward part is also reported on its own (the published figures exclude the
update). Each configuration: 1 warm-up step (during which the model FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention), then
``--repeats`` timed steps; best and median seconds per sample (step / batch) are reported
(``--stat best`` bases the other columns and the comparisons on the best repeat, the steadier
figure when other processes share the machine).
FLOP/s are compared with this machine's dense matmul rate measured in the same run (fp32
on the CPU; bf16, the autocast dtype, on CUDA): the best rate seen by the parent and by
every child just before its model is built.

Precision: fp32 on the CPU, autocast bf16 on CUDA. On the CPU other processes
sharing the cores make the numbers noisy; the load average is printed before and after.

Examples::

    python Testing/benchmarks/bench_pretrain.py --presets small
    python Testing/benchmarks/bench_pretrain.py --presets tiny small --methods mim,mae,simmim,gmim
    python Testing/benchmarks/bench_pretrain.py --presets base --repeats 1 --json base.json
    python Testing/benchmarks/bench_pretrain.py --presets --skip monai-mae     # four96 only
    python Testing/benchmarks/bench_pretrain.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from bench_common import RESULT_TAG, machine_info, matmul_rate, spawn_child, sync
from bench_pretrain_methods import EXTRAS, build, format_table, make_step, method_configs, per_sample


# The published MiM implementation, measured on this machine (fp32, CPU), per the project spec.
PUBLISHED = {
    "step_per_crop_s": 83.0,  # one 192^3 crop, all three levels, forward + backward
    "four96_s": 12.9,  # one forward + backward, batch of four 96^3 volumes, 60 % masking
}
VOLUMES_PER_CROP = 1 + 4 + 16


# ----------------------------------------------------------------------------- helpers


def _register_cpu_sdpa_flops() -> None:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; add it."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    for op, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", fc.sdpa_flop),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", fc.sdpa_backward_flop),
    ):
        packet = getattr(aten, op, None)
        if packet is None or packet in fc.flop_registry or packet.default in fc.flop_registry:
            continue
        try:
            fc.register_flop_formula(packet, get_raw=True)(formula)  # formula is already shape-wrapped
        except Exception:  # noqa: BLE001 -- an older/newer torch: attention then goes uncounted
            pass


# ----------------------------------------------------------------------------- child mode

def run_child(config: str, device: str, repeats: int, threads: int | None, seed: int, matmul_n: int,
              batch: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    # what `mim pretrain` does on the CPU (mimcore.training.cpu_memory); MIM_KEEP_FREED_MEMORY=0 turns it off
    from mimcore.training.cpu_memory import keep_freed_memory

    malloc_kept = keep_freed_memory() if device == "cpu" else False
    _register_cpu_sdpa_flops()
    from torch.utils.flop_counter import FlopCounterMode

    t_start = time.perf_counter()
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    mm = matmul_rate(device, n=matmul_n)  # adjacent reference for this configuration

    model, loss_fn, info = build(config, device, seed, batch)
    n_params = sum(p.numel() for p in model.parameters())
    step = make_step(model, loss_fn, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    # warm-up step, FLOPs counted on it (the counter's overhead stays out of the timings)
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = step()
    warmup_s = time.perf_counter() - t0
    flops = counter.get_total_flops()
    print(f"[{config}] warm-up {warmup_s:.1f} s, loss {loss:.4f}, {flops / 1e9:.1f} GFLOP", file=sys.stderr, flush=True)

    times, fwd_bwd, update = [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        _, fb, up = step()
        times.append(time.perf_counter() - t0)
        fwd_bwd.append(fb)
        update.append(up)
        print(f"[{config}] step {i + 1}/{repeats}: {times[-1]:.2f} s", file=sys.stderr, flush=True)

    out = {
        "config": config, **info, "device": device, "threads": torch.get_num_threads(),
        "keep_freed_memory": malloc_kept,
        "params_m": n_params / 1e6, "warmup_s": warmup_s, "step_times_s": times,
        "fwd_bwd_times_s": fwd_bwd, "update_times_s": update,
        "median_s": statistics.median(times), "best_s": min(times),
        "fwd_bwd_median_s": statistics.median(fwd_bwd), "gflop_per_step": flops / 1e9,
        "child_matmul": mm, "rss_before_model_mib": rss_base,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_end": os.getloadavg(),
    }
    out["median_s_per_sample"] = out["median_s"] / info["samples"]
    out["best_s_per_sample"] = out["best_s"] / info["samples"]
    if device.startswith("cuda"):
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    out["child_wall_s"] = time.perf_counter() - t_start
    return out


# ----------------------------------------------------------------------------- parent mode

def spawn(config: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", config, "--device", args.device,
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--matmul-size", str(args.matmul_size),
           "--batch", str(args.batch)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return spawn_child(cmd, {"config": config}, args.child_timeout)


def _method_list(values: list[str]) -> list[str]:
    return [m.strip() for v in values for m in v.split(",") if m.strip()]


def _comparisons(args, results: list[dict], cuda: bool) -> dict[str, float]:
    """Print MiM against MONAI's MAE and the published code, and the methods against MiM."""
    by = {r["config"]: r for r in results if "error" not in r}
    fb = {c: per_sample(r, "fwd_bwd_times_s", args.stat) for c, r in by.items()}  # forward + backward per sample
    ratios: dict[str, float] = {}
    print()
    print(f"== comparisons (forward + backward per sample, {args.stat} of the repeats: the published figures "
          "exclude the update)")
    mae = fb.get("monai-mae")
    for p in args.presets:
        if f"mim:{p}" not in fb:
            continue
        per_crop = fb[f"mim:{p}"]
        per_vol = per_crop / VOLUMES_PER_CROP
        ratios[f"mim_{p}_per_volume_s"] = per_vol
        print(f"  MiM {p}: {per_crop:.3g} s per crop = {per_vol:.3g} s per volume ({VOLUMES_PER_CROP} volumes per crop)")
        if mae is not None:
            x, y = per_crop / mae, per_vol / mae
            ratios[f"mim_{p}_step_over_mae_volume"] = x
            ratios[f"mim_{p}_per_volume_over_mae_volume"] = y
            note = "" if p == "base" else f"  [{p} is not the 96^3 size MAE runs at]"
            print(f"    / MONAI MAE ViT-B/16 per 96^3 volume ({mae:.3g} s): step {x:.3g}x, per volume {y:.3g}x{note}")
    if mae is not None and "mae/vit:base" in fb:
        x = fb["mae/vit:base"] / mae
        ratios["mae_vit_base_over_monai_mae"] = x
        print(f"  our MAE ViT-B/16 at 96^3: {fb['mae/vit:base']:.2f} s -> ours/MONAI's MaskedAutoEncoderViT = {x:.2f}")
    print(f"  published MiM code on this machine (spec): {PUBLISHED['step_per_crop_s']:.0f} s per 192^3 crop; "
          f"{PUBLISHED['four96_s']} s per fwd+bwd of four 96^3 volumes at 60 % masking (fp32, CPU)")
    if "mim:base" in fb:
        x = fb["mim:base"] / PUBLISHED["step_per_crop_s"]
        ratios["base_step_ours_over_published"] = x
        print(f"    ours, base step per 192^3 crop: {fb['mim:base']:.2f} s -> ours/published = {x:.2f}")
    if "four96" in by:
        t = fb["four96"] * by["four96"]["samples"]
        ratios["four96_ours_over_published"] = t / PUBLISHED["four96_s"]
        print(f"    ours, four 96^3 at 60 %:       {t:.2f} s -> ours/published = {t / PUBLISHED['four96_s']:.2f}")
    if cuda:
        print("    (the published numbers are CPU fp32; a CUDA run is not comparable with them)")
    # the methods against MiM at the same preset: whole step (with the update) per sample
    for p in args.presets:
        ref = by.get(f"mim:{p}")
        others = [r for r in by.values() if r.get("preset") == p and r["config"] not in (f"mim:{p}",) + EXTRAS]
        if ref is None or not others:
            continue
        ref_t = per_sample(ref, stat=args.stat)
        parts = []
        for r in others:
            x = per_sample(r, stat=args.stat) / ref_t
            ratios[f"{r['config']}_over_mim_{p}"] = x
            parts.append(f"{r['config']} {x:.3g}x")
        print(f"  per sample (full step, {args.stat}) over MiM {p} ({ref_t:.3g} s; its sample is a 21-volume "
              "crop): " + ", ".join(parts))
    return ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["small", "base"], choices=("tiny", "small", "base"),
                    help="Model sizes to time one pre-training step of, for every method (default: small base; "
                         "give no value to time none).")
    ap.add_argument("--methods", nargs="+", default=["mim,mae,simmim,gmim"], metavar="M[,M...]",
                    help="Methods to time, comma- or space-separated: mim, mae, simmim, gmim (mae and simmim: "
                         "both backbones; mae/vit, simmim/convvit, ... for one). Default: all.")
    ap.add_argument("--skip", nargs="*", default=[], choices=("monai-mae", "four96", "mae"),
                    help="Leave out the reference configurations: MONAI's MAE (monai-mae; 'mae' is its old "
                         "name) and/or the four-96^3-volume MiM configuration.")
    ap.add_argument("--batch", type=int, default=1, help="Crops per step for the methods (default 1).")
    ap.add_argument("--repeats", type=int, default=3, help="Timed steps after 1 warm-up (best and median; default 3).")
    ap.add_argument("--stat", choices=("median", "best"), default="median",
                    help="Which of the repeats the fwd+bwd/AdamW columns, GFLOP/s, %% matmul and the comparisons "
                         "use (default median; best is the steadier figure on a shared machine).")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda[:N] (autocast bf16). Default cpu.")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in each child (default: torch's default).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matmul-size", type=int, default=2048, help="Edge of the reference square matmul (default 2048).")
    ap.add_argument("--child-timeout", type=float, help="Seconds allowed per configuration (default: none).")
    ap.add_argument("--json", metavar="FILE", help="Also write all results to FILE as JSON.")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.batch < 1:
        ap.error("--repeats and --batch must be at least 1")

    if args._child:
        try:
            res = run_child(args._child, args.device, args.repeats, args.threads, args.seed, args.matmul_size,
                            args.batch)
        except Exception as e:  # noqa: BLE001 -- reported in the parent's table
            import traceback

            traceback.print_exc()
            print(RESULT_TAG + json.dumps({"config": args._child, "error": f"{type(e).__name__}: {e}"}), flush=True)
            return 1
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

    methods = _method_list(args.methods)
    try:
        configs = method_configs(methods, args.presets)
    except ValueError as e:
        ap.error(str(e))
    skip = {"monai-mae" if s == "mae" else s for s in args.skip}
    chosen = {m.split("/")[0] for m in methods}
    if "mim" in chosen and "four96" not in skip:
        configs.append("four96")
    if chosen & {"mim", "mae"} and "monai-mae" not in skip:
        configs.append("monai-mae")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda given but CUDA is not available")

    info = machine_info()
    load0 = os.getloadavg()
    print("== machine")
    for k, v in info.items():
        print(f"  {k}: {v}")
    print(f"  device: {args.device} ({'autocast bf16' if cuda else 'fp32'}); load average at start: "
          f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")

    mm = matmul_rate(args.device, n=args.matmul_size)
    print(f"  dense matmul {mm['n']}^3 {mm['dtype']}: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"(best of 5; median {2 * mm['n'] ** 3 / mm['median_s'] / 1e9:.1f})", flush=True)

    results = []
    t_all = time.perf_counter()
    for c in configs:
        print(f"== running {c} (1 warm-up + {args.repeats} timed) ...", flush=True)
        results.append(spawn(c, args))
    total_wall = time.perf_counter() - t_all
    load1 = os.getloadavg()

    # machine peak = best matmul rate seen in this run (parent + every child); conservative fraction
    rates = [mm["flops_per_s"]] + [r["child_matmul"]["flops_per_s"] for r in results if "child_matmul" in r]
    peak = max(rates)
    print()
    print(f"== results (step = forward + backward + AdamW update; s/sample = step / samples per step "
          f"(best and median of {args.repeats}); fwd+bwd and AdamW: the step's two parts ({args.stat}, per sample); "
          f"% matmul = achieved model FLOP/s ({args.stat} step) / {peak / 1e9:.1f} GFLOP/s, the best {mm['dtype']} "
          f"{mm['n']}^3 matmul rate seen in this run; child matmul rates: "
          f"{', '.join(f'{x / 1e9:.0f}' for x in rates[1:])} GFLOP/s)")
    print(format_table(results, peak, cuda, args.stat))
    print(f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end {load1[0]:.2f} {load1[1]:.2f} "
          f"{load1[2]:.2f} on {info.get('usable_cores')} usable cores"
          + ("  (other processes share these cores: timings are noisy)" if not cuda else ""))

    ratios = _comparisons(args, results, cuda)
    print(f"total wall time: {total_wall:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "device": args.device, "repeats": args.repeats, "batch": args.batch,
                       "stat": args.stat,
                       "methods": methods, "presets": args.presets,
                       "load_average_start": load0, "load_average_end": load1, "matmul": mm,
                       "matmul_peak_flops_per_s": peak, "results": results, "ratios": ratios,
                       "published_reference": PUBLISHED, "total_wall_s": total_wall}, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
