"""Checkpoints (pre-training and fine-tuning): safetensors weights + a JSON description, written atomically.

A checkpoint ``checkpoint_00000100`` in a run folder is three files:

- ``checkpoint_00000100.safetensors``: the model's weights (what travels);
- ``checkpoint_00000100.optim.safetensors``: optimizer tensors, for exact resume;
- ``checkpoint_00000100.json``: config, step, scheduler/scaler state, metrics and the
  sha256 of both tensor files. It is written last: a checkpoint exists once its JSON
  does, so an interrupted save never looks like a checkpoint.

Every file is written to a temporary name in the same folder and renamed into place.
Nothing here unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mimcore.errors import MimError
from mimcore.files import atomic_write, atomic_write_text, sha256_file

FORMAT = "mimcore.pretrain.v1"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(rest["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, meta: dict,
                    optimizer: torch.optim.Optimizer | None = None, fmt: str = FORMAT) -> Path:
    """Write the checkpoint of ``step`` into ``run_dir``; returns the JSON path.

    ``meta`` must be JSON-serialisable (config, schedule state, metrics ...). A checkpoint
    of the same step that is already there stops being one first (its JSON is deleted). When
    a write fails (a full disk: :class:`~mimcore.errors.OutputError`), the files of this step
    written so far are deleted, so the latest complete checkpoint is the previous one.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stem = run_dir / f"checkpoint_{step:08d}"
    weights, optim_path, json_path = stem.with_suffix(".safetensors"), Path(f"{stem}.optim.safetensors"), \
        stem.with_suffix(".json")
    json_path.unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": fmt}),
                     lambda tmp: _check_tensor_file(tmp, len(state)), what="checkpoint weights")
        doc = dict(meta, format=fmt, step=step, weights=weights.name, weights_sha256=sha256_file(weights))
        if optimizer is not None:
            tensors, rest = _optimizer_tensors(optimizer)
            atomic_write(optim_path, lambda tmp: save_file(tensors, tmp),
                         lambda tmp: _check_tensor_file(tmp, len(tensors)), what="checkpoint optimizer state")
            doc.update(optimizer=optim_path.name, optimizer_sha256=sha256_file(optim_path), optimizer_rest=rest)
        atomic_write_text(json_path, json.dumps(doc, indent=1), what="checkpoint description")
    except BaseException:
        for path in (json_path, weights, optim_path):  # the JSON first: no half checkpoint looks complete
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        raise
    return json_path


def _check_tensor_file(path: str, expected: int) -> None:
    """Raise unless ``path`` is a safetensors file with ``expected`` tensors (its header is read)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        found = len(list(f.keys()))
    if found != expected:
        raise OSError(f"{found} of {expected} tensors in the written file")


def find_checkpoint(path: Path) -> Path:
    """Resolve a checkpoint argument (its .json, its .safetensors, or a run folder -> latest) to the JSON."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("checkpoint_*[0-9].json"))
        if not found:
            raise MimError(f"no checkpoint in {path}: expected checkpoint_NNNNNNNN.json files written by `mim pretrain`")
        return found[-1]
    if path.name.endswith(".optim.safetensors"):
        path = path.with_name(path.name.replace(".optim.safetensors", ".json"))
    elif path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise MimError(f"checkpoint {path} not found: pass a run folder or a checkpoint_NNNNNNNN.json/.safetensors file")
    return path


def read_checkpoint(path: Path, with_optimizer: bool = False,
                    fmt: str = FORMAT) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(meta, model state dict, optimizer state dict or None), after checking the sha256 of each file."""
    json_path = find_checkpoint(path)
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MimError(f"cannot read checkpoint description {json_path}: {e}") from None
    if meta.get("format") != fmt:
        kind = "pre-training" if fmt == FORMAT else "fine-tuning"
        raise MimError(f"{json_path} is not a mimcore {kind} checkpoint (format {meta.get('format')!r})")

    def verified(name_key: str, sha_key: str) -> Path:
        p = json_path.parent / meta[name_key]
        if not p.is_file():
            raise MimError(f"checkpoint file {p} is missing")
        if sha256_file(p) != meta[sha_key]:
            raise MimError(f"checkpoint file {p} does not match the sha256 recorded in {json_path.name}: "
                           "it is corrupt or was modified; use an earlier checkpoint")
        return p

    weights = load_file(verified("weights", "weights_sha256"))
    optim = None
    if with_optimizer and "optimizer" in meta:
        optim = _optimizer_state(load_file(verified("optimizer", "optimizer_sha256")), meta["optimizer_rest"])
    return meta, weights, optim
