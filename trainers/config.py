"""Typed, frozen descriptions of one trial and of what it produces.

`trainers` knows nothing of the database: the worker in `study` builds a `TrialConfig`,
hands it to `trainers.loop.run_trial`, and stores the `Measurement`s it streams back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Mapping

Outcome = Literal["reached", "not_reached", "diverged", "failed", "pruned"]
OUTCOMES: tuple[str, ...] = ("reached", "not_reached", "diverged", "failed", "pruned")

# Metrics every evaluation records; a target names one of them.
METRICS: dict[str, Literal["min", "max"]] = {
    "val_error": "min",
    "val_loss": "min",
    "val_accuracy": "max",
    "train_loss": "min",
}


@dataclass(frozen=True)
class Target:
    """`metric` strictly better than `threshold` (`<` when minimising, `>` when maximising)."""

    metric: str
    threshold: float

    @property
    def mode(self) -> Literal["min", "max"]:
        return METRICS[self.metric]

    def is_beaten_by(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value < self.threshold if self.mode == "min" else value > self.threshold

    def __str__(self) -> str:
        return f"{self.metric} {'<' if self.mode == 'min' else '>'} {self.threshold:g}"


def frozen_mapping(values: Mapping | None = None) -> Mapping:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs, resolved: no defaults are looked up later."""

    workload: str
    batch_size: int  # the initial batch size when a batch plan grows it
    optimizer: str
    schedule: str  # learning-rate schedule (trainers.schedules)
    hparams: Mapping[str, float | str] = field(default_factory=frozen_mapping)
    max_steps: int = 1000
    # Optional epoch budget on top of max_steps (the first one spent ends the trial).
    max_epochs: int | None = None
    # Batch-size plan (trainers.batch_schedules.BatchSizePlan fields other than the
    # initial batch size): mode, factor, milestones, max_batch_size, hybrid_increases.
    batch_plan: Mapping | None = None
    eval_every: int = 50
    target: Target = Target("val_error", 0.05)
    seed: int = 0
    device: str = "cpu"
    data_dir: str | None = None
    download: bool = False
    val_size: int | None = None  # validation examples carved from train; None: the default
    loader_workers: int = 8  # DataLoader worker processes (folder workloads only)
    # A trial whose mean training loss over an interval exceeds this multiple of its
    # first interval's loss (or is NaN/inf) has diverged.
    divergence_factor: float = 10.0
    eval_batch_size: int = 4096
    # "auto": bf16 autocast (and channels_last) on CUDA, fp32 on CPU; "fp32" everywhere.
    precision: str = "auto"
    # Probes recorded at each evaluation (trainers.probe_hooks.PROBES): "distance",
    # "norms", "noise_scale". Empty: none, and the loop runs no probe code at all.
    probes: tuple[str, ...] = ()
    # Gradient noise scale on one device: B_big = noise_scale_batches x B_small, by
    # accumulating that many consecutive steps' gradients; EMA factor of the estimates.
    noise_scale_batches: int = 10
    noise_scale_beta: float = 0.99
    # Where to save the final weights (a state_dict file), or None for no checkpoint;
    # `checkpoint_reached_only`: save only when the trial reached the target (a cell's
    # winner is always a reached trial). A checkpoint over `checkpoint_max_bytes` is not
    # written (the trial's result stands; its message says why).
    checkpoint_path: str | None = None
    checkpoint_reached_only: bool = True
    checkpoint_max_bytes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hparams", frozen_mapping(self.hparams))
        object.__setattr__(self, "probes", tuple(self.probes))  # JSON gives a list
        if self.batch_plan is not None:
            object.__setattr__(self, "batch_plan", frozen_mapping(self.batch_plan))

    def to_json_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["hparams"] = dict(self.hparams)
        out["batch_plan"] = dict(self.batch_plan) if self.batch_plan is not None else None
        out["target"] = {"metric": self.target.metric, "threshold": self.target.threshold}
        return out


@dataclass(frozen=True)
class Measurement:
    """One evaluation of a trial. `wall_seconds` counts training time only; evaluation
    time is `eval_seconds` (cumulative), so speed comparisons are not skewed by it."""

    step: int
    examples: int
    epoch: float
    wall_seconds: float
    eval_seconds: float
    learning_rate: float
    batch_size: int
    train_loss: float
    val_loss: float
    val_error: float
    extra: Mapping[str, float] = field(default_factory=frozen_mapping)

    def metric(self, name: str) -> float:
        if name == "val_accuracy":
            return 1.0 - self.val_error
        return getattr(self, name)


@dataclass(frozen=True)
class TrialResult:
    outcome: Outcome
    steps: int  # steps taken
    examples: int
    wall_seconds: float
    steps_to_result: int | None = None
    examples_to_result: int | None = None
    seconds_to_result: float | None = None
    best_metric: float | None = None
    message: str = ""
    checkpoint_path: str | None = None  # the final weights, when the config asked for them
