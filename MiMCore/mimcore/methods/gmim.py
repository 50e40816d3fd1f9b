"""GMIM — grid mask image modeling (Qi et al., Computers in Biology and Medicine 2024),
METHODS.md section 3, on MONAI's SwinUNETR encoder, as the authors released it.

One training sample is a (R, R, R) region (R = ``crop_size``, 160 for ``base``):

- two overlapping (S, S, S) crops x and y of it (S = ``input_size``, 128), offsets drawn
  from the generator (:func:`crop_pair`);
- augmentation (:func:`augment_pair`): x and y are each flipped along every spatial axis
  with probability 0.5 (independent draws per image, axis and branch); y then gets MONAI's
  ``RandAdjustContrast`` (gamma in [0.7, 1.5], p 0.7), ``RandShiftIntensity`` (offsets
  0.4, p 0.4) and ``RandGaussianNoise`` (mean 0, std U(0, 0.1), p 0.5), per image;
- online branch: x is grid-masked (:mod:`mimcore.methods.grid_masking`: entropy-chosen
  grid, per-cell ratios 0.35-0.65) after the patch embedding, hidden tokens set to 0;
  then, before MONAI's ``layers1``, ``layers2`` and ``layers3`` (``remask_stages`` 0, 1,
  2; stage k = ``layers{k+1}``), a fresh mask is applied with probability 0.3 each, the
  ratio halving at each call (1/2, 1/4, 1/8 of the first). The masking points are thus,
  in order: first mask (layers1 input, always), re-mask (layers1 input), re-mask (layers2
  input), re-mask (layers3 input); ``layers4`` is not re-masked. A conv decoder
  reconstructs x from the last stage: MSE with the voxels left visible by the first mask
  zeroed in prediction and target, averaged over all voxels (published ``--invis_patches``);
- target branch: the same encoder on y, no gradient, no masking;
- each branch's last-stage tokens go through its own trainable linear projector (768 ->
  512 for ``base``: ``projector`` for x, ``target_projector`` for y; the target projector
  is trained, only the target encoder pass is gradient-free); the cross-correlation
  (:func:`cross_correlation_loss`) is, per image, C = z_x^T z_y / n over the image's n
  tokens (token i of x paired with token i of y), not standardised, loss
  sum_i (1 - C_ii)^2 + 0.005 * sum_{i != j} C_ij^2, averaged over the images;
- total = ``recon_weight`` * recon + ``barlow_weight`` * cross-correlation (1 and 0.005).

``cross_correlation="standardised"`` instead gives the Barlow-Twins form this module used
before (one projector shared by both branches, the target's without gradient; features
standardised over all B * L tokens of the batch, :func:`barlow_twins_loss`) — an option,
not the published method.

Randomness (crop offsets, flips, the intensity transforms' seeds, masks, re-mask draws)
comes from the ``generator`` passed to :meth:`GMIMPretrainModel.forward`, on the CPU: the
forward pass is reproducible from it.

Matches the published code as METHODS.md reads it: the Swin encoder (feature 48, depths
2-2-2-2, heads 3/6/12/24, window 7, patch 2); 128^3 crops of a 160^3 region; candidate
grids 4/8/16 chosen by ``g^-0.1 * std / mean`` of the cell entropies; per-cell ratios
linear in the entropy rank over 0.35-0.65; hidden tokens zeroed; re-masking before
``layers1..3`` with probability 0.3, ratio halved at every call, none before ``layers4``;
the decoder (5 x conv + InstanceNorm + LeakyReLU + 2x upsample, then a 1^3 conv); the
``--invis_patches`` MSE; the target encoder without gradient; two trainable projectors
768 -> 512; the per-image, unstandardised cross-correlation with lambda 0.005 averaged
over images; total 0.005 * cross-correlation + reconstruction; the augmentations and
their parameters (``RandGaussianNoise`` as MONAI has always drawn it: each call's std
from U(0, 0.1)); the optimisation constants (``RECIPES["gmim"]`` in :mod:`mimcore.methods.recipes`).

Where it differs from the published code:

- cell entropy from a 256-bin histogram over [0, 1] (the published code counts distinct
  float values, which on continuous data mostly measures the cell size);
- per-cell hidden counts are rounded stochastically (truncation hides nothing in one-token
  cells); where a token map is coarser than the grid, cells merge with their mean ratio
  (never at the default re-mask stages of the presets; only with re-masking before
  ``layers4``);
- all random draws come from one torch generator (MONAI's transforms are seeded from it
  per image) rather than numpy's and MONAI's global streams: same distributions, other
  samples;
- ``small``/``tiny`` use a 64^3 input (at 32^3 the last stage is one token: InstanceNorm
  and the per-image correlation are degenerate), window 4 and grids 2/4/8 so cells keep
  base's 32/16/8-voxel size.

Choices where METHODS.md does not pin the published behaviour:

- the flips are geometry, so x is flipped before the encoder and the reconstruction
  target is that same flipped x (without intensity augmentation — x gets none): the
  "un-augmented x" of METHODS.md in the intensity sense; the grid is chosen on the
  flipped x;
- x's and y's flips are drawn independently;
- the reconstruction loss counts the voxels hidden by the first mask (after the patch
  embedding); tokens hidden only by a re-mask deeper in the encoder are not reconstruction
  targets (they are visible in the input);
- the projectors see the last-stage tokens as SwinUNETR's encoder returns them
  (layer-normalised without affine, ``proj_out(normalize=True)``).

Checkpoints written before these changes: their ``method_config`` loads
(:meth:`GMIMConfig.from_dict`): ``aug_scale``/``aug_shift`` (the old y intensity scale
and shift) are accepted and dropped; ``remask_stages`` (1, 2, 3) keeps its meaning (the
stage index has not changed): re-masking before ``layers2..4``, as those runs trained;
the missing ``cross_correlation`` takes the default ``published``. Their weights load too:
a state dict with ``projector.*`` but no ``target_projector.*`` (the old shared
projector) fills the target projector with a copy of it, which is the function the old
target branch computed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.transforms import RandAdjustContrast, RandGaussianNoise, RandShiftIntensity
from monai.utils import convert_to_tensor
from torch import nn

from mimcore.errors import MimError
from mimcore.methods.grid_masking import (
    hierarchical_scales,
    plan_grid_masks,
    token_hidden,
    voxel_hidden,
)
from mimcore.models import swin
from mimcore.models.swin import SwinConfig, build_swin_encoder

_TUPLE_FIELDS = ("depths", "num_heads", "grids", "ratio_range", "remask_stages", "contrast_gamma")

#: settings of earlier versions that :meth:`GMIMConfig.from_dict` accepts and drops:
#: the target branch's old intensity augmentation ``y * U(1 +- aug_scale) + U(+- aug_shift)``,
#: replaced by the published MONAI transforms
LEGACY_FIELDS = ("aug_scale", "aug_shift")

CROSS_CORRELATIONS = ("published", "standardised")


@dataclass(frozen=True)
class GMIMConfig:
    """Sizes and settings of GMIM. Defaults are the published ``base``.

    input_size: edge S of the network input (multiple of patch * 16).
    crop_size: edge R of the region x and y are cut from (S <= R; overlap is guaranteed).
    feature_size, depths, num_heads, window_size, patch_size: the Swin encoder (with input_size:
        a :class:`mimcore.models.swin.SwinConfig`, :attr:`swin`; the presets take them from
        :data:`mimcore.models.swin.PRESETS`).
    proj_dim: projector output (512 for a 768-d last stage).
    grids: candidate cells per axis; each must divide the patch-embedding token map.
    entropy_bins: histogram bins over [0, 1] for the cell entropy.
    grid_exponent: the criterion is ``g^-grid_exponent * std / mean``.
    ratio_range: mask ratios of the lowest and highest entropy cells.
    remask_stages: encoder stages (0-3, stage k = MONAI ``layers{k+1}``, increasing) before
        which a fresh mask may be applied, after the first mask (which is applied after the
        patch embedding, i.e. also before stage 0); remask_prob its probability,
        remask_factor the ratio factor per call (the i-th re-mask: ``remask_factor**i``).
    cross_correlation: ``published`` (per image, unstandardised, two projectors) or
        ``standardised`` (Barlow-Twins over the batch's tokens, one shared projector).
    barlow_lambda: off-diagonal weight of the cross-correlation loss.
    barlow_weight, recon_weight: weights of the two losses in the total.
    flip_prob: per image, axis and branch, the probability of a flip.
    contrast_gamma, contrast_prob: y's ``RandAdjustContrast``.
    shift_offset, shift_prob: y's ``RandShiftIntensity`` (offset in +- shift_offset).
    noise_std, noise_prob: y's ``RandGaussianNoise`` (mean 0, each call's std U(0, noise_std)).
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
    remask_stages: tuple[int, ...] = (0, 1, 2)
    remask_prob: float = 0.3
    remask_factor: float = 0.5
    cross_correlation: str = "published"
    barlow_lambda: float = 0.005
    barlow_weight: float = 0.005
    recon_weight: float = 1.0
    flip_prob: float = 0.5
    contrast_gamma: tuple[float, float] = (0.7, 1.5)
    contrast_prob: float = 0.7
    shift_offset: float = 0.4
    shift_prob: float = 0.4
    noise_std: float = 0.1
    noise_prob: float = 0.5
    drop_path_rate: float = 0.0

    def __post_init__(self):
        s, p, n = self.input_size, self.patch_size, len(self.depths)
        if n != 4 or len(self.num_heads) != 4:
            raise MimError("GMIM's Swin encoder (MONAI SwinUNETR) has 4 stages: depths and num_heads need 4 values")
        if s % (p * 2**n):
            raise MimError(f"GMIM input_size {s} must be a multiple of patch * 2^stages = {p * 2**n}")
        if self.crop_size < s:
            raise MimError(f"GMIM crop_size {self.crop_size} is smaller than input_size {s}")
        self._check_remask_stages(n)
        for g in self.grids:
            if (s // p) % g:
                raise MimError(f"GMIM grid {g} does not divide the {s // p}^3 patch-embedding token map")
            for k in self.remask_stages:  # re-mask maps: cells of whole tokens, or whole tokens of cells
                t = s // (p * 2**k)
                if t % g and g % t:
                    raise MimError(f"GMIM grid {g} does not fit the {t}^3 token map before stage {k}")
        if not 0 <= self.ratio_range[0] <= self.ratio_range[1] <= 1:
            raise MimError(f"GMIM ratio_range {self.ratio_range} must be within [0, 1] and increasing")
        self._check_augmentation()
        if self.cross_correlation not in CROSS_CORRELATIONS:
            raise MimError(f"GMIM cross_correlation {self.cross_correlation!r}: choose one of "
                           f"{', '.join(CROSS_CORRELATIONS)}")

    def _check_remask_stages(self, n: int) -> None:
        st = tuple(self.remask_stages)
        if any(not 0 <= k < n for k in st) or any(a >= b for a, b in zip(st, st[1:])):
            raise MimError(f"GMIM remask_stages {st} must be increasing stage indices in 0..{n - 1} "
                           f"(stage k = MONAI layers{{k+1}})")

    def _check_augmentation(self) -> None:
        for name in ("flip_prob", "contrast_prob", "shift_prob", "noise_prob", "remask_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise MimError(f"GMIM {name} {getattr(self, name)} must be a probability in [0, 1]")
        if not 0 < self.contrast_gamma[0] <= self.contrast_gamma[1]:
            raise MimError(f"GMIM contrast_gamma {self.contrast_gamma} must be positive and increasing")
        if self.shift_offset < 0 or self.noise_std < 0:
            raise MimError("GMIM shift_offset and noise_std must not be negative")

    @property
    def swin(self) -> SwinConfig:
        """The Swin encoder's sizes."""
        return SwinConfig(**{f: getattr(self, f) for f in SwinConfig.__dataclass_fields__})

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
        """The config of a ``to_dict`` (also of earlier versions: :data:`LEGACY_FIELDS` are
        dropped, missing settings take their defaults)."""
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k not in LEGACY_FIELDS}
        unknown = set(d) - names
        if unknown:
            raise MimError(f"unknown GMIM settings: {', '.join(sorted(unknown))}")
        return cls(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in d.items()})


def on_swin(size: str, **settings) -> GMIMConfig:
    """GMIM with the Swin encoder of ``size`` (:data:`mimcore.models.swin.PRESETS`: input size,
    feature size, depths, heads, window, patch) and the method ``settings`` given."""
    return GMIMConfig(**swin.preset(size).to_dict(), **settings)


GMIM_PRESETS: dict[str, GMIMConfig] = {
    # As published: 128^3 input from 160^3 regions, grids 4/8/16 (cells of 32/16/8 voxels),
    # projectors 768 -> 512. Re-mask token maps 64^3, 32^3, 16^3: every grid fits.
    "base": on_swin("base"),
    # CPU-sized (about 1-2 s per crop per step on one core): 64^3 input from 80^3 regions
    # (base's 1.25 ratio), projectors 384 -> 256 (base's 2/3), grids 2/4/8 so cells keep
    # base's 32/16/8 voxels (re-mask token maps 32^3, 16^3, 8^3).
    "small": on_swin("small", crop_size=80, proj_dim=256, grids=(2, 4, 8)),
    # For tests: as small on the tiny encoder, projectors 192 -> 128.
    "tiny": on_swin("tiny", crop_size=80, proj_dim=128, grids=(2, 4, 8)),
}


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


def random_flips(x: torch.Tensor, prob: float = 0.5, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each image along each spatial axis with probability ``prob``.

    x (B, C, D, H, W) -> (flipped x, same shape; flags (B, 3) bool, True where axis d/h/w
    of image b was flipped). Draws: one (B, 3) uniform tensor from ``generator``.
    """
    flags = torch.rand(x.shape[0], 3, generator=generator, dtype=torch.float64) < prob
    out = [img.flip([1 + a for a in range(3) if f[a]]) if any(f) else img
           for img, f in zip(x, flags.tolist())]
    return torch.stack(out), flags


def intensity_transforms(cfg: GMIMConfig) -> list:
    """Fresh MONAI transforms of the target branch, in order: ``RandAdjustContrast``,
    ``RandShiftIntensity``, ``RandGaussianNoise`` (each acting on one (C, D, H, W) image)."""
    return [RandAdjustContrast(prob=cfg.contrast_prob, gamma=tuple(cfg.contrast_gamma)),
            RandShiftIntensity(offsets=cfg.shift_offset, prob=cfg.shift_prob),
            RandGaussianNoise(prob=cfg.noise_prob, mean=0.0, std=cfg.noise_std)]


def intensity_augment(y: torch.Tensor, cfg: GMIMConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """y's intensity augmentation, per image: (B, C, D, H, W) -> same shape and dtype.

    Draws a (B, 3) tensor of seeds from ``generator``; image b's transform t is seeded
    with ``seeds[b, t]`` (``set_random_state``), so the result is reproducible from it.
    """
    seeds = torch.randint(0, 2**31 - 1, (y.shape[0], 3), generator=generator).tolist()
    out = []
    for img, row in zip(y, seeds):
        for t, seed in zip(intensity_transforms(cfg), row):
            img = t.set_random_state(seed=seed)(img)
        out.append(convert_to_tensor(img, track_meta=False).to(y.dtype))
    return torch.stack(out)


def augment_pair(x: torch.Tensor, y: torch.Tensor, cfg: GMIMConfig, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, 1, S, S, S) -> augmented x, y, same shapes.

    x: random flips only (it is also the reconstruction target); y: random flips, then
    :func:`intensity_augment`. Draw order: x's flips, y's flips, y's transform seeds.
    """
    x, _ = random_flips(x, cfg.flip_prob, generator)
    y, _ = random_flips(y, cfg.flip_prob, generator)
    return x, intensity_augment(y, cfg, generator)


# --------------------------------------------------------------------------- losses


def cross_correlation_loss(zx: torch.Tensor, zy: torch.Tensor, lambd: float = 0.005) -> torch.Tensor:
    """GMIM's published cross-correlation loss: zx, zy (B, n, D) -> scalar.

    Per image b, C_b = zx_b^T zy_b / n (D, D), the features not standardised;
    loss_b = sum_i (1 - C_b,ii)^2 + lambd * sum_{i != j} C_b,ij^2; the mean over b.
    Computed in float32 (outside autocast).
    """
    with torch.autocast(zx.device.type, enabled=False):
        zx, zy = zx.float(), zy.float()
        c = zx.transpose(1, 2) @ zy / zx.shape[1]  # (B, D, D)
        diag = torch.diagonal(c, dim1=1, dim2=2)  # (B, D)
        on = (1 - diag).pow(2).sum(1)
        off = c.pow(2).sum((1, 2)) - diag.pow(2).sum(1)
        return (on + lambd * off).mean()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.005, eps: float = 1e-5) -> torch.Tensor:
    """Standardised Barlow-Twins loss of paired samples z1, z2 (N, D) -> scalar (the
    ``cross_correlation="standardised"`` option, not the published form).

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


def hidden_voxel_mse(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The published ``--invis_patches`` MSE: pred, target (B, 1, S, S, S), hidden bool
    (B, 1, S, S, S) -> scalar. Visible voxels are zeroed in both, the squared error is
    averaged over all B * S^3 voxels (hidden ones only contribute)."""
    keep = hidden.to(torch.float32)
    return F.mse_loss(pred.float() * keep, target.float() * keep)


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


def image_tokens(features: torch.Tensor) -> torch.Tensor:
    """(N, C, s, s, s) -> (N, s^3, C): each image's tokens in raster order."""
    return features.flatten(2).transpose(1, 2)


def _shared_projector_state(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: a state dict of the old shared-projector model (``projector.*``,
    no ``target_projector.*``) gets the target projector as a copy of the shared one."""
    if getattr(module, "target_projector", None) is None:
        return
    if any(k.startswith(prefix + "target_projector.") for k in state_dict):
        return
    for name in ("weight", "bias"):
        if prefix + "projector." + name in state_dict:
            state_dict[prefix + "target_projector." + name] = state_dict[prefix + "projector." + name]


class GMIMPretrainModel(nn.Module):
    """Swin encoder + reconstruction decoder + projector(s). ``forward(region, generator)`` -> losses.

    ``projector`` is the online (x) projector; ``target_projector`` the target (y) one
    (None with ``cross_correlation="standardised"``, where ``projector`` is shared).

    ``forward`` returns scalar tensors: ``loss`` (weighted total), ``recon`` (the
    ``--invis_patches`` MSE), ``barlow`` (the cross-correlation term, published or
    standardised), and diagnostics ``mask_ratio`` (fraction of voxels hidden by the first
    mask), ``grid`` (mean chosen cells per axis) and ``remasked`` (re-masks applied, 0-3).
    """

    def __init__(self, cfg: GMIMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or GMIMConfig()
        self.encoder = build_swin_encoder(cfg.feature_size, cfg.depths, cfg.num_heads, cfg.window_size,
                                          cfg.patch_size, cfg.drop_path_rate)
        self.decoder = ReconDecoder(cfg.encoder_dim, n_up=int(round(math.log2(cfg.downsampling))))
        self.projector = nn.Linear(cfg.encoder_dim, cfg.proj_dim)
        self.target_projector = nn.Linear(cfg.encoder_dim, cfg.proj_dim) \
            if cfg.cross_correlation == "published" else None
        self.register_load_state_dict_pre_hook(_shared_projector_state)

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
        after the patch embedding (the first mask, ratio scale 1) and, before stage
        ``cfg.remask_stages[i]``, again with a fresh mask at ratio scale ``remask[i]``
        where that is not None (a re-mask of stage 0 follows the first mask). ``record``,
        if given, receives ``(stage, hidden)`` for every mask applied, in order.
        """
        enc = self.encoder
        h = enc.pos_drop(enc.patch_embed(x))
        if plan is None:
            points = []
        else:
            points = [(0, 1.0)] + [(k, s) for k, s in zip(self.cfg.remask_stages, remask or []) if s is not None]
        hidden0 = None
        for stage, layer in enumerate(self.stages()):
            for _, scale in [p for p in points if p[0] == stage]:
                hid = token_hidden(plan, h.shape[-1], scale, generator).to(h.device)
                h = h * (~hid)[:, None].to(h.dtype)
                hidden0 = hid if hidden0 is None else hidden0
                if record is not None:
                    record.append((stage, hid))
            h = layer(h.contiguous())
        return enc.proj_out(h, normalize=True), hidden0

    def plan(self, x: torch.Tensor):
        """Grid choice and per-cell ratios of x (N, 1, S, S, S)."""
        c = self.cfg
        return plan_grid_masks(x, c.grids, c.entropy_bins, c.ratio_range, c.grid_exponent)

    def correlation(self, fx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-correlation term of x's last-stage features fx (N, 16F, s, s, s) (with graph)
        and the target crop y (N, 1, S, S, S), encoded here without gradient -> scalar."""
        c = self.cfg
        zx = self.projector(image_tokens(fx))  # (N, L, P)
        with torch.no_grad():  # target branch: same encoder weights, no gradient
            fy, _ = self.encode(y)
        if c.cross_correlation == "published":
            return cross_correlation_loss(zx, self.target_projector(image_tokens(fy)), c.barlow_lambda)
        with torch.no_grad():
            zy = self.projector(image_tokens(fy))
        return barlow_twins_loss(zx.flatten(0, 1), zy.flatten(0, 1), c.barlow_lambda)

    def forward(self, crop: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """crop (N, 1, R, R, R) in [0, 1] -> dict of scalar losses (see the class docstring).

        Draw order from ``generator``: crop offsets, :func:`augment_pair`, re-mask draws,
        then the masks (first, then each applied re-mask).
        """
        c = self.cfg
        x, y, _ = crop_pair(crop, c.input_size, generator)
        x, y = augment_pair(x, y, c, generator)
        plan = self.plan(x)
        remask = hierarchical_scales(len(c.remask_stages), c.remask_prob, c.remask_factor, generator)

        fx, hidden0 = self.encode(x, plan, generator, remask)
        hidden_vox = voxel_hidden(hidden0, c.patch_size)
        recon = hidden_voxel_mse(self.decoder(fx), x, hidden_vox)
        corr = self.correlation(fx, y)
        dev = recon.device
        return {
            "loss": c.recon_weight * recon + c.barlow_weight * corr,
            "recon": recon,
            "barlow": corr,
            "mask_ratio": hidden_vox.float().mean().to(dev),
            "grid": torch.tensor(sum(plan.grids) / len(plan.grids), device=dev),
            "remasked": torch.tensor(float(sum(s is not None for s in remask)), device=dev),
        }

    @torch.no_grad()
    def reconstruct_preview(self, volume: torch.Tensor, generator: torch.Generator | None = None,
                            hierarchical: bool = False) -> dict[str, torch.Tensor]:
        """volume (1, 1, S, S, S) -> {"input": the volume with hidden voxels zeroed,
        "reconstruction": decoder output, "hidden_mask": bool voxel mask}, each (1, 1, S, S, S).

        The grid mask as in training (no augmentation); re-masking only with ``hierarchical=True``.
        """
        c = self.cfg
        plan = self.plan(volume)
        remask = hierarchical_scales(len(c.remask_stages), c.remask_prob, c.remask_factor, generator) \
            if hierarchical else None
        f, hidden0 = self.encode(volume, plan, generator, remask)
        hidden_vox = voxel_hidden(hidden0, c.patch_size)
        return {"input": volume * (~hidden_vox).to(volume.dtype), "reconstruction": self.decoder(f),
                "hidden_mask": hidden_vox}
