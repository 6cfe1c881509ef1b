"""The noisy quadratic model as a batchlab workload: `nqm`.

It needs no data and trains nothing: a trial's steps to the target come from the closed
forms of `trainers.nqm` (Zhang et al. 2019; spec/methods.md section 4), so a whole
campaign over batch sizes 2^2..2^20 and four update rules runs through the ordinary
campaign / worker / Optuna path in seconds. The four update rules (`Workload.optimizers`):

| optimizer        | hyperparameters               | closed form                          |
|------------------|-------------------------------|--------------------------------------|
| `sgd`            | learning_rate                 | plain SGD                            |
| `momentum`       | learning_rate, momentum       | heavy-ball momentum                  |
| `ema`            | learning_rate, ema_decay      | SGD with an EMA of the iterates      |
| `preconditioned` | learning_rate, precond_power  | SGD preconditioned by H^-p           |

The learning rate is constant (schedule `constant`): the closed forms assume it.

Steps-to-result semantics. batchlab's steps-to-result is the first *evaluated* step
whose metric strictly beats the target. The NQM is evaluated exactly at every step
(`eval_every = 1`), so a reached trial's result is the first step k with expected loss
L(k) < target, found by the notebook's binary search (which assumes L falls
monotonically). That is `trainers.nqm.nqm_steps_to_target` + 1: the notebook reports the
last step with L >= target (`batchlab nqm steps` prints the notebook's number).

Measurements: one per trial (each is one SQL transaction of the worker, and a campaign
must run in seconds), with train_loss = val_loss = the expected loss L(k) and val_error
NaN (the NQM has no classification error): at the result step for a reached trial (the
only row, so it is the first that beats the target), at the step budget for `not_reached`,
or at the first step where the loss exceeds `divergence_factor` x its initial value for
`diverged`. Learning curves and budgets of an NQM campaign are therefore sparse. Examples = steps x B;
epochs are 0 (the data are unlimited) and wall seconds 0 (nothing is trained).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from trainers.config import Measurement, Target, TrialConfig, TrialResult
from trainers.nqm import (DIMENSIONS, binary_search_steps, ema_second_moments,
                          expected_loss, momentum_second_moments, nqm_spectrum,
                          sgd_second_moments, step_and_noise)

NQM_OPTIMIZERS = {
    "sgd": ("learning_rate",),
    "momentum": ("learning_rate", "momentum"),
    "ema": ("learning_rate", "ema_decay"),
    "preconditioned": ("learning_rate", "precond_power"),
}
NQM_METRICS = ("train_loss", "val_loss")  # both mean the NQM's expected loss
DEFAULT_TARGET = Target("train_loss", 0.01)  # the notebook's default target loss


@dataclass(frozen=True)
class NqmPoint:
    """One hyperparameter setting of the NQM at one batch size (d = 10^4, binned)."""

    batch_size: float
    learning_rate: float
    momentum: float = 0.0
    ema_decay: float = 0.0
    precond_power: float = 0.0

    def loss_fn(self) -> Callable[[int], float]:
        """k -> expected loss after k constant-learning-rate steps from s_0 = 1."""
        h, counts = nqm_spectrum(DIMENSIONS)
        x, noise = step_and_noise(h, self.learning_rate, self.batch_size, self.precond_power)
        if self.momentum and self.ema_decay:
            raise ValueError("the NQM closed forms combine SGD with momentum or with an EMA, not both")
        if self.momentum:
            moments = lambda k: momentum_second_moments(x, noise, 1.0, k, self.momentum)
        elif self.ema_decay:
            moments = lambda k: ema_second_moments(x, noise, 1.0, k, self.ema_decay)
        else:
            moments = lambda k: sgd_second_moments(x, noise, 1.0, k)

        def loss(k: int) -> float:
            with np.errstate(over="ignore", invalid="ignore"):
                return expected_loss(h, moments(k), counts)
        return loss


def point_from_config(config: TrialConfig) -> NqmPoint:
    """The trial's NQM point; ValueError (the trial fails with that message) for an
    unknown optimizer, a missing hyperparameter or a schedule other than constant."""
    if config.optimizer not in NQM_OPTIMIZERS:
        raise ValueError(f"the NQM models optimizers {', '.join(NQM_OPTIMIZERS)}, not {config.optimizer!r}")
    if config.schedule != "constant":
        raise ValueError(f"the NQM closed forms assume a constant learning rate, not {config.schedule!r}")
    hp = {name: float(config.hparams[name]) for name in NQM_OPTIMIZERS[config.optimizer]}
    return NqmPoint(batch_size=float(config.batch_size), learning_rate=hp["learning_rate"],
                    momentum=hp.get("momentum", 0.0), ema_decay=hp.get("ema_decay", 0.0),
                    precond_power=hp.get("precond_power", 0.0))


def first_step_below(loss: Callable[[int], float], threshold: float, max_steps: int) -> int | None:
    """The first step k in [1, max_steps] with loss(k) < threshold (the binary search
    assumes the loss falls monotonically), or None when loss(max_steps) is not below it."""
    last_at_or_above = binary_search_steps(loss, threshold, max_steps + 1)
    return None if last_at_or_above is None else last_at_or_above + 1


def first_step_above(loss: Callable[[int], float], ceiling: float, max_steps: int) -> int:
    """The first step with loss > ceiling (or non-finite), for a run known to exceed it
    by max_steps: where a diverging trial is declared diverged."""
    low, high = 0, max_steps  # invariant: loss(low) <= ceiling, loss(high) exceeds it
    while low < high - 1:
        mid = (low + high) // 2
        value = loss(mid)
        if math.isfinite(value) and value <= ceiling:
            low = mid
        else:
            high = mid
    return high


def _measurement(step: int, loss_value: float, batch_size: int,
                 learning_rate: float) -> Measurement:
    value = loss_value if math.isfinite(loss_value) else float("nan")
    return Measurement(step=step, examples=step * batch_size, epoch=0.0, wall_seconds=0.0,
                       eval_seconds=0.0, learning_rate=learning_rate, batch_size=batch_size,
                       train_loss=value, val_loss=value, val_error=float("nan"))


def simulate(config: TrialConfig) -> tuple[TrialResult, list[Measurement]]:
    """One NQM trial in closed form (module docstring for the semantics)."""
    target = config.target
    if target.metric not in NQM_METRICS or target.mode != "min":
        raise ValueError(f"the NQM target is its expected loss ({' or '.join(NQM_METRICS)}), "
                         f"not {target.metric}")
    point = point_from_config(config)
    loss = point.loss_fn()
    batch_size = config.batch_size
    row = lambda k, value: _measurement(k, value, batch_size, point.learning_rate)
    reached_at = first_step_below(loss, target.threshold, config.max_steps)
    if reached_at is not None:
        final = row(reached_at, loss(reached_at))
        measurements = [final]
        result = TrialResult("reached", reached_at, reached_at * batch_size, 0.0,
                             steps_to_result=reached_at, examples_to_result=reached_at * batch_size,
                             seconds_to_result=None, best_metric=final.metric(target.metric))
        return result, measurements
    initial = loss(0)
    final_loss = loss(config.max_steps)
    ceiling = config.divergence_factor * initial
    if not (math.isfinite(final_loss) and final_loss <= ceiling):
        step = first_step_above(loss, ceiling, config.max_steps)
        return (TrialResult("diverged", step, step * batch_size, 0.0,
                            message=f"expected loss above {config.divergence_factor:g} x its "
                                    f"initial value at step {step}"), [row(step, loss(step))])
    best = final_loss if final_loss < initial else initial
    return (TrialResult("not_reached", config.max_steps, config.max_steps * batch_size, 0.0,
                        best_metric=best,
                        message=f"expected loss {final_loss:.4g} at the step budget"),
            [row(config.max_steps, final_loss)])


class _UnlimitedData:
    """The NQM samples its gradient noise: no dataset, and any batch size fits."""

    train_size = 2 ** 62

    def to(self, device) -> "_UnlimitedData":
        return self


def _no_data(options) -> _UnlimitedData:
    return _UnlimitedData()


def _no_model(options):
    raise ValueError("the NQM workload has no network: its trials are computed in closed form")


def nqm_workloads() -> list:
    """The `nqm` workload (registered in trainers.workloads)."""
    from trainers.workloads import Workload  # here: trainers.workloads imports this module
    return [Workload(
        name="nqm",
        description="noisy quadratic model (Zhang et al. 2019): d = 10^4, h_i = 1/i, closed-form "
                    "steps to target; optimizers sgd, momentum, ema, preconditioned",
        load_data=_no_data, build_model=_no_model, mean=0.0, std=1.0, scale=1.0,
        default_target=DEFAULT_TARGET, default_max_steps=100_000_000, needs_data_dir=False,
        simulate=simulate, optimizers=dict(NQM_OPTIMIZERS))]
