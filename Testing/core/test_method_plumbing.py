"""Every method through the same plumbing: the registry, ``mim pretrain --method/--backbone``,
checkpoints that record the method, resume, ``mim reconstruct`` (single level), fine-tuning
from each backbone's checkpoint (UNETR / MiMSegNet / SwinUNETR) and ``mim segment``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mimcore.cli.main import main
from mimcore.data.volume_io import load_volume, save_volume
from mimcore.errors import MimError
from mimcore.methods import registry
from mimcore.models.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def small_case(sample_datalist, tmp_path_factory):
    """A datalist of the small labelled sample CT (122 x 101 x 30, 3 mm)."""
    data = json.loads(sample_datalist.read_text(encoding="utf-8"))
    base = sample_datalist.parent
    entry = next(e for e in data["training"] if e["image"] == "example_ct_sm.nii.gz")
    path = tmp_path_factory.mktemp("case") / "small.json"
    path.write_text(json.dumps({"labels": data["labels"], "training": [
        {"image": str(base / entry["image"]), "label": str(base / entry["label"])}]}))
    return {"datalist": path, "image": base / entry["image"]}


def pretrain(out, data, *extra):
    return main(["pretrain", "--data-dir", str(data), "--preset", "tiny", "--output", str(out),
                 "--warmup-steps", "1", "--lr", "1e-3", "--progress", "none", "--no-tensorboard", *extra])


def saved_run(tmp_path, method, backbone=None, name=None):
    """A step-1 checkpoint of a fresh ``tiny`` model of ``method`` (no training)."""
    torch.manual_seed(0)
    model, crop, meta = registry.build_pretrain_model(method, backbone, "tiny")
    run = tmp_path / (name or f"{method}_{backbone}")
    save_checkpoint(run, 1, model, dict(meta, crop_size=crop, preprocessing={"hu_min": -1000.0, "hu_max": 1000.0,
                                                                             "orientation": "RAS"}))
    return run, model


# ------------------------------------------------------------------------ registry

def test_registry_methods_backbones_and_pairs():
    assert registry.METHODS == ("mim", "mae", "simmim", "gmim")
    assert registry.DEFAULT_BACKBONE == {"mim": "convvit", "mae": "vit", "simmim": "vit", "gmim": "swin"}
    assert registry.resolve_backbone("mae", "convvit") == "convvit"
    with pytest.raises(MimError, match="--backbone vit or --backbone convvit"):
        registry.resolve_backbone("simmim", "swin")
    with pytest.raises(MimError, match="choose one of: mim, mae, simmim, gmim"):
        registry.resolve_backbone("byol")
    with pytest.raises(MimError, match="known: mask_ratio"):
        registry.build_pretrain_model("simmim", None, "tiny", {"ratio": 0.5})
    model, _, meta = registry.build_pretrain_model("simmim", None, "tiny", {"mask_ratio": 0.5})
    assert model.cfg.mask_ratio == 0.5 and meta["method_config"] == {"mask_ratio": 0.5}


@pytest.mark.parametrize("method, backbone, crop", [("mim", None, 64), ("mae", "vit", 32), ("mae", "convvit", 32),
                                                    ("simmim", "vit", 32), ("simmim", "convvit", 32),
                                                    ("gmim", None, 80)])
def test_every_method_builds_runs_and_rebuilds_from_its_description(method, backbone, crop):
    torch.manual_seed(0)
    model, crop_size, meta = registry.build_pretrain_model(method, backbone, "tiny")
    assert crop_size == crop and meta["method"] == method
    assert meta["backbone"] == (backbone or registry.DEFAULT_BACKBONE[method])
    x = torch.rand(1, 1, crop, crop, crop)
    out = model(x, torch.Generator().manual_seed(0))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    again, again_crop = registry.model_from_meta(json.loads(json.dumps(meta)))
    assert again_crop == crop and type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------ mim pretrain

@pytest.mark.parametrize("argv, message", [
    (["--method", "mae", "--backbone", "swin"], "--method mae does not run on --backbone swin"),
    (["--method", "gmim", "--backbone", "vit"], "use --backbone swin"),
    (["--method", "mim", "--backbone", "vit"], "MiM is implemented on convvit only"),
    (["--method", "mae", "--mim", '{"level2_mask_ratio": 0.5}'], "for --method mae use --method-config"),
    (["--method", "mae", "--method-config", '{"level2_mask_ratio": 0.5}'], "unknown MAE setting"),
])
def test_unsupported_choices_exit_2_with_a_clear_message(tmp_path, ct_folder, capsys, argv, message):
    assert pretrain(tmp_path / "run", ct_folder, "--steps", "1", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "run").glob("checkpoint_*"))


def test_mae_resumes_exactly_and_refuses_another_method(tmp_path, ct_folder, capsys):
    assert pretrain(tmp_path / "a", ct_folder, "--method", "mae", "--steps", "2") == 0
    assert pretrain(tmp_path / "b", ct_folder, "--method", "mae", "--steps", "1") == 0
    assert pretrain(tmp_path / "b", ct_folder, "--method", "mae", "--steps", "2", "--resume") == 0
    wa = load_file(tmp_path / "a" / "checkpoint_00000002.safetensors")
    wb = load_file(tmp_path / "b" / "checkpoint_00000002.safetensors")
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    meta = json.loads((tmp_path / "a" / "checkpoint_00000002.json").read_text(encoding="utf-8"))
    assert (meta["method"], meta["backbone"], meta["crop_size"]) == ("mae", "vit", 32)
    assert meta["method_config"]["mask_ratio"] == 0.75 and meta["model"]["hidden_size"] == 48
    assert (tmp_path / "a" / "loss_curve.png").stat().st_size > 1000

    capsys.readouterr()
    assert pretrain(tmp_path / "a", ct_folder, "--method", "simmim", "--steps", "3", "--resume") == 2
    assert "--method mae --backbone vit (MAE); it cannot be resumed with --method simmim" in capsys.readouterr().err
    assert pretrain(tmp_path / "a", ct_folder, "--method", "mae", "--backbone", "convvit", "--steps", "3",
                    "--resume") == 2
    assert "cannot be resumed" in capsys.readouterr().err
    assert pretrain(tmp_path / "a", ct_folder, "--steps", "3", "--resume") == 2  # the default method, MiM
    assert "cannot be resumed with --method mim" in capsys.readouterr().err


# ------------------------------------------------------------------------ fine-tuning init

def test_each_backbone_initialises_its_segmentation_network(tmp_path):
    from mimcore.models import segnet
    from mimcore.training.encoder_init import init_from_pretrain
    from mimcore.training.finetune_init import new_architecture, param_groups

    cases = [("mae", "vit", "unetr", "vit.", "encoder."), ("simmim", "convvit", "mim-seg", "encoder.", "encoder."),
             ("gmim", None, "swinunetr", "swinViT.", "encoder.")]
    for method, backbone, kind, net_prefix, pre_prefix in cases:
        run, pre = saved_run(tmp_path, method, backbone)
        arch = new_architecture(registry.resolve_backbone(method, backbone), "tiny", 3)
        net = segnet.build(arch)
        assert segnet.kind_of(net) == kind == arch["kind"] and segnet.out_channels(net) == 3
        report = init_from_pretrain(net, run)
        encoder_names = [k for k in net.state_dict() if k.startswith(net_prefix)]
        assert sorted(report.loaded) == sorted(encoder_names), kind
        assert report.unused == [] and set(report.new) == set(net.state_dict()) - set(encoder_names)
        ref = pre.state_dict()
        for k in encoder_names:
            torch.testing.assert_close(net.state_dict()[k], ref[pre_prefix + k[len(net_prefix):]], rtol=0, atol=0)
        size = segnet.input_size(net)
        assert net.eval()(torch.rand(1, 1, size, size, size)).shape == (1, 3, size, size, size)
    # a ViT checkpoint does not go into the MiM network, and the other way round
    vit_run, _ = saved_run(tmp_path, "mae", "vit", "again")
    with pytest.raises(MimError, match="fine-tunes as a 'unetr' network"):
        init_from_pretrain(segnet.build({"kind": "mim-seg", "preset": "tiny", "out_channels": 3}), vit_run)
    unetr = segnet.build(new_architecture("vit", "tiny", 3))
    with pytest.raises(MimError, match="--layer-decay is implemented for the MiM network only"):
        param_groups(unetr, 1e-3, 0.05, 0.75)
    groups = param_groups(unetr, 1e-3, 0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(unetr.vit.patch_embedding.position_embeddings) in no_decay
    assert sum(len(g["params"]) for g in groups) == len(list(unetr.parameters()))


def test_monai_export_target_builds_every_kind():
    from mimcore.models.segnet import build_segnet
    from mimcore.training.finetune_init import new_architecture

    for backbone, cls in (("vit", "UNETRSegNet"), ("convvit", "MiMSegNet"), ("swin", "SwinUNETR")):
        arch = json.loads(json.dumps(new_architecture(backbone, "tiny", 2)))
        assert type(build_segnet(arch)).__name__ == cls


def test_finetune_without_init_takes_backbone_and_refuses_a_mismatch(tmp_path, small_case, capsys):
    vit_run, _ = saved_run(tmp_path, "mae", "vit")
    rc = main(["finetune", "--datalist", str(small_case["datalist"]), "--labels", "liver", "--init", str(vit_run),
               "--backbone", "convvit", "--steps", "1", "--output", str(tmp_path / "x"), "--progress", "none"])
    assert rc == 2 and "holds a pre-trained vit encoder" in capsys.readouterr().err
    rc = main(["finetune", "--datalist", str(small_case["datalist"]), "--labels", "liver", "--backbone", "vit",
               "--preset", "tiny", "--spacing", "6", "6", "6", "--steps", "1", "--output", str(tmp_path / "y"),
               "--progress", "none", "--no-tensorboard", "--device", "cpu"])
    assert rc == 0
    arch = json.loads((tmp_path / "y" / "model" / "model.json").read_text(encoding="utf-8"))["architecture"]
    assert arch["kind"] == "unetr" and arch["vit"]["input_size"] == 32


# ------------------------------------------------------------------------ the whole CLI path

def test_cli_mae_pretrain_reconstruct_finetune_segment(tmp_path, small_case, capsys):
    dl, image = str(small_case["datalist"]), small_case["image"]
    run = tmp_path / "mae"
    rc = main(["pretrain", "--datalist", dl, "--method", "mae", "--preset", "tiny", "--steps", "2",
               "--warmup-steps", "1", "--output", str(run), "--progress", "none", "--no-tensorboard"])
    assert rc == 0 and (run / "checkpoint_00000002.json").is_file()

    rec = tmp_path / "rec"
    assert main(["reconstruct", "--checkpoint", str(run), "--image", str(image), "--output", str(rec)]) == 0
    summary = json.loads((rec / "summary.json").read_text(encoding="utf-8"))
    assert summary["method"] == "mae" and len(summary["levels"]) == 1 and summary["crop"]["size"] == 32
    assert sorted(p.name for p in (rec / "level1").iterdir()) == [
        "vol00_hidden.nii.gz", "vol00_original.nii.gz", "vol00_reconstruction.nii.gz"]
    assert summary["levels"][0]["volumes"][0]["hidden_fraction"] == 0.75
    assert not (rec / "level2").exists() and (rec / "levels.png").stat().st_size > 1000

    ft = tmp_path / "ft"
    capsys.readouterr()
    rc = main(["finetune", "--datalist", dl, "--labels", "liver,spleen", "--init", str(run), "--spacing", "6", "6", "6",
               "--steps", "2", "--lr", "1e-3", "--warmup-steps", "1", "--output", str(ft), "--progress", "json",
               "--no-tensorboard", "--device", "cpu"])
    assert rc == 0
    events = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert events[0]["architecture"] == "unetr"
    notes = " ".join(e.get("message", "") for e in events if e["event"] == "note")
    from mimcore.bundles.bundle import load_bundle

    n_vit = sum(k.startswith("vit.") for k in load_bundle(ft / "model").state_dict())
    assert "pre-training checkpoint (MAE, vit)" in notes and f"loaded {n_vit} tensors" in notes
    desc = json.loads((ft / "model" / "model.json").read_text(encoding="utf-8"))
    assert desc["architecture"]["kind"] == "unetr" and desc["architecture"]["out_channels"] == 3
    assert desc["inference"]["roi_size"] == [32, 32, 32]

    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(image), "--model", str(ft / "model"), "--output", str(out), "--device", "cpu",
                 "--progress", "none"]) == 0
    seg, ct = load_volume(out), load_volume(image)
    assert seg.shape == ct.shape and np.allclose(seg.affine, ct.affine)
    assert set(np.unique(seg.array)) <= {0, 1, 2}


def test_reconstruct_places_a_single_level_method_in_the_patient(tmp_path):
    """The original written for an MAE checkpoint is the crop at full resolution at its true
    position: on a CT whose HU is a linear function of the RAS position, every voxel of it
    equals that function at the voxel's world position (from the file's own affine)."""
    run, _ = saved_run(tmp_path, "simmim", "vit")
    affine = np.array([[-0.9, 0, 0, 40.0], [0, -1.1, 0, 12.0], [0, 0, 1.3, -30.0], [0, 0, 0, 1]])
    grad = np.array([3.0, -2.0, 4.0])
    shape = (60, 50, 45)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    image = save_volume(tmp_path / "ct.nii.gz", (world @ grad).astype(np.float32), affine)
    out = tmp_path / "rec"
    assert main(["reconstruct", "--checkpoint", str(run), "--image", str(image), "--output", str(out),
                 "--center", "20", "-10", "0", "--seed", "2"]) == 0
    orig = load_volume(out / "level1" / "vol00_original.nii.gz")
    assert orig.shape == (32, 32, 32)
    widx = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
    w = widx @ orig.affine[:3, :3].T + orig.affine[:3, 3]
    np.testing.assert_allclose(orig.array, w @ grad, atol=0.05)
    assert np.allclose(np.abs(np.diag(orig.affine[:3, :3])), [0.9, 1.1, 1.3])
    recon = load_volume(out / "level1" / "vol00_reconstruction.nii.gz").array
    hidden = load_volume(out / "level1" / "vol00_hidden.nii.gz").array
    visible = hidden != hidden.min()  # hidden voxels are at the minimum
    assert 0.2 < visible.mean() <= 0.25 + 1e-9
    np.testing.assert_allclose(recon[visible], orig.array[visible], atol=0.05)
