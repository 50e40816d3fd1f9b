"""Inference runtimes for the segmentation network on the CPU: PyTorch (the reference fp32 path
and the ``--fast`` profile: bf16 autocast + channels-last) against the same network exported to
ONNX and run by ONNX Runtime (fp32) and by OpenVINO (fp32, and bf16 where the CPU has it).

Issue 16 lists ONNX Runtime and OpenVINO among the levers to measure before choosing. This
script answers, for one window batch of a real CT (the sample CT, preprocessed as the bundle
says), with the same weights:

* seconds per window batch (median of interleaved rounds, so that a busy machine slows every
  runtime alike) and the ratio against PyTorch fp32 and PyTorch ``--fast``;
* how far each runtime's logits are from PyTorch fp32 (largest difference over the logits'
  standard deviation) and the share of voxels whose label (argmax) differs; with a trained
  bundle (``--bundle``) also the Dice per class against PyTorch fp32's labels;
* the export and compile times (OpenVINO's conversion is cached by ``mim segment``, the
  benchmark converts afresh).

"OpenVINO" is the product's route (:mod:`mimcore.inference.openvino_net`: ``torch.export``
read by OpenVINO's PyTorch frontend); "OpenVINO from ONNX" reads the ONNX file instead and is
shown because it is the obvious route and gives wrong logits for this network.

OpenVINO comes with ``mimcore[fast]`` (``make setup``); ONNX Runtime with the ``bench`` extra
(``make bench``: onnx, onnxscript, onnxruntime); a runtime that is missing is reported and skipped.

    .venv/bin/python Testing/benchmarks/bench_export.py --models small base
    .venv/bin/python Testing/benchmarks/bench_export.py --bundle demo_output/finetune/model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench_common import machine_info
from segment_cases import N_CLASSES, PREP
from segment_fast_report import dice_per_class
from segment_report import table


def build_net(preset: str, bundle_path: str | None, seed: int):
    """-> (network in eval mode, preprocessing dict, label names); random seeded weights unless
    a bundle is given."""
    import torch

    from mimcore.models import segnet

    if bundle_path:
        from mimcore.bundles.bundle import load_bundle

        bundle = load_bundle(bundle_path)
        net = segnet.build(bundle.description["architecture"])
        net.load_state_dict(bundle.state_dict())
        names = {lab["value"]: lab["name"] for lab in bundle.labels}
        return net.eval(), bundle.description["preprocessing"], names
    from mimcore.models.convvit import preset as convvit_preset
    from mimcore.models.mim_segnet import MiMSegNet

    torch.manual_seed(seed)
    return MiMSegNet(convvit_preset(preset), N_CLASSES).eval(), dict(PREP), {}


def ct_windows(prep: dict, roi: int, n: int, seed: int, path: str | None = None):
    """n windows (n, 1, R, R, R) float32 of the CT at ``path`` (default: the held-out sample CT),
    preprocessed as ``prep`` says, at random positions whose centre lies in tissue."""
    import numpy as np
    import torch

    from mimcore.data.datalist import datalist_entries
    from mimcore.data.samples import fetch_samples
    from mimcore.data.volume_io import load_volume
    from mimcore.inference.segment import preprocess

    path = path or str(datalist_entries(fetch_samples(quiet=True), "held_out")[0]["image"])
    img = torch.as_tensor(np.asarray(preprocess(load_volume(path), prep)))[0]  # (X, Y, Z) in [0, 1]
    pad = [max(0, roi - s) for s in img.shape]
    img = torch.nn.functional.pad(img, (0, pad[2], 0, pad[1], 0, pad[0]))
    rng = np.random.default_rng(seed)
    body = np.argwhere(img.numpy() > 0.0)  # above the window's lower bound: soft tissue and bone
    out = []
    for _ in range(n):
        c = body[rng.integers(len(body))]
        lo = [int(min(max(0, c[d] - roi // 2), img.shape[d] - roi)) for d in range(3)]
        out.append(img[lo[0]:lo[0] + roi, lo[1]:lo[1] + roi, lo[2]:lo[2] + roi])
    return torch.stack(out)[:, None].contiguous(), path


class Runner:
    """One runtime: ``run(x) -> logits`` (n, C, R, R, R) float32 tensor, ``setup_s``."""

    def __init__(self, name: str, precision: str, run, setup_s: float):
        self.name, self.precision, self.run, self.setup_s = name, precision, run, setup_s


def torch_runners(net):
    import copy

    import torch

    fp32 = Runner("PyTorch", "fp32", lambda x: net(x), 0.0)
    fast_net = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)

    def fast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fast_net(x.contiguous(memory_format=torch.channels_last_3d)).float()

    from mimcore.inference.profiles import cpu_has_bf16

    out = [fp32]
    if cpu_has_bf16():
        out.append(Runner("PyTorch --fast", "bf16 + channels-last", fast, 0.0))
    return out


def export_onnx(net, x, folder: str) -> tuple[str, float]:
    """The network exported by ``torch.onnx.export`` (dynamo) for x's shape -> (path, seconds)."""
    import torch

    path = os.path.join(folder, "net.onnx")
    t0 = time.perf_counter()
    torch.onnx.export(net, (x,), path, dynamo=True, opset_version=18, verbose=False)
    return path, time.perf_counter() - t0


def onnxruntime_runner(path: str, threads: int) -> Runner:
    import onnxruntime as ort
    import torch

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    setup = time.perf_counter() - t0
    return Runner("ONNX Runtime", "fp32", lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0]), setup)


def openvino_runners(net, roi: int, threads: int, bf16: bool, onnx_path: str | None) -> list[Runner]:
    """OpenVINO as ``mim segment --fast`` runs it (:func:`mimcore.inference.openvino_net.compile_openvino`:
    torch.export -> OpenVINO, fp32 and bf16), and, for comparison, OpenVINO reading the ONNX file."""
    import torch

    from mimcore.inference.openvino_net import compile_openvino, import_openvino

    ov = import_openvino()  # usage reports off, as in mim segment

    out = []
    with tempfile.TemporaryDirectory(prefix="bench_export_ov_") as cache:
        os.environ["MIM_OPENVINO_CACHE"] = cache  # measure the conversion, not a cached one
        for amp in (None, torch.bfloat16) if bf16 else (None,):
            t0 = time.perf_counter()
            ov_net = compile_openvino(net, roi, amp, "bench", {"bench": roi}, threads=threads)
            out.append(Runner("OpenVINO", ov_net.precision, ov_net, time.perf_counter() - t0))
    if onnx_path:
        core = ov.Core()
        t0 = time.perf_counter()
        compiled = core.compile_model(core.read_model(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                                          "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        setup = time.perf_counter() - t0
        out.append(Runner("OpenVINO from ONNX", "fp32",
                          lambda x: torch.from_numpy(request.infer([x.numpy()])[0].copy()), setup))
    return out


def measure(preset: str, args) -> dict:
    import torch

    from mimcore.inference.profiles import cpu_has_bf16

    net, prep, names = build_net(preset, args.bundle, args.seed)
    from mimcore.models import segnet

    roi = segnet.input_size(net)
    x, ct = ct_windows(prep, roi, args.windows, args.seed, args.ct)
    batches = list(x.split(args.sw_batch))
    threads = torch.get_num_threads()
    runners = torch_runners(net)
    skipped = []
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        onnx_path, export_s = None, None
        try:
            onnx_path, export_s = export_onnx(net, batches[0], tmp)
        except Exception as e:  # noqa: BLE001 - a runtime that cannot run is reported, not fatal
            skipped.append(f"ONNX export: {type(e).__name__}: {str(e)[:200]}")
        if onnx_path:
            try:
                runners.append(onnxruntime_runner(onnx_path, threads))
            except ImportError as e:
                skipped.append(f"ONNX Runtime: {e}")
        try:
            runners += openvino_runners(net, roi, threads, cpu_has_bf16(), onnx_path)
        except ImportError as e:
            skipped.append(f"OpenVINO: {e}")
        with torch.no_grad():
            logits = {r: [] for r in runners}
            for r in runners:  # warm-up round, and the logits compared below
                logits[r] = [r.run(b) for b in batches]
            times = {r: [] for r in runners}
            for _ in range(args.repeats):  # interleaved: a busy machine slows every runtime alike
                for r in runners:
                    for b in batches:
                        t0 = time.perf_counter()
                        r.run(b)
                        times[r].append(time.perf_counter() - t0)
    ref = torch.cat(logits[runners[0]])
    ref_labels = ref.argmax(1)
    scale = float(ref.std())
    rows, res = [], {"preset": preset, "roi": roi, "ct": ct, "export_s": export_s, "skipped": skipped,
                     "windows": args.windows, "sw_batch": args.sw_batch, "runtimes": []}
    med = {r: statistics.median(times[r]) for r in runners}
    fast = next((r for r in runners if r.name == "PyTorch --fast"), None)
    for r in runners:
        out = torch.cat(logits[r]).float()
        labels = out.argmax(1)
        diff = float((out - ref).abs().max()) / scale
        changed = float((labels != ref_labels).float().mean())
        dice = dice_per_class(labels.numpy(), ref_labels.numpy()) if args.bundle else {}
        entry = {"runtime": r.name, "precision": r.precision, "s_per_batch": med[r],
                 "over_torch_fp32": med[r] / med[runners[0]], "over_torch_fast": med[r] / med[fast] if fast else None,
                 "max_abs_diff_over_std": diff, "labels_changed": changed, "dice_vs_torch_fp32": dice,
                 "setup_s": r.setup_s}
        res["runtimes"].append(entry)
        rows.append([r.name, r.precision, f"{med[r]:.3f}", f"{entry['over_torch_fp32']:.2f}",
                     f"{entry['over_torch_fast']:.2f}" if fast else "-", f"{diff:.1e}", f"{100 * changed:.3f} %",
                     " ".join(f"{names.get(c, c)}:{d:.4f}" for c, d in sorted(dice.items())) or "-",
                     f"{r.setup_s:.1f}"])
    label = f"{preset} ({'bundle ' + args.bundle if args.bundle else 'random weights'}, {roi}^3 windows, " \
            f"batch {args.sw_batch}, {len(batches)} batches x {args.repeats} rounds, {threads} threads)"
    print(f"\n== {label}")
    print(f"  CT windows from {ct}; ONNX export {export_s:.1f} s" if export_s is not None else f"  CT: {ct}")
    print(table(["runtime", "precision", "s / batch", "x torch fp32", "x torch fast", "max |diff| / std",
                 "labels changed", "Dice per class vs torch fp32", "setup s"], rows))
    for s in skipped:
        print(f"  skipped: {s}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ct", help="The CT the windows come from (default: the held-out sample CT, fetched).")
    ap.add_argument("--models", nargs="+", default=["small"], choices=("tiny", "small", "base"),
                    help="Network presets with random (seeded) weights (default small); ignored with --bundle.")
    ap.add_argument("--bundle", help="A trained model bundle: its network, preprocessing and labels.")
    ap.add_argument("--windows", type=int, default=8, help="CT windows in all (default 8).")
    ap.add_argument("--sw-batch", type=int, default=2, help="Windows per network call (default 2, the bundle default).")
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved timing rounds (default 3).")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads, and the runtimes' threads (default torch's).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="Also write the results to FILE as JSON.")
    args = ap.parse_args(argv)
    if args.windows < 1 or args.sw_batch < 1 or args.repeats < 1:
        ap.error("--windows, --sw-batch and --repeats must be at least 1")
    if args.bundle and not os.path.exists(args.bundle):
        ap.error(f"--bundle {args.bundle}: no such file or folder")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results = [measure(p, args) for p in (["bundle"] if args.bundle else args.models)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
