"""``torchrun`` support: process group set-up from the environment, rank helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mimcore.errors import MimError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), else single process.

    Backend NCCL on CUDA, gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if torch.cuda.device_count() <= local:
            raise MimError(f"rank {rank} wants GPU {local} but only {torch.cuda.device_count()} are visible")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world, local)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(device_name: str, run):
    """Resolve the device, join the ``torchrun`` group if any, call ``run(device, dist_info)``
    and always leave the group. On the CPU, freed memory is kept in the process
    (:mod:`~mimcore.training.cpu_memory`); on CUDA each rank takes its local GPU."""
    from mimcore.devices import resolve_device
    from mimcore.training.cpu_memory import keep_freed_memory

    device = resolve_device(device_name)
    if device.type == "cpu":
        keep_freed_memory()
    info = setup(str(device))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        return run(device, info)
    finally:
        cleanup()
