"""What ``mim reconstruct --checkpoint`` accepts: a ``mim pretrain`` checkpoint (run folder,
``checkpoint_NNNNNNNN.json`` or ``.safetensors``) or an authors' published MiM ``.pth``.

An authors' ``.pth`` (``{"model": state_dict}``) is read with ``torch.load(weights_only=True)``
only (:func:`mimcore.methods.mim_official.load_official_checkpoint`: a pickle asking for
anything but tensors and plain containers is refused), renamed to our names
(:func:`~mimcore.methods.mim_official.convert_official_state_dict`) and loaded, strictly,
into the :class:`~mimcore.methods.mim.MiMPretrainModel` of the ConvViT3D size its tensors
have (``base`` for the published model). It is shown with the published preprocessing
(orientation RAS, HU window [-1000, 1000], native spacing; METHODS.md section 1).
"""

from __future__ import annotations

from pathlib import Path

from mimcore.errors import MimError

#: File suffixes of torch pickles (the authors' checkpoints); never read as JSON.
AUTHORS_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch's zip container, a bare pickle


def _is_torch_file(path: Path) -> bool:
    if path.suffix.lower() in AUTHORS_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(_PICKLE_MAGIC)


def load_for_reconstruction(checkpoint) -> tuple[object, dict]:
    """(model in eval-ready state with the checkpoint's weights, meta) for ``mim reconstruct``.

    ``meta`` is a ``mim pretrain`` checkpoint description (``method``, ``backbone``, ``model``,
    ``preprocessing``, ``step``, ...) with ``source`` added: ``"mimcore"`` or ``"authors"``.
    Raises MimError with what to pass instead for anything else.
    """
    from mimcore.methods.registry import load_pretrain_checkpoint

    path = Path(checkpoint).expanduser()
    if path.is_file() and path.suffix.lower() != ".safetensors":
        if _is_torch_file(path):
            return load_authors_checkpoint(path)
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MimError(f"{path} is neither a `mim pretrain` checkpoint description (JSON text) nor an authors' "
                           "MiM .pth: pass a pre-training run folder, a checkpoint_NNNNNNNN.json/.safetensors file, "
                           "or the authors' published .pth (named *.pth)") from None
    model, meta = load_pretrain_checkpoint(path)
    return model, dict(meta, source="mimcore")


def load_authors_checkpoint(path: Path) -> tuple[object, dict]:
    """An authors' published MiM pre-training ``.pth`` as (MiMPretrainModel, meta); see the module doc."""
    import torch

    from mimcore.data.preprocess import Preprocessing
    from mimcore.methods.mim import MiMConfig, MiMPretrainModel
    from mimcore.methods.mim_official import convert_official_state_dict, load_official_checkpoint
    from mimcore.models.convvit import PRESETS

    official = load_official_checkpoint(path)  # torch.load(weights_only=True) only
    ours, _ = convert_official_state_dict(official, include_decoder=True)
    if not any(k.startswith("encoder.embeds.0.") for k in ours):
        raise MimError(f"{path} is not a MiM pre-training checkpoint of the authors (no patch_embed1 among "
                       f"{', '.join(list(official)[:4])}, ...): `mim reconstruct` takes a `mim pretrain` run "
                       "folder or checkpoint, or the authors' published MiM pre-training .pth")
    if not any(k.startswith("decoder.") for k in ours):
        raise MimError(f"{path} holds an encoder without the pre-training decoder (a fine-tuning or encoder-only "
                       "checkpoint): it cannot reconstruct hidden regions. Use it with `mim finetune --init`, or pass "
                       "the authors' full pre-training checkpoint")
    dims = tuple(int(ours[f"encoder.embeds.{i}.proj.weight"].shape[0]) for i in range(4)
                 if f"encoder.embeds.{i}.proj.weight" in ours)
    name = next((n for n, cfg in PRESETS.items() if tuple(cfg.dims) == dims), None)
    if name is None:
        sizes = ", ".join(f"{n} {tuple(c.dims)}" for n, c in PRESETS.items())
        raise MimError(f"{path} has stage widths {dims}, which no ConvViT3D size has ({sizes}); "
                       "it is not a MiM checkpoint this version can show")
    cfg = PRESETS[name]
    model = MiMPretrainModel(cfg, MiMConfig())
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise MimError(f"{path} does not fit the '{name}' MiM model its widths suggest: {detail}") from None
    meta = {"format": "authors", "method": "mim", "backbone": "convvit", "preset": name,
            "model": cfg.to_dict(), "mim": MiMConfig().to_dict(),
            "preprocessing": Preprocessing(hu_min=-1000.0, hu_max=1000.0, orientation="RAS").to_dict(),
            "step": None, "source": "authors"}
    model.to(torch.float32)
    return model, meta
