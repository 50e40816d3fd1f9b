"""The local model library and ``mim models``: real folders, a real HTTP registry, real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from mimcore.bundles.bundle import load_bundle, save_bundle
from mimcore.bundles.library import (add_model, export_model, get_model, library_dir, list_models, load_registry,
                                     remove_model)
from mimcore.errors import MimError
from mimcore.files import sha256_file


@pytest.fixture(autouse=True)
def library(tmp_path, monkeypatch) -> Path:
    """MIM_MODELS_DIR in tmp_path (the user's real library is never touched)."""
    lib = tmp_path / "library"
    monkeypatch.setenv("MIM_MODELS_DIR", str(lib))
    monkeypatch.delenv("MIM_MODEL_REGISTRY", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return lib


def description(name: str = "liver-model") -> dict:
    return {
        "name": name,
        "architecture": {"kind": "mim-seg", "preset": "tiny"},
        "labels": [{"value": 1, "name": "liver", "color": [220, 100, 80]},
                   {"value": 2, "name": "tumour", "color": [250, 250, 30]}],
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "hu_min": -175.0, "hu_max": 250.0},
        "inference": {"roi_size": [32, 32, 32], "overlap": 0.5, "sw_batch_size": 1},
        "training": {"source": "unit test", "epochs": 1},
    }


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def visible(lib: Path) -> list[str]:
    return sorted(p.name for p in lib.iterdir() if not p.name.startswith(".")) if lib.exists() else []


# --------------------------------------------------------------------------- library API

def test_add_list_get_remove(tmp_path, library):
    assert library_dir() == library
    assert list_models() == []
    src = save_bundle(tmp_path / "src", weights(), description())
    path = add_model(src)
    assert path == library / "liver-model"
    [row] = list_models()
    assert row["name"] == "liver-model" and row["labels"] == 2 and row["label_names"] == ["liver", "tumour"]
    assert row["architecture"] == "mim-seg" and row["preset"] == "tiny" and row["error"] is None
    assert row["size"] == sum(p.stat().st_size for p in path.iterdir())

    bundle = get_model("liver-model")
    assert same(bundle.state_dict(), weights())
    assert get_model(str(src)).path == src  # a path works too
    assert not [p for p in library.iterdir() if p.name.startswith(".add-")]  # no staging leftovers

    remove_model("liver-model")
    assert list_models() == [] and visible(library) == []
    with pytest.raises(MimError, match="no model named 'liver-model'.*empty"):
        remove_model("liver-model")


def test_add_from_zip_and_model_json_with_names(tmp_path, library):
    zip_path = save_bundle(tmp_path / "m.zip", weights(1), description("Liver model (v2)"), as_zip=True)
    path = add_model(zip_path)
    assert path.name == "Liver-model-v2"  # made path-safe
    assert get_model("Liver-model-v2").name == "Liver-model-v2"  # model.json follows the library name
    assert same(get_model("Liver-model-v2").state_dict(), weights(1))

    src = save_bundle(tmp_path / "src", weights(2), description())
    add_model(src / "model.json", name="other")
    assert visible(library) == ["Liver-model-v2", "other"]
    assert json.loads((src / "model.json").read_text(encoding="utf-8"))["name"] == "liver-model"  # source untouched
    with pytest.raises(MimError, match="not a valid model name"):
        add_model(src, name="../escape")


def test_existing_name_needs_overwrite(tmp_path):
    add_model(save_bundle(tmp_path / "one", weights(1), description()))
    second = save_bundle(tmp_path / "two", weights(2), description())
    with pytest.raises(MimError, match="already in the library.*--overwrite"):
        add_model(second)
    assert same(get_model("liver-model").state_dict(), weights(1))
    add_model(second, overwrite=True)
    assert same(get_model("liver-model").state_dict(), weights(2))


def test_broken_bundles_never_enter_the_library(tmp_path, library):
    src = save_bundle(tmp_path / "src", weights(), description())
    w = src / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-1] + b"\0")
    with pytest.raises(MimError, match="sha256"):
        add_model(src)
    pickle_file = tmp_path / "model.pth"
    pickle_file.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(MimError, match="pickle"):
        add_model(pickle_file)
    assert visible(library) == []
    assert not [p for p in library.iterdir() if p.name != ".cache"]


def test_unknown_names_list_the_available_ones(tmp_path):
    add_model(save_bundle(tmp_path / "src", weights(), description()))
    with pytest.raises(MimError, match="no model named 'spleen'.*available in .*: liver-model"):
        get_model("spleen")
    with pytest.raises(MimError, match="no model registry"):
        add_model("spleen")


def test_list_marks_broken_entries(library):
    (library / "broken").mkdir(parents=True)
    (library / "broken" / "model.json").write_text("{")
    [row] = list_models()
    assert row["name"] == "broken" and "not valid JSON" in row["error"]


def test_export_zip_dir_monai(tmp_path):
    add_model(save_bundle(tmp_path / "src", weights(), description()))
    out = tmp_path / "out"
    out.mkdir()
    zip_path = export_model("liver-model", out)  # an existing folder: the export goes inside
    assert zip_path == out / "liver-model.zip" and zipfile.is_zipfile(zip_path)
    assert same(load_bundle(zip_path, cache_dir=tmp_path / "cache").state_dict(), weights())
    with pytest.raises(MimError, match="already exists"):
        export_model("liver-model", out)
    export_model("liver-model", out, overwrite=True)

    folder = export_model("liver-model", tmp_path / "copy", fmt="dir")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.safetensors"]
    assert same(load_bundle(folder).state_dict(), weights())

    monai_dir = export_model("liver-model", tmp_path / "monai", fmt="monai")
    loaded = torch.load(monai_dir / "models" / "model.pt", weights_only=True)
    assert same(loaded, weights())
    inference = json.loads((monai_dir / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert inference["network_def"] == {"_target_": "mimcore.models.segnet.build_segnet",
                                        "architecture": description()["architecture"]}
    with pytest.raises(MimError, match="unknown export format"):
        export_model("liver-model", tmp_path / "x", fmt="onnx")


# --------------------------------------------------------------------------- registries

@pytest.fixture()
def served(tmp_path):
    """A static HTTP server over tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _registry(www: Path, entries: list[dict]) -> Path:
    path = www / "registry.json"
    path.write_text(json.dumps({"models": entries}))
    return path


def test_add_from_a_registry_over_http(tmp_path, served, library):
    www, base = served
    zip_path = save_bundle(www / "liver.zip", weights(3), description("Liver CT"), as_zip=True)
    entry = {"name": "liver", "url": "liver.zip", "sha256": sha256_file(zip_path),
             "size": zip_path.stat().st_size, "description": "liver and tumour"}
    _registry(www, [entry, dict(entry, name="corrupt", sha256="0" * 64)])
    assert load_registry(f"{base}/registry.json")[0]["url"] == f"{base}/liver.zip"

    path = add_model("liver", registry=f"{base}/registry.json", progress=False)
    assert path == library / "liver"
    assert same(get_model("liver").state_dict(), weights(3))
    kept = [p.name for p in (library / ".cache" / "downloads").iterdir() if not p.name.endswith(".lock")]
    assert kept == []  # the zip is not kept (only the empty lock file of its download)

    with pytest.raises(MimError, match="sha256 .* expected 0{64}"):
        add_model("corrupt", registry=f"{base}/registry.json", progress=False)
    with pytest.raises(MimError, match=r"nor a model in the registry .*it has: liver, corrupt"):
        add_model("kidney", registry=f"{base}/registry.json")
    assert visible(library) == ["liver"]


def test_local_registry_with_relative_urls(tmp_path, monkeypatch):
    www = tmp_path / "reg"
    www.mkdir()
    zip_path = save_bundle(www / "m.zip", weights(4), description(), as_zip=True)
    registry = _registry(www, [{"name": "m", "url": "m.zip", "sha256": sha256_file(zip_path)}])
    monkeypatch.setenv("MIM_MODEL_REGISTRY", str(registry))  # the default registry
    add_model("m", progress=False)
    assert same(get_model("m").state_dict(), weights(4))
    (www / "bad.json").write_text('{"models": [{"name": "x"}]}')
    with pytest.raises(MimError, match=r"models\[0\] needs a 'url'"):
        load_registry(www / "bad.json")


# --------------------------------------------------------------------------- the CLI, as a subprocess

def mim(*args: str, library: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MIM_MODELS_DIR=str(library))
    return subprocess.run([sys.executable, "-m", "mimcore", "models", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_models_round_trip(tmp_path, library):
    src = save_bundle(tmp_path / "src", weights(), description())
    r = mim("list", library=library)
    assert r.returncode == 0 and "No models" in r.stdout

    r = mim("add", str(src), "--name", "liver", library=library)
    assert r.returncode == 0, r.stderr
    assert "Added 'liver'" in r.stdout

    other = tmp_path / "other_lib"  # --library wins over MIM_MODELS_DIR
    r = mim("add", str(src), "--library", str(other), library=library)
    assert r.returncode == 0, r.stderr
    assert visible(other) == ["liver-model"]
    r = mim("add", str(src), "--name", "again", "--json", "--library", str(other), library=library)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"event": "done", "name": "again", "path": str(other / "again")}

    # listing reads model.json files only: a GUI process can do it without importing torch
    code = ("import sys; from mimcore.bundles.library import list_models; "
            f"print(len(list_models({str(other)!r})), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2", "False"]

    r = mim("list", library=library)
    assert r.returncode == 0
    header, row = r.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "ARCHITECTURE", "PRESET", "LABELS", "SIZE", "LABEL", "NAMES"]
    assert row.split()[:4] == ["liver", "mim-seg", "tiny", "2"] and "liver, tumour" in row

    r = mim("show", "liver", library=library)
    assert r.returncode == 0
    assert "tumour" in r.stdout and "#fafa1e" in r.stdout and "hu_min: -175.0" in r.stdout
    assert "source: unit test" in r.stdout

    r = mim("export", "liver", str(tmp_path / "liver.zip"), library=library)
    assert r.returncode == 0, r.stderr
    assert same(load_bundle(tmp_path / "liver.zip", cache_dir=tmp_path / "c").state_dict(), weights())

    r = mim("remove", "liver", library=library)
    assert r.returncode == 0 and visible(library) == []


def test_cli_user_errors_exit_2_without_traceback(tmp_path, library):
    src = save_bundle(tmp_path / "src", weights(), description())
    add_model(src)
    evil = tmp_path / "model.pt"
    evil.write_bytes(b"\x80\x04K\x01.")
    cases = [
        (("remove", "nope"), "no model named 'nope'"),
        (("add", str(src)), "already in the library"),
        (("add", str(evil)), "pickle"),
        (("show", "nope"), "available in"),
    ]
    for args, message in cases:
        r = mim(*args, library=library)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("mim: error:") and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr

    r = mim("list", "--json", library=library)
    assert r.returncode == 0 and [m["name"] for m in json.loads(r.stdout)] == ["liver-model"]


# --------------------------------------------------------------------------- mim models add --progress json

def _events(stdout: str) -> list[dict]:
    """The events of a ``--progress json`` run; every stdout line must be one."""
    from mimcore.events import parse_event

    lines = stdout.splitlines()
    parsed = [parse_event(line) for line in lines]
    assert lines and None not in parsed, stdout  # nothing but events on stdout
    return parsed


def test_cli_add_progress_json_reports_the_download(tmp_path, served, library):
    www, base = served
    big = {"w": torch.randn(300_000, generator=torch.Generator().manual_seed(5))}  # 1.2 MB: ~19 chunks of 64 KiB
    zip_path = save_bundle(www / "big.zip", big, description("Big"), as_zip=True)
    size = zip_path.stat().st_size
    entry = {"name": "big", "url": "big.zip", "sha256": sha256_file(zip_path), "size": size}
    _registry(www, [entry, dict(entry, name="unsized", size=None), dict(entry, name="corrupt", sha256="0" * 64)])
    registry = f"{base}/registry.json"  # over HTTP: the zip comes in 64 KiB chunks

    r = mim("add", "big", "--registry", registry, "--progress", "json", library=library)
    assert r.returncode == 0, r.stderr
    assert "B/s" not in r.stderr  # no tqdm bar next to the events
    events = _events(r.stdout)
    assert events[0] == {"event": "start", "v": 1, "stage": "add", "source": "big", "library": str(library),
                         "message": "adding big to the model library"}
    assert events[-1] == {"event": "done", "name": "big", "path": str(library / "big")}
    progress = events[1:-1]
    assert len(progress) >= 5 and all(e["event"] == "progress" and e["stage"] == "download" for e in progress)
    assert all(e["total"] == size and e["metrics"] == {} for e in progress)  # bytes of the served file
    steps = [e["step"] for e in progress]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == size  # from nothing to all of it
    assert progress[0]["eta_s"] is None and all(e["eta_s"] is None or e["eta_s"] >= 0 for e in progress)
    assert same(get_model("big").state_dict(), big)

    # no size in the registry: the total is what the server announced (Content-Length)
    r = mim("add", "unsized", "--registry", registry, "--progress", "json", library=library)
    assert r.returncode == 0, r.stderr
    assert {e["total"] for e in _events(r.stdout) if e["event"] == "progress"} == {size}

    # a failure: the download's progress, then one error event (exit 2), nothing added
    r = mim("add", "corrupt", "--registry", registry, "--progress", "json", library=library)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    events = _events(r.stdout)
    assert events[0]["event"] == "start" and events[-2]["event"] == "progress" and events[-2]["step"] == size
    assert events[-1]["event"] == "error" and "sha256" in events[-1]["message"]
    assert r.stderr.startswith("mim: error:") and visible(library) == ["big", "unsized"]

    # --json alone keeps its meaning: only the outcome as an event (here the error; success: one done
    # line, test_cli_models_round_trip), no start or progress events
    r = mim("add", "corrupt", "--registry", registry, "--json", library=library)
    assert r.returncode == 2 and [e["event"] for e in _events(r.stdout)] == ["error"]


def test_cli_add_quiet_is_progress_none(capsys):
    from mimcore.cli.main import build_parser

    args = build_parser().parse_args(["models", "add", "x", "--quiet"])
    assert (args.quiet, args.progress) == (True, "bar")  # _add reads --quiet as --progress none
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["models", "add", "x", "--quiet", "--progress", "json"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_download_events_are_throttled_but_keep_the_last_byte(capsys):
    from mimcore.cli.models_cmd import DownloadEvents
    from mimcore.events import parse_event

    now = [0.0]
    report = DownloadEvents(clock=lambda: now[0])
    for done in range(0, 1_000_001, 1000):  # 1000 chunks of 1 kB, all at once
        report(done, 1_000_000)
    sent = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    steps = [e["step"] for e in sent]
    assert steps[0] == 0 and steps[-1] == 1_000_000 and len(steps) == 101  # every 1 % of the size, and the end
    report = DownloadEvents(clock=lambda: now[0])
    for done in (0, 500, 1000):  # size unknown: every 0.25 s
        now[0] += 0.3
        report(done, None)
    sent = [parse_event(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["step"], e["total"], e["eta_s"]) for e in sent] == [(0, None, None), (500, None, None),
                                                                     (1000, None, None)]
    report = DownloadEvents(clock=lambda: now[0])
    report(4000, 10_000)  # a resumed download: the rate counts this run's bytes only
    now[0] += 1.0
    report(6000, 10_000)
    assert parse_event(capsys.readouterr().out.splitlines()[-1])["eta_s"] == 2.0
