"""GMIM — grid mask image modeling (Qi et al., Computers in Biology and Medicine 2024),
methods.md section 3, on MONAI's SwinUNETR encoder.

One training sample is a (R, R, R) region (R = ``crop_size``, 160 for ``base``):

- two overlapping (S, S, S) crops x and y of it (S = ``input_size``, 128), offsets
  drawn from the generator (:func:`crop_pair`);
- online branch: x is grid-masked (:mod:`mimcore.methods.grid_masking`: entropy-chosen
  grid, per-cell ratios 0.35-0.65) after the patch embedding, hidden tokens set to 0;
  before encoder stages 1-3 (the inputs of MONAI's ``layers2..4``; ``layers1`` is stage
  0, whose input is the patch embedding) a fresh mask is applied with probability 0.3,
  the ratio halving at each point. A conv decoder reconstructs x from the last stage;
  MSE on the voxels hidden by the first mask;
- target branch: the same encoder and projector, no gradient, on y after a random
  intensity scale and shift; no masking;
- each branch's last-stage tokens (LayerNorm'd, as ``SwinUNETR`` normalises them) go
  through the linear projector (768 -> 512 for ``base``); the Barlow-Twins loss pairs
  token i of x with token i of y, the B * L tokens being the samples of the
  cross-correlation;
- total = ``recon_weight`` * recon + ``barlow_weight`` * barlow (1 and 0.005).

Randomness (crop offsets, augmentation, masks, re-mask draws) comes from the
``generator`` passed to :meth:`GMIMPretrainModel.forward`, on the CPU.

Where this differs from the published code (its defaults - ratios 0.35-0.65, re-mask
probability 0.3, Barlow weights 0.005 - agree with methods.md):

- cell entropy from a 256-bin histogram over [0, 1] (the published code counts distinct
  float values, which on continuous data mostly measures the cell size);
- per-cell hidden counts are rounded stochastically (truncation hides nothing in one-token
  cells); where the token map is coarser than the grid, cells merge with their mean ratio;
- the reconstruction MSE is averaged over the hidden voxels (not over all voxels);
- y's intensity augmentation is a per-image scale U(0.9, 1.1) and shift U(-0.1, 0.1);
- ``small``/``tiny`` use a 64^3 input (at 32^3 the last stage is one token: InstanceNorm
  and the Barlow-Twins statistics are undefined), window 4 and grids 2/4/8 so cells keep
  base's 32/16/8-voxel size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from monai.networks.blocks import Convolution, UpSample
from torch import nn

from mimcore.errors import MimError
from mimcore.methods.grid_masking import (
    hierarchical_scales,
    plan_grid_masks,
    token_hidden,
    voxel_hidden,
)
from mimcore.methods.losses import masked_mse
from mimcore.models.swin import build_swin_encoder

_TUPLE_FIELDS = ("depths", "num_heads", "grids", "ratio_range", "remask_stages")


@dataclass(frozen=True)
class GMIMConfig:
    """Sizes and settings of GMIM. Defaults are the published ``base``.

    input_size: edge S of the network input (multiple of patch * 16).
    crop_size: edge R of the region x and y are cut from (S <= R; overlap is guaranteed).
    feature_size, depths, num_heads, window_size, patch_size: the Swin encoder.
    proj_dim: projector output (512 for a 768-d last stage).
    grids: candidate cells per axis; each must divide the patch-embedding token map.
    entropy_bins: histogram bins over [0, 1] for the cell entropy.
    grid_exponent: the criterion is ``g^-grid_exponent * std / mean``.
    ratio_range: mask ratios of the lowest and highest entropy cells.
    remask_stages: encoder stages (0-3, stage k = MONAI ``layers{k+1}``) before which a
        fresh mask may be applied; remask_prob its probability, remask_factor the ratio
        factor per masking point.
    barlow_lambda: off-diagonal weight of the Barlow-Twins loss.
    aug_scale, aug_shift: target-branch intensity ``y * U(1 +- aug_scale) + U(+- aug_shift)``.
    """

    input_size: int = 128
    crop_size: int = 160
    feature_size: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 2
    proj_dim: int = 512
    grids: tuple[int, ...] = (4, 8, 16)
    entropy_bins: int = 256
    grid_exponent: float = 0.1
    ratio_range: tuple[float, float] = (0.35, 0.65)
    remask_stages: tuple[int, ...] = (1, 2, 3)
    remask_prob: float = 0.3
    remask_factor: float = 0.5
    barlow_lambda: float = 0.005
    barlow_weight: float = 0.005
    recon_weight: float = 1.0
    aug_scale: float = 0.1
    aug_shift: float = 0.1
    drop_path_rate: float = 0.0

    def __post_init__(self):
        s, p, n = self.input_size, self.patch_size, len(self.depths)
        if n != 4 or len(self.num_heads) != 4:
            raise MimError("GMIM's Swin encoder (MONAI SwinUNETR) has 4 stages: depths and num_heads need 4 values")
        if s % (p * 2**n):
            raise MimError(f"GMIM input_size {s} must be a multiple of patch * 2^stages = {p * 2**n}")
        if self.crop_size < s:
            raise MimError(f"GMIM crop_size {self.crop_size} is smaller than input_size {s}")
        if any(not 0 < k < n for k in self.remask_stages):
            raise MimError(f"GMIM remask_stages {self.remask_stages} must be in 1..{n - 1}")
        for g in self.grids:
            if (s // p) % g:
                raise MimError(f"GMIM grid {g} does not divide the {s // p}^3 patch-embedding token map")
            for k in self.remask_stages:  # re-mask maps: cells of whole tokens, or whole tokens of cells
                t = s // (p * 2**k)
                if t % g and g % t:
                    raise MimError(f"GMIM grid {g} does not fit the {t}^3 token map before stage {k}")
        if not 0 <= self.ratio_range[0] <= self.ratio_range[1] <= 1:
            raise MimError(f"GMIM ratio_range {self.ratio_range} must be within [0, 1] and increasing")

    @property
    def encoder_dim(self) -> int:
        """Channels of the last encoder stage (768 for ``base``)."""
        return self.feature_size * 2 ** len(self.depths)

    @property
    def downsampling(self) -> int:
        """Input voxels per last-stage token along an axis (32 for ``base``)."""
        return self.patch_size * 2 ** len(self.depths)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GMIMConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise MimError(f"unknown GMIM settings: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in d.items()})


GMIM_PRESETS: dict[str, GMIMConfig] = {
    # As published: 128^3 input from 160^3 regions, Swin feature 48 (768-d last stage,
    # 4^3 tokens), heads 3/6/12/24, window 7, grids 4/8/16 (cells of 32/16/8 voxels),
    # projector 768 -> 512.
    "base": GMIMConfig(),
    # CPU-sized (about 1-2 s per crop per step on one core): 64^3 input from 80^3 regions
    # (base's 1.25 ratio), feature 24 (384-d last stage, 2^3 tokens), window 4 (a 7^3
    # window costs 5x the attention of 4^3 and on a 32^3 token map pads it to 35^3),
    # projector 384 -> 256 (base's 2/3), grids 2/4/8 so cells keep base's 32/16/8 voxels.
    "small": GMIMConfig(input_size=64, crop_size=80, feature_size=24, window_size=4, proj_dim=256,
                        grids=(2, 4, 8)),
    # For tests: as small with feature 12 (192-d last stage), heads 1/2/4/8, projector
    # 192 -> 128. The input stays 64^3: at 32^3 the last stage is a single token, which
    # the decoder's InstanceNorm cannot normalise and which leaves the Barlow-Twins term
    # one sample per image.
    "tiny": GMIMConfig(input_size=64, crop_size=80, feature_size=12, num_heads=(1, 2, 4, 8), window_size=4,
                       proj_dim=128, grids=(2, 4, 8)),
}


#: the published optimisation (methods.md section 3): AdamW, lr 4e-4, weight decay 1e-5,
#: 500 linear warm-up steps then cosine — for the training loop, not used in this module
PUBLISHED_OPTIMIZATION = {"optimizer": "adamw", "lr": 4e-4, "weight_decay": 1e-5, "warmup_steps": 500,
                          "schedule": "cosine"}


def gmim_config(preset: str) -> GMIMConfig:
    """The :class:`GMIMConfig` of a preset name (``base``, ``small``, ``tiny``)."""
    try:
        return GMIM_PRESETS[preset]
    except KeyError:
        raise MimError(f"unknown GMIM size {preset!r}; choose one of: {', '.join(GMIM_PRESETS)}") from None


# --------------------------------------------------------------------------- data side


def crop_offsets(batch: int, region, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Offsets (B, 2, 3) of two overlapping size^3 crops inside a region (edge, or (D, H, W)).

    x's offset is uniform in [0, region - size] per axis; y's is uniform over the offsets
    in that range that overlap x along every axis (all of them when region < 2 * size).
    """
    extent = torch.tensor([region] * 3 if isinstance(region, int) else list(region))
    hi = extent - size
    if (hi < 0).any():
        raise MimError(f"a {tuple(extent.tolist())} region is smaller than the {size}^3 GMIM input")
    u = torch.rand(batch, 2, 3, generator=generator, dtype=torch.float64)
    ox = (u[:, 0] * (hi + 1)).floor().long().minimum(hi)
    lo_y = (ox - size + 1).clamp_min(0)
    hi_y = (ox + size - 1).minimum(hi)
    oy = lo_y + (u[:, 1] * (hi_y - lo_y + 1)).floor().long().minimum(hi_y - lo_y)
    return torch.stack([ox, oy], dim=1)


def crop_pair(region: torch.Tensor, size: int, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """region (B, 1, D, H, W) -> x, y (B, 1, S, S, S) and their offsets (B, 2, 3) (axes d, h, w)."""
    offsets = crop_offsets(region.shape[0], tuple(region.shape[2:]), size, generator)
    views = [[region[b, :, d:d + size, h:h + size, w:w + size] for (d, h, w) in offsets[b].tolist()]
             for b in range(region.shape[0])]
    x = torch.stack([v[0] for v in views])
    y = torch.stack([v[1] for v in views])
    return x, y, offsets


def intensity_augment(y: torch.Tensor, generator: torch.Generator | None = None,
                      scale: float = 0.1, shift: float = 0.1) -> torch.Tensor:
    """Per image ``y * a + b``, a ~ U(1 - scale, 1 + scale), b ~ U(-shift, shift): (B, ...) -> same."""
    u = torch.rand(y.shape[0], 2, generator=generator, dtype=torch.float64).to(y.device, y.dtype)
    a = 1 + scale * (2 * u[:, 0] - 1)
    b = shift * (2 * u[:, 1] - 1)
    view = (-1,) + (1,) * (y.ndim - 1)
    return y * a.view(view) + b.view(view)


# --------------------------------------------------------------------------- losses


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.005, eps: float = 1e-5) -> torch.Tensor:
    """Barlow-Twins loss of paired samples z1, z2 (N, D) -> scalar.

    Each feature is standardised over the N samples (mean 0, biased variance + eps, as a
    ``BatchNorm1d(affine=False)`` in training); C = z1n^T z2n / N (D, D);
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2.
    """
    z1, z2 = z1.float(), z2.float()
    n = z1.shape[0]
    z1 = (z1 - z1.mean(0)) / (z1.var(0, unbiased=False) + eps).sqrt()
    z2 = (z2 - z2.mean(0)) / (z2.var(0, unbiased=False) + eps).sqrt()
    c = z1.T @ z2 / n
    diag = torch.diagonal(c)
    on = (diag - 1).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return on + lambd * off


def masked_voxel_mse(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """MSE over the hidden voxels only: pred, target (B, 1, S, S, S), hidden bool (B, 1, S, S, S)."""
    b = pred.shape[0]
    return masked_mse(pred.reshape(b, -1, 1), target.reshape(b, -1, 1), hidden.reshape(b, -1))


# --------------------------------------------------------------------------- model


class ReconDecoder(nn.Sequential):
    """Conv decoder: (N, C, s, s, s) -> (N, 1, s * 2^n, ...), n = ``n_up`` (5 for ``base``).

    n x [Conv3d 3^3 + InstanceNorm + LeakyReLU + trilinear 2x upsample] (MONAI
    ``Convolution`` and ``UpSample``), channels C/2, C/4, C/8, C/16, C/16, then a 1^3
    conv to one channel — the SwinUNETR self-supervised head's reconstruction decoder.
    """

    def __init__(self, in_channels: int, n_up: int = 5, out_channels: int = 1):
        chans = [in_channels] + [max(1, in_channels // 2 ** min(i + 1, 4)) for i in range(n_up)]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers.append(Convolution(3, cin, cout, kernel_size=3, norm="INSTANCE",
                                      act=("LEAKYRELU", {"negative_slope": 0.01, "inplace": True})))
            layers.append(UpSample(3, cout, scale_factor=2, mode="nontrainable", interp_mode="trilinear",
                                   align_corners=False))
        layers.append(Convolution(3, chans[-1], out_channels, kernel_size=1, conv_only=True))
        super().__init__(*layers)


def tokens_of(features: torch.Tensor) -> torch.Tensor:
    """(N, C, s, s, s) -> (N * s^3, C): one row per token, images then raster order."""
    return features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1])


class GMIMPretrainModel(nn.Module):
    """Swin encoder + reconstruction decoder + projector. ``forward(region, generator)`` -> losses.

    ``forward`` returns scalar tensors: ``loss`` (weighted total), ``recon`` (MSE on hidden
    voxels), ``barlow`` (Barlow-Twins), and diagnostics ``mask_ratio`` (fraction of
    voxels hidden by the first mask), ``grid`` (mean chosen cells per axis) and
    ``remasked`` (re-masking points applied, 0-3).
    """

    def __init__(self, cfg: GMIMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GMIMConfig()
        self.encoder = build_swin_encoder(cfg.feature_size, cfg.depths, cfg.num_heads, cfg.window_size,
                                          cfg.patch_size, cfg.drop_path_rate)
        self.decoder = ReconDecoder(cfg.encoder_dim, n_up=int(round(math.log2(cfg.downsampling))))
        self.projector = nn.Linear(cfg.encoder_dim, cfg.proj_dim)

    def stages(self) -> list[nn.Module]:
        """The encoder's stages 0-3 (MONAI ``layers1..4``; each ends with patch merging)."""
        enc = self.encoder
        return [enc.layers1[0], enc.layers2[0], enc.layers3[0], enc.layers4[0]][: len(self.cfg.depths)]

    def encode(self, x: torch.Tensor, plan=None, generator: torch.Generator | None = None,
               remask: list[float | None] | None = None, record: list | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (N, 1, S, S, S) -> (last-stage features (N, 16F, S/32, ...) LayerNorm'd,
        first token mask (N, S/p, S/p, S/p) bool or None).

        With a :class:`~mimcore.methods.grid_masking.GridPlan`, hidden tokens are zeroed
        after the patch embedding and, before stage ``cfg.remask_stages[i]``, again with
        a fresh mask at ratio scale ``remask[i]`` where that is not None. ``record``, if
        given, receives ``(stage, hidden)`` for every mask applied (stage 0 = the first).
        """
        enc = self.encoder
        h = enc.pos_drop(enc.patch_embed(x))
        hidden0 = None
        points = dict(zip(self.cfg.remask_stages, remask or []))
        for stage, layer in enumerate(self.stages()):
            scale = 1.0 if stage == 0 else points.get(stage)
            if plan is not None and scale is not None:
                hid = token_hidden(plan, h.shape[-1], scale, generator).to(h.device)
                h = h * (~hid)[:, None].to(h.dtype)
                if stage == 0:
                    hidden0 = hid
                if record is not None:
                    record.append((stage, hid))
            h = layer(h.contiguous())
        return enc.proj_out(h, normalize=True), hidden0

    def plan(self, x: torch.Tensor):
        """Grid choice and per-cell ratios of x (N, 1, S, S, S)."""
        c = self.cfg
        return plan_grid_masks(x, c.grids, c.entropy_bins, c.ratio_range, c.grid_exponent)

    def forward(self, crop: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """crop (N, 1, R, R, R) in [0, 1] -> dict of scalar losses (see the class docstring)."""
        c = self.cfg
        x, y, _ = crop_pair(crop, c.input_size, generator)
        y = intensity_augment(y, generator, c.aug_scale, c.aug_shift)
        plan = self.plan(x)
        remask = hierarchical_scales(len(c.remask_stages), c.remask_prob, c.remask_factor, generator)

        fx, hidden0 = self.encode(x, plan, generator, remask)
        hidden_vox = voxel_hidden(hidden0, c.patch_size)
        recon = masked_voxel_mse(self.decoder(fx), x, hidden_vox)
        zx = self.projector(tokens_of(fx))
        with torch.no_grad():  # target branch: same weights, no gradient
            fy, _ = self.encode(y)
            zy = self.projector(tokens_of(fy))
        barlow = barlow_twins_loss(zx, zy, c.barlow_lambda)
        dev = recon.device
        return {
            "loss": c.recon_weight * recon + c.barlow_weight * barlow,
            "recon": recon,
            "barlow": barlow,
            "mask_ratio": hidden_vox.float().mean().to(dev),
            "grid": torch.tensor(sum(plan.grids) / len(plan.grids), device=dev),
            "remasked": torch.tensor(float(sum(s is not None for s in remask)), device=dev),
        }

    @torch.no_grad()
    def reconstruct_preview(self, volume: torch.Tensor, generator: torch.Generator | None = None,
                            hierarchical: bool = False) -> dict[str, torch.Tensor]:
        """volume (1, 1, S, S, S) -> {"input": the volume with hidden voxels zeroed,
        "reconstruction": decoder output, "hidden_mask": bool voxel mask}, each (1, 1, S, S, S).

        The grid mask as in training; re-masking only with ``hierarchical=True``.
        """
        c = self.cfg
        plan = self.plan(volume)
        remask = hierarchical_scales(len(c.remask_stages), c.remask_prob, c.remask_factor, generator) \
            if hierarchical else None
        f, hidden0 = self.encode(volume, plan, generator, remask)
        hidden_vox = voxel_hidden(hidden0, c.patch_size)
        return {"input": volume * (~hidden_vox).to(volume.dtype), "reconstruction": self.decoder(f),
                "hidden_mask": hidden_vox}
