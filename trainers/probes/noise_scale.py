"""Gradient noise scale (McCandlish et al. 2018, App. A.1; spec/methods.md section 5).

For a mean gradient over B i.i.d. examples, E|G_B|^2 = |G|^2 + tr(Sigma)/B. Two batch
sizes give two equations whose solution is an unbiased estimate of |G|^2 and of
tr(Sigma) (called S). Their ratio is biased, so each is smoothed by its own EMA and
B_simple = EMA(S) / EMA(|G|^2) (as in GPT-NeoX's `GradientNoiseScale`).

Squared norms are in (loss units / parameter unit)^2 of the *mean* per-example loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

# A loss closure maps one batch to the workload's (summed loss, example count, ...):
# summed rather than mean so that batches combine exactly (Workload.loss's contract).
LossClosure = Callable[[object], tuple]


@dataclass(frozen=True)
class NoiseEstimate:
    """One unbiased two-batch estimate: `grad_sq_norm` ~ |G|^2, `trace_sigma` ~ tr(Sigma)."""

    grad_sq_norm: float
    trace_sigma: float


def two_batch_estimates(sq_norm_small: float, sq_norm_big: float,
                        batch_small: int, batch_big: int) -> NoiseEstimate:
    """Unbiased |G|^2 and tr(Sigma) from squared norms of mean gradients at two batch sizes.

    |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    S     = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)
    """
    if not 0 < batch_small < batch_big:
        raise ValueError(f"need 0 < batch_small < batch_big, got {batch_small} and {batch_big}")
    grad_sq = (batch_big * sq_norm_big - batch_small * sq_norm_small) / (batch_big - batch_small)
    trace = (sq_norm_small - sq_norm_big) / (1.0 / batch_small - 1.0 / batch_big)
    return NoiseEstimate(grad_sq_norm=float(grad_sq), trace_sigma=float(trace))


def ddp_estimates(local_sq_norms: Sequence[float] | torch.Tensor, global_sq_norm: float,
                  local_batch_size: int, world_size: int) -> NoiseEstimate:
    """Two-batch estimates in data-parallel training.

    `local_sq_norms`: |G_local|^2 of each device's mean gradient, taken before the
    all-reduce (or a one-element sequence holding their mean, if already all-reduced);
    averaging them lowers the variance of the small-batch term. `global_sq_norm`:
    |G|^2 of the all-reduced mean gradient. B_small = local batch, B_big = world * local.
    """
    values = torch.as_tensor(local_sq_norms, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("local_sq_norms is empty")
    return two_batch_estimates(float(values.mean()), global_sq_norm,
                               local_batch_size, local_batch_size * world_size)


class NoiseScaleTracker:
    """EMA-smoothed |G|^2 and tr(Sigma), and their ratio B_simple (in examples).

    Each estimate is smoothed separately with `beta` and Adam-style bias correction,
    avg / (1 - beta^k), where k counts accepted updates (GPT-NeoX counts every step,
    which under-corrects after skipped ones). Non-finite estimates are skipped.
    State is per instance: one tracker per trial.
    """

    def __init__(self, beta: float = 0.99):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.updates = 0
        self.skipped = 0
        self._grad_sq_avg = 0.0
        self._trace_avg = 0.0

    def update(self, estimate: NoiseEstimate) -> bool:
        """Fold one estimate in; returns False (and changes nothing) if it is not finite."""
        if not (math.isfinite(estimate.grad_sq_norm) and math.isfinite(estimate.trace_sigma)):
            self.skipped += 1
            return False
        self._grad_sq_avg = self.beta * self._grad_sq_avg + (1 - self.beta) * estimate.grad_sq_norm
        self._trace_avg = self.beta * self._trace_avg + (1 - self.beta) * estimate.trace_sigma
        self.updates += 1
        return True

    def _corrected(self, average: float) -> float:
        if self.updates == 0:
            return math.nan
        return average / (1.0 - self.beta ** self.updates)

    @property
    def grad_sq_norm(self) -> float:
        """Bias-corrected EMA of the |G|^2 estimates (NaN before the first update)."""
        return self._corrected(self._grad_sq_avg)

    @property
    def trace_sigma(self) -> float:
        """Bias-corrected EMA of the tr(Sigma) estimates (NaN before the first update)."""
        return self._corrected(self._trace_avg)

    @property
    def b_simple(self) -> float:
        """EMA(S) / EMA(|G|^2) in examples; NaN before the first update or if EMA(|G|^2) = 0."""
        grad_sq = self.grad_sq_norm
        if self.updates == 0 or grad_sq == 0.0:
            return math.nan
        return self.trace_sigma / grad_sq


@dataclass
class GradientNormSample:
    """Squared gradient norms from n small batches on one device.

    `sq_norm_small`: mean over the n batches of |G_small|^2; `sq_norm_big`: |G_big|^2
    of the accumulated gradient; `big_grad`: that gradient (mean loss over all
    n * batch_small examples), one tensor per trainable parameter, reusable for a step.
    """

    sq_norm_small: float
    sq_norm_big: float
    batch_small: int
    batch_big: int
    big_grad: list[torch.Tensor]

    def estimates(self) -> NoiseEstimate:
        return two_batch_estimates(self.sq_norm_small, self.sq_norm_big,
                                   self.batch_small, self.batch_big)


def grad_sq_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of a list of tensors, accumulated in at least float32."""
    return sum(g.to(torch.promote_types(g.dtype, torch.float32)).pow(2).sum() for g in grads)


def accumulate_gradient_norms(model: nn.Module, loss_closure: LossClosure,
                              batches: Sequence[object]) -> GradientNormSample:
    """Small-batch squared norms and the accumulated big-batch gradient (B_big = n B_small).

    `loss_closure(batch)` runs the model and returns (summed loss, count, ...) as
    `Workload.loss` does. Gradients are taken with `torch.autograd.grad`, so the
    parameters' `.grad` fields are left untouched. All batches must hold the same count.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if len(batches) < 2:
        raise ValueError("need at least 2 small batches to form a bigger one")
    big = [torch.zeros_like(p) for p in params]
    small_sq_norms, counts = [], []
    for batch in batches:
        summed, count = loss_closure(batch)[:2]
        # Gradient of the summed loss; parameters the loss does not use get zeros.
        grads = torch.autograd.grad(summed, params, materialize_grads=True)
        counts.append(int(count))
        small_sq_norms.append(grad_sq_norm(grads) / count ** 2)
        for acc, g in zip(big, grads):
            acc.add_(g)
    if len(set(counts)) != 1:
        raise ValueError(f"small batches must have equal sizes, got {sorted(set(counts))}")
    total = sum(counts)
    big = [g / total for g in big]
    return GradientNormSample(
        sq_norm_small=float(torch.stack(small_sq_norms).mean()),
        sq_norm_big=float(grad_sq_norm(big)),
        batch_small=counts[0], batch_big=total, big_grad=big)
