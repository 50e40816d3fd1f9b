"""The MiM method as specified in MiMCore/METHODS.md, section 1: three levels of
masking, norm-pix reconstruction on hidden tokens, stop-gradient cross-level alignment
(the default ``region`` kind; the others are in test_mim_alignment.py),
and the layers these rely on (depthwise conv backward, kernel = stride convs, MAE-style
visible-token encoder). CPU, ``tiny`` and ``small`` presets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimcore.methods.losses import alignment_loss, masked_mse, norm_pix_target
from mimcore.methods.masking import (
    octant_origin,
    patchify,
    random_hidden,
    split_by_mask,
    token_octants,
    token_origin,
)
from mimcore.methods.mim import MiMPretrainModel, build_levels
from mimcore.models.convvit import ConvViT3D
from mimcore.models.depthwise import DepthwiseConv3d, _DepthwiseConv3d
from mimcore.models.layers import StridedConv3d, space_to_depth
from mimcore.methods.mim import MiMConfig
from mimcore.models.convvit import preset as convvit_preset


def _coordinate_crop(batch: int, size: int) -> torch.Tensor:
    """(B, 1, size^3) float64 whose voxel (d, h, w) of crop b holds b*1e9 + d*1e6 + h*1e3 + w."""
    r = torch.arange(size, dtype=torch.float64)
    vol = r[:, None, None] * 1e6 + r[None, :, None] * 1e3 + r[None, None, :]
    return torch.stack([vol + b * 1e9 for b in range(batch)])[:, None]


def _coords(d, h, w, b=0):
    return b * 1e9 + d * 1e6 + h * 1e3 + w


# --------------------------------------------------------------------------- levels


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_hidden_token_counts_per_level(preset):
    mc, cfg = convvit_preset(preset), MiMConfig()
    b, g, n = 2, mc.grid, mc.grid**3
    gen = torch.Generator().manual_seed(3)
    levels = build_levels(torch.rand(b, 1, mc.crop_size, mc.crop_size, mc.crop_size, generator=gen), mc, cfg, gen)
    h1, h2, h3 = levels.hidden
    assert [v.shape[0] for v in levels.volumes] == [b, 4 * b, 16 * b]
    assert all(tuple(v.shape[1:]) == (1, mc.input_size, mc.input_size, mc.input_size) for v in levels.volumes)

    # level 1: exactly half of the 8 octants, and the hidden tokens are exactly their tokens
    oct_of_token = token_octants(g)
    assert levels.octants.shape == (b, 4)
    for i in range(b):
        assert len(set(levels.octants[i].tolist())) == 4
        assert torch.equal(h1[i], torch.isin(oct_of_token, levels.octants[i]))
    assert (h1.sum(1) == n // 2).all()

    # level 2: L - int(L * 0.4) hidden per volume; level 3: L - int(L * 0.5)
    assert (h2.sum(1) == n - int(n * 0.4)).all()
    assert (h3.sum(1) == n - int(n * 0.5)).all()
    # the 4 level-3 blocks of a level-2 volume are distinct hidden tokens of it
    assert levels.blocks.shape == (4 * b, cfg.level3_blocks)
    for v in range(4 * b):
        assert len(set(levels.blocks[v].tolist())) == cfg.level3_blocks
        assert h2[v, levels.blocks[v]].all()

    # masks are random: another seed gives other masks (with overwhelming probability for small)
    gen2 = torch.Generator().manual_seed(4)
    other = build_levels(torch.rand(b, 1, mc.crop_size, mc.crop_size, mc.crop_size), mc, cfg, gen2)
    if preset == "small":
        assert not torch.equal(other.hidden[1], h2)


def test_octant_order_matches_raster_tokens():
    """token_octants agrees with the octant of each token's first voxel (octant_origin/token_origin)."""
    for g in (2, 4, 6):
        ids = torch.arange(g**3)
        half = g * 16 // 2
        origin = token_origin(ids, g)  # (L, 3) voxels in an S^3 volume
        expected = octant_origin(token_octants(g), half)
        assert torch.equal((origin // half) * half, expected)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_levels_cut_the_right_regions(preset):
    """Voxel values encode coordinates, so every level can be checked against where it came from."""
    mc, cfg = convvit_preset(preset), MiMConfig()
    b, s, g, p = 2, mc.input_size, mc.grid, mc.patch_size
    crop = _coordinate_crop(b, mc.crop_size)
    levels = build_levels(crop, mc, cfg, torch.Generator().manual_seed(11))
    l1, l2, l3 = levels.volumes
    h1, h2, _ = levels.hidden
    assert l1.dtype == l2.dtype == l3.dtype == torch.float64

    # level 1: trilinear x1/2 with align_corners=False == 2x2x2 average pooling; for a
    # linear ramp that is the value at the cell centre (2i + 0.5)
    torch.testing.assert_close(l1, F.avg_pool3d(crop, 2), rtol=0, atol=1e-6)
    c = torch.arange(s, dtype=torch.float64) * 2 + 0.5
    for i in range(b):
        expected = _coords(c[:, None, None], c[None, :, None], c[None, None, :], b=i)
        torch.testing.assert_close(l1[i, 0], expected, rtol=0, atol=1e-6)

    # level 2: volume i*4+j is, voxel for voxel, octant octants[i, j] of crop i, hidden at level 1
    oct_of_token = token_octants(g)
    for i in range(b):
        for j in range(4):
            o = int(levels.octants[i, j])
            od, oh, ow = octant_origin(torch.tensor(o), s).tolist()
            assert torch.equal(l2[i * 4 + j, 0], crop[i, 0, od:od + s, oh:oh + s, ow:ow + s])
            assert h1[i, oct_of_token == o].all()

    # level 3: volume v*n3+k is the trilinear x(S/16) upsampling of the 16^3 block of level-2
    # token blocks[v, k] (cut here from the crop itself), and that token is hidden at level 2
    n3, f = cfg.level3_blocks, s // p
    src = ((torch.arange(s, dtype=torch.float64) + 0.5) / f - 0.5).clamp(0, p - 1)  # align_corners=False
    for v in range(4 * b):
        i, j = divmod(v, 4)
        od, oh, ow = octant_origin(levels.octants[i, j], s).tolist()
        for k in range(n3):
            t = int(levels.blocks[v, k])
            assert h2[v, t]
            td, th, tw = token_origin(torch.tensor(t), g, p).tolist()
            d0, h0, w0 = od + td, oh + th, ow + tw
            block = crop[i : i + 1, :, d0:d0 + p, h0:h0 + p, w0:w0 + p]
            up = F.interpolate(block, scale_factor=f, mode="trilinear", align_corners=False)
            assert torch.equal(l3[v * n3 + k], up[0])
            # by hand: trilinear interpolation of a linear ramp is the ramp at the clamped source coordinate
            expected = _coords(d0 + src[:, None, None], h0 + src[None, :, None], w0 + src[None, None, :], b=i)
            torch.testing.assert_close(l3[v * n3 + k, 0], expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- losses


def test_masked_mse_ignores_visible_tokens():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 8, 10, generator=gen), torch.randn(3, 8, 10, generator=gen)
    hidden = random_hidden(3, 8, 0.5, gen)
    base = masked_mse(pred, target, hidden)
    # by hand: mean over hidden tokens of each token's mean squared error
    per_token = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(base, per_token[hidden].mean())

    changed = pred.clone()
    changed[~hidden] += 100.0
    assert torch.equal(masked_mse(changed, target, hidden), base)
    changed = pred.clone()
    changed[tuple(hidden.nonzero()[0].tolist())] += 1.0  # one hidden token
    assert masked_mse(changed, target, hidden) != base


def test_norm_pix_target_by_hand():
    rng = np.random.default_rng(0)
    t = rng.normal(3.0, 2.0, size=(2, 5, 64)).astype(np.float32)
    t[1, 2] = 7.0  # a constant token: zero variance, target 0
    mean = t.astype(np.float64).mean(-1, keepdims=True)
    var = t.astype(np.float64).var(-1, ddof=1, keepdims=True)  # unbiased, as MAE
    expected = (t - mean) / np.sqrt(var + 1e-6)
    got = norm_pix_target(torch.from_numpy(t), eps=1e-6).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.all(got[1, 2] == 0)


def test_alignment_loss_by_hand():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    got = alignment_loss(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    np.testing.assert_allclose(float(got), np.mean(2 - 2 * cos), rtol=1e-5)
    same = torch.from_numpy(a).float()
    assert abs(float(alignment_loss(same, 3 * same))) < 1e-6  # scale-invariant, 0 when aligned


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MiMPretrainModel(convvit_preset("tiny"))


@pytest.fixture(scope="module")
def tiny_levels():
    mc = convvit_preset("tiny")
    gen = torch.Generator().manual_seed(7)
    return build_levels(torch.rand(2, 1, mc.crop_size, mc.crop_size, mc.crop_size, generator=gen), mc, MiMConfig(), gen)


def test_reconstruction_gradient_only_on_hidden_tokens(tiny_model, tiny_levels):
    """d(l1 + l2 + l3)/d(prediction) is exactly zero on visible tokens, non-zero on hidden ones."""
    preds = []

    def keep(_module, _inputs, output):
        output.retain_grad()
        preds.append(output)

    handle = tiny_model.decoder.pred.register_forward_hook(keep)
    try:
        out = tiny_model(None, levels=tiny_levels)
    finally:
        handle.remove()
    assert len(preds) == 3  # one decoder pass per level, in level order
    tiny_model.zero_grad()
    (out["l1"] + out["l2"] + out["l3"]).backward()
    for pred, hidden in zip(preds, tiny_levels.hidden):
        per_token = pred.grad.abs().sum(-1)  # (N, L)
        assert torch.all(per_token[~hidden] == 0)
        assert torch.all(per_token[hidden] > 0)
    tiny_model.zero_grad()


def test_alignment_stops_gradient_into_parents(tiny_model, tiny_levels):
    mc = convvit_preset("tiny")
    b, n, d = 2, mc.grid**3, mc.decoder_dim
    gen = torch.Generator().manual_seed(2)

    def feats():
        return [torch.randn(m * b, n, d, generator=gen, requires_grad=True) for m in (1, 4, 16)]

    f1, f2, f3 = fs = feats()
    terms = tiny_model.alignment(fs, tiny_levels)
    (terms["a12"] + terms["a23"]).backward()
    assert f1.grad is None or torch.all(f1.grad == 0)  # level 1 is only ever a parent
    assert f2.grad is not None and f2.grad.abs().sum() > 0  # child of a12
    assert f3.grad is not None and f3.grad.abs().sum() > 0

    f1, f2, f3 = fs = feats()
    tiny_model.alignment(fs, tiny_levels)["a23"].backward()
    assert f2.grad is None or torch.all(f2.grad == 0)  # parent of a23: stop-gradient
    assert f3.grad.abs().sum() > 0

    # the values: parents are the mean of the octant's level-1 tokens / the level-2 token itself
    with torch.no_grad():
        oct_of_token = token_octants(mc.grid)
        child12, parent12, child23, parent23 = [], [], [], []
        for v in range(4 * b):
            i, j = divmod(v, 4)
            parent12.append(f1[i, oct_of_token == tiny_levels.octants[i, j]].mean(0))
            child12.append(f2[v].mean(0))
            for k in range(4):
                parent23.append(f2[v, tiny_levels.blocks[v, k]])
                child23.append(f3[v * 4 + k].mean(0))
        m = tiny_model
        e12 = alignment_loss(m.align12_child(torch.stack(child12)), m.align12_parent(torch.stack(parent12)))
        e23 = alignment_loss(m.align23_child(torch.stack(child23)), m.align23_parent(torch.stack(parent23)))
        got = m.alignment([f1, f2, f3], tiny_levels)
        g12, g23 = got["a12"], got["a23"]
    torch.testing.assert_close(g12, e12)
    torch.testing.assert_close(g23, e23)
    tiny_model.zero_grad()


def test_full_model_forward_backward(tiny_model):
    mc = convvit_preset("tiny")
    gen = torch.Generator().manual_seed(5)
    tiny_model.zero_grad()
    out = tiny_model(torch.rand(2, 1, mc.crop_size, mc.crop_size, mc.crop_size, generator=gen), gen)
    monitors = {"cos12_match", "cos12_mismatch", "cos23_match", "cos23_mismatch"}
    assert set(out) == {"loss", "l1", "l2", "l3", "a12", "a23"} | monitors
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    assert not any(out[k].requires_grad for k in monitors)  # logged, never trained
    w = tiny_model.cfg.loss_weights
    torch.testing.assert_close(out["loss"], sum(w[k] * out[k] for k in ("l1", "l2", "l3", "a12", "a23")))
    out["loss"].backward()
    no_grad = [name for name, p in tiny_model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())
    tiny_model.zero_grad()


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("channels_last", [True, False])
def test_depthwise_fast_backward_matches_autograd(channels_last):
    # Tolerance: rtol 1e-4 and atol 1e-5 x max|reference| — the fast backward sums the same
    # products in another order (float32 rounding), nothing more.
    gen = torch.Generator().manual_seed(0)
    conv = DepthwiseConv3d(6, 5)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    x0 = torch.randn(2, 6, 7, 9, 6, generator=gen)
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last_3d)
    grad_out = torch.randn(2, 6, 7, 9, 6, generator=gen)

    x = x0.clone().requires_grad_(True)
    y = conv(x)
    assert "_DepthwiseConv3d" in type(y.grad_fn).__name__  # the fast path is the one under test
    y.backward(grad_out)
    got = (x.grad, conv.weight.grad.clone(), conv.bias.grad.clone())

    xr = x0.clone().requires_grad_(True)
    w = conv.weight.detach().clone().requires_grad_(True)
    bias = conv.bias.detach().clone().requires_grad_(True)
    yr = F.conv3d(xr, w, bias, padding=2, groups=6)
    yr.backward(grad_out)
    torch.testing.assert_close(y.detach(), yr.detach(), rtol=1e-4, atol=1e-5 * float(yr.detach().abs().max()))
    for g, r in zip(got, (xr.grad, w.grad, bias.grad)):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))
    with torch.no_grad():  # inference path (plain conv3d) agrees too
        torch.testing.assert_close(conv(x0), yr.detach(), rtol=1e-4, atol=1e-5 * float(yr.detach().abs().max()))


def test_depthwise_backward_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 3, 4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _DepthwiseConv3d.apply(x, w, b, 1), (x, w, b), fast_mode=True)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_strided_conv_equals_conv3d(k):
    gen = torch.Generator().manual_seed(k)
    conv = StridedConv3d(5, 7, k)
    x = torch.randn(2, 2 * k, 3 * k, k, 5, generator=gen)  # channels-last, non-cubic
    ref = F.conv3d(x.permute(0, 4, 1, 2, 3), conv.weight, conv.bias, stride=k).permute(0, 2, 3, 4, 1)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
        s2d = space_to_depth(x, k)
        assert s2d.shape == (2, 2, 3, 1, 5 * k**3)
        torch.testing.assert_close(s2d @ conv.weight.flatten(1).T + conv.bias, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- encoder


def test_encoder_sees_visible_tokens_only():
    torch.manual_seed(0)
    mc = convvit_preset("tiny")
    enc = ConvViT3D(mc).eval()
    n = mc.grid**3
    gen = torch.Generator().manual_seed(9)
    hidden = random_hidden(3, n, 0.6, gen)
    ids_keep, _ = split_by_mask(hidden)
    k = ids_keep.shape[1]
    assert k == int((~hidden[0]).sum()) == n - int(hidden[0].sum())
    lengths = []
    handle = enc.blocks[0].register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    try:
        x = torch.rand(3, 1, mc.input_size, mc.input_size, mc.input_size, generator=gen)
        with torch.no_grad():
            out = enc(x, ids_keep)
            full = enc(x)
    finally:
        handle.remove()
    assert lengths == [k, n]
    assert out.shape == (3, k, mc.dims[3]) and full.shape == (3, n, mc.dims[3])

    # the visible-token path equals the dense masked computation on the whole grid
    with torch.no_grad():
        torch.testing.assert_close(out, enc(x, ids_keep, dense=True), rtol=1e-5, atol=1e-5)

        # the mask before the depthwise convs stops hidden voxels from leaking into visible tokens:
        # changing the image inside hidden tokens does not change the visible tokens' output
        p = mc.patch_size
        vox_hidden = hidden.reshape(3, mc.grid, mc.grid, mc.grid)
        for axis in (1, 2, 3):
            vox_hidden = vox_hidden.repeat_interleave(p, dim=axis)
        x2 = torch.where(vox_hidden[:, None], torch.rand(x.shape, generator=gen) * 10, x)
        assert not torch.equal(x2, x)
        torch.testing.assert_close(enc(x2, ids_keep), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc(x2, ids_keep, dense=True), out, rtol=1e-5, atol=1e-5)
        # ... while changing a visible token's voxels does change the output
        x3 = torch.where(vox_hidden[:, None], x, torch.rand(x.shape, generator=gen))
        assert not torch.allclose(enc(x3, ids_keep), out, rtol=1e-3, atol=1e-3)


def test_model_reconstruct_passes_visible_tokens(tiny_model, tiny_levels):
    lengths = []
    handle = tiny_model.encoder.blocks[0].register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            for vol, hid in zip(tiny_levels.volumes, tiny_levels.hidden):
                pred, feats = tiny_model.reconstruct(vol, hid)
                assert pred.shape == patchify(vol).shape and feats.shape[:2] == hid.shape
    finally:
        handle.remove()
    n = convvit_preset("tiny").grid ** 3
    assert lengths == [n - int(h[0].sum()) for h in tiny_levels.hidden]


@pytest.mark.parametrize("preset,chunk", [("tiny", 64), ("small", 64), ("small", 7)])
def test_visible_token_path_gradients_equal_dense_masked_path(preset, chunk, monkeypatch):
    """The visible-token conv stages (with their own depthwise backward) give the same output
    and the same parameter gradients as the dense masked computation (float64, 1e-10)."""
    from mimcore.methods.masking import random_hidden, split_by_mask
    from mimcore.models.convvit import ConvViT3D
    from mimcore.models.convvit import preset as convvit_preset

    import mimcore.models.depthwise as dwmod

    monkeypatch.setattr(dwmod, "TOKEN_CHUNK", chunk)  # 7: the weight gradient summed over several chunks
    cfg = convvit_preset(preset)
    torch.manual_seed(0)
    enc = ConvViT3D(cfg).double()
    x = torch.rand(2, 1, cfg.input_size, cfg.input_size, cfg.input_size, dtype=torch.float64)
    keep, _ = split_by_mask(random_hidden(2, cfg.grid**3, 0.6, torch.Generator().manual_seed(1)))
    weights = torch.randn(2, keep.shape[1], cfg.dims[3], dtype=torch.float64)
    grads = []
    for dense in (False, True):
        enc.zero_grad()
        out = enc(x, keep, dense=dense)
        (out * weights).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}))
    (out_v, g_v), (out_d, g_d) = grads
    torch.testing.assert_close(out_v, out_d, rtol=0, atol=1e-10)
    assert g_v.keys() == g_d.keys()
    for name in g_v:
        torch.testing.assert_close(g_v[name], g_d[name], rtol=1e-9, atol=1e-10, msg=name)
    assert float(g_v["conv_stages.0.0.dw.weight"].abs().sum()) > 0


def test_masked_l1_matches_hand_computation():
    """masked_l1 (MAE/SimMIM's loss): mean |pred - target| per hidden token, averaged over hidden tokens."""
    from mimcore.methods.losses import masked_l1

    rng = np.random.default_rng(3)
    pred, target = rng.standard_normal((2, 5, 7)), rng.standard_normal((2, 5, 7))
    hidden = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=bool)
    expected = np.abs(pred - target).mean(-1)[hidden].mean()
    got = masked_l1(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(hidden))
    assert float(got) == pytest.approx(expected, rel=1e-6)
