"""Workloads: dataset + model + loss + evaluation, behind one small contract.

A workload variant (another model, a data subset) is a new registry entry, not a flag.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import Target
from trainers.data.splits import ArraySplits


@dataclass(frozen=True)
class DataOptions:
    data_dir: str | None = None
    download: bool = False
    split_seed: int = 0
    val_size: int | None = None  # examples carved from train for validation; None: the dataset's default

    @classmethod
    def of(cls, source) -> "DataOptions":
        """The data a trial config or a campaign spec names (both carry data_dir, download
        and val_size): every loader of a campaign's data must agree on it, or the cache
        holds two copies and trials see different validation splits."""
        return cls(source.data_dir, source.download, val_size=source.val_size)


@dataclass(frozen=True)
class ModelOptions:
    # Batch-norm statistics per ghost batch of this many examples (Hoffer et al.);
    # None means ordinary batch norm. Ignored by models without batch norm.
    ghost_batch_size: int | None = None


@dataclass(frozen=True)
class Workload:
    """The contract every workload fulfils (after AlgoPerf's `Workload`).

    `load_data` reads the dataset into memory as uint8 images; `preprocess` turns a
    uint8 batch into the float input on the device; `augment`, when set, applies random
    training augmentation (crop, flip) on the device with the trial's generator.
    """

    name: str
    description: str
    load_data: Callable[[DataOptions], ArraySplits]
    build_model: Callable[[ModelOptions], nn.Module]
    mean: float | tuple[float, ...]  # per channel when a tuple
    std: float | tuple[float, ...]
    scale: float  # uint8 value that maps to 1.0 before normalisation (255, or 16 for digits)
    default_target: Target
    default_max_steps: int
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    needs_data_dir: bool = True
    default_search_space: Mapping[str, Mapping] = field(default_factory=dict)
    # A workload with a closed form (the noisy quadratic model) computes a trial's
    # measurements and result directly instead of training: simulate(config) returns
    # (TrialResult, [Measurement]). `optimizers` then names the update rules it models
    # and the hyperparameters each reads (instead of trainers.optim's registry).
    simulate: Callable | None = None
    # Workloads too large to hold in memory (ImageNet at full size) stream batches from
    # a DataLoader: load_folders(options) returns map-style train/val datasets of
    # (uint8 image, label) items with their augmentation in the transforms.
    load_folders: Callable | None = None
    optimizers: Mapping[str, tuple[str, ...]] | None = None

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> normalised float, on x's device (a batch (N, C, H, W),
        or the vectorized trainer's stack of batches (K, N, C, H, W))."""
        return (x.float() / self.scale - _per_channel(self.mean, x)) / _per_channel(self.std, x)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor):
        """Summed cross-entropy, the example count and per-example losses: sum vs mean
        matters across batch sizes, and per-example losses feed noise-scale probes."""
        per_example = F.cross_entropy(logits.float(), labels, reduction="none")
        return per_example.sum(), labels.numel(), per_example


def _per_channel(value: float | tuple[float, ...], x: torch.Tensor) -> float | torch.Tensor:
    """A per-channel constant broadcast over images' trailing (C, H, W) dimensions."""
    if isinstance(value, tuple):
        return _channel_constant(value, x.device)
    return value


@functools.lru_cache(maxsize=None)
def _channel_constant(value: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(value, device=device).view(-1, 1, 1)  # made once per device, not per batch


WorkloadRegistry = dict[str, Workload]


def register(registry: WorkloadRegistry, workload: Workload) -> None:
    if workload.name in registry:
        raise ValueError(f"duplicate workload name {workload.name!r}")
    registry[workload.name] = workload


def _digits_data(options: DataOptions) -> ArraySplits:
    from trainers.data.digits import VAL_SIZE, load_digits_splits
    return load_digits_splits(split_seed=options.split_seed, val_size=options.val_size or VAL_SIZE)


def _mlp(in_features: int, hidden: tuple[int, ...]) -> Callable[[ModelOptions], nn.Module]:
    from trainers.models.mlp import MLP
    return lambda options: MLP(in_features, hidden, 10)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def _base_workloads() -> WorkloadRegistry:
    from trainers.workloads_papers import mnist_data, mnist_t10k_data, paper_workloads
    registry: WorkloadRegistry = {}
    register(registry, Workload(
        name="digits_mlp",
        description="scikit-learn 8x8 digits (1,197 train / 300 val / 300 test), MLP 64-128-10",
        load_data=_digits_data, build_model=_mlp(64, (128,)),
        mean=0.3, std=0.38, scale=16.0,
        default_target=Target("val_error", 0.05), default_max_steps=2000,
        needs_data_dir=False))
    register(registry, Workload(
        name="mnist_mlp",
        description="MNIST (55,000 train / 5,000 val / 10,000 test), MLP 784-128-128-10",
        load_data=mnist_data, build_model=_mlp(784, (128, 128)),
        mean=MNIST_MEAN, std=MNIST_STD, scale=255.0,
        default_target=Target("val_error", 0.03), default_max_steps=20000))
    register(registry, Workload(
        name="mnist10k_mlp",
        description="MNIST official test files only (8,000 train / 2,000 val), MLP 784-128-128-10",
        load_data=mnist_t10k_data, build_model=_mlp(784, (128, 128)),
        mean=MNIST_MEAN, std=MNIST_STD, scale=255.0,
        default_target=Target("val_error", 0.06), default_max_steps=5000))
    for workload in paper_workloads():
        register(registry, workload)
    from trainers.nqm_workload import nqm_workloads
    for workload in nqm_workloads():
        register(registry, workload)
    return registry


WORKLOADS: Mapping[str, Workload] = MappingProxyType(_base_workloads())


def get_workload(name: str) -> Workload:
    try:
        return WORKLOADS[name]
    except KeyError:
        raise KeyError(f"unknown workload {name!r}; choose one of: {', '.join(sorted(WORKLOADS))}") from None
