"""Where a trial's batches come from: tensors resident on the device (small datasets,
indexing, no DataLoader) or a DataLoader over image folders (ImageNet at full size).

Both follow one rule: every epoch is a fresh permutation drawn from the trial's
generator, cut into batches of the epoch's batch size, the last one holding the
remainder. Under data parallelism each rank takes every `world`-th example of the
global batch, so the ranks together see exactly the single-process batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from trainers.data.splits import ArraySplits
from trainers.workloads import Workload

Batch = tuple[torch.Tensor, torch.Tensor, int]  # (inputs, labels, examples in the global batch)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1


class ResidentBatches:
    """uint8 splits already on the device; batches gathered and augmented there."""

    def __init__(self, splits: ArraySplits, workload: Workload, shard: Shard = Shard()):
        self.splits, self.workload, self.shard = splits, workload, shard
        self.train_size = splits.train_size

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        device = self.splits.train_x.device
        order = torch.randperm(self.train_size, device=device, generator=generator)
        for start in range(0, self.train_size, batch_size):
            index = order[start:start + batch_size]
            x = self.workload.preprocess(self.splits.train_x[index])
            if self.workload.augment is not None:
                # The whole global batch, so every rank draws the same random numbers.
                x = self.workload.augment(x, generator)
            mine = slice(self.shard.rank, None, self.shard.world)
            yield x[mine], self.splits.train_y[index][mine], len(index)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.splits.val_x, self.splits.val_y
        mine = torch.arange(self.shard.rank, len(y), self.shard.world, device=y.device)
        for start in range(0, len(mine), batch_size):
            index = mine[start:start + batch_size]
            yield self.workload.preprocess(x[index]), y[index]


class LoaderBatches:
    """A DataLoader with worker processes and pinned memory over map-style datasets whose
    items are (uint8 image, label); augmentation happens in the dataset's transforms."""

    def __init__(self, train, val, workload: Workload, device: torch.device, *,
                 num_workers: int = 8, shard: Shard = Shard()):
        self.train, self.val, self.workload, self.device = train, val, workload, device
        self.num_workers, self.shard = num_workers, shard
        self.train_size = len(train)

    def _loader(self, dataset, batches: list[list[int]], seed: int | None = None):
        from torch.utils.data import DataLoader
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                          pin_memory=self.device.type == "cuda", generator=generator,
                          persistent_workers=False)

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(self.train_size, generator=generator).tolist()
        chunks = [order[s:s + batch_size] for s in range(0, self.train_size, batch_size)]
        mine = [chunk[self.shard.rank::self.shard.world] for chunk in chunks]
        # Seeds the workers' augmentation from the trial's generator: reproducible.
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        for (x, y), chunk in zip(self._loader(self.train, mine, seed), chunks):
            x = x.to(self.device, non_blocking=True)
            yield self.workload.preprocess(x), y.to(self.device, non_blocking=True), len(chunk)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = list(range(self.shard.rank, len(self.val), self.shard.world))
        batches = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
        for x, y in self._loader(self.val, batches):
            yield (self.workload.preprocess(x.to(self.device, non_blocking=True)),
                   y.to(self.device, non_blocking=True))
