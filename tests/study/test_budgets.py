"""Best validation error under step and example budgets, on rows whose answers are known."""
import numpy as np
import pandas as pd
import pytest

from study.analysis import (
    best_under_budget, best_under_example_budget, best_under_step_budget, examples_seen,
)


@pytest.fixture
def frames():
    cells = pd.DataFrame({"cell_id": ["small", "large"], "batch_size": [10, 100],
                          "optimizer": "sgd", "schedule": "constant"})
    trials = pd.DataFrame({
        "cell_id": ["small", "small", "small", "large", "large"],
        "trial_id": ["s1", "s2", "s3", "l1", "l2"], "trial_number": [0, 1, 2, 0, 1],
        "outcome": ["reached", "diverged", "pruned", "not_reached", "failed"]})
    rows = [
        ("s1", 100, 0.30), ("s1", 200, 0.20), ("s1", 400, 0.10),
        ("s2", 100, 0.01),                        # diverged: never counts
        ("s3", 100, 0.25), ("s3", 200, 0.15),     # pruned rows are legitimate
        ("l1", 100, 0.12), ("l1", 200, 0.08), ("l1", 400, np.nan),
        ("l2", 100, 0.001),                       # failed: never counts
    ]
    measurements = pd.DataFrame(rows, columns=["trial_id", "step", "val_error"])
    return trials, measurements, cells


def test_step_budget_keeps_rows_up_to_and_including_the_budget(frames):
    out = best_under_step_budget(*frames, metric="val_error", step_budget=[50, 100, 200, 400])
    best = out.pivot(index="budget", columns="cell_id", values="best_value")
    assert best.loc[50].isna().all()  # nothing evaluated yet
    assert best.loc[100].to_dict() == pytest.approx({"small": 0.25, "large": 0.12})
    assert best.loc[200].to_dict() == pytest.approx({"small": 0.15, "large": 0.08})
    assert best.loc[400].to_dict() == pytest.approx({"small": 0.10, "large": 0.08})
    row = out.query("budget == 200 and cell_id == 'small'").iloc[0]
    assert (row["best_trial_id"], row["best_step"]) == ("s3", 200)


def test_example_budget_uses_batch_size_times_step(frames):
    # 2,000 examples: small (B=10) may use steps <= 200, large (B=100) steps <= 20.
    out = best_under_example_budget(*frames, metric="val_error", example_budget=2000)
    best = out.set_index("cell_id")["best_value"]
    assert best["small"] == pytest.approx(0.15) and np.isnan(best["large"])
    out = best_under_example_budget(*frames, metric="val_error", example_budget=20_000)
    assert out.set_index("cell_id")["best_value"].to_dict() == pytest.approx(
        {"small": 0.10, "large": 0.08})


def test_example_budget_prefers_the_examples_column(frames):
    trials, measurements, cells = frames
    # A batch-size schedule: s1 saw more examples than 10 * step at its last evaluation.
    measurements = measurements.assign(examples=measurements["step"] * np.where(
        measurements["trial_id"].str.startswith("s"), 10, 100).astype(float))
    measurements.loc[(measurements["trial_id"] == "s1") & (measurements["step"] == 400),
                     "examples"] = 9000
    out = best_under_example_budget(trials, measurements, cells, metric="val_error",
                                    example_budget=5000)
    assert out.set_index("cell_id").loc["small", "best_value"] == pytest.approx(0.15)
    rows = measurements.merge(trials, on="trial_id").merge(cells, on="cell_id")
    rows.loc[0, "examples"] = np.nan
    assert examples_seen(rows).iloc[0] == rows.loc[0, "batch_size"] * rows.loc[0, "step"]


def test_maximising_metric_and_bad_kind(frames):
    trials, measurements, cells = frames
    measurements = measurements.assign(val_accuracy=1 - measurements["val_error"])
    out = best_under_step_budget(trials, measurements, cells, metric="val_accuracy",
                                 step_budget=400, mode="max")
    assert out.set_index("cell_id")["best_value"].to_dict() == pytest.approx(
        {"small": 0.90, "large": 0.92})
    with pytest.raises(ValueError, match="kind"):
        best_under_budget(*frames, metric="val_error", budgets=1, kind="epochs")
