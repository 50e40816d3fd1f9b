"""bench_segment's parent-side report: the plan printed before the runs, the results
table, the base/SwinUNETR ratios and the PASS/FAIL targets."""

from __future__ import annotations

from segment_cases import BIG_SPACING, N_CLASSES, PREP, ROI
from segment_measure import MIB

# rough seconds per window on this project's 2-core CPU (fp32, sw-batch 2, shared machine): for the
# estimate printed before starting only; the children measure their own
CPU_PRIOR_S_PER_WINDOW = {"base": 12.0, "small": 2.7, "swin": 18.0, "base-fast": 6.0, "small-fast": 1.4,
                          "bundle": 2.7, "bundle-fast": 1.4, "nnunet": 15.0}
CPU_LIMIT_BYTES = 6e9
GPU_LIMIT_BYTES = 4e9


def table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def results_table(results: list[dict], cuda: bool) -> str:
    head = ["measurement", "mode", "model-space shape", "roi", "windows", "prep s", "sw s", "post s", "e2e s",
            "net s", "s/win", "peak RSS MiB", "inf. RSS MiB", "base RSS MiB"]
    if cuda:
        head += ["CUDA alloc MiB", "CUDA resv MiB"]
    head.append("wall s")
    rows = []
    num = lambda x: "" if x is None else f"{x:.1f}"  # noqa: E731 -- nnU-Net has no prep/sw/post split
    for r in results:
        if "skipped" in r:
            rows.append([r["label"], "SKIPPED"] + [""] * (len(head) - 3) + [f"{r['process_wall_s']:.0f}"])
            continue
        if "error" in r:
            rows.append([r["label"], "ERROR: " + r["error"]] + [""] * (len(head) - 3) + [f"{r['process_wall_s']:.0f}"])
            continue
        t = "~" if r["estimated"] else ""
        inf = r["inference_peak_rss_mib"]
        row = [r["label"], r["mode"], "x".join(str(n) for n in r.get("model_space", [])), r["roi"], r["windows"],
               num(r["prep_s"]), t + num(r["sw_s"]), num(r["post_s"]), f"{t}{r['e2e_s']:.1f}",
               f"{t}{r['net_s']:.1f}", f"{r['s_per_window']:.2f}", f"{r['peak_rss_mib']:.0f}",
               "?" if inf is None else f"{inf:.0f}", f"{r['rss_before_mib']:.0f}"]
        if cuda:
            row += [f"{r.get('cuda_peak_allocated_mib', 0):.0f}", f"{r.get('cuda_peak_reserved_mib', 0):.0f}"]
        row.append(f"{r['process_wall_s']:.0f}")
        rows.append(row)
    return table(head, rows)


def plan(args, sample_shape) -> list[list]:
    """Rows of the pre-run estimate."""
    import torch

    from mimcore.inference.window import WindowSegmenter, count_windows
    from segment_cases import big_shape

    rows = []
    for case in args.cases:
        if case == "big":
            shape = tuple(max(1, round(n * s / t))
                          for n, s, t in zip(big_shape(args.quick), BIG_SPACING, PREP["spacing"]))
        else:
            shape = sample_shape
        for model in args.models:
            if model == "nnunet" or model.startswith("bundle"):  # its plans / the bundle decide
                rows.append([f"{model}@{case}", "?", "?", "?", "its own", "?", "full"])
                continue
            roi = ROI[model.removesuffix("-fast")]
            if model == "swin":
                n = count_windows(shape, roi, args.overlap)
                note = "one pass"
            else:
                w = WindowSegmenter(torch.nn.Identity(), roi, torch.device("cpu"), args.overlap, args.sw_batch)
                n = w.total_windows(shape, N_CLASSES)
                note = f"{len(w.slabs(shape, N_CLASSES)[1])} slab(s)"
            if model.endswith("-fast"):
                note += ", air windows skipped"
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


def targets(by: dict, args, cuda: bool) -> list[tuple[str, str, str]]:
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
    if getattr(args, "quick", False):
        ours = []
        out.append(("SKIP", name, "--quick: not the 512x512x400 volume"))
    elif args.device != "cpu":
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


def ratios(by: dict, cases: list[str]) -> dict[str, float]:
    """Print base / SwinUNETR (and small / base) per case; -> the ratios by name."""
    out: dict[str, float] = {}
    print()
    print("== base / SwinUNETR (same 96^3 window, overlap, window batch, device)")
    rows = []
    for case in cases:
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
            out[f"base_over_swin_{case}_{key}"] = x
            row.append(f"{name} {x:.2f}")
        if b["estimated"] or s["estimated"]:
            row.append("(times estimated)")
        rows.append(row)
        print("  " + ", ".join(row))
    if not rows:
        print("  (needs --models base swin)")
    for case in cases:
        b, s = by.get(f"base@{case}"), by.get(f"small@{case}")
        if b and s:
            x = s["sw_s"] / b["sw_s"]
            out[f"small_over_base_{case}_sw_s"] = x
            print(f"  small/base on {case}: sw s {x:.2f} ({s['windows']} windows of 64^3 vs {b['windows']} of 96^3)")
    return out
