"""GMIM on the Swin encoder as released (METHODS.md section 3): configuration (and old
checkpoints' configs and weights), the two crops, the flips and MONAI intensity
augmentations, the published cross-correlation and ``--invis_patches`` losses against
hand computations, the re-masking points, the stop-gradient target branch with its own
trainable projector, the encoder hand-off to MONAI's SwinUNETR, reproducibility and
learning on a fixed batch (``tiny``, CPU).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from mimcore.errors import MimError
from mimcore.methods.gmim import (
    GMIMConfig,
    GMIMPretrainModel,
    augment_pair,
    barlow_twins_loss,
    crop_offsets,
    crop_pair,
    cross_correlation_loss,
    gmim_config,
    hidden_voxel_mse,
    intensity_augment,
    random_flips,
)
from mimcore.methods.grid_masking import voxel_hidden
from mimcore.models.swin import build_swin_segnet, swin_encoder_state


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GMIMPretrainModel(gmim_config("tiny"))


@contextlib.contextmanager
def _recording(model):
    """Within it, every masked ``model.encode`` appends its ``(stage, hidden)`` masks to the yielded list."""
    record, orig = [], model.encode

    def encode(x, plan=None, *args, **kwargs):
        return orig(x, plan, *args, **({**kwargs, "record": record} if plan is not None else kwargs))

    model.encode = encode
    try:
        yield record
    finally:
        del model.encode


def _region(cfg, batch=1, seed=0):
    r = cfg.crop_size
    return torch.rand(batch, 1, r, r, r, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- config


def test_base_preset_is_the_published_configuration():
    c = gmim_config("base")
    assert (c.input_size, c.crop_size, c.feature_size, c.depths, c.num_heads, c.window_size, c.patch_size) == \
        (128, 160, 48, (2, 2, 2, 2), (3, 6, 12, 24), 7, 2)
    assert (c.encoder_dim, c.proj_dim, c.grids, c.ratio_range) == (768, 512, (4, 8, 16), (0.35, 0.65))
    # re-masks before MONAI layers1, layers2, layers3 (stage k = layers{k+1}); none before layers4
    assert (c.remask_stages, c.remask_prob, c.remask_factor) == ((0, 1, 2), 0.3, 0.5)
    assert (c.cross_correlation, c.barlow_lambda, c.barlow_weight, c.recon_weight) == \
        ("published", 0.005, 0.005, 1.0)
    assert (c.flip_prob, c.contrast_gamma, c.contrast_prob, c.shift_offset, c.shift_prob, c.noise_std,
            c.noise_prob) == (0.5, (0.7, 1.5), 0.7, 0.4, 0.4, 0.1, 0.5)
    for name in ("base", "small", "tiny"):
        c = gmim_config(name)
        assert GMIMConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
        assert c.input_size < c.crop_size < 2 * c.input_size
        assert all(c.input_size // g >= 4 * c.patch_size for g in c.grids)  # cells of >= 2^3 tokens
        for k in c.remask_stages:  # every grid has whole tokens per cell at every re-mask map
            assert all((c.input_size // (c.patch_size * 2**k)) % g == 0 for g in c.grids)
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
    for bad in [(0, 1, 4), (-1, 0), (1, 0), (0, 0, 1)]:  # out of 0..3, or not increasing
        with pytest.raises(MimError, match="remask_stages"):
            GMIMConfig(remask_stages=bad)
    with pytest.raises(MimError, match="cross_correlation"):
        GMIMConfig(cross_correlation="pooled")
    for bad in [{"flip_prob": 1.5}, {"noise_prob": -0.1}, {"contrast_gamma": (1.5, 0.7)}, {"shift_offset": -1.0}]:
        with pytest.raises(MimError):
            GMIMConfig(**bad)
    GMIMConfig(remask_stages=(0, 1, 2, 3))  # the published, commented-out layers4 re-mask is allowed


def test_an_old_checkpoints_config_still_loads():
    """A ``method_config`` written before the published forms: old intensity settings
    dropped, its re-mask stages kept (same meaning: before layers2..4), the new settings
    at their defaults."""
    old = {k: v for k, v in gmim_config("tiny").to_dict().items()
           if k not in ("cross_correlation", "flip_prob", "contrast_gamma", "contrast_prob", "shift_offset",
                        "shift_prob", "noise_std", "noise_prob")}
    old.update(remask_stages=[1, 2, 3], aug_scale=0.1, aug_shift=0.1)
    cfg = GMIMConfig.from_dict(json.loads(json.dumps(old)))
    assert cfg == GMIMConfig(**{**gmim_config("tiny").to_dict(), "remask_stages": (1, 2, 3)})
    assert cfg.cross_correlation == "published" and not hasattr(cfg, "aug_scale")


def test_an_old_shared_projector_state_dict_loads():
    """The old model had one projector; its state dict has the standardised option's keys.
    Loaded into the published model, the target projector starts as a copy of it."""
    torch.manual_seed(0)
    shared = GMIMPretrainModel(GMIMConfig.from_dict({**gmim_config("tiny").to_dict(),
                                                    "cross_correlation": "standardised"}))
    assert shared.target_projector is None
    old_state = shared.state_dict()
    assert not [k for k in old_state if k.startswith("target_projector.")]
    model = GMIMPretrainModel(gmim_config("tiny"))
    model.load_state_dict(old_state)  # strict
    for name in ("weight", "bias"):
        assert torch.equal(getattr(model.projector, name), old_state["projector." + name])
        assert torch.equal(getattr(model.target_projector, name), old_state["projector." + name])
    assert set(old_state) == {k for k in old_state if not k.startswith("target_projector.")}  # not mutated
    # a published state dict keeps its own target projector ...
    other = GMIMPretrainModel(gmim_config("tiny")).state_dict()
    model.load_state_dict(other)
    assert torch.equal(model.target_projector.weight, other["target_projector.weight"])
    assert not torch.equal(model.target_projector.weight, model.projector.weight)
    # ... and does not fit the shared-projector model
    with pytest.raises(RuntimeError, match="target_projector"):
        shared.load_state_dict(other)


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


def _only(**probs) -> GMIMConfig:
    """tiny with the given augmentation probabilities, the others 0."""
    base = dict(flip_prob=0.0, contrast_prob=0.0, shift_prob=0.0, noise_prob=0.0)
    return GMIMConfig.from_dict({**gmim_config("tiny").to_dict(), **base, **probs})


def _which_flip(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...] | None:
    """The spatial axes (of d, h, w) along which b (C, D, H, W) is a flip of a, or None."""
    for f in range(8):
        axes = tuple(k for k in range(3) if f >> k & 1)
        if torch.equal(a.flip([1 + k for k in axes]) if axes else a, b):
            return axes
    return None


def test_random_flips_each_axis_with_probability_half():
    x = torch.rand(2000, 1, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    out, flags = random_flips(x, 0.5, torch.Generator().manual_seed(4))
    assert out.shape == x.shape and flags.shape == (2000, 3)
    for b in range(0, 2000, 37):
        axes = [1 + k for k in range(3) if flags[b, k]]
        assert torch.equal(out[b], x[b].flip(axes) if axes else x[b])
    rates = flags.double().mean(0)
    assert bool(((rates - 0.5).abs() < 0.04).all()), rates  # sd 0.011
    assert abs(float((flags[:, 0] & flags[:, 1]).double().mean()) - 0.25) < 0.04  # independent axes
    again, flags2 = random_flips(x, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(again, out) and torch.equal(flags, flags2)


def test_contrast_adjustment_is_a_gamma_curve_in_range():
    """RandAdjustContrast: y' = ((y - min) / range)^gamma * range + min, gamma in [0.7, 1.5]."""
    y = 0.2 + 0.6 * torch.rand(300, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z = intensity_augment(y, _only(contrast_prob=1.0), torch.Generator().manual_seed(6))
    gammas = []
    for yb, zb in zip(y.reshape(300, -1), z.reshape(300, -1)):
        lo, rng = yb.min(), yb.max() - yb.min()
        u, v = (yb - lo) / rng, (zb - lo) / rng
        inner = (u > 0.05) & (u < 0.95)
        g = torch.log(v[inner]) / torch.log(u[inner])  # one gamma for the whole image
        assert float(g.max() - g.min()) < 1e-4
        gammas.append(float(g.mean()))
    gammas = np.array(gammas)
    assert gammas.min() >= 0.7 - 1e-4 and gammas.max() <= 1.5 + 1e-4
    assert gammas.min() < 0.75 and gammas.max() > 1.45  # uniform over the range


def test_intensity_shift_and_noise():
    y = torch.rand(300, 1, 8, 8, 8, generator=torch.Generator().manual_seed(7))
    shifted = intensity_augment(y, _only(shift_prob=1.0), torch.Generator().manual_seed(8))
    d = (shifted - y).reshape(300, -1)
    assert float((d - d[:, :1]).abs().max()) < 1e-6  # one offset per image
    assert float(d.abs().max()) <= 0.4 + 1e-6 and float(d[:, 0].min()) < -0.35 and float(d[:, 0].max()) > 0.35
    noisy = intensity_augment(y, _only(noise_prob=1.0), torch.Generator().manual_seed(9))
    n = (noisy - y).reshape(300, -1)
    std = n.std(1)
    assert float(n.mean().abs()) < 0.002 and float(std.max()) < 0.11 and float(std.min()) > 0.0
    assert float(std.mean()) == pytest.approx(0.05, abs=0.01)  # MONAI draws each call's std from U(0, 0.1)


def test_each_intensity_transform_fires_with_its_probability():
    y = torch.rand(1000, 1, 2, 2, 2, generator=torch.Generator().manual_seed(10))
    for probs, want in [({"contrast_prob": 0.7}, 0.7), ({"shift_prob": 0.4}, 0.4), ({"noise_prob": 0.5}, 0.5)]:
        z = intensity_augment(y, _only(**probs), torch.Generator().manual_seed(11))
        changed = (z != y).reshape(1000, -1).any(1).double().mean()
        assert abs(float(changed) - want) < 0.05, (probs, changed)  # sd <= 0.016
    z = intensity_augment(y, gmim_config("tiny"), torch.Generator().manual_seed(11))
    unchanged = (z == y).reshape(1000, -1).all(1).double().mean()
    assert abs(float(unchanged) - 0.3 * 0.6 * 0.5) < 0.03  # all three independent


def test_augment_pair_flips_both_changes_only_y_intensity_and_replays():
    cfg = gmim_config("tiny")
    gen_in = torch.Generator().manual_seed(12)
    x = torch.rand(40, 1, 4, 4, 4, generator=gen_in)
    y = torch.rand(40, 1, 4, 4, 4, generator=gen_in)
    xa, ya = augment_pair(x, y, cfg, torch.Generator().manual_seed(13))
    xb, yb = augment_pair(x, y, cfg, torch.Generator().manual_seed(13))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # reproducible from the generator
    xc, yc = augment_pair(x, y, cfg, torch.Generator().manual_seed(14))
    assert not torch.equal(xa, xc) and not torch.equal(ya, yc)
    flips = [_which_flip(x[b], xa[b]) for b in range(40)]
    assert all(f is not None for f in flips)  # x: a flip, intensities untouched
    assert len(set(flips)) > 4  # various flips
    assert sum(_which_flip(y[b], ya[b]) is None for b in range(40)) > 25  # y: intensity changed (~91%)
    # x's and y's flips are drawn separately (without intensity changes, y = x shows it)
    xs, ys = augment_pair(x, x, _only(flip_prob=0.5), torch.Generator().manual_seed(15))
    yflips = [_which_flip(x[b], ys[b]) for b in range(40)]
    assert all(f is not None for f in yflips)
    assert sum(_which_flip(x[b], xs[b]) != f for b, f in enumerate(yflips)) > 20  # P(differ) = 7/8
    # the draws: x's flips, y's flips, then the transforms' seeds
    gen = torch.Generator().manual_seed(13)
    fx, _ = random_flips(x, 0.5, gen)
    fy, _ = random_flips(y, 0.5, gen)
    assert torch.equal(fx, xa) and torch.equal(intensity_augment(fy, cfg, gen), ya)


# --------------------------------------------------------------------------- losses


def _np_cross_correlation(zx: np.ndarray, zy: np.ndarray, lam: float = 0.005) -> float:
    """One image's published loss, by loops: zx, zy (n, D), C = zx^T zy / n, not standardised."""
    n, d = zx.shape
    c = np.array([[sum(zx[t, i] * zy[t, j] for t in range(n)) / n for j in range(d)] for i in range(d)])
    return float(sum((1 - c[i, i]) ** 2 for i in range(d))
                 + lam * sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j))


def test_cross_correlation_loss_by_hand():
    # n = 2 tokens, D = 2: C = [[1, 0], [0, 1]]^T [[1, 1], [0, 1]] / 2 = [[.5, .5], [0, .5]]
    # loss = (1 - .5)^2 + (1 - .5)^2 + 0.005 * (.5^2 + 0^2) = 0.50125
    zx = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    zy = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    assert float(cross_correlation_loss(zx, zy, 0.005)) == pytest.approx(0.50125, abs=1e-6)
    # C = I exactly: zx = zy = sqrt(n) * identity rows -> 0
    e = torch.eye(3)[None] * 3**0.5
    assert float(cross_correlation_loss(e, e)) == pytest.approx(0.0, abs=1e-6)
    # an unrelated sample against the loops
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    want = _np_cross_correlation(a, b)
    got = cross_correlation_loss(torch.tensor(a)[None], torch.tensor(b)[None], 0.005)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_cross_correlation_loss_is_per_image_mean_and_not_standardised():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(2, 9, 5)), rng.normal(size=(2, 9, 5)) + 0.3
    per_image = [_np_cross_correlation(a[k], b[k]) for k in range(2)]
    got = cross_correlation_loss(torch.tensor(a), torch.tensor(b))
    assert float(got) == pytest.approx(np.mean(per_image), rel=1e-5)
    pooled = _np_cross_correlation(a.reshape(18, 5), b.reshape(18, 5))  # the batch as one sample set: not it
    assert abs(float(got) - pooled) > 1e-3
    # not standardised: scaling or shifting the features changes the loss (the standardised form does not)
    za, zb = torch.tensor(a), torch.tensor(b)
    assert abs(float(cross_correlation_loss(2 * za, zb)) - float(got)) > 1e-2
    assert abs(float(cross_correlation_loss(za + 1, zb)) - float(got)) > 1e-2
    flat_a, flat_b = za.reshape(18, 5), zb.reshape(18, 5)
    assert float(barlow_twins_loss(2 * flat_a + 1, flat_b)) == pytest.approx(float(barlow_twins_loss(flat_a, flat_b)),
                                                                             rel=1e-4)


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


def test_reconstruction_mse_zeroes_visible_voxels_and_averages_over_all():
    # by hand: 2^3 voxels, hidden at 0 and 5; pred - target there = 1 and -2 -> (1 + 4) / 8
    target = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 2, 2)
    pred = target.clone()
    pred.view(-1)[0] += 1
    pred.view(-1)[5] -= 2
    pred.view(-1)[3] += 7  # visible: does not count
    hidden = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    hidden.view(-1)[[0, 5]] = True
    assert float(hidden_voxel_mse(pred, target, hidden)) == pytest.approx(5 / 8)
    # random case: the published form, sum over hidden / all voxels (not the hidden mean)
    gen = torch.Generator().manual_seed(6)
    target = torch.rand(2, 1, 8, 8, 8, generator=gen)
    pred = torch.rand(2, 1, 8, 8, 8, generator=gen)
    hidden = torch.rand(2, 1, 8, 8, 8, generator=gen) < 0.4
    want = ((pred - target)[hidden] ** 2).sum() / pred.numel()
    torch.testing.assert_close(hidden_voxel_mse(pred, target, hidden), want)
    zeroed = torch.nn.functional.mse_loss(pred * hidden, target * hidden)
    torch.testing.assert_close(hidden_voxel_mse(pred, target, hidden), zeroed)
    changed = torch.where(hidden, pred, pred + 100.0)  # visible voxels do not count
    torch.testing.assert_close(hidden_voxel_mse(changed, target, hidden), want)
    assert abs(float(want) - float(((pred - target)[hidden] ** 2).mean())) > 1e-3


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
    """The loss ``recon`` is the ``--invis_patches`` MSE between the decoder output and x —
    the first crop, flipped as the encoder saw it, without intensity changes — with the
    voxels left visible by the mask after the patch embedding zeroed, over all voxels."""
    cfg = tiny.cfg
    region = _region(cfg, batch=2, seed=15)
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, (args[0].detach(), output.detach()))
        return hook

    hooks = [tiny.encoder.patch_embed.register_forward_hook(keep("embed")),
             tiny.decoder.register_forward_hook(keep("decoder"))]
    try:
        with torch.no_grad(), _recording(tiny) as record:
            out = tiny(region, torch.Generator().manual_seed(16))
    finally:
        for h in hooks:
            h.remove()
    seen = {"embed_in": seen["embed"][0], "recon": seen["decoder"][1]}
    gen = torch.Generator().manual_seed(16)
    x, y, _ = crop_pair(region, cfg.input_size, gen)
    x, _ = augment_pair(x, y, cfg, gen)
    assert torch.equal(seen["embed_in"], x)  # the encoder sees the flipped x ...
    stage, first = record[0]
    assert stage == 0
    hidden = voxel_hidden(first, cfg.patch_size)
    assert 0.35 <= float(hidden.float().mean()) <= 0.65
    torch.testing.assert_close(out["mask_ratio"], hidden.float().mean())
    want = ((seen["recon"] - x)[hidden] ** 2).sum() / x.numel()  # ... and reconstructs it
    torch.testing.assert_close(out["recon"], want)
    assert abs(float(((seen["recon"] - x)[hidden] ** 2).mean()) - float(want)) > 1e-4  # over all voxels


def test_remasking_points_are_before_layers1_2_3(tiny):
    """First mask after the patch embedding (the input of MONAI layers1), then fresh masks
    before layers1, layers2 and layers3 at 1/2, 1/4, 1/8 of the ratio; layers4 never."""
    cfg = tiny.cfg
    enc = tiny.encoder
    assert [m is l[0] for m, l in zip(tiny.stages(), (enc.layers1, enc.layers2, enc.layers3, enc.layers4))] == \
        [True] * 4
    s = cfg.input_size
    x = torch.rand(1, 1, s, s, s, generator=torch.Generator().manual_seed(20))
    plan = tiny.plan(x)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, k=k: inputs.__setitem__(k, a[0].detach()))
             for k, layer in enumerate(tiny.stages())]
    record: list = []
    try:
        with torch.no_grad():
            tiny.encode(x, plan, torch.Generator().manual_seed(21), [0.5, 0.25, 0.125], record=record)
    finally:
        for h in hooks:
            h.remove()
    assert [k for k, _ in record] == [0, 0, 1, 2]
    maps = [hid.shape[-1] for _, hid in record]
    assert maps == [s // 2, s // 2, s // 4, s // 8]  # layers1, layers1, layers2, layers3 token maps
    union0 = record[0][1] | record[1][1]
    zero = {k: (v[0].abs().sum(0) == 0) for k, v in inputs.items()}
    assert torch.equal(zero[0], union0[0])  # layers1 input: both masks' tokens zero, no others
    assert torch.equal(zero[1], record[2][1][0]) and torch.equal(zero[2], record[3][1][0])
    assert not bool(zero[3].any())  # layers4: not re-masked
    # in forward: the first mask always, the re-masks where drawn (all with probability 1, none with 0)
    for prob, want in [(1.0, [0, 0, 1, 2]), (0.0, [0])]:
        torch.manual_seed(0)
        model = GMIMPretrainModel(GMIMConfig.from_dict({**cfg.to_dict(), "remask_prob": prob}))
        with torch.no_grad(), _recording(model) as rec:
            out = model(_region(cfg, seed=22), torch.Generator().manual_seed(23))
        assert [k for k, _ in rec] == want and int(out["remasked"]) == len(want) - 1
        fractions = [float(h.double().mean()) for _, h in rec]
        assert all(b < a for a, b in zip(fractions, fractions[1:]))  # the ratio halves at each call


def test_target_branch_is_augmented_y_without_gradient_and_without_masking(tiny):
    """The patch embedding runs twice: on the masked online crop x (with autograd) and on
    the augmented y (no graph). A backward of the cross-correlation term alone reaches the
    encoder through the online branch only, and reaches both projectors."""
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

    # replay the generator: x = first crop flipped, y = second crop flipped and augmented
    gen = torch.Generator().manual_seed(10)
    x, y, _ = crop_pair(region, cfg.input_size, gen)
    x_aug, y_aug = augment_pair(x, y, cfg, gen)
    (in_online, grad_online), (in_target, grad_target) = calls
    assert torch.equal(in_online, x_aug) and torch.equal(in_target, y_aug)
    assert not torch.equal(in_target, y) and not torch.equal(in_target, y.flip([2, 3, 4]))
    assert grad_online and not grad_target
    assert len(backward_calls) == 1 and backward_calls[0] > 0  # only the online branch carries gradient
    # online stage-0 input has zeroed tokens (masked); target's has none
    zero_tokens = [(t.abs().sum(1) == 0).float().mean().item() for t in layer_inputs]
    assert 0.3 < zero_tokens[0] < 0.8 and zero_tokens[1] == 0.0
    enc_grads = [p.grad for p in tiny.encoder.parameters() if p.grad is not None]
    assert enc_grads and sum(float(g.abs().sum()) for g in enc_grads) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in tiny.decoder.parameters())
    # two separate, trainable projectors: both get a gradient
    assert tiny.target_projector is not tiny.projector
    for proj in (tiny.projector, tiny.target_projector):
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in proj.parameters())
    tiny.zero_grad()


def test_standardised_option_shares_one_projector_without_target_gradient():
    torch.manual_seed(0)
    cfg = GMIMConfig.from_dict({**gmim_config("tiny").to_dict(), "cross_correlation": "standardised"})
    model = GMIMPretrainModel(cfg)
    region = _region(cfg, batch=1, seed=17)
    zs = []
    hook = model.projector.register_forward_hook(lambda m, a, o: zs.append((a[0].detach(), o.requires_grad)))
    try:
        out = model(region, torch.Generator().manual_seed(18))
    finally:
        hook.remove()
    assert [g for _, g in zs] == [True, False]  # online with graph, target without
    want = barlow_twins_loss(model.projector(zs[0][0]).flatten(0, 1), model.projector(zs[1][0]).flatten(0, 1))
    torch.testing.assert_close(out["barlow"], want)
    assert out["barlow"].requires_grad


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
