"""Distance of the weights from their initialization (Hoffer et al. 2017, methods.md 2.4).

During the initial high-learning-rate phase ||w_t - w_0|| grows like log t ("ultra-slow
diffusion"). This module measures the distance during training (`trainers.probe_hooks`
stores it with every evaluation); the fit d = a + b ln t over the stored measurements is
`study.analysis.distance.fit_distance_growth` (numpy only, so the dashboard can use it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class DistanceFromInit:
    """`total`: ||w_t - w_0||_2 over all parameters; `per_layer`: parameter name -> norm."""

    total: float
    per_layer: dict[str, float]


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
