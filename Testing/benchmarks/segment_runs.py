"""bench_segment's measurements, each run in a child process: our Segmenter on a model
bundle, and MONAI's SwinUNETR through MONAI's own sliding window."""

from __future__ import annotations

import os
import tempfile
import time

from bench_common import sync
from segment_cases import N_CLASSES, PREP, ROI, load_case, ras_shape
from segment_flops import achieved, matmul_rate, window_flops
from segment_measure import Probe, Progress, decide_mode, mem_after_run, mem_before_run, result, stage_timer


def bench_bundle(preset: str, folder: str, args):
    """A model bundle of ``MiMSegNet(preset)`` with random (seeded) weights, or ``--bundle``."""
    import torch

    from mimcore.bundles.bundle import load_bundle, save_bundle
    from mimcore.models.convvit import preset as convvit_preset
    from mimcore.models.mim_segnet import MiMSegNet, architecture_dict

    if preset == "bundle":
        return load_bundle(args.bundle)
    torch.manual_seed(args.seed)
    net = MiMSegNet(convvit_preset(preset), N_CLASSES)
    desc = {
        "name": f"bench-{preset}",
        "architecture": architecture_dict(net, preset),
        "labels": [{"value": i, "name": f"c{i}", "color": [i, 0, 0]} for i in range(1, N_CLASSES)],
        "preprocessing": dict(PREP),
        "inference": {"overlap": args.overlap, "sw_batch_size": args.sw_batch},
        "training": {},
    }
    return load_bundle(save_bundle(os.path.join(folder, "bundle"), net.state_dict(), desc))


def run_ours(model: str, case: str, device, args) -> dict:
    """One measurement of our path; ``model`` is ``small``, ``base`` or ``bundle``, with ``-fast``
    for the fast profile. ``big``: end to end from the CT file to the ``.seg.nrrd``."""
    import numpy as np
    import torch

    from mimcore.data.labels import Label
    from mimcore.data.segfile import save_seg_nrrd
    from mimcore.devices import resolve_device
    from mimcore.inference.segment import Segmenter

    preset, fast = model.removesuffix("-fast"), model.endswith("-fast")
    label = f"{model}@{case}"
    vol = load_case(case, args.sample_path, args.big_path, args.quick)
    tmp = tempfile.TemporaryDirectory(prefix="bench_segment_")
    bundle = bench_bundle(preset, tmp.name, args)
    n_params = sum(t.numel() for t in bundle.state_dict().values())

    warnings: list[str] = []
    counter = {"n": 0, "progress": None}

    def windows_cb(n):
        counter["n"] += n
        if counter["progress"] is not None:
            counter["progress"](n)

    # the parts of Segmenter.segment are timed, and the network probed, through its hooks
    parts = {"prep_s": 0.0, "sw_s": 0.0, "post_s": 0.0}
    memory_only = {"on": False}
    dev = resolve_device(str(device))
    probe = Probe(dev)

    def on_slab(start, stop):
        if memory_only["on"]:
            probe.real_left = args.memory_only_batches

    t_setup = time.perf_counter()
    overlap = args.fast_overlap if fast and args.fast_overlap is not None else args.overlap
    seg = Segmenter(bundle, device=str(dev), precision=args.precision, overlap=overlap, sw_batch=args.sw_batch,
                    events=lambda ev, **f: warnings.append(f"{ev}: {f.get('message')}"), windows=windows_cb,
                    timer=stage_timer(parts, dev), on_slab=on_slab, forward=probe,
                    profile="fast" if fast else "reference", runtime=args.runtime)
    setup_s = time.perf_counter() - t_setup  # OpenVINO: its conversion (first run) or cached model
    win = seg.window
    roi = win.roi
    windows_planned = seg.total_windows(vol)
    shapes = {"model_space": list(seg.model_space_shape(vol))}

    # warm-up: one batch through the real per-window function (autocast, softmax)
    t0 = time.perf_counter()
    win.predict(torch.zeros(args.sw_batch, 1, roi, roi, roi))
    sync(seg.device)
    warmup_s = time.perf_counter() - t0
    mode, est = decide_mode(label, windows_planned, warmup_s / args.sw_batch, args)
    probe.reset_stats()
    counter["n"] = 0
    memory_only["on"] = mode == "memory-only"
    counter["progress"] = Progress(label, windows_planned)

    amp = win.amp_dtype if seg.device.type == "cuda" else win.cpu_amp_dtype
    flops = window_flops(seg.net, roi, seg.device)
    mm = matmul_rate(str(seg.device), "bfloat16" if amp == torch.bfloat16 else "float32")
    mem0 = mem_before_run(seg.device)
    t0 = time.perf_counter()
    io = {"read_s": 0.0, "write_s": 0.0}
    if args.big_path and case == "big":  # end to end: read the CT file ... write the .seg.nrrd
        del vol
        from mimcore.data.volume_io import load_volume

        vol = load_volume(args.big_path)
        io["read_s"] = time.perf_counter() - t0
    labels = seg.segment(vol)
    sync(seg.device)
    if args.big_path and case == "big":
        t1 = time.perf_counter()
        save_seg_nrrd(os.path.join(tmp.name, "labels.seg.nrrd"), labels, vol.affine,
                      [Label.from_dict(lab) for lab in bundle.labels])
        io["write_s"] = time.perf_counter() - t1
    e2e = time.perf_counter() - t0
    mem = mem_after_run(seg.device, mem0)
    if labels.shape != vol.shape:  # the path's own contract; reported as an error row, not a target
        raise RuntimeError(f"labels {labels.shape} do not match the input {vol.shape}")
    if args.labels_dir:  # for the parent's Dice of fast against reference
        np.save(os.path.join(args.labels_dir, f"{label}.npy"), labels)
    tmp.cleanup()
    slabs = win.slabs(tuple(shapes["model_space"]), N_CLASSES)
    res = result(label, model, case, str(seg.device), mode, roi, n_params, warmup_s, est, e2e, parts,
                 probe, counter["n"], windows_planned, mem, vol, shapes, warnings,
                 {"slab_axis": slabs[0], "slab_cores": slabs[1], "profile": seg.profile.name, **io,
                  "runtime": seg.runtime, "setup_s": setup_s, "overlap": float(seg.settings["overlap"]),
                  "amp": str(amp).replace("torch.", "") if amp else "fp32",
                  "spacing": list(seg.prep.spacing or [])})
    res.update(achieved(flops, probe.windows_real, sum(probe.times), mm))
    return res


def run_swin(case: str, device, args) -> dict:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    from mimcore.devices import resolve_device
    from mimcore.data.regrid import labels_to_grid
    from mimcore.inference.segment import preprocess
    from mimcore.inference.window import count_windows

    label = f"swin@{case}"
    dev = resolve_device(str(device))
    vol = load_case(case, args.sample_path, args.big_path, args.quick)
    torch.manual_seed(args.seed)
    net = SwinUNETR(in_channels=1, out_channels=N_CLASSES, feature_size=48).eval().to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    amp = None
    if dev.type == "cuda" and args.precision != "fp32":  # what Segmenter picks
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    probe = Probe(dev)
    roi = ROI["swin"]
    progress = {"cb": None}

    @torch.no_grad()
    def predictor(x):
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            y = probe(net, x)
        if progress["cb"] is not None:
            progress["cb"](x.shape[0])
        return y

    t0 = time.perf_counter()
    predictor(torch.zeros(args.sw_batch, 1, roi, roi, roi, device=dev))
    sync(dev)
    warmup_s = time.perf_counter() - t0
    windows_planned = count_windows(tuple(int(n) for n in ras_shape(vol)), roi, args.overlap)
    mode, est = decide_mode(label, windows_planned, warmup_s / args.sw_batch, args)
    probe.reset_stats()
    if mode == "memory-only":
        probe.real_left = args.memory_only_batches
    progress["cb"] = Progress(label, windows_planned)

    parts = {"prep_s": 0.0, "sw_s": 0.0, "post_s": 0.0}
    mem0 = mem_before_run(dev)
    t0 = time.perf_counter()
    img = preprocess(vol, PREP)
    parts["prep_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(img.as_tensor()[None], (roi,) * 3, args.sw_batch, predictor,
                                       overlap=args.overlap, mode="gaussian", sw_device=dev,
                                       device=torch.device("cpu"))
        labels = out[0].argmax(0).numpy().astype(np.uint8)
        del out
    sync(dev)
    parts["sw_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    grid = labels_to_grid(labels, np.asarray(img.affine, dtype=np.float64), vol)
    parts["post_s"] = time.perf_counter() - t2
    e2e = time.perf_counter() - t0
    mem = mem_after_run(dev, mem0)
    if grid.shape != vol.shape:
        raise RuntimeError(f"labels {grid.shape} do not match the input {vol.shape}")
    shapes = {"model_space": list(img.shape[1:])}
    return result(label, "swin", case, str(dev), mode, roi, n_params, warmup_s, est, e2e, parts, probe,
                  probe.windows_real + probe.windows_stub, windows_planned, mem, vol, shapes, [],
                  {"amp": str(amp).replace("torch.", "") if amp else "fp32"})


def run_child(spec: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, case = spec.split("@")
    t0 = time.perf_counter()
    if model == "nnunet":
        from segment_nnunet import run_nnunet

        res = run_nnunet(case, args.device, args)
    else:
        res = run_swin(case, args.device, args) if model == "swin" else run_ours(model, case, args.device, args)
    res["child_wall_s"] = time.perf_counter() - t0
    return res
