"""Steps-to-result, exactly as Shallue et al. define it (../shared/spec/shallue-data-format.md).

Inputs are plain pandas frames (no torch, no database), so the CLI, the dashboard and the
importer of the published data share one implementation:

- `trials`: one row per trial with columns `cell_id`, `trial_id`, `trial_number`, `outcome`.
- `measurements`: one row per evaluation with columns `trial_id`, `step`, `examples`,
  `wall_seconds` and the metric columns (`val_error`, `val_loss`, ...).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# Diverged and crashed trials never win; a pruned trial stopped before it could win,
# so it has no row that beats the target, but its rows are legitimate.
ELIGIBLE_OUTCOMES = ("reached", "not_reached", "pruned")
RESULT_COLUMNS = ["cell_id", "steps_to_result", "examples_to_result", "seconds_to_result",
                  "winner_trial_id", "winner_trial_number"]


def beats(values: pd.Series | np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """Strict comparison; NaN never beats anything."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    values = np.asarray(values, dtype=float)
    with np.errstate(invalid="ignore"):
        return values < threshold if mode == "min" else values > threshold


def first_beating_rows(trials: pd.DataFrame, measurements: pd.DataFrame, *, metric: str,
                       threshold: float, mode: str = "min",
                       eligible: tuple[str, ...] = ELIGIBLE_OUTCOMES) -> pd.DataFrame:
    """Each trial's first evaluation that strictly beats the target (one row per trial
    that ever beats it), with the trial's `cell_id` and `trial_number`."""
    kept = trials.loc[trials["outcome"].isin(eligible), ["trial_id", "cell_id", "trial_number"]]
    rows = measurements.drop(columns=["cell_id", "trial_number"], errors="ignore").merge(
        kept, on="trial_id", how="inner")
    rows = rows.loc[beats(rows[metric], threshold, mode)]
    rows = rows.sort_values(["step", "trial_number"], kind="stable")
    return rows.drop_duplicates("trial_id", keep="first")


def steps_to_result(trials: pd.DataFrame, measurements: pd.DataFrame, *, metric: str,
                    threshold: float, mode: str = "min",
                    eligible: tuple[str, ...] = ELIGIBLE_OUTCOMES) -> pd.DataFrame:
    """One row per cell that has trials: the fewest steps at which any eligible trial
    first beat the target (ties broken by trial number), with that row's examples and
    wall seconds and the winning trial. Cells where no trial beat the target get NaN
    (no result: neither zero nor infinity)."""
    firsts = first_beating_rows(trials, measurements, metric=metric, threshold=threshold,
                                mode=mode, eligible=eligible)
    winners = (firsts.sort_values(["cell_id", "step", "trial_number"], kind="stable")
               .drop_duplicates("cell_id", keep="first"))
    winners = winners.rename(columns={
        "step": "steps_to_result", "examples": "examples_to_result",
        "wall_seconds": "seconds_to_result", "trial_id": "winner_trial_id",
        "trial_number": "winner_trial_number"})
    cells = pd.DataFrame({"cell_id": pd.unique(trials["cell_id"])})
    out = cells.merge(winners[[c for c in RESULT_COLUMNS if c in winners.columns]],
                      on="cell_id", how="left")
    for column in RESULT_COLUMNS:
        if column not in out.columns:
            out[column] = np.nan
    return out[RESULT_COLUMNS].sort_values("cell_id").reset_index(drop=True)


def result_or_none(value) -> float | None:
    """NaN (no result) as None, for JSON and SQL."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return None
    return value
