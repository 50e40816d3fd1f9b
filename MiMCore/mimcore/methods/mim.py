"""MiM (Mask in Mask): three levels of masked volumes reconstructed at once, with
cross-level alignment (METHODS.md section 1).

One training sample is a (2S)^3 full-resolution crop (192^3 for ``base``):

- level 1: the crop downsampled (trilinear) to S^3; half of its 8 token octants hidden;
- level 2: the hidden octants cut from the full-resolution crop, each S^3 (4 per crop),
  ``level2_mask_ratio`` of their tokens hidden;
- level 3: from each level-2 volume, ``level3_blocks`` of its hidden 16^3 tokens,
  upsampled trilinearly to S^3 (16 per crop), ``level3_mask_ratio`` hidden.

Each level's volumes go through the shared encoder and decoder as one batch. Every level
is reconstructed with the norm-pix MSE on its hidden tokens.

Cross-level alignment, ``MiMConfig.alignment`` (METHODS.md section 1, "Losses"). Notation:
f_i (N_i, L, Cd) are level i's decoder features after the decoder's LayerNorm, v a level-2
volume (n2 = 4 per crop), u a level-3 volume (n3 = ``level3_blocks`` per level-2 volume),
cut from token t(u) of its level-2 volume v(u); ``sg`` is stop-gradient, c12/p12/c23/p23
the heads ``align12_child``, ``align12_parent``, ``align23_child``, ``align23_parent``
(2-layer MLPs Cd -> Cd -> Cd, GELU), ``mean`` a mean over tokens.

- ``region`` (default; our design): A12 = mean_v 2 - 2 cos(c12(mean f2[v]),
  p12(sg mean of f1 over the octant v was cut from)); A23 = mean_u 2 - 2 cos(c23(mean
  f3[u]), p23(sg f2[v(u), t(u)])).
- ``published`` (the released ``attn_loss_name byol`` terms): A12 = mean over crops b and
  j < n2 of 2 - 2 cos(mean f2[b, 0], c12(mean f2[b, j])) - the released loop pairs the
  crop's first level-2 volume's raw mean with the head of each of its level-2 volumes
  (itself included; METHODS.md's "each level-2 volume against an MLP of itself" is the
  j = 0 term); level 1 and p12 are unused (p12 is kept, frozen, so checkpoints of
  every alignment hold the same tensors) and nothing is detached. A23 = mean_u 2 - 2
  cos(c23(mean f3[u]), p23(sg mean of f2[v(u)] over all L tokens)).
- ``ce`` (the released default ``attn_loss_name CE``): cross-entropy of cosine logits
  (divided by ``ce_temperature``; 1 as released) between a child and candidate parents.
  A12: c12(mean f2[v]) against p12(sg octant mean of f1) for each of its crop's 8
  octants, target the octant v was cut from (8-way, chance 1/8). A23: c23(mean f3[u])
  against p23(sg f2[v(u), t]) for each of the L tokens t of its level-2 volume, target
  t(u) (L-way, chance 1/L). Reported as ``a12``/``a23``, so the total keeps its formula.
  With temperature 1 the logits lie in [-1, 1], so even a perfect classifier keeps a
  loss of at least log(1 + (M - 1) e^-2) for M candidates.

Collapse monitor (detached scalars in the returned dict, logged but not in the loss):
``cos12_match``/``cos23_match`` are the mean cosine of the alignment's child embedding
with its own parent, ``cos12_mismatch``/``cos23_mismatch`` with another pair's: for
``region`` the parents rolled by one pair (another hidden octant / another cut token),
for ``published`` by one parent (the next crop's anchor for A12 - with one crop per step
there is no other, and mismatch equals match: the released A12 has no per-child target;
the next level-2 volume for A23). For ``ce`` they are the cosine logit of the true
candidate and the mean over the wrong ones, and ``acc12``/``acc23`` the classifier's
top-1 accuracy, with ``acc12_chance``/``acc23_chance`` (1/8, 1/L) logged next to them.
When matched and mismatched cosines meet (or the accuracy sits at chance), the alignment
carries no information about where the child came from.

Deviations from the published code, on purpose:

- Level-1 octants are true spatial octants; the released code groups 27 consecutive
  raster tokens and matches them to image octants by index, so its level-2 volume does
  not cover the hidden region (METHODS.md). ``ce`` therefore classifies true octants.
- The default alignment is ``region`` (METHODS.md: our design), not the released ones.
- ``published`` A12 is computed per crop. The released loop indexes the level-2 means
  with the crop index (``pred_mid_feature[i]``), which is the crop's first level-2 volume
  only with one crop per GPU - the published run's setting - so that is what we use.
- ``ce`` A23 is repaired: the released code labels a level-3 volume with its level-2
  token id but scores it against the level-2 volume's mean feature, a single logit
  (marked TODO there; it cannot run). We score it against every token's feature.
- The released code computes the unused ``aggregate_pred_up_feature`` head under
  ``byol``; here p12 is frozen instead, so DistributedDataParallel sees no parameter
  without a gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn

from mimcore.errors import MimError
from mimcore.methods.losses import alignment_loss, cosine_logits, masked_mse, norm_pix_target, pair_cosines
from mimcore.methods.masking import (
    patchify,
    random_hidden,
    split_by_mask,
    split_octants,
    token_octants,
)
from mimcore.models.convvit import ConvViT3D, ModelConfig, gather_tokens
from mimcore.models.decoder import MaskedDecoder
from mimcore.models.layers import init_linears_published


#: The cross-level alignment terms MiM offers (see the module docstring).
ALIGNMENTS = ("region", "published", "ce")


@dataclass(frozen=True)
class MiMConfig:
    """The mask-in-mask method: ratios, level-3 block count, loss weights and the
    cross-level alignment (METHODS.md).

    ``alignment``: ``region`` (our design, default), ``published`` (the released
    ``attn_loss_name byol`` terms) or ``ce`` (the released default ``attn_loss_name CE``:
    classify where each child came from). ``ce_temperature`` divides the cosine logits of
    ``ce`` (the released code uses the plain cosines: 1.0).
    """

    level1_octant_ratio: float = 0.5
    level2_mask_ratio: float = 0.6
    level3_mask_ratio: float = 0.5
    level3_blocks: int = 4
    norm_pix_eps: float = 1e-6
    loss_weights: dict = field(default_factory=lambda: {"l1": 1.0, "l2": 1.0, "l3": 1.0, "a12": 0.1, "a23": 0.1})
    alignment: str = "region"
    ce_temperature: float = 1.0

    def __post_init__(self):
        if self.alignment not in ALIGNMENTS:
            raise MimError(f"unknown MiM alignment {self.alignment!r}; choose one of: {', '.join(ALIGNMENTS)}")
        if not self.ce_temperature > 0:
            raise MimError(f"ce_temperature must be positive, got {self.ce_temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MiMConfig":
        return cls(**d)


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
    """Encoder + decoder + alignment heads. ``forward(crop, generator)`` -> dict of scalars.

    The returned dict holds ``loss`` (weighted total of the next five), ``l1``, ``l2``,
    ``l3`` (norm-pix MSE on hidden tokens), ``a12``, ``a23`` (alignment of the kind
    ``cfg.alignment``), and the detached collapse monitors (module doc) - not in ``loss``.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: MiMConfig | None = None):
        super().__init__()
        self.model_cfg = model_cfg
        self.cfg = cfg or MiMConfig()
        self.encoder = ConvViT3D(model_cfg)
        self.encoder.init_as_published()
        self.decoder = MaskedDecoder(model_cfg)  # initialised as published by itself
        d = model_cfg.decoder_dim
        self.align12_child, self.align12_parent, self.align23_child, self.align23_parent = (
            MLPBlock(d, d, act="GELU") for _ in range(4)
        )
        for head in (self.align12_child, self.align12_parent, self.align23_child, self.align23_parent):
            init_linears_published(head)
        if self.cfg.alignment == "published":  # unused by the released byol A12
            self.align12_parent.requires_grad_(False)

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
        out.update(self.alignment(feats, levels))
        w = self.cfg.loss_weights
        out["loss"] = sum(w[k] * out[k] for k in ("l1", "l2", "l3", "a12", "a23"))
        return out

    def alignment(self, feats: list[torch.Tensor], levels: Levels) -> dict[str, torch.Tensor]:
        """Cross-level alignment from decoder features [(B, L, Cd), (4B, L, Cd), (16B, L, Cd)]
        -> {"a12", "a23", monitors...} for ``cfg.alignment`` (module doc)."""
        kind = self.cfg.alignment
        if kind == "region":
            return self._region(*feats, levels)
        if kind == "published":
            return self._published(*feats, levels)
        return self._ce(*feats, levels)

    def _octant_means(self, f1: torch.Tensor) -> torch.Tensor:
        """f1 (B, L, Cd) -> (B, 8, Cd): the mean of each octant's tokens, detached."""
        onehot = F.one_hot(token_octants(self.model_cfg.grid).to(f1.device), 8).to(f1.dtype)  # (L, 8)
        return torch.einsum("bld,lo->bod", f1.detach(), onehot / onehot.sum(0))

    def _region(self, f1, f2, f3, levels: Levels) -> dict[str, torch.Tensor]:
        """f1 (B, L, Cd), f2 (4B, L, Cd), f3 (16B, L, Cd) -> terms and monitors of ``region``."""
        d = f1.shape[-1]
        # parent of each level-2 volume: mean of level-1 tokens in its octant (stop-gradient)
        parent12 = gather_tokens(self._octant_means(f1), levels.octants).reshape(-1, d)  # (4B, Cd)
        child12, head12 = self.align12_child(f2.mean(1)), self.align12_parent(parent12)
        # parent of each level-3 volume: the level-2 token it was cut from (stop-gradient)
        parent23 = gather_tokens(f2.detach(), levels.blocks).reshape(-1, d)  # (16B, Cd)
        child23, head23 = self.align23_child(f3.mean(1)), self.align23_parent(parent23)
        return _pair_terms(child12, head12, 1, child23, head23, 1)

    def _published(self, f1, f2, f3, levels: Levels) -> dict[str, torch.Tensor]:
        """As :meth:`_region`, for ``published`` (f1 is not used)."""
        n2, n3 = levels.octants.shape[1], levels.blocks.shape[1]
        mean2 = f2.mean(1)  # (4B, Cd)
        # A12: the crop's first level-2 volume's raw mean against the head of each of its volumes
        anchor = mean2.reshape(-1, n2, mean2.shape[-1])[:, 0].repeat_interleave(n2, dim=0)  # (4B, Cd)
        child12 = self.align12_child(mean2)
        # A23: the whole level-2 volume's mean (stop-gradient) against each level-3 child
        parent23 = self.align23_parent(f2.detach().mean(1)).repeat_interleave(n3, dim=0)  # (16B, Cd)
        child23 = self.align23_child(f3.mean(1))
        return _pair_terms(child12, anchor, n2, child23, parent23, n3)

    def _ce(self, f1, f2, f3, levels: Levels) -> dict[str, torch.Tensor]:
        """As :meth:`_region`, for ``ce``: cosine logits (4B, 8) over octants and (16B, L) over tokens."""
        (b, n2), (v, n3) = levels.octants.shape, levels.blocks.shape
        d = f1.shape[-1]
        child12 = self.align12_child(f2.mean(1)).reshape(b, n2, d)
        logits12 = cosine_logits(child12, self.align12_parent(self._octant_means(f1)))  # (4B, 8)
        child23 = self.align23_child(f3.mean(1)).reshape(v, n3, d)
        logits23 = cosine_logits(child23, self.align23_parent(f2.detach()))  # (16B, L)
        return {**_ce_terms("12", logits12, levels.octants, self.cfg.ce_temperature),
                **_ce_terms("23", logits23, levels.blocks, self.cfg.ce_temperature)}


def _pair_terms(child12, parent12, shift12, child23, parent23, shift23) -> dict[str, torch.Tensor]:
    """``2 - 2 cos`` alignment of both level pairs, child/parent (N, Cd), with their monitors;
    the mismatched parent of pair i is that of pair i - shift."""
    out = {"a12": alignment_loss(child12, parent12), "a23": alignment_loss(child23, parent23)}
    out["cos12_match"], out["cos12_mismatch"] = pair_cosines(child12, parent12, shift12)
    out["cos23_match"], out["cos23_mismatch"] = pair_cosines(child23, parent23, shift23)
    return out


def _ce_terms(pair: str, logits: torch.Tensor, target: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Cross-entropy of one ``ce`` term and its monitors: logits (N, M) cosines, target (G, K)
    candidate ids with G * K = N -> {"a<pair>", "cos<pair>_match", "cos<pair>_mismatch",
    "acc<pair>", "acc<pair>_chance"}."""
    target = target.reshape(-1)
    m = logits.shape[1]
    out = {f"a{pair}": F.cross_entropy(logits / temperature, target)}
    with torch.no_grad():
        true = logits.gather(1, target[:, None])[:, 0]  # (N,)
        out[f"cos{pair}_match"] = true.mean()
        out[f"cos{pair}_mismatch"] = ((logits.sum(1) - true) / (m - 1)).mean()
        out[f"acc{pair}"] = (logits.argmax(1) == target).float().mean()
        out[f"acc{pair}_chance"] = torch.tensor(1.0 / m, device=logits.device)
    return out
