"""GMIM's grid masking (METHODS.md section 3): entropy-selected grid, adaptive per-cell
ratios, token masks, hierarchical re-masking. Expected values are computed here
independently with numpy (or written out by hand) on volumes whose entropy pattern is known.
"""

from __future__ import annotations

import numpy as np
import torch

from mimcore.methods.gmim import GMIMPretrainModel, gmim_config
from mimcore.methods.grid_masking import (
    GridPlan,
    adaptive_ratios,
    cell_entropy,
    hierarchical_scales,
    plan_grid_masks,
    token_hidden,
    voxel_hidden,
)

BINS = 256
S = 64  # the tiny/small input edge
GRIDS = (2, 4, 8)


def _np_cells(vol: np.ndarray, g: int) -> list[np.ndarray]:
    """Cells of a (S, S, S) array in raster order (cd, ch, cw), by plain slicing."""
    e = vol.shape[0] // g
    return [vol[cd * e:(cd + 1) * e, ch * e:(ch + 1) * e, cw * e:(cw + 1) * e].ravel()
            for cd in range(g) for ch in range(g) for cw in range(g)]


def _np_entropy(values: np.ndarray) -> float:
    """Shannon entropy (bits) of a 256-bin histogram over [0, 1]."""
    hist, _ = np.histogram(values, bins=BINS, range=(0.0, 1.0))
    p = hist[hist > 0] / values.size
    return float(-(p * np.log2(p)).sum())


def _np_choice(vol: np.ndarray, grids=GRIDS):
    """(scores, chosen grid, its cell entropies) by the published criterion g^-0.1 std/mean."""
    scores, ents = [], []
    for g in grids:
        e = np.array([_np_entropy(c) for c in _np_cells(vol, g)])
        scores.append(g ** -0.1 * e.std() / e.mean() if e.mean() > 0 else 0.0)
        ents.append(e)
    k = int(np.argmax(scores))
    return np.array(scores), grids[k], ents[k]


def _np_ratios(entropy: np.ndarray, low=0.35, high=0.65) -> np.ndarray:
    uniq = np.unique(entropy)
    if len(uniq) == 1:
        return np.full(entropy.shape, low)
    rank = np.searchsorted(uniq, entropy)
    return low + (high - low) * rank / (len(uniq) - 1)


def _bin_value(b):
    """The centre of histogram bin b: an intensity that falls in exactly that bin."""
    return (np.asarray(b) + 0.5) / BINS


def _octant_levels_volume(levels_per_octant) -> np.ndarray:
    """Octant o holds k_o distinct intensities in equal numbers in every cell of edge >= 8
    (value index (8h + w) mod k_o), so every cell of any of the grids has entropy log2(k_o)."""
    d, h, w = np.meshgrid(np.arange(S), np.arange(S), np.arange(S), indexing="ij")
    octant = (d >= S // 2) * 4 + (h >= S // 2) * 2 + (w >= S // 2)
    k = np.asarray(levels_per_octant)[octant]
    return _bin_value(((8 * h + w) % k) * 7).astype(np.float32)  # levels 7 bins apart


def test_cell_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    vol = _bin_value(rng.integers(0, BINS, (S, S, S)) // rng.integers(1, 64, (S, S, S))).astype(np.float32)
    for g in GRIDS:
        got = cell_entropy(torch.from_numpy(vol)[None, None], g, BINS)[0].numpy()
        want = np.array([_np_entropy(c) for c in _np_cells(vol, g)])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_octant_pattern_grid_and_ratios_by_hand():
    # octant entropies (bits): log2 of 1, 2, 4, 8, 1, 16, 4, 2 -> 0, 1, 2, 3, 0, 4, 2, 1
    vol = _octant_levels_volume([1, 2, 4, 8, 1, 16, 4, 2])
    x = torch.from_numpy(vol)[None, None]
    plan = plan_grid_masks(x, GRIDS, BINS)

    # every grid sees the same multiset of octant entropies, so std/mean is the same
    # and g^-0.1 picks the coarsest grid: cells = octants
    e = np.array([0, 1, 2, 3, 0, 4, 2, 1], float)
    cv = e.std() / e.mean()
    np.testing.assert_allclose(plan.scores[0].numpy(), [g ** -0.1 * cv for g in GRIDS], rtol=1e-12)
    scores, grid, ent = _np_choice(vol)
    np.testing.assert_allclose(plan.scores[0].numpy(), scores, rtol=1e-12)
    assert plan.grids == [grid] == [2]
    np.testing.assert_allclose(plan.entropy[0].numpy(), e, atol=1e-12)
    # 5 distinct entropies 0 < 1 < 2 < 3 < 4 -> 0.35, 0.425, 0.5, 0.575, 0.65
    np.testing.assert_allclose(plan.ratios[0].numpy(), [0.35, 0.425, 0.5, 0.575, 0.35, 0.65, 0.5, 0.425])


def test_checkerboard_of_noise_picks_the_grid_that_resolves_it():
    """Noise in alternate 16^3 cells, flat elsewhere: at grid 2 every octant holds the same
    mix (std ~ 0), grids 4 and 8 both separate noise from flat (std/mean ~ 1), and the
    g^-0.1 factor prefers 4."""
    rng = np.random.default_rng(1)
    d, h, w = np.meshgrid(np.arange(S), np.arange(S), np.arange(S), indexing="ij")
    noisy = ((d // 16 + h // 16 + w // 16) % 2).astype(bool)
    vol = np.where(noisy, _bin_value(rng.integers(0, BINS, (S, S, S))), _bin_value(100)).astype(np.float32)
    vol2 = _octant_levels_volume([1, 1, 1, 1, 1, 1, 1, 16])  # second image of the batch
    plan = plan_grid_masks(torch.from_numpy(np.stack([vol, vol2]))[:, None], GRIDS, BINS)

    scores, grid, ent = _np_choice(vol)
    np.testing.assert_allclose(plan.scores[0].numpy(), scores, rtol=1e-9)
    assert scores[0] < 0.01 < scores[2] < scores[1] and grid == 4 and plan.grids == [4, 2]
    np.testing.assert_allclose(plan.entropy[0].numpy(), ent, atol=1e-9)
    np.testing.assert_allclose(plan.ratios[0].numpy(), _np_ratios(ent), atol=1e-12)
    r = plan.ratios[0].numpy()
    flat = ent == 0
    assert flat.sum() == 32 and np.all(r[flat] == 0.35) and np.all(r[~flat] > 0.35)
    # the second image: one octant of 16 levels -> ratios 0.35 x 7 and 0.65
    np.testing.assert_allclose(plan.ratios[1].numpy(), [0.35] * 7 + [0.65])


def test_ratios_lie_in_range_and_are_monotone_in_entropy():
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        e = torch.randint(0, 12, (64,), generator=gen).double() / 3  # with ties
        r = adaptive_ratios(e)
        assert r.min() == 0.35 and r.max() == 0.65
        order = e.argsort()
        assert bool((r[order].diff() >= 0).all())  # monotone
        assert bool(((e[:, None] == e[None]) <= (r[:, None] == r[None])).all())  # ties share a ratio
        assert bool(((e[:, None] < e[None]) <= (r[:, None] < r[None])).all())  # strictly more entropy, more
    assert torch.equal(adaptive_ratios(torch.zeros(8)), torch.full((8,), 0.35, dtype=torch.float64))


def _plan(grid: int, ratios) -> GridPlan:
    r = torch.as_tensor(ratios, dtype=torch.float64)
    return GridPlan([grid], [torch.zeros_like(r)], [r], torch.zeros(1, 1))


def test_token_masks_hide_the_cell_ratio_in_every_cell():
    gen = torch.Generator().manual_seed(3)
    ratios = torch.linspace(0.35, 0.65, 64, dtype=torch.float64)[torch.randperm(64, generator=gen)]
    plan = _plan(4, ratios)
    hid = token_hidden(plan, 32, 1.0, gen)[0]  # cells of 8^3 = 512 tokens
    per_cell = hid.reshape(4, 8, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(64, 512).sum(1).double()
    want = ratios * 512
    assert bool(((per_cell == want.floor()) | (per_cell == want.ceil())).all())
    # halved ratio: half as many per cell
    hid2 = token_hidden(plan, 32, 0.5, gen)[0]
    per_cell2 = hid2.reshape(4, 8, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(64, 512).sum(1).double()
    assert bool(((per_cell2 - want / 2).abs() < 1).all())
    # positions differ between draws (fresh masks)
    assert not torch.equal(hid, token_hidden(plan, 32, 1.0, gen)[0])


def test_token_map_coarser_than_the_grid_keeps_the_ratio_in_expectation():
    ratios = torch.tensor([0.35, 0.65] * 256, dtype=torch.float64)  # 8^3 cells
    plan = _plan(8, ratios)
    gen = torch.Generator().manual_seed(4)
    # 2^3 tokens, each covering 4^3 cells of mean ratio 0.5; 1-token cells: Bernoulli(0.25)
    frac = torch.stack([token_hidden(plan, 2, 0.5, gen) for _ in range(2000)]).double().mean()
    assert abs(float(frac) - 0.25) < 0.01


def test_voxel_mask_covers_each_hidden_token_patch():
    gen = torch.Generator().manual_seed(5)
    hid = torch.rand(2, 4, 4, 4, generator=gen) < 0.5
    vox = voxel_hidden(hid, 2)
    assert vox.shape == (2, 1, 8, 8, 8)
    for b, i, j, k in [(0, 0, 0, 0), (1, 3, 2, 1), (0, 1, 3, 2)]:
        assert bool((vox[b, 0, 2 * i:2 * i + 2, 2 * j:2 * j + 2, 2 * k:2 * k + 2] == hid[b, i, j, k]).all())


def test_hierarchical_remasking_frequency_and_halving():
    draws = [hierarchical_scales(3, 0.3, 0.5, torch.Generator().manual_seed(s)) for s in range(4000)]
    for k in range(3):
        applied = [d[k] for d in draws if d[k] is not None]
        assert set(applied) == {0.5 ** (k + 1)}  # 0.5, 0.25, 0.125: halving at each step
        assert abs(len(applied) / len(draws) - 0.3) < 0.03  # sd 0.007
    both = sum(d[0] is not None and d[1] is not None for d in draws) / len(draws)
    assert abs(both - 0.09) < 0.02  # independent draws
    assert hierarchical_scales(3, 0.0, 0.5, torch.Generator().manual_seed(0)) == [None] * 3


def test_encoder_zeroes_hidden_tokens_and_remasks_at_halved_ratios():
    cfg = gmim_config("tiny")
    model = GMIMPretrainModel(cfg)
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(1, 1, cfg.input_size, cfg.input_size, cfg.input_size, generator=gen)
    plan = model.plan(x)
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, k=k: inputs.__setitem__(k, a[0].detach()))
             for k, layer in enumerate(model.stages())]
    record: list = []
    with torch.no_grad():
        model.encode(x, plan, gen, [0.5, 0.25, 0.125], record=record)
    for hk in hooks:
        hk.remove()
    # first mask, then re-masks before MONAI layers1, layers2, layers3 (stages 0, 0, 1, 2)
    assert [s for s, _ in record] == [0, 0, 1, 2]
    mean_ratio = float(plan.ratios[0].mean())
    for i, ((stage, hid), scale) in enumerate(zip(record, [1.0, 0.5, 0.25, 0.125])):
        feat = inputs[stage][0]  # (C, t, t, t)
        assert hid.shape[-1] == feat.shape[-1] == cfg.input_size // cfg.patch_size // 2**stage
        assert bool((feat[:, hid[0]] == 0).all())  # hidden tokens are zero
        r = mean_ratio * scale  # one-token cells (8^3 map, grid 8) hide Bernoulli(r) each: 4 sd
        tol = 4 * (r * (1 - r) / hid.numel()) ** 0.5 + 0.005
        assert abs(float(hid.double().mean()) - r) < tol, (i, stage)
    # visible = hidden by none of the stage's masks (stage 0: the first and the fresh one)
    for stage in range(3):
        hidden = torch.stack([h[0] for s, h in record if s == stage]).any(0)
        assert bool((inputs[stage][0][:, ~hidden].abs().sum(0) > 0).all())
    assert not bool((inputs[3][0].abs().sum(0) == 0).any())  # nothing before layers4

    # no re-masking when the draws say none
    record.clear()
    with torch.no_grad():
        model.encode(x, plan, gen, [None, 0.25, None], record=record)
    assert [s for s, _ in record] == [0, 1]
