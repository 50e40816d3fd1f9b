"""What MAE and SimMIM share (METHODS.md section 2): one level, a uniformly random token
mask hiding ``mask_ratio`` of the 16^3 tokens of each volume (exactly the same count per
volume), a prediction of the 16^3 voxels of every token, and an **L1** loss on the
hidden tokens only, against the raw voxel values (in [0, 1] after the HU window; the
published code uses no per-token normalisation).

Subclasses define ``encoder`` (a backbone of :mod:`mimcore.methods.backbones`), ``cfg``
(with ``mask_ratio``) and :meth:`TokenMIM.predict`.
"""

from __future__ import annotations

import torch
from torch import nn

from mimcore.methods.losses import masked_l1
from mimcore.methods.masking import patchify, random_hidden, unpatchify


class TokenMIM(nn.Module):
    """``forward(crop, generator)`` -> ``{"loss": L1 on hidden tokens}``; crop (N, 1, S, S, S)
    is the network input (for these methods the pre-training crop *is* the input)."""

    encoder: nn.Module
    cfg: object

    @property
    def input_size(self) -> int:
        return self.encoder.cfg.input_size

    @property
    def patch_size(self) -> int:
        return self.encoder.cfg.patch_size

    @property
    def n_tokens(self) -> int:
        return self.encoder.cfg.grid ** 3

    def draw_hidden(self, n: int, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
        """(n, L) bool, True on hidden tokens: ``L - int(L (1 - mask_ratio))`` per row, drawn from
        ``generator`` (a CPU generator, so that the mask does not depend on the device)."""
        return random_hidden(n, self.n_tokens, self.cfg.mask_ratio, generator).to(device)

    def predict(self, volume: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """volume (N, 1, S, S, S), hidden (N, L) bool -> predicted voxels (N, L, p^3)."""
        raise NotImplementedError

    def forward(self, crop: torch.Tensor, generator: torch.Generator | None = None,
                hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        s = self.input_size
        if tuple(crop.shape[1:]) != (1, s, s, s):
            raise ValueError(f"expected crops of shape (N, 1, {s}, {s}, {s}), got {tuple(crop.shape)}")
        if hidden is None:
            hidden = self.draw_hidden(crop.shape[0], generator, crop.device)
        pred = self.predict(crop, hidden)
        return {"loss": masked_l1(pred, patchify(crop, self.patch_size), hidden)}

    @torch.no_grad()
    def reconstruct_preview(self, volume: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """One masked reconstruction: volume (N, 1, S, S, S) ->
        ``{"input": volume, "reconstruction": (N, 1, S, S, S) with the prediction on hidden
        tokens and the input on visible ones, "hidden_mask": (N, 1, S, S, S) bool,
        "loss": L1 on hidden tokens (float)}``."""
        p = self.patch_size
        hidden = self.draw_hidden(volume.shape[0], generator, volume.device)
        pred = self.predict(volume, hidden).float()
        tokens = patchify(volume.float(), p)
        recon = torch.where(hidden[..., None], pred, tokens)
        mask = unpatchify(hidden[..., None].expand_as(tokens).to(torch.uint8), p).bool()
        return {"input": volume, "reconstruction": unpatchify(recon, p), "hidden_mask": mask,
                "loss": float(masked_l1(pred, tokens, hidden))}
