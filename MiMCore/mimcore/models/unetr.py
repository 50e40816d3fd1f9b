"""UNETR, the fine-tuning network of ViT checkpoints (MAE / SimMIM; METHODS.md section 2).

MONAI's ``UNETR`` as the published code uses it (feature size 16, instance norm, residual
blocks), on a :class:`~mimcore.models.vit.ViTConfig` (``base``: ViT-B/16 at 96^3). Its
``vit`` is MONAI's ``ViT`` with the same parameter names as the pre-training encoder, so a
pre-trained ``encoder.*`` loads as ``vit.*``. ``forward(x)``: x (B, 1, S, S, S) -> logits
(B, out_channels, S, S, S), S = ``input_size``.
"""

from __future__ import annotations

import torch
from monai.networks.nets import UNETR

from mimcore.errors import MimError
from mimcore.models.vit import ViTConfig, use_sdpa
from mimcore.models.vit import preset as vit_preset

ARCHITECTURE_KIND = "unetr"
FEATURE_SIZE = 16  # as published, for every size


class UNETRSegNet(UNETR):
    """MONAI ``UNETR`` (1 input channel) with the accessors of a segmentation network
    (:class:`mimcore.models.segnet.SegNet`).

    Args:
        cfg: the ViT size (:data:`mimcore.models.vit.PRESETS`): 12 blocks on 16^3 patches.
        out_channels: output classes, the background included.
        feature_size: UNETR's decoder width (16 as published).

    Raises:
        MimError: fewer than two output channels, or a ViT UNETR cannot tap.
    """

    kind = ARCHITECTURE_KIND
    head_prefix = "out."

    def __init__(self, cfg: ViTConfig, out_channels: int, feature_size: int = FEATURE_SIZE):
        if out_channels < 2:
            raise MimError("a segmentation model needs at least one label besides the background")
        if cfg.num_layers != 12 or cfg.patch_size != 16:
            raise MimError(f"UNETR needs a 12-block ViT on 16^3 patches; this one has {cfg.num_layers} blocks "
                           f"on {cfg.patch_size}^3 patches")
        super().__init__(in_channels=1, out_channels=out_channels, img_size=cfg.input_size,
                         feature_size=feature_size, hidden_size=cfg.hidden_size, mlp_dim=cfg.mlp_dim,
                         num_heads=cfg.num_heads, proj_type=cfg.proj_type, norm_name="instance",
                         conv_block=True, res_block=True, qkv_bias=cfg.qkv_bias)
        self.cfg = cfg
        self.feature_size = feature_size
        use_sdpa(self)

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    @property
    def out_channels(self) -> int:
        return self.out.conv.conv.out_channels

    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        """The pre-trained part (what ``--freeze-encoder`` freezes): the ViT."""
        return list(self.vit.parameters())

    def architecture_dict(self, preset: str | None) -> dict:
        return {"kind": ARCHITECTURE_KIND, "preset": preset, "vit": self.cfg.to_dict(),
                "feature_size": self.feature_size, "in_channels": 1, "out_channels": self.out_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.input_size
        if tuple(x.shape[2:]) != (s, s, s):
            raise MimError(f"the network takes {s}^3 windows, got {tuple(x.shape[2:])}: use sliding-window inference")
        return super().forward(x)


def build_unetr(architecture: dict, **options) -> UNETRSegNet:
    """The network of an ``architecture`` dict written by :meth:`UNETRSegNet.architecture_dict`.
    ``options`` (drop path, checkpointing) do not exist in MONAI's UNETR: MimError if set."""
    unsupported = [k for k, v in options.items() if v]
    if unsupported:
        raise MimError(f"UNETR (MONAI) has no {', '.join(unsupported)}; leave those options out for ViT models")
    cfg = ViTConfig.from_dict(architecture["vit"]) if "vit" in architecture else \
        vit_preset(architecture.get("preset") or "base")
    return UNETRSegNet(cfg, int(architecture["out_channels"]), int(architecture.get("feature_size") or FEATURE_SIZE))
