"""The reader of Shallue et al.'s archive layout, on a tiny fake archive (folder and .tar.bz2)."""
import json
import tarfile

import numpy as np
import pandas as pd
import pytest

from study.analysis import steps_to_result
from study.shallue import Goal, read_shallue, search_space

PARAMETER_CONFIGS = {
    "learning_rate": {"type": "DOUBLE", "min_value": 1e-4, "max_value": 10.0, "scale": "LOG_SCALE"},
    "momentum": {"type": "DOUBLE", "min_value": 0.9, "max_value": 0.9999,
                 "scale": "REVERSE_LOG_SCALE"},
    "weight": {"type": "DOUBLE", "min_value": 0.0, "max_value": 1.0, "scale": "LINEAR_SCALE"},
    "decay_steps": {"type": "INTEGER", "min_value": 300, "max_value": 600, "scale": ""},
    "label_smoothing": {"type": "DISCRETE", "feasible_points": [0.0, 0.01, 0.1]},
}
# Batch 64 trials: id -> (status, [(step, val error), ...]). Ids 10 and 11 make string
# order ("1", "10", "11", "2", ...) differ from integer order.
TRIALS_64 = {
    1: ("COMPLETE", [(100, 0.5), (200, 0.02), (300, 0.009)]),   # first beats 0.01 at 300
    2: ("INFEASIBLE", [(100, 0.001)]),                          # diverged: never wins
    3: ("COMPLETE", [(100, 0.3), (200, 0.008)]),                # beats at 200
    4: ("INCOMPLETE", [(100, 0.0001)]),                         # ignored
    10: ("COMPLETE", [(100, 0.005)]),                           # beats at 100
    11: ("COMPLETE", [(100, 0.2), (200, 0.1)]),
}
TRIALS_128 = {
    5: ("COMPLETE", [(50, 0.1), (100, 0.009)]),
    6: ("COMPLETE", [(50, 0.009)]),
    7: ("COMPLETE", [(50, 0.2)]),
}


def _write_study(root, batch_size, trials):
    study_dir = root / "mnist" / "simple_cnn" / "nesterov_momentum" / str(batch_size)
    study_dir.mkdir(parents=True)
    (study_dir / "study.json").write_text(json.dumps({
        "batch_size": batch_size, "dataset": "mnist", "model": "simple_cnn",
        "optimizer": "nesterov_momentum", "early_stopping": False, "train_steps": 300,
        "parameter_configs": PARAMETER_CONFIGS}))
    for trial_id, (status, rows) in trials.items():
        trial_dir = study_dir / str(trial_id)
        trial_dir.mkdir()
        (trial_dir / "metadata.json").write_text(json.dumps({
            "parameters": {"learning_rate": 0.01 * trial_id, "momentum": 0.99},
            "status": status, "steps": rows[-1][0], "trial_id": trial_id,
            "_internal_study_name": "x", "_internal_trial_id": 7}))
        table = pd.DataFrame(rows, columns=["step", "val/classification_error"])
        table["train/cross_entropy_error"] = 1.0
        table["test/classification_error"] = 0.5
        table.to_csv(trial_dir / "measurements.csv", index=False)


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "data"
    _write_study(root, 64, TRIALS_64)
    _write_study(root, 128, TRIALS_128)
    (root / "README.txt").write_text("not part of any study")
    tar_path = tmp_path / "batch_science_data.tar.bz2"
    with tarfile.open(tar_path, "w:bz2") as tar:
        tar.add(root / "mnist", arcname="mnist")
        tar.add(root / "README.txt", arcname="README.txt")
    return root, tar_path


CELL_64 = "mnist/simple_cnn/nesterov_momentum/64"
CELL_128 = "mnist/simple_cnn/nesterov_momentum/128"


def test_counts_and_status_mapping(archive):
    data = read_shallue(archive[0])
    assert list(data.cells["cell_id"]) == [CELL_128, CELL_64]
    assert data.cells.set_index("cell_id").loc[CELL_64, "batch_size"] == 64
    trials = data.trials.set_index("trial_id")
    assert len(trials) == 8  # 4 COMPLETE + 1 INFEASIBLE at 64, 3 COMPLETE at 128; no INCOMPLETE
    assert trials.loc[f"{CELL_64}/2", "outcome"] == "diverged"
    assert f"{CELL_64}/4" not in trials.index
    assert trials.loc[f"{CELL_64}/10", "trial_number"] == 10
    assert trials.loc[f"{CELL_64}/3", "hparams"] == {"learning_rate": 0.03, "momentum": 0.99}
    rows = data.measurements
    assert set(rows.columns) >= {"trial_id", "step", "examples", "wall_seconds", "val_error",
                                 "train_loss", "test_classification_error"}
    row = rows.loc[(rows["trial_id"] == f"{CELL_64}/1") & (rows["step"] == 300)].iloc[0]
    assert row["examples"] == 64 * 300 and row["val_error"] == pytest.approx(0.009)


def test_first_n_complete_trials_by_integer_id(archive):
    data = read_shallue(archive[0], num_trials=2)
    numbers = data.trials.query("cell_id == @CELL_64").set_index("trial_number")["status"]
    # Integer order: COMPLETE 1, 3 (string order would take 1, 10); INFEASIBLE 2 lies between.
    assert numbers.to_dict() == {1: "COMPLETE", 2: "INFEASIBLE", 3: "COMPLETE"}
    data = read_shallue(archive[0], num_trials=3, include_infeasible=False)
    assert data.trials.query("cell_id == @CELL_64")["trial_number"].tolist() == [1, 3, 10]
    with pytest.raises(ValueError, match="requested 4 COMPLETE trials"):
        read_shallue(archive[0], num_trials=4, prefix=CELL_128)


def test_steps_to_result_through_the_analysis(archive):
    results = {}
    for n in (2, 3):
        data = read_shallue(archive[0], num_trials=n)
        result = steps_to_result(data.trials, data.measurements, metric="val_error",
                                 threshold=0.01)
        results[n] = result.set_index("cell_id")
    # First 2 complete trials (1, 3): 3 wins at 200; with trial 10 it wins at 100.
    assert results[2].loc[CELL_64, "steps_to_result"] == 200
    assert results[2].loc[CELL_64, "examples_to_result"] == 200 * 64
    assert results[2].loc[CELL_64, "winner_trial_number"] == 3
    assert results[3].loc[CELL_64, "steps_to_result"] == 100
    assert results[2].loc[CELL_128, "steps_to_result"] == 50


def test_tar_bz2_stream_gives_the_same_frames_as_the_folder(archive):
    folder, tar_path = archive
    from_folder = read_shallue(folder, num_trials=2)
    from_tar = read_shallue(tar_path, num_trials=2)
    for name in ("cells", "trials", "measurements"):
        left = getattr(from_folder, name).sort_values(list(getattr(from_folder, name).columns[:2]))
        right = getattr(from_tar, name).sort_values(list(getattr(from_tar, name).columns[:2]))
        pd.testing.assert_frame_equal(left.reset_index(drop=True), right.reset_index(drop=True))
    only_64 = read_shallue(tar_path, prefix=CELL_64 + "/")
    assert list(only_64.cells["cell_id"]) == [CELL_64]


def test_goal_labels_trials_and_fills_their_steps(archive):
    data = read_shallue(archive[1], goal=Goal("val_error", 0.01))
    trials = data.trials.set_index("trial_number").loc[[1, 2, 3, 10, 11]]
    trials = trials.loc[trials["cell_id"] == CELL_64]
    assert trials["outcome"].tolist() == ["reached", "diverged", "reached", "reached",
                                          "not_reached"]
    assert trials["steps_to_result"].tolist() == pytest.approx([300, np.nan, 200, 100, np.nan],
                                                               nan_ok=True)


def test_parameter_configs_become_the_search_space(archive):
    space = read_shallue(archive[0]).cells["search_space"].iloc[0]
    assert space == search_space(PARAMETER_CONFIGS)
    assert space["learning_rate"] == {"low": 1e-4, "high": 10.0, "scale": "log"}
    assert space["momentum"]["scale"] == "reverse_log"
    assert space["weight"]["scale"] == "linear"
    assert space["decay_steps"] == {"low": 300, "high": 600, "scale": "integer"}
    assert space["label_smoothing"] == {"choices": [0.0, 0.01, 0.1], "scale": "choices"}
