"""Optimal hyperparameters vs batch size, edge checks, and the search-space scatter.

The optimal hyperparameters of a cell are those of its winning trial (the trial that set
its steps-to-result). Effective learning rate = learning_rate / (1 - momentum) (Smith et
al.; a trial without momentum has momentum 0). Heuristics compared against: linear
y0 * B / B0 and square root y0 * sqrt(B / B0), from the smallest batch size B0.

Search space: dict name -> {"low", "high", "scale"} with scale "log", "reverse_log"
(1 - value sampled in log space: momentum), "linear" or "integer"; other entries (e.g.
{"scale": "choices"}) are not edge-checked.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from study.analysis.steps import first_beating_rows

EDGE_SCALES = ("log", "reverse_log", "linear", "integer")
SCATTER_CATEGORIES = ("reached", "not_reached", "diverged")
SCATTER_OUTCOMES = ("reached", "not_reached", "pruned", "diverged")


def _hparam(hparams, name: str, default=np.nan) -> float:
    if not isinstance(hparams, dict) or hparams.get(name) is None:
        return default
    return float(hparams[name])


def effective_learning_rate(learning_rate, momentum):
    """learning_rate / (1 - momentum), elementwise."""
    return np.asarray(learning_rate, dtype=float) / (1.0 - np.asarray(momentum, dtype=float))


def hparam_columns(trials: pd.DataFrame) -> pd.DataFrame:
    """`trial_id`, `learning_rate`, `momentum` (0 when absent), `one_minus_momentum`,
    `effective_learning_rate` and `base_learning_rate` (the sampled rate a scaling rule
    scaled into `learning_rate`; NaN without one) from each trial's `hparams` dict."""
    lr = trials["hparams"].map(lambda h: _hparam(h, "learning_rate"))
    momentum = trials["hparams"].map(lambda h: _hparam(h, "momentum", 0.0))
    base = trials["hparams"].map(lambda h: _hparam(h, "base_learning_rate"))
    return pd.DataFrame({
        "trial_id": trials["trial_id"].to_numpy(), "learning_rate": lr.to_numpy(float),
        "momentum": momentum.to_numpy(float), "one_minus_momentum": 1.0 - momentum.to_numpy(float),
        "effective_learning_rate": effective_learning_rate(lr, momentum),
        "base_learning_rate": base.to_numpy(float)})


def winning_hparams(results: pd.DataFrame, trials: pd.DataFrame,
                    cells: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with a result: the cell's columns, `winner_trial_id`,
    `steps_to_result` and the winner's `learning_rate`, `momentum`,
    `effective_learning_rate` (the cell's optimal hyperparameters).

    `results` is `steps.steps_to_result`'s output."""
    won = results.loc[results["winner_trial_id"].notna(),
                      ["cell_id", "winner_trial_id", "steps_to_result"]]
    table = cells.merge(won, on="cell_id", how="inner")
    values = hparam_columns(trials).rename(columns={"trial_id": "winner_trial_id"})
    table = table.merge(values, on="winner_trial_id", how="left")
    return table.sort_values("batch_size", kind="stable").reset_index(drop=True)


def fit_power_law(batch_sizes, values) -> tuple[float, float]:
    """Least-squares fit of log y = log c + k log B; returns (k, c). Non-finite or
    non-positive points are dropped; (NaN, NaN) with fewer than two batch sizes."""
    b = np.asarray(batch_sizes, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(b) & np.isfinite(y) & (b > 0) & (y > 0)
    if np.unique(b[keep]).size < 2:
        return float("nan"), float("nan")
    exponent, intercept = np.polyfit(np.log(b[keep]), np.log(y[keep]), 1)
    return float(exponent), float(np.exp(intercept))


def linear_heuristic(batch_sizes, y0: float, b0: float) -> np.ndarray:
    """y0 * B / B0: the linear scaling rule (Goyal et al.; Smith et al.)."""
    return y0 * np.asarray(batch_sizes, dtype=float) / b0


def sqrt_heuristic(batch_sizes, y0: float, b0: float) -> np.ndarray:
    """y0 * sqrt(B / B0): the square-root rule (Hoffer et al.)."""
    return y0 * np.sqrt(np.asarray(batch_sizes, dtype=float) / b0)


def hparam_scaling(winners: pd.DataFrame, *,
                   parameters=("learning_rate", "momentum", "effective_learning_rate"),
                   group_columns=("optimizer", "schedule")) -> pd.DataFrame:
    """Per group and parameter: the power-law `exponent` and `prefactor` of the winners'
    values vs batch size, `n_points`, and the heuristics' anchor `b0` (smallest batch
    size with a value) and `y0` (its value)."""
    keys = [c for c in group_columns if c in winners.columns]
    grouped = winners.groupby(keys, dropna=False, sort=True) if keys else [((), winners)]
    rows = []
    for key, group in grouped:
        for name in parameters:
            rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                         **_scaling_row(group, name)})
    return pd.DataFrame(rows)


def _scaling_row(group: pd.DataFrame, name: str) -> dict:
    valid = group.loc[group[name].notna()].sort_values("batch_size")
    exponent, prefactor = fit_power_law(valid["batch_size"], valid[name])
    anchor = valid.iloc[0] if len(valid) else None
    return {"parameter": name, "exponent": exponent, "prefactor": prefactor,
            "n_points": len(valid),
            "b0": float(anchor["batch_size"]) if anchor is not None else np.nan,
            "y0": float(anchor[name]) if anchor is not None else np.nan}


def position_in_range(value, low: float, high: float, scale: str) -> np.ndarray:
    """Where `value` lies between `low` (0) and `high` (1) measured in the parameter's
    sampling scale: log -> log(value); reverse_log -> log(1 - value); linear/integer ->
    value."""
    value = np.asarray(value, dtype=float)
    if scale == "log":
        return (np.log(value) - np.log(low)) / (np.log(high) - np.log(low))
    if scale == "reverse_log":
        return (np.log1p(-value) - np.log1p(-low)) / (np.log1p(-high) - np.log1p(-low))
    if scale in ("linear", "integer"):
        return (value - low) / (high - low)
    raise ValueError(f"scale must be one of {EDGE_SCALES}, not {scale!r}")


def edge_check(winners: pd.DataFrame, search_space: dict, *,
               tolerance: float = 0.05) -> pd.DataFrame:
    """One row per (cell, searched parameter) of the winners: `value`, `position` in
    [0, 1] of the search range in the parameter's scale, and `near_low` / `near_high` /
    `at_edge` when within `tolerance` (default 5%) of a bound. A winner at the edge means
    the search space may have cut off the true optimum. Under a learning-rate scaling rule
    the range is the sampled `base_learning_rate`'s, so that is what is checked."""
    rows = []
    for name, spec in search_space.items():
        if spec.get("scale") not in EDGE_SCALES or name not in winners.columns:
            continue
        values = winners[name].astype(float)
        if name == "learning_rate" and "base_learning_rate" in winners.columns:
            values = winners["base_learning_rate"].astype(float).fillna(values)
        position = position_in_range(values, spec["low"], spec["high"], spec["scale"])
        rows.append(pd.DataFrame({
            "cell_id": winners["cell_id"].to_numpy(),
            "batch_size": winners["batch_size"].to_numpy(),
            "parameter": name, "value": values.to_numpy(float), "position": position,
            "near_low": position <= tolerance, "near_high": position >= 1.0 - tolerance}))
    columns = ["cell_id", "batch_size", "parameter", "value", "position", "near_low", "near_high"]
    out = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    return out.assign(at_edge=out["near_low"].astype(bool) | out["near_high"].astype(bool))


def search_space_scatter(trials: pd.DataFrame, measurements: pd.DataFrame,
                         results: pd.DataFrame, *, metric: str, threshold: float,
                         mode: str = "min") -> pd.DataFrame:
    """The learning rate vs (1 - momentum) scatter of every cell: one row per trial with
    `cell_id`, `trial_id`, `learning_rate`, `one_minus_momentum`,
    `effective_learning_rate`, `category` and `is_winner`.

    Categories: `reached` (some evaluation strictly beat the target), `diverged`, and
    `not_reached` for the rest, pruned trials included (they stopped before beating the
    target). Only finished trials are shown: failed (crashed) ones carry no information
    about their hyperparameters, running ones have no outcome yet, and an abandoned one
    is re-run with the same hyperparameters as a new trial."""
    shown = trials.loc[trials["outcome"].isin(SCATTER_OUTCOMES)]
    reached = set(first_beating_rows(shown, measurements, metric=metric, threshold=threshold,
                                     mode=mode)["trial_id"])
    category = np.where(shown["outcome"] == "diverged", "diverged",
                        np.where(shown["trial_id"].isin(reached), "reached", "not_reached"))
    out = shown[["cell_id", "trial_id"]].reset_index(drop=True).assign(category=category)
    out = out.merge(hparam_columns(shown), on="trial_id", how="left")
    winners = set(results["winner_trial_id"].dropna())
    return out.assign(is_winner=out["trial_id"].isin(winners))
