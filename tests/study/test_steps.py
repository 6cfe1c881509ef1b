"""Steps-to-result on hand-made rows whose answers are known."""
import math

import pandas as pd
import pytest

from study.analysis.steps import steps_to_result


def frames(rows, outcomes):
    """rows: (trial_id, step, val_error); outcomes: trial_id -> (cell_id, number, outcome)."""
    trials = pd.DataFrame([{"trial_id": t, "cell_id": c, "trial_number": n, "outcome": o}
                           for t, (c, n, o) in outcomes.items()])
    measurements = pd.DataFrame(rows, columns=["trial_id", "step", "val_error"])
    measurements["examples"] = measurements["step"] * 32
    measurements["wall_seconds"] = measurements["step"] / 100
    return trials, measurements


def result(trials, measurements, threshold=0.1, mode="min", metric="val_error"):
    return steps_to_result(trials, measurements, metric=metric, threshold=threshold, mode=mode)


def test_first_strictly_better_row_over_all_trials():
    trials, ms = frames(
        [(1, 10, 0.5), (1, 20, 0.09), (1, 30, 0.05),
         (2, 10, 0.3), (2, 20, 0.2), (2, 30, 0.08)],
        {1: (7, 0, "reached"), 2: (7, 1, "reached")})
    row = result(trials, ms).iloc[0]
    assert row["steps_to_result"] == 20
    assert row["examples_to_result"] == 640
    assert row["seconds_to_result"] == pytest.approx(0.2)
    assert row["winner_trial_id"] == 1


def test_comparison_is_strict():
    trials, ms = frames([(1, 10, 0.1), (1, 20, 0.0999)], {1: (1, 0, "reached")})
    assert result(trials, ms).iloc[0]["steps_to_result"] == 20


def test_maximising_metric_is_strict_the_other_way():
    trials, ms = frames([(1, 10, 0.9), (1, 20, 0.95)], {1: (1, 0, "reached")})
    ms["val_accuracy"] = ms["val_error"]
    out = result(trials, ms, threshold=0.9, mode="max", metric="val_accuracy")
    assert out.iloc[0]["steps_to_result"] == 20


def test_ties_go_to_the_lower_trial_number():
    trials, ms = frames([(5, 10, 0.01), (3, 10, 0.02)],
                        {5: (1, 0, "reached"), 3: (1, 4, "reached")})
    row = result(trials, ms).iloc[0]
    assert (row["steps_to_result"], row["winner_trial_id"]) == (10, 5)


def test_diverged_and_failed_trials_never_win():
    trials, ms = frames([(1, 10, 0.0), (2, 10, 0.0), (3, 40, 0.05)],
                        {1: (1, 0, "diverged"), 2: (1, 1, "failed"), 3: (1, 2, "reached")})
    row = result(trials, ms).iloc[0]
    assert (row["steps_to_result"], row["winner_trial_id"]) == (40, 3)


def test_cell_without_reached_trial_has_no_result_not_zero():
    trials, ms = frames([(1, 10, 0.5), (2, 10, 0.05)],
                        {1: (1, 0, "not_reached"), 2: (2, 0, "reached")})
    out = result(trials, ms).set_index("cell_id")
    assert math.isnan(out.loc[1, "steps_to_result"])
    assert out.loc[2, "steps_to_result"] == 10


def test_nan_metric_never_beats_the_target():
    trials, ms = frames([(1, 10, float("nan")), (1, 20, 0.01)], {1: (1, 0, "reached")})
    assert result(trials, ms).iloc[0]["steps_to_result"] == 20


def test_cells_are_independent():
    trials, ms = frames([(1, 10, 0.05), (2, 50, 0.05), (3, 30, 0.05)],
                        {1: (1, 0, "reached"), 2: (2, 0, "reached"), 3: (2, 1, "reached")})
    out = result(trials, ms).set_index("cell_id")["steps_to_result"]
    assert out.to_dict() == {1: 10, 2: 30}
