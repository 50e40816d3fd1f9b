"""The plain ViT backbone of MAE and SimMIM in 3D (METHODS.md section 2), built on MONAI's ``ViT``.

``base`` is ViT-B/16 at 96^3 as published (Chen et al., WACV 2023): 16^3 patches (216
tokens), width 768, 12 blocks, 12 heads, MLP 3072, learned position embedding, no class
token, no qkv bias (the published code used MONAI's ``ViT`` with these settings).
``small`` and ``tiny`` keep the structure at CPU sizes, scaled like the ConvViT3D presets
(:data:`mimcore.models.convvit.PRESETS`): input 64^3 / 32^3 (4^3 / 2^3 tokens) and width 192 / 48.
Every preset keeps 12 blocks because MONAI's ``UNETR`` (the fine-tuning network of ViT
checkpoints) taps blocks 3, 6, 9 and 12 of a 12-block ViT.

:class:`ViTEncoder` *is* MONAI's ``ViT`` (same parameter names, so a pre-trained
``encoder.*`` maps onto ``UNETR.vit.*`` by renaming the prefix) with the two masked
forward passes the methods need. Token order is raster order over (d, h, w) of the
(S/16)^3 grid, the order of :func:`mimcore.methods.masking.patchify`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import ViT
from torch import nn

from mimcore.errors import MimError


@dataclass(frozen=True)
class ViTConfig:
    """ViT sizes. ``input_size`` is the network input edge in voxels (also the pre-training crop)."""

    input_size: int = 96
    patch_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    proj_type: str = "conv"
    qkv_bias: bool = False

    @property
    def grid(self) -> int:
        """Tokens along each axis (6 for 96^3)."""
        return self.input_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        return cls(**d)


#: ViT sizes (every one keeps the 12 blocks UNETR taps).
PRESETS: dict[str, ViTConfig] = {
    "base": ViTConfig(),  # ViT-B/16 on 16^3 patches: 88.4 M values
    "small": ViTConfig(input_size=64, hidden_size=192, mlp_dim=768, num_heads=6),
    "tiny": ViTConfig(input_size=32, hidden_size=48, mlp_dim=192, num_heads=2),
}


def preset(name: str) -> ViTConfig:
    """The :class:`ViTConfig` of a size name (``base``, ``small``, ``tiny``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MimError(f"unknown ViT size {name!r}; choose one of: {', '.join(PRESETS)}") from None


def use_sdpa(module: nn.Module) -> nn.Module:
    """Switch every MONAI self-attention block in ``module`` to ``F.scaled_dot_product_attention``
    (MONAI's ``ViT``/``UNETR`` do not pass the option through). Same parameters and result,
    less memory and time. Blocks with attention dropout keep MONAI's path (the fused call
    would apply dropout in eval mode too). Returns ``module``."""
    for m in module.modules():
        if isinstance(m, SABlock) and not m.save_attn and m.rel_positional_embedding is None and m.dropout_rate == 0:
            m.use_flash_attention = True
    return module


class ViTEncoder(ViT):
    """MONAI ``ViT`` (1 input channel, no class token) with masked forward passes.

    - ``forward(x)``: x (B, 1, S, S, S) -> (tokens (B, L, C) after the final LayerNorm,
      hidden states of each block) - MONAI's own forward;
    - :meth:`encode_visible` (MAE): only the visible tokens enter the blocks;
    - :meth:`encode_masked` (SimMIM): hidden tokens replaced by a mask token, all enter.
    """

    def __init__(self, cfg: ViTConfig):
        if cfg.input_size % cfg.patch_size:
            raise MimError(f"the ViT input {cfg.input_size} is not a multiple of its patch {cfg.patch_size}")
        super().__init__(in_channels=1, img_size=cfg.input_size, patch_size=cfg.patch_size,
                         hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim, num_layers=cfg.num_layers,
                         num_heads=cfg.num_heads, proj_type=cfg.proj_type, pos_embed_type="learnable",
                         classification=False, qkv_bias=cfg.qkv_bias)
        self.cfg = cfg
        use_sdpa(self)

    @property
    def dim(self) -> int:
        """Width of the output tokens."""
        return self.cfg.hidden_size

    @property
    def mask_token_dim(self) -> int:
        """Width of SimMIM's mask token (it replaces patch embeddings)."""
        return self.cfg.hidden_size

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embeddings without position: x (B, 1, S, S, S) -> (B, L, C)."""
        t = self.patch_embedding.patch_embeddings(x)
        return t.flatten(2).transpose(1, 2) if self.patch_embedding.proj_type == "conv" else t

    def _blocks(self, t: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def encode_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S, S), ids_keep (B, K) -> (B, K, C): position embeddings are added to
        all tokens, then only the kept ones go through the blocks and the final norm."""
        t = self.patch_embedding(x)  # (B, L, C), position included
        t = torch.gather(t, 1, ids_keep[..., None].expand(-1, -1, t.shape[-1]))
        return self._blocks(t)

    def encode_masked(self, x: torch.Tensor, hidden: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S, S), hidden (B, L) bool, mask_token (1, 1, C) -> (B, L, C).

        Hidden patch embeddings are replaced by ``mask_token`` before the position embedding
        is added (as the published SimMIM code does), then all L tokens go through the blocks."""
        t = self.patch_tokens(x)
        t = torch.where(hidden[..., None], mask_token.to(t.dtype), t) + self.patch_embedding.position_embeddings
        return self._blocks(self.patch_embedding.dropout(t))
