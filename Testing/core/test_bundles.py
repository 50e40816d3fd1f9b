"""Model bundles (save/load, zip, refusals), verified resumable downloads and the MONAI export.

Real files, a real HTTP server thread, real pickles; no mocks.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mimcore.bundles import bundle as bundle_module
from mimcore.bundles.bundle import (BUNDLE_FORMAT, Bundle, load_bundle, save_bundle, validate_description,
                                   write_zip)
from mimcore.bundles.download import download
from mimcore.errors import MimError
from mimcore.files import sha256_file


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Library and cache in tmp_path; local HTTP never goes through a proxy."""
    monkeypatch.setenv("MIM_MODELS_DIR", str(tmp_path / "library"))
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def description(name: str = "test-model") -> dict:
    return {
        "name": name,
        "architecture": {"kind": "mim-seg", "preset": "tiny"},
        "labels": [{"value": 1, "name": "liver", "color": [220, 100, 80]},
                   {"value": 2, "name": "spleen", "color": [157, 108, 162]}],
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "hu_min": -175.0, "hu_max": 250.0},
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.5, "sw_batch_size": 2},
        "training": {"epochs": 3, "data": ["case_0", "case_1"]},
    }


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "a": torch.randn(3, 4, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "ints": torch.arange(7, dtype=torch.int64),
        "flags": torch.tensor([True, False, True]),
        "transposed": base.t(),  # not contiguous
        "shared": base,  # shares storage with "transposed"
        "empty": torch.zeros(0, 3),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- round trips

def test_directory_round_trip_is_exact(tmp_path):
    sd, desc = state_dict(), description()
    before = json.dumps(desc)
    out = save_bundle(tmp_path / "model", sd, desc)
    assert out == tmp_path / "model"
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]
    assert json.dumps(desc) == before  # the caller's dict is not modified

    bundle = load_bundle(out)
    assert isinstance(bundle, Bundle) and bundle.path == out
    assert_same(bundle.state_dict(), sd)
    d = bundle.description
    assert d["format"] == BUNDLE_FORMAT
    assert d["weights"] == {"file": "weights.safetensors", "sha256": sha256_file(out / "weights.safetensors"),
                            "size": (out / "weights.safetensors").stat().st_size}
    for key, value in desc.items():
        assert d[key] == value
    assert bundle.name == "test-model"
    assert [lb["name"] for lb in bundle.labels] == ["liver", "spleen"]
    # a model.json path opens the same bundle
    assert load_bundle(out / "model.json").description == d


def test_zip_round_trip_and_cache(tmp_path):
    sd = state_dict()
    zip_path = save_bundle(tmp_path / "model.zip", sd, description(), as_zip=True)
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == ["model.json", "weights.safetensors"]
    first = load_bundle(zip_path, cache_dir=tmp_path / "cache")
    assert_same(first.state_dict(), sd)
    assert first.path.parent == tmp_path / "cache" / "bundles"
    assert first.path.name == sha256_file(zip_path)  # content-addressed
    again = load_bundle(zip_path, cache_dir=tmp_path / "cache")
    assert again.path == first.path
    # default cache: the library's (MIM_MODELS_DIR)
    default = load_bundle(zip_path)
    assert default.path.is_relative_to(tmp_path / "library" / ".cache")


def test_zip_of_a_folder_loads(tmp_path):
    """A zip made from the bundle folder itself (one top-level folder) is accepted."""
    folder = save_bundle(tmp_path / "liver_model", state_dict(), description())
    zip_path = tmp_path / "by_hand.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.write(folder / "model.json", "liver_model/model.json")
        zf.write(folder / "weights.safetensors", "liver_model/weights.safetensors")
        zf.writestr("__MACOSX/liver_model/._model.json", b"junk")
    bundle = load_bundle(zip_path, cache_dir=tmp_path / "cache")
    assert bundle.path.name == "liver_model"
    assert_same(bundle.state_dict(), state_dict())


def test_save_replaces_a_bundle_but_never_other_folders(tmp_path):
    dest = save_bundle(tmp_path / "model", {"a": torch.ones(2)}, description())
    save_bundle(dest, {"a": torch.zeros(3)}, description("second"))
    bundle = load_bundle(dest)
    assert bundle.name == "second" and torch.equal(bundle.state_dict()["a"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary leftovers

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(MimError, match="not a model bundle"):
        save_bundle(precious, {"a": torch.ones(2)}, description())
    assert (precious / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_save_refuses_bad_input_before_writing(tmp_path):
    with pytest.raises(MimError, match="not a tensor"):
        save_bundle(tmp_path / "m", {"a": torch.ones(2), "step": 3}, description())
    bad = description()
    bad["labels"][1]["value"] = 1
    with pytest.raises(MimError, match="used twice"):
        save_bundle(tmp_path / "m", {"a": torch.ones(2)}, bad)
    with pytest.raises(MimError, match="JSON-serialisable"):
        save_bundle(tmp_path / "m", {"a": torch.ones(2)}, dict(description(), training={"x": object()}))
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- refusals

def test_tampered_or_missing_weights_are_refused(tmp_path):
    dest = save_bundle(tmp_path / "model", state_dict(), description())
    weights = dest / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    bundle = load_bundle(dest)  # the description alone is fine
    with pytest.raises(MimError, match="sha256.*tampered"):
        bundle.state_dict()
    with pytest.raises(MimError, match="sha256"):
        bundle.verify()

    weights.write_bytes(bytes(data[:-10]))
    with pytest.raises(MimError, match=r"bytes but model.json says"):
        load_bundle(dest).state_dict()

    weights.unlink()
    with pytest.raises(MimError, match="missing"):
        load_bundle(dest).state_dict()


def test_truncated_or_missing_model_json_is_refused(tmp_path):
    dest = save_bundle(tmp_path / "model", state_dict(), description())
    text = (dest / "model.json").read_text(encoding="utf-8")
    (dest / "model.json").write_text(text[: len(text) // 2])
    with pytest.raises(MimError, match=r"model.json is not valid JSON .*line \d+.*damaged or incomplete"):
        load_bundle(dest)
    (dest / "model.json").unlink()
    with pytest.raises(MimError, match=r"model.json is missing"):
        load_bundle(dest)
    with pytest.raises(MimError, match="does not exist"):
        load_bundle(tmp_path / "nowhere")


def test_missing_key_names_the_key_and_the_file(tmp_path):
    dest = save_bundle(tmp_path / "model", state_dict(), description())
    d = json.loads((dest / "model.json").read_text(encoding="utf-8"))
    del d["labels"]
    (dest / "model.json").write_text(json.dumps(d))
    with pytest.raises(MimError) as err:
        load_bundle(dest)
    assert "'labels' is missing" in str(err.value) and str(dest / "model.json") in str(err.value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="mimcore.bundle.v2"), "newer than this mimcore reads"),
    (lambda d: d.update(format="something.else"), "unknown format"),
    (lambda d: d.update(format="mimcore.pretrain.v1"), "pre-training checkpoint"),
    (lambda d: d.pop("format"), "'format' is missing"),
    (lambda d: d.update(architecture=[]), "'architecture' must be a JSON object"),
    (lambda d: d["architecture"].pop("kind"), "'kind'"),
    (lambda d: d.update(name="  "), "'name' is empty"),
    (lambda d: d["labels"][0].update(value=0), r"labels\[0\].value must be a positive integer"),
    (lambda d: d["labels"][0].update(value=True), r"labels\[0\].value"),
    (lambda d: d["labels"][1].update(name=""), r"labels\[1\].name"),
    (lambda d: d["labels"][1].update(color=[0, 256, 0]), r"labels\[1\].color"),
    (lambda d: d["labels"][1].update(color=[0, 0]), r"labels\[1\].color"),
    (lambda d: d["weights"].update(file="../elsewhere.safetensors"), "'weights.file' must be a file name"),
    (lambda d: d["weights"].update(sha256="abc"), "'weights.sha256'"),
    (lambda d: d["weights"].update(size=-1), "'weights.size'"),
])
def test_validate_description(change, message):
    d = dict(description(), format=BUNDLE_FORMAT, weights={"file": "weights.safetensors", "sha256": "0" * 64, "size": 1})
    validate_description(d)
    change(d)
    with pytest.raises(MimError, match=message):
        validate_description(d, source="somewhere/model.json")


def _zip_with(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("member", ["../escaped.txt", "sub/../../escaped.txt", "/tmp/escaped_abs.txt",
                                    "..\\escaped.txt", "C:/escaped.txt"])
def test_zip_slip_is_refused(tmp_path, member):
    folder = save_bundle(tmp_path / "model", state_dict(), description())
    entries = [("model.json", (folder / "model.json").read_bytes()),
               ("weights.safetensors", (folder / "weights.safetensors").read_bytes()),
               (member, b"evil")]
    zip_path = _zip_with(tmp_path / "evil.zip", entries)
    with pytest.raises(MimError, match="would leave the bundle folder"):
        load_bundle(zip_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/escaped_abs.txt").exists()
    assert not list((tmp_path / "cache" / "bundles").iterdir())  # nothing left behind


def test_zip_symlink_is_refused(tmp_path):
    folder = save_bundle(tmp_path / "model", state_dict(), description())
    link = zipfile.ZipInfo("weights.safetensors")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    zip_path = _zip_with(tmp_path / "link.zip", [("model.json", (folder / "model.json").read_bytes()),
                                                 (link, b"/etc/passwd")])
    with pytest.raises(MimError, match="symbolic link"):
        load_bundle(zip_path, cache_dir=tmp_path / "cache")


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    folder = save_bundle(tmp_path / "model", state_dict(), description())
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder / "model.json", "model.json")
        zf.write(folder / "weights.safetensors", "weights.safetensors")
        with zf.open("padding.bin", "w") as out:  # 64 MiB of zeros deflate to ~64 KiB
            for _ in range(64):
                out.write(bytes(1 << 20))
    with pytest.raises(MimError, match="zip bomb"):
        load_bundle(bomb, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "bundles").iterdir())

    # the total is capped too, whatever the ratio (the cap lowered to the bundle's own size)
    plain = tmp_path / "plain.zip"
    write_zip(folder, plain)
    monkeypatch.setattr(bundle_module, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(MimError, match="would unpack to .* limit"):
        load_bundle(plain, cache_dir=tmp_path / "cache2")


def test_zip_without_model_json_is_refused(tmp_path):
    zip_path = _zip_with(tmp_path / "other.zip", [("readme.txt", b"hello")])
    with pytest.raises(MimError, match="no model.json"):
        load_bundle(zip_path, cache_dir=tmp_path / "cache")


class _Evil:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_refused_without_being_run(tmp_path):
    # the payload works: unpickling it does create its marker
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Evil(proof))).close()
    assert proof.exists()

    marker = tmp_path / "pwned"
    raw = tmp_path / "model.pt"
    raw.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    with pytest.raises(MimError, match="pickle"):
        load_bundle(raw)

    zipped = tmp_path / "torch_saved.pt"  # torch.save writes a zip holding data.pkl
    torch.save({"state_dict": _Evil(marker)}, zipped)
    assert zipfile.is_zipfile(zipped)
    with pytest.raises(MimError, match="pickle"):
        load_bundle(zipped, cache_dir=tmp_path / "cache")

    # a pickle posing as the weights file of a well-formed bundle (sha256 and size match)
    folder = save_bundle(tmp_path / "model", state_dict(), description())
    (folder / "weights.safetensors").write_bytes(raw.read_bytes())
    d = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    d["weights"].update(sha256=sha256_file(raw), size=raw.stat().st_size)
    (folder / "model.json").write_text(json.dumps(d))
    with pytest.raises(MimError, match="not a valid safetensors file"):
        load_bundle(folder).state_dict()
    with pytest.raises(MimError, match="not a valid safetensors file"):
        load_bundle(folder).verify()
    assert not marker.exists()


# --------------------------------------------------------------------------- downloads

class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range: bytes=N-`` unless ``server.honor_range`` is False;
    ``server.cut_after`` bytes of body, then hangs up (Content-Length still announces all)."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and srv.honor_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:
            body = body[: srv.cut_after]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture()
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.files, server.requests, server.honor_range, server.cut_after = {}, [], True, None
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


PAYLOAD = os.urandom(300_000)
PAYLOAD_SHA = __import__("hashlib").sha256(PAYLOAD).hexdigest()


def test_http_download(http_server, tmp_path):
    http_server.files["/m.zip"] = PAYLOAD
    dest = download(f"{http_server.url}/m.zip", tmp_path / "m.zip", PAYLOAD_SHA, size=len(PAYLOAD), progress=True)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "m.zip.part").exists()
    # already there and valid: no new request
    download(f"{http_server.url}/m.zip", dest, PAYLOAD_SHA, progress=False)
    assert len(http_server.requests) == 1


def test_a_second_download_waits_for_the_first_and_uses_its_file(http_server, tmp_path):
    import subprocess
    import sys

    http_server.files["/m.zip"] = PAYLOAD
    dest = tmp_path / "m.zip"
    holder = subprocess.Popen(  # another process downloading the same file: it holds the lock
        [sys.executable, "-c", "import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); sys.stdin.readline(); lock.release()", f"{dest}.lock"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("path", download(
            f"{http_server.url}/m.zip", dest, PAYLOAD_SHA, size=len(PAYLOAD), progress=False)))
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and http_server.requests == []  # waiting, not downloading
        dest.write_bytes(PAYLOAD)  # the other process finishes its download
        holder.stdin.write("\n")
        holder.stdin.flush()
        worker.join(30)
        assert result["path"] == dest and dest.read_bytes() == PAYLOAD
        assert http_server.requests == []  # it found the verified file and fetched nothing
    finally:
        holder.kill()
        holder.wait()


def test_http_download_resumes_a_part_file(http_server, tmp_path):
    http_server.files["/m.zip"] = PAYLOAD
    (tmp_path / "m.zip.part").write_bytes(PAYLOAD[:100_000])
    dest = download(f"{http_server.url}/m.zip", tmp_path / "m.zip", PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.requests == [("/m.zip", "bytes=100000-")]


def test_interrupted_download_keeps_the_part_and_resumes(http_server, tmp_path):
    http_server.files["/m.zip"] = PAYLOAD
    http_server.cut_after = 120_000
    url = f"{http_server.url}/m.zip"
    with pytest.raises(MimError, match=r"interrupted after 120000 of 300000 bytes.*resume"):
        download(url, tmp_path / "m.zip", PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert (tmp_path / "m.zip.part").stat().st_size == 120_000
    assert not (tmp_path / "m.zip").exists()
    http_server.cut_after = None
    dest = download(url, tmp_path / "m.zip", PAYLOAD_SHA, progress=False)  # size unknown this time
    assert dest.read_bytes() == PAYLOAD
    assert http_server.requests[-1] == ("/m.zip", "bytes=120000-")


def test_server_ignoring_range_restarts(http_server, tmp_path):
    http_server.files["/m.zip"] = PAYLOAD
    http_server.honor_range = False
    (tmp_path / "m.zip.part").write_bytes(b"x" * 5000)  # would corrupt the file if appended to
    dest = download(f"{http_server.url}/m.zip", tmp_path / "m.zip", PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert http_server.requests == [("/m.zip", "bytes=5000-")]


def test_part_longer_than_the_file_restarts(http_server, tmp_path):
    http_server.files["/m.zip"] = PAYLOAD
    (tmp_path / "m.zip.part").write_bytes(b"x" * (len(PAYLOAD) + 10))  # server answers 416
    dest = download(f"{http_server.url}/m.zip", tmp_path / "m.zip", PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_sha256_or_size_mismatch_is_refused(http_server, tmp_path):
    http_server.files["/m.zip"] = PAYLOAD
    wrong = "0" * 64
    with pytest.raises(MimError) as err:
        download(f"{http_server.url}/m.zip", tmp_path / "m.zip", wrong, progress=False)
    assert f"sha256 {PAYLOAD_SHA}, expected {wrong}" in str(err.value) and "deleted" in str(err.value)
    assert not (tmp_path / "m.zip").exists() and not (tmp_path / "m.zip.part").exists()

    with pytest.raises(MimError, match=rf"has {len(PAYLOAD)} bytes, expected {len(PAYLOAD) - 1}"):
        download(f"{http_server.url}/m.zip", tmp_path / "m.zip", PAYLOAD_SHA, size=len(PAYLOAD) - 1, progress=False)
    assert not (tmp_path / "m.zip.part").exists()

    # a corrupt .part is resumed, caught by the checksum, deleted; the next try succeeds
    (tmp_path / "m.zip.part").write_bytes(b"y" * 1000)
    with pytest.raises(MimError, match="expected"):
        download(f"{http_server.url}/m.zip", tmp_path / "m.zip", PAYLOAD_SHA, progress=False)
    assert download(f"{http_server.url}/m.zip", tmp_path / "m.zip", PAYLOAD_SHA, progress=False).read_bytes() == PAYLOAD


def test_network_errors_name_the_url(http_server, tmp_path):
    url = f"{http_server.url}/missing.zip"
    with pytest.raises(MimError, match=rf"could not download {re.escape(url)}: HTTP 404"):
        download(url, tmp_path / "x.zip", PAYLOAD_SHA, progress=False)
    http_server.server_close()  # nothing listens on that port any more
    http_server.shutdown()
    with pytest.raises(MimError, match=r"could not download .*network connection"):
        download(url, tmp_path / "x.zip", PAYLOAD_SHA, progress=False, timeout=5)


def test_file_url_and_local_path_download(tmp_path):
    src = tmp_path / "source.bin"
    src.write_bytes(PAYLOAD)
    got = download(src.as_uri(), tmp_path / "out" / "a.bin", PAYLOAD_SHA, size=len(PAYLOAD), progress=False)
    assert got.read_bytes() == PAYLOAD
    got = download(str(src), tmp_path / "out" / "b.bin", PAYLOAD_SHA, progress=False)
    assert got.read_bytes() == PAYLOAD
    with pytest.raises(MimError, match="expected"):
        download(src.as_uri(), tmp_path / "out" / "c.bin", "1" * 64, progress=False)
    assert not (tmp_path / "out" / "c.bin").exists()
    with pytest.raises(MimError, match="does not exist"):
        download((tmp_path / "nope.bin").as_uri(), tmp_path / "out" / "d.bin", PAYLOAD_SHA, progress=False)


# --------------------------------------------------------------------------- MONAI export

def test_monai_export_parses_and_runs(tmp_path):
    """The exported MONAI bundle: network_def instantiates and takes model.pt (weights_only);
    the preprocessing, inferer and postprocessing of inference.json run on a real NIfTI and
    give a segmentation on the input's grid."""
    nib = pytest.importorskip("nibabel")
    import numpy as np
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch, list_data_collate

    from mimcore.bundles.monai_export import export_monai_bundle
    from mimcore.models.convvit import preset as convvit_preset
    from mimcore.models.mim_segnet import MiMSegNet, architecture_dict

    torch.manual_seed(0)
    model = MiMSegNet(convvit_preset("tiny"), out_channels=3).eval()
    desc = dict(description(), architecture=architecture_dict(model, "tiny"))
    desc["labels"][1]["value"] = 5  # non-consecutive values are mapped from channels
    bundle = load_bundle(save_bundle(tmp_path / "model", model.state_dict(), desc))
    out = export_monai_bundle(bundle, tmp_path / "monai_bundle")
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (out / rel).is_file(), rel
    meta = json.loads((out / "configs/metadata.json").read_text(encoding="utf-8"))
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver",
                                                                              "2": "spleen"}

    parser = ConfigParser()
    parser.read_config(str(out / "configs/inference.json"))
    parser["bundle_root"] = str(out)
    parser["output_dir"] = str(tmp_path / "eval")
    net = parser.get_parsed_content("network_def")
    assert type(net).__name__ == "MiMSegNet"
    weights = torch.load(out / "models/model.pt", weights_only=True)
    net.load_state_dict(weights, strict=True)
    net.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))

    # a small CT, 1 x 1 x 1.5 mm, LPS-ish axes: goes through Orientation, Spacing, window
    ct = np.random.default_rng(0).normal(0, 300, size=(40, 36, 24)).astype(np.float32)
    affine = np.diag([-1.0, -1.0, 1.5, 1.0])
    nib.save(nib.Nifti1Image(ct, affine), tmp_path / "ct.nii.gz")
    pre = parser.get_parsed_content("preprocessing")
    item = pre({"image": str(tmp_path / "ct.nii.gz")})
    img = item["image"]
    assert img.shape[0] == 1 and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert np.allclose(np.abs(np.diag(img.affine.numpy())[:3]), [1.5, 1.5, 2.0])

    batch = list_data_collate([item])  # what the bundle's DataLoader does
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        batch["pred"] = inferer(batch["image"], net)
    assert batch["pred"].shape == (1, 3, *img.shape[1:])
    post = parser.get_parsed_content("postprocessing")
    [result] = [post(d) for d in decollate_batch(batch)]
    saved = list((tmp_path / "eval").glob("*.nii.gz"))
    assert len(saved) == 1
    seg = nib.load(saved[0])
    assert seg.shape == ct.shape  # back on the input CT's grid
    assert np.allclose(seg.affine, affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 5}
    assert result["pred"].shape[1:] == ct.shape


def test_monai_export_refuses_an_existing_folder(tmp_path):
    from mimcore.bundles.monai_export import export_monai_bundle

    bundle = load_bundle(save_bundle(tmp_path / "model", {"a": torch.ones(2)}, description()))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("x")
    with pytest.raises(MimError, match="already exists"):
        export_monai_bundle(bundle, tmp_path / "taken")
