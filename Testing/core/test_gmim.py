"""GMIM on the Swin encoder (methods.md section 3): configuration, the two crops, the
losses against hand computations, the stop-gradient target branch, the encoder hand-off
to MONAI's SwinUNETR, reproducibility and learning on a fixed batch (``tiny``, CPU).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mimcore.errors import MimError
from mimcore.methods.gmim import (
    GMIMConfig,
    GMIMPretrainModel,
    barlow_twins_loss,
    crop_offsets,
    crop_pair,
    gmim_config,
    intensity_augment,
    masked_voxel_mse,
)
from mimcore.methods.grid_masking import voxel_hidden
from mimcore.models.swin import build_swin_segnet, swin_encoder_state


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GMIMPretrainModel(gmim_config("tiny"))


def _region(cfg, batch=1, seed=0):
    r = cfg.crop_size
    return torch.rand(batch, 1, r, r, r, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config


def test_base_preset_is_the_published_configuration():
    c = gmim_config("base")
    assert (c.input_size, c.crop_size, c.feature_size, c.depths, c.num_heads, c.window_size, c.patch_size) == \
        (128, 160, 48, (2, 2, 2, 2), (3, 6, 12, 24), 7, 2)
    assert (c.encoder_dim, c.proj_dim, c.grids, c.ratio_range) == (768, 512, (4, 8, 16), (0.35, 0.65))
    assert (c.remask_stages, c.remask_prob, c.remask_factor) == ((1, 2, 3), 0.3, 0.5)
    assert (c.barlow_lambda, c.barlow_weight, c.recon_weight) == (0.005, 0.005, 1.0)
    for name in ("base", "small", "tiny"):
        c = gmim_config(name)
        assert GMIMConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        assert c.input_size < c.crop_size < 2 * c.input_size
        assert all(c.input_size // g >= 4 * c.patch_size for g in c.grids)  # cells of >= 2^3 tokens
    with pytest.raises(MimError):
        gmim_config("huge")
    with pytest.raises(MimError):
        GMIMConfig(input_size=100)
    with pytest.raises(MimError):
        GMIMConfig(grids=(3, 8))
    with pytest.raises(MimError):
        GMIMConfig(depths=(2, 2, 2), num_heads=(3, 6, 12))
    with pytest.raises(MimError):
        GMIMConfig.from_dict({"input_size": 128, "nonsense": 1})


# --------------------------------------------------------------------------- crops


@pytest.mark.parametrize("region,size", [(160, 128), (80, 64), (100, 32)])
def test_two_crops_overlap_and_lie_inside_the_region(region, size):
    gen = torch.Generator().manual_seed(1)
    off = crop_offsets(5000, region, size, gen)  # (N, 2, 3)
    assert off.min() >= 0 and off.max() <= region - size
    assert bool(((off[:, 0] - off[:, 1]).abs() < size).all())  # intervals intersect on every axis
    # offsets cover the whole allowed range
    assert set(off[:, 0, 0].tolist()) == set(range(region - size + 1))
    if region < 2 * size:  # then every pair overlaps, and y is uniform too
        assert set(off[:, 1, 2].tolist()) == set(range(region - size + 1))


def test_crop_pair_cuts_the_drawn_windows():
    vol = torch.arange(20 * 16 * 14, dtype=torch.float32).reshape(1, 1, 20, 16, 14).repeat(2, 1, 1, 1, 1)
    vol[1] += 10**5
    x, y, off = crop_pair(vol, 12, torch.Generator().manual_seed(2))
    assert x.shape == y.shape == (2, 1, 12, 12, 12)
    assert bool((off <= torch.tensor([8, 4, 2])).all())
    for b in range(2):
        for crop, (d, h, w) in zip((x[b], y[b]), off[b].tolist()):
            assert torch.equal(crop, vol[b, :, d:d + 12, h:h + 12, w:w + 12])
    with pytest.raises(MimError):
        crop_pair(vol[:, :, :10], 12)


def test_intensity_augmentation_is_a_bounded_scale_and_shift():
    y = torch.rand(64, 1, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = intensity_augment(y, torch.Generator().manual_seed(4), 0.1, 0.1)
    # per image, z must be an exact affine function of y: fit a, b by least squares
    yc, zc = y.reshape(64, -1), z.reshape(64, -1)
    a = ((yc - yc.mean(1, keepdim=True)) * (zc - zc.mean(1, keepdim=True))).sum(1) / \
        (yc - yc.mean(1, keepdim=True)).pow(2).sum(1)
    b = zc.mean(1) - a * yc.mean(1)
    torch.testing.assert_close(z, y * a.view(-1, 1, 1, 1, 1) + b.view(-1, 1, 1, 1, 1), atol=1e-10, rtol=0)
    assert bool(((a - 1).abs() <= 0.1).all() and (b.abs() <= 0.1).all())
    assert a.std() > 0.03 and b.std() > 0.03  # actually random per image


# --------------------------------------------------------------------------- losses


def test_barlow_twins_loss_equals_a_hand_computation():
    rng = np.random.default_rng(5)
    z1, z2 = rng.normal(size=(7, 4)), rng.normal(size=(7, 4)) + 0.5 * rng.normal(size=(7, 4))
    n, d, eps, lam = 7, 4, 1e-5, 0.005
    c = np.zeros((d, d))
    for i in range(d):
        a = (z1[:, i] - z1[:, i].mean()) / np.sqrt(z1[:, i].var() + eps)
        for j in range(d):
            b = (z2[:, j] - z2[:, j].mean()) / np.sqrt(z2[:, j].var() + eps)
            c[i, j] = (a * b).sum() / n
    want = sum((1 - c[i, i]) ** 2 for i in range(d)) + lam * sum(c[i, j] ** 2 for i in range(d)
                                                                   for j in range(d) if i != j)
    got = barlow_twins_loss(torch.tensor(z1), torch.tensor(z2), lam, eps)
    assert abs(float(got) - want) < 1e-4 * max(1.0, want)
    # identical, decorrelated features: diagonal 1, off-diagonal 0 -> ~0
    q, _ = np.linalg.qr(rng.normal(size=(64, 8)))
    z = torch.tensor(q - q.mean(0))
    assert float(barlow_twins_loss(z, z)) < 1e-3


def test_reconstruction_mse_counts_hidden_voxels_only():
    gen = torch.Generator().manual_seed(6)
    target = torch.rand(2, 1, 8, 8, 8, generator=gen)
    pred = torch.rand(2, 1, 8, 8, 8, generator=gen)
    hidden = torch.rand(2, 1, 8, 8, 8, generator=gen) < 0.4
    want = ((pred - target)[hidden] ** 2).mean()
    torch.testing.assert_close(masked_voxel_mse(pred, target, hidden), want)
    changed = torch.where(hidden, pred, pred + 100.0)  # visible voxels do not count
    torch.testing.assert_close(masked_voxel_mse(changed, target, hidden), want)


# --------------------------------------------------------------------------- model


def test_forward_returns_scalar_losses_and_is_reproducible(tiny):
    cfg = tiny.cfg
    region = _region(cfg, batch=2)
    out = tiny(region, torch.Generator().manual_seed(7))
    assert {"loss", "recon", "barlow"} <= set(out)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["recon"] + 0.005 * out["barlow"])
    assert 0.35 <= float(out["mask_ratio"]) <= 0.65
    assert min(cfg.grids) <= float(out["grid"]) <= max(cfg.grids)
    again = tiny(region, torch.Generator().manual_seed(7))
    assert all(torch.equal(out[k], again[k]) for k in out)  # all randomness from the generator


def test_forward_reconstruction_loss_is_on_the_voxels_of_the_first_mask(tiny):
    """The loss ``recon`` equals the MSE between the decoder output and the un-augmented x
    over the voxels of the tokens zeroed after the patch embedding — not over all voxels."""
    cfg = tiny.cfg
    region = _region(cfg, batch=2, seed=15)
    seen = {}
    hooks = [tiny.stages()[0].register_forward_pre_hook(lambda m, a: seen.setdefault("stage0", a[0].detach())),
             tiny.decoder.register_forward_hook(lambda m, a, o: seen.__setitem__("recon", o.detach()))]
    try:
        with torch.no_grad():
            out = tiny(region, torch.Generator().manual_seed(16))
    finally:
        for h in hooks:
            h.remove()
    x, _, _ = crop_pair(region, cfg.input_size, torch.Generator().manual_seed(16))
    hidden_tokens = seen["stage0"].abs().sum(1) == 0  # (B, t, t, t): the zeroed tokens
    hidden = voxel_hidden(hidden_tokens, cfg.patch_size)
    assert 0.35 <= float(hidden.float().mean()) <= 0.65
    torch.testing.assert_close(out["mask_ratio"], hidden.float().mean())
    want = ((seen["recon"] - x)[hidden] ** 2).mean()
    torch.testing.assert_close(out["recon"], want)
    assert abs(float(((seen["recon"] - x) ** 2).mean()) - float(want)) > 1e-4  # the mask matters


def test_target_branch_is_augmented_y_without_gradient_and_without_masking(tiny):
    """The patch embedding runs twice: on the masked online crop x (with autograd) and on
    the intensity-augmented y (no graph). A backward of the Barlow term alone reaches the
    encoder through the online branch only."""
    cfg = tiny.cfg
    region = _region(cfg, batch=2, seed=9)
    calls, backward_calls = [], []

    def on_forward(module, args, output):
        calls.append((args[0].detach().clone(), output.requires_grad))
        if output.requires_grad:
            output.register_hook(lambda g: backward_calls.append(float(g.abs().sum())))

    h1 = tiny.encoder.patch_embed.register_forward_hook(on_forward)
    layer_inputs = []
    h3 = tiny.stages()[0].register_forward_pre_hook(lambda m, a: layer_inputs.append(a[0].detach()))
    try:
        tiny.zero_grad()
        out = tiny(region, torch.Generator().manual_seed(10))
        out["barlow"].backward()
    finally:
        for h in (h1, h3):
            h.remove()

    # replay the generator: x = first crop, y = second crop augmented (same draw order)
    gen = torch.Generator().manual_seed(10)
    x, y, _ = crop_pair(region, cfg.input_size, gen)
    y_aug = intensity_augment(y, gen, cfg.aug_scale, cfg.aug_shift)
    (in_online, grad_online), (in_target, grad_target) = calls
    assert torch.equal(in_online, x) and torch.equal(in_target, y_aug)
    assert grad_online and not grad_target
    assert len(backward_calls) == 1 and backward_calls[0] > 0  # only the online branch carries gradient
    # online stage-0 input has zeroed tokens (masked); target's has none
    zero_tokens = [(t.abs().sum(1) == 0).float().mean().item() for t in layer_inputs]
    assert 0.3 < zero_tokens[0] < 0.7 and zero_tokens[1] == 0.0
    enc_grads = [p.grad for p in tiny.encoder.parameters() if p.grad is not None]
    assert enc_grads and sum(float(g.abs().sum()) for g in enc_grads) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in tiny.decoder.parameters())
    tiny.zero_grad()


def test_reconstruct_preview_shapes_and_masked_input(tiny):
    s = tiny.cfg.input_size
    vol = torch.rand(1, 1, s, s, s, generator=torch.Generator().manual_seed(11))
    out = tiny.reconstruct_preview(vol, torch.Generator().manual_seed(12))
    assert set(out) == {"input", "reconstruction", "hidden_mask"}
    assert all(v.shape == (1, 1, s, s, s) for v in out.values())
    hid = out["hidden_mask"]
    assert hid.dtype == torch.bool and 0.35 <= float(hid.float().mean()) <= 0.65
    assert bool((out["input"][hid] == 0).all()) and torch.equal(out["input"][~hid], vol[~hid])
    # hidden voxels come in whole 2^3 patches
    p = tiny.cfg.patch_size
    blocks = hid.reshape(s // p, p, s // p, p, s // p, p).float().mean((1, 3, 5))
    assert bool(((blocks == 0) | (blocks == 1)).all())


def test_a_few_tiny_steps_decrease_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GMIMPretrainModel(gmim_config("tiny"))
    region = _region(model.cfg, batch=1, seed=13)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-5)
    losses = []
    for _ in range(6):
        out = model(region, torch.Generator().manual_seed(14))  # same crops and masks each step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append({k: out[k].item() for k in ("loss", "recon", "barlow")})
    first, last = losses[0], losses[-1]
    assert last["loss"] < 0.8 * first["loss"], losses
    assert last["recon"] < 0.9 * first["recon"] and last["barlow"] < first["barlow"], losses


# --------------------------------------------------------------------------- fine-tuning hand-off


@pytest.mark.parametrize("preset", ["tiny", "base"])
def test_encoder_state_loads_every_swinvit_tensor(preset):
    torch.manual_seed(0)
    pre = GMIMPretrainModel(gmim_config(preset))
    mapped = swin_encoder_state(pre.state_dict())
    net = build_swin_segnet(preset, 3)
    swin_keys = {k for k in net.state_dict() if k.startswith("swinViT.")}
    assert set(mapped) == swin_keys
    result = net.load_state_dict(mapped, strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("swinViT.")]  # missing = none of the encoder
    for k, v in pre.encoder.state_dict().items():
        assert torch.equal(net.swinViT.state_dict()[k], v)
    # DDP-wrapped names map the same; unrelated state dicts map to nothing
    ddp = swin_encoder_state({"module." + k: v for k, v in pre.state_dict().items()})
    assert set(ddp) == swin_keys
    assert swin_encoder_state({"decoder.0.conv.weight": torch.zeros(1), "blocks.0.x": torch.zeros(1)}) == {}


def test_segnet_runs_at_the_preset_input():
    net = build_swin_segnet("tiny", 3)
    s = gmim_config("tiny").input_size
    with torch.no_grad():
        y = net(torch.rand(1, 1, s, s, s))
    assert y.shape == (1, 3, s, s, s)
    assert build_swin_segnet("tiny", 2, feature_size=24).swinViT.embed_dim == 24
