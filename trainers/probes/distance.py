"""Distance of the weights from their initialization (Hoffer et al. 2017, methods.md 2.4).

During the initial high-learning-rate phase ||w_t - w_0|| grows like log t ("ultra-slow
diffusion"); `fit_log_growth` gives the slope b of d = a + b ln t per batch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DistanceFromInit:
    """`total`: ||w_t - w_0||_2 over all parameters; `per_layer`: parameter name -> norm."""

    total: float
    per_layer: dict[str, float]


@dataclass(frozen=True)
class LogFit:
    """Least-squares fit d = intercept + slope * ln(step) (natural log, steps >= 1)."""

    intercept: float
    slope: float


def snapshot_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters (w_0), by name, on their own device."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def distance_from_init(model: nn.Module, initial: Mapping[str, torch.Tensor]) -> DistanceFromInit:
    """||w_t - w_0|| globally and per parameter tensor, in parameter units.

    Only parameters named in `initial` are compared (so a snapshot of a subset works);
    norms accumulate in float64 so that a tiny drift is not lost in rounding.
    """
    per_layer = {}
    for name, param in model.named_parameters():
        if name in initial:
            diff = param.detach().double() - initial[name].to(param.device).double()
            per_layer[name] = float(diff.norm())
    total = math.sqrt(sum(d * d for d in per_layer.values()))
    return DistanceFromInit(total=total, per_layer=per_layer)


def fit_log_growth(steps: Sequence[float], distances: Sequence[float]) -> LogFit:
    """Fit d = a + b ln t by least squares over the given (step, distance) pairs."""
    t = np.asarray(steps, dtype=np.float64)
    d = np.asarray(distances, dtype=np.float64)
    if t.shape != d.shape or t.ndim != 1 or t.size < 2:
        raise ValueError("need two 1-D sequences of equal length >= 2")
    if np.any(t < 1):
        raise ValueError("steps must be >= 1 (log t is undefined at 0)")
    design = np.stack([np.ones_like(t), np.log(t)], axis=1)  # (n, 2)
    (intercept, slope), *_ = np.linalg.lstsq(design, d, rcond=None)
    return LogFit(intercept=float(intercept), slope=float(slope))
