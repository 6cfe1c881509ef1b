"""Four worker processes on one SQLite file finish a campaign with exactly the planned
number of trials per cell, no repeated quasi-random point and no lock failures."""
import textwrap

import optuna
import pytest

from db import queries
from db.engine import make_engine
from study.results import campaign_info
from study.tuning import optuna_storage
from tests.study.conftest import batchlab

pytestmark = pytest.mark.slow

SPEC = textwrap.dedent("""
    [campaign]
    name = "four"
    workload = "digits_mlp"
    batch_sizes = [8, 32, 128]
    optimizers = ["sgd", "momentum"]
    schedules = ["constant"]
    trials_per_cell = 4
    max_steps = 100
    eval_every = 10
    prune = false

    [target]
    metric = "val_error"
    threshold = 0.02

    [search_space.optimizer.sgd]
    learning_rate = { low = 0.01, high = 1.0, scale = "log" }

    [search_space.optimizer.momentum]
    learning_rate = { low = 0.01, high = 1.0, scale = "log" }
    momentum = 0.9
""")


def test_four_workers_exact_counts(tmp_path):
    spec = tmp_path / "four.toml"
    spec.write_text(SPEC)
    url = f"sqlite:///{tmp_path / 'four.db'}"
    result = batchlab("run", str(spec), "--storage", url, "--workers", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "locked" not in result.stderr.lower() and "Traceback" not in result.stderr
    engine = make_engine(url)
    info = campaign_info(engine, "four")
    trials = queries.trials(engine, info.id)
    assert trials.groupby("cell_id").size().tolist() == [4] * 6
    assert not trials["outcome"].isin(["failed", "running", "abandoned"]).any()
    assert trials["worker_id"].nunique() == 4  # every worker did some of the work
    for cell_id, group in trials.groupby("cell_id"):
        points = {tuple(sorted(h.items())) for h in group["hparams"]}
        assert len(points) == 4  # no quasi-random point was drawn twice
        assert sorted(group["trial_number"]) == [0, 1, 2, 3]
    storage = optuna_storage(url)
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        assert [t.state.name for t in study.trials].count("WAITING") == 0
        assert len(study.trials) == 4
    workers = queries.workers(engine, info.id)
    assert len(workers) == 4 and set(workers["status"]) == {"finished"}
    assert workers["trials_done"].sum() == 24
