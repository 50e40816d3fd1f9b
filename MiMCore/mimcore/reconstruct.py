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
   exactly (:func:`extract_crop`);
3. build the levels (:func:`~mimcore.methods.mim.build_levels`, seeded) and reconstruct
   each one in a single batch (:func:`predict_level`; :func:`preview_level` for the other methods);
4. write ``OUT/level{1,2,3}/volNN_{hidden,reconstruction,original}.nii.gz`` in HU, each
   with the affine that places it in the patient (:func:`level_affines`), a PNG sheet
   ``OUT/levels.png`` and ``OUT/summary.json``.

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

ROLES = ("hidden", "reconstruction", "original")


# ---------------------------------------------------------------------------- geometry

def _translation(offset) -> np.ndarray:
    t = np.eye(4)
    t[:3, 3] = np.asarray(offset, dtype=np.float64)
    return t


def _scaling(factor: float, shift: float) -> np.ndarray:
    """Index map ``j -> factor * j + shift`` on every axis, as a 4x4 matrix."""
    m = np.diag([factor, factor, factor, 1.0])
    m[:3, 3] = shift
    return m


def ras_bounds(affine: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned RAS box (min, max) in mm of a grid's voxel *edges* (index -0.5 .. n-0.5)."""
    lo, hi = -0.5, np.asarray(shape, dtype=np.float64) - 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo, hi[0]) for y in (lo, hi[1]) for z in (lo, hi[2])])
    world = (np.asarray(affine, dtype=np.float64) @ corners.T)[:3]
    return world.min(axis=1), world.max(axis=1)


def grid_center(affine: np.ndarray, shape) -> np.ndarray:
    """RAS position (mm) of the centre of a grid (continuous index (n - 1) / 2)."""
    idx = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return (np.asarray(affine, dtype=np.float64) @ np.append(idx, 1.0))[:3]


def level_affines(crop_affine: np.ndarray, octants, blocks, input_size: int,
                  patch_size: int = 16) -> list[list[np.ndarray]]:
    """RAS affines of every level volume of one crop.

    crop_affine: (4, 4) index -> RAS of the (2S)^3 crop; octants: (n2,) octant ids of
    the level-2 volumes; blocks: (n2, n3) level-2 token ids of the level-3 volumes
    (level-3 volume ``v * n3 + j`` is token ``blocks[v, j]`` of level-2 volume ``v``).
    Returns ``[[A1], [A2_0, ...], [A3_0, ...]]``.
    """
    a = np.asarray(crop_affine, dtype=np.float64)
    s, p = input_size, patch_size
    g, f = s // p, s / p
    octants = np.asarray(octants, dtype=np.int64).reshape(-1)
    blocks = np.asarray(blocks, dtype=np.int64).reshape(len(octants), -1)
    level1 = [a @ _scaling(2.0, 0.5)]
    oct_off = [np.array([o // 4, (o // 2) % 2, o % 2]) * s for o in octants]
    level2 = [a @ _translation(off) for off in oct_off]
    level3 = []
    for v, off in enumerate(oct_off):
        for t in blocks[v]:
            tok = np.array([t // (g * g), (t // g) % g, t % g]) * p
            level3.append(a @ _translation(off + tok) @ _scaling(1.0 / f, 0.5 / f - 0.5))
    return [level1, level2, level3]


# ---------------------------------------------------------------------------- the crop

@dataclass
class Crop:
    """A preprocessed crop: ``tensor`` (1, C, C, C) in [0, 1], ``affine`` (4, 4) index -> RAS."""

    tensor: torch.Tensor
    affine: np.ndarray
    center_ras: np.ndarray
    padded_fraction: float
    volume_bounds: tuple[np.ndarray, np.ndarray]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return ras_bounds(self.affine, self.tensor.shape[1:])


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in np.asarray(v, dtype=np.float64)) + ")"


def _inside_fraction(crop_affine: np.ndarray, crop_size: int, vol_affine: np.ndarray, shape) -> float:
    """Fraction of crop voxels that lie on voxels of the original volume (the rest is padding).

    Orientation changes only flip/permute axes and padding/cropping shift by whole voxels,
    so the crop index -> original index map is a signed permutation plus a translation.
    """
    t = np.linalg.inv(vol_affine) @ crop_affine
    frac = 1.0
    steps = np.arange(crop_size)
    for axis in range(3):
        src = int(np.argmax(np.abs(t[:3, axis])))
        idx = t[src, 3] + t[src, axis] * steps
        frac *= float(np.count_nonzero((idx > -0.5) & (idx < shape[src] - 0.5))) / crop_size
    return frac


def extract_crop(volume, crop_size: int, prep, center_ras=None) -> Crop:
    """Preprocess ``volume`` (a :class:`~mimcore.data.volume_io.Volume`) as pre-training
    does and cut the ``crop_size^3`` crop centred (to the nearest voxel) at ``center_ras``
    (RAS mm; default: the volume's centre). Parts outside the volume are padded with 0
    (air). Raises MimError when the centre lies outside the volume.
    """
    from monai.transforms import BorderPadd, SpatialCropd

    from mimcore.data.preprocess import deterministic_transforms

    vol_affine = np.asarray(volume.affine, dtype=np.float64)
    lo, hi = ras_bounds(vol_affine, volume.shape)
    if center_ras is None:
        center = grid_center(vol_affine, volume.shape)
    else:
        center = np.asarray(center_ras, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(center)):
            raise MimError(f"The centre {center.tolist()} is not a finite RAS position.")
        idx = (np.linalg.inv(vol_affine) @ np.append(center, 1.0))[:3]
        if np.any(idx < -0.5) or np.any(idx > np.asarray(volume.shape) - 0.5):
            raise MimError(
                f"The centre {_fmt(center)} (RAS mm) lies outside the volume {volume.source or ''}, whose "
                f"RAS bounding box is x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, "
                f"z {lo[2]:.1f}..{hi[2]:.1f} mm. Pass a --center inside it (the coordinates 3D Slicer "
                f"shows, in RAS), e.g. the volume's centre {_fmt(grid_center(vol_affine, volume.shape))}.")

    data = deterministic_transforms(crop_size, prep)({"image": volume})
    image = data["image"]
    shape = np.asarray(image.shape[1:])
    c_idx = (np.linalg.inv(np.asarray(image.affine, dtype=np.float64)) @ np.append(center, 1.0))[:3]
    start = np.floor(c_idx - (crop_size - 1) / 2 + 0.5).astype(int)
    end = start + crop_size
    before, after = np.maximum(-start, 0), np.maximum(end - shape, 0)
    if np.any(before) or np.any(after):
        border = [int(v) for pair in zip(before, after) for v in pair]
        data = BorderPadd(keys="image", spatial_border=border, mode="constant", value=0.0)(data)
        start, end = start + before, end + before
    data = SpatialCropd(keys="image", roi_start=start.tolist(), roi_end=end.tolist())(data)
    crop = data["image"]
    if tuple(crop.shape[1:]) != (crop_size,) * 3:  # cannot happen: padded above
        raise MimError(f"internal error: crop of shape {tuple(crop.shape)} instead of {crop_size}^3")
    affine = np.asarray(crop.affine, dtype=np.float64)
    inside = _inside_fraction(affine, crop_size, vol_affine, volume.shape)
    return Crop(crop.as_tensor().float().contiguous(), affine, grid_center(affine, (crop_size,) * 3),
                1.0 - inside, (lo, hi))


# ---------------------------------------------------------------------------- the model

@dataclass
class LevelOutput:
    """One level's volumes (N, S, S, S) in [0, 1] units, and its norm-pix losses."""

    original: torch.Tensor
    hidden_input: torch.Tensor
    reconstruction: torch.Tensor
    loss: float
    volume_losses: list[float]


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
        mean = tokens.mean(dim=-1, keepdim=True)
        std = (tokens.var(dim=-1, keepdim=True) + eps) ** 0.5
        hid = hidden[..., None]
        recon = torch.where(hid, pred * std + mean, tokens)
        vmin = tokens.flatten(1).min(dim=1).values[:, None, None]  # (N, 1, 1)
        masked = torch.where(hid, vmin.expand_as(tokens), tokens)
    return LevelOutput(volume[:, 0].float().cpu(), unpatchify(masked, p)[:, 0].cpu(),
                       unpatchify(recon, p)[:, 0].cpu(), loss, per_volume)


# ---------------------------------------------------------------------------- outputs

def _to_hu(x: torch.Tensor, prep) -> np.ndarray:
    """Inverse of the [hu_min, hu_max] -> [0, 1] window."""
    return (x.numpy().astype(np.float32) * (prep.hu_max - prep.hu_min) + prep.hu_min).astype(np.float32)


def _middle_axial(array: np.ndarray) -> np.ndarray:
    """Middle slice across the third (RAS: S) axis, as an image with A up and L right."""
    return array[:, :, array.shape[2] // 2].T


def write_sheet(path: Path, rows: list[tuple[str, dict[str, np.ndarray]]],
                heading: str = "MiM levels") -> Path:
    """A PNG with one row per (title, {role: (X, Y, Z) HU array}); columns original/hidden/reconstruction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("original", "hidden", "reconstruction")
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for r, (title, arrays) in enumerate(rows):
        ref = _middle_axial(arrays["original"])
        vmin, vmax = np.percentile(ref, [1, 99]) if ref.size else (0, 1)
        if vmax <= vmin:
            vmin, vmax = vmin - 1, vmax + 1
        for c, role in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(_middle_axial(arrays[role]), cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                      interpolation="nearest")
            if r == 0:
                ax.set_title(role, fontsize=10)
            if c == 0:
                ax.set_ylabel(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{heading} (middle axial slice; hidden regions dark in 'hidden')", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@dataclass
class ReconstructionResult:
    output_dir: Path
    sheet: Path
    summary: Path
    level_dirs: list[Path]
    losses: list[float]
    padded_fraction: float
    files: list[Path] = field(default_factory=list)

    def outputs(self) -> dict:
        """JSON-able description (absolute paths) for the CLI's final ``done`` event."""
        return {
            "output_dir": str(self.output_dir),
            "sheet": str(self.sheet),
            "summary": str(self.summary),
            "levels": {f"level{i}": str(d) for i, d in enumerate(self.level_dirs, start=1)},
            "losses": {f"l{i}": v for i, v in enumerate(self.losses, start=1)},
            "padded_fraction": self.padded_fraction,
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
    vmin = original.flatten(1).min(dim=1).values[:, None, None, None, None]
    hidden_input = torch.where(mask, vmin.expand_as(original), original)
    return LevelOutput(original[:, 0], hidden_input[:, 0], recon[:, 0], loss, per_volume), mask[:, 0]


def reconstruct(checkpoint, image, center_ras=None, output_dir=None, seed: int = 0,
                device: str | None = None,
                progress: Callable[[int, int, dict], None] | None = None,
                notice: Callable[[str], None] | None = None) -> ReconstructionResult:
    """Run the whole ``mim reconstruct``: returns where everything was written.

    ``progress(step, total, metrics)`` is called with step 0 once the crop is ready and the
    number of levels known, then after each level is reconstructed and written;
    ``notice(message)`` with things the user should know (padding).
    """
    from mimcore.data.preprocess import Preprocessing
    from mimcore.data.volume_io import load_volume, save_volume
    from mimcore.methods.mim import build_levels
    from mimcore.methods.registry import METHOD_NAMES, checkpoint_method, load_pretrain_checkpoint

    dev = resolve_device(device or "auto")
    model, meta = load_pretrain_checkpoint(Path(checkpoint))
    model.eval().to(dev)
    method, backbone = checkpoint_method(meta)
    is_mim = method == "mim"
    if is_mim:
        size = model.model_cfg.crop_size
    else:  # the network input (GMIM: not its larger pre-training region)
        size = int(getattr(model, "input_size", None) or model.cfg.input_size)
    prep = Preprocessing(**meta.get("preprocessing", {}))
    out = (Path(output_dir).expanduser() if output_dir is not None else default_output_dir(image)).resolve()

    volume = load_volume(image)
    crop = extract_crop(volume, size, prep, center_ras)
    if crop.padded_fraction > 0 and notice is not None:
        notice(f"the {size}^3 crop around {_fmt(crop.center_ras)} extends beyond the volume: "
               f"{100 * crop.padded_fraction:.1f}% of it is padding (value {prep.hu_min:g} HU, air). "
               "Move --center inside to avoid it.")
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
            for vol, hid in zip(levels.volumes, levels.hidden):
                yield predict_level(model, vol, hid, model.cfg.norm_pix_eps), hid.cpu()
    else:
        octants, blocks, n3, total = [], [], 0, 1
        with torch.no_grad():
            preview = model.reconstruct_preview(crop.tensor[None].to(dev), gen)
        single, voxel_mask = preview_level(preview, crop.tensor[None])
        affines = [[crop.affine]]

        def results():
            yield single, voxel_mask

    if progress is not None:
        progress(0, total, {})
    summary_levels, files, level_dirs, losses, sheet_rows = [], [], [], [], []
    for li, (res, hid) in enumerate(results(), start=1):
        folder = out / f"level{li}"
        level_dirs.append(folder)
        losses.append(res.loss)
        entries = []
        for v in range(res.original.shape[0]):
            arrays = {"hidden": _to_hu(res.hidden_input[v], prep),
                      "reconstruction": _to_hu(res.reconstruction[v], prep),
                      "original": _to_hu(res.original[v], prep)}
            entry = {"index": v, "loss": res.volume_losses[v], "affine": affines[li - 1][v].tolist(), "files": {}}
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
            if v == 0:
                sheet_rows.append((f"level {li}" + (f" vol{v:02d}" if li > 1 else "") + f", loss {res.loss:.3f}",
                                   arrays))
        summary_levels.append({"level": li, "folder": f"level{li}", "loss": res.loss,
                               "hidden_level1_octants": sorted(octants) if li == 1 and is_mim else None,
                               "volumes": entries})
        if progress is not None:
            progress(li, total, {f"l{li}": res.loss})

    name = METHOD_NAMES.get(method, method)
    sheet = write_sheet(out / "levels.png", sheet_rows, "MiM levels" if is_mim else f"{name} reconstruction")
    lo, hi = crop.bounds
    summary = {
        "checkpoint": str(checkpoint),
        "image": str(image),
        "method": method,
        "backbone": backbone,
        "seed": int(seed),
        "center_ras_requested": None if center_ras is None else [float(x) for x in center_ras],
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
        "levels": summary_levels,
        "sheet": "levels.png",
        "files": [os.path.relpath(p, out) for p in files],
    }
    from mimcore.files import atomic_write_text

    summary_path = out / "summary.json"
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return ReconstructionResult(out, sheet, summary_path, level_dirs, losses, crop.padded_fraction, files)
