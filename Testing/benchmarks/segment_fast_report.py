"""bench_segment's report on the fast profile: its time against the reference path, the
per-class Dice of its labels against the reference's, achieved FLOP/s against this machine's
matmul rate, our time over nnU-Net's at equal spacing, and the issue's targets."""

from __future__ import annotations

import os

from segment_cases import BIG_SHAPE
from segment_measure import MIB
from segment_report import table

FAST_LIMIT_S = 180.0  # 512x512x400 CT, end to end, fast profile, 2-core CPU
BASE_LIMIT_S = 600.0  # the same with base at its own spacing
DICE_MIN = 0.99


def dice_per_class(a, b) -> dict[int, float]:
    """Dice of each label present in a or b (background left out)."""
    import numpy as np

    out = {}
    for c in np.union1d(np.unique(a), np.unique(b)):
        if c == 0:
            continue
        x, y = a == c, b == c
        out[int(c)] = float(2 * (x & y).sum() / (x.sum() + y.sum()))
    return out


def fast_report(by: dict, cases: list[str], labels_dir: str) -> dict:
    """Print fast against reference (time, Dice per class) for every model run both ways."""
    import numpy as np

    out = {}
    print()
    print(f"== fast profile against the reference path (same model, same volume; Dice per class of the label "
          f"maps on the input grid; target >= {DICE_MIN})")
    rows = []
    for case in cases:
        for model in ("small", "base", "bundle"):
            ref, fast = by.get(f"{model}@{case}"), by.get(f"{model}-fast@{case}")
            if not (ref and fast):
                continue
            a = np.load(os.path.join(labels_dir, f"{model}@{case}.npy"))
            b = np.load(os.path.join(labels_dir, f"{model}-fast@{case}.npy"))
            dice = dice_per_class(a, b)
            worst = min(dice.values()) if dice else 1.0
            speed = fast["e2e_s"] / ref["e2e_s"]
            out[f"fast_over_ref_{model}_{case}_e2e_s"] = speed
            out[f"fast_dice_min_{model}_{case}"] = worst
            fast["dice_vs_reference"] = dice
            rows.append([f"{model}@{case}", fast.get("runtime", "torch"), fast.get("amp", "?"),
                         f"{ref.get('overlap', '?')}/{fast.get('overlap', '?')}", f"{fast.get('setup_s', 0):.1f}",
                         f"{ref['e2e_s']:.1f}", f"{fast['e2e_s']:.1f}", f"{speed:.2f}",
                         f"{fast['windows_real']}/{ref['windows_real']}", f"{worst:.4f}",
                         " ".join(f"{c}:{d:.3f}" for c, d in sorted(dice.items())),
                         "random weights: near-tied logits" if model != "bundle" else "trained bundle"])
    if rows:
        print(table(["model@case", "fast runtime", "fast precision", "overlap ref/fast", "fast setup s", "ref e2e s", "fast e2e s",
                     "fast/ref", "windows run", "min Dice", "Dice per class",
                     "weights"], rows))
        print("  (random weights put many voxels near a tie between classes, where any difference flips the argmax: "
              "bf16 rounding, and the fast profile's larger slabs, which move the windows near a slab border "
              "(a 512x512 CT at 1.5 mm is one slab instead of two); the Dice that matters is the trained "
              "bundle's: --bundle)")
    else:
        print("  (needs a model run both ways, e.g. --models small small-fast)")
    return out


def flops_report(by: dict) -> None:
    print()
    print("== achieved network FLOP/s (counted FLOPs of one window x windows run / network seconds) against this "
          "machine's dense 2048^3 matmul rate measured in the same child (fp32, or bf16 for bf16 runs)")
    rows = [[label, r.get("amp", "fp32"), f"{r['gflop_per_window']:.1f}", r["windows_real"], f"{r['net_s']:.1f}",
             f"{r['achieved_gflops']:.1f}", f"{r['matmul_gflops']:.1f} {r['matmul_dtype']}",
             f"{r['pct_of_matmul']:.0f} %"]
            for label, r in by.items() if "achieved_gflops" in r]
    print(table(["measurement", "precision", "GFLOP/window", "windows run", "net s", "GFLOP/s", "matmul GFLOP/s",
                 "of matmul"], rows) if rows else "  (none)")


def nnunet_report(by: dict, cases: list[str]) -> dict:
    out = {}
    print()
    print("== ours / nnU-Net 3d_fullres (end to end, same volume file, same spacing; nnU-Net: its own plans and "
          "nnUNetPredictor, mirroring off)")
    rows = []
    for case in cases:
        nn = by.get(f"nnunet@{case}")
        if not nn:
            continue
        for label, r in by.items():
            if r["case"] != case or r["model"] in ("nnunet", "swin"):
                continue
            same = [round(x, 3) for x in r.get("spacing", [])] == [round(x, 3) for x in nn["spacing"]]
            x = r["e2e_s"] / nn["e2e_s"]
            out[f"{r['model']}_over_nnunet_{case}_e2e_s"] = x
            rows.append([label, f"{r['e2e_s']:.1f}", f"{nn['e2e_s']:.1f}", f"{x:.2f}",
                         "x".join(f"{v:g}" for v in r.get("spacing", [])) + (" (equal)" if same else " (NOT equal)"),
                         f"{nn['network']} patch {nn['roi']}, {nn['windows']} windows"])
    print(table(["ours", "ours e2e s", "nnU-Net e2e s", "ours/nnU-Net", "our spacing", "nnU-Net"], rows)
          if rows else "  (needs --models nnunet and one of ours on the same case; nnunetv2 installed)")
    return out


def fast_targets(by: dict, args) -> list[tuple[str, str, str]]:
    """The issue's targets for the 512x512x400 CT (judged only on that volume, not with --quick)."""
    out = []
    big = "big" in args.cases and not args.quick and args.device == "cpu"
    why = "needs --cases big without --quick, on the CPU" if not big else ""
    for model, limit in (("small-fast", FAST_LIMIT_S), ("base-fast", BASE_LIMIT_S)):
        name = (f"{model} on the {'x'.join(map(str, BIG_SHAPE))} CT end to end (read -> .seg.nrrd) "
                f"<= {limit / 60:.0f} min")
        r = by.get(f"{model}@big")
        if not big or not r:
            out.append(("SKIP", name, why or f"needs --models {model}"))
            continue
        est = " (estimated: memory-only run)" if r["estimated"] else ""
        out.append(("PASS" if r["e2e_s"] <= limit else "FAIL", name,
                    f"{r['e2e_s']:.0f} s, peak RSS {r['peak_rss_mib'] * MIB / 1e9:.2f} GB{est}"))
        out.append(("PASS" if r["peak_rss_mib"] * MIB < 6e9 else "FAIL", f"{model} peak RSS < 6 GB",
                    f"{r['peak_rss_mib'] * MIB / 1e9:.2f} GB"))
    for r in by.values():
        if "dice_vs_reference" in r and r["dice_vs_reference"]:
            worst = min(r["dice_vs_reference"].values())
            trained = r["model"].startswith("bundle")
            out.append(("PASS" if worst >= DICE_MIN else ("FAIL" if trained else "INFO"),
                        f"{r['label']}: Dice >= {DICE_MIN} per class against the reference path",
                        f"min {worst:.4f}" + ("" if trained else " (random weights; judged with --bundle)")))
    nn = by.get("nnunet@big") if not args.quick else None
    for model in ("small-fast", "base-fast"):
        r = by.get(f"{model}@big")
        if nn and r:
            out.append(("PASS" if r["e2e_s"] < nn["e2e_s"] else "FAIL", f"{model} faster than nnU-Net 3d_fullres",
                        f"{r['e2e_s']:.0f} s vs {nn['e2e_s']:.0f} s"))
    return out
