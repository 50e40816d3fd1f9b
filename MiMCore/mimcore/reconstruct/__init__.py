"""See what a pre-trained model does: the three mask-in-mask levels of one crop for MiM, one
masked crop for MAE, SimMIM and GMIM, each written as hidden input / reconstruction /
original volumes placed at their true position in the patient (``mim reconstruct``;
METHODS.md sections 1-3).

Single-level methods (:func:`preview_level`): the crop is the network input (MAE, SimMIM;
GMIM's input, not its larger pre-training region); the model's
``reconstruct_preview(crop, generator)`` hides part of it and reconstructs it; the result
is written as ``level1/vol00_*`` with the crop's own affine, so the outputs have the same
layout as MiM's level 1 and the Slicer module shows them the same way.

Steps (:func:`reconstruct`):

1. load the volume (:func:`~mimcore.data.volume_io.load_volume`) and preprocess it as
   pre-training does (:func:`~mimcore.data.preprocess.deterministic_transforms`);
2. cut a crop of ``crop_size^3`` (twice the network input) centred at a RAS position
   with MONAI's ``BorderPadd``/``SpatialCropd``, so the crop's affine is tracked
   exactly (:func:`~mimcore.reconstruct.crop.extract_crop`, with the geometry below);
3. build the levels (:func:`~mimcore.methods.mim.build_levels`, seeded) and reconstruct
   each one in a single batch (:func:`predict_level`; :func:`preview_level` for the other methods);
4. write ``OUT/level{1,2,3}/volNN_{hidden,reconstruction,original}.nii.gz`` in HU, each
   with the affine that places it in the patient (:func:`level_affines`), a PNG sheet
   ``OUT/levels.png`` (:mod:`mimcore.reconstruct.figure`: what the viewer sees, said on it) and
   ``OUT/summary.json``.

Geometry (crop affine ``A``, crop index axes = tensor axes (d, h, w) = array axes
(X, Y, Z) of the MetaTensor, ``S`` = network input edge, ``p`` = 16):

* level 1 is the crop downsampled x2 (trilinear, ``align_corners=False``): its voxel
  ``i`` is centred at crop continuous index ``2 i + 0.5``;
* level-2 volume of octant ``o = (od*2 + oh)*2 + ow`` starts at crop index ``(od, oh, ow) * S``;
* level-3 volume of token ``t`` of a level-2 volume starts at that volume's offset plus
  ``(t // g^2, (t // g) % g, t % g) * p`` and is upsampled by ``f = S / p``
  (``align_corners=False``): its voxel ``j`` is centred at block index ``(j + 0.5) / f - 0.5``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mimcore.devices import resolve_device
from mimcore.errors import MimError
from mimcore.reconstruct.crop import (  # noqa: F401  (the geometry and the crop, re-exported)
    Crop,
    _fmt,
    _inside_axes,
    _inside_fraction,
    extract_crop,
    grid_center,
    level_affines,
    ras_bounds,
)

ROLES = ("hidden", "reconstruction", "original")


# ---------------------------------------------------------------------------- the model

@dataclass
class LevelOutput:
    """One level's volumes (N, S, S, S) in [0, 1] units, its losses and ``baseline_loss``, the
    same loss for a prediction of the mean (MiM: 0 for every norm-pix token; others: the mean
    of the visible voxels), against which "has the model learned anything" is judged."""

    original: torch.Tensor
    hidden_input: torch.Tensor
    reconstruction: torch.Tensor
    loss: float
    volume_losses: list[float]
    baseline_loss: float = float("nan")


def predict_level(model, volume: torch.Tensor, hidden: torch.Tensor, eps: float = 1e-6) -> LevelOutput:
    """Reconstruct one level: volume (N, 1, S, S, S), hidden (N, L) bool.

    The model predicts each hidden token normalised by its own mean and std (norm-pix);
    to show it as an image, each predicted token is de-normalised with the original
    token's mean and std (as the MAE authors' visualisation does). Visible tokens show
    the original; in the hidden input, hidden tokens are filled with the volume's minimum.
    """
    from mimcore.methods.losses import masked_mse, norm_pix_target
    from mimcore.methods.masking import patchify, unpatchify

    p = model.model_cfg.patch_size
    with torch.no_grad():
        pred, _ = model.reconstruct(volume, hidden)  # (N, L, p^3)
        pred = pred.float()
        tokens = patchify(volume, p).float()  # (N, L, p^3)
        target = norm_pix_target(tokens, eps)
        per_volume = [float(masked_mse(pred[i:i + 1], target[i:i + 1], hidden[i:i + 1])) for i in range(len(pred))]
        loss = float(masked_mse(pred, target, hidden))
        baseline = float(masked_mse(torch.zeros_like(target), target, hidden))
        mean = tokens.mean(dim=-1, keepdim=True)
        std = (tokens.var(dim=-1, keepdim=True) + eps) ** 0.5
        hid = hidden[..., None]
        recon = torch.where(hid, pred * std + mean, tokens)
        vmin = tokens.flatten(1).min(dim=1).values[:, None, None]  # (N, 1, 1)
        masked = torch.where(hid, vmin.expand_as(tokens), tokens)
    return LevelOutput(volume[:, 0].float().cpu(), unpatchify(masked, p)[:, 0].cpu(),
                       unpatchify(recon, p)[:, 0].cpu(), loss, per_volume, baseline)


# ---------------------------------------------------------------------------- outputs

def _to_hu(x: torch.Tensor, prep) -> np.ndarray:
    """Inverse of the [hu_min, hu_max] -> [0, 1] window."""
    return (x.numpy().astype(np.float32) * (prep.hu_max - prep.hu_min) + prep.hu_min).astype(np.float32)


@dataclass
class ReconstructionResult:
    output_dir: Path
    sheet: Path
    summary: Path
    level_dirs: list[Path]
    losses: list[float]
    padded_fraction: float
    files: list[Path] = field(default_factory=list)
    warning: str | None = None  # the model has not learned yet (see reconstruct.figure.learning_warning)
    step: int | None = None  # the checkpoint's training step (None: the authors' checkpoint)

    def outputs(self) -> dict:
        """JSON-able description (absolute paths) for the CLI's final ``done`` event."""
        return {
            "output_dir": str(self.output_dir),
            "sheet": str(self.sheet),
            "summary": str(self.summary),
            "levels": {f"level{i}": str(d) for i, d in enumerate(self.level_dirs, start=1)},
            "losses": {f"l{i}": v for i, v in enumerate(self.losses, start=1)},
            "padded_fraction": self.padded_fraction,
            "checkpoint_step": self.step,
            "warning": self.warning,
        }


def default_output_dir(image) -> Path:
    from mimcore.data.volume_io import volume_stem

    return Path.cwd() / f"mim_reconstruction_{volume_stem(image) or 'volume'}"


def preview_level(out: dict, volume: torch.Tensor) -> tuple[LevelOutput, torch.Tensor]:
    """A single-level method's ``reconstruct_preview(volume)`` output as one level.

    ``volume`` (N, 1, S, S, S) is what was previewed (the original); ``out["reconstruction"]``
    (same shape) the model's output and ``out["hidden_mask"]`` (same, or without the channel
    axis) bool, True on hidden voxels. As for MiM, the reconstruction shown is the model's
    output on hidden voxels and the original elsewhere, and the hidden input has hidden
    voxels at the volume's minimum. The loss is the L1 error on hidden voxels in [0, 1]
    units, one measure for every method (for MAE and SimMIM, their training loss).
    Returns (the level, the hidden voxel mask (N, S, S, S)).
    """
    original = volume.detach().float().cpu()
    pred = out["reconstruction"].detach().float().cpu()
    mask = out["hidden_mask"].detach().cpu().bool()
    if mask.dim() == original.dim() - 1:
        mask = mask[:, None]
    if pred.shape != original.shape or mask.shape != original.shape:
        raise MimError(f"the model's preview of a {tuple(original.shape)} volume has shapes {tuple(pred.shape)} "
                       f"and {tuple(mask.shape)}: it cannot be shown")
    recon = torch.where(mask, pred, original)
    err = (recon - original).abs()
    per_volume = [float(err[i][mask[i]].mean()) if mask[i].any() else 0.0 for i in range(len(original))]
    loss = float(err[mask].mean()) if mask.any() else 0.0
    visible_mean = torch.stack([original[i][~mask[i]].mean() if (~mask[i]).any() else original[i].mean()
                                for i in range(len(original))])[:, None, None, None, None]
    base_err = (visible_mean.expand_as(original) - original).abs()
    baseline = float(base_err[mask].mean()) if mask.any() else float("nan")
    vmin = original.flatten(1).min(dim=1).values[:, None, None, None, None]
    hidden_input = torch.where(mask, vmin.expand_as(original), original)
    return LevelOutput(original[:, 0], hidden_input[:, 0], recon[:, 0], loss, per_volume, baseline), mask[:, 0]


def reconstruct(checkpoint, image, center_ras=None, output_dir=None, seed: int = 0,
                device: str | None = None,
                progress: Callable[[int, int, dict], None] | None = None,
                notice: Callable[[str], None] | None = None,
                spacing="auto",
                warn: Callable[[str], None] | None = None) -> ReconstructionResult:
    """Run the whole ``mim reconstruct``: returns where everything was written.

    ``checkpoint``: a ``mim pretrain`` run folder or checkpoint, or an authors' MiM ``.pth``
    (:mod:`mimcore.reconstruct.checkpoint`); ``spacing``: the preview's grid, "auto" (the
    checkpoint's training spacing if it records one), "native" or (3,) mm
    (:mod:`mimcore.reconstruct.spacing`). ``progress(step, total, metrics)`` is called with
    step 0 once the crop is ready and the number of levels known, then after each level is
    reconstructed and written; ``notice(message)`` with things the user should know (padding,
    spacing); ``warn(message)`` (default: ``notice``) when the model has not learned yet.
    """
    from mimcore.data.preprocess import Preprocessing
    from mimcore.data.volume_io import load_volume, save_volume
    from mimcore.methods.masking import unpatchify
    from mimcore.methods.mim import build_levels
    from mimcore.methods.registry import METHOD_NAMES, checkpoint_method
    from mimcore.reconstruct.checkpoint import load_for_reconstruction
    from mimcore.reconstruct.figure import SheetRow, display_window, learning_warning, write_sheet
    from mimcore.reconstruct.spacing import padding_note, preview_preprocessing

    dev = resolve_device(device or "auto")
    model, meta = load_for_reconstruction(checkpoint)
    model.eval().to(dev)
    method, backbone = checkpoint_method(meta)
    step = meta.get("step")
    is_mim = method == "mim"
    if is_mim:
        size = model.model_cfg.crop_size
    else:  # the network input (GMIM: not its larger pre-training region)
        size = int(getattr(model, "input_size", None) or model.cfg.input_size)
    trained = Preprocessing.from_dict(meta["preprocessing"]) if meta.get("preprocessing") else Preprocessing()
    prep, spacing_info = preview_preprocessing(trained, spacing)
    out = (Path(output_dir).expanduser() if output_dir is not None else default_output_dir(image)).resolve()

    volume = load_volume(image)
    crop = extract_crop(volume, size, prep, center_ras)
    notes = [n for n in [padding_note(crop, size, prep, trained)] if n]
    for n in notes:
        if notice is not None:
            notice(n)
    gen = torch.Generator().manual_seed(int(seed))
    if is_mim:
        cfg = model.model_cfg
        levels = build_levels(crop.tensor[None].to(dev), cfg, model.cfg, generator=gen)
        affines = level_affines(crop.affine, levels.octants[0].cpu().numpy(), levels.blocks.cpu().numpy(),
                                cfg.input_size, cfg.patch_size)
        octants = levels.octants[0].cpu().tolist()
        blocks = levels.blocks.cpu().tolist()
        n3 = len(blocks[0]) if blocks else 0
        total = len(levels.volumes)

        def results():
            p3 = cfg.patch_size ** 3
            for vol, hid in zip(levels.volumes, levels.hidden):
                voxels = unpatchify(hid.float()[..., None].expand(*hid.shape, p3), cfg.patch_size)[:, 0] > 0.5
                yield predict_level(model, vol, hid, model.cfg.norm_pix_eps), hid.cpu(), voxels.cpu()
    else:
        octants, blocks, n3, total = [], [], 0, 1
        with torch.no_grad():
            preview = model.reconstruct_preview(crop.tensor[None].to(dev), gen)
        single, voxel_mask = preview_level(preview, crop.tensor[None])
        affines = [[crop.affine]]

        def results():
            yield single, voxel_mask, voxel_mask

    if progress is not None:
        progress(0, total, {})
    summary_levels, files, level_dirs, losses, baselines, sheet_rows = [], [], [], [], [], []
    for li, (res, hid, hidden_voxels) in enumerate(results(), start=1):
        folder = out / f"level{li}"
        level_dirs.append(folder)
        losses.append(res.loss)
        baselines.append(res.baseline_loss)
        n_vol, s = res.original.shape[0], res.original.shape[-1]
        pads = np.stack([crop.padding_mask(affines[li - 1][v], s) for v in range(n_vol)])  # (N, S, S, S)
        window = display_window(_to_hu(res.original, prep), pads, (prep.hu_min, prep.hu_max))
        shown = int(np.argmin(pads.reshape(n_vol, -1).mean(1)))  # the volume with the least padding
        entries = []
        for v in range(n_vol):
            arrays = {"hidden": _to_hu(res.hidden_input[v], prep),
                      "reconstruction": _to_hu(res.reconstruction[v], prep),
                      "original": _to_hu(res.original[v], prep)}
            entry = {"index": v, "loss": res.volume_losses[v], "affine": affines[li - 1][v].tolist(),
                     "padded_fraction": float(pads[v].mean()), "files": {}}
            if is_mim:
                entry.update(hidden_tokens=int(hid[v].sum()), tokens=int(hid.shape[1]))
            else:
                entry["hidden_fraction"] = float(hid[v].float().mean())
            if li == 2:
                entry["octant"] = octants[v]
            elif li == 3:
                entry.update(parent=v // n3, token=blocks[v // n3][v % n3], octant=octants[v // n3])
            for role in ROLES:
                path = save_volume(folder / f"vol{v:02d}_{role}.nii.gz", arrays[role], affines[li - 1][v])
                files.append(path)
                entry["files"][role] = os.path.relpath(path, out)
            entries.append(entry)
            if v == shown:
                title = f"level {li}" + (f" vol{v:02d} (of {n_vol})" if n_vol > 1 else "")
                sheet_rows.append(SheetRow(title, arrays, np.asarray(affines[li - 1][v]),
                                           hidden_voxels[v].numpy().astype(bool), pads[v], window,
                                           res.loss, res.baseline_loss))
        summary_levels.append({"level": li, "folder": f"level{li}", "loss": res.loss,
                               "baseline_loss": res.baseline_loss, "display_window_hu": list(window),
                               "sheet_volume": shown,
                               "hidden_level1_octants": sorted(octants) if li == 1 and is_mim else None,
                               "volumes": entries})
        if progress is not None:
            progress(li, total, {f"l{li}": res.loss})

    ratio, warning = learning_warning(losses, baselines, step, is_mim)
    if warning is not None and (warn or notice) is not None:
        (warn or notice)(warning)
    name = METHOD_NAMES.get(method, method)
    source = ("the authors' published checkpoint" if meta.get("source") == "authors"
              else f"checkpoint at step {step}" if step is not None else "checkpoint (step not recorded)")
    voxel = np.linalg.norm(crop.affine[:3, :3], axis=0)
    lines = [f"{size}^3 crop of {' x '.join(f'{v:.3g}' for v in voxel)} mm voxels "
             f"({'native' if prep.spacing is None else 'resampled'}) around RAS {_fmt(crop.center_ras)} mm, seed "
             f"{seed}: {100 * crop.padded_fraction:.0f}% of it lies outside the volume (padding, tinted blue).",
             "Each panel is the middle axial slice of its volume as 3D Slicer shows it (patient right on the left); "
             "each row has one grey window, shared by its three panels. 'mean' is the loss of predicting the mean.",
             "Reconstruction: " + ("the model's prediction of each hidden token, shown with the token's true mean "
                                   "and spread (norm-pix), the original elsewhere." if is_mim else
                                   "the model's output on hidden voxels, the original elsewhere.")]
    heading = f"{'MiM levels' if is_mim else name + ' reconstruction'} of {Path(str(image)).name}, {source}"
    sheet = write_sheet(out / "levels.png", sheet_rows, heading, lines, warning)
    lo, hi = crop.bounds
    summary = {
        "checkpoint": str(checkpoint),
        "checkpoint_source": meta.get("source", "mimcore"),
        "checkpoint_step": step,
        "image": str(image),
        "method": method,
        "backbone": backbone,
        "seed": int(seed),
        "center_ras_requested": None if center_ras is None else [float(x) for x in center_ras],
        "spacing": spacing_info,
        "crop": {
            "size": size,
            "center_ras": crop.center_ras.tolist(),
            "affine": crop.affine.tolist(),
            "ras_bounds": {"min": lo.tolist(), "max": hi.tolist()},
            "padded_fraction": crop.padded_fraction,
        },
        "volume_ras_bounds": {"min": crop.volume_bounds[0].tolist(), "max": crop.volume_bounds[1].tolist()},
        "preprocessing": prep.to_dict(),
        "model": model.model_cfg.to_dict() if is_mim else meta.get("model"),
        "units": "HU (inverse of the preprocessing window); losses are " +
                 ("norm-pix MSE on hidden tokens" if is_mim else "L1 on hidden voxels, in [0, 1] window units"),
        "losses": {f"l{i}": v for i, v in enumerate(losses, start=1)},
        "learning": {"loss_to_baseline": ratio, "warning": warning},
        "notes": notes,
        "levels": summary_levels,
        "sheet": "levels.png",
        "sheet_text": [heading, *lines, *([f"WARNING: {warning}"] if warning else [])],
        "files": [os.path.relpath(p, out) for p in files],
    }
    from mimcore.files import atomic_write_text

    summary_path = out / "summary.json"
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return ReconstructionResult(out, sheet, summary_path, level_dirs, losses, crop.padded_fraction, files,
                                warning, step)
