"""MiM's published numerics (METHODS.md section 1), each against an independent hand
computation: the sin-cos position embedding layout of the published
``get_3d_sincos_pos_embed``, LayerNorm epsilons, the initialisation of linear layers,
and the norm-pix reconstruction target. Also: checkpoints saved with the earlier
(MONAI) embedding layout keep theirs when loaded.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mimcore.methods.mim import MiMPretrainModel, build_levels
from mimcore.models.convvit import ConvViT3D
from mimcore.models.decoder import MaskedDecoder
from mimcore.models.layers import ConvBlock
from mimcore.models.posembed import sincos_3d
from mimcore.methods.mim import MiMConfig
from mimcore.models.convvit import preset as convvit_preset

# --------------------------------------------------------------------------- position embedding


def _published_layout(grid: int, dim: int) -> np.ndarray:
    """(grid^3, dim), written out plainly: tokens in raster order over (d, h, w); per token the
    columns [sin(d w), cos(d w), sin(h w), cos(h w), sin(w_pos w), cos(w_pos w)], w_i =
    10000^(-i / (dim/6)) - the order of the published ``get_3d_sincos_pos_embed``, whose grid
    axis 0 is the slowest token axis and whose first column block encodes it."""
    k = dim // 6
    omega = [10000.0 ** (-i / k) for i in range(k)]
    rows = []
    for d in range(grid):
        for h in range(grid):
            for w in range(grid):
                row = []
                for pos in (d, h, w):
                    row += [math.sin(pos * o) for o in omega] + [math.cos(pos * o) for o in omega]
                rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("grid,dim", [(2, 12), (3, 24), (6, 384)])
def test_sincos_matches_the_published_layout(grid, dim):
    ours = sincos_3d(grid, dim)
    assert ours.shape == (1, grid**3, dim) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours[0].numpy(), _published_layout(grid, dim), rtol=0, atol=1e-6)


def test_sincos_2x2x2_by_hand():
    """Token (d, h, w) = (1, 0, 0) is raster index 4; dim 12 gives frequencies 1 and 1/100. The
    first column block encodes d, the slowest axis (MONAI's builder puts h's block first)."""
    pe = sincos_3d(2, 12)[0]
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    expected = {
        4: [s1, s2, c1, c2, 0, 0, 1, 1, 0, 0, 1, 1],  # (1, 0, 0)
        2: [0, 0, 1, 1, s1, s2, c1, c2, 0, 0, 1, 1],  # (0, 1, 0)
        1: [0, 0, 1, 1, 0, 0, 1, 1, s1, s2, c1, c2],  # (0, 0, 1)
    }
    for token, row in expected.items():
        np.testing.assert_allclose(pe[token].numpy(), row, atol=1e-7)

    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        monai = build_sincos_position_embedding(2, 12, spatial_dims=3).data[0]
    swapped = torch.cat([monai[:, 4:8], monai[:, 0:4], monai[:, 8:]], dim=1)  # MONAI: [h | d | w]
    torch.testing.assert_close(pe, swapped)
    assert not torch.allclose(pe, monai)


def test_models_use_the_published_embedding():
    mc = convvit_preset("tiny")
    torch.testing.assert_close(ConvViT3D(mc).pos_embed, sincos_3d(mc.grid, mc.dims[3]))
    torch.testing.assert_close(MaskedDecoder(mc).pos_embed, sincos_3d(mc.grid, mc.decoder_dim))


def test_checkpoints_keep_their_stored_embedding(tmp_path):
    """A checkpoint written with the earlier column order keeps it (its weights were trained with it)."""
    from mimcore.methods.registry import load_pretrain_checkpoint as load_pretrained
    from mimcore.models.checkpoint import save_checkpoint

    mc = convvit_preset("tiny")
    torch.manual_seed(0)
    old = MiMPretrainModel(mc)
    earlier = torch.randn_like(old.encoder.pos_embed)  # stands for the MONAI-ordered embedding
    old.encoder.pos_embed.copy_(earlier)
    meta = {"model": mc.to_dict(), "mim": MiMConfig().to_dict(), "preset": "tiny"}
    ckpt = save_checkpoint(tmp_path / "run", 1, old, meta)
    loaded, _ = load_pretrained(ckpt)
    assert torch.equal(loaded.encoder.pos_embed, earlier)


# --------------------------------------------------------------------------- LayerNorm eps


def test_layernorm_eps():
    """1e-5 in the conv blocks and patch embeddings, 1e-6 in the transformer blocks and final norms."""
    mc = convvit_preset("tiny")
    enc, dec = ConvViT3D(mc), MaskedDecoder(mc)
    conv_side, vit_side = [], []
    for name, m in enc.named_modules():
        if isinstance(m, nn.LayerNorm):
            (conv_side if name.startswith(("embeds.", "conv_stages.")) else vit_side).append((name, m.eps))
    assert len(conv_side) == 4 + 2 * sum(mc.conv_depths)  # 4 patch embeddings, 2 per conv block
    assert len(vit_side) == 2 * mc.vit_depth + 1  # 2 per transformer block + the final norm
    assert all(eps == 1e-5 for _, eps in conv_side), conv_side
    assert all(eps == 1e-6 for _, eps in vit_side), vit_side
    dec_eps = [m.eps for m in dec.modules() if isinstance(m, nn.LayerNorm)]
    assert len(dec_eps) == 2 * mc.decoder_depth + 1 and all(eps == 1e-6 for eps in dec_eps)


# --------------------------------------------------------------------------- initialisation


def _uniform_bound_ok(w: torch.Tensor, bound: float) -> bool:
    """Values within the bound, reaching near it, with the std of U(-bound, bound)."""
    a = w.detach().abs()
    std = float(w.detach().std())
    return float(a.max()) <= bound * (1 + 1e-6) and float(a.max()) > 0.8 * bound and \
        abs(std - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)


def test_linear_init_is_published():
    """Every nn.Linear of the pre-training model: xavier-uniform weight and zero bias - except
    the conv blocks' pointwise layers, 1x1x1 Conv3d in the published model and left at the conv
    default there, which is also nn.Linear's default: U(+-1/sqrt(fan_in)) for weight and bias.
    The third patch embedding's weight is xavier-uniform over (out, in * 8), as published."""
    torch.manual_seed(0)
    model = MiMPretrainModel(convvit_preset("small"))
    in_conv = {id(m) for blk in model.modules() if isinstance(blk, ConvBlock) for m in blk.modules()}
    n_xavier = n_conv = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        fan_out, fan_in = m.weight.shape
        if id(m) in in_conv:
            bound = 1 / math.sqrt(fan_in)
            assert _uniform_bound_ok(m.weight, bound), name
            b = m.bias.detach().abs()
            assert float(b.max()) <= bound and float(b.max()) > 0, name
            n_conv += 1
        else:
            assert _uniform_bound_ok(m.weight, math.sqrt(6 / (fan_in + fan_out))), name
            assert m.bias is None or torch.all(m.bias == 0), name
            n_xavier += 1
    assert n_conv == 4 * sum(convvit_preset("small").conv_depths)
    # token_proj; per transformer block qkv, proj, 2 MLP layers (encoder + decoder); decoder
    # embed and pred; 2 layers in each of the 4 alignment heads
    small = convvit_preset("small")
    assert n_xavier == 1 + 4 * (small.vit_depth + small.decoder_depth) + 2 + 8

    w = model.encoder.embeds[2].proj.weight.flatten(1)
    assert _uniform_bound_ok(w, math.sqrt(6 / (w.shape[0] + w.shape[1])))

    # this is the pre-training initialisation: an encoder built alone (a segmentation network's)
    # keeps PyTorch's defaults, the published fine-tuning network having its own
    enc = ConvViT3D(small)
    fan_in = enc.token_proj.weight.shape[1]
    assert _uniform_bound_ok(enc.token_proj.weight, 1 / math.sqrt(fan_in))
    assert bool(enc.token_proj.bias.detach().abs().max() > 0)


# --------------------------------------------------------------------------- reconstruction target


def test_reconstruction_target_is_norm_pix():
    """l1, l2, l3 equal the MSE on hidden tokens between the prediction and each 16^3 token's
    voxels normalised by the token's own mean and (unbiased) variance, eps 1e-6 - computed here
    token by token in float64 - and not the MSE against the raw voxels."""
    mc = convvit_preset("tiny")
    p, g = mc.patch_size, mc.grid
    torch.manual_seed(0)
    model = MiMPretrainModel(mc)
    gen = torch.Generator().manual_seed(3)
    crop = torch.rand(2, 1, mc.crop_size, mc.crop_size, mc.crop_size, generator=gen) * 3 + 1
    levels = build_levels(crop, mc, MiMConfig(), gen)
    preds = []
    handle = model.decoder.pred.register_forward_hook(lambda _m, _i, out: preds.append(out.detach()))
    try:
        with torch.no_grad():
            out = model(None, levels=levels)
    finally:
        handle.remove()
    assert len(preds) == 3
    for i, (vol, hid, pred) in enumerate(zip(levels.volumes, levels.hidden, preds), start=1):
        v, h, pr = vol.double().numpy(), hid.numpy(), pred.double().numpy()
        norm_terms, raw_terms = [], []
        for n in range(v.shape[0]):
            for t in range(g**3):
                if not h[n, t]:
                    continue
                td, th, tw = t // (g * g), (t // g) % g, t % g
                voxels = v[n, 0, td * p:(td + 1) * p, th * p:(th + 1) * p, tw * p:(tw + 1) * p].reshape(-1)
                target = (voxels - voxels.mean()) / math.sqrt(voxels.var(ddof=1) + 1e-6)
                norm_terms.append(np.mean((pr[n, t] - target) ** 2))
                raw_terms.append(np.mean((pr[n, t] - voxels) ** 2))
        got = float(out[f"l{i}"])
        assert got == pytest.approx(np.mean(norm_terms), rel=1e-5), i
        assert abs(got - np.mean(raw_terms)) > 0.5, i  # a raw-voxel target would be far off
