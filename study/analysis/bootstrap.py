"""Bootstrap intervals for steps-to-result and examples-to-result per cell.

A cell's steps-to-result is the minimum over its trials of each trial's first step that
strictly beats the target (`study.analysis.steps`). To see how much that number depends on
which trials the search happened to draw, the cell's trials are resampled with replacement
and the exact steps-to-result is recomputed on every resample. Each trial's first-beating
step is computed once; a resample's result is then the NaN-aware minimum over the sampled
trials' first steps (ties broken by trial number, as in `steps.steps_to_result`).

Which trials are resampled (`pool`):
- `reached`, `not_reached`, `pruned`: eligible, as in `steps.ELIGIBLE_OUTCOMES`.
- `diverged`: resampled, but never win (no first-beating step). A diverged draw is a
  genuine outcome of sampling the search space, so a resample with more of them is a
  realistically worse search.
- `failed`: not resampled. A crash says nothing about the hyperparameters (the worker
  re-runs the trial with the same parameters).

Censored (pruned) trials: a pruned trial stopped once it had run more steps than the
cell's best so far without reaching the target, so it contributes "not reached by its
censoring step", i.e. no first-beating step. In the full sample that is exact: by
construction it could not beat the best at that time. In a resample that omits the trial
that set that bar, the pruned trial might have reached the target later and won, so that
resample's result can be overstated. Intervals are therefore biased upward (conservative)
only in that case, and never downward.

Interval ends use the empirical (inverted-CDF) percentile, so they are always step counts
that some resample produced. A resample with no result counts as worse than any step
count; an interval end that falls among those resamples has no finite value and is NaN
(read it with `fraction_no_result`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from study.analysis.steps import ELIGIBLE_OUTCOMES, first_beating_rows, steps_to_result

DEFAULT_POOL = ("reached", "not_reached", "pruned", "diverged")
SUMMARY_COLUMNS = ["cell_id", "n_trials", "steps_to_result", "examples_to_result",
                   "steps_median", "steps_low", "steps_high",
                   "examples_median", "examples_low", "examples_high", "fraction_no_result"]


@dataclass(frozen=True)
class BootstrapResult:
    """`summary`: one row per cell (SUMMARY_COLUMNS; steps in optimizer updates, examples
    in training examples). `steps` and `examples`: one row per resample, one column per
    cell id, NaN where that resample has no result (used to refit curves per resample)."""
    summary: pd.DataFrame
    steps: pd.DataFrame
    examples: pd.DataFrame


def trial_first_steps(trials: pd.DataFrame, measurements: pd.DataFrame, *, metric: str,
                      threshold: float, mode: str = "min",
                      pool: tuple[str, ...] = DEFAULT_POOL) -> pd.DataFrame:
    """One row per trial in `pool`: `cell_id`, `trial_id`, `trial_number` and the step,
    examples and wall seconds of its first evaluation strictly beating the target
    (`first_step`, `first_examples`, `first_seconds`; NaN when it never did, and always
    NaN for trials outside `steps.ELIGIBLE_OUTCOMES`)."""
    firsts = first_beating_rows(trials, measurements, metric=metric, threshold=threshold,
                                mode=mode, eligible=ELIGIBLE_OUTCOMES)
    firsts = firsts.reindex(columns=["trial_id", "step", "examples", "wall_seconds"])
    firsts.columns = ["trial_id", "first_step", "first_examples", "first_seconds"]
    kept = trials.loc[trials["outcome"].isin(pool), ["cell_id", "trial_id", "trial_number"]]
    out = kept.merge(firsts, on="trial_id", how="left")
    return out.sort_values(["cell_id", "trial_number"], kind="stable").reset_index(drop=True)


def resample_cell(first_steps: np.ndarray, first_examples: np.ndarray, *,
                  n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Steps and examples to result of `n_resamples` resamples (with replacement) of one
    cell's trials, given per trial (ordered by trial number) its first-beating step and
    examples (NaN: never beat). Returns two float arrays of length `n_resamples`."""
    n = len(first_steps)
    if n == 0:
        empty = np.full(n_resamples, np.nan)
        return empty, empty.copy()
    # Rank trials by (first step, trial number): the resample's winner is its lowest rank.
    # Trials that never beat the target get rank n, which means "no result".
    steps = np.where(np.isnan(first_steps), np.inf, first_steps)
    order = np.lexsort((np.arange(n), steps))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    rank[np.isnan(first_steps)] = n
    picks = rng.integers(0, n, size=(n_resamples, n))
    best = rank[picks].min(axis=1)
    winner = order[np.minimum(best, n - 1)]
    no_result = best == n
    return (np.where(no_result, np.nan, first_steps[winner]),
            np.where(no_result, np.nan, first_examples[winner]))


def percentile_or_nan(samples: np.ndarray, q: float) -> float:
    """Empirical (inverted-CDF) percentile `q` in [0, 100] with NaN ranked above every
    value; NaN when the percentile falls among the NaNs (the end is unbounded)."""
    ordered = np.where(np.isnan(samples), np.inf, samples)
    value = float(np.percentile(ordered, q, method="inverted_cdf"))
    return value if np.isfinite(value) else float("nan")


def _summarise(cell_id, n_trials: int, steps: np.ndarray, examples: np.ndarray,
               level: float) -> dict:
    tail = 50.0 * (1.0 - level)
    return {
        "cell_id": cell_id, "n_trials": n_trials,
        "steps_median": percentile_or_nan(steps, 50.0),
        "steps_low": percentile_or_nan(steps, tail),
        "steps_high": percentile_or_nan(steps, 100.0 - tail),
        "examples_median": percentile_or_nan(examples, 50.0),
        "examples_low": percentile_or_nan(examples, tail),
        "examples_high": percentile_or_nan(examples, 100.0 - tail),
        "fraction_no_result": float(np.mean(np.isnan(steps))),
    }


def bootstrap_steps_to_result(trials: pd.DataFrame, measurements: pd.DataFrame, *,
                              metric: str, threshold: float, mode: str = "min",
                              n_resamples: int = 1000, level: float = 0.95,
                              seed: int | np.random.Generator = 0,
                              pool: tuple[str, ...] = DEFAULT_POOL) -> BootstrapResult:
    """Steps-to-result and examples-to-result per cell with bootstrap intervals.

    The point estimates (`steps_to_result`, `examples_to_result`) are the exact values of
    `steps.steps_to_result`; `*_median`, `*_low`, `*_high` are the median and the central
    `level` percentile interval over `n_resamples` resamples of the cell's trials, and
    `fraction_no_result` the share of resamples in which no trial beat the target. `seed`
    (an int or a numpy Generator) makes the resamples reproducible; cells are resampled
    in sorted cell-id order from one generator."""
    rng = np.random.default_rng(seed)
    firsts = trial_first_steps(trials, measurements, metric=metric, threshold=threshold,
                               mode=mode, pool=pool)
    exact = steps_to_result(trials, measurements, metric=metric, threshold=threshold, mode=mode)
    rows, steps_columns, examples_columns = [], {}, {}
    for cell_id in sorted(pd.unique(trials["cell_id"])):
        cell = firsts.loc[firsts["cell_id"] == cell_id]
        steps, examples = resample_cell(cell["first_step"].to_numpy(float),
                                        cell["first_examples"].to_numpy(float),
                                        n_resamples=n_resamples, rng=rng)
        rows.append(_summarise(cell_id, len(cell), steps, examples, level))
        steps_columns[cell_id], examples_columns[cell_id] = steps, examples
    summary = pd.DataFrame(rows, columns=[c for c in SUMMARY_COLUMNS
                                          if c not in ("steps_to_result", "examples_to_result")])
    summary = summary.merge(exact[["cell_id", "steps_to_result", "examples_to_result"]],
                            on="cell_id", how="left")[SUMMARY_COLUMNS]
    return BootstrapResult(summary=summary, steps=pd.DataFrame(steps_columns),
                           examples=pd.DataFrame(examples_columns))
