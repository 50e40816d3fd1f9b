"""Import a MiM checkpoint published by the authors into our model.

The published pre-training model (ConvMAE-style, ``base`` size) stores its weights as a
``.pth`` file holding ``{"model": state_dict}``; the parameter names and shapes are
listed in ``Testing/core/data/mim_official_pretrain_state_dict_shapes.json``. Our
modules are named differently and our 1x1x1 convolutions are ``nn.Linear`` layers, so
the import goes through an explicit name mapping, :data:`NAME_RULES`:

==========================================  ==================================================
official                                    ours (``MiMPretrainModel``)
==========================================  ==================================================
``patch_embed{1-4}.proj/norm``              ``encoder.embeds.{0-3}.proj/norm``
``blocks{1-3}.{j}.norm1/norm2``             ``encoder.conv_stages.{0-2}.{j}.norm1/norm2``
``blocks{1-3}.{j}.conv1`` (o, i, 1, 1, 1)   ``encoder.conv_stages.{0-2}.{j}.pw_in`` (o, i)
``blocks{1-3}.{j}.attn`` (5^3 depthwise)    ``encoder.conv_stages.{0-2}.{j}.dw``
``blocks{1-3}.{j}.conv2`` (o, i, 1, 1, 1)   ``encoder.conv_stages.{0-2}.{j}.pw_out`` (o, i)
``blocks{1-3}.{j}.mlp.fc1/fc2`` (1x1x1)     ``encoder.conv_stages.{0-2}.{j}.mlp.linear1/2``
``patch_embed5``                            ``encoder.token_proj``
``pos_embed``                               ``encoder.pos_embed`` (buffer)
``blocks4.{k}.norm1/attn.qkv/attn.proj``    ``encoder.blocks.{k}.norm1/attn.qkv/attn.proj``
``blocks4.{k}.norm2/mlp.fc1/mlp.fc2``       ``encoder.blocks.{k}.norm2/mlp.linear1/linear2``
``stage{1-3}_output_decode``                ``encoder.skips.{0-2}``
``norm``                                    ``encoder.norm``
``decoder_embed``                           ``decoder.embed``
``mask_token``                              ``decoder.mask_token``
``decoder_pos_embed``                       ``decoder.pos_embed`` (buffer)
``decoder_blocks.{k}.*``                    ``decoder.blocks.{k}.*`` (fc1/fc2 -> linear1/2)
``decoder_norm`` / ``decoder_pred``         ``decoder.norm`` / ``decoder.pred``
``aggregate_mid.fc1/fc2``                   ``align12_child.linear1/linear2``
``aggregate_pred_up_feature.fc1/fc2``       ``align12_parent.linear1/linear2``
``aggregate_down.fc1/fc2``                  ``align23_child.linear1/linear2``
``aggregate_pred_mid_feature.fc1/fc2``      ``align23_parent.linear1/linear2``
==========================================  ==================================================

The four ``aggregate_*`` MLPs are the published alignment heads, read from the released
``forward``: ``aggregate_mid`` maps the mean level-2 feature, ``aggregate_pred_up_feature``
the level-1 octant means, ``aggregate_down`` the mean level-3 feature and
``aggregate_pred_mid_feature`` the level-2 volume's mean (the parent of A23). They import
into our heads of the same role, so the ``published`` and ``ce`` alignments compute the
authors' terms; under ``region`` the A23 parent head sees the cut level-2 token instead
of the volume's mean. (The published position embeddings are imported as they are; ours
are built in the same layout, :mod:`mimcore.models.posembed`.)

Checkpoints are read with ``torch.load(..., weights_only=True)`` only: a file whose
pickle asks for anything but plain tensors and containers is refused.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mimcore.errors import MimError

# --------------------------------------------------------------------------- mapping


def _squeeze_1x1x1(t: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 Conv3d weight (out, in, 1, 1, 1) -> the equivalent nn.Linear weight (out, in)."""
    if t.dim() == 5 and tuple(t.shape[2:]) == (1, 1, 1):
        return t.reshape(t.shape[0], t.shape[1])
    return t  # wrong shape: left as is, reported as a shape mismatch


_Transform = Callable[[torch.Tensor], torch.Tensor] | None

# (official name regex, our name template, transform of the weight). Groups of the
# regex are substituted into the template; ``{s}`` is the stage index minus one.
# Tried in order; a name matching no rule is not imported.
NAME_RULES: list[tuple[str, str, _Transform]] = [
    # ---- encoder: conv stages 1-3
    (r"patch_embed([1-4])\.proj\.(weight|bias)", "encoder.embeds.{s}.proj.{1}", None),
    (r"patch_embed([1-4])\.norm\.(weight|bias)", "encoder.embeds.{s}.norm.{1}", None),
    (r"blocks([1-3])\.(\d+)\.norm1\.(weight|bias)", "encoder.conv_stages.{s}.{1}.norm1.{2}", None),
    (r"blocks([1-3])\.(\d+)\.conv1\.weight", "encoder.conv_stages.{s}.{1}.pw_in.weight", _squeeze_1x1x1),
    (r"blocks([1-3])\.(\d+)\.conv1\.bias", "encoder.conv_stages.{s}.{1}.pw_in.bias", None),
    (r"blocks([1-3])\.(\d+)\.attn\.(weight|bias)", "encoder.conv_stages.{s}.{1}.dw.{2}", None),
    (r"blocks([1-3])\.(\d+)\.conv2\.weight", "encoder.conv_stages.{s}.{1}.pw_out.weight", _squeeze_1x1x1),
    (r"blocks([1-3])\.(\d+)\.conv2\.bias", "encoder.conv_stages.{s}.{1}.pw_out.bias", None),
    (r"blocks([1-3])\.(\d+)\.norm2\.(weight|bias)", "encoder.conv_stages.{s}.{1}.norm2.{2}", None),
    (r"blocks([1-3])\.(\d+)\.mlp\.fc1\.weight", "encoder.conv_stages.{s}.{1}.mlp.linear1.weight", _squeeze_1x1x1),
    (r"blocks([1-3])\.(\d+)\.mlp\.fc1\.bias", "encoder.conv_stages.{s}.{1}.mlp.linear1.bias", None),
    (r"blocks([1-3])\.(\d+)\.mlp\.fc2\.weight", "encoder.conv_stages.{s}.{1}.mlp.linear2.weight", _squeeze_1x1x1),
    (r"blocks([1-3])\.(\d+)\.mlp\.fc2\.bias", "encoder.conv_stages.{s}.{1}.mlp.linear2.bias", None),
    # ---- encoder: tokens, transformer, skips
    (r"patch_embed5\.(weight|bias)", "encoder.token_proj.{0}", None),
    (r"pos_embed", "encoder.pos_embed", None),
    (r"blocks4\.(\d+)\.(norm1|norm2)\.(weight|bias)", "encoder.blocks.{0}.{1}.{2}", None),
    (r"blocks4\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", "encoder.blocks.{0}.attn.{1}.{2}", None),
    (r"blocks4\.(\d+)\.mlp\.fc1\.(weight|bias)", "encoder.blocks.{0}.mlp.linear1.{1}", None),
    (r"blocks4\.(\d+)\.mlp\.fc2\.(weight|bias)", "encoder.blocks.{0}.mlp.linear2.{1}", None),
    (r"stage([1-3])_output_decode\.(weight|bias)", "encoder.skips.{s}.{1}", None),
    (r"norm\.(weight|bias)", "encoder.norm.{0}", None),
    # ---- decoder
    (r"decoder_embed\.(weight|bias)", "decoder.embed.{0}", None),
    (r"mask_token", "decoder.mask_token", None),
    (r"decoder_pos_embed", "decoder.pos_embed", None),
    (r"decoder_blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", "decoder.blocks.{0}.{1}.{2}", None),
    (r"decoder_blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", "decoder.blocks.{0}.attn.{1}.{2}", None),
    (r"decoder_blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", "decoder.blocks.{0}.mlp.linear1.{1}", None),
    (r"decoder_blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", "decoder.blocks.{0}.mlp.linear2.{1}", None),
    (r"decoder_norm\.(weight|bias)", "decoder.norm.{0}", None),
    (r"decoder_pred\.(weight|bias)", "decoder.pred.{0}", None),
    # ---- alignment heads (2-layer MLPs: fc1/fc2 -> MONAI MLPBlock linear1/linear2)
    (r"aggregate_mid\.fc([12])\.(weight|bias)", "align12_child.linear{0}.{1}", None),
    (r"aggregate_pred_up_feature\.fc([12])\.(weight|bias)", "align12_parent.linear{0}.{1}", None),
    (r"aggregate_down\.fc([12])\.(weight|bias)", "align23_child.linear{0}.{1}", None),
    (r"aggregate_pred_mid_feature\.fc([12])\.(weight|bias)", "align23_parent.linear{0}.{1}", None),
]
_COMPILED = [(re.compile(pat), tpl, fn) for pat, tpl, fn in NAME_RULES]

#: Official tensors that belong to the pre-training head, not the encoder.
NON_ENCODER_PREFIXES = ("decoder", "mask_token", "aggregate")
#: Official tensors deliberately left out (no documented counterpart in our model): none
#: since the alignment heads are mapped; kept for :attr:`ImportReport.not_imported`.
NOT_IMPORTED_PREFIXES: tuple[str, ...] = ()


def is_encoder_name(official_name: str) -> bool:
    """True for official tensors of the encoder (all but ``decoder*``, ``mask_token``, ``aggregate*``)."""
    return not official_name.startswith(NON_ENCODER_PREFIXES)


def map_name(official_name: str) -> tuple[str, _Transform] | None:
    """Our name (``MiMPretrainModel`` naming) and weight transform of an official tensor, or None."""
    for pat, tpl, fn in _COMPILED:
        m = pat.fullmatch(official_name)
        if m:
            groups = m.groups()
            s = str(int(groups[0]) - 1) if groups and groups[0].isdigit() else ""
            return tpl.format(*groups, s=s), fn
    return None


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport:
    """What an import did. Names in ``loaded``/``missing`` are ours, in ``unused`` official.

    ``shape_mismatch`` holds ``"official -> ours: (shape) vs (shape)"`` lines;
    ``not_imported`` lists the official tensors left out on purpose (none at present:
    the ``aggregate_*`` alignment heads, once left out, are mapped).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    not_imported: list[str] = field(default_factory=list)
    loaded_values: int = 0

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors ({self.loaded_values:,} values)"]
        if self.not_imported:
            lines.append(f"not imported (no documented counterpart in our model): {len(self.not_imported)} "
                         f"tensors, e.g. {', '.join(self.not_imported[:4])}")
        other_unused = [n for n in self.unused if n not in set(self.not_imported)]
        if other_unused:
            lines.append(f"unused: {len(other_unused)}, e.g. {', '.join(other_unused[:4])}")
        if self.shape_mismatch:
            lines.append(f"shape mismatch: {len(self.shape_mismatch)}, e.g. {'; '.join(self.shape_mismatch[:3])}")
        if self.missing:
            lines.append(f"not set in our model: {len(self.missing)}, e.g. {', '.join(self.missing[:4])}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- API


def load_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a published checkpoint (``{"model": sd}`` or a bare sd).

    Read with ``torch.load(weights_only=True)``: pickles that would build anything but
    tensors and plain containers are refused with :class:`MimError`.
    """
    path = Path(path)
    if not path.is_file():
        raise MimError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # keep torch's line naming the offending global, drop its advice to disable weights_only
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[-1] if lines else "")
        raise MimError(
            f"refused: not a plain tensor checkpoint ({path}). Its pickle asks to build objects or run "
            f"code beyond tensors and plain containers, so it was not loaded; only use checkpoints from "
            f"a trusted source, saved as {{'model': state_dict}}. Detail: {detail or type(exc).__name__}"
        ) from None
    except Exception as exc:  # corrupt zip, truncated file, not a torch file at all
        raise MimError(f"could not read checkpoint {path}: {type(exc).__name__}: {exc}") from None

    sd = obj
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
    if not isinstance(sd, dict):
        raise MimError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict (expected {{'model': state_dict}})")
    tensors = {str(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise MimError(f"checkpoint {path} holds no tensors (expected {{'model': state_dict}})")
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def convert_official_state_dict(
    sd: dict[str, torch.Tensor], include_decoder: bool = True
) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Rename (and reshape 1x1x1 conv weights of) an official state dict to our names.

    Returns ``(ours, report)``: ``ours`` uses ``MiMPretrainModel`` names (``encoder.*``,
    ``decoder.*``, ``align*``); ``report.loaded`` lists them, ``report.unused`` the official names
    not converted (decoder and ``aggregate_*`` tensors when ``include_decoder`` is
    False, unknown names).
    """
    ours: dict[str, torch.Tensor] = {}
    report = ImportReport()
    for name, tensor in sd.items():
        mapped = map_name(name)
        if name.startswith(NOT_IMPORTED_PREFIXES):
            report.not_imported.append(name)
        if mapped is None or (not include_decoder and not is_encoder_name(name)):
            report.unused.append(name)
            continue
        target, fn = mapped
        if target in ours:
            raise MimError(f"two official tensors map to {target!r} (second: {name!r})")
        ours[target] = fn(tensor) if fn is not None else tensor
        report.loaded.append(target)
        report.loaded_values += tensor.numel()
    return ours, report


def import_official(model: nn.Module, path: str | Path, strict_encoder: bool = True) -> ImportReport:
    """Load a published MiM checkpoint into ``model`` (a ``MiMPretrainModel`` or a ``ConvViT3D``).

    Every tensor is copied in place into the matching parameter or buffer. Raises
    :class:`MimError` when nothing matched, or when ``strict_encoder`` and an official
    encoder tensor was left unused or had the wrong shape.
    """
    from mimcore.methods.mim import MiMPretrainModel
    from mimcore.models.convvit import ConvViT3D

    if isinstance(model, MiMPretrainModel):
        prefix, include_decoder = "", True
    elif isinstance(model, ConvViT3D):
        prefix, include_decoder = "encoder.", False
    else:
        raise MimError(f"import_official expects a MiMPretrainModel or ConvViT3D, got {type(model).__name__}")

    official = load_official_checkpoint(path)
    converted, conv_report = convert_official_state_dict(official, include_decoder=include_decoder)
    back = {}  # our name -> official name, for messages
    for off_name in official:
        mapped = map_name(off_name)
        if mapped is not None:
            back[mapped[0]] = off_name

    targets = model.state_dict()  # detached views sharing storage with the parameters/buffers
    report = ImportReport(unused=list(conv_report.unused), not_imported=list(conv_report.not_imported))
    updates: dict[str, torch.Tensor] = {}
    for our_full, tensor in converted.items():
        off_name = back[our_full]
        our = our_full[len(prefix):] if prefix and our_full.startswith(prefix) else our_full
        if prefix and not our_full.startswith(prefix):
            report.unused.append(off_name)
            continue
        if our not in targets:
            report.unused.append(off_name)
            continue
        if tuple(targets[our].shape) != tuple(tensor.shape):
            report.shape_mismatch.append(
                f"{off_name} -> {our}: {tuple(official[off_name].shape)} vs ours {tuple(targets[our].shape)}")
            continue
        updates[our] = tensor
        report.loaded.append(our)
        report.loaded_values += tensor.numel()
    report.missing = [k for k in targets if k not in updates]

    if not updates:
        raise MimError(
            f"nothing in {path} matches the model: is it a published MiM checkpoint of the same size? "
            f"(first names: {', '.join(list(official)[:4])})")
    if strict_encoder:
        bad_unused = [n for n in report.unused if is_encoder_name(n)]
        bad_shape = [m for m in report.shape_mismatch if is_encoder_name(m.split(" ", 1)[0])]
        if bad_unused or bad_shape:
            parts = []
            if bad_unused:
                parts.append(f"{len(bad_unused)} encoder tensors unused (e.g. {', '.join(bad_unused[:4])})")
            if bad_shape:
                parts.append(f"{len(bad_shape)} with a different shape (e.g. {'; '.join(bad_shape[:3])})")
            raise MimError(
                f"checkpoint {path} does not fit this encoder: {' and '.join(parts)}. The published "
                f"checkpoint is the 'base' size; build the model with that preset "
                f"(or pass strict_encoder=False to load what fits).")

    with torch.no_grad():
        for our, tensor in updates.items():
            targets[our].copy_(tensor)
    return report
