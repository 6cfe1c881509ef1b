"""Batch-size schedules: "increase the batch size instead of decaying the learning rate"
(Smith, Kindermans & Le 2017; methods.md 1.2, 1.3).

A `BatchSizePlan` says, for each epoch index e = 0, 1, 2, ..., which batch size to train
with and by what factor to multiply the learning rate. The batch changes only at epoch
boundaries; an epoch of N examples at batch size B takes ceil(N / B) updates, the last
one on the remaining N - (ceil(N / B) - 1) * B examples (`count_updates`).

At each milestone the noise scale g ~ lr * N / B is divided by `factor`. With k the
number of milestones <= e, every mode uses the one rule of methods.md 1.3:

    B_k  = min(B_0 * factor^k, cap)          (rounded to an integer)
    lr_k = lr_0 * factor^-k * B_k / B_0      (so lr_k / B_k = (lr_0 / B_0) / factor^k)

and the modes differ only in the cap: `decay_lr` caps at B_0 (the batch never grows),
`hybrid` at B_0 * factor^hybrid_increases (grow at the first milestone(s), then decay the
learning rate), `increase_batch` at `max_batch_size` (None: no cap). Where the cap binds
part-way through a factor, the learning rate takes the rest of the drop, so the
noise-scale schedule stays exact.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from typing import Literal

from trainers.schedules import parse_milestones

BatchMode = Literal["decay_lr", "hybrid", "increase_batch"]
BATCH_MODES: tuple[str, ...] = ("decay_lr", "hybrid", "increase_batch")


@dataclass(frozen=True)
class BatchSizePlan:
    """Batch size and learning-rate factor per epoch index (see the module docstring).

    `milestones` are whole epochs (a tuple, list or "60,120,160" string); the batch size
    and factor change from the first epoch whose index equals a milestone. A plan without
    milestones is a constant batch size.
    """

    initial_batch_size: int
    mode: BatchMode = "increase_batch"
    factor: float = 5.0
    milestones: tuple[int, ...] = ()
    max_batch_size: int | None = None
    hybrid_increases: int = 1

    def __post_init__(self) -> None:
        milestones = parse_milestones(self.milestones)
        if any(m != int(m) for m in milestones):
            raise ValueError(f"batch-size milestones must be whole epochs, got {self.milestones!r}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in milestones))
        if self.mode not in BATCH_MODES:
            raise ValueError(f"unknown batch-size mode {self.mode!r}; choose one of: "
                             f"{', '.join(BATCH_MODES)}")
        if self.initial_batch_size < 1 or self.factor <= 0 or self.hybrid_increases < 0:
            raise ValueError("need initial_batch_size >= 1, factor > 0, hybrid_increases >= 0")
        if self.max_batch_size is not None and self.max_batch_size < self.initial_batch_size:
            raise ValueError(f"max_batch_size {self.max_batch_size} is below "
                             f"initial_batch_size {self.initial_batch_size}")

    def decays(self, epoch_index: int) -> int:
        """How many milestones have passed at the start of epoch `epoch_index`."""
        if epoch_index < 0:
            raise ValueError(f"epoch_index must be >= 0, got {epoch_index}")
        return bisect_right(self.milestones, epoch_index)

    def _cap(self) -> float:
        if self.mode == "decay_lr":
            return self.initial_batch_size
        if self.mode == "hybrid":
            hybrid_cap = self.initial_batch_size * self.factor ** self.hybrid_increases
            return min(hybrid_cap, self.max_batch_size or math.inf)
        return self.max_batch_size or math.inf

    def batch_size(self, epoch_index: int) -> int:
        """Examples per update during epoch `epoch_index` (the last update takes the rest)."""
        uncapped = self.initial_batch_size * self.factor ** self.decays(epoch_index)
        return max(1, round(min(uncapped, self._cap())))

    def lr_factor(self, epoch_index: int) -> float:
        """Multiplier on the base learning rate during epoch `epoch_index`."""
        growth = self.batch_size(epoch_index) / self.initial_batch_size
        return growth / self.factor ** self.decays(epoch_index)


def increase_then_decay(initial_batch_size: int, train_size: int, *, factor: float,
                        milestones, fraction: float = 0.1) -> BatchSizePlan:
    """Smith et al.'s recipe: grow the batch at each milestone until it reaches about
    `fraction` * `train_size` (N/10), then decay the learning rate instead."""
    cap = max(initial_batch_size, round(fraction * train_size))
    return BatchSizePlan(initial_batch_size, "increase_batch", factor, milestones, cap)


def updates_per_epoch(batch_size: int, train_size: int) -> int:
    """ceil(N / B): the last, smaller batch of an epoch is one more update."""
    return -(-train_size // batch_size)


def count_updates(plan: BatchSizePlan, train_size: int, epochs: int) -> tuple[int, int]:
    """(updates, examples) of `epochs` whole epochs of `train_size` examples under `plan`."""
    updates = sum(updates_per_epoch(plan.batch_size(e), train_size) for e in range(epochs))
    return updates, train_size * epochs
