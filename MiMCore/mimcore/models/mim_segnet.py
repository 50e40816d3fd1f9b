"""The MiM segmentation network (METHODS.md, "Fine-tuning (segmentation) as published").

The pre-trained :class:`~mimcore.models.convvit.ConvViT3D` encoder without masking, a
fifth stage (Conv3d k2 s2 C4 -> C4, LayerNorm, GELU) and a SwinUNETR-style U-shaped
decoder built from MONAI's ``UnetrBasicBlock`` / ``UnetrUpBlock`` / ``UnetOutBlock``.
For an input (B, 1, S, S, S), S = ``input_size`` (96 for ``base``), with feature size F
(the first stage's channels, at least 16: 48 for ``base``, 24 for ``small``, 16 for ``tiny``):

========  ==========================  ======================  ==========================
scale     encoder feature             decoder block           decoder output
========  ==========================  ======================  ==========================
1         the input (1 ch)            ``enc0`` -> F           ``dec1`` -> F, then logits
1/2       stage 1 (C1)                ``enc1`` -> F           ``dec2`` -> F
1/4       stage 2 (C2)                ``enc2`` -> 2F          ``dec3`` -> 2F
1/8       stage 3 (C3)                ``enc3`` -> 4F          ``dec4`` -> 4F
1/16      tokens on their grid (C4)   ``enc4`` (if C4 != 8F)  ``dec5`` -> 8F
1/32      stage 5 (C4)                ``bottleneck`` -> 16F
========  ==========================  ======================  ==========================

The same layout as MONAI's ``SwinUNETR`` (instance norm) with the Swin encoder replaced
by ConvViT3D; for inputs under 64^3 the 1/32 grid is a single voxel and the bottleneck
block uses group norm with one group instead.
The network's input size is fixed (the position embedding is for S^3): whole volumes
go through a sliding window of that size.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from mimcore.errors import MimError
from mimcore.models.convvit import ConvViT3D, ModelConfig
from mimcore.models.convvit import preset as convvit_preset
from mimcore.models.layers import PatchEmbed

ARCHITECTURE_KIND = "mim-seg"
HEAD_PREFIX = "head."
#: The decoder's feature size is the first stage's width (48 for ``base``, as published),
#: but at least this: a 6-wide decoder (``tiny``) learns several times slower than a 16-wide one.
MIN_FEATURE_SIZE = 16


def _basic(cin: int, cout: int, norm="instance") -> UnetrBasicBlock:
    return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm, res_block=True)


def _up(cin: int, cout: int) -> UnetrUpBlock:
    return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True)


class MiMSegNet(nn.Module):
    """ConvViT3D encoder + stage 5 + SwinUNETR-style decoder.

    ``forward(x)``: x (B, 1, S, S, S) -> logits (B, out_channels, S, S, S).

    Args:
        cfg: the ConvViT3D size (:data:`mimcore.models.convvit.PRESETS`); S = ``cfg.input_size``.
        out_channels: output classes, the background included (number of labels + 1).
        feature_size: decoder width F; default the first stage's width, at least
            :data:`MIN_FEATURE_SIZE`.
        drop_path: stochastic depth rate of the encoder's transformer blocks.
        checkpointing: gradient checkpointing of the encoder's blocks while training.

    Raises:
        MimError: fewer than two output channels; ``forward`` on a window of another size.
    """

    kind = ARCHITECTURE_KIND

    def __init__(self, cfg: ModelConfig, out_channels: int, feature_size: int | None = None,
                 drop_path: float = 0.0, checkpointing: bool = False):
        super().__init__()
        if out_channels < 2:
            raise MimError("a segmentation model needs at least one label besides the background")
        self.cfg = cfg
        self.checkpointing = checkpointing
        f = feature_size or max(cfg.dims[0], MIN_FEATURE_SIZE)
        self.feature_size = f
        c1, c2, c3, c4 = cfg.dims
        self.encoder = ConvViT3D(cfg, drop_path=drop_path)
        self.stage5 = PatchEmbed(c4, c4)
        self.enc0 = _basic(1, f)
        self.enc1 = _basic(c1, f)
        self.enc2 = _basic(c2, 2 * f)
        self.enc3 = _basic(c3, 4 * f)
        self.enc4 = nn.Identity() if c4 == 8 * f else _basic(c4, 8 * f)
        # instance norm needs more than one voxel: a 32^3 input has a 1^3 bottleneck
        self.bottleneck = _basic(c4, 16 * f, "instance" if cfg.input_size >= 64 else ("group", {"num_groups": 1}))
        self.dec5 = _up(16 * f, 8 * f)
        self.dec4 = _up(8 * f, 4 * f)
        self.dec3 = _up(4 * f, 2 * f)
        self.dec2 = _up(2 * f, f)
        self.dec1 = _up(f, f)
        self.head = UnetOutBlock(3, f, out_channels)

    head_prefix = HEAD_PREFIX

    @property
    def input_size(self) -> int:
        """Edge of the cubic windows the network takes."""
        return self.cfg.input_size

    @property
    def out_channels(self) -> int:
        return self.head.conv.conv.out_channels

    def replace_head(self, out_channels: int) -> None:
        """A new, freshly initialised output layer for a different label set."""
        self.head = UnetOutBlock(3, self.feature_size, out_channels).to(next(self.parameters()).device)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The pre-trained part (what ``--freeze-encoder`` freezes)."""
        return list(self.encoder.parameters())

    def architecture_dict(self, preset: str | None) -> dict:
        """The ``architecture`` entry of a model bundle's model.json."""
        return architecture_dict(self, preset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.cfg.input_size
        if tuple(x.shape[2:]) != (s, s, s):
            raise MimError(f"the network takes {s}^3 windows, got {tuple(x.shape[2:])}: use sliding-window inference")
        feats = self.encoder.pyramid(x, checkpoint_blocks=self.checkpointing and self.training)
        feats.append(self.stage5(feats[-1]))
        f1, f2, f3, f4, f5 = (t.permute(0, 4, 1, 2, 3) for t in feats)  # channels-first
        d = self.dec5(self.bottleneck(f5), self.enc4(f4))
        d = self.dec4(d, self.enc3(f3))
        d = self.dec3(d, self.enc2(f2))
        d = self.dec2(d, self.enc1(f1))
        d = self.dec1(d, self.enc0(x))
        return self.head(d)


def architecture_dict(model: MiMSegNet, preset: str | None) -> dict:
    """The ``architecture`` entry of a model bundle's model.json."""
    return {"kind": ARCHITECTURE_KIND, "preset": preset, "model": model.cfg.to_dict(),
            "feature_size": model.feature_size, "in_channels": 1, "out_channels": model.out_channels}


def build_mim_segnet(architecture: dict, **options) -> MiMSegNet:
    """A :class:`MiMSegNet` from an ``architecture`` dict of kind ``mim-seg``."""
    if "model" in architecture:
        cfg = ModelConfig.from_dict(architecture["model"])
    else:
        cfg = convvit_preset(architecture.get("preset") or "base")
    return MiMSegNet(cfg, int(architecture["out_channels"]), architecture.get("feature_size"), **options)
