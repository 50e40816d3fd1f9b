"""Size presets of the MiM model. All keep the published structure: a token is a 16^3
block (four stride-2 stages), the pre-training crop is twice the network input, and
level-1 octants are (grid/2)^3 tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mimcore.errors import MimError


@dataclass(frozen=True)
class ModelConfig:
    """Backbone + pre-training decoder sizes. ``input_size`` is the network input edge (voxels)."""

    input_size: int = 96
    dims: tuple[int, int, int, int] = (48, 96, 192, 384)
    conv_depths: tuple[int, int, int] = (2, 2, 2)
    vit_depth: int = 11
    vit_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_dim: int = 576
    decoder_depth: int = 8
    decoder_heads: int = 16
    patch_size: int = 16

    @property
    def grid(self) -> int:
        """Tokens along each axis of the network input (6 for 96^3)."""
        return self.input_size // self.patch_size

    @property
    def crop_size(self) -> int:
        """Edge of the full-resolution pre-training crop (192 for ``base``)."""
        return 2 * self.input_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        for key in ("dims", "conv_depths"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


#: The cross-level alignment terms MiM offers (see :mod:`mimcore.methods.mim`).
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


PRESETS: dict[str, ModelConfig] = {
    # The published size: 34.0 M encoder values, 71.3 M with the decoder.
    "base": ModelConfig(),
    # CPU-friendly: 64^3 input (4^3 tokens), octants of 2^3 tokens, level-3 blocks upsampled x4.
    "small": ModelConfig(
        input_size=64, dims=(24, 48, 96, 192), vit_depth=6, vit_heads=6,
        decoder_dim=192, decoder_depth=3, decoder_heads=6,
    ),
    # For tests: 32^3 input (2^3 tokens), octants of one token, level-3 blocks upsampled x2.
    "tiny": ModelConfig(
        input_size=32, dims=(6, 12, 24, 48), vit_depth=2, vit_heads=2,
        decoder_dim=48, decoder_depth=1, decoder_heads=2,
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of a preset name (``base``, ``small``, ``tiny``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise MimError(f"unknown model size {name!r}; choose one of: {', '.join(PRESETS)}") from None
