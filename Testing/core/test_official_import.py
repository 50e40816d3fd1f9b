"""Import of an authors' published MiM checkpoint (mimcore.methods.mim_official).

The published parameter names and shapes come from
``data/mim_official_pretrain_state_dict_shapes.json`` (next to this test); a fake "published"
checkpoint is built with exactly those names and shapes, filled with seeded random
values, saved as ``{"model": sd}`` and imported into our ``base`` model.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import pickletools
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimcore.errors import MimError
from mimcore.methods.mim import MiMPretrainModel
from mimcore.models.convvit import ConvViT3D
from mimcore.methods.mim import Levels
from mimcore.methods.mim_official import (
    convert_official_state_dict,
    import_official,
    is_encoder_name,
    load_official_checkpoint,
    map_name,
)
from mimcore.methods.mim import MiMConfig
from mimcore.models.convvit import preset as convvit_preset

REFERENCE_NAME = "mim_official_pretrain_state_dict_shapes.json"
ENCODER_VALUES = 33_974_544  # the published encoder (everything but decoder*, mask_token, aggregate*)
ALL_VALUES = 71_255_056


# A copy of the team's reference list (names and shapes only, no weights) from
# shared/reference/, kept in the repository so this test always runs.
REFERENCE = Path(__file__).parent / "data" / REFERENCE_NAME


@pytest.fixture(scope="module")
def official_shapes() -> dict[str, list[int]]:
    return json.loads(REFERENCE.read_text(encoding="utf-8"))["tensors"]


@pytest.fixture(scope="module")
def official_sd(official_shapes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {name: torch.randn(shape, generator=g) for name, shape in official_shapes.items()}


@pytest.fixture(scope="module")
def checkpoint(official_sd, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / "mim_pretrain.pth"
    torch.save({"model": official_sd, "epoch": 799}, path)
    return path


@pytest.fixture(scope="module")
def imported(checkpoint):
    torch.manual_seed(0)
    model = MiMPretrainModel(convvit_preset("base"))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("align")}
    report = import_official(model, checkpoint)
    return model, report, before


# --------------------------------------------------------------------------- mapping


def test_mapping_covers_the_published_model(official_shapes):
    """Every published tensor, alignment heads (aggregate_*) included, maps onto an existing
    tensor of our base model, same size, one to one, and covers all of ours."""
    meta = {k: torch.empty(s, device="meta") for k, s in official_shapes.items()}
    ours, report = convert_official_state_dict(meta)
    assert report.unused == [] and report.not_imported == []

    targets = MiMPretrainModel(convvit_preset("base")).state_dict()
    for name, t in ours.items():
        assert name in targets, name
        assert targets[name].numel() == t.numel(), name
        assert targets[name].shape == t.shape, name
    assert len(ours) == len(official_shapes)  # one-to-one
    assert sorted(targets) == sorted(ours)  # everything of ours is covered
    heads = {"aggregate_mid": "align12_child", "aggregate_pred_up_feature": "align12_parent",
             "aggregate_down": "align23_child", "aggregate_pred_mid_feature": "align23_parent"}
    for off, our in heads.items():
        for i in (1, 2):
            for kind in ("weight", "bias"):
                assert f"{our}.linear{i}.{kind}" in ours
                assert map_name(f"{off}.fc{i}.{kind}")[0] == f"{our}.linear{i}.{kind}"

    # value counts: the published encoder and ours both hold 33,974,544 values
    enc_official = sum(math.prod(s) for k, s in official_shapes.items() if is_encoder_name(k))
    enc_ours = sum(v.numel() for k, v in targets.items() if k.startswith("encoder."))
    assert enc_official == enc_ours == ENCODER_VALUES
    assert sum(math.prod(s) for s in official_shapes.values()) == ALL_VALUES

    # encoder-only conversion leaves decoder + mask token + aggregate unused
    enc_only, rep = convert_official_state_dict(meta, include_decoder=False)
    assert all(k.startswith("encoder.") for k in enc_only)
    assert sum(t.numel() for t in enc_only.values()) == ENCODER_VALUES
    assert all(not is_encoder_name(k) for k in rep.unused)


# --------------------------------------------------------------------------- import


def test_import_uses_every_tensor(imported, official_sd):
    model, report, before = imported
    assert report.shape_mismatch == [] and report.unused == [] and report.missing == []
    state = model.state_dict()
    assert sum(state[k].numel() for k in report.loaded if k.startswith("encoder.")) == ENCODER_VALUES
    assert report.loaded_values == ALL_VALUES
    for k, v in before.items():  # the alignment heads now hold the published aggregate_* values
        assert not torch.equal(state[k], v)
    assert "not imported" not in report.summary()


def test_imported_values_land_in_the_right_places(imported, official_sd):
    model, _, _ = imported
    enc, dec = model.encoder, model.decoder
    o = official_sd
    checks = [
        (o["blocks1.0.conv1.weight"].reshape(48, 48), enc.conv_stages[0][0].pw_in.weight),
        (o["blocks1.0.conv2.weight"].reshape(48, 48), enc.conv_stages[0][0].pw_out.weight),
        (o["blocks2.1.mlp.fc2.weight"].reshape(96, 384), enc.conv_stages[1][1].mlp.linear2.weight),
        (o["blocks3.1.attn.weight"], enc.conv_stages[2][1].dw.weight),
        (o["blocks3.1.attn.bias"], enc.conv_stages[2][1].dw.bias),
        (o["blocks4.10.attn.qkv.weight"], enc.blocks[10].attn.qkv.weight),
        (o["blocks4.0.mlp.fc1.bias"], enc.blocks[0].mlp.linear1.bias),
        (o["stage2_output_decode.weight"], enc.skips[1].weight),
        (o["stage1_output_decode.bias"], enc.skips[0].bias),
        (o["pos_embed"], enc.pos_embed),
        (o["patch_embed5.weight"], enc.token_proj.weight),
        (o["patch_embed4.norm.weight"], enc.embeds[3].norm.weight),
        (o["norm.bias"], enc.norm.bias),
        (o["decoder_embed.weight"], dec.embed.weight),
        (o["mask_token"], dec.mask_token),
        (o["decoder_pos_embed"], dec.pos_embed),
        (o["decoder_blocks.7.mlp.fc1.weight"], dec.blocks[7].mlp.linear1.weight),
        (o["decoder_pred.bias"], dec.pred.bias),
        (o["aggregate_mid.fc1.weight"], model.align12_child.linear1.weight),
        (o["aggregate_pred_up_feature.fc2.bias"], model.align12_parent.linear2.bias),
        (o["aggregate_down.fc2.weight"], model.align23_child.linear2.weight),
        (o["aggregate_pred_mid_feature.fc1.bias"], model.align23_parent.linear1.bias),
    ]
    for expected, got in checks:
        assert got.shape == expected.shape
        assert torch.equal(got.detach(), expected)


def test_imported_encoder_computes_like_the_published_layers(imported, official_sd):
    """Our modules with imported weights equal the published layers written with F.conv3d (NCDHW)."""
    enc = imported[0].encoder
    o = official_sd
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1, 16, 16, 16, generator=g)

    def ln(t, prefix):  # LayerNorm over channels of an NCDHW tensor; published conv-side eps: 1e-5
        y = F.layer_norm(t.permute(0, 2, 3, 4, 1), (t.shape[1],), o[prefix + ".weight"], o[prefix + ".bias"], 1e-5)
        return y.permute(0, 4, 1, 2, 3)

    with torch.no_grad():
        # stage-1 patch embedding: Conv3d k2 s2, LN, GELU
        ref = F.conv3d(x, o["patch_embed1.proj.weight"], o["patch_embed1.proj.bias"], stride=2)
        ref = F.gelu(ln(ref, "patch_embed1.norm"))
        ours = enc.embeds[0](x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

        # first conv block of stage 1, published form: 1x1x1 convs and a 5^3 depthwise "attn"
        p = "blocks1.0."
        y = F.conv3d(ln(ref, p + "norm1"), o[p + "conv1.weight"], o[p + "conv1.bias"])
        y = F.conv3d(y, o[p + "attn.weight"], o[p + "attn.bias"], padding=2, groups=48)
        r = ref + F.conv3d(y, o[p + "conv2.weight"], o[p + "conv2.bias"])
        h = F.conv3d(ln(r, p + "norm2"), o[p + "mlp.fc1.weight"], o[p + "mlp.fc1.bias"])
        r = r + F.conv3d(F.gelu(h), o[p + "mlp.fc2.weight"], o[p + "mlp.fc2.bias"])
        ours_blk = enc.conv_stages[0][0](ours.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        # random N(0, 1) weights give activations in the hundreds: tolerance relative to the max
        torch.testing.assert_close(ours_blk, r, rtol=1e-4, atol=1e-5 * float(r.abs().max()))

        # skip path of stage 1: Conv3d kernel = stride = 8
        ref_skip = F.conv3d(r, o["stage1_output_decode.weight"], o["stage1_output_decode.bias"], stride=8)
        ours_skip = enc.skips[0](ours_blk.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        torch.testing.assert_close(ours_skip, ref_skip, rtol=1e-4, atol=1e-5 * float(ref_skip.abs().max()))


def test_imported_heads_compute_the_published_byol_terms(imported, official_sd):
    """With ``alignment="published"`` the imported model's A12/A23 equal the released byol loops
    (one crop per GPU, as the published run), written here with the official aggregate_* weights."""
    model = imported[0]
    o = official_sd
    g = torch.Generator().manual_seed(8)
    n, d = 216, 576
    f1, f2, f3 = (torch.randn(m, n, d, generator=g) for m in (1, 4, 16))
    levels = Levels([], [], torch.tensor([[0, 3, 5, 6]]), torch.randint(0, n, (4, 4), generator=g))

    def mlp(name, x):  # the published timm-style Mlp: fc1, GELU, fc2
        h = F.gelu(F.linear(x, o[name + ".fc1.weight"], o[name + ".fc1.bias"]))
        return F.linear(h, o[name + ".fc2.weight"], o[name + ".fc2.bias"])

    def byol(x, y):
        return 2 - 2 * (F.normalize(x, dim=-1) * F.normalize(y, dim=-1)).sum(-1)

    with torch.no_grad():
        pred_mid = f2.mean(1)  # (4, d)
        mid_f = mlp("aggregate_mid", pred_mid).reshape(1, 4, d)
        a12 = sum(byol(pred_mid[i], mid_f[i][j]) for i in range(1) for j in range(4)) / 4
        down_f = mlp("aggregate_down", f3.mean(1)).reshape(4, 4, d)
        parent = mlp("aggregate_pred_mid_feature", f2.mean(1)).reshape(4, 1, d)
        a23 = sum(byol(parent[i], down_f[i][j]) for i in range(4) for j in range(4)) / 16
        cfg = model.cfg
        try:
            model.cfg = MiMConfig(alignment="published")
            got = model.alignment([f1, f2, f3], levels)
        finally:
            model.cfg = cfg
    torch.testing.assert_close(got["a12"], a12.reshape(()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["a23"], a23.reshape(()), rtol=1e-5, atol=1e-5)


def test_import_into_encoder_alone(checkpoint, official_sd):
    enc = ConvViT3D(convvit_preset("base"))
    report = import_official(enc, checkpoint)
    assert report.missing == [] and report.shape_mismatch == []
    assert sorted(report.unused) == sorted(k for k in official_sd if not is_encoder_name(k))
    assert report.loaded_values == ENCODER_VALUES
    assert torch.equal(enc.conv_stages[0][0].pw_in.weight.detach(), official_sd["blocks1.0.conv1.weight"].reshape(48, 48))
    assert torch.equal(enc.blocks[10].attn.qkv.weight.detach(), official_sd["blocks4.10.attn.qkv.weight"])


# --------------------------------------------------------------------------- refusals


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"model": {"pos_embed": torch.zeros(1), "x": _Evil(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        data = pickle.dumps(payload, protocol=2)
        path.write_bytes(data)
    # the file really asks for os.system (posix.system / nt.system)
    assert any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(data))
    assert b"system" in data

    with pytest.raises(MimError, match="refused: not a plain tensor checkpoint"):
        load_official_checkpoint(path)
    with pytest.raises(MimError, match="refused"):
        import_official(ConvViT3D(convvit_preset("tiny")), path)
    assert not marker.exists()


def test_nothing_matching_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"backbone.conv.weight": torch.zeros(3, 3), "head.bias": torch.zeros(2)}}, path)
    with pytest.raises(MimError, match="nothing"):
        import_official(MiMPretrainModel(convvit_preset("tiny")), path)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MimError):
        load_official_checkpoint(junk)
    with pytest.raises(MimError, match="not found"):
        load_official_checkpoint(tmp_path / "absent.pth")


def test_bare_state_dict_and_strictness(tmp_path):
    """A bare state dict is accepted; a wrong-shaped encoder tensor fails strict import, naming it."""
    enc = ConvViT3D(convvit_preset("tiny"))  # dims (6, 12, 24, 48), 2^3 tokens
    good_norm = torch.arange(48, dtype=torch.float32)
    sd = {"norm.weight": good_norm, "pos_embed": torch.ones(1, 8, 48), "blocks4.0.norm1.bias": torch.zeros(7)}
    path = tmp_path / "bare.pth"
    torch.save(sd, path)
    assert sorted(load_official_checkpoint(path)) == sorted(sd)

    with pytest.raises(MimError, match="blocks4.0.norm1.bias"):
        import_official(enc, path)
    assert not torch.equal(enc.norm.weight.detach(), good_norm)  # strict failure changes nothing

    report = import_official(enc, path, strict_encoder=False)
    assert sorted(report.loaded) == ["norm.weight", "pos_embed"]
    assert len(report.shape_mismatch) == 1 and report.shape_mismatch[0].startswith("blocks4.0.norm1.bias")
    assert torch.equal(enc.norm.weight.detach(), good_norm)
    assert torch.equal(enc.pos_embed, torch.ones(1, 8, 48))

    # an unknown encoder-looking name is "unused" and fails strict import too
    torch.save({"model": {"norm.weight": good_norm, "blocks5.0.norm1.weight": torch.zeros(48)}}, path)
    with pytest.raises(MimError, match="blocks5.0.norm1.weight"):
        import_official(enc, path)
