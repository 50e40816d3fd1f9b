"""The MAE-style pre-training decoder of MiM (METHODS.md, "Decoder").

Linear C4 -> Cd; a learnable mask token fills the hidden positions; fixed sin-cos
position embedding; transformer blocks; LayerNorm; Linear Cd -> 16^3 voxels per token.
Initialised as published: xavier-uniform ``nn.Linear`` weights, zero biases, mask token
N(0, 0.02); LayerNorm eps 1e-6.
"""

from __future__ import annotations

import torch
from torch import nn

from mimcore.models.convvit import ModelConfig, gather_tokens
from mimcore.models.layers import VIT_LN_EPS, TransformerBlock, init_linears_published
from mimcore.models.posembed import sincos_3d


class MaskedDecoder(nn.Module):
    """``forward(tokens, ids_restore)``: tokens (B, K, C4) visible encoder tokens in
    ``ids_keep`` order, ids_restore (B, L) -> (pred (B, L, p^3), features (B, L, Cd)).

    ``features`` are the decoder's final features after its LayerNorm, used by the
    cross-level alignment loss.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.decoder_dim
        self.embed = nn.Linear(cfg.dims[3], dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_3d(cfg.grid, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(dim, eps=VIT_LN_EPS)
        self.pred = nn.Linear(dim, cfg.patch_size**3)
        nn.init.normal_(self.mask_token, std=0.02)
        init_linears_published(self)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens)
        b, k, _ = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - k, -1)], dim=1)
        x = gather_tokens(x, ids_restore) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        feats = self.norm(x)
        return self.pred(feats), feats
