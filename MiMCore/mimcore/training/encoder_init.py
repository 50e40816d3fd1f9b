"""Initialise a segmentation network from what the user has: a project pre-training
checkpoint (any method: its encoder goes into the network of its backbone - ConvViT3D into
MiMSegNet, ViT into UNETR, Swin into SwinUNETR), an authors' MiM ``.pth``, or an existing
segmentation bundle.

Every path reports which tensors were loaded, which are new (initialised at random)
and which were not used, and refuses (MimError) when nothing matched. Nothing is ever
unpickled except through ``torch.load(weights_only=True)`` (the authors' ``.pth``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mimcore.errors import MimError
from mimcore.models.checkpoint import find_checkpoint, read_checkpoint
from mimcore.models.mim_segnet import MiMSegNet
from mimcore.models.segnet import head_prefix, kind_of


@dataclass
class InitReport:
    """``source`` kind ("pretrain", "official", "bundle"); tensor names are ours."""

    source: str
    path: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    loaded_values: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"initialised from {self.source} {self.path}: loaded {len(self.loaded)} tensors "
                 f"({self.loaded_values:,} values), {len(self.new)} new"]
        if self.unused:
            lines.append(f"not used: {len(self.unused)} (e.g. {', '.join(self.unused[:4])})")
        lines += self.notes
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "path": self.path, "loaded": len(self.loaded), "new": len(self.new),
                "unused": len(self.unused), "loaded_values": self.loaded_values, "notes": self.notes}


def source_kind(path: str | Path) -> str:
    """"bundle", "official" or "pretrain", from the path's form."""
    p = Path(path)
    if not p.exists():
        raise MimError(f"{p} does not exist: pass a pre-training run folder or checkpoint, "
                       "an authors' MiM .pth file, or a model bundle")
    if p.suffix == ".zip" or (p.is_dir() and (p / "model.json").is_file()) or p.name == "model.json":
        return "bundle"
    if p.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        return "official"
    return "pretrain"


def _copy_matching(net: torch.nn.Module, tensors: dict[str, torch.Tensor], report: InitReport,
                   prefix_from: str = "", prefix_to: str = "") -> None:
    """Copy ``tensors`` whose name (``prefix_from`` replaced by ``prefix_to``) and shape match."""
    targets = net.state_dict()
    done = set()
    with torch.no_grad():
        for name, t in tensors.items():
            if not name.startswith(prefix_from):
                report.unused.append(name)
                continue
            ours = prefix_to + name[len(prefix_from):]
            if ours in targets and tuple(targets[ours].shape) == tuple(t.shape):
                targets[ours].copy_(t)
                report.loaded.append(ours)
                report.loaded_values += t.numel()
                done.add(ours)
            else:
                report.unused.append(name)
    report.new = [k for k in targets if k not in done]


def init_from_pretrain(net: torch.nn.Module, path: str | Path) -> InitReport:
    """The encoder of a ``mim pretrain`` checkpoint (``encoder.*``, any method) into the matching
    part of ``net``: ``encoder.*`` of a MiMSegNet (ConvViT3D), ``vit.*`` of a UNETR (ViT),
    ``swinViT.*`` of a SwinUNETR (Swin, through :func:`mimcore.models.swin.swin_encoder_state`).
    The pre-training decoder and heads are expected to go and are not reported as unused."""
    from mimcore.methods.registry import METHOD_NAMES, SEGMENTATION_KIND, checkpoint_method

    json_path = find_checkpoint(Path(path))
    meta, weights, _ = read_checkpoint(json_path)
    method, backbone = checkpoint_method(meta)
    kind = kind_of(net)
    if SEGMENTATION_KIND.get(backbone) != kind:
        raise MimError(f"{json_path} pre-trained a {backbone} encoder ({METHOD_NAMES.get(method, method)}); it "
                       f"fine-tunes as a {SEGMENTATION_KIND.get(backbone)!r} network, not {kind!r}")
    report = InitReport(f"pre-training checkpoint ({METHOD_NAMES.get(method, method)}, {backbone})", str(json_path))
    if kind == "swinunetr":
        from mimcore.models.swin import swin_encoder_state

        _copy_matching(net, swin_encoder_state(weights), report)  # keys are already swinViT.*
        return report
    if net.cfg.to_dict() != type(net.cfg).from_dict(meta["model"]).to_dict():
        raise MimError(f"{json_path} was pre-trained with the '{meta.get('preset')}' size; "
                       f"fine-tune with --preset {meta.get('preset')} to use it")
    _copy_matching(net, weights, report, "encoder.", "vit." if kind == "unetr" else "encoder.")
    report.unused = [n for n in report.unused if n.startswith("encoder.")]  # the decoder is expected to go
    return report


def init_from_official(net: MiMSegNet, path: str | Path) -> InitReport:
    """An authors' MiM pre-training ``.pth`` into ``net.encoder`` (name mapping of :mod:`official`)."""
    from mimcore.methods.mim_official import import_official

    rep = import_official(net.encoder, path, strict_encoder=True)
    report = InitReport("authors' checkpoint", str(path), loaded=["encoder." + n for n in rep.loaded],
                        unused=list(rep.unused), loaded_values=rep.loaded_values)
    report.new = [k for k in net.state_dict() if k not in set(report.loaded)]
    return report


def init_from_bundle_weights(net: torch.nn.Module, state: dict[str, torch.Tensor], path: str,
                             same_labels: bool) -> InitReport:
    """A segmentation bundle's weights; the output head only when the label set is the same."""
    report = InitReport("segmentation bundle", path)
    if not same_labels:
        state = {k: v for k, v in state.items() if not k.startswith(head_prefix(net))}
        report.notes.append("the label set differs from the bundle's: the output layer is new")
    _copy_matching(net, state, report)
    return report


def check_report(report: InitReport) -> InitReport:
    if not report.loaded:
        raise MimError(f"nothing in {report.path} matches this network ({report.source}): is it a model "
                       f"of the same kind and size? (names seen: {', '.join(report.unused[:4]) or 'none'})")
    return report
