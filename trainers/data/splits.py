"""In-memory dataset splits: the device-resident fast path's unit of data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainers.data.errors import DataError


@dataclass(frozen=True)
class ArraySplits:
    """Train / validation / test tensors in their storage dtype (uint8 images as
    (N, C, H, W), int64 labels). Workloads turn images into floats on the device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def train_size(self) -> int:
        return int(self.train_y.shape[0])

    def to(self, device: str | torch.device) -> "ArraySplits":
        moved = {k: getattr(self, k).to(device) for k in
                 ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return ArraySplits(num_classes=self.num_classes, **moved)


def carve_validation(x: np.ndarray, y: np.ndarray, val_size: int, seed: int):
    """Split (x, y) into (train_x, train_y, val_x, val_y) by a fixed-seed permutation."""
    if not 0 < val_size < len(y):
        raise DataError(f"the validation split takes {val_size} examples from a training set of "
                        f"{len(y)}; it must take between 1 and {len(y) - 1} (campaign.val_size)")
    order = np.random.default_rng(seed).permutation(len(y))
    val, train = order[:val_size], order[val_size:]
    return x[train], y[train], x[val], y[val]


def as_tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
