"""The study's settings: the arms (method x backbone), seeds and the config file, and what
must stay the same for the runs of one output folder to belong together."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from mimcore.methods import registry

HERE = Path(__file__).resolve().parents[1]  # Training/experiments
REPO = HERE.parents[1]
CONFIGS = REPO / "Training" / "configs"

#: the table's order of methods
METHOD_ORDER = ("scratch", "mae", "simmim", "gmim", "mim")
#: backbones each method runs on (first = default): mimcore's, and scratch on every backbone
BACKBONES = {**registry.BACKBONES, "scratch": registry.ALL_BACKBONES}
METHOD_NAMES = {"scratch": "scratch", **registry.METHOD_NAMES}
#: what each backbone is fine-tuned as (the segmentation network of ``registry.SEGMENTATION_KIND``)
NETWORKS = {"convvit": "ConvViT3D → MiM network", "vit": "ViT → UNETR", "swin": "Swin → SwinUNETR"}
#: sample CTs that hold the voxels of another sample CT (same patient): never pre-train on
#: the patient that is evaluated (example_ct_sm.nii.gz = 30 slices of example_ct.nii.gz)
SAME_PATIENT = {"example_ct_sm.nii.gz": ("example_ct.nii.gz",), "example_ct.nii.gz": ("example_ct_sm.nii.gz",)}
#: settings that may change between invocations of one study (more seeds, more methods)
FREE_KEYS = ("methods", "seeds")
#: the probe that measures seconds per pre-training step loads only this many volumes
PROBE_VOLUMES = 4


class StudyError(Exception):
    """A problem the user can fix; printed without a traceback (exit code 2)."""


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
