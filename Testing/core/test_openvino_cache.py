"""The OpenVINO conversion cache stays within its size budget (mimcore.inference.openvino_cache):
least recently used entries go first, the entry in use never, stale temporary folders too;
a bad ``MIM_OPENVINO_CACHE_GB`` is a clear error. The last test converts real networks."""

from __future__ import annotations

import os
import time

import pytest
import torch

from mimcore.errors import MimError
from mimcore.inference.openvino_cache import STALE_TMP_S, budget_bytes, prune


def entry(root, name, mb, age_s):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "net.bin").write_bytes(b"\0" * int(mb * 1e6))
    (folder / "net.xml").write_text("<xml/>")
    t = time.time() - age_s
    os.utime(folder, (t, t))
    return folder


def test_least_recently_used_entries_go_until_the_rest_fits(tmp_path):
    old = entry(tmp_path, "old", 3, 300)
    mid = entry(tmp_path, "mid", 3, 200)
    new = entry(tmp_path, "new", 3, 100)
    current = entry(tmp_path, "current", 3, 400)  # oldest mtime, but the one in use
    removed = prune(tmp_path, budget=int(10e6), keep=current)
    # current (3 MB) + new (3) + mid (3) = 9 MB <= 10 MB; old would make 12
    assert removed == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "mid", "new"]
    assert prune(tmp_path, budget=int(10e6), keep=current) == []  # fits now: nothing more
    # a budget of 0 keeps only the entry in use
    assert prune(tmp_path, budget=0, keep=current) == [new, mid]
    assert [p.name for p in tmp_path.iterdir()] == ["current"]


def test_a_large_entry_does_not_push_out_smaller_recent_ones_behind_it(tmp_path):
    """Entries are kept newest first while they fit: a big old one goes, a small older one stays."""
    entry(tmp_path, "a_recent", 1, 10)
    big = entry(tmp_path, "b_big", 8, 20)
    entry(tmp_path, "c_small", 1, 30)
    assert prune(tmp_path, budget=int(5e6)) == [big]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_recent", "c_small"]


def test_stale_temporary_folders_go_fresh_ones_stay(tmp_path):
    stale = entry(tmp_path, ".key1.abc.tmp", 1, STALE_TMP_S + 60)  # an interrupted write
    fresh = entry(tmp_path, ".key2.def.tmp", 1, 5)  # another process writing right now
    prune(tmp_path, budget=int(1e9))
    assert not stale.exists() and fresh.exists()


def test_a_missing_cache_folder_is_not_an_error(tmp_path):
    assert prune(tmp_path / "absent", budget=0) == []


@pytest.mark.parametrize("raw, expected", [("", 2_000_000_000), ("0", 0), ("0.5", 500_000_000), (" 3 ", 3_000_000_000)])
def test_the_budget_comes_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv("MIM_OPENVINO_CACHE_GB", raw)
    assert budget_bytes() == expected


@pytest.mark.parametrize("raw", ["two", "-1", "nan", "inf"])
def test_a_bad_budget_says_what_to_give(monkeypatch, raw):
    monkeypatch.setenv("MIM_OPENVINO_CACHE_GB", raw)
    with pytest.raises(MimError, match=r"MIM_OPENVINO_CACHE_GB must be a size in GB of 0 or more.*got"):
        budget_bytes()


def test_converting_a_new_network_prunes_the_cache(tmp_path, monkeypatch):
    """With the real OpenVINO: a budget of 0 keeps only the network just converted; a hit
    marks its entry as used, so with room for two the older of the others goes."""
    from mimcore.inference.openvino_net import compile_openvino

    monkeypatch.setenv("MIM_OPENVINO_CACHE", str(tmp_path))
    nets = [torch.nn.Conv3d(1, 2, 3, padding=1).eval() for _ in range(3)]

    def run(i):
        return compile_openvino(nets[i], 8, None, f"{i}" * 64, {"kind": "probe"}, threads=1)

    run(0)
    (first,) = list(tmp_path.iterdir())
    size = sum(p.stat().st_size for p in first.iterdir())
    monkeypatch.setenv("MIM_OPENVINO_CACHE_GB", str(2.5 * size / 1e9))  # room for two entries
    run(1)
    assert len(list(tmp_path.iterdir())) == 2
    t = time.time() - 100
    os.utime(first, (t - 100, t - 100))  # the first entry is the least recently used ...
    for p in tmp_path.iterdir():
        if p != first:
            os.utime(p, (t, t))
    run(0)  # ... until a hit on it marks it used: the second becomes the oldest
    run(2)
    names = {p.name for p in tmp_path.iterdir()}
    assert len(names) == 2 and first.name in names
    monkeypatch.setenv("MIM_OPENVINO_CACHE_GB", "0")
    run(1)
    assert len(list(tmp_path.iterdir())) == 1 and first.name not in {p.name for p in tmp_path.iterdir()}
    monkeypatch.setenv("MIM_OPENVINO_CACHE_GB", "lots")
    with pytest.raises(MimError, match="MIM_OPENVINO_CACHE_GB"):
        run(0)
