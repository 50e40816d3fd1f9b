"""ConvViT3D: the hybrid conv + ViT encoder of MiM (ConvMAE style), METHODS.md section 1.

Stages for a (B, 1, S, S, S) input (S = 96 for ``base``):

=====  ===================================================  ======================
stage  operation                                            output
=====  ===================================================  ======================
1      patch embed k2 s2 (1 -> C1), 2 conv blocks           (B, S/2, S/2, S/2, C1)
2      patch embed k2 s2 (C1 -> C2), 2 conv blocks          (B, S/4, ..., C2)
3      patch embed k2 s2 (C2 -> C3), 2 conv blocks          (B, S/8, ..., C3)
4      patch embed k2 s2 (C3 -> C4), Linear, + pos embed,   (B, L, C4), L = (S/16)^3
       visible tokens only, transformer blocks, + skips,
       LayerNorm
=====  ===================================================  ======================

Tokens are ordered in raster order over (d, h, w) of the (S/16)^3 grid, the same order
as :func:`mimcore.methods.masking.patchify`.

Masked forward, visible tokens only. In a conv block the hidden voxels are zeroed right
before the depthwise conv and every other operation is per voxel or within a token, so
the features of visible tokens never depend on hidden regions. The masked path
therefore keeps the conv stages in a *visible-token layout* (B*K, t, t, t, C), t = the
token's edge at that stage, and runs every per-voxel operation on visible voxels only;
only the depthwise conv sees the full grid (hidden voxels zero). The result equals the
dense masked computation on the visible tokens (tests compare at 1e-5).

LayerNorm epsilons are the published ones (1e-5 on the conv side, 1e-6 on the transformer
side) and the fixed position embedding is the published sin-cos layout
(:mod:`~mimcore.models.posembed`). The published pre-training initialisation is
:meth:`ConvViT3D.init_as_published`, which the MiM pre-training model calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from mimcore.errors import MimError
from mimcore.models.depthwise import depthwise_on_tokens, grid_to_tokens
from mimcore.models.layers import (
    VIT_LN_EPS,
    ConvBlock,
    PatchEmbed,
    StridedConv3d,
    TransformerBlock,
    init_linears_published,
    space_to_depth,
)
from mimcore.models.posembed import sincos_3d


# --------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class ModelConfig:
    """Backbone + pre-training decoder sizes. ``input_size`` is the network input edge (voxels)."""

    input_size: int = 96
    dims: tuple[int, int, int, int] = (48, 96, 192, 384)
    conv_depths: tuple[int, int, int] = (2, 2, 2)
    vit_depth: int = 11
    vit_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 576
    decoder_depth: int = 8
    decoder_heads: int = 16
    patch_size: int = 16

    @property
    def grid(self) -> int:
        """Tokens along each axis of the network input (6 for 96^3)."""
        return self.input_size // self.patch_size

    @property
    def crop_size(self) -> int:
        """Edge of the full-resolution pre-training crop (192 for ``base``)."""
        return 2 * self.input_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        for key in ("dims", "conv_depths"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


#: ConvViT3D sizes. All keep the published structure: a token is a 16^3 block (four stride-2
#: stages), the pre-training crop is twice the network input, and MiM's level-1 octants are
#: (grid/2)^3 tokens.
PRESETS: dict[str, ModelConfig] = {
    # The published size: 34.0 M encoder values, 71.3 M with the decoder.
    "base": ModelConfig(),
    # CPU-friendly: 64^3 input (4^3 tokens), octants of 2^3 tokens, level-3 blocks upsampled x4.
    "small": ModelConfig(
        input_size=64, dims=(24, 48, 96, 192), vit_depth=6, vit_heads=6,
        decoder_dim=192, decoder_depth=3, decoder_heads=6,
    ),
    # For tests: 32^3 input (2^3 tokens), octants of one token, level-3 blocks upsampled x2.
    "tiny": ModelConfig(
        input_size=32, dims=(6, 12, 24, 48), vit_depth=2, vit_heads=2,
        decoder_dim=48, decoder_depth=1, decoder_heads=2,
    ),
}


def preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a size name (``base``, ``small``, ``tiny``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MimError(f"unknown ConvViT3D size {name!r}; choose one of: {', '.join(PRESETS)}") from None


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pick tokens: x (B, L, C), ids (B, K) -> (B, K, C)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def upsample_token_mask(visible: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """visible (B, L) with L = grid^3 -> (B, grid*f, grid*f, grid*f, 1) of 0/1, nearest upsampling."""
    m = visible.reshape(-1, grid, grid, grid)
    for axis in (1, 2, 3):
        m = m.repeat_interleave(factor, dim=axis)
    return m.unsqueeze(-1)


def _checkpointed(block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


class ConvViT3D(nn.Module):
    """The MiM encoder. ``forward(x, ids_keep)``: x (B, 1, S, S, S) -> tokens (B, K, C4).

    With ``ids_keep`` (B, K) only those tokens enter the transformer (MAE style) and the
    conv stages multiply by the visible mask; without it all L tokens are returned.
    """

    def __init__(self, cfg: ModelConfig, drop_path: float = 0.0):
        super().__init__()
        self.cfg = cfg
        c1, c2, c3, c4 = cfg.dims
        chans = (1, c1, c2, c3)
        self.embeds = nn.ModuleList(PatchEmbed(chans[i], cfg.dims[i]) for i in range(4))
        self.conv_stages = nn.ModuleList(
            nn.ModuleList(ConvBlock(cfg.dims[i], cfg.mlp_ratio) for _ in range(cfg.conv_depths[i])) for i in range(3)
        )
        self.token_proj = nn.Linear(c4, c4)
        # fixed 3D sin-cos position embedding (1, L, C4); a buffer so checkpoints carry it
        self.register_buffer("pos_embed", sincos_3d(cfg.grid, c4))
        rates = torch.linspace(0, drop_path, cfg.vit_depth).tolist()
        self.blocks = nn.ModuleList(TransformerBlock(c4, cfg.vit_heads, cfg.mlp_ratio, r) for r in rates)
        # skip paths: stage 1-3 outputs to the token grid, kernel = stride = 8, 4, 2
        self.skips = nn.ModuleList(StridedConv3d(cfg.dims[i], c4, 2 ** (3 - i)) for i in range(3))
        self.norm = nn.LayerNorm(c4, eps=VIT_LN_EPS)

    def init_as_published(self) -> None:
        """The published pre-training initialisation (its ``initialize_weights``): xavier-uniform
        weights and zero biases on the ``nn.Linear`` layers outside the conv blocks
        (:func:`~mimcore.models.layers.init_linears_published`), and xavier-uniform on the third
        patch embedding's weight viewed as (out, in * 8) - the published code does that for
        ``patch_embed3`` only, a leftover of 2D ConvMAE where it was the last one. Everything
        else keeps PyTorch's defaults, as there. A segmentation encoder is not re-initialised:
        the published fine-tuning network initialises its own way."""
        init_linears_published(self)
        w = self.embeds[2].proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))

    def conv_features(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Stages 1-3: x (B, 1, S, S, S) -> [(B, S/2^(i+1), ..., C_i+1) channels-last] for i = 0, 1, 2."""
        g = self.cfg.grid
        h = x.permute(0, 2, 3, 4, 1)
        feats = []
        for i in range(3):
            h = self.embeds[i](h)
            mask = None if visible is None else upsample_token_mask(visible, g, 2 ** (3 - i)).to(h.dtype)
            for blk in self.conv_stages[i]:
                h = blk(h, mask)
            feats.append(h)
        return feats

    def pyramid(self, x: torch.Tensor, checkpoint_blocks: bool = False) -> list[torch.Tensor]:
        """Unmasked features for segmentation, all channels-last:
        x (B, 1, S, S, S) -> [(B, S/2, .., C1), (B, S/4, .., C2), (B, S/8, .., C3), (B, S/16, .., C4)].

        The last one is the token output (transformer + skips + LayerNorm) on its grid.
        ``checkpoint_blocks`` recomputes each block in the backward pass (saves memory).
        """
        b, g = x.shape[0], self.cfg.grid
        run = _checkpointed if checkpoint_blocks else (lambda blk, *a: blk(*a))
        h = x.permute(0, 2, 3, 4, 1)
        feats = []
        for i in range(3):
            h = self.embeds[i](h)
            for blk in self.conv_stages[i]:
                h = run(blk, h)
            feats.append(h)
        tokens = self.token_proj(self.embeds[3](h).reshape(b, g**3, -1)) + self.pos_embed
        skip = sum(self.skips[i](feats[i]).reshape(b, g**3, -1) for i in range(3))
        for blk in self.blocks:
            tokens = run(blk, tokens)
        feats.append(self.norm(tokens + skip).reshape(b, g, g, g, -1))
        return feats

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, dense: bool = False) -> torch.Tensor:
        """x (B, 1, S, S, S), ids_keep (B, K) or None -> (B, K or L, C4).

        ``dense=True`` computes the masked conv stages on the whole grid (the reference
        the visible-token path is tested against).
        """
        b = x.shape[0]
        n_tokens = self.cfg.grid**3
        if ids_keep is not None and not dense:
            tokens, skip = self._visible_stages(x, ids_keep)
        else:
            visible = None
            if ids_keep is not None:
                visible = torch.zeros(b, n_tokens, device=x.device, dtype=x.dtype).scatter_(1, ids_keep, 1.0)
            feats = self.conv_features(x, visible)
            tokens = self.token_proj(self.embeds[3](feats[2]).reshape(b, n_tokens, -1)) + self.pos_embed
            skip = sum(self.skips[i](feats[i]).reshape(b, n_tokens, -1) for i in range(3))
            if ids_keep is not None:
                tokens, skip = gather_tokens(tokens, ids_keep), gather_tokens(skip, ids_keep)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens + skip)

    def _visible_stages(self, x: torch.Tensor, ids_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stages 1-4 embedding on visible tokens only: -> (tokens (B, K, C4) with pos, skip sum (B, K, C4))."""
        b, k = ids_keep.shape
        g = self.cfg.grid
        rows = (ids_keep + torch.arange(b, device=x.device)[:, None] * g**3).reshape(-1)  # (B*K,)
        h = grid_to_tokens(x.permute(0, 2, 3, 4, 1), rows, g)  # (B*K, 16, 16, 16, 1)

        def spatial(dw, y):  # y (B*K, t, t, t, C): depthwise conv of the zero-filled full grid
            return depthwise_on_tokens(dw, y, rows, b, g)

        skip = 0
        for i in range(3):
            h = self.embeds[i](h)
            for blk in self.conv_stages[i]:
                h = blk(h, spatial=spatial)
            conv = self.skips[i]  # kernel = stride = the token's edge: one output per token
            skip = skip + F.linear(space_to_depth(h, conv.k).reshape(b, k, -1), conv.weight.flatten(1), conv.bias)
        tokens = self.token_proj(self.embeds[3](h).reshape(b, k, -1))
        return tokens + gather_tokens(self.pos_embed.expand(b, -1, -1), ids_keep), skip

