#!/usr/bin/env python
"""Pre-training speed, memory and efficiency of MiM, with MONAI's 3D MAE as a yardstick.

Configurations (each one runs in a fresh child process of this script, so that peak
memory -- ``ru_maxrss`` on the CPU -- is that configuration's own):

- ``mim:<preset>``  one MiM pre-training step on one (2S)^3 crop: forward + backward of
  all three levels (1 + 4 + 16 volumes of S^3) with the alignment losses; no optimizer
  update. ``base`` is the published size (192^3 crop).
- ``mae``           MONAI ``MaskedAutoEncoderViT`` (ViT-B/16 at 96^3, 75 % masking,
  decoder 512 x 8 blocks, learned position embeddings), forward + backward of an L1
  loss on hidden tokens, one 96^3 volume. Needs ``einops`` (MONAI's optional dependency).
- ``four96``        our ``base`` encoder + decoder on a batch of four 96^3 volumes with
  60 % random masking (``MiMPretrainModel.reconstruct``, norm-pix MSE): the exact
  configuration the published MiM code was timed on (12.9 s on this machine).

Each configuration: 1 warm-up step (during which the model FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention), then
``--repeats`` timed steps; the median is reported. FLOP/s are compared with this
machine's dense matmul rate measured in the same run (fp32 on the CPU; bf16, the
autocast dtype, on CUDA).

Precision: fp32 on the CPU, autocast bf16 on CUDA. On the CPU other processes
sharing the cores make the numbers noisy; the load average is printed before and after.

Examples::

    python Testing/benchmarks/bench_pretrain.py --presets small
    python Testing/benchmarks/bench_pretrain.py --presets base --repeats 1 --json base.json
    python Testing/benchmarks/bench_pretrain.py --presets --skip mae          # four96 only
    python Testing/benchmarks/bench_pretrain.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench_common import machine_info, sync

RESULT_TAG = "@@BENCH_RESULT@@ "

# The published MiM implementation, measured on this machine (fp32, CPU), per the project spec.
PUBLISHED = {
    "step_per_crop_s": 83.0,  # one 192^3 crop, all three levels, forward + backward
    "four96_s": 12.9,  # one forward + backward, batch of four 96^3 volumes, 60 % masking
}
VOLUMES_PER_CROP = 1 + 4 + 16


# ----------------------------------------------------------------------------- helpers


def _autocast(device: str):
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def matmul_rate(device: str, n: int = 2048, repeats: int = 5) -> dict:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul (fp32 on CPU, bf16 on CUDA)."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    del a, b
    best = min(times)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "best_s": best,
            "median_s": statistics.median(times), "flops_per_s": 2 * n**3 / best}


# ----------------------------------------------------------------------------- child mode

def _build(config: str, device: str, seed: int):
    """-> (model, step_fn, description). step_fn() runs one forward + backward."""
    import torch

    from mimcore.methods.losses import masked_l1, masked_mse, norm_pix_target
    from mimcore.methods.masking import patchify, random_hidden
    from mimcore.methods.mim import MiMPretrainModel
    from mimcore.models.presets import get_preset

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    if config.startswith("mim:"):
        mcfg = get_preset(config.split(":", 1)[1])
        model = MiMPretrainModel(mcfg).to(device)
        c = mcfg.crop_size
        crop = torch.rand(1, 1, c, c, c, device=device)

        def loss_fn():
            return model(crop, gen)["loss"]

        desc = f"1 crop {c}^3 (21 vols {mcfg.input_size}^3)"
    elif config == "four96":
        mcfg = get_preset("base")
        model = MiMPretrainModel(mcfg).to(device)
        s = mcfg.input_size
        vol = torch.rand(4, 1, s, s, s, device=device)
        n_tokens = mcfg.grid**3
        eps = model.cfg.norm_pix_eps

        def loss_fn():
            hidden = random_hidden(4, n_tokens, 0.6, gen).to(device)
            pred, _ = model.reconstruct(vol, hidden)
            return masked_mse(pred, norm_pix_target(patchify(vol, mcfg.patch_size).float(), eps), hidden)

        desc = f"4 vols {s}^3, 60% masked"
    elif config == "mae":
        import importlib.util

        if importlib.util.find_spec("einops") is None:
            raise RuntimeError("MONAI's MaskedAutoEncoderViT needs einops (pip install einops), "
                               "or leave MAE out with --skip mae")
        from monai.networks.nets import MaskedAutoEncoderViT

        model = MaskedAutoEncoderViT(
            in_channels=1, img_size=96, patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12,
            num_heads=12, masking_ratio=0.75, decoder_hidden_size=512, decoder_mlp_dim=2048,
            decoder_num_layers=8, decoder_num_heads=8, qkv_bias=True,
            # learned position embeddings, as in the WACV 2023 3D MAE (MONAI's sincos default
            # also cannot build a 512-d decoder embedding: it needs a multiple of 6)
            pos_embed_type="learnable", decoder_pos_embed_type="learnable",
        ).to(device)
        vol = torch.rand(1, 1, 96, 96, 96, device=device)

        def loss_fn():
            pred, mask = model(vol)  # mask: 1 on hidden tokens
            # target token order is ours, not MONAI's -- irrelevant for timing
            return masked_l1(pred, patchify(vol, 16), mask.bool())

        desc = "1 vol 96^3, 75% masked"
    else:
        raise SystemExit(f"unknown configuration {config!r}")

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with _autocast(device):
            loss = loss_fn()
        loss.backward()
        sync(device)
        return float(loss.detach())

    return model, step, desc


def run_child(config: str, device: str, repeats: int, threads: int | None, seed: int, matmul_n: int) -> dict:
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
    mm = matmul_rate(device, matmul_n)  # adjacent reference for this configuration

    model, step, desc = _build(config, device, seed)
    n_params = sum(p.numel() for p in model.parameters())
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    # warm-up step, FLOPs counted on it (the counter's overhead stays out of the timings)
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        loss = step()
    warmup_s = time.perf_counter() - t0
    flops = counter.get_total_flops()
    print(f"[{config}] warm-up {warmup_s:.1f} s, loss {loss:.4f}, {flops / 1e9:.1f} GFLOP", file=sys.stderr, flush=True)

    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        print(f"[{config}] step {i + 1}/{repeats}: {times[-1]:.2f} s", file=sys.stderr, flush=True)

    out = {
        "config": config, "input": desc, "device": device, "threads": torch.get_num_threads(),
        "keep_freed_memory": malloc_kept,
        "params_m": n_params / 1e6, "warmup_s": warmup_s, "step_times_s": times,
        "median_s": statistics.median(times), "gflop_per_step": flops / 1e9,
        "child_matmul": mm, "rss_before_model_mib": rss_base,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_end": os.getloadavg(),
    }
    if device.startswith("cuda"):
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    out["child_wall_s"] = time.perf_counter() - t_start
    return out


# ----------------------------------------------------------------------------- parent mode

def spawn(config: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", config, "--device", args.device,
           "--repeats", str(args.repeats), "--seed", str(args.seed), "--matmul-size", str(args.matmul_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "error": f"over --child-timeout {args.child_timeout:g} s",
                "process_wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["process_wall_s"] = wall
            return res
    return {"config": config, "error": f"child exited with {proc.returncode}", "process_wall_s": wall}


def _fmt_table(rows: list[dict], peak: float, cuda: bool) -> str:
    head = ["config", "input", "s/step (median)", "min..max", "GFLOP/step", "GFLOP/s", "% matmul",
            "peak CUDA MiB" if cuda else "peak RSS MiB", "wall s"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["config"], "ERROR: " + r["error"]] + [""] * (len(head) - 3) + [f"{r['process_wall_s']:.0f}"])
            lines[-1] = lines[-1][:len(head)]
            continue
        rate = r["gflop_per_step"] * 1e9 / r["median_s"]
        mem = r["cuda_peak_allocated_mib"] if cuda else r["peak_rss_mib"]
        lines.append([
            r["config"], r["input"], f"{r['median_s']:.3f}",
            f"{min(r['step_times_s']):.2f}..{max(r['step_times_s']):.2f}",
            f"{r['gflop_per_step']:.1f}", f"{rate / 1e9:.1f}", f"{100 * rate / peak:.1f}",
            f"{mem:.0f}", f"{r['process_wall_s']:.0f}",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="*", default=["small", "base"], choices=("tiny", "small", "base"),
                    help="MiM presets to time one pre-training step of (default: small base; "
                         "give no value to time none).")
    ap.add_argument("--skip", nargs="*", default=[], choices=("mae", "four96"),
                    help="Leave out MONAI's MAE and/or the four-96^3-volume configuration.")
    ap.add_argument("--repeats", type=int, default=3, help="Timed steps after 1 warm-up (median reported; default 3).")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda[:N] (autocast bf16). Default cpu.")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in each child (default: torch's default).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matmul-size", type=int, default=2048, help="Edge of the reference square matmul (default 2048).")
    ap.add_argument("--child-timeout", type=float, help="Seconds allowed per configuration (default: none).")
    ap.add_argument("--json", metavar="FILE", help="Also write all results to FILE as JSON.")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        try:
            res = run_child(args._child, args.device, args.repeats, args.threads, args.seed, args.matmul_size)
        except Exception as e:  # noqa: BLE001 -- reported in the parent's table
            import traceback

            traceback.print_exc()
            print(RESULT_TAG + json.dumps({"config": args._child, "error": f"{type(e).__name__}: {e}"}), flush=True)
            return 1
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0

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

    mm = matmul_rate(args.device, args.matmul_size)
    print(f"  dense matmul {mm['n']}^3 {mm['dtype']}: {mm['flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"(best of 5; median {2 * mm['n'] ** 3 / mm['median_s'] / 1e9:.1f})", flush=True)

    configs = [f"mim:{p}" for p in args.presets]
    if "four96" not in args.skip:
        configs.append("four96")
    if "mae" not in args.skip:
        configs.append("mae")

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
    print(f"== results (step = forward + backward, no optimizer update; % matmul = achieved model FLOP/s "
          f"/ {peak / 1e9:.1f} GFLOP/s, the best {mm['dtype']} {mm['n']}^3 matmul rate seen in this run; "
          f"child matmul rates: {', '.join(f'{x / 1e9:.0f}' for x in rates[1:])} GFLOP/s)")
    print(_fmt_table(results, peak, cuda))
    print(f"load average at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}"
          + ("  (other processes share these cores: timings are noisy)" if not cuda else ""))

    by = {r["config"]: r for r in results if "error" not in r}
    ratios: dict[str, float] = {}
    print()
    print("== comparisons")
    for p in args.presets:
        r = by.get(f"mim:{p}")
        if r is None:
            continue
        per_vol = r["median_s"] / VOLUMES_PER_CROP
        ratios[f"mim_{p}_per_volume_s"] = per_vol
        print(f"  MiM {p}: {r['median_s']:.2f} s per crop = {per_vol:.3f} s per volume "
              f"({VOLUMES_PER_CROP} volumes per crop)")
        if "mae" in by:
            x = r["median_s"] / by["mae"]["median_s"]
            ratios[f"mim_{p}_step_over_mae_volume"] = x
            y = per_vol / by["mae"]["median_s"]
            ratios[f"mim_{p}_per_volume_over_mae_volume"] = y
            note = "" if p == "base" else f"  [{p} is not the 96^3 size MAE runs at]"
            print(f"    / MONAI MAE ViT-B/16 per 96^3 volume ({by['mae']['median_s']:.2f} s): "
                  f"step {x:.1f}x, per volume {y:.2f}x{note}")
    print(f"  published MiM code on this machine (spec): {PUBLISHED['step_per_crop_s']:.0f} s per 192^3 crop; "
          f"{PUBLISHED['four96_s']} s per fwd+bwd of four 96^3 volumes at 60 % masking (fp32, CPU)")
    if "mim:base" in by:
        x = by["mim:base"]["median_s"] / PUBLISHED["step_per_crop_s"]
        ratios["base_step_ours_over_published"] = x
        print(f"    ours, base step per 192^3 crop: {by['mim:base']['median_s']:.2f} s -> ours/published = {x:.2f}")
    if "four96" in by:
        x = by["four96"]["median_s"] / PUBLISHED["four96_s"]
        ratios["four96_ours_over_published"] = x
        print(f"    ours, four 96^3 at 60 %:       {by['four96']['median_s']:.2f} s -> ours/published = {x:.2f}")
    if cuda:
        print("    (the published numbers are CPU fp32; a CUDA run is not comparable with them)")
    print(f"total wall time: {total_wall:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "device": args.device, "repeats": args.repeats,
                       "load_average_start": load0, "load_average_end": load1, "matmul": mm,
                       "matmul_peak_flops_per_s": peak, "results": results, "ratios": ratios,
                       "published_reference": PUBLISHED, "total_wall_s": total_wall}, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
