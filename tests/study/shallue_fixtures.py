"""Small archives in the exact layout of Shallue et al.'s published data
(spec/shallue-data-format.md), with known steps-to-result, for the importer and analysis tests.

`write_study` writes one study folder; `make_tar` packs a folder as .tar.bz2 the way the
release is packed; `scaling_archive` writes a whole workload whose best trial per batch
size follows S(B) = S_min (1 + B_crit / B), so the fit must recover S_min and B_crit.
"""
from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

PARAMETER_CONFIGS = {
    "learning_rate": {"type": "DOUBLE", "min_value": 1e-4, "max_value": 10.0, "scale": "LOG_SCALE"},
    "momentum": {"type": "DOUBLE", "min_value": 0.9, "max_value": 0.9999,
                 "scale": "REVERSE_LOG_SCALE"},
    "decay_steps": {"type": "INTEGER", "min_value": 300, "max_value": 600, "scale": ""},
    "label_smoothing": {"type": "DISCRETE", "feasible_points": [0.0, 0.01, 0.1]},
}


def write_study(root: Path, workload: str, optimizer: str, batch_size: int, trials: dict,
                parameter_configs: dict | None = None, train_steps: int = 300) -> Path:
    """`trials`: trial id -> (status, rows, parameters) with rows [(step, val error), ...]
    or a DataFrame with a `step` column and Shallue metric columns."""
    dataset, model = workload.split("/")[-2:]
    study_dir = Path(root, workload, optimizer, str(batch_size))
    study_dir.mkdir(parents=True)
    (study_dir / "study.json").write_text(json.dumps({
        "batch_size": batch_size, "dataset": dataset, "model": model, "optimizer": optimizer,
        "early_stopping": False, "train_steps": train_steps,
        "parameter_configs": parameter_configs or PARAMETER_CONFIGS}))
    for trial_id, (status, rows, parameters) in trials.items():
        trial_dir = study_dir / str(trial_id)
        trial_dir.mkdir()
        table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(
            rows, columns=["step", "val/classification_error"])
        if "train/cross_entropy_error" not in table:
            table["train/cross_entropy_error"] = 1.0
            table["test/classification_error"] = 0.5
        (trial_dir / "metadata.json").write_text(json.dumps({
            "parameters": parameters, "status": status, "steps": int(table["step"].max()),
            "trial_id": trial_id, "_internal_study_name": "x", "_internal_trial_id": 7}))
        table.to_csv(trial_dir / "measurements.csv", index=False)
    return study_dir


def make_tar(root: Path, tar_path: Path) -> Path:
    """Pack every top-level folder of `root` into a bzip2 tar (members in folder order)."""
    with tarfile.open(tar_path, "w:bz2") as tar:
        for top in sorted(Path(root).iterdir()):
            tar.add(top, arcname=top.name)
    return tar_path


def steps_curve(s_min: float, b_crit: float, batch_size: float) -> float:
    return s_min * (1.0 + b_crit / batch_size)


def scaling_archive(root: Path, *, s_min: float = 1000.0, b_crit: float = 256.0,
                    batch_sizes=tuple(2 ** k for k in range(4, 15)), n_trials: int = 8,
                    workload: str = "mnist/simple_cnn", optimizer: str = "nesterov_momentum",
                    goal: float = 0.01, seed: int = 0) -> dict[int, int]:
    """A workload whose trials at batch size B first beat `goal` at S(B) x (1 + penalty)
    steps, the penalty growing with the distance of the trial's learning rate from the
    best one (lr_opt = 0.1 B / 16 up to B_crit, then flat), the best trial having none.
    Evaluations every ~S(B)/40 steps (so the interval varies with B). Returns the exact
    steps-to-result per batch size (the first evaluated step at or after S(B))."""
    rng = np.random.default_rng(seed)
    expected = {}
    for batch_size in batch_sizes:
        target_steps = steps_curve(s_min, b_crit, batch_size)
        interval = max(1, int(target_steps // 40))
        lr_opt = 0.1 * min(batch_size, b_crit) / 16
        offsets = np.concatenate([[0.0], rng.uniform(-2, 2, n_trials - 1)])
        trials, firsts = {}, []
        for index, offset in enumerate(offsets):
            trial_id = 2 * index + 1  # odd ids: 1, 3, ..., 11, 13 (string order differs)
            first = target_steps * (1.0 + offset ** 2)
            first_eval = int(math.ceil(first / interval) * interval)
            firsts.append(first_eval)
            steps = np.arange(interval, first_eval + 3 * interval, interval)
            error = np.where(steps < first, 0.5, goal * 0.9)
            rows = pd.DataFrame({"step": steps, "val/classification_error": error})
            params = {"learning_rate": lr_opt * 2.0 ** offset, "momentum": 0.99}
            trials[trial_id] = ("COMPLETE", rows, params)
        # A diverged trial that "beats" the goal early, and an unfinished one: never count.
        trials[2] = ("INFEASIBLE", [(interval, 0.0)], {"learning_rate": 9.0, "momentum": 0.999})
        trials[4] = ("INCOMPLETE", [(interval, 0.0)], {"learning_rate": 0.5, "momentum": 0.99})
        write_study(root, workload, optimizer, batch_size, trials)
        expected[batch_size] = min(firsts)
    return expected
