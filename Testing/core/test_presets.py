"""One preset convention for every backbone, and the method table the registry derives from."""

from __future__ import annotations

import pytest

from mimcore.errors import MimError
from mimcore.methods import registry
from mimcore.models import convvit, swin, vit


@pytest.mark.parametrize("module,label", [(convvit, "ConvViT3D"), (vit, "ViT"), (swin, "Swin")])
def test_every_backbone_module_has_the_same_presets(module, label):
    assert tuple(module.PRESETS) == registry.PRESET_NAMES
    for name, cfg in module.PRESETS.items():
        assert module.preset(name) is cfg
        assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(MimError, match=f"unknown {label} size 'huge'; choose one of: base, small, tiny"):
        module.preset("huge")


def test_gmim_sizes_are_the_swin_presets():
    from mimcore.methods.gmim import gmim_config

    for name in registry.PRESET_NAMES:
        assert gmim_config(name).swin == swin.preset(name)


def test_registry_names_come_from_the_method_table():
    table = registry.METHOD_TABLE
    assert registry.METHODS == tuple(table)
    for name, method in table.items():
        assert method.name == name and registry.method(name) is method
        assert registry.BACKBONES[name] == method.backbones
        assert registry.DEFAULT_BACKBONE[name] == method.backbones[0]
        assert registry.METHOD_NAMES[name] == method.display_name
        assert method.recipe() is not None
        for backbone in method.backbones:
            assert registry.SEGMENTATION_KIND[backbone] == method.fine_tune_as[backbone]
    assert set(registry.ALL_BACKBONES) == {b for m in table.values() for b in m.backbones}
    with pytest.raises(MimError, match="unknown pre-training method"):
        registry.method("byol")


def test_every_segmentation_network_describes_itself():
    from mimcore.models import segnet
    from mimcore.training.finetune_init import new_architecture

    for backbone, kind in registry.SEGMENTATION_KIND.items():
        net = segnet.build(new_architecture(backbone, "tiny", 3))
        assert isinstance(net, segnet.SegNet) and net.kind == kind == segnet.kind_of(net)
        assert segnet.out_channels(net) == 3 and segnet.describe(net, "tiny")["kind"] == kind
        assert segnet.build(segnet.describe(net, "tiny")).state_dict().keys() == net.state_dict().keys()
