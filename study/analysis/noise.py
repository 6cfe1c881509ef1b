"""Measured gradient noise scale vs the fitted critical batch size (McCandlish et al. 2018).

McCandlish et al. predict B_crit ~ B_noise, and B_simple = tr(Sigma) / |G|^2 equals
B_noise when the Hessian is a multiple of the identity. The training probe records
B_simple at each evaluation (`gns_b_simple` in bl_measurements.extra); B_simple grows
as the loss falls, so the value to compare is the one near the end of training: the
median over the last part of each cell's winning trial. Frames only (no torch).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from study.analysis.scaling import GROUP_COLUMNS

B_SIMPLE_KEY = "gns_b_simple"


def _extra_value(extra, key: str) -> float:
    """`key` of a measurement's extra (a dict, or its JSON text), NaN when absent."""
    if isinstance(extra, str):
        extra = json.loads(extra) if extra else {}
    value = extra.get(key) if isinstance(extra, dict) else None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if np.isfinite(value) else float("nan")


def _probe_column(measurements: pd.DataFrame, key: str) -> pd.Series:
    if key in measurements.columns:
        return pd.to_numeric(measurements[key], errors="coerce")
    if "extra" not in measurements.columns:
        return pd.Series(np.nan, index=measurements.index)
    return measurements["extra"].map(lambda e: _extra_value(e, key))


def measured_b_simple(results: pd.DataFrame, measurements: pd.DataFrame, *,
                      last_fraction: float = 0.5, key: str = B_SIMPLE_KEY) -> pd.DataFrame:
    """Per cell with a winner: the median of `key` over the winner's measurements in the
    last `last_fraction` of its steps (step >= (1 - last_fraction) x its last step).

    `results`: cell_id, winner_trial_id (e.g. `steps.steps_to_result` or bl_cell_results);
    `measurements`: trial_id, step and either a `key` column or `extra` (dict or JSON).
    Returns cell_id, winner_trial_id, b_simple (examples; NaN if never recorded), n_values.
    """
    if not 0 < last_fraction <= 1:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}")
    winners = results.loc[results["winner_trial_id"].notna(), ["cell_id", "winner_trial_id"]]
    values = measurements[["trial_id", "step"]].assign(value=_probe_column(measurements, key))
    rows = []
    for cell_id, trial_id in winners.itertuples(index=False):
        trial = values.loc[values["trial_id"] == trial_id]
        late = trial.loc[trial["step"] >= (1.0 - last_fraction) * trial["step"].max(), "value"].dropna()
        rows.append({"cell_id": cell_id, "winner_trial_id": int(trial_id),
                     "b_simple": float(late.median()) if len(late) else float("nan"),
                     "n_values": int(len(late))})
    return pd.DataFrame(rows, columns=["cell_id", "winner_trial_id", "b_simple", "n_values"])


def compare_with_b_crit(measured: pd.DataFrame, cells: pd.DataFrame,
                        fits: pd.DataFrame) -> pd.DataFrame:
    """One row per (optimizer, schedule) group: the median measured B_simple over its
    cells (`b_simple`), the fitted `b_crit` (`scaling.fit_scaling`), their ratio
    `b_simple / b_crit` (McCandlish et al.: of order 1), and `n_cells` with a value."""
    table = cells.merge(measured[["cell_id", "b_simple"]], on="cell_id", how="inner")
    keys = [c for c in GROUP_COLUMNS if c in table.columns and c in fits.columns]
    rows = []
    for key, group in table.groupby(keys, sort=True) if keys else [((), table)]:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        match = fits
        for column, value in row.items():
            match = match.loc[match[column] == value]
        b_crit = float(match["b_crit"].iloc[0]) if len(match) else float("nan")
        finite = group["b_simple"].dropna()
        b_simple = float(finite.median()) if len(finite) else float("nan")
        row.update(b_simple=b_simple, b_crit=b_crit, n_cells=int(len(finite)),
                   ratio=b_simple / b_crit if np.isfinite(b_crit) and b_crit > 0 else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows, columns=[*keys, "b_simple", "b_crit", "ratio", "n_cells"])
