"""The steps-vs-batch-size curve S(B) = S_min (1 + B_crit / B) and the three regimes.

Equivalent form (McCandlish et al. 2018): with examples E = S B, E_min = S_min B_crit and
B_crit = E_min / S_min, every point of the curve satisfies (S/S_min - 1)(E/E_min - 1) = 1.
S_min is the fewest steps at unlimited batch size (optimizer updates), E_min the fewest
training examples at a vanishing batch size, B_crit (examples per update) the batch size
where the curve turns from perfect scaling to diminishing returns.

Regime rule (`classify_regimes`), per (optimizer, schedule) group, batch sizes ascending:
- maximal data parallelism: from the first batch size p on which no batch size's steps
  interval lies wholly below a smaller one's (no reduction beyond noise between any two of
  them: neighbours alone could each overlap while the steps still fall many-fold) to the
  largest batch size; needs at least one such pair.
- perfect scaling: the remaining batch sizes with B <= perfect_fraction * B_crit (default
  1/4). There the fitted curve is within 25% of perfect scaling (S(B) B / E_min =
  1 + B / B_crit <= 1.25) and its local log-log slope -B_crit / (B + B_crit) is <= -0.8.
- diminishing returns: the rest.
- undetermined: the rest when no curve could be fitted (fewer than two batch sizes with a
  result): without B_crit nothing separates perfect scaling from diminishing returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

GROUP_COLUMNS = ("optimizer", "schedule")
# B_crit is kept within this factor outside the observed batch sizes: beyond it the data
# are indistinguishable from pure perfect scaling (B_crit -> inf) or a flat curve (-> 0).
_B_CRIT_RANGE = 1e6


@dataclass(frozen=True)
class ScalingFit:
    """A fitted S(B) = s_min (1 + b_crit / B): `s_min` in steps, `b_crit` in examples per
    step, `n_points` batch sizes used, `cost` the least-squares cost (half the sum of
    squared log residuals)."""
    s_min: float
    b_crit: float
    n_points: int
    cost: float

    @property
    def e_min(self) -> float:
        """Fewest training examples (at a vanishing batch size): s_min * b_crit."""
        return self.s_min * self.b_crit

    def steps(self, batch_size) -> np.ndarray:
        """Fitted steps to result at `batch_size` (scalar or array)."""
        return self.s_min * (1.0 + self.b_crit / np.asarray(batch_size, dtype=float))

    def examples(self, batch_size) -> np.ndarray:
        """Fitted examples to result, steps(B) * B."""
        return self.steps(batch_size) * np.asarray(batch_size, dtype=float)

    def local_slope(self, batch_size) -> np.ndarray:
        """d log S / d log B of the fitted curve: -1 is perfect scaling, 0 is flat."""
        batch_size = np.asarray(batch_size, dtype=float)
        return -self.b_crit / (batch_size + self.b_crit)


def _residuals(params: np.ndarray, log_b: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    log_s_min, log_b_crit = params
    return log_s - log_s_min - np.logaddexp(0.0, log_b_crit - log_b)


def _jacobian(params: np.ndarray, log_b: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    share = 1.0 / (1.0 + np.exp(log_b - params[1]))  # (B_crit/B) / (1 + B_crit/B)
    return np.column_stack([-np.ones_like(log_b), -share])


def fit_steps_curve(batch_sizes, steps) -> ScalingFit | None:
    """Least-squares fit of S(B) = S_min (1 + B_crit / B) to observed steps to result.

    Residuals are log S - log model, so every batch size weighs the same relative error;
    the parameters are fitted as logs, so both stay positive. Points with NaN or
    non-positive steps are dropped; None when fewer than two batch sizes remain."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    keep = np.isfinite(s) & (s > 0) & np.isfinite(b) & (b > 0)
    if np.unique(b[keep]).size < 2:
        return None
    log_b, log_s = np.log(b[keep]), np.log(s[keep])
    bounds = ([-np.inf, log_b.min() - np.log(_B_CRIT_RANGE)],
              [np.inf, log_b.max() + np.log(_B_CRIT_RANGE)])
    start = np.array([log_s.min(), np.median(log_b)])
    result = least_squares(_residuals, start, jac=_jacobian, args=(log_b, log_s),
                           bounds=bounds, xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return ScalingFit(s_min=float(np.exp(result.x[0])), b_crit=float(np.exp(result.x[1])),
                      n_points=int(keep.sum()), cost=float(result.cost))


def _interval(values: list[float], level: float) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    tail = 50.0 * (1.0 - level)
    return (float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail)))


def _refit_resamples(batch_sizes: np.ndarray, resampled_steps: pd.DataFrame | None):
    """Fits of every bootstrap resample (rows: resamples, columns aligned with batch_sizes).

    Each distinct row is fitted once: the fit is a deterministic function of the row, and
    with many trials per cell most resamples repeat a few rows (the cells' minima), so the
    refits, nearly all of a scaling analysis's work, shrink to a handful. Every resample
    still counts in the intervals."""
    if resampled_steps is None:
        return []
    fitted: dict[bytes, ScalingFit | None] = {}
    fits = []
    for row in resampled_steps.to_numpy(float):
        key = row.tobytes()  # equal bytes, equal input, the same fit
        if key not in fitted:
            fitted[key] = fit_steps_curve(batch_sizes, row)
        fits.append(fitted[key])
    return [fit for fit in fits if fit is not None]


def fit_group(batch_sizes, steps, resampled_steps: pd.DataFrame | None = None,
              level: float = 0.95) -> dict:
    """Fit one group and, when `resampled_steps` (resamples x batch sizes, in the order
    of `batch_sizes`) is given, percentile intervals of S_min, B_crit and E_min from
    refitting each resample."""
    fit = fit_steps_curve(batch_sizes, steps)
    refits = _refit_resamples(np.asarray(batch_sizes, dtype=float), resampled_steps)
    row = {"s_min": np.nan, "b_crit": np.nan, "e_min": np.nan, "n_points": 0,
           "n_resamples_fitted": len(refits)}
    if fit is not None:
        row.update(s_min=fit.s_min, b_crit=fit.b_crit, e_min=fit.e_min, n_points=fit.n_points)
    for name in ("s_min", "b_crit", "e_min"):
        low, high = _interval([getattr(r, name) for r in refits], level)
        row[f"{name}_low"], row[f"{name}_high"] = low, high
    return row


def _group_keys(frame: pd.DataFrame) -> list[str]:
    return [c for c in GROUP_COLUMNS if c in frame.columns]


def fit_scaling(results: pd.DataFrame, cells: pd.DataFrame, *,
                resampled_steps: pd.DataFrame | None = None,
                level: float = 0.95) -> pd.DataFrame:
    """One row per (optimizer, schedule) group: the fitted `s_min` (steps), `b_crit`
    (examples per step), `e_min` (examples), their `*_low`/`*_high` bootstrap intervals
    and `n_points`, `n_resamples_fitted`.

    `results` has `cell_id` and `steps_to_result` (e.g. `steps.steps_to_result` or a
    bootstrap summary); `cells` has `cell_id`, `batch_size`, `optimizer`, `schedule`;
    `resampled_steps` is `BootstrapResult.steps` (resamples x cell ids)."""
    table = cells.merge(results[["cell_id", "steps_to_result"]], on="cell_id", how="inner")
    keys = _group_keys(table)
    rows = []
    for key, group in table.groupby(keys, dropna=False, sort=True) if keys else [((), table)]:
        group = group.sort_values("batch_size")
        resamples = None
        if resampled_steps is not None:
            resamples = resampled_steps.reindex(columns=list(group["cell_id"]))
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row.update(fit_group(group["batch_size"], group["steps_to_result"], resamples, level))
        rows.append(row)
    return pd.DataFrame(rows)


def local_slopes(batch_sizes, steps) -> np.ndarray:
    """log2-log2 slope between each batch size and the next larger one (the last is NaN):
    -1 means doubling B halves the steps, 0 means no reduction."""
    log_b = np.log2(np.asarray(batch_sizes, dtype=float))
    log_s = np.log2(np.asarray(steps, dtype=float))
    slopes = np.full(len(log_b), np.nan)
    slopes[:-1] = np.diff(log_s) / np.diff(log_b)
    return slopes


def _no_later_reduction(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Whether every larger batch size's steps interval reaches up to this one's (no
    significant reduction from here on). NaN interval ends (unbounded above, or no result)
    count as reaching because a reduction cannot be shown; the largest batch size has no
    larger one and gives False."""
    later_high = np.full(len(high), -np.inf)  # the lowest upper end above each batch size
    if len(high) > 1:
        upper = np.nan_to_num(high[1:], nan=np.inf)
        later_high[:-1] = np.minimum.accumulate(upper[::-1])[::-1]
    return later_high >= np.nan_to_num(low, nan=-np.inf)


def plateau_start(low, high) -> int | None:
    """Index of the first batch size from which no larger batch size's steps interval lies
    wholly below any smaller one's within that range (no further reduction beyond noise,
    between any two of them, not only neighbours: a chain of small overlapping steps can
    add up to a large reduction); None if the largest batch size still brings a reduction
    or there are fewer than two batch sizes."""
    reaching = _no_later_reduction(np.asarray(low, dtype=float), np.asarray(high, dtype=float))
    if len(reaching) < 2 or not reaching[-2]:
        return None
    start = len(reaching) - 2
    while start > 0 and reaching[start - 1]:
        start -= 1
    return start


def regime_labels(batch_sizes, steps, low, high, b_crit: float,
                  perfect_fraction: float = 0.25) -> np.ndarray:
    """Regime per batch size (ascending): `perfect_scaling`, `diminishing_returns`,
    `maximal_data_parallelism`, `undetermined` outside the plateau when `b_crit` is NaN (no
    fit), or `no_result` where the steps are NaN (rule: module docstring)."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if np.isfinite(b_crit):
        labels = np.where(b <= perfect_fraction * b_crit, "perfect_scaling",
                          "diminishing_returns").astype(object)
    else:
        labels = np.full(len(b), "undetermined", dtype=object)
    has = np.isfinite(s)
    start = plateau_start(np.asarray(low, dtype=float)[has], np.asarray(high, dtype=float)[has])
    if start is not None:
        labels[np.flatnonzero(has)[start:]] = "maximal_data_parallelism"
    labels[~has] = "no_result"
    return labels


def _interval_columns(group: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    if "steps_low" in group.columns and "steps_high" in group.columns:
        return group["steps_low"], group["steps_high"]
    # Without intervals a "reduction" is any strict decrease of the point values.
    return group["steps_to_result"], group["steps_to_result"]


def classify_regimes(results: pd.DataFrame, cells: pd.DataFrame, fits: pd.DataFrame, *,
                     perfect_fraction: float = 0.25) -> pd.DataFrame:
    """One row per cell with a `regime` and `slope_to_next` (log2-log2 slope to the next
    larger batch size of its group), plus per group the boundaries as columns:
    `perfect_boundary` (= perfect_fraction * B_crit, examples per step) and
    `plateau_batch_size` (first batch size of maximal data parallelism, NaN if none).

    `results` has `cell_id`, `steps_to_result` and optionally `steps_low`/`steps_high`
    (a bootstrap summary); `fits` is `fit_scaling`'s output."""
    table = cells.merge(results, on="cell_id", how="inner")
    keys = _group_keys(table)
    parts = []
    for key, group in table.groupby(keys, dropna=False, sort=True) if keys else [((), table)]:
        parts.append(_classify_group(group.sort_values("batch_size"),
                                     _b_crit_of(fits, keys, key), perfect_fraction))
    return pd.concat(parts, ignore_index=True) if parts else table.assign(regime=[])


def _b_crit_of(fits: pd.DataFrame, keys: list[str], key) -> float:
    values = key if isinstance(key, tuple) else (key,)
    mask = np.ones(len(fits), dtype=bool)
    for column, value in zip(keys, values):
        mask &= (fits[column] == value).to_numpy() | (fits[column].isna() & pd.isna(value))
    return float(fits.loc[mask, "b_crit"].iloc[0]) if mask.any() else float("nan")


def _classify_group(group: pd.DataFrame, b_crit: float, perfect_fraction: float) -> pd.DataFrame:
    low, high = _interval_columns(group)
    labels = regime_labels(group["batch_size"], group["steps_to_result"], low, high,
                           b_crit, perfect_fraction)
    plateau = group["batch_size"].to_numpy(float)[labels == "maximal_data_parallelism"]
    return group.assign(
        regime=labels,
        slope_to_next=local_slopes(group["batch_size"], group["steps_to_result"]),
        perfect_boundary=perfect_fraction * b_crit,
        plateau_batch_size=plateau.min() if plateau.size else np.nan)
