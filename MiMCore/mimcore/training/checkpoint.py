"""Checkpoints of training runs. The file format (safetensors weights + a JSON description,
written atomically) lives in :mod:`mimcore.models.checkpoint`, below the methods that read it
(:func:`mimcore.methods.registry.load_pretrain_checkpoint`); it is re-exported here because
training/pretrain.py, training/finetune.py and tests import it from this module.
"""

from __future__ import annotations

from mimcore.models.checkpoint import FORMAT, find_checkpoint, read_checkpoint, save_checkpoint  # re-exported

__all__ = ["FORMAT", "find_checkpoint", "read_checkpoint", "save_checkpoint"]
