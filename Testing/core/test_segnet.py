"""The segmentation network: shapes, initialisation from every source, fine-tuning options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mimcore.errors import MimError
from mimcore.methods.mim import MiMPretrainModel
from mimcore.training.encoder_init import init_from_official, init_from_pretrain, source_kind
from mimcore.methods.mim import MiMConfig
from mimcore.models.convvit import preset as convvit_preset
from mimcore.models.mim_segnet import MiMSegNet, architecture_dict
from mimcore.models.segnet import build_segnet
from mimcore.models.checkpoint import save_checkpoint
from mimcore.training.optim import encoder_layer_id, finetune_param_groups

TINY = convvit_preset("tiny")


def test_shapes_and_pyramid():
    net = MiMSegNet(TINY, out_channels=4).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    feats = net.encoder.pyramid(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16, 6), (2, 8, 8, 8, 12), (2, 4, 4, 4, 24),
                                                (2, 2, 2, 2, 48)]
    # the token output equals the encoder's own unmasked forward (same weights, same maths)
    torch.testing.assert_close(feats[3].reshape(2, 8, 48), net.encoder(x), rtol=1e-5, atol=1e-5)
    assert net(x).shape == (2, 4, 32, 32, 32)
    with pytest.raises(MimError, match="sliding-window"):
        net(torch.randn(1, 1, 48, 48, 48))
    small = MiMSegNet(convvit_preset("small"), out_channels=3).eval()
    assert small.feature_size == 24
    with torch.no_grad():
        assert small(torch.randn(1, 1, 64, 64, 64)).shape == (1, 3, 64, 64, 64)


def test_build_from_architecture_roundtrip():
    net = MiMSegNet(TINY, out_channels=3)
    arch = architecture_dict(net, "tiny")
    again = build_segnet(arch)
    assert again.load_state_dict(net.state_dict()) is not None and again.out_channels == 3
    with pytest.raises(MimError, match="architecture"):
        build_segnet({"kind": "unet"})


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = MiMSegNet(TINY, 3, checkpointing=False)
    b = MiMSegNet(TINY, 3, checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    for net in (a, b):
        net.train()
        net(x).square().mean().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_layer_decay_and_frozen_encoder():
    net = MiMSegNet(TINY, 3)
    top = 5 + TINY.vit_depth
    assert encoder_layer_id("encoder.embeds.0.proj.weight", TINY.vit_depth) == 0
    assert encoder_layer_id("encoder.blocks.1.attn.qkv.weight", TINY.vit_depth) == 5
    assert encoder_layer_id("dec1.transp_conv.conv.weight", TINY.vit_depth) == top
    groups = finetune_param_groups(net, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    by_layer = {g["layer"]: g["lr"] for g in groups}
    assert by_layer[top] == pytest.approx(1e-3) and by_layer[0] == pytest.approx(1e-3 * 0.5**top)
    assert all(by_layer[i] < by_layer[i + 1] for i in sorted(by_layer)[:-1])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim <= 1 for p in g["params"]))
    for p in net.encoder_parameters():
        p.requires_grad_(False)
    frozen = finetune_param_groups(net, 1e-3, 0.05)
    assert sum(len(g["params"]) for g in frozen) == len(list(net.parameters())) - len(net.encoder_parameters())


def test_init_from_pretrain_checkpoint(tmp_path):
    pre = MiMPretrainModel(TINY, MiMConfig())
    json_path = save_checkpoint(tmp_path / "run", 3, pre, {"preset": "tiny", "model": TINY.to_dict()})
    net = MiMSegNet(TINY, 3)
    report = init_from_pretrain(net, tmp_path / "run")
    encoder_names = [k for k in net.state_dict() if k.startswith("encoder.")]
    assert sorted(report.loaded) == sorted(encoder_names)
    assert report.unused == []  # the pre-training decoder is expected to be left out
    assert set(report.new) == set(net.state_dict()) - set(encoder_names)
    for k in encoder_names:
        torch.testing.assert_close(net.state_dict()[k], pre.state_dict()[k], rtol=0, atol=0)
    assert source_kind(json_path) == "pretrain"
    with pytest.raises(MimError, match="--preset tiny"):
        init_from_pretrain(MiMSegNet(convvit_preset("small"), 3), json_path)


def test_init_from_official_needs_matching_tensors(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"some.layer.weight": torch.zeros(3)}}, path)
    with pytest.raises(MimError, match="nothing in"):
        init_from_official(MiMSegNet(TINY, 3), path)


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    """A pickle that would run code when unpickled: `mim finetune --init` refuses it, nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "mim_pretrain.pth"
    torch.save({"model": {"x": Evil()}}, evil)
    images, labels = tmp_path / "img", tmp_path / "lab"
    import numpy as np

    from mimcore.data.volume_io import save_volume

    for folder in (images, labels):
        folder.mkdir()
        save_volume(folder / "a.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    proc = subprocess.run([sys.executable, "-m", "mimcore", "finetune", "--images", str(images), "--label-dir",
                           str(labels), "--label-names", "1:liver", "--preset", "tiny", "--steps", "1",
                           "--init", str(evil), "--output", str(tmp_path / "out"), "--progress", "none"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "refus" in proc.stderr.lower()
    assert not marker.exists()
