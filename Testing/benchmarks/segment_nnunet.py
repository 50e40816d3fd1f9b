"""bench_segment's yardstick that radiologists actually run: nnU-Net's 3d_fullres network (the
architecture behind TotalSegmentator), planned by nnU-Net itself and run by its own predictor.

Optional: needs ``nnunetv2`` and ``dynamic_network_architectures`` from PyPI
(``pip install -e "MiMCore[bench]"``, what ``make bench`` does); without them the measurement
is reported as skipped, with that command.

1. A generated dataset in nnU-Net's raw format (two CT-like volumes of the sample CT's size,
   at the benchmark's spacing, with 13 labelled blobs) in a temporary ``nnUNet_raw``;
2. nnU-Net's own fingerprint extraction and ``ExperimentPlanner`` (default GPU memory target)
   make the plans: the 3d_fullres configuration's spacing (= the dataset's), patch size and
   network (``PlainConvUNet`` stages, features, strides); random weights
   (``get_network_from_plans``; timing only);
3. ``nnUNetPredictor`` with its defaults (tile step 0.5, Gaussian weighting) except mirroring
   off -- TotalSegmentator runs it so, and our path runs without flip TTA too -- on ``--device``,
   end to end: read the CT file with nnU-Net's ``SimpleITKIO``, ``predict_single_npy_array``
   (its cropping, CT normalisation, resampling to the plans' spacing, sliding window, resampling
   back, argmax), write the label map with ``SimpleITKIO``.
"""

from __future__ import annotations

import os
import tempfile
import time

from segment_cases import N_CLASSES, PREP
from segment_measure import mem_after_run, mem_before_run

INSTALL = 'pip install -e "MiMCore[bench]"   (nnunetv2 + dynamic_network_architectures; `make bench` does it)'
DATASET_ID, DATASET_NAME = 987, "Dataset987_MiMBench"
SAMPLE_SIZE = (233, 167, 191)  # the sample CT (held_out), voxels along x, y, z


def missing() -> str | None:
    """None when nnU-Net can run here, else why not and what to install."""
    try:
        import dynamic_network_architectures  # noqa: F401
        import nnunetv2  # noqa: F401
    except ImportError as e:
        return f"nnU-Net not installed ({e.name}): {INSTALL}"
    return None


def _write_dataset(raw: str, spacing, size, n: int = 2) -> dict:
    import json

    import numpy as np
    import SimpleITK as sitk

    folder = os.path.join(raw, DATASET_NAME)
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    rng = np.random.default_rng(0)
    zyx = tuple(reversed(size))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, k) for k in zyx], indexing="ij")
    for i in range(n):
        body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
        hu = np.where(body, 40.0, -1000.0) + 20 * rng.standard_normal(zyx)
        lab = np.zeros(zyx, np.uint8)
        for c in range(1, N_CLASSES):  # 13 blobs inside the body
            cx, cy, cz = rng.uniform(-0.5, 0.5), rng.uniform(-0.35, 0.35), rng.uniform(-0.7, 0.7)
            blob = ((x - cx) / 0.12) ** 2 + ((y - cy) / 0.12) ** 2 + ((z - cz) / 0.15) ** 2 < 1
            lab[blob & body] = c
            hu[blob & body] = 40.0 + 10 * c
        for arr, path in ((hu.astype(np.int16), f"imagesTr/case{i:03d}_0000.nii.gz"),
                          (lab, f"labelsTr/case{i:03d}.nii.gz")):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(tuple(float(s) for s in spacing))
            sitk.WriteImage(img, os.path.join(folder, path))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **{f"c{c}": c for c in range(1, N_CLASSES)}},
               "numTraining": n, "file_ending": ".nii.gz"}
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset, f)
    return dataset


def plan(workdir: str, spacing, size=SAMPLE_SIZE):
    """nnU-Net's own plans for a generated dataset -> (PlansManager, 3d_fullres ConfigurationManager,
    dataset.json dict). ``spacing`` (x, y, z) mm, ``size`` (x, y, z) voxels."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[key] = os.path.join(workdir, key)
        os.makedirs(os.environ[key], exist_ok=True)
    dataset = _write_dataset(os.environ["nnUNet_raw"], spacing, size)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset)
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    extract_fingerprint_dataset(DATASET_ID, num_processes=1, verbose=False, show_progress_bar=False)
    plans, _ = plan_experiment_dataset(DATASET_ID)
    pm = PlansManager(plans)
    return pm, pm.get_configuration("3d_fullres"), dataset


def run_nnunet(case: str, device, args) -> dict:
    import numpy as np
    import torch

    from mimcore.devices import resolve_device

    why = missing()
    if why:
        return {"label": f"nnunet@{case}", "model": "nnunet", "case": case, "skipped": why}
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from segment_cases import load_case
    from segment_flops import achieved, matmul_rate, window_flops

    dev = resolve_device(str(device))
    tmp = tempfile.TemporaryDirectory(prefix="bench_nnunet_")
    t0 = time.perf_counter()
    pm, cfg, dataset = plan(tmp.name, PREP["spacing"])
    plan_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    net = get_network_from_plans(cfg.network_arch_class_name, cfg.network_arch_init_kwargs,
                                 cfg.network_arch_init_kwargs_req_import, 1, N_CLASSES, deep_supervision=False)
    net = net.eval().to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    times, clock = [], {}
    net.register_forward_pre_hook(lambda m, a: clock.__setitem__("t", time.perf_counter()))
    net.register_forward_hook(lambda m, a, out: times.append((a[0].shape[0], time.perf_counter() - clock["t"])))
    patch = tuple(int(p) for p in cfg.patch_size)
    flops = window_flops(net, patch, dev)
    times.clear()
    mm = matmul_rate(str(dev), "bfloat16" if dev.type == "cuda" else "float32")

    path = args.big_path if case == "big" and args.big_path else None
    if path is None:  # the sample CT (or the in-memory big one) as a file nnU-Net reads
        from mimcore.data.volume_io import save_volume

        vol = load_case(case, args.sample_path, None, args.quick)
        path = str(save_volume(os.path.join(tmp.name, "ct.nrrd"), np.round(vol.array), vol.affine, dtype=np.int16))
        del vol
    predictor = nnUNetPredictor(use_mirroring=False, device=dev, allow_tqdm=False)
    predictor.manual_initialization(net, pm, cfg, [net.state_dict()], dataset, "nnUNetTrainer", None)
    io = SimpleITKIO()
    mem0 = mem_before_run(dev)
    t0 = time.perf_counter()
    data, props = io.read_images([path])
    read_s = time.perf_counter() - t0
    seg = predictor.predict_single_npy_array(data, props)
    t1 = time.perf_counter()
    io.write_seg(seg, os.path.join(tmp.name, "labels.nii.gz"), props)
    write_s = time.perf_counter() - t1
    e2e = time.perf_counter() - t0
    mem = mem_after_run(dev, mem0)
    windows = sum(n for n, _ in times)
    net_s = sum(t for _, t in times)
    tmp.cleanup()
    res = {"label": f"nnunet@{case}", "model": "nnunet", "case": case, "device": str(dev), "mode": "full",
           "params_m": n_params / 1e6, "patch_size": list(patch), "spacing": [float(s) for s in cfg.spacing][::-1],
           "network": cfg.network_arch_class_name.split(".")[-1], "plan_s": plan_s, "windows": windows,
           "windows_real": windows, "net_s": net_s, "e2e_s": e2e, "read_s": read_s, "write_s": write_s,
           "prep_s": None, "sw_s": None, "post_s": None, "estimated": False, "roi": "x".join(map(str, patch)),
           "s_per_window": net_s / max(1, windows), "threads": torch.get_num_threads(), **mem,
           "input_shape": list(seg.shape[::-1])}
    res.update(achieved(flops, windows, net_s, mm))
    return res
