"""MiM's three cross-level alignments (``MiMConfig.alignment``: region | published | ce), each
on its defining property, and the collapse monitor logged next to them (METHODS.md section 1,
"Losses"; definitions in the module doc of mimcore.methods.mim). CPU, ``tiny`` preset:
2^3 tokens per volume, octants of one token, decoder width 48.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mimcore.errors import MimError
from mimcore.methods.mim import MiMPretrainModel, build_levels
from mimcore.methods.mim import MiMConfig
from mimcore.models.convvit import preset as convvit_preset

MC = convvit_preset("tiny")
B, L, D = 2, MC.grid**3, MC.decoder_dim
MONITORS = {"cos12_match", "cos12_mismatch", "cos23_match", "cos23_mismatch"}
CE_MONITORS = MONITORS | {"acc12", "acc23", "acc12_chance", "acc23_chance"}


@pytest.fixture(scope="module")
def levels():
    gen = torch.Generator().manual_seed(7)
    crop = torch.rand(B, 1, MC.crop_size, MC.crop_size, MC.crop_size, generator=gen)
    return build_levels(crop, MC, MiMConfig(), gen)


@pytest.fixture(scope="module")
def models():
    out = {}
    for kind in ("region", "published", "ce"):
        torch.manual_seed(0)
        out[kind] = MiMPretrainModel(MC, MiMConfig(alignment=kind))
    return out


def _feats(seed: int, grad: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(m * B, L, D, generator=gen, requires_grad=grad) for m in (1, 4, 16)]


def _cos(a, b):
    return F.cosine_similarity(a, b, dim=-1)


def _octant_tokens(octant: int) -> torch.Tensor:
    """Token ids of one octant of the tiny 2^3 grid (one token: its id is the octant id)."""
    from mimcore.methods.masking import token_octants

    return (token_octants(MC.grid) == octant).nonzero()[:, 0]


# --------------------------------------------------------------------------- setting


def test_alignment_setting_and_old_configs():
    assert MiMConfig().alignment == "region" and MiMConfig().ce_temperature == 1.0
    old = {k: v for k, v in MiMConfig().to_dict().items() if k not in ("alignment", "ce_temperature")}
    assert MiMConfig.from_dict(old).alignment == "region"  # checkpoints written before the field
    assert MiMConfig.from_dict({**old, "alignment": "ce"}).alignment == "ce"
    with pytest.raises(MimError, match="region, published, ce"):
        MiMConfig(alignment="byol")
    with pytest.raises(MimError, match="ce_temperature"):
        MiMConfig(ce_temperature=0.0)

    from mimcore.methods.registry import build_pretrain_model

    model, _, meta = build_pretrain_model("mim", preset="tiny", options={"alignment": "published"})
    assert model.cfg.alignment == "published" and meta["mim"]["alignment"] == "published"


# --------------------------------------------------------------------------- region


def test_region_parents_are_detached_and_local(models, levels):
    m = models["region"]
    f1, f2, f3 = fs = _feats(1)
    m.alignment(fs, levels)["a12"].backward()
    assert f1.grad is None or not f1.grad.any()  # stop-gradient: nothing flows to level 1
    assert f2.grad.abs().sum() > 0

    with torch.no_grad():
        f1, f2, f3 = _feats(2, grad=False)
        base = m.alignment([f1, f2, f3], levels)
        # level-1 tokens of octants that were not hidden are no one's parent
        g1 = f1.clone()
        for b in range(B):
            visible = [o for o in range(8) if o not in levels.octants[b].tolist()]
            for o in visible:
                g1[b, _octant_tokens(o)] += 5.0
        # level-2 tokens that no level-3 volume was cut from are no one's parent
        g2 = f2.clone()
        for v in range(4 * B):
            uncut = [t for t in range(L) if t not in levels.blocks[v].tolist()]
            g2[v, uncut] += 5.0
        torch.testing.assert_close(m.alignment([g1, f2, f3], levels)["a12"], base["a12"])
        got = m.alignment([f1, g2, f3], levels)
        torch.testing.assert_close(got["a23"], base["a23"])


# --------------------------------------------------------------------------- published


def test_published_a12_is_level2_against_itself(models, levels):
    """The released byol A12: the crop's first level-2 volume's raw mean against the head of each
    of its level-2 volumes. Level 1 plays no part; nothing is detached."""
    m = models["published"]
    with torch.no_grad():
        f1, f2, f3 = _feats(3, grad=False)
        base = m.alignment([f1, f2, f3], levels)
        other = m.alignment([torch.randn_like(f1) * 7, f2, f3], levels)
        assert torch.equal(other["a12"], base["a12"])  # level-1 features do not matter at all
        # by hand, the released loop with one crop per GPU, crop by crop
        terms = []
        for b in range(B):
            aa = f2[b * 4].mean(0)
            for j in range(4):
                bb = m.align12_child(f2[b * 4 + j].mean(0))
                terms.append(2 - 2 * _cos(aa, bb))
        torch.testing.assert_close(base["a12"], torch.stack(terms).mean())

    f1, f2, f3 = fs = _feats(4)
    m.alignment(fs, levels)["a12"].backward()
    assert f1.grad is None or not f1.grad.any()
    anchor_rows = f2.grad[[b * 4 for b in range(B)]]
    assert anchor_rows.abs().sum() > 0 and f2.grad[1].abs().sum() > 0  # both sides learn (no detach)
    assert m.align12_child.linear1.weight.grad is not None


def test_published_a23_parent_is_the_whole_level2_volume(models, levels):
    m = models["published"]
    with torch.no_grad():
        f1, f2, f3 = _feats(5, grad=False)
        base = m.alignment([f1, f2, f3], levels)
        # a level-2 token no level-3 volume was cut from still moves its volume's parent
        g2 = f2.clone()
        uncut = [t for t in range(L) if t not in levels.blocks[0].tolist()]
        g2[0, uncut[0]] += 5.0
        assert not torch.allclose(m.alignment([f1, g2, f3], levels)["a23"], base["a23"])
        # ... while in ``region`` it does not (parent = the cut token)
        r = models["region"]
        torch.testing.assert_close(r.alignment([f1, g2, f3], levels)["a23"], r.alignment([f1, f2, f3], levels)["a23"])
        # by hand: mean over all L tokens, its own head, against each of the 4 children
        terms = []
        for v in range(4 * B):
            parent = m.align23_parent(f2[v].mean(0))
            for k in range(4):
                terms.append(2 - 2 * _cos(m.align23_child(f3[v * 4 + k].mean(0)), parent))
        torch.testing.assert_close(base["a23"], torch.stack(terms).mean())

    f1, f2, f3 = fs = _feats(6)
    m.alignment(fs, levels)["a23"].backward()
    assert f2.grad is None or not f2.grad.any()  # parent detached
    assert f3.grad.abs().sum() > 0


def test_every_trainable_parameter_learns_under_each_alignment(models):
    """DistributedDataParallel (no unused-parameter search) needs a gradient on every trainable
    parameter; ``published`` leaves align12_parent unused, so it is frozen, not removed."""
    keys = {kind: set(m.state_dict()) for kind, m in models.items()}
    assert keys["region"] == keys["published"] == keys["ce"]
    gen = torch.Generator().manual_seed(9)
    crop = torch.rand(B, 1, MC.crop_size, MC.crop_size, MC.crop_size, generator=gen)
    for kind, m in models.items():
        m.zero_grad()
        m(crop, torch.Generator().manual_seed(1))["loss"].backward()
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
        assert frozen == ({n for n in keys[kind] if n.startswith("align12_parent.")} if kind == "published" else set())
        no_grad = [n for n, p in m.named_parameters() if n in trainable and (p.grad is None or not p.grad.any())]
        assert no_grad == [], kind
        m.zero_grad()


# --------------------------------------------------------------------------- ce


def test_ce_is_cross_entropy_over_octants_and_tokens(levels):
    """A12: cosine logits of each level-2 child against its crop's 8 level-1 octants, target the
    octant it was cut from; A23: against the L tokens of its level-2 volume, target the cut token."""
    for temperature in (1.0, 0.3):
        torch.manual_seed(0)
        m = MiMPretrainModel(MC, MiMConfig(alignment="ce", ce_temperature=temperature))
        with torch.no_grad():
            f1, f2, f3 = _feats(10, grad=False)
            got = m.alignment([f1, f2, f3], levels)
            rows12, rows23 = [], []
            for v in range(4 * B):
                b = v // 4
                child = m.align12_child(f2[v].mean(0))
                cands = torch.stack([m.align12_parent(f1[b, _octant_tokens(o)].mean(0)) for o in range(8)])
                rows12.append(_cos(child[None], cands))
                for k in range(4):
                    child3 = m.align23_child(f3[v * 4 + k].mean(0))
                    rows23.append(_cos(child3[None], m.align23_parent(f2[v])))
            logits12, logits23 = torch.stack(rows12), torch.stack(rows23)  # (4B, 8), (16B, L)
            t12, t23 = levels.octants.reshape(-1), levels.blocks.reshape(-1)
            torch.testing.assert_close(got["a12"], F.cross_entropy(logits12 / temperature, t12), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got["a23"], F.cross_entropy(logits23 / temperature, t23), rtol=1e-5, atol=1e-6)
            # the monitors: accuracy, true-candidate cosine, wrong-candidate cosine, chance
            assert float(got["acc12"]) == pytest.approx(float((logits12.argmax(1) == t12).float().mean()))
            assert float(got["acc23"]) == pytest.approx(float((logits23.argmax(1) == t23).float().mean()))
            true12 = logits12.gather(1, t12[:, None])[:, 0]
            assert float(got["cos12_match"]) == pytest.approx(float(true12.mean()), abs=1e-6)
            wrong12 = (logits12.sum(1) - true12) / 7
            assert float(got["cos12_mismatch"]) == pytest.approx(float(wrong12.mean()), abs=1e-6)
            assert float(got["acc12_chance"]) == pytest.approx(1 / 8)
            assert float(got["acc23_chance"]) == pytest.approx(1 / L)


def test_ce_perfect_classifier(levels):
    """Features whose child equals its true parent and is orthogonal to the other candidates: the
    classifier is right every time; the loss is ~0 at a low temperature, and at the released
    temperature 1 it sits at its floor log(1 + (M - 1) / e)."""
    f1 = torch.zeros(B, L, D)
    for o in range(8):
        f1[:, _octant_tokens(o), o] = 1.0  # octant o's mean: one-hot e_o
    f2_12 = torch.zeros(4 * B, L, D)
    f2_12[torch.arange(4 * B), :, levels.octants.reshape(-1)] = 1.0  # each level-2 volume: e_(its octant)
    f2_23 = torch.eye(L, D).expand(4 * B, L, D).clone()  # token t of every level-2 volume: e_t
    f3 = torch.zeros(16 * B, L, D)
    f3[torch.arange(16 * B), :, levels.blocks.reshape(-1)] = 1.0  # each level-3 volume: e_(its token)
    for temperature, floor in ((0.01, 0.0), (1.0, None)):
        m = MiMPretrainModel(MC, MiMConfig(alignment="ce", ce_temperature=temperature))
        for name in ("align12_child", "align12_parent", "align23_child", "align23_parent"):
            setattr(m, name, nn.Identity())  # heads out of the way: the features are the embeddings
        with torch.no_grad():
            a = m.alignment([f1, f2_12, f3], levels)
            c = m.alignment([f1, f2_23, f3], levels)
        assert float(a["acc12"]) == 1.0 and float(c["acc23"]) == 1.0
        assert float(a["cos12_match"]) == pytest.approx(1.0) and float(a["cos12_mismatch"]) == pytest.approx(0.0)
        if floor is not None:
            assert float(a["a12"]) < 1e-6 and float(c["a23"]) < 1e-6
        else:
            assert float(a["a12"]) == pytest.approx(math.log(1 + 7 / math.e), rel=1e-5)
            assert float(c["a23"]) == pytest.approx(math.log(1 + (L - 1) / math.e), rel=1e-5)


# --------------------------------------------------------------------------- monitor


def test_region_monitor_by_hand_and_collapse_is_visible(levels):
    torch.manual_seed(0)
    m = MiMPretrainModel(MC, MiMConfig())
    f1, f2, f3 = fs = _feats(11)
    got = m.alignment(fs, levels)
    assert all(not got[k].requires_grad and got[k].dim() == 0 for k in MONITORS)
    with torch.no_grad():
        child = m.align12_child(f2.mean(1))
        parent = torch.stack([m.align12_parent(f1[v // 4, _octant_tokens(int(levels.octants.reshape(-1)[v]))].mean(0))
                              for v in range(4 * B)])
        assert float(got["cos12_match"]) == pytest.approx(float(_cos(child, parent).mean()), abs=1e-6)
        rolled = torch.cat([parent[-1:], parent[:-1]])  # pair i against pair i-1's parent
        assert float(got["cos12_mismatch"]) == pytest.approx(float(_cos(child, rolled).mean()), abs=1e-6)
        assert float(got["a12"]) == pytest.approx(float((2 - 2 * _cos(child, parent)).mean()), abs=1e-6)

    class Constant(nn.Module):  # a collapsed head: every input maps to one direction
        def forward(self, x):
            return torch.ones(*x.shape[:-1], D)

    for name in ("align12_child", "align12_parent", "align23_child", "align23_parent"):
        setattr(m, name, Constant())
    with torch.no_grad():
        got = m.alignment(_feats(12, grad=False), levels)
    assert float(got["a12"]) == pytest.approx(0.0, abs=1e-6)  # the loss says "aligned" ...
    for pair in ("12", "23"):  # ... the monitor says the pairing carries no information
        assert float(got[f"cos{pair}_match"]) == pytest.approx(float(got[f"cos{pair}_mismatch"]))


@pytest.mark.parametrize("kind", ["region", "published", "ce"])
def test_forward_logs_monitors_outside_the_loss(models, kind):
    m = models[kind]
    gen = torch.Generator().manual_seed(5)
    out = m(torch.rand(B, 1, MC.crop_size, MC.crop_size, MC.crop_size, generator=gen), gen)
    monitors = CE_MONITORS if kind == "ce" else MONITORS
    assert set(out) == {"loss", "l1", "l2", "l3", "a12", "a23"} | monitors
    assert all(not out[k].requires_grad and out[k].dim() == 0 and torch.isfinite(out[k]) for k in monitors)
    w = m.cfg.loss_weights
    torch.testing.assert_close(out["loss"], sum(w[k] * out[k] for k in ("l1", "l2", "l3", "a12", "a23")))
    m.zero_grad()


def test_loss_curve_panels(tmp_path):
    """The PNG: one panel for a method without alignment, two for an old MiM metrics file, three
    (matched vs mismatched cosine; ce: accuracy on a second axis) with the monitor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mimcore.training.pretrain import plot_loss_curve

    def rows(extra):
        return [{"step": s, "loss": 3.0 / s, "lr": 1e-4, **extra(s)} for s in range(1, 21)]

    cases = {
        "mae": (rows(lambda s: {}), 1),
        "old_mim": (rows(lambda s: {"l1": 1.0, "a12": 2.0 / s, "a23": 2.0 / s}), 2),
        "region": (rows(lambda s: {"l1": 1.0, "a12": 2.0 / s, "a23": 1.0, "cos12_match": 0.9, "cos12_mismatch": 0.8,
                                   "cos23_match": 0.5, "cos23_mismatch": 0.5}), 3),
        "ce": (rows(lambda s: {"a12": 2.0, "a23": 2.0, "cos12_match": 0.3, "cos12_mismatch": 0.1, "acc12": 0.5,
                               "acc12_chance": 0.125, "acc23": 0.2, "acc23_chance": 0.125}), 3),
    }
    made = []
    real_subplots = plt.subplots

    def spy(*args, **kwargs):
        fig, axes = real_subplots(*args, **kwargs)
        made.append(axes.shape[1])
        return fig, axes

    plt.subplots = spy
    try:
        for name, (data, panels) in cases.items():
            path = tmp_path / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
            png = plot_loss_curve(path, tmp_path / f"{name}.png")
            assert png.stat().st_size > 1000
            assert made[-1] == panels, name
    finally:
        plt.subplots = real_subplots
