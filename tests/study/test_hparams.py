"""Optimal hyperparameters vs batch size, edge checks and the search-space scatter."""
import numpy as np
import pandas as pd
import pytest

from study.analysis import (
    edge_check, fit_power_law, hparam_scaling, linear_heuristic, position_in_range,
    search_space_scatter, sqrt_heuristic, steps_to_result, winning_hparams,
)

BATCH = [64, 128, 256, 512]
TARGET = dict(metric="val_error", threshold=0.1)


@pytest.fixture
def frames():
    """Per cell: a winner with lr = 0.1 B/64 and momentum 0.9 that beats the target at
    step 100, a slower trial (lr 1e-3, momentum 0.99) that beats it at 300, and in the
    first cell also a pruned, a diverged and a failed trial."""
    cells = pd.DataFrame({"cell_id": [f"c{b}" for b in BATCH], "batch_size": BATCH,
                          "optimizer": "momentum", "schedule": "constant"})
    trials, rows = [], []
    for b in BATCH:
        for name, lr, m, first in (("win", 0.1 * b / 64, 0.9, 100), ("slow", 1e-3, 0.99, 300)):
            tid = f"c{b}-{name}"
            hparams = {"learning_rate": lr, "momentum": m}
            trials.append((f"c{b}", tid, len(trials), "reached", hparams))
            rows += [(tid, first - 50, 0.5), (tid, first, 0.05)]
    for tid, outcome in (("c64-pruned", "pruned"), ("c64-div", "diverged"), ("c64-fail", "failed")):
        trials.append(("c64", tid, len(trials), outcome, {"learning_rate": 5.0, "momentum": 0.5}))
        rows.append((tid, 50, 0.5 if outcome == "pruned" else 0.01))
    trials = pd.DataFrame(trials, columns=["cell_id", "trial_id", "trial_number", "outcome",
                                           "hparams"])
    measurements = pd.DataFrame(rows, columns=["trial_id", "step", "val_error"])
    return cells, trials, measurements


def test_winners_carry_their_hyperparameters(frames):
    cells, trials, measurements = frames
    results = steps_to_result(trials, measurements, **TARGET)
    winners = winning_hparams(results, trials, cells)
    assert list(winners["batch_size"]) == BATCH
    assert winners["learning_rate"].to_numpy() == pytest.approx(0.1 * np.array(BATCH) / 64)
    assert winners["momentum"].to_numpy() == pytest.approx([0.9] * 4)
    assert winners["effective_learning_rate"].to_numpy() == pytest.approx(
        np.array(BATCH) / 64.0)
    assert (winners["steps_to_result"] == 100).all()


def test_power_law_exponents_are_exact_for_exact_power_laws(frames):
    cells, trials, measurements = frames
    winners = winning_hparams(steps_to_result(trials, measurements, **TARGET), trials, cells)
    table = hparam_scaling(winners).set_index("parameter")
    assert table.loc["learning_rate", "exponent"] == pytest.approx(1.0, abs=1e-12)
    assert table.loc["learning_rate", "prefactor"] == pytest.approx(0.1 / 64, rel=1e-12)
    assert table.loc["momentum", "exponent"] == pytest.approx(0.0, abs=1e-12)
    assert table.loc["effective_learning_rate", ["b0", "y0"]].tolist() == pytest.approx([64, 1.0])
    assert fit_power_law([1, 4, 16], [3, 6, 12]) == pytest.approx((0.5, 3.0))
    assert np.isnan(fit_power_law([8], [1.0])[0])


def test_heuristic_curves():
    assert linear_heuristic([64, 256], 0.1, 64) == pytest.approx([0.1, 0.4])
    assert sqrt_heuristic([64, 256, 4096], 0.1, 64) == pytest.approx([0.1, 0.2, 0.8])


def test_positions_in_each_scale():
    assert position_in_range(0.1, 1e-3, 10.0, "log") == pytest.approx(0.5)
    # reverse_log: 1 - value in log space; 0.99 is a third of the way from 0.9 to 0.9999.
    assert position_in_range(0.99, 0.9, 0.9999, "reverse_log") == pytest.approx(1 / 3)
    assert position_in_range(0.25, 0.0, 1.0, "linear") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        position_in_range(1.0, 0.0, 2.0, "choices_of_something")


def test_edge_check_reads_the_sampled_rate_under_a_scaling_rule():
    """With a scaling rule the range bounds `base_learning_rate`; the stored
    `learning_rate` is scaled to the batch size (1.01 at B = 1024 from 0.0158 at 16)."""
    winners = pd.DataFrame({"cell_id": ["a", "b"], "batch_size": [16, 1024],
                            "learning_rate": [0.0158, 1.0112],
                            "base_learning_rate": [0.0158, 0.0158]})
    flags = edge_check(winners, {"learning_rate": {"low": 0.01, "high": 1.0, "scale": "log"}})
    assert flags["value"].tolist() == [0.0158, 0.0158] and not flags["at_edge"].any()
    assert flags["position"].tolist() == pytest.approx([np.log(1.58) / np.log(100)] * 2)
    unscaled = winners.assign(base_learning_rate=np.nan)  # no rule: the rate itself
    assert edge_check(unscaled, {"learning_rate": {"low": 0.01, "high": 1.0, "scale": "log"}})[
        "near_high"].tolist() == [False, True]


def test_edge_check_flags_winners_within_5_percent_of_a_bound():
    winners = pd.DataFrame({"cell_id": ["a", "b", "c"], "batch_size": [64, 128, 256],
                            "learning_rate": [0.1, 9.0, 1.2e-3],
                            "momentum": [0.9, 0.99, 0.9998],
                            "label_smoothing": [0.0, 0.1, 0.01]})
    space = {"learning_rate": {"low": 1e-3, "high": 10.0, "scale": "log"},
             "momentum": {"low": 0.9, "high": 0.9999, "scale": "reverse_log"},
             "label_smoothing": {"choices": [0.0, 0.01, 0.1], "scale": "choices"}}
    flags = edge_check(winners, space).set_index(["cell_id", "parameter"])
    assert "label_smoothing" not in flags.index.get_level_values("parameter")
    # lr 9.0: (log 9 - log 1e-3) / (log 10 - log 1e-3) = 0.989; 1.2e-3: 0.0198.
    assert flags.loc[("b", "learning_rate"), "near_high"]
    assert flags.loc[("c", "learning_rate"), "near_low"]
    assert not flags.loc[("a", "learning_rate"), "at_edge"]
    # momentum 0.9 is the low bound itself; 0.9998 is 99.8% of the way linearly but only
    # 57% in log(1 - m), the scale it was sampled in: not at the edge.
    assert flags.loc[("a", "momentum"), "near_low"]
    assert flags.loc[("c", "momentum"), "position"] == pytest.approx(
        (np.log(2e-4) - np.log(0.1)) / (np.log(1e-4) - np.log(0.1)))
    assert not flags.loc[("c", "momentum"), "at_edge"]
    assert flags["at_edge"].sum() == 3


def test_scatter_categories_and_winner(frames):
    cells, trials, measurements = frames
    results = steps_to_result(trials, measurements, **TARGET)
    scatter = search_space_scatter(trials, measurements, results, **TARGET).set_index("trial_id")
    assert "c64-fail" not in scatter.index  # failed trials are left out
    assert scatter.loc["c64-pruned", "category"] == "not_reached"
    # The diverged trial's 0.01 beats the target, but it is shown as diverged.
    assert scatter.loc["c64-div", "category"] == "diverged"
    assert scatter.loc["c64-slow", "category"] == "reached"
    assert scatter.loc["c64-slow", "one_minus_momentum"] == pytest.approx(0.01)
    assert scatter["is_winner"].sum() == 4 and scatter.loc["c128-win", "is_winner"]


def test_scatter_shows_finished_trials_only(frames):
    """A running trial has not failed to reach the target yet, and an abandoned one is
    re-run with the same hyperparameters (its re-run is the trial): neither is a point
    of the search-space plot, nor counted as 'goal not achieved'."""
    cells, trials, measurements = frames
    extra = pd.DataFrame([("c64", "c64-run", 90, "running", {"learning_rate": 0.3, "momentum": 0.9}),
                          ("c64", "c64-lost", 91, "abandoned", {"learning_rate": 0.2, "momentum": 0.9})],
                         columns=trials.columns)
    trials = pd.concat([trials, extra], ignore_index=True)
    results = steps_to_result(trials, measurements, **TARGET)
    scatter = search_space_scatter(trials, measurements, results, **TARGET)
    assert not {"c64-run", "c64-lost"} & set(scatter["trial_id"])
    counts = scatter.loc[scatter["cell_id"] == "c64", "category"].value_counts().to_dict()
    assert counts == {"reached": 2, "not_reached": 1, "diverged": 1}
