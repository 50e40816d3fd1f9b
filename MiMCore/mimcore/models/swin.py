"""The Swin backbone of GMIM (METHODS.md section 3): MONAI's SwinUNETR encoder and network.

- :func:`build_swin_encoder` is MONAI's ``SwinTransformer`` built exactly as
  ``SwinUNETR`` builds its ``swinViT`` (patch embedding Conv3d k=s=patch, four stages of
  shifted-window blocks each ending with patch merging), so its state dict is
  ``net.swinViT``'s. For a (N, 1, S, S, S) input with patch 2 and feature F the stage
  outputs are (N, 2F, S/4), (N, 4F, S/8), (N, 8F, S/16), (N, 16F, S/32) (768 ch for F 48).
- :class:`SwinConfig` / :data:`PRESETS` / :func:`preset`: the encoder's sizes (GMIM's, as
  published for ``base``) and the input size a network of that size is trained at.
- :class:`SwinUNETR` (built by :func:`build_swin_segnet`) is MONAI's ``SwinUNETR`` for
  fine-tuning at the preset's input size (128^3 for ``base``; MONAI >= 1.5 takes no
  ``img_size``, any multiple of 32 works, ``SwinConfig.input_size`` is the size it is
  trained at), with the accessors of a segmentation network
  (:class:`mimcore.models.segnet.SegNet`).
- :func:`swin_encoder_state` maps a GMIM pre-training state dict onto ``swinViT.*`` keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep

from mimcore.errors import MimError

#: prefixes under which a pre-training state dict may hold the encoder
#: (``GMIMPretrainModel.encoder``, possibly wrapped by DistributedDataParallel)
ENCODER_PREFIXES = ("encoder.", "module.encoder.")
ARCHITECTURE_KIND = "swinunetr"
_TUPLE_FIELDS = ("depths", "num_heads")


@dataclass(frozen=True)
class SwinConfig:
    """Swin encoder sizes (MONAI ``SwinTransformer`` as ``SwinUNETR`` builds it).

    input_size: edge S of the network input it is trained at (a multiple of patch * 16).
    feature_size: embedding width F (last stage 16F); also SwinUNETR's decoder width.
    depths, num_heads: blocks and attention heads of the four stages.
    window_size, patch_size: attention window and patch embedding edge.
    """

    input_size: int = 128
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SwinConfig":
        return cls(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in d.items()})


#: Swin sizes (GMIM's, METHODS.md section 3).
PRESETS: dict[str, SwinConfig] = {
    # As published: 128^3 input, feature 48 (768-d last stage, 4^3 tokens), heads 3/6/12/24, window 7.
    "base": SwinConfig(),
    # CPU-sized: 64^3 input, feature 24 (384-d last stage, 2^3 tokens), window 4 (a 7^3
    # window costs 5x the attention of 4^3 and on a 32^3 token map pads it to 35^3).
    "small": SwinConfig(input_size=64, feature_size=24, window_size=4),
    # For tests: as small with feature 12 (192-d last stage), heads 1/2/4/8. The input stays
    # 64^3: at 32^3 the last stage is a single token.
    "tiny": SwinConfig(input_size=64, feature_size=12, num_heads=(1, 2, 4, 8), window_size=4),
}


def preset(name: str) -> SwinConfig:
    """The :class:`SwinConfig` of a size name (``base``, ``small``, ``tiny``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MimError(f"unknown Swin size {name!r}; choose one of: {', '.join(PRESETS)}") from None


def build_swin_encoder(feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                       num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                       patch_size: int = 2, drop_path_rate: float = 0.0,
                       use_checkpoint: bool = False) -> SwinTransformer:
    """MONAI ``SwinTransformer`` with the same arguments ``SwinUNETR`` gives its ``swinViT``.

    One input channel; ``qkv_bias``, MLP ratio 4, no patch norm, "merging" downsampling.
    """
    return SwinTransformer(
        in_chans=1,
        embed_dim=feature_size,
        window_size=ensure_tuple_rep(window_size, 3),
        patch_size=ensure_tuple_rep(patch_size, 3),
        depths=tuple(depths),
        num_heads=tuple(num_heads),
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=drop_path_rate,
        patch_norm=False,
        use_checkpoint=use_checkpoint,
        spatial_dims=3,
        downsample="merging",
    )


class SwinUNETR(MonaiSwinUNETR):
    """MONAI ``SwinUNETR`` (1 input channel) on the Swin encoder of a size preset, with the
    accessors of a segmentation network (:class:`mimcore.models.segnet.SegNet`).

    ``forward(x)``: x (N, 1, S, S, S), S a multiple of 32 (``input_size`` is the size it is
    trained at) -> logits (N, out_channels, S, S, S). The state dict is ``SwinUNETR``'s.

    Args:
        architecture: the bundle ``architecture`` dict (kind ``swinunetr``) with
            ``preset``, ``input_size``, ``feature_size`` and ``out_channels``
            (:func:`swin_architecture` writes one).
        dropout_path_rate: stochastic depth rate of the encoder.
        use_checkpoint: gradient checkpointing in the encoder.

    Raises:
        MimError: fewer than two output channels, or an input size that is not a multiple of 32.
    """

    kind = ARCHITECTURE_KIND
    head_prefix = "out."

    def __init__(self, architecture: dict, *, dropout_path_rate: float = 0.0, use_checkpoint: bool = False):
        cfg = preset(architecture.get("preset") or "base")
        out_channels = int(architecture["out_channels"])
        if out_channels < 2:
            raise MimError("a segmentation model needs at least one label besides the background")
        input_size = int(architecture.get("input_size") or cfg.input_size)
        if input_size % 32:
            raise MimError(f"SwinUNETR takes inputs whose edge is a multiple of 32, not {input_size}")
        super().__init__(
            in_channels=1,
            out_channels=out_channels,
            patch_size=cfg.patch_size,
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            window_size=cfg.window_size,
            feature_size=int(architecture.get("feature_size") or cfg.feature_size),
            dropout_path_rate=dropout_path_rate,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
        )
        self.architecture = dict(architecture, input_size=input_size)

    @property
    def input_size(self) -> int:
        """Edge of the cubic windows the network takes."""
        return int(self.architecture["input_size"])

    @property
    def out_channels(self) -> int:
        return int(self.out.conv.conv.out_channels)

    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        """The pre-trained part (what ``--freeze-encoder`` freezes): the Swin encoder."""
        return list(self.swinViT.parameters())

    def architecture_dict(self, preset: str | None) -> dict:
        """The ``architecture`` entry of a model bundle's model.json."""
        return dict(self.architecture, preset=preset, out_channels=self.out_channels)


def swin_architecture(preset_name: str, out_channels: int) -> dict:
    """The ``architecture`` dict of a SwinUNETR with the Swin encoder of size ``preset_name``."""
    cfg = preset(preset_name)
    return {"kind": ARCHITECTURE_KIND, "preset": preset_name, "input_size": cfg.input_size,
            "feature_size": cfg.feature_size, "in_channels": 1, "out_channels": out_channels}


def build_swin_segnet(preset_name: str, out_channels: int, feature_size: int | None = None, *,
                      dropout_path_rate: float = 0.0, use_checkpoint: bool = False) -> SwinUNETR:
    """A :class:`SwinUNETR` with the encoder of size ``preset_name``.

    ``feature_size`` defaults to the preset's (48 ``base``, 24 ``small``, 12 ``tiny``);
    it is both the Swin embedding size and the decoder width, so pre-trained encoder
    weights only fit when it is left at the default. Input (N, 1, S, S, S) with S a
    multiple of 32 (``preset(preset_name).input_size``) -> logits (N, out_channels, S, S, S).
    """
    arch = swin_architecture(preset_name, out_channels)
    if feature_size:
        arch["feature_size"] = feature_size
    return SwinUNETR(arch, dropout_path_rate=dropout_path_rate, use_checkpoint=use_checkpoint)


def swin_encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GMIM pre-training state dict -> ``{"swinViT.<name>": tensor}`` for ``SwinUNETR``.

    Takes the tensors under ``encoder.`` (or ``module.encoder.``); keys already named
    ``swinViT.*`` pass through. Returns ``{}`` when nothing matches, so the caller can
    refuse the file. Load with ``net.load_state_dict(mapped, strict=False)``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("swinViT."):
            out[key] = value
            continue
        for prefix in ENCODER_PREFIXES:
            if key.startswith(prefix):
                out["swinViT." + key[len(prefix):]] = value
                break
    return out
