"""Batch-size scaling rules as pure functions (methods.md 1.1, 2.1, 2.3, 6.3).

Units: learning rates are per update (the optimizer's `lr`), batch sizes and training
set sizes are in examples, epochs are passes over the training set.
"""
from __future__ import annotations

import math
from typing import Iterable


def noise_scale(learning_rate: float, train_size: int, batch_size: int,
                momentum: float = 0.0, *, exact: bool = True) -> float:
    """Smith & Le's SGD noise scale g = lr / (1 - m) * (N / B - 1).

    With `exact=False`, the B << N approximation lr * N / (B (1 - m)). Units: those of
    the learning rate (the cost is summed over examples, so N / B is dimensionless).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    ratio = train_size / batch_size
    return learning_rate / (1.0 - momentum) * (ratio - 1.0 if exact else ratio)


def linear_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """Goyal et al.'s linear rule: lr grows by the same factor k = B / B_base as the batch."""
    return base_lr * batch_size / base_batch_size


def sqrt_scaled_lr(base_lr: float, batch_size: int, base_batch_size: int) -> float:
    """Hoffer et al.'s rule: lr grows by sqrt(B / B_base), keeping the update covariance."""
    return base_lr * math.sqrt(batch_size / base_batch_size)


def equal_noise_batch_size(batch_size: float, learning_rate: float, momentum: float,
                           new_learning_rate: float, new_momentum: float) -> float:
    """The batch size that keeps g ~ lr N / (B (1 - m)) when (lr, m) change: B ~ lr / (1 - m).

    Smith et al.: 128 at (0.1, 0.9) -> 640 at (0.5, 0.9) -> 3200 at (0.5, 0.98).
    """
    old = learning_rate / (1.0 - momentum)
    new = new_learning_rate / (1.0 - new_momentum)
    return batch_size * new / old


def lost_epochs(batch_size: int, train_size: int, momentum: float) -> float:
    """Smith et al. App. A: epochs the momentum accumulator lags after the noise scale
    changes, B / (N (1 - m))."""
    return batch_size / (train_size * (1.0 - momentum))


def regime_adaptation_factor(batch_size: int, base_batch_size: int) -> int:
    """Hoffer et al.'s regime adaptation multiplier ceil(B / B_base) (as in their code)."""
    return math.ceil(batch_size / base_batch_size)


def adapt_regime(epochs: float, milestones: Iterable[float], batch_size: int,
                 base_batch_size: int) -> tuple[float, tuple[float, ...]]:
    """Stretch a schedule (total epochs and every milestone, in epochs) by
    `regime_adaptation_factor`, so the large batch takes as many updates as the small."""
    factor = regime_adaptation_factor(batch_size, base_batch_size)
    return epochs * factor, tuple(m * factor for m in milestones)


def goyal_warmup_start_factor(batch_size: int, base_batch_size: int) -> float:
    """The `warmup_start_factor` for Goyal et al.'s warm-up: 1/k with k = B / B_base,
    i.e. start at the small-batch lr; 1 (no ramp) when B <= B_base."""
    return min(1.0, base_batch_size / batch_size)
