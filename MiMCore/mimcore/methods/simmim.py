"""3D SimMIM (Chen et al., WACV 2023; METHODS.md section 2).

- 75 % of the 16^3 tokens of each volume hidden, uniformly at random;
- the hidden tokens are replaced by a learnable mask token and *all* tokens go through
  the encoder (ViT-B/16: the patch embedding is replaced before the position embedding
  is added, as the published code does; ConvViT3D: the stage-1 embedding of the hidden
  regions, see :meth:`~mimcore.methods.backbones.ConvViTEncoder.encode_masked`);
- a single Linear head C -> 16^3 voxels on every output token;
- L1 loss on the hidden tokens (:class:`~mimcore.methods.token_mim.TokenMIM`).

Built from MONAI's ``ViT`` (:class:`~mimcore.models.vit.ViTEncoder`); MONAI has no SimMIM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.layers import trunc_normal_
from torch import nn

from mimcore.methods.backbones import build_encoder
from mimcore.methods.token_mim import TokenMIM
from mimcore.models.convvit import ModelConfig
from mimcore.models.vit import ViTConfig


@dataclass(frozen=True)
class SimMIMConfig:
    mask_ratio: float = 0.75

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SimMIMConfig":
        return cls(**d)


class SimMIMPretrainModel(TokenMIM):
    """SimMIM on a backbone (``backbone_cfg``: a :class:`ViTConfig` or a ConvViT3D
    :class:`ModelConfig`). ``forward(crop (N, 1, S, S, S), generator)`` -> ``{"loss"}``."""

    def __init__(self, backbone_cfg: ViTConfig | ModelConfig, cfg: SimMIMConfig | None = None):
        super().__init__()
        self.cfg = cfg or SimMIMConfig()
        self.encoder = build_encoder(backbone_cfg)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.mask_token_dim))
        self.head = nn.Linear(self.encoder.dim, self.patch_size**3)
        trunc_normal_(self.mask_token, std=0.02)

    def predict(self, volume: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """volume (N, 1, S, S, S), hidden (N, L) -> (N, L, p^3); the encoder sees all L tokens."""
        return self.head(self.encoder.encode_masked(volume, hidden, self.mask_token))


def config(preset: str) -> SimMIMConfig:
    """SimMIM's settings; the same for every size (75 % hidden, L1)."""
    return SimMIMConfig()


#: The registry's names for this method's settings class and model.
CONFIG, MODEL = SimMIMConfig, SimMIMPretrainModel
