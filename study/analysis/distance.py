"""Hoffer et al.'s ultra-slow diffusion on stored measurements (methods.md 2.4): the
distance of the weights from their initialization, d_t = ||w_t - w_0||, grows like
log t during the initial learning-rate phase; fit d = a + b ln t there and report b.

numpy and pandas only (never torch), so the dashboard and `batchlab analyze` use it.

Input: one trial's measurements as stored (`db.queries.measurements` / the dashboard's
`CampaignData.measurements`): columns `step`, `learning_rate` and either `extra` (the
probes' JSON, a dict or its text, written by `trainers.probe_hooks` when the campaign
has `probes = ["distance", ...]`: `distance_from_init` is the global L2 distance,
`distance_per_layer` maps parameter name -> distance) or a `distance_from_init` column.

Which points are fitted (`initial_lr_phase`): every evaluation with step >= 1 (log t is
undefined at 0) up to, not including, the first evaluation after the learning rate has
reached its peak at which the recorded rate is below (1 - drop_tolerance) x that peak.
So a constant schedule uses all evaluations; a step schedule (Hoffer's regimes) the
evaluations before its first decay; warm-up steps before the peak are included; a smooth
decay (linear, cosine, polynomial) the stretch in which the rate is still within
`drop_tolerance` (1 %) of its peak. `end_step` overrides the rule (points with
step <= end_step). The natural log is used: b is the growth of d per e-fold of steps.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

GLOBAL = "all"  # the `layer` label of the global distance


@dataclass(frozen=True)
class DistanceFit:
    """d = intercept + slope * ln(step) by least squares over `n_points` evaluations
    (steps `first_step`..`last_step`); `r_squared`: coefficient of determination (NaN
    when the distances are all equal); `phase_end_step`: the first evaluation step
    outside the initial-learning-rate phase (None when the phase lasts the whole trial);
    `layer`: "all" for the global distance, else a parameter name."""

    intercept: float
    slope: float
    r_squared: float
    n_points: int
    first_step: int
    last_step: int
    phase_end_step: int | None = None
    layer: str = GLOBAL

    def predict(self, steps) -> np.ndarray:
        """The fitted distance at `steps` (>= 1)."""
        return self.intercept + self.slope * np.log(np.asarray(steps, dtype=np.float64))


def fit_log_growth(steps: Sequence[float], distances: Sequence[float]) -> DistanceFit:
    """Fit d = a + b ln t by least squares over the given (step, distance) pairs (all of
    them: choose the phase first). Raises ValueError for fewer than 2 points or a step < 1."""
    t = np.asarray(steps, dtype=np.float64)
    d = np.asarray(distances, dtype=np.float64)
    if t.shape != d.shape or t.ndim != 1 or t.size < 2:
        raise ValueError("need two 1-D sequences of equal length >= 2")
    if np.any(t < 1):
        raise ValueError("steps must be >= 1 (log t is undefined at 0)")
    if np.unique(t).size < 2:
        raise ValueError("need at least two distinct steps")
    design = np.stack([np.ones_like(t), np.log(t)], axis=1)  # (n, 2)
    (intercept, slope), *_ = np.linalg.lstsq(design, d, rcond=None)
    residual = d - design @ np.array([intercept, slope])
    total = float(np.sum((d - d.mean()) ** 2))
    r_squared = 1.0 - float(np.sum(residual ** 2)) / total if total > 0 else float("nan")
    return DistanceFit(intercept=float(intercept), slope=float(slope), r_squared=r_squared,
                       n_points=int(t.size), first_step=int(t.min()), last_step=int(t.max()))


def _extra(value) -> dict:
    if isinstance(value, str):
        return json.loads(value) if value else {}
    return value if isinstance(value, dict) else {}


def distance_series(measurements: pd.DataFrame, layer: str = GLOBAL) -> pd.DataFrame:
    """(step, learning_rate, distance) of one trial, step ascending, rows without a
    finite distance dropped. `layer`: "all" (global) or a parameter name."""
    frame = measurements.sort_values("step")
    if layer == GLOBAL and "distance_from_init" in frame.columns:
        distance = pd.to_numeric(frame["distance_from_init"], errors="coerce")
    elif "extra" in frame.columns:
        extras = frame["extra"].map(_extra)
        if layer == GLOBAL:
            distance = extras.map(lambda e: e.get("distance_from_init"))
        else:
            distance = extras.map(lambda e: (e.get("distance_per_layer") or {}).get(layer))
        distance = pd.to_numeric(distance, errors="coerce")
    else:
        distance = pd.Series(np.nan, index=frame.index)
    lr = frame["learning_rate"] if "learning_rate" in frame.columns else pd.Series(np.nan, index=frame.index)
    out = pd.DataFrame({"step": frame["step"].astype(int).to_numpy(),
                        "learning_rate": pd.to_numeric(lr, errors="coerce").to_numpy(),
                        "distance": distance.to_numpy(dtype=float)})
    return out.loc[np.isfinite(out["distance"])].reset_index(drop=True)


def layer_names(measurements: pd.DataFrame) -> list[str]:
    """Parameter names with a per-layer distance in the trial's extras, in stored order."""
    names: dict[str, None] = {}
    if "extra" in measurements.columns:
        for value in measurements["extra"]:
            names.update(dict.fromkeys((_extra(value).get("distance_per_layer") or {})))
    return list(names)


def initial_lr_phase(steps, learning_rates, *, drop_tolerance: float = 0.01) -> tuple[np.ndarray, int | None]:
    """(mask of the evaluations in the initial-learning-rate phase, the step at which the
    phase ended or None). See the module docstring for the rule; NaN rates (not recorded)
    count as constant."""
    steps = np.asarray(steps, dtype=np.float64)
    lr = np.asarray(learning_rates, dtype=np.float64)
    inside = steps >= 1
    finite = np.isfinite(lr)
    if not finite.any():
        return inside, None
    peak = float(np.max(lr[finite]))
    reached = np.maximum.accumulate(np.where(finite, lr, -np.inf)) >= peak * (1 - 1e-12)
    dropped = reached & finite & (lr < (1.0 - drop_tolerance) * peak)
    if not dropped.any():
        return inside, None
    first = int(np.argmax(dropped))
    mask = inside & (np.arange(len(steps)) < first)
    return mask, int(steps[first])


def fit_distance_growth(measurements: pd.DataFrame, *, layer: str = GLOBAL,
                        end_step: int | None = None, drop_tolerance: float = 0.01) -> DistanceFit | None:
    """Fit d = a + b ln t to one trial's stored distances over its initial-learning-rate
    phase (or up to `end_step`). None when fewer than 3 distinct steps qualify (no
    distance recorded: the campaign had no "distance" probe)."""
    series = distance_series(measurements, layer)
    if series.empty:
        return None
    if end_step is not None:
        mask, phase_end = (series["step"] >= 1) & (series["step"] <= end_step), None
        mask = mask.to_numpy()
    else:
        mask, phase_end = initial_lr_phase(series["step"], series["learning_rate"],
                                           drop_tolerance=drop_tolerance)
    chosen = series.loc[mask]
    if chosen["step"].nunique() < 3:
        return None
    fit = fit_log_growth(chosen["step"], chosen["distance"])
    return DistanceFit(fit.intercept, fit.slope, fit.r_squared, fit.n_points, fit.first_step,
                       fit.last_step, phase_end, layer)


def distance_fits(measurements: pd.DataFrame, *, per_layer: bool = True,
                  drop_tolerance: float = 0.01) -> pd.DataFrame:
    """One row per fit of one trial (the global distance first, then each layer when
    `per_layer`): layer, intercept, slope, r_squared, n_points, first_step, last_step,
    phase_end_step. Empty when the trial recorded no distance."""
    layers = [GLOBAL] + (layer_names(measurements) if per_layer else [])
    rows = []
    for layer in layers:
        fit = fit_distance_growth(measurements, layer=layer, drop_tolerance=drop_tolerance)
        if fit is not None:
            rows.append(dataclasses.asdict(fit))
    columns = ["layer", "intercept", "slope", "r_squared", "n_points", "first_step", "last_step",
               "phase_end_step"]
    return pd.DataFrame(rows, columns=columns)[columns] if rows else pd.DataFrame(columns=columns)


def fit_line(fit: DistanceFit, n: int = 50) -> pd.DataFrame:
    """(step, distance) points of the fitted line over the fitted steps, log-spaced, for
    figures."""
    steps = np.geomspace(max(fit.first_step, 1), max(fit.last_step, fit.first_step + 1), n)
    return pd.DataFrame({"step": steps, "distance": fit.predict(steps)})
