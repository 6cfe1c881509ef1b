"""Steps-to-result from the first N trials of each cell."""
import numpy as np
import pandas as pd
import pytest

from study.analysis import ELIGIBLE_OUTCOMES, first_trials, relative_change, steps_vs_trial_count

TARGET = dict(metric="val_error", threshold=0.1)


@pytest.fixture
def frames():
    """Cell a: trials (by trial_number) first beat at 500, never, 300, -, 200; trial 3 is
    diverged and trial 1 failed. Cell b has two trials that beat at 40 and 20."""
    spec = [("a", 0, "reached", 500), ("a", 1, "failed", None), ("a", 2, "reached", 300),
            ("a", 3, "diverged", None), ("a", 4, "reached", 200), ("a", 5, "not_reached", None),
            ("b", 0, "reached", 40), ("b", 1, "reached", 20)]
    # Listed out of order on purpose: "first N" is by trial_number, not by row order.
    spec = spec[::-1]
    trials = pd.DataFrame([{"cell_id": c, "trial_id": f"{c}{n}", "trial_number": n,
                            "outcome": o} for c, n, o, _ in spec])
    rows = []
    for c, n, _, first in spec:
        rows.append({"trial_id": f"{c}{n}", "step": 10, "examples": 10, "val_error": 0.9})
        if first is not None:
            rows.append({"trial_id": f"{c}{n}", "step": first, "examples": first * 8,
                         "val_error": 0.05})
    return trials, pd.DataFrame(rows)


def test_first_n_trials_by_trial_number(frames):
    trials, _ = frames
    picked = first_trials(trials, 3)
    # failed trial a1 is not counted: a's first three are 0, 2, 3.
    assert picked.query("cell_id == 'a'")["trial_number"].tolist() == [0, 2, 3]
    picked = first_trials(trials, 3, counted=ELIGIBLE_OUTCOMES)
    assert picked.query("cell_id == 'a'")["trial_number"].tolist() == [0, 2, 4]


def test_steps_fall_as_more_trials_are_used(frames):
    out = steps_vs_trial_count(*frames, **TARGET, counts=[1, 2, 4, 10])
    a = out.query("cell_id == 'a'").set_index("n_trials")
    assert a["steps_to_result"].tolist() == [500, 300, 200, 200]
    assert a["n_used"].tolist() == [1, 2, 4, 5]
    assert a.loc[4, "winner_trial_id"] == "a4" and a.loc[4, "examples_to_result"] == 1600
    b = out.query("cell_id == 'b'").set_index("n_trials")["steps_to_result"]
    assert b.tolist() == [40, 20, 20, 20]


def test_cell_without_enough_trials_has_no_result(frames):
    trials, rows = frames
    out = steps_vs_trial_count(trials, rows, metric="val_error", threshold=0.01, counts=[2])
    assert out["steps_to_result"].isna().all()
    assert out.set_index("cell_id")["n_used"].to_dict() == {"a": 2, "b": 2}


def test_relative_change_to_the_largest_n(frames):
    out = relative_change(steps_vs_trial_count(*frames, **TARGET, counts=[1, 2, 4]))
    a = out.query("cell_id == 'a'").set_index("n_trials")["ratio_to_final"]
    assert a.tolist() == pytest.approx([2.5, 1.5, 1.0])
    assert np.all(out.query("cell_id == 'b'")["ratio_to_final"].to_numpy() == [2.0, 1.0, 1.0])
