"""The training loop, written once, for pre-training and fine-tuning.

Modelled on facebookresearch/mae (``engine_pretrain.py:train_one_epoch`` and the scaler
object of ``util/misc.py:NativeScalerWithGradNormCount``): what differs between
pre-training and fine-tuning is what they supply - the model, the micro-batches, the
forward pass and the loss, the checkpoint description and their extra hooks (fine-tuning
validates, keeps the best model and stops early in ``after_step``). The engine owns the
rest: mixed precision (:func:`autocast_dtype`, :class:`LossScaler`), DDP wrapping,
gradient accumulation, clipping, the optimizer and scheduler steps, the metrics log,
progress, periodic / interrupt / final checkpoints, and the scheduler replay that makes a
resumed run continue bit for bit.

One optimizer step of :meth:`Engine.run`::

    before_step(step)                       # e.g. seed the step's random draws
    for micro in range(accum):              # gradient accumulation
        batch = next(batches) -> device
        with no_sync (all but the last micro-batch, under DDP), autocast:
            output = forward(net, batch, step, micro)
        losses = loss(output, batch)        # {"loss": tensor, other metrics ...}
        scaler.backward(losses["loss"] / accum)
    non-finite loss -> MimError (resume after lowering the lr)
    scaler.step(optimizer, clip_grad)       # unscale, clip, step, update, zero_grad
    scheduler.step(); log metrics
    stop = after_step(step, metrics)        # e.g. validation, early stopping
    progress event; periodic checkpoint
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from mimcore.errors import MimError
from mimcore.models.checkpoint import FORMAT, save_checkpoint
from mimcore.training.distributed import DistInfo
from mimcore.training.logs import log_metrics
from mimcore.training.progress import Progress
from mimcore.training.run_folder import checkpoint_steps, prune_checkpoints


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for fp32; bf16 where the GPU supports it, else fp16, for ``auto`` on CUDA."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise MimError(f"--precision {precision} is for CUDA GPUs; on the CPU train in fp32 (--precision fp32 or auto)")
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in state-dict order (bitwise equality check)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LossScaler:
    """The gradient scaler, clipping and optimizer step in one object (mae's
    ``NativeScalerWithGradNormCount``). The scaler is active only for fp16 autocast; with
    bf16 or fp32 ``backward`` and ``step`` are the plain ones."""

    def __init__(self, amp_dtype: torch.dtype | None):
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters, clip_grad: float = 0.0) -> float | None:
        """Unscale and clip to ``clip_grad`` (if > 0), step, update the scale, zero the gradients.
        Returns the gradient norm before clipping, or None without clipping."""
        norm = None
        if clip_grad > 0:
            self.scaler.unscale_(optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(parameters, clip_grad))
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict | None:
        """The scaler's state for a checkpoint; None when it is not used."""
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)


def checkpoint_failed(run_dir: Path, step: int, err: BaseException) -> MimError:
    """The MimError for a checkpoint that could not be written: why, and which complete
    checkpoint a ``--resume`` continues from (the save deleted its partial files)."""
    if getattr(err, "no_space", False) or getattr(err, "errno", None) in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        try:
            free = f", {shutil.disk_usage(run_dir).free // 1024} KiB free"
        except OSError:
            free = ""
        reason = f"no space left on the device{free}"
    else:
        reason = str(err) if isinstance(err, MimError) else (getattr(err, "strerror", None) or str(err))
    steps = [s for s in checkpoint_steps(run_dir) if s < step]
    latest = (f"the latest complete checkpoint is still {run_dir / f'checkpoint_{steps[-1]:08d}.json'} (step "
              f"{steps[-1]})" if steps else "there is no complete checkpoint yet")
    return MimError(f"the checkpoint of step {step} could not be saved in {run_dir} ({reason.rstrip('.')}); "
                    f"training stopped, {latest}. Free some space (or keep fewer checkpoints with "
                    "--keep-checkpoints N), then continue with --resume")


def replay_schedule(scheduler, steps: int) -> None:
    """Advance ``scheduler`` by ``steps`` optimizer steps (a resumed run continues its schedule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(steps):
            scheduler.step()


def wrap_ddp(model: torch.nn.Module, device: torch.device, dist_info: DistInfo,
             find_unused_parameters: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under ``torchrun`` (world > 1), else ``model``."""
    if not dist_info.enabled:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def _to_device(batch, device: torch.device):
    if isinstance(batch, (tuple, list)):
        return tuple(b.to(device, non_blocking=True) for b in batch)
    return batch.to(device, non_blocking=True)


@dataclass
class Engine:
    """One training run's loop. The caller builds everything, resumes the model, optimizer
    and scaler (``LossScaler.load_state_dict``), replays the scheduler
    (:func:`replay_schedule`), then calls :meth:`run` and, with its summary, :meth:`done`.

    model:           the module being trained (clipped, checkpointed); ``net`` is what
                     ``forward`` calls: ``model`` or its DDP wrapper (:func:`wrap_ddp`).
    checkpoint_meta: ``metrics -> dict``, the JSON description of a checkpoint (the engine
                     adds the scaler state), saved with ``fmt`` into ``run_dir``.
    metrics_path:    ``metrics.jsonl`` (and ``writer``, TensorBoard or None, under
                     ``log_tag``), written by rank 0.
    lr_group:        the parameter group whose learning rate is logged as ``lr``.
    log_every:       progress event every N steps (and the last); ``save_every``: a
                     checkpoint every N steps (0: only at the end and on Ctrl-C).
    keep_checkpoints: after each complete save keep only the N most recent checkpoints
                     (0: all) plus the steps ``protected()`` returns (fine-tuning: the best);
                     :func:`mimcore.training.run_folder.prune_checkpoints`.

    A checkpoint that cannot be written (a full disk) stops the run with a MimError that
    names the latest complete checkpoint, which stays the one ``--resume`` continues from.
    """

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: LossScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    dist_info: DistInfo
    report: Progress
    run_dir: Path
    checkpoint_meta: Callable[[dict], dict]
    metrics_path: Path
    writer: Any = None
    fmt: str = FORMAT
    log_tag: str = "pretrain"
    accum: int = 1
    clip_grad: float = 0.0
    lr_group: int = 0
    log_every: int = 1
    save_every: int = 0
    keep_checkpoints: int = 0
    protected: Callable[[], Iterable[int]] | None = None

    def autocast(self):
        """The mixed-precision context of the forward passes (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def save(self, step: int, metrics: dict) -> None:
        """Write the checkpoint of ``step`` (rank 0), report it, then apply ``keep_checkpoints``."""
        if self.dist_info.is_main:
            meta = dict(self.checkpoint_meta(metrics), scaler=self.scaler.state_dict())
            try:
                path = save_checkpoint(self.run_dir, step, self.model, meta, self.optimizer, fmt=self.fmt)
            except (MimError, OSError) as err:
                raise checkpoint_failed(self.run_dir, step, err) from None
            self.report.event("checkpoint", path=str(path), step=step)
            if self.keep_checkpoints:
                try:
                    prune_checkpoints(self.run_dir, self.keep_checkpoints, step,
                                      self.protected() if self.protected is not None else ())
                except OSError as err:  # the new checkpoint is safe: training goes on, the user is told
                    self.report.event("note", message=f"--keep-checkpoints: an older checkpoint in {self.run_dir} "
                                                      f"could not be deleted ({err.strerror or err}); delete it "
                                                      "by hand if space is short")

    def train_step(self, step: int, batches: Iterator, forward: Callable, loss: Callable | None) -> dict:
        """One optimizer step over ``accum`` micro-batches; returns the step's metrics (means
        over the micro-batches, ``grad_norm`` with clipping, ``lr``), rounded to 6 digits."""
        sums: dict[str, float] = {}
        for micro in range(self.accum):
            batch = _to_device(next(batches), self.device)
            last = not self.dist_info.enabled or micro == self.accum - 1
            with contextlib.nullcontext() if last else self.net.no_sync(), self.autocast():
                output = forward(self.net, batch, step, micro)
            losses = output if loss is None else loss(output, batch)
            self.scaler.backward(losses["loss"] / self.accum)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / self.accum
        if not math.isfinite(sums["loss"]):
            raise MimError(f"the loss became {sums['loss']} at step {step + 1}; lower the learning rate "
                           "(--lr) or enable clipping (--clip-grad 1.0), then --resume")
        norm = self.scaler.step(self.optimizer, self.model.parameters(), self.clip_grad)
        if norm is not None:
            sums["grad_norm"] = norm
        sums["lr"] = self.optimizer.param_groups[self.lr_group]["lr"]
        self.scheduler.step()
        return {k: float(f"{v:.6g}") for k, v in sums.items()}

    def run(self, start: int, total: int, batches: Iterator, forward: Callable[[torch.nn.Module, Any, int, int], Any],
            loss: Callable[[Any, Any], dict] | None = None, before_step: Callable[[int], None] | None = None,
            after_step: Callable[[int, dict], bool] | None = None) -> tuple[int, dict, bool]:
        """Train from step ``start`` to ``total`` (or until ``after_step`` returns True).

        batches:     iterator of micro-batches (a tensor or a tuple of tensors; moved to the device).
        forward:     ``(net, batch, step, micro) -> output``, run under autocast.
        loss:        ``(output, batch) -> {"loss": tensor, ...}`` outside autocast; None when
                     ``forward`` returns that dict itself.
        before_step: ``step -> None`` before the step's first micro-batch is drawn.
        after_step:  ``(step, metrics) -> stop`` after the step is logged; may add metrics
                     (they go into the progress event).

        Saves a checkpoint every ``save_every`` steps, on Ctrl-C (if a step was made; then
        re-raises) and at the end. Returns (last step, its metrics, stopped early).
        """
        step, metrics, stop = start, {}, False
        self.net.train()
        try:
            while step < total and not stop:
                if before_step is not None:
                    before_step(step)
                metrics = self.train_step(step, batches, forward, loss)
                step += 1
                if self.dist_info.is_main:
                    log_metrics(self.metrics_path, self.writer, step, metrics, tag=self.log_tag)
                if after_step is not None:
                    stop = bool(after_step(step, metrics))
                if step % max(1, self.log_every) == 0 or step == total:
                    self.report.update(step, metrics)
                if self.save_every and step % self.save_every == 0 and step < total and not stop:
                    self.save(step, metrics)
        except KeyboardInterrupt:
            if step > start:
                self.save(step, metrics)
            raise
        self.save(step, metrics)
        self.report.close()
        if self.writer is not None:
            self.writer.close()
        return step, metrics, stop

    def done(self, summary: dict) -> dict:
        """Send the ``done`` event (every rank, in json mode) and return ``summary``."""
        self.report.done(summary)
        return summary
