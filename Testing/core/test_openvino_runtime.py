"""The fast profile's OpenVINO runtime (mimcore.inference.openvino_net), with the real OpenVINO:
its logits against PyTorch's, any window batch, the conversion cache, the choice of runtime,
the fallback to PyTorch when OpenVINO is missing, and ``mim segment --fast`` end to end."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_atomic_outputs import tiny_bundle_at
from test_segment_fast import body_ct

from mimcore.bundles.bundle import load_bundle
from mimcore.data.volume_io import save_volume
from mimcore.errors import MimError
from mimcore.inference.openvino_cache import cache_dir
from mimcore.inference.openvino_net import OpenVINONet, OpenVINOUnavailable, compile_openvino
from mimcore.inference.profiles import PROFILES, choose_runtime, cpu_has_bf16, openvino_dtype, precision_name
from mimcore.inference.segment import Segmenter
from mimcore.models import segnet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_bundle_at(tmp_path_factory.mktemp("ov_bundle"), overlap=0.5, name="tiny-ov")


def compile_bundle(path, amp=None):
    bundle = load_bundle(path)
    net = segnet.build(bundle.description["architecture"])
    net.load_state_dict(bundle.state_dict())
    net.eval()
    ov = compile_openvino(net, segnet.input_size(net), amp, bundle.description["weights"]["sha256"],
                          bundle.description["architecture"], threads=1)
    return net, ov


def windows(n, roi=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, roi, roi, roi), generator=g)


def test_fp32_logits_equal_pytorch_for_any_window_batch(tiny):
    net, ov = compile_bundle(tiny)
    assert isinstance(ov, OpenVINONet) and ov.precision == "fp32"
    for n in (1, 2, 3):  # the batch size is not fixed at conversion: skipped air windows change it
        x = windows(n, seed=n)
        with torch.no_grad():
            ref = net(x)
        out = ov(x)
        assert out.shape == ref.shape == (n, 3, 32, 32, 32) and out.dtype == torch.float32
        assert float((out - ref).abs().max()) <= 1e-4 * float(ref.std()), n
    # a channels-last input (what the PyTorch fast path hands its network) gives the same logits
    x = windows(2)
    np.testing.assert_allclose(ov(x.contiguous(memory_format=torch.channels_last_3d)).numpy(), ov(x).numpy())


def test_two_streams_give_the_same_logits_in_order(tiny):
    """A batch split over two requests run at once (the default with 2 threads or more) comes
    back whole and in window order, with PyTorch's logits."""
    bundle = load_bundle(tiny)
    net = segnet.build(bundle.description["architecture"])
    net.load_state_dict(bundle.state_dict())
    net.eval()
    ov = compile_openvino(net, 32, None, bundle.description["weights"]["sha256"], bundle.description["architecture"],
                          threads=2)
    assert ov.streams == 2 and int(ov.compiled.get_property("NUM_STREAMS")) == 2
    for n in (1, 2, 3, 5):
        x = windows(n, seed=10 + n)
        with torch.no_grad():
            ref = net(x)
        out = ov(x)
        assert out.shape == ref.shape
        assert float((out - ref).abs().max()) <= 1e-4 * float(ref.std()), n
    one = compile_openvino(net, 32, None, bundle.description["weights"]["sha256"], bundle.description["architecture"],
                           threads=2, streams=1)
    assert one.streams == 1
    x = windows(3, seed=99)
    np.testing.assert_allclose(one(x).numpy(), ov(x).numpy(), rtol=1e-5, atol=1e-5 * float(ov(x).std()))


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_logits_are_close_to_fp32(tiny):
    net, ov = compile_bundle(tiny, torch.bfloat16)
    assert ov.precision == "bf16"
    x = windows(2)
    with torch.no_grad():
        ref = net(x)
    err = float((ov(x) - ref).abs().max()) / float(ref.std())
    assert 0 < err < 0.3  # rounded (not fp32), but the same network


def test_the_conversion_is_cached_and_a_damaged_cache_is_rebuilt(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_OPENVINO_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    net, ov = compile_bundle(tiny)
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and {p.name for p in folders[0].iterdir()} == {"net.xml", "net.bin"}
    assert (folders[0] / "net.bin").stat().st_size > 4 * sum(p.numel() for p in net.parameters()) * 0.9  # fp32
    x = windows(2)
    expected = ov(x)
    (folders[0] / "net.xml").write_text("<not a model")  # damaged: converted again, not an error
    _, ov2 = compile_bundle(tiny)
    np.testing.assert_allclose(ov2(x).numpy(), expected.numpy())
    assert (folders[0] / "net.xml").read_text().startswith("<?xml")
    # other weights: another entry, never the first model's network
    state = {k: v + 0.01 for k, v in load_bundle(tiny).state_dict().items()}
    from mimcore.bundles.bundle import save_bundle

    moved = save_bundle(tmp_path / "moved", state, load_bundle(tiny).description)
    net3, ov3 = compile_bundle(moved)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    with torch.no_grad():
        assert float((ov3(x) - net3(x)).abs().max()) <= 1e-4 * float(net3(x).std())


def test_which_runtime_runs_the_network():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_runtime("auto", cpu, PROFILES["fast"]) == "openvino"  # fp32 windows of 64^3 (small)
    assert choose_runtime("auto", cpu, PROFILES["fast"], roi=64, amp_dtype=None) == "openvino"
    assert choose_runtime("auto", cpu, PROFILES["fast"], roi=96) == "torch"  # base: OpenVINO's buffers, > 6 GB
    assert choose_runtime("auto", cpu, PROFILES["fast"], amp_dtype=torch.bfloat16) == "torch"  # bf16 asked for
    # --precision auto on a bf16 CPU: OpenVINO in fp32 (the reference labels) before PyTorch's bf16
    assert openvino_dtype("auto", torch.bfloat16) is None and openvino_dtype("auto", None) is None
    assert openvino_dtype("bf16", torch.bfloat16) == torch.bfloat16 and openvino_dtype("fp32", None) is None
    assert choose_runtime("auto", cpu, PROFILES["fast"], 64, openvino_dtype("auto", torch.bfloat16)) == "openvino"
    assert choose_runtime("auto", cpu, PROFILES["fast"], 96, openvino_dtype("auto", torch.bfloat16)) == "torch"
    assert choose_runtime("auto", cpu, PROFILES["fast"], 64, openvino_dtype("bf16", torch.bfloat16)) == "torch"
    assert (precision_name(None), precision_name(torch.bfloat16), precision_name(torch.float16)) == \
        ("fp32", "bf16", "fp16")
    assert choose_runtime("openvino", cpu, PROFILES["fast"], roi=96, amp_dtype=torch.bfloat16) == "openvino"
    assert choose_runtime("auto", cpu, PROFILES["reference"]) == "torch"  # the reference path stays PyTorch
    assert choose_runtime("auto", cuda, PROFILES["fast"]) == "torch"  # a GPU runs PyTorch
    assert choose_runtime("torch", cpu, PROFILES["fast"]) == "torch"
    assert choose_runtime("openvino", cpu, PROFILES["reference"]) == "openvino"
    with pytest.raises(MimError, match="CPU only.*--device cpu"):
        choose_runtime("openvino", cuda, PROFILES["fast"])
    with pytest.raises(MimError, match="--runtime must be one of"):
        choose_runtime("onnx", cpu, PROFILES["fast"])


def test_without_openvino_fast_runs_in_pytorch_and_says_so(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed: import fails
    notes = []
    seg = Segmenter(load_bundle(tiny), device="cpu", profile="fast", precision="fp32",
                    events=lambda ev, **f: notes.append((ev, f.get("message"))))
    assert seg.runtime == "torch"
    assert len(notes) == 1 and notes[0][0] == "note"
    assert "OpenVINO is not installed" in notes[0][1] and 'mimcore[fast]' in notes[0][1] and "PyTorch" in notes[0][1]
    labels = seg.segment(body_ct(shape=(40, 36, 12)))
    assert labels.shape == (40, 36, 12)
    # --precision auto without OpenVINO: PyTorch, bf16 where the CPU has it natively (faster than fp32)
    notes.clear()
    seg = Segmenter(load_bundle(tiny), device="cpu", profile="fast", events=lambda ev, **f: notes.append(f["message"]))
    expected = "bf16" if cpu_has_bf16() else "fp32"
    assert (seg.runtime, seg.precision) == ("torch", expected)
    assert len(notes) == 1 and notes[0].endswith(f"the network runs in PyTorch in {expected}"), notes
    with pytest.raises(MimError, match="--runtime openvino: OpenVINO is not installed"):
        Segmenter(load_bundle(tiny), device="cpu", profile="fast", runtime="openvino")
    with pytest.raises(OpenVINOUnavailable, match="not installed"):
        compile_bundle(tiny)


def test_cli_fast_runs_openvino_and_keeps_the_grid(tmp_path, tiny, capsys):
    """``mim segment --fast --progress json`` as the Slicer module runs it on a CPU without native
    bf16 (``--precision fp32``): the start event names the runtime, the labels lie on the
    input's grid, and agree with ``--runtime torch``."""
    from mimcore.cli.main import main

    vol = body_ct(shape=(60, 50, 20))
    src = save_volume(tmp_path / "ct.nrrd", vol.array, vol.affine)
    outs = {}
    for runtime in ("auto", "torch"):
        out = tmp_path / f"labels_{runtime}.nii.gz"
        assert main(["segment", str(src), "--model", str(tiny), "--output", str(out), "--fast", "--precision",
                     "fp32", "--runtime", runtime, "--progress", "json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        start = next(ev for ev in lines if ev["event"] == "start")
        assert start["runtime"] == ("openvino" if runtime == "auto" else "torch")
        assert lines[0]["event"] == "start"  # nothing before it
        a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
        assert a.GetSize() == b.GetSize() and a.GetDirection() == b.GetDirection()
        assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
        outs[runtime] = sitk.GetArrayFromImage(b)
    assert (outs["auto"] != outs["torch"]).mean() <= 1e-4
    # the progress-bar mode says where the network ran
    assert main(["segment", str(src), "--model", str(tiny), "--output", str(tmp_path / "bar.nii.gz"), "--fast",
                 "--precision", "fp32", "--progress", "bar"]) == 0
    assert "network on cpu in OpenVINO fp32" in capsys.readouterr().out
    # --precision auto: OpenVINO in fp32 on every CPU (the reference labels), bf16 only when asked for
    assert main(["segment", str(src), "--model", str(tiny), "--output", str(tmp_path / "auto.nii.gz"), "--fast",
                 "--progress", "json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    start = next(ev for ev in events if ev["event"] == "start")
    assert (start["runtime"], start["precision"]) == ("openvino", "fp32")
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "auto.nii.gz"))) != outs["auto"]).sum() == 0
    if cpu_has_bf16():  # asked-for bf16 runs in PyTorch (it agrees better with fp32 than OpenVINO's bf16)
        assert main(["segment", str(src), "--model", str(tiny), "--output", str(tmp_path / "bf.nii.gz"), "--fast",
                     "--precision", "bf16", "--progress", "bar"]) == 0
        assert "network on cpu in PyTorch bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["segment", str(src), "--model", str(tiny), "--output", str(tmp_path / "x.nii.gz"), "--runtime", "onnx"])


def test_openvino_reports_nothing(tmp_path):
    """``import openvino`` and its converter report usage to Google Analytics unless the user
    opted out (openvino_telemetry writes ``~/intel/openvino_ga_cid`` and ``stats`` as it does).
    A conversion through mimcore, in a fresh process with an empty home, leaves no trace."""
    import os
    import subprocess

    code = ("import torch\n"
            "from mimcore.inference.openvino_net import compile_openvino\n"
            "net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()\n"
            "ov = compile_openvino(net, 8, None, 'w' * 64, {'kind': 'probe'}, threads=1)\n"
            "print(tuple(ov(torch.rand(3, 1, 8, 8, 8)).shape))\n")
    env = dict(os.environ, HOME=str(tmp_path / "home"), MIM_OPENVINO_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    env.pop("CI", None)  # openvino_telemetry stays quiet in CI jobs by itself: not what is tested
    (tmp_path / "home").mkdir()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "(3, 2, 8, 8, 8)"
    assert list((tmp_path / "home").rglob("*")) == []
