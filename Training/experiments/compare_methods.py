"""The comparison study: scratch, MAE, SimMIM, GMIM and MiM under one budget (`make study`).

For every method: pre-train on the same unlabelled volumes with the same compute budget,
fine-tune on the same labelled cases with the same budget, seeds and settings, segment the
held-out cases and score them; repeat over seeds. Writes ``results.md`` (Dice mean ± sd
per class over seeds, pre-training and fine-tuning wall time, the command, machine, date
and versions), ``results.json`` and ``curves.png`` (validation Dice versus fine-tuning step,
mean over seeds).

"scratch" is the same segmentation network from random weights, once for every backbone
the pre-trained methods use (ConvViT3D -> MiM network, ViT -> UNETR, Swin -> SwinUNETR),
so that each method has its own baseline.

Every step is a real ``python -m mimcore ...`` command in a child process (``--progress
json`` events are read from its output and kept next to the run). A finished step leaves
``study_<stage>.json`` in its folder and is skipped when the study runs again; an
interrupted pre-training or fine-tuning run continues from its last checkpoint.

    python Training/experiments/compare_methods.py --scale small              # CPU, the sample CTs
    python Training/experiments/compare_methods.py --scale small --dry-run    # print the commands
    python Training/experiments/compare_methods.py --scale paper \\
        --pretrain-datalist ct_1k.json --finetune-datalist btcv.json --output study_paper

Settings come from ``Training/configs/study_<scale>.json`` (or ``--config``); the options
below override them. What the small scale can and cannot show: ``Training/experiments/README.md``.

This file is the command line; the study itself is the package ``study/`` next to it:
``settings`` (arms, seeds, config), ``data`` (datalists), ``commands`` (``mim`` command
lines), ``events`` (the children's JSON events), ``runner`` (child processes, skip markers),
``plan`` (what runs for each arm and seed), ``stats``, ``plots`` and ``report`` (results).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from study.plan import run_study
from study.report import write_results
from study.runner import Runner, now, read_json, write_json
from study.settings import StudyError, fingerprint, load_settings


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog="Settings: Training/configs/study_small.json and study_paper.json. "
                                        "A run whose study_<stage>.json exists is skipped: run the same command "
                                        "again to continue an interrupted study, or add seeds/methods.")
    ap.add_argument("--scale", choices=("small", "paper"), default="small",
                    help="small: CPU, tiny models, the sample CTs, about 30 min on 2 cores; paper: published "
                         "sizes and hyper-parameters on GPUs, your datalists (default small)")
    ap.add_argument("--config", help="study config JSON (default Training/configs/study_<scale>.json)")
    ap.add_argument("--output", help="study folder (default study_output/<scale>)")
    ap.add_argument("--results-dir", help="where results.md, results.json and curves.png go (default --output)")
    ap.add_argument("--methods", help="comma list of scratch, mae, simmim, gmim, mim; optional :backbone, e.g. "
                                      "mae:convvit (default: the config's, all five)")
    ap.add_argument("--seeds", help="number of seeds (3 = 0,1,2) or a list (4,7)")
    ap.add_argument("--preset", choices=("tiny", "small", "base"), help="model size for every method")
    ap.add_argument("--labels", help="classes to fine-tune on, e.g. liver,spleen ('' = all)")
    ap.add_argument("--pretrain-steps", type=int, help="budget: this many pre-training steps for every method")
    ap.add_argument("--pretrain-time", type=float, help="budget: this many seconds of pre-training steps per method")
    ap.add_argument("--pretrain-per-seed", action="store_true",
                    help="pre-train once per seed (default: once per method, shared by the fine-tuning seeds)")
    ap.add_argument("--finetune-steps", type=int, help="fine-tuning steps for every arm")
    ap.add_argument("--val-every", type=int, help="validate every N fine-tuning steps")
    ap.add_argument("--val-on", choices=("test", "train"), help="validate (curves, best model) on the held-out "
                                                                "case(s) or on the training case(s)")
    ap.add_argument("--datalist", help="small scale: the sample datalist (default: `mim data samples`)")
    ap.add_argument("--swap-cases", action="store_true", help="small scale: fine-tune on example_ct_sm and "
                                                              "evaluate on the CT series instead")
    ap.add_argument("--pretrain-datalist", help="paper scale: unlabelled CTs ('pretraining' section)")
    ap.add_argument("--finetune-datalist", help="paper scale: labelled cases ('training', 'validation')")
    ap.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep the checkpoints of finished fine-tuning runs (default: delete them once the run is "
                         "done; its model bundle, logs and curves stay)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    ns = ap.parse_args(argv)
    argv_record = ["python", os.path.relpath(__file__, Path.cwd()) if Path(__file__).is_relative_to(Path.cwd())
                   else __file__, *(sys.argv[1:] if argv is None else argv)]
    try:
        cfg = load_settings(ns)
        out = Path(ns.output or f"study_output/{cfg['scale']}").resolve()
        results_dir = Path(ns.results_dir).resolve() if ns.results_dir else out
        study_path = out / "study.json"
        study = read_json(study_path)
        settings = fingerprint(cfg)
        if study is not None and study.get("settings") != settings:
            old, new = study.get("settings", {}), settings
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise StudyError(f"{out} holds a study with other settings ({', '.join(diff)} differ); use another "
                             "--output, or the same options as before (methods and seeds may change)")
        if study is None:
            study = {"started": now(), "settings": settings}
        runner = Runner(ns.dry_run)
        print(f"study: {cfg['scale']} scale, {len(cfg['arms'])} arms ({', '.join(a.key for a in cfg['arms'])}), "
              f"seeds {cfg['seeds']}, output {out}", flush=True)
        if not ns.dry_run:
            write_json(study_path, study)
        data = run_study(cfg, out, runner)
        if ns.dry_run:
            print(f"[dry-run] would write {results_dir / 'results.md'}, results.json and curves.png")
            return 0
        md = write_results(cfg, out, results_dir, data, study, argv_record)
        print(f"\nran {len(runner.ran)} step(s), skipped {len(runner.skipped)} finished step(s)")
        print(f"results: {md}\ncurves:  {results_dir / 'curves.png'}")
        text = md.read_text(encoding="utf-8")
        print(text[text.find("| method"):].split("\n\n")[0] if "| method" in text else "")
        return 0
    except StudyError as e:
        print(f"compare_methods: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncompare_methods: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
