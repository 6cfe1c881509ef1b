"""Measured B_simple (median over the last part of each winner) vs the fitted B_crit."""
import json
import math

import pandas as pd
import pytest

from study.analysis.noise import compare_with_b_crit, measured_b_simple
from study.analysis.scaling import fit_scaling


def frames():
    results = pd.DataFrame({"cell_id": [1, 2, 3], "winner_trial_id": [10, 20, None]})
    rows = []
    # Trial 10: steps 10..100; B_simple rises 1..10; the last half (step >= 50) is 5..10.
    for step in range(10, 101, 10):
        rows.append({"trial_id": 10, "step": step, "extra": {"gns_b_simple": step / 10}})
    # Trial 20: extra as JSON text (SQLite), one measurement without the key.
    for step, value in ((20, 100.0), (40, 30.0), (60, None), (80, 50.0)):
        extra = {"noise_scale": 1.0} if value is None else {"gns_b_simple": value}
        rows.append({"trial_id": 20, "step": step, "extra": json.dumps(extra)})
    rows.append({"trial_id": 30, "step": 10, "extra": {"gns_b_simple": 999.0}})  # not a winner
    return results, pd.DataFrame(rows)


def test_median_over_the_last_half_of_each_winner():
    results, measurements = frames()
    measured = measured_b_simple(results, measurements, last_fraction=0.5)
    assert list(measured["cell_id"]) == [1, 2]
    assert measured["b_simple"].tolist() == [7.5, 40.0]  # median(5..10); median(30, 50)
    assert measured["n_values"].tolist() == [6, 2]
    whole = measured_b_simple(results, measurements, last_fraction=1.0)
    assert whole["b_simple"].tolist() == [5.5, 50.0]


def test_compare_with_fitted_b_crit():
    cells = pd.DataFrame({"cell_id": [1, 2, 3, 4], "batch_size": [16, 32, 64, 128],
                          "optimizer": "sgd", "schedule": "constant"})
    # Steps exactly on S(B) = 100 (1 + 64 / B): the fit gives B_crit = 64.
    steps = pd.DataFrame({"cell_id": [1, 2, 3, 4],
                          "steps_to_result": [100 * (1 + 64 / b) for b in (16, 32, 64, 128)]})
    fits = fit_scaling(steps, cells)
    assert fits["b_crit"].iloc[0] == pytest.approx(64.0, rel=1e-6)
    measured = pd.DataFrame({"cell_id": [1, 2, 3, 4], "b_simple": [20.0, 30.0, 40.0, math.nan]})
    table = compare_with_b_crit(measured, cells, fits)
    row = table.iloc[0]
    assert (row["optimizer"], row["schedule"], row["n_cells"]) == ("sgd", "constant", 3)
    assert row["b_simple"] == 30.0
    assert row["ratio"] == pytest.approx(30.0 / 64.0, rel=1e-6)


def test_bad_fraction_is_refused():
    results, measurements = frames()
    with pytest.raises(ValueError, match="last_fraction"):
        measured_b_simple(results, measurements, last_fraction=0.0)
