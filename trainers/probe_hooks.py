"""Probes recorded during training (methods.md 2.4 and 5), wired into the loop by one
small per-trial object, so that `trainers.loop` only calls three hooks.

`TrialProbes` is built only when `TrialConfig.probes` names at least one probe (the loop
then skips every hook: zero overhead when probes are off). Hooks:

- `before_all_reduce(model, local_count)`: data parallelism only; the rank's own mean
  gradient, before the gradients are summed over ranks (the small batch of the DDP
  two-batch estimator).
- `after_backward(model, global_count)`: the mean gradient of the global batch, before
  clipping and before the optimizer step (the parameters are still w_{t-1}).
- `extras(model)`: at each evaluation, the values that go into `Measurement.extra`.

Probes (names in `PROBES`):

- "distance": `distance_from_init` = ||w_t - w_0|| and `distance_per_layer` (parameter
  name -> norm), Hoffer et al.'s ultra-slow diffusion.
- "norms": `grad_norm` (global L2 norm of the last step's gradient, before clipping),
  `update_norm` (||w_t - w_{t-1}|| of the last step) and `param_norm` (||w_t||).
- "noise_scale": McCandlish et al.'s B_simple = tr(Sigma) / |G|^2 with the two-batch
  estimators, |G|^2 and tr(Sigma) smoothed by separate EMAs (`noise_scale_beta`).
  One device: B_small = the batch, B_big = n x B_small by accumulating the gradients
  of n consecutive steps (n = `noise_scale_batches`). Consecutive steps' gradients are
  taken at slightly different weights; like GPT-NeoX's `GradientNoiseScale`, this
  treats them as one big batch at the current weights (a small bias while the learning
  rate is small relative to the curvature). Under DDP: B_small = the per-rank batch
  (squared norms averaged over ranks), B_big = the global batch, every step.
  Recorded: `gns_b_simple`, `gns_grad_sq_norm`, `gns_trace_sigma` (per example, in
  squared loss units per parameter unit), once the first estimate exists.

Values that are not finite are left out of the extras (JSON columns on PostgreSQL
reject NaN); the loss and divergence checks report those trials anyway.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from trainers.config import TrialConfig
from trainers.probes.distance import distance_from_init, snapshot_parameters
from trainers.probes.noise_scale import NoiseScaleTracker, ddp_estimates, grad_sq_norm, two_batch_estimates

PROBES = ("distance", "norms", "noise_scale")


def check_probe_names(names) -> None:
    """Raise ValueError naming the first unknown probe."""
    for name in names:
        if name not in PROBES:
            raise ValueError(f"unknown probe {name!r}; choose from {', '.join(PROBES)}")


def _gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.grad is not None]


class _BigBatchAccumulator:
    """Gradients of n consecutive equal-size steps, summed example-weighted, and their
    mean small-batch squared norm; yields one two-batch estimate per n steps."""

    def __init__(self, n_batches: int):
        if n_batches < 2:
            raise ValueError(f"noise_scale_batches must be >= 2, got {n_batches}")
        self.n_batches = n_batches
        self._reset()

    def _reset(self) -> None:
        self.summed: list[torch.Tensor] | None = None
        self.small_sq_norms: list[torch.Tensor] = []
        self.batch_size = 0

    def add(self, grads: list[torch.Tensor], sq_norm: torch.Tensor, batch_size: int):
        """Fold in one step's mean gradient; returns an estimate every n-th step, else None.
        A batch of another size (an epoch's remainder, a batch-size plan) starts over:
        the estimator needs n equal small batches."""
        if batch_size != self.batch_size:
            self._reset()
            self.batch_size = batch_size
        if self.summed is None:
            self.summed = [g.detach().float().clone() for g in grads]
        else:
            for acc, g in zip(self.summed, grads):
                acc.add_(g.detach().float())
        self.small_sq_norms.append(sq_norm)
        if len(self.small_sq_norms) < self.n_batches:
            return None
        # Mean of equal-size mean gradients = the mean gradient of all n * B examples.
        big_sq = float(grad_sq_norm(self.summed)) / self.n_batches ** 2
        small_sq = float(torch.stack(self.small_sq_norms).mean())
        self._reset()
        return two_batch_estimates(small_sq, big_sq, batch_size, batch_size * self.n_batches)


class TrialProbes:
    """The probes of one trial; state lives here, never in modules (many trials run in
    one process)."""

    def __init__(self, model: nn.Module, probes: tuple[str, ...], *, noise_scale_batches: int = 10,
                 noise_scale_beta: float = 0.99, world_size: int = 1):
        check_probe_names(probes)
        self.probes, self.world_size = frozenset(probes), world_size
        self.initial = snapshot_parameters(model) if "distance" in self.probes else None
        self.tracker = NoiseScaleTracker(noise_scale_beta) if "noise_scale" in self.probes else None
        self.accumulator = (_BigBatchAccumulator(noise_scale_batches)
                            if self.tracker is not None and world_size == 1 else None)
        self.needs_grad_norm = bool(self.probes & {"norms", "noise_scale"})
        # w_{t-1}, copied into preallocated buffers before each step (no allocation per step).
        self.previous = ([torch.empty_like(p) for p in model.parameters()]
                         if "norms" in self.probes else None)
        self.last_grad_sq: torch.Tensor | None = None
        self._local_sq_norm: torch.Tensor | None = None
        self._local_count = 0

    def before_all_reduce(self, model: nn.Module, local_count: int, global_count: int) -> None:
        """DDP: squared norm of this rank's mean gradient (the loop's gradients are of
        loss_sum / global_count, so rescale by global_count / local_count)."""
        if self.tracker is None:
            return
        scale = global_count / max(local_count, 1)
        self._local_sq_norm = grad_sq_norm(_gradients(model)) * scale ** 2
        self._local_count = local_count

    def after_backward(self, model: nn.Module, global_count: int) -> None:
        """The global mean gradient, before clipping and before the step."""
        if self.previous is not None:
            with torch.no_grad():
                for buffer, p in zip(self.previous, model.parameters()):
                    buffer.copy_(p)
        if not self.needs_grad_norm:
            return
        grads = _gradients(model)
        self.last_grad_sq = grad_sq_norm(grads).detach()
        if self.tracker is None:
            return
        if self.accumulator is not None:
            estimate = self.accumulator.add(grads, self.last_grad_sq, global_count)
        else:
            estimate = self._ddp_estimate(global_count)
        if estimate is not None:
            self.tracker.update(estimate)

    def _ddp_estimate(self, global_count: int):
        """Per-rank vs global gradient; skipped for uneven per-rank batches (an epoch's
        remainder), where B_small would not be one number."""
        local = self._local_sq_norm.detach().clone()
        dist.all_reduce(local)  # sum of the ranks' squared norms -> their mean below
        if global_count % self.world_size or self._local_count * self.world_size != global_count:
            return None
        return ddp_estimates([float(local) / self.world_size], float(self.last_grad_sq),
                             self._local_count, self.world_size)

    def extras(self, model: nn.Module) -> dict:
        """What the probes add to the evaluation's `Measurement.extra`."""
        out: dict = {}
        if self.initial is not None:
            distance = distance_from_init(model, self.initial)
            out["distance_from_init"] = distance.total
            out["distance_per_layer"] = {k: v for k, v in distance.per_layer.items() if math.isfinite(v)}
        if "norms" in self.probes:
            out.update(self._norms(model))
        if self.tracker is not None and self.tracker.updates:
            out.update(gns_b_simple=self.tracker.b_simple, gns_grad_sq_norm=self.tracker.grad_sq_norm,
                       gns_trace_sigma=self.tracker.trace_sigma)
        return {k: v for k, v in out.items() if not isinstance(v, float) or math.isfinite(v)}

    @torch.no_grad()
    def _norms(self, model: nn.Module) -> dict:
        params = list(model.parameters())
        out = {"param_norm": math.sqrt(float(grad_sq_norm([p.detach() for p in params])))}
        if self.last_grad_sq is not None:
            out["grad_norm"] = math.sqrt(float(self.last_grad_sq))
            out["update_norm"] = math.sqrt(float(grad_sq_norm(
                [p.detach() - before for p, before in zip(params, self.previous)])))
        return out


def make_probes(config: TrialConfig, model: nn.Module, world_size: int = 1) -> TrialProbes | None:
    """The trial's probes, or None when the config asks for none (the loop then runs
    exactly as without this module)."""
    if not config.probes:
        return None
    return TrialProbes(model, tuple(config.probes), noise_scale_batches=config.noise_scale_batches,
                       noise_scale_beta=config.noise_scale_beta, world_size=world_size)
