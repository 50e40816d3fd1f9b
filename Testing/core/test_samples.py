"""Tests of mimcore.data.samples / datalist with the real sample download (pip, ~10 s)."""

import argparse
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import Compose, Orientationd

from mimcore.cli import data_cmd
from mimcore.data import samples
from mimcore.files import sha256_file
from mimcore.data.samples import (FILES, SAMPLE_DIRNAME, datalist_entries, fetch_samples, parse_total_labels,
                                  resolve_cache_dir, safe_extract, volumes_from_folder)
from mimcore.data.transforms import LoadVolumed
from mimcore.data.volume_io import load_volume
from mimcore.errors import MimError

CT_SECTIONS = ("training", "validation", "test", "pretraining", "held_out")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A real fetch with pip into an empty cache: (cache root, datalist path, seconds)."""
    root = tmp_path_factory.mktemp("fresh_cache")
    start = time.perf_counter()
    datalist = fetch_samples(cache_dir=root, quiet=True)
    return root, datalist, time.perf_counter() - start


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """The sdist itself, downloaded with pip (for the --from-archive path)."""
    return samples._pip_download(tmp_path_factory.mktemp("sdist"), quiet=True)


# ----------------------------------------------------------------------------- fetching


def test_fetch_writes_verified_files(fresh):
    root, datalist, _ = fresh
    assert datalist == root / SAMPLE_DIRNAME / "datalist.json"
    for rel, sha in FILES.items():
        assert sha256_file(root / SAMPLE_DIRNAME / rel) == sha, rel
    assert len(list((root / SAMPLE_DIRNAME / "example_ct_dicom").iterdir())) == 20
    assert [p.name for p in root.iterdir()] == [SAMPLE_DIRNAME]  # no temp leftovers
    labels = json.loads((root / SAMPLE_DIRNAME / "labels_total.json").read_text(encoding="utf-8"))
    assert len(labels) == 118 and labels["0"] == "background" and labels["1"] == "spleen"
    assert labels["117"] == "costal_cartilages"


def test_second_fetch_is_fast_and_does_not_call_pip(fresh, monkeypatch, capsys):
    root, datalist, _ = fresh
    mtime = datalist.stat().st_mtime_ns

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is complete")

    monkeypatch.setattr(samples, "_pip_download", no_pip)
    start = time.perf_counter()
    assert fetch_samples(cache_dir=root) == datalist
    assert time.perf_counter() - start < 2
    assert datalist.stat().st_mtime_ns == mtime
    err = capsys.readouterr().err
    assert "already in" in err and "example_ct_dicom" in err and "41 classes" in err


def test_env_var_selects_cache(fresh, monkeypatch):
    root, datalist, _ = fresh
    monkeypatch.setenv("MIM_DATA_DIR", str(root))
    monkeypatch.setattr(samples, "_pip_download", None)  # would fail if called
    assert fetch_samples(quiet=True) == datalist


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("MIM_DATA_DIR", raising=False)
    default = resolve_cache_dir()
    assert default.name == "samples" and "mimcore" in str(default)
    monkeypatch.setenv("MIM_DATA_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"


def test_tampered_cache_is_fetched_again(fresh, archive, tmp_path):
    root, _, _ = fresh
    copy = tmp_path / "cache"
    shutil.copytree(root, copy)
    victim = copy / SAMPLE_DIRNAME / next(rel for rel in FILES if rel.startswith("example_ct_dicom/"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    (copy / SAMPLE_DIRNAME / "example_mr_sm.nii.gz").unlink()
    stale = copy / ".partial-old"
    stale.mkdir()
    os.utime(stale, (0, 0))
    datalist = fetch_samples(cache_dir=copy, quiet=True, from_archive=archive)
    assert not samples._cache_problems(datalist.parent)
    assert sorted(p.name for p in copy.iterdir()) == [SAMPLE_DIRNAME]  # old copy and stale temp removed


def test_from_archive_is_verified(tmp_path):
    fake = tmp_path / "totalsegmentator-2.18.0.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("totalsegmentator-2.18.0/README.md"), io.BytesIO(b""))
    with pytest.raises(MimError, match="is not the totalsegmentator 2.18.0 source archive"):
        fetch_samples(cache_dir=tmp_path / "c", quiet=True, from_archive=fake)
    with pytest.raises(MimError, match="No such archive"):
        fetch_samples(cache_dir=tmp_path / "c", quiet=True, from_archive=tmp_path / "missing.tar.gz")
    assert not (tmp_path / "c" / SAMPLE_DIRNAME).exists()
    assert not list((tmp_path / "c").glob(".partial-*"))


def test_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    """A real pip run that cannot reach any index (as offline) -> MimError with instructions."""
    empty = tmp_path / "nothing"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(MimError) as info:
        fetch_samples(cache_dir=tmp_path / "c", quiet=True)
    message = str(info.value)
    assert "pip could not download totalsegmentator==2.18.0" in message
    assert "No matching distribution" in message  # pip's own words
    assert "--from-archive" in message and "pip download --no-deps --no-binary :all:" in message
    assert not (tmp_path / "c" / SAMPLE_DIRNAME).exists()
    assert not list((tmp_path / "c").glob(".partial-*"))


def _tar_with(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return tarfile.open(path, "r:gz")


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("bad_name", ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt", "C:evil.txt"])
def test_safe_extract_refuses_path_traversal(tmp_path, bad_name):
    dest = tmp_path / "out"
    tar = _tar_with(tmp_path / "bad.tar.gz", [_file("ok/a.txt"), _file(bad_name)])
    with tar, pytest.raises(MimError, match="outside the target folder"):
        safe_extract(tar, dest, {"ok/a.txt": "a.txt", bad_name: "evil.txt"})
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_refuses_links_and_extracts_only_wanted(tmp_path):
    link = tarfile.TarInfo("pkg/data.bin")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar = _tar_with(tmp_path / "link.tar.gz", [(link, None)])
    with tar, pytest.raises(MimError, match="link or special file"):
        safe_extract(tar, tmp_path / "out", {"pkg/data.bin": "data.bin"})
    tar = _tar_with(tmp_path / "ok.tar.gz", [_file("pkg/a.txt", b"hello"), _file("pkg/b.txt")])
    with tar:
        hashes = safe_extract(tar, tmp_path / "ok", {"pkg/a.txt": "sub/a.txt"})
    assert (tmp_path / "ok" / "sub" / "a.txt").read_bytes() == b"hello"
    assert list(hashes) == ["sub/a.txt"] and not (tmp_path / "ok" / "b.txt").exists()


def test_label_names_are_parsed_without_running_code(tmp_path):
    marker = tmp_path / "ran"
    source = (f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
              "class_map = {'other': {1: 'x'}, 'total': {2: 'kidney_right', 1: 'spleen'}}\n"
              "class_map['total'][3] = 'evil'\n")
    assert parse_total_labels(source) == {0: "background", 1: "spleen", 2: "kidney_right"}
    assert not marker.exists()
    with pytest.raises(MimError, match="label names"):
        parse_total_labels("class_map = {'total': {'a': 1}}\n")


# ----------------------------------------------------------------------------- content


def test_datalist_sections_and_paths(sample_datalist):
    data = json.loads(sample_datalist.read_text(encoding="utf-8"))
    assert data["labels"]["0"] == "background" and len(data["labels"]) == 118
    assert [e["image"] for e in data["training"]] == ["example_ct_sm.nii.gz", "example_ct_dicom"]
    assert [e["image"] for e in data["held_out"]] == ["aorta_report/example_ct.nii.gz"]
    for section in CT_SECTIONS:
        for entry in datalist_entries(sample_datalist, section):
            assert entry["modality"] == "CT" and Path(entry["image"]).is_absolute()
            assert Path(entry["image"]).exists() and "mr" not in Path(entry["image"]).name
    mr = datalist_entries(sample_datalist, "mr")
    assert [Path(e["image"]).name for e in mr] == ["example_mr_sm.nii.gz"] and mr[0]["modality"] == "MR"
    with pytest.raises(MimError, match="no section 'nope'; it has: training"):
        datalist_entries(sample_datalist, "nope")


def test_datalist_entries_reports_missing_files(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"training": [{"image": "gone.nii.gz"}]}))
    with pytest.raises(MimError, match="1 file\\(s\\) listed .* do not exist"):
        datalist_entries(tmp_path / "d.json", "training")
    with pytest.raises(MimError, match="No datalist"):
        datalist_entries(tmp_path / "none.json", "training")


def test_label_maps_hold_the_expected_classes(sample_datalist):
    data = json.loads(sample_datalist.read_text(encoding="utf-8"))
    counts = []
    for entry in datalist_entries(sample_datalist, "training"):
        values = np.unique(load_volume(entry["label"]).array).astype(int)
        assert values.tolist() == entry["label_values"]
        assert all(str(v) in data["labels"] for v in values)
        counts.append(len(values) - 1)  # without background
    assert counts == [41, 31]


def test_dicom_series_matches_its_label_map(sample_datalist):
    folder = sample_datalist.parent
    ct = load_volume(folder / "example_ct_dicom")
    seg = load_volume(folder / "example_seg_dicom.nii.gz")
    assert ct.shape == seg.shape == (512, 512, 20)
    np.testing.assert_allclose(ct.spacing, [0.9765625, 0.9765625, 2.0], atol=1e-4)
    # same voxel centres in space, but the label map stores the j (A-P) axis reversed
    flip_j = np.eye(4)
    flip_j[1, 1], flip_j[1, 3] = -1, ct.shape[1] - 1
    np.testing.assert_allclose(ct.affine @ flip_j, seg.affine, atol=1e-3)
    # in RAS both agree exactly, and the labels then sit on body tissue, not air
    pair = Compose([LoadVolumed(["image", "label"]), Orientationd(["image", "label"], axcodes="RAS", labels=None)])(
        {"image": str(folder / "example_ct_dicom"), "label": str(folder / "example_seg_dicom.nii.gz")})
    assert pair["image"].shape == pair["label"].shape
    np.testing.assert_allclose(pair["image"].affine, pair["label"].affine, atol=1e-3)
    labelled = pair["label"][0] > 0
    assert (pair["image"][0][labelled] > -200).float().mean() > 0.95
    assert (ct.array[seg.array > 0] > -200).mean() < 0.8  # pairing raw arrays would be wrong


def test_training_pairs_share_a_grid(sample_datalist):
    load = Compose([LoadVolumed(["image", "label"]), Orientationd(["image", "label"], axcodes="RAS", labels=None)])
    for entry in datalist_entries(sample_datalist, "training"):
        pair = load(entry)
        assert pair["image"].shape == pair["label"].shape
        np.testing.assert_allclose(pair["image"].affine, pair["label"].affine, atol=1e-3)


def test_volumes_from_folder(sample_datalist, tmp_path):
    found = volumes_from_folder(sample_datalist.parent)
    assert [p.name for p in found] == ["example_ct.nii.gz", "example_ct_dicom", "example_ct_sm.nii.gz",
                                       "example_mr_sm.nii.gz", "example_seg.nii.gz", "example_seg_dicom.nii.gz"]
    series = sample_datalist.parent / "example_ct_dicom"
    assert volumes_from_folder(series) == [series]
    with pytest.raises(MimError, match="No volumes found"):
        volumes_from_folder(tmp_path)
    with pytest.raises(MimError, match="is not a folder"):
        volumes_from_folder(tmp_path / "missing")


def test_cli_data_samples(sample_datalist, capsys):
    parser = argparse.ArgumentParser(prog="mim")
    data_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "samples", "--cache-dir", str(sample_datalist.parent.parent), "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(sample_datalist) and out.err == ""
