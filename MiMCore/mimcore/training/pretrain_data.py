"""Pre-training data: cached preprocessed volumes and reproducible random crops.

Randomness is a pure function of (seed, position in the sample stream), so a run that
resumes at step k draws exactly the crops it would have drawn without stopping, on
every rank, with or without data-loader workers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.data import CacheDataset
from torch.utils.data import Dataset, DistributedSampler, Sampler

from mimcore.data.datalist import datalist_entries, read_datalist, volumes_from_folder
from mimcore.data.preprocess import Preprocessing, deterministic_transforms, random_crop
from mimcore.errors import MimError, user_error_in


def find_volumes(datalist: str | None, data_dir: str | None, section: str | None = None) -> list[dict]:
    """``[{"image": path}, ...]`` from a datalist section or a folder of volumes.

    Without ``section``, a datalist's ``pretraining`` section is used if present, else
    ``training`` (labels are ignored). MR entries (``"modality": "MR"``) are skipped.
    """
    if bool(datalist) == bool(data_dir):
        raise MimError("give either --datalist FILE or --data-dir FOLDER (exactly one)")
    if data_dir:
        return [{"image": str(p)} for p in volumes_from_folder(data_dir)]
    if section is None:
        section = "pretraining" if "pretraining" in read_datalist(datalist) else "training"
    entries = [e for e in datalist_entries(datalist, section) if e.get("modality", "CT").upper() == "CT"]
    if not entries:
        raise MimError(f"section '{section}' of {datalist} lists no CT volume")
    return [{"image": e["image"]} for e in entries]


class RandomCrops(Dataset):
    """Item ``(index, seed)`` -> (1, crop, crop, crop) float tensor: a crop of cached volume
    ``index`` at a position drawn from ``seed``."""

    def __init__(self, volumes: list[dict], crop_size: int, prep: Preprocessing, cache_workers: int = 0):
        try:
            self.cache = CacheDataset(volumes, transform=deterministic_transforms(crop_size, prep),
                                      cache_rate=1.0, num_workers=cache_workers or None, progress=False)
        except Exception as err:  # MONAI wraps our clear messages into RuntimeErrors
            user = user_error_in(err)
            if user is None:
                raise
            raise MimError(str(user)) from None
        self.crop = random_crop(crop_size)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        index, seed = key
        self.crop.set_random_state(seed=seed)
        return torch.as_tensor(self.crop(self.cache[index])["image"]).float()


def stream_seed(seed: int, position: int, rank: int) -> int:
    """A 32-bit seed for sample ``position`` of ``rank``'s stream."""
    return (seed * 1_000_003 + position * 7919 + rank * 104_729) % (2**32)


class StepBatches(Sampler):
    """Yields batches of ``(index, seed)`` keys from global sample position ``start`` on.

    The stream of a rank is the concatenation of the epochs of a
    :class:`~torch.utils.data.DistributedSampler` (shuffled with ``seed`` and the epoch),
    each item repeated ``per_volume`` times (that many crops of one volume in a row, each
    with its own seed, as MONAI's ``num_samples``): position p is item ``q % n`` of epoch
    ``q // n``, q = p // per_volume.
    """

    def __init__(self, n_items: int, batch: int, start: int, n_batches: int, seed: int, rank: int, world: int,
                 per_volume: int = 1):
        self.sampler = DistributedSampler(range(n_items), num_replicas=world, rank=rank, shuffle=True,
                                          seed=seed, drop_last=False)
        self.per_epoch = len(self.sampler)
        self.batch, self.start, self.n_batches = batch, start, n_batches
        self.seed, self.rank, self.per_volume = seed, rank, per_volume

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        epoch, order = -1, []
        pos = self.start
        for _ in range(self.n_batches):
            keys = []
            for _ in range(self.batch):
                item = pos // self.per_volume
                if item // self.per_epoch != epoch:
                    epoch = item // self.per_epoch
                    self.sampler.set_epoch(epoch)
                    order = list(self.sampler)
                keys.append((order[item % self.per_epoch], stream_seed(self.seed, pos, self.rank)))
                pos += 1
            yield keys


def volumes_summary(volumes: list[dict]) -> str:
    names = [Path(v["image"]).name for v in volumes]
    return f"{len(names)} volume(s): " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
