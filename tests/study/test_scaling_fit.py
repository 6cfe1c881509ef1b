"""S(B) = S_min (1 + B_crit / B): recovery, the equivalent form, and regimes."""
import numpy as np
import pandas as pd
import pytest

from study.analysis import (
    ScalingFit, classify_regimes, fit_scaling, fit_steps_curve, local_slopes, plateau_start,
    regime_labels,
)

BATCH = 2.0 ** np.arange(4, 16)  # 16 .. 32768
S_MIN, B_CRIT = 1500.0, 1024.0


def _curve(b, s_min=S_MIN, b_crit=B_CRIT):
    return s_min * (1.0 + b_crit / np.asarray(b, dtype=float))


def test_noiseless_curve_is_recovered_to_1e_6():
    fit = fit_steps_curve(BATCH, _curve(BATCH))
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-6)
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=1e-6)
    assert fit.n_points == len(BATCH)


@pytest.mark.parametrize("s_min,b_crit", [(20.0, 8.0), (3e5, 3e4), (800.0, 200_000.0)])
def test_recovery_does_not_depend_on_the_scale(s_min, b_crit):
    fit = fit_steps_curve(BATCH, _curve(BATCH, s_min, b_crit))
    assert (fit.s_min, fit.b_crit) == pytest.approx((s_min, b_crit), rel=1e-6)


def test_noisy_curve_is_recovered_within_tolerance():
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(20):
        noisy = _curve(BATCH) * np.exp(rng.normal(0.0, 0.05, BATCH.size))  # 5% noise
        fit = fit_steps_curve(BATCH, noisy)
        errors.append((fit.s_min / S_MIN - 1, fit.b_crit / B_CRIT - 1))
    errors = np.abs(np.array(errors))
    assert errors.max(axis=0) == pytest.approx([0, 0], abs=0.15)
    assert np.median(errors, axis=0) == pytest.approx([0, 0], abs=0.05)


def test_fitted_curve_satisfies_the_equivalent_form():
    rng = np.random.default_rng(1)
    fit = fit_steps_curve(BATCH, _curve(BATCH) * np.exp(rng.normal(0.0, 0.1, BATCH.size)))
    b = np.geomspace(1, 1e6, 50)
    s, e = fit.steps(b), fit.examples(b)
    assert np.allclose((s / fit.s_min - 1) * (e / fit.e_min - 1), 1.0, rtol=1e-10)
    assert fit.b_crit == pytest.approx(fit.e_min / fit.s_min, rel=1e-12)


def test_nan_points_are_dropped_and_too_few_points_give_none():
    steps = _curve(BATCH)
    steps[[2, 5]] = np.nan
    fit = fit_steps_curve(BATCH, steps)
    assert fit.n_points == len(BATCH) - 2 and fit.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert fit_steps_curve([64.0], [100.0]) is None
    assert fit_steps_curve([64.0, 128.0], [np.nan, 100.0]) is None


def test_local_slopes_are_log2_log2_differences():
    slopes = local_slopes([64, 128, 512, 1024], [800, 400, 200, 200])
    assert slopes[:3] == pytest.approx([-1.0, -0.5, 0.0])
    assert np.isnan(slopes[3])
    fit = ScalingFit(s_min=10.0, b_crit=100.0, n_points=2, cost=0.0)
    assert fit.local_slope([100.0, 25.0]) == pytest.approx([-0.5, -0.8])


def test_plateau_starts_where_every_next_interval_overlaps():
    low = np.array([750, 380, 190, 150, 140, 141])
    high = np.array([850, 420, 210, 170, 160, 161])
    # 190..210 vs 150..170: a reduction; 150..170 vs 140..160 overlap, and so on.
    assert plateau_start(low, high) == 3
    # Still falling at the largest batch size: no plateau.
    assert plateau_start([400, 200, 100], [420, 210, 105]) is None


def test_a_chain_of_overlapping_neighbours_is_no_plateau():
    """The NQM's momentum cells (12 trials, so wide bootstrap intervals) fell 80-fold from
    B = 256 to 2^20 while every interval overlapped the next one's: labelled maximal data
    parallelism from 256 on. The plateau starts where no later interval is wholly lower."""
    low = np.array([23688, 9109, 1930, 416, 303, 297, 297.0])
    high = np.array([78739, 75636, 16277, 2435, 2388, 2377, 1641.0])
    assert plateau_start(low, high) == 3  # 416 .. 2435 against 297 .. 1641: no reduction
    # A NaN upper end (no resample reached) or lower end cannot show a reduction.
    assert plateau_start([100, 50, 48], [120, np.nan, 52]) == 1
    assert plateau_start([100, np.nan, 48], [120, np.nan, 52]) == 1
    assert plateau_start([100.0], [120.0]) is None


def test_regime_labels_follow_the_stated_rule():
    b = np.array([16, 32, 64, 128, 256, 512, 1024])
    s = np.array([6400, 3200, 1600, 900, 600, 590, 580.0])
    labels = regime_labels(b, s, s * 0.97, s * 1.03, b_crit=160.0)
    # b <= 160/4 = 40: perfect; the plateau starts at 256 (600 vs 590 vs 580 overlap).
    assert list(labels) == ["perfect_scaling"] * 2 + ["diminishing_returns"] * 2 + [
        "maximal_data_parallelism"] * 3
    s[1] = np.nan
    assert regime_labels(b, s, s * 0.97, s * 1.03, b_crit=160.0)[1] == "no_result"


def _frames(with_bootstrap: bool):
    cells = pd.DataFrame({"cell_id": [f"c{i}" for i in range(len(BATCH))], "batch_size": BATCH,
                          "optimizer": "momentum", "schedule": "constant"})
    steps = _curve(BATCH)
    results = pd.DataFrame({"cell_id": cells["cell_id"], "steps_to_result": steps})
    if not with_bootstrap:
        return cells, results, None
    rng = np.random.default_rng(2)
    resampled = pd.DataFrame(steps * np.exp(rng.normal(0, 0.05, (200, BATCH.size))),
                             columns=cells["cell_id"])
    return cells, results.assign(steps_low=steps * 0.9, steps_high=steps * 1.1), resampled


def test_fit_scaling_gives_intervals_that_contain_the_truth():
    cells, results, resampled = _frames(with_bootstrap=True)
    fits = fit_scaling(results, cells, resampled_steps=resampled)
    row = fits.iloc[0]
    assert (row["optimizer"], row["schedule"]) == ("momentum", "constant")
    assert row["b_crit"] == pytest.approx(B_CRIT, rel=1e-6)
    assert row["b_crit_low"] < B_CRIT < row["b_crit_high"]
    assert row["s_min_low"] < S_MIN < row["s_min_high"]
    assert row["n_resamples_fitted"] == 200


def test_classify_regimes_reports_boundaries_per_group():
    cells, results, resampled = _frames(with_bootstrap=True)
    fits = fit_scaling(results, cells)
    table = classify_regimes(results, cells, fits).set_index("batch_size")
    assert table["perfect_boundary"].iloc[0] == pytest.approx(B_CRIT / 4, rel=1e-6)
    assert table.loc[256, "regime"] == "perfect_scaling"
    assert table.loc[512, "regime"] == "diminishing_returns"
    # S falls with B, so from B on no interval lies below another iff the largest batch
    # size's reaches B's: 1.1 (1 + 1/32) >= 0.9 (1 + B_crit/B) (B_max = 32 B_crit), i.e.
    # B >= 3.84 B_crit: the plateau starts at the first power of two above, 4 B_crit.
    # (Neighbours alone overlap from 1.75 B_crit on, where S is still 1.45x S(B_max).)
    plateau = table["plateau_batch_size"].iloc[0]
    assert plateau == 4 * B_CRIT
    assert table.loc[plateau:, "regime"].eq("maximal_data_parallelism").all()
    assert table.loc[2 * B_CRIT, "regime"] == "diminishing_returns"
    assert table.loc[16, "slope_to_next"] == pytest.approx(
        np.log2(_curve(32) / _curve(16)), rel=1e-12)


def test_without_a_fit_regimes_outside_the_plateau_are_undetermined():
    # Only one batch size reached the target: no curve can be fitted, so B_crit is unknown
    # and nothing says whether B=16 scales perfectly or has diminishing returns.
    cells = pd.DataFrame({"cell_id": [1, 2, 3], "batch_size": [16, 32, 64],
                          "optimizer": "sgd", "schedule": "constant"})
    results = pd.DataFrame({"cell_id": [1, 2, 3], "steps_to_result": [800.0, np.nan, np.nan]})
    fits = fit_scaling(results, cells)
    assert np.isnan(fits["b_crit"].iloc[0])
    table = classify_regimes(results, cells, fits).set_index("batch_size")
    assert table["regime"].to_dict() == {16: "undetermined", 32: "no_result", 64: "no_result"}
    # A plateau needs no fit: it is read off the intervals alone.
    labels = regime_labels([16, 32, 64], [800.0, 400.0, 400.0], [790, 390, 390],
                           [810, 410, 410], b_crit=float("nan"))
    assert list(labels) == ["undetermined", "maximal_data_parallelism",
                            "maximal_data_parallelism"]
