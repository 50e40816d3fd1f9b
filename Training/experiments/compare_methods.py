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
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CONFIGS = REPO / "Training" / "configs"

METHOD_ORDER = ("scratch", "mae", "simmim", "gmim", "mim")
#: backbones each method runs on (first = default); as mimcore.methods.registry.BACKBONES
BACKBONES = {"mim": ("convvit",), "mae": ("vit", "convvit"), "simmim": ("vit", "convvit"), "gmim": ("swin",),
             "scratch": ("convvit", "vit", "swin")}
METHOD_NAMES = {"scratch": "scratch", "mim": "MiM", "mae": "MAE", "simmim": "SimMIM", "gmim": "GMIM"}
NETWORKS = {"convvit": "ConvViT3D → MiM network", "vit": "ViT → UNETR", "swin": "Swin → SwinUNETR"}
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: sample CTs that hold the voxels of another sample CT (same patient): never pre-train on
#: the patient that is evaluated (example_ct_sm.nii.gz = 30 slices of example_ct.nii.gz)
SAME_PATIENT = {"example_ct_sm.nii.gz": ("example_ct.nii.gz",), "example_ct.nii.gz": ("example_ct_sm.nii.gz",)}
#: settings that may change between invocations of one study (more seeds, more methods)
FREE_KEYS = ("methods", "seeds")
#: the probe that measures seconds per pre-training step loads only this many volumes
PROBE_VOLUMES = 4


class StudyError(Exception):
    """A problem the user can fix; printed without a traceback (exit code 2)."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Arm:
    """One row of the table: a method (or scratch) on a backbone."""

    method: str
    backbone: str

    @property
    def key(self) -> str:
        return f"{self.method}-{self.backbone}"

    @property
    def pretrained(self) -> bool:
        return self.method != "scratch"

    @property
    def title(self) -> str:
        return f"{METHOD_NAMES[self.method]} ({self.backbone})"


def parse_arms(methods: list[str]) -> list[Arm]:
    """``["scratch", "mae", "mim"]`` -> arms, grouped by backbone, scratch first in each group.
    ``scratch`` alone means one scratch arm per backbone of the other methods; a backbone
    can be named: ``mae:convvit``, ``scratch:swin``."""
    named, scratch_all = [], False
    for item in methods:
        method, _, backbone = item.strip().lower().partition(":")
        if method not in BACKBONES:
            raise StudyError(f"unknown method {method!r}; choose from {', '.join(METHOD_ORDER)}")
        if method == "scratch" and not backbone:
            scratch_all = True
            continue
        backbone = backbone or BACKBONES[method][0]
        if backbone not in BACKBONES[method]:
            raise StudyError(f"{METHOD_NAMES[method]} does not run on {backbone!r}; it runs on "
                             f"{', '.join(BACKBONES[method])}")
        if Arm(method, backbone) not in named:
            named.append(Arm(method, backbone))
    backbones = list(dict.fromkeys(a.backbone for a in named if a.pretrained))
    if scratch_all:
        for b in backbones or ["convvit"]:
            if Arm("scratch", b) not in named:
                named.append(Arm("scratch", b))
    order = list(dict.fromkeys([a.backbone for a in named]))
    return sorted(named, key=lambda a: (order.index(a.backbone), METHOD_ORDER.index(a.method)))


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> [0, 1, 2]; ``"4,7"`` -> [4, 7]; ``"5,"`` -> [5]."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return list(range(int(text)))
    except ValueError:
        raise StudyError(f"--seeds {text!r}: give a count (3 = seeds 0,1,2) or a list (4,7)") from None


def load_settings(ns: argparse.Namespace) -> dict:
    path = Path(ns.config) if ns.config else CONFIGS / f"study_{ns.scale}.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StudyError(f"cannot read the study config {path}: {e}") from None
    cfg = strip_comments(cfg)
    cfg["config_path"] = str(path.resolve())
    cfg.setdefault("scale", ns.scale)
    if ns.methods:
        cfg["methods"] = [m for m in ns.methods.split(",") if m.strip()]
    if ns.seeds:
        cfg["seeds"] = parse_seeds(ns.seeds)
    if ns.preset:
        cfg["preset"] = ns.preset
    if ns.labels is not None:
        cfg["labels"] = ns.labels or None
    if ns.device:
        cfg["device"] = ns.device
    cfg["keep_checkpoints"] = bool(ns.keep_checkpoints or cfg.get("keep_checkpoints"))
    pre, ft, data = cfg["pretrain"], cfg["finetune"], cfg["data"]
    if ns.pretrain_steps is not None and ns.pretrain_time is not None:
        raise StudyError("give either --pretrain-steps or --pretrain-time, not both")
    if ns.pretrain_steps is not None:
        pre["budget"] = {"mode": "steps", "steps": ns.pretrain_steps}
    if ns.pretrain_time is not None:
        pre["budget"] = dict(pre["budget"], mode="time", seconds=ns.pretrain_time)
    if ns.pretrain_per_seed:
        pre["shared_across_seeds"] = False
    if ns.finetune_steps is not None:
        ft["steps"] = ns.finetune_steps
        if ns.val_every is None:
            ft["val_every"] = max(1, ns.finetune_steps // 5)
    if ns.val_every is not None:
        ft["val_every"] = ns.val_every
    if ns.val_on:
        data["val_on"] = ns.val_on
    data["swap_cases"] = bool(ns.swap_cases or data.get("swap_cases"))
    for key in ("pretrain_datalist", "finetune_datalist"):
        value = getattr(ns, key)
        if value:
            data[key] = str(Path(value).resolve())
        elif data.get(key):
            data[key] = str((path.parent / data[key]).resolve())
    if ns.datalist:
        data["sample_datalist"] = str(Path(ns.datalist).resolve())
    budget = pre["budget"]
    if budget.get("mode") not in ("time", "steps"):
        raise StudyError(f"pretrain budget mode must be 'time' or 'steps', not {budget.get('mode')!r}")
    for key, value in (("pretrain steps", budget.get("steps", 1)), ("pretrain seconds", budget.get("seconds", 1)),
                       ("fine-tuning steps", ft["steps"]), ("--val-every", ft["val_every"])):
        if not value or value <= 0:
            raise StudyError(f"{key} must be positive")
    if data.get("val_on", "test") not in ("test", "train"):
        raise StudyError("--val-on must be 'test' or 'train'")
    cfg["arms"] = parse_arms(cfg["methods"])
    if not cfg["seeds"]:
        raise StudyError("no seeds")
    return cfg


def strip_comments(obj):
    """The config without its ``_comment*`` keys."""
    if isinstance(obj, dict):
        return {k: strip_comments(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_comments(v) for v in obj]
    return obj


def fingerprint(cfg: dict) -> dict:
    """What must stay the same for the runs of one output folder to belong together."""
    keep = {k: v for k, v in cfg.items() if k not in FREE_KEYS + ("arms", "config_path", "keep_checkpoints")}
    keep = json.loads(json.dumps(keep, sort_keys=True))
    keep["data"].pop("sample_datalist", None)  # where the sample data is cached does not matter
    return keep


# --------------------------------------------------------------------------- data


def case_id(path: str) -> str:
    name = Path(path).name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_section(datalist: Path, section: str, need_label: bool) -> list[dict]:
    """Entries of a MONAI-style datalist section, paths absolute (relative to the datalist)."""
    try:
        data = json.loads(datalist.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise StudyError(f"cannot read the datalist {datalist}: {e}") from None
    if section not in data or not isinstance(data[section], list):
        raise StudyError(f"the datalist {datalist} has no '{section}' section")
    out = []
    for item in data[section]:
        entry = dict(item) if isinstance(item, dict) else {"image": item}
        for key in ("image", "label"):
            if isinstance(entry.get(key), str):
                entry[key] = str((datalist.parent / entry[key]).resolve())
        if need_label and not entry.get("label"):
            raise StudyError(f"'{section}' of {datalist} has a case without a label: {entry.get('image')}")
        out.append(entry)
    return out


def label_names(datalist: Path) -> dict[str, str]:
    data = json.loads(datalist.read_text(encoding="utf-8"))
    return {str(k): str(v) for k, v in (data.get("labels") or {}).items()}


def sample_datalist(cfg: dict, dry_run: bool) -> Path:
    if cfg["data"].get("sample_datalist"):
        return Path(cfg["data"]["sample_datalist"])
    cmd = [sys.executable, "-m", "mimcore", "data", "samples", "--quiet"]
    print("$ " + shell(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise StudyError("`mim data samples` failed; fetch the sample data first (see `mim data samples --help`)")
    return Path(proc.stdout.strip().splitlines()[-1])


def prepare_data(cfg: dict, out: Path, dry_run: bool) -> dict:
    """The study's datalists (written to out/data unless dry_run) and its test cases."""
    data = cfg["data"]
    if data.get("source") == "samples":
        samples = sample_datalist(cfg, dry_run)
        names = label_names(samples)
        labelled = read_section(samples, "training", need_label=True)
        series = [e for e in labelled if "dicom" in Path(e["image"]).name]
        others = [e for e in labelled if e not in series]
        if len(series) != 1 or not others:
            raise StudyError(f"{samples} is not the sample datalist of `mim data samples` (it needs the CT series "
                             "and one more labelled CT in 'training')")
        train, test = series, others[:1]
        if data.get("swap_cases"):
            train, test = test, train
        excluded = {Path(e["image"]) for e in test}  # never pre-train on the evaluated patient
        excluded |= {Path(e["image"]).parent / n for e in test for n in SAME_PATIENT.get(Path(e["image"]).name, ())}
        unlabelled = read_section(samples, "pretraining", False)
        held_out = read_section(samples, "held_out", False) if "held_out" in json.loads(samples.read_text()) else []
        pretrain = [e for e in unlabelled + held_out if Path(e["image"]) not in excluded]
        pretrain_list = {"pretraining": [{"image": e["image"]} for e in pretrain]}
        pretrain_path, pretrain_section = out / "data" / "pretrain.json", "pretraining"
        source = str(samples)
    else:
        if not data.get("pretrain_datalist") or not data.get("finetune_datalist"):
            raise StudyError("the paper scale needs --pretrain-datalist (unlabelled CTs) and --finetune-datalist "
                             "(labelled cases; BTCV-style 'training'/'validation' sections)")
        ft_source = Path(data["finetune_datalist"])
        names = label_names(ft_source)
        train = read_section(ft_source, data.get("train_section", "training"), True)
        test = read_section(ft_source, data.get("test_section", "validation"), True)
        pretrain_path, pretrain_section = Path(data["pretrain_datalist"]), data.get("pretrain_section")
        pretrain_list = None
        pretrain = read_section(pretrain_path, pretrain_section, False) if pretrain_section else []
        source = f"{data['pretrain_datalist']} + {data['finetune_datalist']}"
    if data.get("val_on", "test") == "train":
        val = []  # `mim finetune` then validates on the training cases
    elif data.get("source") == "samples" or data.get("val_section") in (None, data.get("test_section")):
        val = test
    else:  # a labelled validation section of its own
        val = read_section(Path(data["finetune_datalist"]), data["val_section"], True)
    keep = ("image", "label")
    finetune_list = {"labels": names, "training": [{k: e[k] for k in keep} for e in train],
                     "validation": [{k: e[k] for k in keep} for e in val]}
    cases, seen = [], set()
    for i, e in enumerate(test):
        cid = case_id(e["image"])
        cid = cid if cid not in seen else f"{cid}_{i}"
        seen.add(cid)
        cases.append({"case": cid, "image": e["image"], "label": e["label"]})
    paths = {"pretrain": pretrain_path, "finetune": out / "data" / "finetune.json", "test": out / "data" / "test.json"}
    if dry_run:
        print(f"[dry-run] data: pre-training on {len(pretrain)} volume(s) "
              f"({', '.join(Path(e['image']).name for e in pretrain[:6])}{', ...' if len(pretrain) > 6 else ''}); "
              f"fine-tuning on {', '.join(case_id(e['image']) for e in train[:6])}; validation on "
              f"{', '.join(case_id(e['image']) for e in val[:6]) or 'the training case(s)'}; test on "
              f"{', '.join(c['case'] for c in cases[:6])}", flush=True)
        if pretrain_list is not None:
            print(f"[dry-run] would write {paths['pretrain']}", flush=True)
        print(f"[dry-run] would write {paths['finetune']} and {paths['test']}", flush=True)
    else:
        (out / "data").mkdir(parents=True, exist_ok=True)
        if pretrain_list is not None:
            write_json(paths["pretrain"], pretrain_list)
        write_json(paths["finetune"], finetune_list)
        write_json(paths["test"], {"test": cases})
    return {"paths": paths, "pretrain_section": pretrain_section, "names": names, "train": train, "test": cases,
            "validation": val, "pretrain_volumes": [e["image"] for e in pretrain], "source": source,
            "pretrain_list": pretrain_list, "finetune_list": finetune_list}


# --------------------------------------------------------------------------- commands


def shell(cmd: list) -> str:
    return shlex.join(str(c) for c in cmd)


def flags(args: dict) -> list[str]:
    """``{"lr": 1e-3, "spacing": [3, 3, 3], "no-tensorboard": True}`` -> CLI options."""
    out = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        out.append(f"--{key}")
        if value is True:
            continue
        out += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return out


def launcher(cfg: dict) -> list[str]:
    return list(cfg.get("launcher") or [sys.executable, "-m", "mimcore"])


def mim(*args) -> list[str]:
    """A single-process ``mim`` command (segment, evaluate)."""
    return [sys.executable, "-m", "mimcore", *map(str, args)]


def pretrain_command(cfg: dict, data: dict, arm: Arm, seed: int, steps: int, output: Path,
                     probe: bool = False) -> list[str]:
    pre = cfg["pretrain"]
    args = dict(pre.get("args", {}))
    args.update(pre.get("methods", {}).get(arm.method, {}))
    eff = args.pop("effective_batch", None)
    frac = args.pop("warmup_fraction", pre.get("warmup_fraction"))
    if eff:
        per_step = int(args.get("batch", 1)) * int(cfg.get("processes", 1))
        if eff % per_step:
            raise StudyError(f"effective_batch {eff} of {arm.method} is not a multiple of batch x processes "
                             f"= {per_step}")
        args["accum"] = eff // per_step
    if "warmup-steps" not in args and frac is not None:  # without: the method's published fraction
        args["warmup-steps"] = max(1, round(frac * steps)) if isinstance(steps, int) else f"<{frac:.0%} of the steps>"
    if probe:
        args.update({"warmup-steps": 1, "log-every": 1, "save-every": None})
    cmd = launcher(cfg) + ["pretrain", "--datalist", str(data["paths"]["pretrain"])]
    if data.get("pretrain_section"):
        cmd += ["--section", data["pretrain_section"]]
    cmd += ["--method", arm.method, "--backbone", arm.backbone, "--preset", cfg["preset"], "--steps", str(steps),
            "--seed", str(seed), "--device", cfg.get("device", "auto"), "--output", str(output),
            "--progress", "json"] + flags(args)
    return cmd


def finetune_command(cfg: dict, data: dict, arm: Arm, seed: int, init: Path | None, output: Path) -> list[str]:
    ft = cfg["finetune"]
    args = dict(ft.get("args", {}))
    args.update(ft.get("backbones", {}).get(arm.backbone, {}))
    cmd = launcher(cfg) + ["finetune", "--datalist", str(data["paths"]["finetune"]), "--section", "training",
                           "--val-section", "validation"]
    if cfg.get("labels"):
        cmd += ["--labels", cfg["labels"]]
    cmd += ["--init", str(init)] if init else ["--preset", cfg["preset"], "--backbone", arm.backbone]
    cmd += ["--steps", str(ft["steps"]), "--val-every", str(ft["val_every"]), "--seed", str(seed),
            "--device", cfg.get("device", "auto"), "--output", str(output), "--name", f"study-{arm.key}-seed{seed}",
            "--progress", "json"] + flags(args)
    return cmd


# --------------------------------------------------------------------------- running


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Runner:
    """Runs (or, with dry_run, prints) the CLI steps; a step's marker makes it skipped next time."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.ran = []  # (stage, folder) of the steps run in this invocation
        self.skipped = []

    def done(self, folder: Path, stage: str) -> dict | None:
        return read_json(folder / f"study_{stage}.json")

    def step(self, folder: Path, stage: str, cmd: list[str], what: str, resume_flag: list[str] | None = None,
             extra: dict | None = None) -> dict | None:
        """Run ``cmd`` for ``stage`` in ``folder`` unless its marker exists. ``resume_flag`` is
        added when the folder already holds a checkpoint (an interrupted run). Returns the marker."""
        marker = self.done(folder, stage)
        if marker is not None:
            self.skipped.append((stage, str(folder)))
            print(f"[skip] {what}: done ({fmt_time(marker.get('wall_s'))})", flush=True)
            return marker
        if resume_flag and any(folder.glob("checkpoint_*.json")):
            cmd = cmd + resume_flag
        if self.dry_run:
            print(f"[dry-run] {what}\n$ {shell(cmd)}", flush=True)
            return None
        print(f"[run] {what}\n$ {shell(cmd)}", flush=True)
        result = run_cli(cmd, folder, stage)
        attempts = folder / f"study_{stage}.attempts.jsonl"
        walls = [json.loads(ln)["wall_s"] for ln in attempts.read_text().splitlines() if ln.strip()]
        marker = {"stage": stage, "command": [str(c) for c in cmd], "wall_s": round(sum(walls), 2),
                  "attempts": len(walls), "finished": now(), **(extra or {}), **result.get("extra", {})}
        write_json(folder / f"study_{stage}.json", marker)
        self.ran.append((stage, str(folder)))
        print(f"      done in {fmt_time(result['wall_s'])}", flush=True)
        return marker


def run_cli(cmd: list[str], folder: Path, stage: str) -> dict:
    """Run one command; its JSON events go to ``study_<stage>.events.jsonl`` (with ``t``, seconds
    since the start), other output to ``study_<stage>.log``. StudyError when it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    events_path, log_path = folder / f"study_{stage}.events.jsonl", folder / f"study_{stage}.log"
    t0 = time.perf_counter()
    error, rc = None, None
    with open(events_path, "a", encoding="utf-8") as ev, open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {now()} $ {shell(cmd)}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            for line in proc.stdout:
                event = parse_event(line)
                if event is None:
                    log.write(line)
                    continue
                ev.write(json.dumps({"t": round(time.perf_counter() - t0, 3), **event}) + "\n")
                ev.flush()
                kind = event.get("event")
                if kind == "validation":
                    classes = ", ".join(f"{k} {v:.3f}" for k, v in (event.get("per_class") or {}).items()
                                        if v is not None)
                    print(f"      step {event.get('step')}: validation Dice {event.get('dice', 0):.3f} ({classes})",
                          flush=True)
                elif kind == "error":
                    error = event.get("message")
            rc = proc.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too: let it write its checkpoint and stop by itself
            try:
                rc = proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.terminate()
                rc = proc.wait()
            raise
        except BaseException:
            proc.terminate()
            rc = proc.wait()
            raise
        finally:
            wall = time.perf_counter() - t0
            with open(folder / f"study_{stage}.attempts.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"wall_s": round(wall, 2), "rc": rc, "date": now()}) + "\n")
    if rc != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise StudyError(f"`{shell(cmd[:4])} ...` failed (exit code {rc}): {error or 'see the log'}\n"
                         f"log: {log_path}\n{tail}")
    return {"wall_s": wall}


def parse_event(line: str) -> dict | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def read_events(path: Path, kind: str) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = parse_event(line)
        if event and event.get("event") == kind:
            out.append(event)
    return out


# --------------------------------------------------------------------------- the study


def plan_pretraining(cfg: dict, data: dict, out: Path, runner: Runner) -> dict:
    """Steps of each method's pre-training: the budget's steps, or (time budget) measured by a
    probe run and kept in plan.json so a resumed study uses the same numbers."""
    budget = cfg["pretrain"]["budget"]
    plan_path = out / "plan.json"
    plan = read_json(plan_path) or {}
    steps = {}
    for arm in [a for a in cfg["arms"] if a.pretrained]:
        if budget["mode"] == "steps":
            steps[arm.key] = {"steps": int(budget["steps"]), "mode": "steps"}
            continue
        if arm.key in plan:
            steps[arm.key] = plan[arm.key]
            continue
        n_probe = int(budget.get("probe_steps", 4))
        probe_dir = out / "probe" / arm.key
        cmd = pretrain_command(cfg, data, arm, cfg["pretrain"].get("seed", 0), n_probe, probe_dir, probe=True)
        volumes = data["pretrain_volumes"]
        if len(volumes) > PROBE_VOLUMES:  # seconds per step do not depend on how many volumes there are
            probe_list = out / "data" / "probe.json"
            if not runner.dry_run:
                write_json(probe_list, {"pretraining": [{"image": v} for v in volumes[:PROBE_VOLUMES]]})
            i = cmd.index("--datalist")
            cmd[i + 1] = str(probe_list)
            if "--section" in cmd:
                cmd[cmd.index("--section") + 1] = "pretraining"
        if runner.dry_run:
            print(f"[dry-run] probe {arm.title}: seconds per step over {n_probe} steps; then "
                  f"steps = {budget['seconds']} s / seconds per step\n$ {shell(cmd)}", flush=True)
            steps[arm.key] = {"steps": None, "mode": "time"}
            continue
        print(f"[run] probe {arm.title}: {n_probe} steps to measure seconds per step\n$ {shell(cmd)}", flush=True)
        if probe_dir.exists():
            shutil.rmtree(probe_dir)
        result = run_cli(cmd, probe_dir, "probe")
        ticks = [(e["step"], e["t"]) for e in read_events(probe_dir / "study_probe.events.jsonl", "progress")]
        if len(ticks) < 2:
            raise StudyError(f"the probe of {arm.title} reported fewer than 2 steps; see {probe_dir}")
        (s0, t0), (s1, t1) = ticks[0], ticks[-1]
        per_step = (t1 - t0) / (s1 - s0)
        n = max(int(budget.get("min_steps", 1)), int(budget["seconds"] / per_step))
        steps[arm.key] = {"steps": n, "mode": "time", "seconds_per_step": round(per_step, 4),
                          "budget_s": budget["seconds"], "probe_steps": n_probe,
                          "probe_wall_s": round(result["wall_s"], 1), "measured": now()}
        plan[arm.key] = steps[arm.key]
        write_json(plan_path, plan)
        shutil.rmtree(probe_dir, ignore_errors=True)
        if probe_dir.parent.is_dir() and not any(probe_dir.parent.iterdir()):
            probe_dir.parent.rmdir()
        print(f"      {per_step:.3f} s per step -> {n} steps in {budget['seconds']} s", flush=True)
    return steps


def pretrain_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / "pretrain" / arm.key / f"seed{seed}"


def finetune_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / "finetune" / arm.key / f"seed{seed}"


def pretrain_seed(cfg: dict, seed: int) -> int:
    return int(cfg["pretrain"].get("seed", 0)) if cfg["pretrain"].get("shared_across_seeds", True) else seed


def ref_map(bundle_dir: Path, names: dict[str, str], dry_run: bool) -> str | None:
    """``old:new`` pairs that renumber the reference to the model's labels (by name)."""
    model = read_json(bundle_dir / "model.json")
    if model is None:
        if dry_run:
            return "<from the model's labels>"
        raise StudyError(f"no model bundle in {bundle_dir}")
    by_name = {v: k for k, v in names.items()}
    pairs = [f"{by_name[lab['name']]}:{lab['value']}" for lab in model.get("labels", []) if lab["name"] in by_name]
    return ",".join(pairs) or None


def link_reference(ref: Path, folder: Path, case: str) -> Path:
    """``folder/<case><suffix>``, named like the prediction so that `mim evaluate` pairs them: a
    link to the reference ``ref`` (a copy in NIfTI for the two-file formats .nhdr/.mhd, whose
    data file would not follow a link; Slicer's ``.seg.nrrd`` keeps its suffix, so that its
    segments are read as such). `mim evaluate --resample-ref` then puts it on the
    prediction's grid where the grids differ (the CT series' reference is stored with its
    rows flipped)."""
    name = ref.name.lower()
    suffix = next((s for s in (".nii.gz", ".seg.nrrd") if name.endswith(s)), ref.suffix.lower())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{case}.*"):
        old.unlink()
    if suffix in (".nhdr", ".mhd"):
        import SimpleITK as sitk

        dst = folder / f"{case}.nii.gz"
        sitk.WriteImage(sitk.ReadImage(str(ref)), str(dst), True)
        return dst
    dst = folder / f"{case}{suffix}"
    try:
        dst.symlink_to(ref.resolve())
    except OSError:
        shutil.copyfile(ref, dst)
    return dst


def run_arm(cfg: dict, data: dict, out: Path, runner: Runner, arm: Arm, seed: int) -> None:
    folder = finetune_dir(out, arm, seed)
    init = pretrain_dir(out, arm, pretrain_seed(cfg, seed)) if arm.pretrained else None
    tag = f"{arm.title}, seed {seed}"
    runner.step(folder, "finetune", finetune_command(cfg, data, arm, seed, init, folder), f"fine-tune {tag}",
                resume_flag=["--resume"])
    if not runner.dry_run and not cfg.get("keep_checkpoints") and runner.done(folder, "finetune"):
        for path in folder.glob("checkpoint_*"):  # only for resuming; the model bundle stays in model/
            path.unlink()
    if runner.done(folder, "segment") is None:
        if runner.dry_run:
            for case in data["test"]:
                cmd = mim("segment", case["image"], "--model", folder / "model", "--output",
                          folder / "pred" / f"{case['case']}.nii.gz", "--device", cfg.get("device", "auto"),
                          "--progress", "json", *flags(cfg.get("segment", {}).get("args", {})))
                print(f"[dry-run] segment {case['case']} ({tag})\n$ {shell(cmd)}", flush=True)
        else:
            t0, walls = time.perf_counter(), []
            for case in data["test"]:
                pred = folder / "pred" / f"{case['case']}.nii.gz"
                cmd = mim("segment", case["image"], "--model", folder / "model", "--output", pred,
                          "--device", cfg.get("device", "auto"), "--progress", "json",
                          *flags(cfg.get("segment", {}).get("args", {})))
                print(f"[run] segment {case['case']} ({tag})\n$ {shell(cmd)}", flush=True)
                walls.append(run_cli(cmd, folder, "segment")["wall_s"])
            for c in data["test"]:
                link_reference(Path(c["label"]), folder / "ref", c["case"])
            write_json(folder / "study_segment.json", {"stage": "segment", "wall_s": round(sum(walls), 2),
                                                       "finished": now(),
                                                       "total_s": round(time.perf_counter() - t0, 2)})
    else:
        runner.skipped.append(("segment", str(folder)))
        print(f"[skip] segment ({tag}): done", flush=True)
    mapping = ref_map(folder / "model", data["names"], runner.dry_run)
    cmd = mim("evaluate", "--pred", folder / "pred", "--ref", folder / "ref", "--labels", folder / "model",
              "--out", folder / "eval", "--resample-ref", *(["--ref-map", mapping] if mapping else []))
    runner.step(folder, "evaluate", cmd, f"evaluate {tag}")


def run_study(cfg: dict, out: Path, runner: Runner) -> dict:
    data = prepare_data(cfg, out, runner.dry_run)
    steps = plan_pretraining(cfg, data, out, runner)
    seeds = cfg["seeds"]
    for arm in [a for a in cfg["arms"] if a.pretrained]:
        for pseed in dict.fromkeys(pretrain_seed(cfg, s) for s in seeds):
            folder = pretrain_dir(out, arm, pseed)
            n = steps[arm.key]["steps"]
            cmd = pretrain_command(cfg, data, arm, pseed, n if n is not None else "<budget>", folder)
            runner.step(folder, "pretrain", cmd, f"pre-train {arm.title}, seed {pseed} ({n or '?'} steps)",
                        resume_flag=["--resume"], extra={"steps": n, "plan": steps[arm.key]})
    for seed in seeds:
        for arm in cfg["arms"]:
            run_arm(cfg, data, out, runner, arm, seed)
    return data


# --------------------------------------------------------------------------- results


def display_path(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (results.md gets committed)."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return str(path)


def short_names(paths: list[str]) -> list[str]:
    """Paths relative to their common folder (``aorta_report/example_ct.nii.gz``, ``example_ct_dicom``)."""
    if len(paths) < 2:
        return [Path(p).name for p in paths]
    root = os.path.commonpath([str(Path(p).parent) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def fmt_time(seconds) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt_ms(values: list[float], digits: int = 3) -> str:
    m, s = mean_sd(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if s is not None else f"{m:.{digits}f}"


#: Pre-training metrics reported at the end of a run: the loss, MiM's alignment terms and its
#: collapse monitor (cosine of matched and of mismatched child/parent pairs; equal = no information).
FINAL_KEYS = ("loss", "a12", "a23", "cos12_match", "cos12_mismatch", "cos23_match", "cos23_mismatch")


def final_metrics(path: Path, fraction: float = 0.1) -> dict:
    """Mean of each of :data:`FINAL_KEYS` over the last ``fraction`` of a run's metrics.jsonl rows
    (at least one row); {} without the file."""
    if not path.is_file():
        return {}
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    tail = rows[-max(1, round(fraction * len(rows))):] if rows else []
    return {k: sum(r[k] for r in tail) / len(tail) for k in FINAL_KEYS if tail and all(k in r for r in tail)}


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


def plot_curves(results: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["mean over classes"] + results["classes"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(results["arms"]):
        seeds = row["seeds"]
        if not seeds:
            continue
        steps = sorted({s for rec in seeds.values() for s in rec["curve"]})
        for p, panel in enumerate(panels):
            ax = axes[p // cols][p % cols]
            xs, ms, sds = [], [], []
            for step in steps:
                vals = []
                for rec in seeds.values():
                    point = rec["curve"].get(step)
                    if point is None:
                        continue
                    vals.append(point["dice"] if p == 0 else point["per_class"].get(panel))
                m, s = mean_sd(vals)
                if m is not None:
                    xs.append(step), ms.append(m), sds.append(s or 0.0)
            if not xs:
                continue
            style = "--" if row["method"] == "scratch" else "-"
            ax.plot(xs, ms, style, marker="o", ms=3, color=colors(i % 10), label=f"{row['title']} (n={len(seeds)})")
            if len(seeds) > 1:
                ax.fill_between(xs, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)],
                                color=colors(i % 10), alpha=0.12, linewidth=0)
    for p in range(rows * cols):
        ax = axes[p // cols][p % cols]
        if p >= len(panels):
            ax.axis("off")
            continue
        ax.set_title(f"validation Dice: {panels[p]}", fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylim(0, 1)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Validation Dice during fine-tuning (mean ± sd over seeds; dashed: from scratch)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
