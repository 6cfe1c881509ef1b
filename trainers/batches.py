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
    items are (uint8 image, label); augmentation happens in the dataset's transforms.

    Each epoch draws one seed from the trial's generator. With worker processes the
    DataLoader seeds each worker's RNGs from it; with `num_workers=0` the transforms run
    in this process, on RNG states seeded from that same seed and swapped in only while
    a batch is loaded (`_on_own_rng`). Either way an epoch's augmentation follows from
    the trial's generator (0 and 8 workers give different, each reproducible, batches),
    and loading never draws from the caller's global RNGs."""

    def __init__(self, train, val, workload: Workload, device: torch.device, *,
                 num_workers: int = 8, shard: Shard = Shard()):
        self.train, self.val, self.workload, self.device = train, val, workload, device
        self.num_workers, self.shard = num_workers, shard
        self.train_size = len(train)

    def _loader(self, dataset, batches: list[list[int]], seed: int = 0):
        """The batches of `dataset`, its transforms seeded from `seed` (evaluation's are
        not random: any seed will do there)."""
        from torch.utils.data import DataLoader
        # Always a generator: without one the DataLoader draws its workers' base seed
        # from the global RNG.
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=generator,
                            persistent_workers=False)
        return _on_own_rng(loader, seed) if self.num_workers == 0 else loader

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(self.train_size, generator=generator).tolist()
        chunks = [order[s:s + batch_size] for s in range(0, self.train_size, batch_size)]
        mine = [chunk[self.shard.rank::self.shard.world] for chunk in chunks]
        # Seeds the augmentation (in the workers, or here) from the trial's generator.
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


def _on_own_rng(iterable, seed: int) -> Iterator:
    """Iterate `iterable` with torch's CPU generator, Python's `random` and NumPy's global
    RNG seeded from `seed` (as a DataLoader worker seeds them) and carried from item to
    item, while the caller's states are swapped back in between items: what runs between
    two batches (the training step, its dropout) neither disturbs nor sees these draws."""
    import random

    import numpy as np
    own = (torch.Generator().manual_seed(seed).get_state(), random.Random(seed).getstate(),
           np.random.RandomState(seed % 2 ** 32).get_state())
    iterator = None
    while True:
        caller = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.set_rng_state(own[0])
        random.setstate(own[1])
        np.random.set_state(own[2])
        try:
            if iterator is None:
                iterator = iter(iterable)
            item = next(iterator)
        except StopIteration:
            return
        finally:
            own = (torch.get_rng_state(), random.getstate(), np.random.get_state())
            torch.set_rng_state(caller[0])
            random.setstate(caller[1])
            np.random.set_state(caller[2])
        yield item
