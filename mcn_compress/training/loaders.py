"""Data loaders of the trainer: a deterministic per-epoch order, distributed shards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mcn_compress.training.distributed import DistInfo
from mcn_compress.training.recipe import DataRecipe


class EpochSampler(Sampler[int]):
    """Shuffled order that depends only on ``seed + epoch`` (single process)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())


def build_loader(
    dataset: Dataset[Any],
    data: DataRecipe,
    *,
    train: bool,
    seed: int,
    dist: DistInfo,
    pin: bool = False,
) -> tuple[DataLoader[Any], Any]:
    """The loader of a training or validation split and its sampler (None for validation in
    one process). Training order: `EpochSampler` in one process, a shuffled
    `DistributedSampler` shard per rank under torchrun; ``set_epoch`` reorders either. ``pin``
    pins host memory (for CUDA)."""
    size = len(dataset)  # type: ignore[arg-type]
    sampler: Any
    if dist.enabled:
        sampler = DistributedSampler(
            dataset,
            num_replicas=dist.world_size,
            rank=dist.rank,
            shuffle=train,
            seed=seed,
            drop_last=train,
        )
    elif train:
        sampler = EpochSampler(size, seed)
    else:
        sampler = None
    loader = DataLoader(
        dataset,
        batch_size=data.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=data.workers,
        pin_memory=pin,
        drop_last=train and size >= 2 * data.batch_size,
        persistent_workers=data.workers > 0,
    )
    return loader, sampler
