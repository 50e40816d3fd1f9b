"""The two backbones MAE and SimMIM run on, behind one interface, so that the method and the
backbone can be compared separately (issue 5):

- ``vit``: :class:`~mimcore.models.vit.ViTEncoder` (MONAI's ViT; ViT-B/16 for ``base``);
- ``convvit``: :class:`ConvViTEncoder`, MiM's hybrid ConvViT3D (METHODS.md section 1).

Both take (B, 1, S, S, S) volumes, cut them into 16^3 tokens in raster order and offer

- ``encode_visible(x, ids_keep) -> (B, K, dim)``: MAE, only visible tokens are encoded;
- ``encode_masked(x, hidden, mask_token) -> (B, L, dim)``: SimMIM, hidden tokens are replaced
  by a learnable mask token (width ``mask_token_dim``) and all tokens are encoded.

Both are plain subclasses of the backbone, so a pre-training model that holds one as
``encoder`` stores ``encoder.*`` tensors with the backbone's own names (what fine-tuning loads).
"""

from __future__ import annotations

import torch

from mimcore.errors import MimError
from mimcore.models import convvit, vit
from mimcore.models.convvit import ConvViT3D, ModelConfig, upsample_token_mask
from mimcore.models.vit import ViTConfig, ViTEncoder

BACKBONE_NAMES = ("vit", "convvit")


class ConvViTEncoder(ConvViT3D):
    """ConvViT3D with MAE's and SimMIM's masked passes (output width ``dims[3]``)."""

    @property
    def dim(self) -> int:
        return self.cfg.dims[3]

    @property
    def mask_token_dim(self) -> int:
        """SimMIM's mask token replaces the stage-1 patch embedding (width ``dims[0]``)."""
        return self.cfg.dims[0]

    def encode_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S, S), ids_keep (B, K) -> (B, K, C4): conv stages on visible tokens only,
        only the visible tokens enter the transformer (the path MiM uses)."""
        return self(x, ids_keep)

    def encode_masked(self, x: torch.Tensor, hidden: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S, S), hidden (B, L) bool, mask_token (1, 1, C1) -> (B, L, C4).

        SimMIM on a hierarchical backbone (as SimMIM does for Swin): the stage-1 patch
        embedding of every voxel of a hidden 16^3 token is replaced by the mask token, then
        the whole grid goes through every stage unmasked, and all L tokens through the
        transformer. Nothing of the hidden image regions reaches the network.
        """
        b, g = x.shape[0], self.cfg.grid
        h = self.embeds[0](x.permute(0, 2, 3, 4, 1))  # (B, S/2, S/2, S/2, C1)
        m = upsample_token_mask(hidden.to(h.dtype), g, 8)  # (B, S/2, S/2, S/2, 1), 1 on hidden voxels
        h = h * (1 - m) + mask_token.to(h.dtype) * m
        feats = []
        for i in range(3):
            if i > 0:
                h = self.embeds[i](h)
            for blk in self.conv_stages[i]:
                h = blk(h)
            feats.append(h)
        tokens = self.token_proj(self.embeds[3](h).reshape(b, g**3, -1)) + self.pos_embed
        skip = sum(self.skips[i](feats[i]).reshape(b, g**3, -1) for i in range(3))
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens + skip)


def backbone_config(backbone: str, preset: str) -> ViTConfig | ModelConfig:
    """The size of ``backbone`` at ``preset`` (``base``, ``small``, ``tiny``)."""
    if backbone == "vit":
        return vit.preset(preset)
    if backbone == "convvit":
        return convvit.preset(preset)
    raise MimError(f"unknown backbone {backbone!r} for MAE/SimMIM; choose one of: {', '.join(BACKBONE_NAMES)}")


def config_from_dict(backbone: str, d: dict) -> ViTConfig | ModelConfig:
    return ViTConfig.from_dict(d) if backbone == "vit" else ModelConfig.from_dict(d)


def build_encoder(cfg: ViTConfig | ModelConfig) -> ViTEncoder | ConvViTEncoder:
    """The encoder of a backbone size (the config's type says which backbone)."""
    return ViTEncoder(cfg) if isinstance(cfg, ViTConfig) else ConvViTEncoder(cfg)
