"""How steps-to-result depends on the number of trials per cell.

Shallue et al. note that their MNIST curves move slightly with which 100 trials are used.
Here each cell's steps-to-result is recomputed from its first N trials (by trial number,
i.e. in the order the search drew them) for several N: a curve that still falls at the
largest N says the search has not converged.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

from study.analysis.steps import steps_to_result

# Failed (crashed) trials are re-run with the same parameters, so they are not a draw of
# the search; every other outcome used up one trial of the budget.
COUNTED_OUTCOMES = ("reached", "not_reached", "pruned", "diverged")
SENSITIVITY_COLUMNS = ["n_trials", "cell_id", "n_used", "steps_to_result",
                       "examples_to_result", "winner_trial_id"]


def first_trials(trials: pd.DataFrame, n: int,
                 counted: tuple[str, ...] = COUNTED_OUTCOMES) -> pd.DataFrame:
    """The first `n` trials of each cell by `trial_number`, among those with an outcome
    in `counted` (pass `steps.ELIGIBLE_OUTCOMES` for "first N complete trials")."""
    kept = trials.loc[trials["outcome"].isin(counted)]
    kept = kept.sort_values(["cell_id", "trial_number"], kind="stable")
    return kept.groupby("cell_id", sort=False).head(n)


def steps_vs_trial_count(trials: pd.DataFrame, measurements: pd.DataFrame, *,
                         metric: str, threshold: float, counts: Iterable[int],
                         mode: str = "min",
                         counted: tuple[str, ...] = COUNTED_OUTCOMES) -> pd.DataFrame:
    """Long frame (SENSITIVITY_COLUMNS): for every N in `counts` and every cell, the exact
    steps-to-result from the cell's first N trials. `n_used` is how many trials the cell
    actually had (fewer than N when the cell is short of trials)."""
    cell_ids = pd.DataFrame({"cell_id": pd.unique(trials["cell_id"])})
    parts = []
    for n in sorted({int(c) for c in counts}):
        subset = first_trials(trials, n, counted)
        result = steps_to_result(subset, measurements, metric=metric, threshold=threshold,
                                 mode=mode)
        used = subset.groupby("cell_id").size().rename("n_used").reset_index()
        frame = cell_ids.merge(used, on="cell_id", how="left").merge(result, on="cell_id",
                                                                      how="left")
        parts.append(frame.assign(n_trials=n, n_used=frame["n_used"].fillna(0).astype(int)))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=SENSITIVITY_COLUMNS)
    return out[SENSITIVITY_COLUMNS].sort_values(["n_trials", "cell_id"]).reset_index(drop=True)


def relative_change(sensitivity: pd.DataFrame) -> pd.DataFrame:
    """Per cell and N, steps-to-result divided by the cell's value at the largest N
    (1.0 means the first N trials already give the final answer; NaN without a result)."""
    last = sensitivity.loc[sensitivity["n_trials"] == sensitivity["n_trials"].max(),
                           ["cell_id", "steps_to_result"]]
    out = sensitivity.merge(last.rename(columns={"steps_to_result": "final_steps"}),
                            on="cell_id", how="left")
    return out.assign(ratio_to_final=out["steps_to_result"] / out["final_steps"].replace(0, np.nan))
