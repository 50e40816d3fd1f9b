"""The pre-training engine: exact resume, DDP on CPU (gloo), checkpoints, CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from mimcore.cli.main import main


def pretrain(out, data, *extra):
    return main(["pretrain", "--data-dir", str(data), "--preset", "tiny", "--output", str(out),
                 "--warmup-steps", "2", "--lr", "1e-3", "--progress", "none", "--no-tensorboard", *extra])


def test_resume_is_exact(tmp_path, ct_folder):
    """4 steps == 2 steps, interruption, --resume, 2 more steps: bit for bit."""
    assert pretrain(tmp_path / "a", ct_folder, "--steps", "4") == 0
    assert pretrain(tmp_path / "b", ct_folder, "--steps", "4", "--save-every", "2") == 0
    # simulate an interruption right after step 2: only checkpoint 2 exists
    for f in (tmp_path / "b").glob("checkpoint_00000004*"):
        f.unlink()
    assert pretrain(tmp_path / "b", ct_folder, "--steps", "4", "--resume") == 0
    wa = load_file(tmp_path / "a" / "checkpoint_00000004.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint_00000004.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    w0 = load_file(tmp_path / "b" / "checkpoint_00000002.safetensors")
    changed = sum(not np.array_equal(w0[k], wa[k]) for k in wa)
    assert changed > len(wa) // 2, "training did not change the weights"
    ma = (tmp_path / "a" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert ma == mb and len(ma) == 4
    assert (tmp_path / "b" / "loss_curve.png").stat().st_size > 1000


def test_checkpoint_is_complete_and_verified(tmp_path, ct_folder, capsys):
    assert pretrain(tmp_path, ct_folder, "--steps", "1") == 0
    meta = json.loads((tmp_path / "checkpoint_00000001.json").read_text(encoding="utf-8"))
    assert meta["preset"] == "tiny" and meta["step"] == 1 and meta["model"]["input_size"] == 32
    assert meta["preprocessing"] == {"hu_min": -1000.0, "hu_max": 1000.0, "orientation": "RAS", "spacing": None,
                                     "crop_foreground": False}
    # nothing temporary is left; the run folder's lock file (.mim-run.lock, training/run_folder.py) stays
    assert not list(tmp_path.glob("*.tmp")) and [p.name for p in tmp_path.glob(".*")] == [".mim-run.lock"]
    # a modified weights file is refused with a clear message
    w = tmp_path / "checkpoint_00000001.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert pretrain(tmp_path, ct_folder, "--steps", "2", "--resume") == 2
    assert "does not match the sha256" in capsys.readouterr().err


def test_spacing_resamples_and_must_match_on_resume(tmp_path, ct_folder, capsys):
    """--spacing resamples before cropping (kept in the checkpoint); resuming with another
    --spacing or --hu-window is refused; a bad --spacing is a clear error."""
    from mimcore.data.preprocess import Preprocessing, deterministic_transforms
    from mimcore.data.volume_io import load_volume

    src = load_volume(ct_folder / "ct0.nii.gz")  # (70, 66, 60) at 0.8 x 0.9 x 2.5 mm, a sphere at the centre
    out = deterministic_transforms(8, Preprocessing(spacing=(1.6, 1.8, 1.25)))({"image": str(ct_folder / "ct0.nii.gz")})
    img = out["image"]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0), [1.6, 1.8, 1.25], atol=1e-6)
    extent_in = np.array(src.shape) * src.spacing
    extent_out = np.array(img.shape[1:]) * np.array([1.6, 1.8, 1.25])
    assert np.all(np.abs(extent_out - extent_in) <= np.array([1.6, 1.8, 1.25]))  # the same field of view

    def centroid(array, affine):  # the sphere's centre of mass in RAS mm (window [0, 1]: bright = inside)
        idx = np.argwhere(array > 0.5)
        return (np.asarray(affine)[:3, :3] @ idx.mean(0)) + np.asarray(affine)[:3, 3]

    raw = np.clip((src.array + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(centroid(img[0].numpy(), img.affine), centroid(raw, src.affine), atol=0.3)

    assert pretrain(tmp_path, ct_folder, "--steps", "2", "--save-every", "1", "--spacing", "1.6", "1.8", "1.25") == 0
    meta = json.loads((tmp_path / "checkpoint_00000001.json").read_text(encoding="utf-8"))
    assert meta["preprocessing"]["spacing"] == [1.6, 1.8, 1.25]
    capsys.readouterr()
    for other in (["--spacing", "1.6", "1.8", "2.5"], [], ["--spacing", "1.6", "1.8", "1.25", "--hu-window", "-175", "250"]):
        assert pretrain(tmp_path, ct_folder, "--steps", "3", "--resume", *other) == 2
        err = capsys.readouterr().err
        assert "other preprocessing" in err and "--spacing 1.6 1.8 1.25" in err and "Traceback" not in err
    assert pretrain(tmp_path, ct_folder, "--steps", "3", "--resume", "--spacing", "1.6", "1.8", "1.25") == 0
    assert (tmp_path / "checkpoint_00000003.json").is_file()
    assert pretrain(tmp_path / "bad", ct_folder, "--steps", "1", "--spacing", "1", "0", "1") == 2
    err = capsys.readouterr().err
    assert "three positive sizes" in err and "Traceback" not in err


def test_lr_scaling_and_param_groups():
    from mimcore.methods.mim import MiMPretrainModel
    from mimcore.models.convvit import preset as convvit_preset
    from mimcore.training.optim import make_optimizer, scaled_lr

    assert scaled_lr(1e-4, 512) == pytest.approx(2e-4)
    model = MiMPretrainModel(convvit_preset("tiny"))
    opt = make_optimizer(model, 1e-3)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert opt.defaults["betas"] == (0.9, 0.95)
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "decoder.mask_token" in nd and all(n.endswith(("bias", "weight", "mask_token")) for n in nd)
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert not any("norm" in names[id(p)] for p in decay["params"])


def test_cli_errors_are_clear(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["pretrain", "--data-dir", str(empty), "--output", str(tmp_path / "o"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "No volumes found" in err and "Traceback" not in err
    assert main(["pretrain", "--output", str(tmp_path / "o"), "--steps", "1"]) == 2
    assert "--datalist" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    assert main(["pretrain", "--data-dir", str(tmp_path), "--output", str(tmp_path / "o"), "--steps", "1",
                 "--preset", "tiny"]) == 2
    assert "bad.nii.gz" in capsys.readouterr().err


def test_pretrain_on_real_sample_ct(tmp_path, sample_datalist):
    """Two steps on the real sample CTs (NIfTI + DICOM series) through the real entry point."""
    proc = subprocess.run([sys.executable, "-m", "mimcore", "pretrain", "--datalist", str(sample_datalist),
                           "--preset", "tiny", "--steps", "2", "--warmup-steps", "1", "--output", str(tmp_path),
                           "--progress", "json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [e["event"] for e in events][0] == "start" and events[-1]["event"] == "done"
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2] and all(e["total"] == 2 for e in progress)
    assert all(np.isfinite(e["metrics"]["loss"]) and "eta_s" in e for e in progress)
    assert "example_ct_dicom" in events[0]["message"]


def test_ddp_two_cpu_processes_end_identical(tmp_path, ct_folder):
    """torchrun --nproc_per_node 2 on the CPU (gloo): both ranks end with the same weights."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "mimcore", "pretrain", "--data-dir", str(ct_folder), "--preset", "tiny", "--steps", "3",
           "--warmup-steps", "1", "--lr", "1e-3", "--output", str(tmp_path), "--progress", "json",
           "--no-tensorboard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith('{"event": "done"')]
    assert sorted(d["rank"] for d in done) == [0, 1]
    assert done[0]["weights_sha256"] == done[1]["weights_sha256"]
    meta = json.loads((tmp_path / "checkpoint_00000003.json").read_text(encoding="utf-8"))
    assert meta["world_size"] == 2 and meta["effective_batch"] == 2


def test_recipe_config_sets_defaults_and_accumulation(tmp_path, ct_folder):
    """--config fills options left at their defaults; the command line wins; accum from effective_batch."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"effective_batch": 2, "args": {"preset": "tiny", "base-lr": 5e-4,
                                                                 "weight-decay": 0.01, "steps": 50}}))
    assert main(["pretrain", "--config", str(recipe), "--data-dir", str(ct_folder), "--output", str(tmp_path / "r"),
                 "--steps", "1", "--warmup-steps", "0", "--progress", "none", "--no-tensorboard"]) == 0
    meta = json.loads((tmp_path / "r" / "checkpoint_00000001.json").read_text(encoding="utf-8"))
    assert meta["args"]["accum"] == 2 and meta["effective_batch"] == 2
    assert meta["args"]["steps"] == 1 and meta["args"]["weight_decay"] == 0.01 and meta["preset"] == "tiny"
    assert meta["lr"] == pytest.approx(5e-4 * 2 / 256)
    recipe.write_text(json.dumps({"args": {"no-such-option": 1}}))
    assert main(["pretrain", "--config", str(recipe), "--data-dir", str(ct_folder), "--output", str(tmp_path / "s"),
                 "--steps", "1"]) == 2
