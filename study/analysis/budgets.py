"""Best validation result reachable under a training budget, per batch size.

A step budget S keeps the evaluations with step <= S; an example budget E keeps those
with examples <= E, where examples is the measurement's `examples` column when present
(exact under batch-size schedules) and batch_size * step otherwise. The best result of a
cell is the best metric value over the kept evaluations of its eligible trials (diverged
and failed trials excluded: a diverged run's early evaluations are not a usable model of
that setting). An epoch budget only probes the perfect-scaling regime; a step budget is
needed to see the rest (Shallue et al.).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from study.analysis.steps import ELIGIBLE_OUTCOMES

BUDGET_COLUMNS = ["cell_id", "batch_size", "budget", "best_value", "best_trial_id",
                  "best_step"]


def examples_seen(rows: pd.DataFrame) -> pd.Series:
    """Training examples at each evaluation: `examples` where present and not NaN,
    otherwise batch size * step (the row's own `row_batch_size` when known, else the
    cell's `batch_size`)."""
    # A per-row batch size (batch-size schedules) beats the cell's nominal one.
    batch = rows["batch_size"].astype(float)
    if "row_batch_size" in rows.columns:
        batch = rows["row_batch_size"].astype(float).fillna(batch)
    fallback = batch * rows["step"].astype(float)
    if "examples" not in rows.columns:
        return fallback
    return rows["examples"].astype(float).fillna(fallback)


def _eligible_rows(trials: pd.DataFrame, measurements: pd.DataFrame, cells: pd.DataFrame,
                   metric: str, eligible: tuple[str, ...]) -> pd.DataFrame:
    kept = trials.loc[trials["outcome"].isin(eligible), ["trial_id", "cell_id"]]
    rows = measurements.rename(columns={"batch_size": "row_batch_size"})
    rows = rows.merge(kept, on="trial_id", how="inner")
    rows = rows.merge(cells[["cell_id", "batch_size"]], on="cell_id", how="inner")
    return rows.loc[rows[metric].notna()]


def _best_per_cell(rows: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    # Ties: the earliest step, then the earliest trial in the frame's order.
    ordered = rows.sort_values([metric, "step"], ascending=[mode == "min", True],
                               kind="stable")
    best = ordered.drop_duplicates("cell_id", keep="first")
    return best.rename(columns={metric: "best_value", "trial_id": "best_trial_id",
                                "step": "best_step"})


def best_under_budget(trials: pd.DataFrame, measurements: pd.DataFrame, cells: pd.DataFrame,
                      *, metric: str, budgets: float | Iterable[float], kind: str = "steps",
                      mode: str = "min",
                      eligible: tuple[str, ...] = ELIGIBLE_OUTCOMES) -> pd.DataFrame:
    """Best `metric` value per cell under each budget (long frame, BUDGET_COLUMNS).

    `kind="steps"`: budget in optimizer steps, rows with step <= budget.
    `kind="examples"`: budget in training examples, rows with examples <= budget.
    `mode="min"` for errors and losses, `"max"` for accuracies. Every cell appears for
    every budget; a cell with no kept evaluation has NaN `best_value`."""
    if kind not in ("steps", "examples"):
        raise ValueError(f"kind must be 'steps' or 'examples', not {kind!r}")
    rows = _eligible_rows(trials, measurements, cells, metric, eligible)
    spent = rows["step"].astype(float) if kind == "steps" else examples_seen(rows)
    parts = []
    for budget in np.atleast_1d(np.asarray(budgets, dtype=float)):
        best = _best_per_cell(rows.loc[spent <= budget], metric, mode)
        frame = cells[["cell_id", "batch_size"]].merge(
            best[["cell_id", "best_value", "best_trial_id", "best_step"]],
            on="cell_id", how="left")
        parts.append(frame.assign(budget=budget))
    out = pd.concat(parts, ignore_index=True)[BUDGET_COLUMNS]
    out = out.sort_values(["budget", "batch_size", "cell_id"], kind="stable")
    return out.reset_index(drop=True)


def best_under_step_budget(trials, measurements, cells, *, metric: str,
                           step_budget: float | Iterable[float], mode: str = "min") -> pd.DataFrame:
    """`best_under_budget` with a step budget (optimizer steps)."""
    return best_under_budget(trials, measurements, cells, metric=metric, budgets=step_budget,
                             kind="steps", mode=mode)


def best_under_example_budget(trials, measurements, cells, *, metric: str,
                              example_budget: float | Iterable[float],
                              mode: str = "min") -> pd.DataFrame:
    """`best_under_budget` with an example budget (training examples; epochs * dataset
    size for an epoch budget)."""
    return best_under_budget(trials, measurements, cells, metric=metric,
                             budgets=example_budget, kind="examples", mode=mode)
