"""3D MAE (Chen et al., "Masked Image Modeling Advances 3D Medical Image Analysis",
WACV 2023; METHODS.md section 2).

- 75 % of the 16^3 tokens of each volume hidden, uniformly at random;
- the encoder sees the visible tokens only (ViT-B/16 at 96^3, or MiM's ConvViT3D);
- decoder: Linear C -> 512, a learnable mask token at the hidden positions, a learned
  position embedding, 8 transformer blocks (8 heads, MLP ratio 4, MONAI
  ``TransformerBlock``), LayerNorm, Linear 512 -> 16^3 voxels per token;
- L1 loss on the hidden tokens (:class:`~mimcore.methods.token_mim.TokenMIM`).

Which implementation: built from MONAI's ``ViT`` and ``TransformerBlock``, not MONAI's
``MaskedAutoEncoderViT``. That class matches the layer sizes, but (1) it draws the mask with
``torch.multinomial`` from the global random state inside ``forward``, so a mask can be
neither seeded per sample (exact resume, reproducible previews) nor given (tests, the
reconstruction preview); (2) it prepends a class token, which neither the specification
nor the published code (MONAI ``ViT``, ``classification=False``) has and which UNETR's ViT
lacks; (3) its encoder is not a ``ViT`` module, so its weights would need renaming for
UNETR, while ours load into ``UNETR.vit`` by prefix. The published code skips the ViT's
final LayerNorm in pre-training; we apply it (as the original MAE does), so every encoder
tensor that UNETR uses is pre-trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.layers import trunc_normal_
from torch import nn

from mimcore.errors import MimError
from mimcore.methods.backbones import build_encoder
from mimcore.methods.masking import split_by_mask
from mimcore.methods.token_mim import TokenMIM
from mimcore.models.convvit import ModelConfig
from mimcore.models.vit import ViTConfig


@dataclass(frozen=True)
class MAEConfig:
    """MAE's mask ratio and decoder size (``base``: as published)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 8
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MAEConfig":
        return cls(**d)


#: Decoders of the CPU presets: about 2/3 of the encoder width, as 512 is of 768.
MAE_PRESETS = {
    "base": MAEConfig(),
    "small": MAEConfig(decoder_dim=128, decoder_depth=3, decoder_heads=4),
    "tiny": MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2),
}


def mae_config(preset: str) -> MAEConfig:
    try:
        return MAE_PRESETS[preset]
    except KeyError:
        raise MimError(f"unknown model size {preset!r}; choose one of: {', '.join(MAE_PRESETS)}") from None


#: The registry's names for this method's settings (``config(preset)``, ``CONFIG``) and model (``MODEL``).
config = mae_config


class MAEDecoder(nn.Module):
    """``forward(tokens, ids_restore)``: tokens (B, K, C) visible encoder tokens in ``ids_keep``
    order, ids_restore (B, L) -> predicted voxels (B, L, p^3)."""

    def __init__(self, enc_dim: int, n_tokens: int, patch_voxels: int, cfg: MAEConfig):
        super().__init__()
        d = cfg.decoder_dim
        self.embed = nn.Linear(enc_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d))
        self.blocks = nn.ModuleList(TransformerBlock(d, int(d * cfg.mlp_ratio), cfg.decoder_heads,
                                                     use_flash_attention=True) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(d)
        self.pred = nn.Linear(d, patch_voxels)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, tokens: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)  # (B, K, d)
        b, k, d = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, n - k, d)], dim=1)  # [visible..., hidden...]
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, d)) + self.pos_embed  # raster order
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class MAEPretrainModel(TokenMIM):
    """MAE on a backbone (``backbone_cfg``: a :class:`ViTConfig` or a ConvViT3D
    :class:`ModelConfig`). ``forward(crop (N, 1, S, S, S), generator)`` -> ``{"loss"}``."""

    def __init__(self, backbone_cfg: ViTConfig | ModelConfig, cfg: MAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or MAEConfig()
        self.encoder = build_encoder(backbone_cfg)
        self.decoder = MAEDecoder(self.encoder.dim, self.n_tokens, self.patch_size**3, self.cfg)

    def predict(self, volume: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """volume (N, 1, S, S, S), hidden (N, L) -> (N, L, p^3); the encoder gets visible tokens only."""
        ids_keep, ids_restore = split_by_mask(hidden)
        return self.decoder(self.encoder.encode_visible(volume, ids_keep), ids_restore)


CONFIG, MODEL = MAEConfig, MAEPretrainModel
