"""What ``bench_pretrain.py`` times: the configurations, one training step of each, the table.

Configuration names:

- ``<method>:<preset>`` or ``<method>/<backbone>:<preset>``: one pre-training step of a
  model built by :func:`mimcore.methods.registry.build_pretrain_model` on a batch of
  ``--batch`` crops of the method's crop size, e.g. ``mim:small``, ``mae/vit:small``,
  ``simmim/convvit:tiny``, ``gmim:base``;
- ``four96``: MiM ``base`` encoder + decoder on four 96^3 volumes at 60 % masking (the
  configuration the published MiM code was timed on);
- ``monai-mae``: MONAI's ``MaskedAutoEncoderViT`` (ViT-B/16, 96^3, 75 % masking), one volume.

A step is what ``mim pretrain`` does per optimizer step with ``--accum 1``: forward,
backward and an AdamW update (``mimcore.training.optim.make_optimizer``); the forward +
backward part is also timed on its own (the published reference numbers exclude the update).
"""

from __future__ import annotations

import contextlib
import time

from bench_common import sync

#: Methods in table order, and the backbones each is timed on (all the registry allows).
METHOD_ORDER = ("mim", "mae", "simmim", "gmim")
EXTRAS = ("four96", "monai-mae")


def method_configs(methods: list[str], presets: list[str]) -> list[str]:
    """Configuration names for ``methods`` (``mae`` = every backbone of MAE, ``mae/vit`` = one)
    at each of ``presets``; ValueError for an unknown method or pair."""
    from mimcore.methods.registry import BACKBONES

    pairs: list[tuple[str, str | None]] = []
    for m in methods:
        method, _, backbone = m.partition("/")
        if method not in BACKBONES:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(BACKBONES)}")
        if backbone and backbone not in BACKBONES[method]:
            raise ValueError(f"{method} does not run on {backbone!r}; it runs on {', '.join(BACKBONES[method])}")
        for b in ([backbone] if backbone else BACKBONES[method]):
            pair = (method, None if len(BACKBONES[method]) == 1 else b)
            if pair not in pairs:
                pairs.append(pair)
    pairs.sort(key=lambda p: METHOD_ORDER.index(p[0]))  # stable: backbones keep the registry's order
    return [f"{m}{'/' + b if b else ''}:{p}" for p in presets for m, b in pairs]


def parse_config(config: str) -> tuple[str, str | None, str]:
    """``mae/vit:small`` -> ("mae", "vit", "small"); ``mim:tiny`` -> ("mim", None, "tiny")."""
    head, _, preset = config.partition(":")
    method, _, backbone = head.partition("/")
    return method, backbone or None, preset


def autocast(device: str):
    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build(config: str, device: str, seed: int, batch: int):
    """-> (model, loss_fn, info): ``loss_fn()`` runs one forward pass and returns the loss;
    ``info`` holds ``input`` (words), ``samples`` (per step), ``method``, ``backbone``, ``preset``."""
    import torch

    from mimcore.methods.losses import masked_l1, masked_mse, norm_pix_target
    from mimcore.methods.masking import patchify, random_hidden

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    if config == "four96":
        from mimcore.methods.mim import MiMPretrainModel
        from mimcore.models.convvit import preset as convvit_preset

        mcfg = convvit_preset("base")
        model = MiMPretrainModel(mcfg).to(device)
        s = mcfg.input_size
        vol = torch.rand(4, 1, s, s, s, device=device)
        n_tokens, eps = mcfg.grid**3, model.cfg.norm_pix_eps

        def loss_fn():
            hidden = random_hidden(4, n_tokens, 0.6, gen).to(device)
            pred, _ = model.reconstruct(vol, hidden)
            return masked_mse(pred, norm_pix_target(patchify(vol, mcfg.patch_size).float(), eps), hidden)

        return model, loss_fn, {"input": f"4 vols {s}^3, 60% masked", "samples": 4,
                                "method": "mim", "backbone": "convvit", "preset": "base"}

    if config == "monai-mae":
        import importlib.util

        if importlib.util.find_spec("einops") is None:
            raise RuntimeError("MONAI's MaskedAutoEncoderViT needs einops (pip install einops), "
                               "or leave it out with --skip monai-mae")
        from monai.networks.nets import MaskedAutoEncoderViT

        model = MaskedAutoEncoderViT(
            in_channels=1, img_size=96, patch_size=16, hidden_size=768, mlp_dim=3072, num_layers=12,
            num_heads=12, masking_ratio=0.75, decoder_hidden_size=512, decoder_mlp_dim=2048,
            decoder_num_layers=8, decoder_num_heads=8, qkv_bias=True,
            # learned position embeddings, as in the WACV 2023 3D MAE (MONAI's sincos default
            # also cannot build a 512-d decoder embedding: it needs a multiple of 6)
            pos_embed_type="learnable", decoder_pos_embed_type="learnable",
        ).to(device)
        vol = torch.rand(1, 1, 96, 96, 96, device=device)

        def loss_fn():
            pred, mask = model(vol)  # mask: 1 on hidden tokens
            # target token order is ours, not MONAI's -- irrelevant for timing
            return masked_l1(pred, patchify(vol, 16), mask.bool())

        return model, loss_fn, {"input": "1 vol 96^3, 75% masked", "samples": 1,
                                "method": "mae", "backbone": "monai-vit", "preset": "base"}

    from mimcore.methods.registry import build_pretrain_model

    method, backbone, preset = parse_config(config)
    model, c, meta = build_pretrain_model(method, backbone, preset)
    model = model.to(device)
    crop = torch.rand(batch, 1, c, c, c, device=device)

    def loss_fn():
        return model(crop, gen)["loss"]

    desc = f"{batch} x {c}^3"
    if method == "mim":
        s = meta["model"]["input_size"]
        desc += f" (21 vols {s}^3)"
    return model, loss_fn, {"input": desc, "samples": batch, "method": method,
                            "backbone": meta["backbone"], "preset": preset}


def make_step(model, loss_fn, device: str):
    """-> step(): forward + backward + AdamW update; returns (loss, fwd+bwd s, update s)."""
    from mimcore.training.optim import make_optimizer

    model.train()
    optimizer = make_optimizer(model, lr=1e-5)  # a small lr: the weights stay finite over the repeats

    def step():
        t0 = time.perf_counter()
        with autocast(device):
            loss = loss_fn()
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return float(loss.detach()), t1 - t0, time.perf_counter() - t1

    return step


# ----------------------------------------------------------------------------- the table

def per_sample(r: dict, key: str = "step_times_s", stat: str | None = None):
    """(best, median) seconds per sample of ``r``'s ``key`` times; only one with ``stat``
    ``best`` or ``median``."""
    import statistics

    ts = r[key]
    pair = min(ts) / r["samples"], statistics.median(ts) / r["samples"]
    return pair if stat is None else pair[("best", "median").index(stat)]


def _g(x: float) -> str:
    """3 significant digits, no exponent above 1000 (2207, 112, 42.5, 0.0312)."""
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def format_table(rows: list[dict], peak: float, cuda: bool, stat: str = "median") -> str:
    """One row per configuration; fwd+bwd, AdamW, GFLOP/s and % matmul use ``stat`` of the repeats."""
    short = "med" if stat == "median" else stat
    head = ["config", "input", "params M", "s/sample best", "s/sample med", f"fwd+bwd {short}", f"AdamW {short}",
            "GFLOP/sample", "GFLOP/s", "% matmul", "peak CUDA MiB" if cuda else "peak RSS MiB", "wall s"]
    lines, errors = [], []
    for r in rows:
        if "error" in r:
            errors.append(f"{r['config']}: {r['error']}")
            lines.append([r["config"], "ERROR (below)"] + [""] * (len(head) - 3) + [f"{r.get('process_wall_s', 0):.0f}"])
            continue
        best, med = per_sample(r)
        fb = per_sample(r, "fwd_bwd_times_s", stat)
        opt = per_sample(r, "update_times_s", stat)
        gflop = r["gflop_per_step"] / r["samples"]
        rate = gflop * 1e9 / (med if stat == "median" else best)
        mem = r["cuda_peak_allocated_mib"] if cuda else r["peak_rss_mib"]
        lines.append([r["config"], r["input"], _g(r["params_m"]), f"{best:.3f}", f"{med:.3f}", f"{fb:.3f}",
                      f"{opt:.3f}", _g(gflop), _g(rate / 1e9), _g(100 * rate / peak),
                      f"{mem:.0f}", f"{r['process_wall_s']:.0f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in lines]
                     + [f"ERROR {e}" for e in errors])
