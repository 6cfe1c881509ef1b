"""`torchrun --nproc_per_node=2 -m study.cli worker`: one trial spans two processes,
rank 0 alone writes to storage, and the stored results equal a one-process worker's."""
import os
import subprocess
import sys
import textwrap

import pytest

from db import queries
from db.engine import make_engine
from study.campaigns import create_campaign
from study.results import campaign_info
from study.spec import parse_spec

pytestmark = pytest.mark.slow

SPEC = textwrap.dedent("""
    [campaign]
    name = "ranks"
    workload = "digits_mlp"
    batch_sizes = [75]
    optimizers = ["momentum"]
    schedules = ["constant"]
    trials_per_cell = 2
    max_steps = 100
    eval_every = 10
    prune = false

    [target]
    metric = "val_error"
    threshold = 0.06

    [search_space.optimizer.momentum]
    learning_rate = { low = 0.01, high = 0.3, scale = "log" }
    momentum = 0.9
""")


def campaign(tmp_path, name):
    url = f"sqlite:///{tmp_path / name}.db"
    engine = make_engine(url)
    create_campaign(engine, url, parse_spec(SPEC, "ranks.toml"))
    return url, engine


def stored(engine):
    info = campaign_info(engine, "ranks")
    trials = queries.trials(engine, info.id).sort_values("trial_number")
    ms = queries.measurements(engine, info.id).merge(trials[["trial_id", "trial_number"]], on="trial_id")
    return trials, ms.sort_values(["trial_number", "step"]).reset_index(drop=True)


def test_two_rank_worker_equals_one_process_worker(tmp_path):
    worker = [sys.executable, "-m", "study.cli", "worker", "--campaign", "ranks", "--device", "cpu"]
    one_url, one_engine = campaign(tmp_path, "one")
    single = subprocess.run(worker + ["--storage", one_url], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    two_url, two_engine = campaign(tmp_path, "two")
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2", "-m", "study.cli", *worker[3:], "--storage", two_url],
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # a crash shows its Python stack
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    (t1, m1), (t2, m2) = stored(one_engine), stored(two_engine)
    assert len(t2) == 2 and t2["worker_id"].nunique() == 1  # rank 0 alone wrote
    assert t1["outcome"].tolist() == t2["outcome"].tolist()
    assert t1["steps_to_result"].fillna(-1).tolist() == t2["steps_to_result"].fillna(-1).tolist()
    assert m1[["trial_number", "step", "examples"]].equals(m2[["trial_number", "step", "examples"]])
    assert m2["val_loss"].to_numpy() == pytest.approx(m1["val_loss"].to_numpy(), rel=1e-4)
