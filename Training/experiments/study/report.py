"""The study's results: everything read back from the runs' own files, and ``results.md``
/ ``results.json`` with the machine, versions and command."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from study.commands import flags, shell
from study.data import case_id
from study.events import read_events
from study.plan import finetune_dir, pretrain_dir, pretrain_seed
from study.plots import plot_curves
from study.runner import now, read_json, write_json
from study.settings import NETWORKS, REPO, fingerprint
from study.stats import FINAL_KEYS, display_path, final_metrics, fmt_ms, fmt_time, mean_sd, short_names


def collect(cfg: dict, out: Path, data: dict) -> dict:
    """Everything the table and the plot need, read from the runs' own files."""
    class_names = None
    arms = []
    for arm in cfg["arms"]:
        row = {"arm": arm.key, "method": arm.method, "backbone": arm.backbone, "title": arm.title,
               "network": NETWORKS[arm.backbone], "seeds": {}, "pretrain": []}
        if arm.pretrained:
            for pseed in dict.fromkeys(pretrain_seed(cfg, s) for s in cfg["seeds"]):
                marker = read_json(pretrain_dir(out, arm, pseed) / "study_pretrain.json")
                if marker:
                    row["pretrain"].append({"seed": pseed, "steps": marker.get("steps"), "wall_s": marker["wall_s"],
                                            "plan": marker.get("plan"),
                                            "final": final_metrics(pretrain_dir(out, arm, pseed) / "metrics.jsonl")})
        for seed in cfg["seeds"]:
            folder = finetune_dir(out, arm, seed)
            evaluation = read_json(folder / "eval" / "evaluation.json")
            ft = read_json(folder / "study_finetune.json")
            if evaluation is None or ft is None or read_json(folder / "study_evaluate.json") is None:
                continue
            dice = {item["name"]: item["dice"]["mean"] if item["dice"].get("n") else None
                    for item in evaluation["summary"]}
            hd95 = {item["name"]: item["hd95_mm"]["mean"] if item["hd95_mm"].get("n") else None
                    for item in evaluation["summary"]}
            class_names = class_names or list(dice)
            values = [v for v in dice.values() if v is not None]
            curve = {}
            for event in read_events(folder / "study_finetune.events.jsonl", "validation"):
                curve[int(event["step"])] = {"dice": event["dice"], "per_class": event.get("per_class", {})}
            if not curve:  # events lost (e.g. an attempt killed hard): the run's own log
                for line in (folder / "validation.jsonl").read_text().splitlines() if \
                        (folder / "validation.jsonl").is_file() else []:
                    rec = json.loads(line)
                    curve[int(rec["step"])] = {"dice": rec["dice"], "per_class": rec.get("per_class", {})}
            row["seeds"][seed] = {"dice": dice, "hd95_mm": hd95,
                                  "mean_dice": sum(values) / len(values) if values else None,
                                  "finetune_wall_s": ft["wall_s"], "curve": dict(sorted(curve.items())),
                                  "evaluation": str(folder / "eval" / "evaluation.json")}
        arms.append(row)
    return {"arms": arms, "classes": class_names or [], "test_cases": [c["case"] for c in data["test"]]}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "os": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True)
        gpus = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()] if proc.returncode == 0 else []
        info["gpus"] = gpus
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("mimcore", "torch", "monai", "numpy", "SimpleITK", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        out["git"] = (sha + (" + uncommitted changes" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


def write_results(cfg: dict, out: Path, results_dir: Path, data: dict, study: dict, argv: list[str]) -> Path:
    results = collect(cfg, out, data)
    classes = results["classes"]
    pre, ft, budget = cfg["pretrain"], cfg["finetune"], cfg["pretrain"]["budget"]
    info, vers = machine(), versions()
    results.update({"command": argv, "machine": info, "versions": vers, "settings": fingerprint(cfg),
                    "methods": cfg["methods"], "seeds": cfg["seeds"], "started": study.get("started"),
                    "written": now(), "output": str(out)})
    write_json(results_dir / "results.json", results)
    png = plot_curves(results, results_dir / "curves.png")

    if budget["mode"] == "time":
        budget_text = (f"the same wall-clock time of optimizer steps for every method, {fmt_time(budget['seconds'])} "
                       f"(steps = that time / the seconds per step that a {budget.get('probe_steps', 4)}-step probe "
                       "measured on this machine, kept in plan.json)")
    else:
        budget_text = f"the same number of optimizer steps for every method, {budget['steps']}"
    total_pt = sum(p["wall_s"] for r in results["arms"] for p in r["pretrain"])
    total_ft = sum(s["finetune_wall_s"] for r in results["arms"] for s in r["seeds"].values())
    n_done = sum(len(r["seeds"]) for r in results["arms"])
    n_all = len(results["arms"]) * len(cfg["seeds"])
    gpu = ", ".join(info.get("gpus") or []) or "no GPU"
    val_on = cfg["data"].get("val_on", "test")
    lines = [
        f"# Pre-training methods compared ({cfg['scale']} scale)",
        "",
        f"- **Command:** `{shell(argv)}`",
        f"- **Date:** started {study.get('started', '?')}, results written {results['written']} (UTC)",
        f"- **Machine:** {info['cpu']}, {info['logical_cpus']} logical CPUs"
        + (f" ({info['usable_cpus']} usable)" if info.get("usable_cpus") not in (None, info["logical_cpus"]) else "")
        + (f", OMP_NUM_THREADS={info['omp_num_threads']}" if info.get("omp_num_threads") else "")
        + (f", {info['memory_gib']} GiB" if info.get("memory_gib") else "") + f", {gpu}; {info['os']}",
        "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in vers.items() if v),
        f"- **Settings:** `{display_path(Path(cfg['config_path']))}`"
        f" with the command's overrides (all of them in results.json); preset `{cfg['preset']}`, device "
        f"`{cfg.get('device', 'auto')}`",
        f"- **Pre-training:** {len(data['pretrain_volumes'])} unlabelled volume(s) "
        f"({', '.join(short_names(data['pretrain_volumes'])[:6])}"
        f"{', …' if len(data['pretrain_volumes']) > 6 else ''}), identical for every method; budget: {budget_text}; "
        + ("one pre-training per method, shared by the fine-tuning seeds"
           if pre.get("shared_across_seeds", True) else "one pre-training per method and seed") + ".",
        f"- **Fine-tuning:** {len(data['train'])} labelled case(s) "
        f"({', '.join(case_id(e['image']) for e in data['train'][:6])}{', …' if len(data['train']) > 6 else ''}), "
        f"labels {cfg.get('labels') or 'all'}, {ft['steps']} steps, validation every {ft['val_every']} steps; "
        f"`mim finetune` options {' '.join(flags(ft.get('args', {})))}; the same for every arm and seed.",
        f"- **Evaluation:** `mim segment` + `mim evaluate` on {len(data['test'])} held-out labelled case(s) "
        f"({', '.join(results['test_cases'][:6])}{', …' if len(results['test_cases']) > 6 else ''}) with the model "
        + ("of the last fine-tuning step (`--keep last`: no model selection; the validation curves are computed on "
           + ("these same case(s) but choose nothing)." if val_on == "test" else "the training case(s)).")
           if ft.get("args", {}).get("keep") == "last" else
           "that scored best at validation on these same case(s) (there is no third labelled case; the published "
           "BTCV results also report their validation cases)." if val_on == "test" else
           "that scored best at validation on the training case(s) (the curves then show the fit to the training "
           "case, not generalisation)."),
        f"- **Seeds:** {', '.join(map(str, cfg['seeds']))} (fine-tuning); runs finished: {n_done} of {n_all}; "
        f"total pre-training {fmt_time(total_pt)}, fine-tuning {fmt_time(total_ft)}.",
        "",
        "## Dice on the held-out case(s), mean ± sd over seeds",
        "",
        "| method | network | pre-training steps | pre-training wall | fine-tuning wall | seeds | "
        + " | ".join(f"{c} Dice" for c in classes) + " | mean Dice | mean Dice per seed (min–max) |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * (len(classes) + 2),
    ]
    for row in results["arms"]:
        seeds = row["seeds"].values()
        if row["method"] == "scratch":
            steps_txt, pt_txt = "0", "–"
        else:
            steps_txt = ", ".join(str(p["steps"]) for p in row["pretrain"]) or "–"
            pt_txt = fmt_time(mean_sd([p["wall_s"] for p in row["pretrain"]])[0]) if row["pretrain"] else "–"
        ft_m, ft_s = mean_sd([s["finetune_wall_s"] for s in seeds])
        ft_txt = "–" if ft_m is None else fmt_time(ft_m) + (f" ± {fmt_time(ft_s)}" if ft_s is not None else "")
        cells = [fmt_ms([s["dice"].get(c) for s in seeds]) for c in classes]
        cells.append(fmt_ms([s["mean_dice"] for s in seeds]))
        per_seed = [s["mean_dice"] for s in seeds if s["mean_dice"] is not None]
        cells.append(f"{', '.join(f'{v:.3f}' for v in per_seed)} ({min(per_seed):.3f}–{max(per_seed):.3f})"
                     if per_seed else "–")
        lines.append(f"| {row['title']} | {row['network']} | {steps_txt} | {pt_txt} | {ft_txt} | "
                     f"{len(row['seeds'])} | " + " | ".join(cells) + " |")
    finals = [(row, p) for row in results["arms"] for p in row["pretrain"] if p.get("final")]
    if finals:
        keys = [k for k in FINAL_KEYS if any(k in p["final"] for _, p in finals)]
        lines += ["", "## Pre-training at the end (mean over the last 10 % of steps)", "",
                  "MiM's alignment terms and its collapse monitor: `cos..._match` is the cosine between each "
                  "child's and its own parent's alignment-head outputs, `cos..._mismatch` the same against another "
                  "pair's parent. When the two are equal, the alignment carries no information about which region "
                  "a child came from.", "",
                  "| method | pre-training seed | " + " | ".join(keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        for row, p in finals:
            lines.append(f"| {row['title']} | {p['seed']} | "
                         + " | ".join(f"{p['final'][k]:.4g}" if k in p["final"] else "–" for k in keys) + " |")
    all_steps = sorted({st for r in results["arms"] for s in r["seeds"].values() for st in s["curve"]})
    if all_steps:
        lines += ["", "## Validation Dice by fine-tuning step (mean over classes, then mean over seeds)", "",
                  "| method | " + " | ".join(str(s) for s in all_steps) + " |",
                  "|---|" + "---:|" * len(all_steps)]
        for row in results["arms"]:
            cells = []
            for st in all_steps:
                m, _ = mean_sd([s["curve"][st]["dice"] for s in row["seeds"].values() if st in s["curve"]])
                cells.append("–" if m is None else f"{m:.3f}")
            lines.append(f"| {row['title']} | " + " | ".join(cells) + " |")
    lines += ["", f"![validation Dice versus fine-tuning step]({png.name})", "",
              "Dice: `mim evaluate` (MONAI), per class, averaged over the held-out cases of a seed, then mean ± "
              "sample sd over seeds. Wall times: the whole command (start-up, data loading, checkpoints and, for "
              "fine-tuning, validation included); pre-training wall excludes the probe. Per-run files: "
              f"`{display_path(out)}/finetune/<method-backbone>/seed<k>/` (`eval/evaluation.json`, "
              "`validation.jsonl`, `study_*.json`).", ""]
    if cfg["scale"] == "small":
        lines += ["## What this can and cannot show", "",
                  "Tiny models, minutes of pre-training on a handful of CTs, one fine-tuning case and one "
                  "held-out CT: this **cannot** reproduce the papers' claims (faster convergence and higher "
                  "final Dice than from scratch) nor rank the methods; differences here are within what seeds "
                  "and the choice of cases change. It **does** show that every method runs end to end "
                  "(pre-training, fine-tuning from its checkpoint, segmentation, evaluation) under identical "
                  "budgets, data and seeds, and what each costs on this machine. See "
                  "`Training/experiments/README.md`.", ""]
    results_dir.mkdir(parents=True, exist_ok=True)
    md = results_dir / "results.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md
