"""Build the segmentation network for a fine-tuning run and initialise it (``--init``)."""

from __future__ import annotations

from mimcore.data.labels import Label
from mimcore.errors import MimError
from mimcore.models.encoder_init import (InitReport, check_report, init_from_bundle_weights, init_from_official,
                                         init_from_pretrain, source_kind)
from mimcore.models.presets import ModelConfig
from mimcore.models.segnet import MiMSegNet


def build_network(args, cfg: ModelConfig | None, out_channels: int, labels: list[Label],
                  bundle=None) -> tuple[MiMSegNet, InitReport | None]:
    """-> (network with ``out_channels`` outputs, what the initialisation loaded or None).

    ``cfg`` is the model size; with a bundle it comes from the bundle. Options from ``args``:
    ``drop_path``, ``grad_checkpoint``, ``freeze_encoder``.
    """
    if bundle is not None:
        arch = bundle.description["architecture"]
        cfg = ModelConfig.from_dict(arch["model"])
        if args.preset and arch.get("preset") and args.preset != arch["preset"]:
            raise MimError(f"--preset {args.preset} does not match the bundle's size '{arch['preset']}'; "
                           "leave --preset out when starting from a bundle")
        net = MiMSegNet(cfg, out_channels, arch.get("feature_size"), args.drop_path, args.grad_checkpoint)
        same = [(lab["value"], lab["name"]) for lab in bundle.labels] == [(lab.value, lab.name) for lab in labels]
        report = check_report(init_from_bundle_weights(net, bundle.state_dict(), str(bundle.path), same))
    else:
        net = MiMSegNet(cfg, out_channels, None, args.drop_path, args.grad_checkpoint)
        report = None
        if args.init:
            kind = source_kind(args.init)
            report = check_report(init_from_official(net, args.init) if kind == "official"
                                  else init_from_pretrain(net, args.init))
    if args.freeze_encoder:
        if report is None:
            raise MimError("--freeze-encoder keeps the encoder as it is: give the pre-trained weights with --init")
        for p in net.encoder_parameters():
            p.requires_grad_(False)
    return net, report
