"""The published recipes (MiMCore/METHODS.md sections 1-3): the numbers in the code, in every
recipe file and in the study configs, the learning-rate rule, the schedule with a floor,
weight-decay groups, crops per volume, foreground cropping and the launch scripts.

The expected numbers are written out here, read from the published code, so that neither
``mimcore.methods.recipes`` nor a recipe file can drift from them silently.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mimcore.cli.main import main
from mimcore.methods.recipes import RECIPES
from mimcore.training.optim import param_groups, warmup_cosine
from mimcore.training.pretrain import PretrainArgs, choose_lr, resolve_settings
from mimcore.training.pretrain_data import StepBatches

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "Training" / "configs"

# crops per step, lr, lr scaled with the batch, weight decay, betas, warm-up, length, floor
PUBLISHED = {
    # MiM pretrain.sh: 1 crop x accumulation 64 x 2 GPUs; lr 1e-4 x (1 x 64 x 2 x 4) / 256 = 2e-4
    "mim": dict(batch=128, lr=2e-4, scaled=True, wd=0.05, betas=(0.9, 0.95), warmup=40, length=800, floor=0.0),
    # MIM-Med3D BTCV: 4 volumes x 4 crops, lr 3e-4 unscaled, wd 0.05, 300/3000 epochs, eta_min 1e-4
    "mae": dict(batch=16, lr=3e-4, scaled=False, wd=0.05, betas=(0.9, 0.999), warmup=300, length=3000, floor=1e-4),
    # MIM-Med3D BTCV: lr 1e-4, wd 1e-5, 50/1000 epochs, eta_min 1e-4
    "simmim": dict(batch=16, lr=1e-4, scaled=False, wd=1e-5, betas=(0.9, 0.999), warmup=50, length=1000, floor=1e-4),
    # GMIM README command: lr 4e-4, wd 1e-5, 500 warm-up steps of 4000, batch 2
    "gmim": dict(batch=2, lr=4e-4, scaled=False, wd=1e-5, betas=(0.9, 0.999), warmup=500, length=4000, floor=0.0),
}
RECIPE_FILES = {"mim": "mim_base_paper.json", "mae": "mae_btcv_paper.json", "simmim": "simmim_btcv_paper.json",
                "gmim": "gmim_paper.json"}


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("method", list(PUBLISHED))
def test_code_recipes_are_the_published_numbers(method):
    r, p = RECIPES[method], PUBLISHED[method]
    assert r.effective_batch == p["batch"] and r.lr == p["lr"] and r.weight_decay == p["wd"]
    assert (r.lr_batch == p["batch"]) if p["scaled"] else r.lr_batch is None
    assert tuple(r.betas) == p["betas"] and r.min_lr == p["floor"]
    assert (r.warmup_steps, r.steps) == (p["warmup"], p["length"]) if method == "gmim" else \
        (r.warmup_epochs, r.epochs) == (p["warmup"], p["length"])
    assert r.warmup_fraction == pytest.approx(p["warmup"] / p["length"])
    if method in ("mae", "simmim"):  # BTCV data: 4 volumes x 4 crops, 1.5 x 1.5 x 2 mm, CropForegroundd
        assert r.crops_per_volume == 4 and r.crop_foreground and r.spacing == (1.5, 1.5, 2.0)
        assert r.hu_window == (-175.0, 250.0)
    else:
        assert r.crops_per_volume == 1 and not r.crop_foreground and r.spacing is None
        assert r.hu_window == (-1000.0, 1000.0)


@pytest.mark.parametrize("method", list(PUBLISHED))
def test_recipe_files_are_the_published_numbers(method):
    cfg, p = _config(RECIPE_FILES[method]), PUBLISHED[method]
    args = cfg["args"]
    assert cfg["effective_batch"] == p["batch"] and args["batch"] == 1 and args["method"] == method
    assert args["lr"] == p["lr"] and args.get("lr-batch") == (p["batch"] if p["scaled"] else None)
    assert "base-lr" not in args
    assert args["weight-decay"] == p["wd"] and tuple(args["betas"]) == p["betas"] and args["min-lr"] == p["floor"]
    if method == "gmim":
        assert (args["warmup-steps"], args["steps"]) == (p["warmup"], p["length"])
    else:
        assert (args["warmup-epochs"], args["epochs"]) == (p["warmup"], p["length"])
    r = RECIPES[method]
    assert args.get("crops-per-volume", 1) == r.crops_per_volume
    assert bool(args.get("crop-foreground")) == r.crop_foreground
    assert tuple(args["hu-window"]) == r.hu_window
    assert args["spacing"] == (list(r.spacing) if r.spacing else "native")


def test_study_configs_use_the_published_recipes():
    paper = _config("study_paper.json")["pretrain"]["methods"]
    for method, p in PUBLISHED.items():
        m = paper[method]
        assert m["effective_batch"] == p["batch"] and m["lr"] == p["lr"] and m["weight-decay"] == p["wd"]
        assert tuple(m["betas"]) == p["betas"] and m["min-lr"] == p["floor"]
        assert m.get("lr-batch") == (p["batch"] if p["scaled"] else None)
    small = _config("study_small.json")["pretrain"]
    for method, p in PUBLISHED.items():  # one crop per step at the published peak lr; the rest as published
        assert small["methods"][method] == {"lr": p["lr"]}
    assert not set(small["args"]) & {"lr", "base-lr", "weight-decay", "betas", "min-lr", "hu-window", "spacing",
                                     "warmup-steps", "warmup-epochs"}
    assert "warmup_fraction" not in small and "warmup_fraction" not in _config("study_paper.json")["pretrain"]


def test_learning_rate_rule():
    def lr(method, crops, **kw):
        return choose_lr(PretrainArgs(output="x", method=method, **kw), crops)

    assert lr("mim", 128)[0] == pytest.approx(2e-4)
    value, rule = lr("mim", 8)  # fewer crops per step: linear scaling, said in words
    assert value == pytest.approx(2e-4 * 8 / 128) and "8 crops per step / 128" in rule and "scaled" in rule
    assert "give --lr" in rule and "give --lr" not in lr("mim", 128)[1]  # a hint only where it was scaled down
    assert lr("mae", 1)[0] == 3e-4 and lr("mae", 64)[0] == 3e-4  # not scaled, as published
    assert lr("simmim", 16)[0] == 1e-4 and lr("gmim", 2)[0] == 4e-4
    assert lr("mim", 8, lr=1e-3)[0] == 1e-3  # --lr alone: as given
    assert lr("mim", 8, lr=2e-4, lr_batch=128)[0] == pytest.approx(1.25e-5)  # the recipe file's form
    assert lr("mae", 512, base_lr=1e-4)[0] == pytest.approx(2e-4)  # --base-lr: x batch / 256


def test_unset_settings_come_from_the_method_recipe():
    mae = resolve_settings(PretrainArgs(output="x", method="mae"))
    assert (mae.weight_decay, tuple(mae.betas), mae.min_lr, mae.crops_per_volume) == (0.05, (0.9, 0.999), 1e-4, 4)
    assert mae.crop_foreground and tuple(mae.spacing) == (1.5, 1.5, 2.0) and tuple(mae.hu_window) == (-175, 250)
    mim = resolve_settings(PretrainArgs(output="x", method="mim"))
    assert (mim.weight_decay, tuple(mim.betas), mim.min_lr, mim.spacing) == (0.05, (0.9, 0.95), 0.0, "native")
    given = resolve_settings(PretrainArgs(output="x", method="simmim", weight_decay=0.3, spacing="native",
                                          crop_foreground=False))
    assert given.weight_decay == 0.3 and given.spacing == "native" and not given.crop_foreground


def _factors(sched, n):
    """The lr of the first ``n`` steps (no optimizer steps: only the schedule is looked at)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            out.append(sched.optimizer.param_groups[0]["lr"])
            sched.step()
    return out


def _optimizer(lr):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_schedule_without_floor_is_monai_warmup_cosine():
    from monai.optimizers import WarmupCosineSchedule

    ours = _factors(warmup_cosine(_optimizer(1e-3), 5, 40), 45)
    monai = _factors(WarmupCosineSchedule(_optimizer(1e-3), warmup_steps=5, t_total=40), 45)
    np.testing.assert_allclose(ours, monai, rtol=1e-12, atol=1e-15)


def test_schedule_floor_by_hand():
    lrs = _factors(warmup_cosine(_optimizer(3e-4), 10, 110, floor=1e-4), 111)  # MAE's shape
    assert lrs[0] == 0 and lrs[5] == pytest.approx(1.5e-4) and lrs[10] == pytest.approx(3e-4)
    assert lrs[60] == pytest.approx(1e-4 + 2e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 2e-4
    assert lrs[110] == pytest.approx(1e-4) and min(lrs[10:]) == pytest.approx(1e-4)
    flat = _factors(warmup_cosine(_optimizer(1e-4), 5, 50, floor=1e-4), 50)  # SimMIM: floor = peak
    assert flat[2] == pytest.approx(0.4e-4) and all(v == pytest.approx(1e-4) for v in flat[5:])


def test_weight_decay_groups_per_recipe():
    from mimcore.methods.registry import build_pretrain_model

    def decayed(method, backbone=None):
        model, _, _ = build_pretrain_model(method, backbone, "tiny")
        names = {id(p): n for n, p in model.named_parameters()}
        decay, no_decay = param_groups(model, 0.05, RECIPES[method].decay_exempt)
        return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}, model

    decay, no_decay, model = decayed("mim")  # timm add_weight_decay: the mask token is decayed
    assert "decoder.mask_token" in decay
    assert all(model.get_parameter(n).ndim <= 1 or n.endswith(".bias") for n in no_decay)
    assert all(model.get_parameter(n).ndim >= 2 for n in decay)
    decay, no_decay, _ = decayed("mae")
    assert any("mask_token" in n for n in no_decay) and not any("mask_token" in n for n in decay)


def test_crops_per_volume_stream_and_resume():
    full = [k for b in StepBatches(3, 2, 0, 12, seed=5, rank=0, world=1, per_volume=4) for k in b]
    volumes = [i for i, _ in full]
    for q in range(0, 24, 4):  # 4 consecutive crops of one volume, each with its own seed
        assert len(set(volumes[q:q + 4])) == 1 and len({s for _, s in full[q:q + 4]}) == 4
    assert sorted(set(volumes[:12])) == [0, 1, 2]  # an epoch = every volume once, 4 crops each
    resumed = [k for b in StepBatches(3, 2, 10, 7, seed=5, rank=0, world=1, per_volume=4) for k in b]
    assert resumed == full[10:24]


def test_crop_foreground_keeps_the_geometry(tmp_path):
    from mimcore.data.preprocess import Preprocessing, deterministic_transforms
    from mimcore.data.volume_io import save_volume

    hu = np.full((40, 30, 20), -1000.0, np.float32)
    hu[10:25, 5:20, 4:12] = 40.0  # the body, in air
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10, 20, 30)
    save_volume(tmp_path / "ct.nii.gz", hu, affine)
    prep = Preprocessing(hu_min=-175, hu_max=250, crop_foreground=True)
    out = deterministic_transforms(4, prep)({"image": str(tmp_path / "ct.nii.gz")})["image"]
    assert tuple(out.shape[1:]) == (15, 15, 8)
    assert float(out.min()) > 0  # only body left
    a = np.asarray(out.affine)  # voxel 0 of the cut volume is voxel (10, 5, 4) of the input (RAS affines)
    np.testing.assert_allclose(a[:3, 3], affine[:3, :3] @ [10, 5, 4] + affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(a[:3, :3], affine[:3, :3], atol=1e-6)
    plain = deterministic_transforms(4, Preprocessing(hu_min=-175, hu_max=250))({"image": str(tmp_path / "ct.nii.gz")})
    assert tuple(plain["image"].shape[1:]) == (40, 30, 20)


def test_cli_defaults_follow_the_method_recipe(tmp_path, ct_folder, capsys):
    out = tmp_path / "simmim"
    assert main(["pretrain", "--method", "simmim", "--preset", "tiny", "--data-dir", str(ct_folder), "--steps", "2",
                 "--output", str(out), "--progress", "json", "--no-tensorboard"]) == 0
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    note = next(e for e in events if e["event"] == "note")
    assert "lr 0.0001: SimMIM's published lr" in note["message"] and "betas (0.9, 0.999)" in note["message"]
    meta = json.loads((out / "checkpoint_00000002.json").read_text(encoding="utf-8"))
    assert meta["lr"] == 1e-4 and meta["args"]["weight_decay"] == 1e-5 and meta["args"]["min_lr"] == 1e-4
    assert meta["args"]["crops_per_volume"] == 4 and meta["args"]["betas"] == [0.9, 0.999]
    assert meta["preprocessing"]["crop_foreground"] is True and meta["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]
    assert meta["preprocessing"]["hu_min"] == -175 and meta["warmup_steps"] == round(0.05 * 2)
    # a resume with other preprocessing is refused, naming the options
    assert main(["pretrain", "--method", "simmim", "--preset", "tiny", "--data-dir", str(ct_folder), "--steps", "3",
                 "--output", str(out), "--resume", "--no-crop-foreground", "--progress", "none",
                 "--no-tensorboard"]) == 2
    assert "--no-crop-foreground" in capsys.readouterr().err
    assert main(["pretrain", "--method", "mae", "--alignment", "ce", "--data-dir", str(ct_folder), "--steps", "1",
                 "--output", str(tmp_path / "x")]) == 2
    assert "--alignment is a MiM setting" in capsys.readouterr().err
    assert main(["pretrain", "--spacing", "1", "2", "--data-dir", str(ct_folder), "--steps", "1",
                 "--output", str(tmp_path / "y")]) == 2
    assert "neither three positive sizes" in capsys.readouterr().err


def test_launch_script_scales_the_lr_and_says_so(tmp_path, ct_folder):
    env = dict(os.environ, OUTPUT=str(tmp_path / "run"), DEVICE="cpu", CROPS_PER_STEP="2", PYTHON=sys.executable)
    script = ROOT / "Training" / "launch" / "pretrain_single_gpu.sh"
    datalist = tmp_path / "d.json"
    datalist.write_text(json.dumps({"pretraining": [{"image": str(p)} for p in sorted(ct_folder.glob("*.nii.gz"))]}))
    env["DATALIST"] = str(datalist)
    res = subprocess.run(["bash", str(script), "--preset", "tiny", "--steps", "1", "--workers", "1", "--progress",
                          "json", "--no-tensorboard"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    events = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    note = next(e for e in events if e["event"] == "note")
    assert "2 crops per step / --lr-batch 128" in note["message"]
    meta = json.loads((tmp_path / "run" / "checkpoint_00000001.json").read_text(encoding="utf-8"))
    assert meta["effective_batch"] == 2 and meta["lr"] == pytest.approx(2e-4 * 2 / 128)
    assert meta["args"]["betas"] == [0.9, 0.95] and meta["args"]["weight_decay"] == 0.05
