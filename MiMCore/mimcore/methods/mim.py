"""MiM (Mask in Mask): three levels of masked volumes reconstructed at once, with
cross-level alignment (methods.md section 1).

One training sample is a (2S)^3 full-resolution crop (192^3 for ``base``):

- level 1: the crop downsampled (trilinear) to S^3; half of its 8 token octants hidden;
- level 2: the hidden octants cut from the full-resolution crop, each S^3 (4 per crop),
  ``level2_mask_ratio`` of their tokens hidden;
- level 3: from each level-2 volume, ``level3_blocks`` of its hidden 16^3 tokens,
  upsampled trilinearly to S^3 (16 per crop), ``level3_mask_ratio`` hidden.

Each level's volumes go through the shared encoder and decoder as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn

from mimcore.methods.losses import alignment_loss, masked_mse, norm_pix_target
from mimcore.methods.masking import (
    patchify,
    random_hidden,
    split_by_mask,
    split_octants,
    token_octants,
)
from mimcore.models.convvit import ConvViT3D, gather_tokens
from mimcore.models.decoder import MaskedDecoder
from mimcore.models.presets import MiMConfig, ModelConfig


@dataclass
class Levels:
    """The three levels built from a batch of B crops (S = network input edge, L = tokens).

    volumes[i]: level i+1 input, (B, 1, S, S, S), (4B, ...), (16B, ...).
    hidden[i]: bool (N_i, L), True on hidden tokens.
    octants: (B, 4) hidden level-1 octant ids; level-2 volume ``b * 4 + j`` is octant
        ``octants[b, j]`` of crop b.
    blocks: (4B, n3) level-2 token ids; level-3 volume ``v * n3 + j`` is token
        ``blocks[v, j]`` of level-2 volume v.
    """

    volumes: list[torch.Tensor]
    hidden: list[torch.Tensor]
    octants: torch.Tensor
    blocks: torch.Tensor


def build_levels(crop: torch.Tensor, model_cfg: ModelConfig, cfg: MiMConfig,
                 generator: torch.Generator | None = None) -> Levels:
    """crop (B, 1, 2S, 2S, 2S) -> :class:`Levels`. Random draws come from ``generator`` (CPU)."""
    b = crop.shape[0]
    s, g, p = model_cfg.input_size, model_cfg.grid, model_cfg.patch_size
    n_tokens = g**3
    dev = crop.device

    level1 = F.interpolate(crop, size=(s, s, s), mode="trilinear", align_corners=False)
    n_oct_hidden = 8 - int(8 * (1 - cfg.level1_octant_ratio))
    oct_hidden = random_hidden(b, 8, cfg.level1_octant_ratio, generator)  # (B, 8)
    octants = torch.argsort(oct_hidden.to(torch.int8), dim=1, stable=True)[:, 8 - n_oct_hidden:]
    hidden1 = oct_hidden[:, token_octants(g)]  # (B, L)

    all_octants = split_octants(crop)  # (B, 8, S, S, S)
    level2 = torch.gather(all_octants, 1, octants.to(dev)[:, :, None, None, None].expand(-1, -1, s, s, s))
    level2 = level2.reshape(b * n_oct_hidden, 1, s, s, s)
    hidden2 = random_hidden(level2.shape[0], n_tokens, cfg.level2_mask_ratio, generator)

    # level 3: a random choice of hidden level-2 tokens, upsampled to S^3
    n3 = cfg.level3_blocks
    if int(hidden2[0].sum()) < n3:
        raise ValueError(f"level 2 hides {int(hidden2[0].sum())} tokens, fewer than level3_blocks={n3}")
    noise = torch.rand(hidden2.shape, generator=generator) + (~hidden2).float() * 2  # hidden first
    blocks = noise.argsort(dim=1)[:, :n3]  # (4B, n3)
    tokens2 = patchify(level2, p)  # (4B, L, p^3)
    chosen = gather_tokens(tokens2, blocks.to(dev)).reshape(-1, 1, p, p, p)
    level3 = F.interpolate(chosen, scale_factor=s // p, mode="trilinear", align_corners=False)
    hidden3 = random_hidden(level3.shape[0], n_tokens, cfg.level3_mask_ratio, generator)

    hidden = [h.to(dev) for h in (hidden1, hidden2, hidden3)]
    return Levels([level1, level2, level3], hidden, octants.to(dev), blocks.to(dev))


class MiMPretrainModel(nn.Module):
    """Encoder + decoder + alignment heads. ``forward(crop, generator)`` -> dict of losses.

    The returned dict holds scalar tensors ``loss`` (weighted total), ``l1``, ``l2``,
    ``l3`` (norm-pix MSE on hidden tokens) and ``a12``, ``a23`` (alignment).
    """

    def __init__(self, model_cfg: ModelConfig, cfg: MiMConfig | None = None):
        super().__init__()
        self.model_cfg = model_cfg
        self.cfg = cfg or MiMConfig()
        self.encoder = ConvViT3D(model_cfg)
        self.decoder = MaskedDecoder(model_cfg)
        d = model_cfg.decoder_dim
        self.align12_child, self.align12_parent, self.align23_child, self.align23_parent = (
            MLPBlock(d, d, act="GELU") for _ in range(4)
        )

    def reconstruct(self, volume: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One level: volume (N, 1, S, S, S), hidden (N, L) -> (pred (N, L, p^3), decoder features (N, L, Cd))."""
        ids_keep, ids_restore = split_by_mask(hidden)
        return self.decoder(self.encoder(volume, ids_keep), ids_restore)

    def forward(self, crop: torch.Tensor, generator: torch.Generator | None = None,
                levels: Levels | None = None) -> dict[str, torch.Tensor]:
        levels = levels if levels is not None else build_levels(crop, self.model_cfg, self.cfg, generator)
        p, eps = self.model_cfg.patch_size, self.cfg.norm_pix_eps
        out: dict[str, torch.Tensor] = {}
        feats = []
        for i, (vol, hid) in enumerate(zip(levels.volumes, levels.hidden), start=1):
            pred, f = self.reconstruct(vol, hid)
            out[f"l{i}"] = masked_mse(pred, norm_pix_target(patchify(vol, p).float(), eps), hid)
            feats.append(f)
        out["a12"], out["a23"] = self.alignment(feats, levels)
        w = self.cfg.loss_weights
        out["loss"] = sum(w[k] * out[k] for k in ("l1", "l2", "l3", "a12", "a23"))
        return out

    def alignment(self, feats: list[torch.Tensor], levels: Levels) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-level alignment 1<->2 and 2<->3 from decoder features (N_i, L, Cd)."""
        f1, f2, f3 = feats
        b, n_tokens, d = f1.shape
        # parent of each level-2 volume: mean of level-1 tokens in its octant (stop-gradient)
        onehot = F.one_hot(token_octants(self.model_cfg.grid).to(f1.device), 8).to(f1.dtype)  # (L, 8)
        oct_mean = torch.einsum("bld,lo->bod", f1.detach(), onehot / onehot.sum(0))  # (B, 8, Cd)
        parent12 = gather_tokens(oct_mean, levels.octants).reshape(-1, d)  # (4B, Cd)
        a12 = alignment_loss(self.align12_child(f2.mean(1)), self.align12_parent(parent12))
        # parent of each level-3 volume: the level-2 token it was cut from (stop-gradient)
        parent23 = gather_tokens(f2.detach(), levels.blocks).reshape(-1, d)  # (16B, Cd)
        a23 = alignment_loss(self.align23_child(f3.mean(1)), self.align23_parent(parent23))
        return a12, a23
