"""The Swin backbone of GMIM (METHODS.md section 3): MONAI's SwinUNETR encoder and network.

- :func:`build_swin_encoder` is MONAI's ``SwinTransformer`` built exactly as
  ``SwinUNETR`` builds its ``swinViT`` (patch embedding Conv3d k=s=patch, four stages of
  shifted-window blocks each ending with patch merging), so its state dict is
  ``net.swinViT``'s. For a (N, 1, S, S, S) input with patch 2 and feature F the stage
  outputs are (N, 2F, S/4), (N, 4F, S/8), (N, 8F, S/16), (N, 16F, S/32) (768 ch for F 48).
- :func:`build_swin_segnet` is MONAI's ``SwinUNETR`` for fine-tuning at the preset's
  input size (128^3 for ``base``; MONAI >= 1.5 takes no ``img_size``, any multiple of 32
  works, ``GMIMConfig.input_size`` is the size it is trained at).
- :func:`swin_encoder_state` maps a GMIM pre-training state dict onto ``swinViT.*`` keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep

#: prefixes under which a pre-training state dict may hold the encoder
#: (``GMIMPretrainModel.encoder``, possibly wrapped by DistributedDataParallel)
ENCODER_PREFIXES = ("encoder.", "module.encoder.")


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


def build_swin_segnet(preset: str, out_channels: int, feature_size: int | None = None, *,
                      dropout_path_rate: float = 0.0, use_checkpoint: bool = False) -> SwinUNETR:
    """MONAI ``SwinUNETR`` (1 input channel) with the encoder of GMIM's ``preset``.

    ``feature_size`` defaults to the preset's (48 ``base``, 24 ``small``, 12 ``tiny``);
    it is both the Swin embedding size and the decoder width, so pre-trained encoder
    weights only fit when it is left at the default. Input (N, 1, S, S, S) with S a
    multiple of 32 (``gmim_config(preset).input_size``) -> logits (N, out_channels, S, S, S).
    """
    from mimcore.methods.gmim import gmim_config  # local: gmim imports this module

    cfg = gmim_config(preset)
    return SwinUNETR(
        in_channels=1,
        out_channels=out_channels,
        patch_size=cfg.patch_size,
        depths=cfg.depths,
        num_heads=cfg.num_heads,
        window_size=cfg.window_size,
        feature_size=feature_size or cfg.feature_size,
        dropout_path_rate=dropout_path_rate,
        use_checkpoint=use_checkpoint,
        spatial_dims=3,
    )


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
