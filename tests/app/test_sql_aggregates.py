"""The dashboard's SQL aggregates and incremental reads give exactly what the full in-memory
load and the reference functions give, on SQLite and on PostgreSQL, before and after
workers write: the raw trials query, the incrementally kept first on-target rows, the budget
table (ties and NaN rows included), the measurement summary and the probe keys."""
from __future__ import annotations

import itertools
from datetime import datetime, timezone
import math

import pandas as pd
import pandas.testing as pdt
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import data
from db import queries
from db.engine import make_engine
from db.models import Campaign, Cell, Measurement, Trial
from tests.app.conftest import CAMPAIGN, build_database

_names = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh copy of the dashboard's test database on each backend (the tests write)."""
    if request.param == "sqlite":
        return build_database(tmp_path / "aggregates.db")
    server = request.getfixturevalue("local_postgres")
    return build_database(server.create_database(f"aggregates_{next(_names)}"))


@pytest.fixture(params=[True, False], ids=["sql_first", "fold_all"])
def first_read_in_sql(request):
    """True: the first read is the SQL aggregate, later rows are folded in; False: every
    row goes through the fold."""
    return request.param


def _engine(url):
    return make_engine(url, read_only=True)


def _trials(url) -> dict:
    """(batch size, trial number) -> (trial id, outcome) of the demo campaign."""
    engine = make_engine(url)
    with Session(engine) as session:
        rows = session.execute(
            select(Trial.id, Trial.trial_number, Trial.outcome, Cell.batch_size)
            .join(Cell, Cell.id == Trial.cell_id).join(Campaign)
            .where(Campaign.name == CAMPAIGN)).all()
    engine.dispose()
    return {(r.batch_size, r.trial_number): (r.id, r.outcome) for r in rows}


def _write(url, rows: list[dict]) -> None:
    engine = make_engine(url)
    with Session(engine) as session:
        for row in rows:
            values = {"examples": row["step"] * 16, "epoch": row["step"] * 16 / 1000,
                      "wall_seconds": 0.1, "eval_seconds": 0.01, "learning_rate": 0.1,
                      "batch_size": 16, "train_loss": row.get("val_error"),
                      "val_loss": row.get("val_error"), "extra": {}} | row
            session.add(Measurement(**values))
        session.commit()
    engine.dispose()


def _ties_and_nan(url) -> list[dict]:
    """Rows that make the budget table's tie-breaking matter: two eligible trials of B=16
    with the same value at the same step (the lower trial id must win), a NaN row, an even
    better value on the diverged trial (never counts) and a new first on-target row."""
    trials = _trials(url)
    first, second = trials[(16, 0)][0], trials[(16, 1)][0]
    diverged = next(tid for (b, _), (tid, outcome) in trials.items()
                    if outcome == "diverged")
    return [{"trial_id": first, "step": 15, "val_error": 0.01},
            {"trial_id": second, "step": 15, "val_error": 0.01},
            {"trial_id": second, "step": 25, "val_error": float("nan")},
            {"trial_id": first, "step": 5, "val_error": 0.3},
            {"trial_id": diverged, "step": 5, "val_error": 0.0001},
            {"trial_id": trials[(32, 0)][0], "step": 35, "val_error": 0.07}]


def test_trials_fast_equals_trials(db_url):
    engine = _engine(db_url)
    for cid in queries.campaigns(engine)["id"]:
        pdt.assert_frame_equal(queries.trials_fast(engine, int(cid)),
                               queries.trials(engine, int(cid)))


def _assert_light_equals_full(engine, state):
    light = data.load_light_incremental(engine, CAMPAIGN, state)
    full = data.load_campaign_fast(engine, CAMPAIGN)
    pdt.assert_frame_equal(light.results(), full.results())
    pdt.assert_frame_equal(light.table, full.table)
    reference = data.load_campaign_light(engine, CAMPAIGN)
    pdt.assert_frame_equal(light.measurements.reset_index(drop=True),
                           reference.measurements.reset_index(drop=True), check_dtype=False)
    return light


def test_incremental_first_rows_equal_the_query_after_writes(db_url, first_read_in_sql):
    engine = _engine(db_url)
    state = data.IncrementalState(first_read_in_sql)
    before = _assert_light_equals_full(engine, state)
    _write(db_url, _ties_and_nan(db_url))
    after = _assert_light_equals_full(engine, state)
    # the new row at step 15 beats B=16's old result (160 steps)
    assert before.table.set_index("batch_size").loc[16, "steps_to_result"] == 160
    assert after.table.set_index("batch_size").loc[16, "steps_to_result"] == 15
    _assert_light_equals_full(engine, state)  # a refresh with nothing new


def _assert_budgets_equal(engine, state):
    light = data.load_light_incremental(engine, CAMPAIGN, state)
    full = data.load_campaign_fast(engine, CAMPAIGN)
    size = data.examples_per_epoch(full.measurements)
    for kind, budgets in (("steps", [5.0, 15.0, 20.0, 50.0, 160.0, 1e9]),
                          ("epochs", [0.08, 0.24, 0.5, 1.0, 100.0])):
        expected = data.budget_frame(full, budgets, kind, size)
        got = data.budget_table(engine, light, budgets, kind, size, state)
        pdt.assert_frame_equal(got, expected)
    return full


def test_budget_table_equals_best_under_budget(db_url, first_read_in_sql):
    engine = _engine(db_url)
    state = data.IncrementalState(first_read_in_sql)
    _assert_budgets_equal(engine, state)
    _write(db_url, _ties_and_nan(db_url))
    full = _assert_budgets_equal(engine, state)
    table = data.budget_frame(full, [15.0], "steps")
    winner = table.set_index("batch_size").loc[16]
    assert winner["best_value"] == 0.01 and winner["best_step"] == 15
    assert winner["best_trial_id"] == _trials(db_url)[(16, 0)][0]  # the tie: lower trial id


def _assert_summary_equal(engine, state):
    full = data.load_campaign_fast(engine, CAMPAIGN)
    got = data.measurement_summary(engine, full.info, state)
    m = full.measurements
    assert got.rows == len(m)
    assert got.max_step == float(m["step"].max())
    assert got.max_epoch == float(m["epoch"].max())
    assert got.examples_per_epoch == data.examples_per_epoch(m)


def test_measurement_summary_equals_full_load(db_url, first_read_in_sql):
    engine = _engine(db_url)
    state = data.IncrementalState(first_read_in_sql)
    _assert_summary_equal(engine, state)
    trial = _trials(db_url)[(16, 0)][0]
    _write(db_url, [{"trial_id": trial, "step": 7, "val_error": 0.5, "examples": 333,
                     "epoch": 0.3}, {"trial_id": trial, "step": 9, "val_error": 0.5,
                                     "epoch": 0.0}])
    _assert_summary_equal(engine, state)


def test_median_of_counts_is_numpy_median():
    values = [3.0, 1.0, 2.0, 2.0, 10.0, 7.5]
    for n in range(1, len(values) + 1):
        counts = pd.Series(values[:n]).value_counts()
        assert data.median_of_counts(counts) == float(pd.Series(values[:n]).median())
    assert math.isnan(data.median_of_counts(pd.Series(dtype="int64")))


def _assert_probes_equal(engine, state):
    full = data.load_campaign_fast(engine, CAMPAIGN)
    keys, trials = data.probe_summary(engine, full.info, state)
    assert keys == data.probe_keys(full.measurements)
    rows = full.measurements
    assert trials == sorted(int(t) for t in rows.loc[rows["extra"].map(bool), "trial_id"].unique())
    return keys


def test_probe_summary_equals_parsing_every_row(db_url, first_read_in_sql):
    engine = _engine(db_url)
    state = data.IncrementalState(first_read_in_sql)
    assert _assert_probes_equal(engine, state) == ["distance_from_init", "noise_scale"]
    trials = _trials(db_url)
    rows = [{"trial_id": trials[(32, 0)][0], "step": 5, "val_error": 0.5,
             "extra": {"flag": True, "grad_norm": 2}},
            {"trial_id": trials[(64, 0)][0], "step": 5, "val_error": 0.5, "extra": ["x"]}]
    if db_url.startswith("sqlite"):  # text SQLite's JSON functions refuse; PostgreSQL too
        rows.append({"trial_id": trials[(128, 0)][0], "step": 5, "val_error": 0.5,
                     "extra": {"odd": float("nan"), "label": "x"}})
    _write(db_url, rows)
    keys = _assert_probes_equal(engine, state)
    assert "grad_norm" in keys and "flag" not in keys
    fresh = data.IncrementalState()  # the SQL aggregate itself, with those rows in it
    _assert_probes_equal(engine, fresh)


def test_scaling_key_changes_only_with_the_bootstrap_inputs(dashboard_db, tmp_path):
    url = build_database(tmp_path / "scaling.db")
    engine = _engine(url)
    key = data.scaling_inputs_key(data.load_campaign_light(engine, CAMPAIGN))
    running = next(tid for tid, outcome in _trials(url).values() if outcome == "running")
    _write(url, [{"trial_id": running, "step": 5, "val_error": 0.01}])  # not finished
    assert data.scaling_inputs_key(data.load_campaign_light(engine, CAMPAIGN)) == key
    _write(url, [{"trial_id": _trials(url)[(64, 0)][0], "step": 5, "val_error": 0.01}])
    assert data.scaling_inputs_key(data.load_campaign_light(engine, CAMPAIGN)) != key


def test_incremental_trials_equal_a_full_read_after_workers_write(db_url):
    engine = _engine(db_url)
    state = data.IncrementalState()
    cid = int(queries.campaign_by_name(engine, CAMPAIGN)["id"])
    pdt.assert_frame_equal(data.campaign_trials(engine, cid, state),
                           data.report_campaign_trials(engine, cid))
    running = next(tid for tid, outcome in _trials(db_url).values() if outcome == "running")
    writer = make_engine(db_url)
    with Session(writer) as session:  # a worker finishes the running trial, starts another
        row = session.get(Trial, running)
        row.outcome, row.steps, row.finished_at = "reached", 40, datetime.now(timezone.utc)
        row.hparams = {"learning_rate": 0.5, "momentum": 0.95}
        session.add(Trial(cell_id=row.cell_id, optuna_trial_id=99, trial_number=-1,
                          outcome="running", hparams={}, config={}, seed=1))
        session.commit()
    writer.dispose()
    pdt.assert_frame_equal(data.campaign_trials(engine, cid, state),
                           data.report_campaign_trials(engine, cid))
    pdt.assert_frame_equal(data.campaign_trials(engine, cid, state),
                           data.report_campaign_trials(engine, cid))


def _maximising_campaign(url) -> int:
    """Campaign `acc` with target val_accuracy > 0.9 (maximised): one trial whose first
    evaluation is NaN and whose second (val_error 0.05) is the first to beat the target."""
    engine = make_engine(url)
    with Session(engine) as session:
        campaign = Campaign(name="acc", workload="digits_mlp", target_metric="val_accuracy",
                            target_threshold=0.9, target_mode="max", eval_every=10,
                            max_steps=100, trials_per_cell=1, sampler="random", spec={},
                            spec_text="")
        session.add(campaign)
        session.flush()
        cell = Cell(campaign_id=campaign.id, batch_size=32, optimizer="momentum",
                    schedule="constant", study_name="acc/bs=32", trials_planned=1,
                    trials_claimed=1)
        session.add(cell)
        session.flush()
        trial = Trial(cell_id=cell.id, optuna_trial_id=0, trial_number=0, outcome="reached",
                      hparams={"learning_rate": 0.1}, config={}, seed=0, steps=20,
                      steps_to_result=20)
        session.add(trial)
        session.flush()
        for step, error in ((10, float("nan")), (20, 0.05), (30, 0.04)):
            session.add(Measurement(trial_id=trial.id, step=step, examples=step * 32,
                                    epoch=step * 32 / 1000, wall_seconds=0.0,
                                    eval_seconds=0.0, learning_rate=0.1, batch_size=32,
                                    val_error=error, extra={}))
        session.commit()
        campaign_id = campaign.id
    engine.dispose()
    return campaign_id


def test_nan_never_beats_a_maximising_target(db_url, first_read_in_sql):
    """PostgreSQL sorts NaN above every number, so `1 - NaN > 0.9` held there and the NaN
    evaluation at step 10 was taken for the result; as in Python, NaN beats nothing."""
    campaign_id = _maximising_campaign(db_url)
    engine = _engine(db_url)
    firsts = queries.first_beating_measurements(engine, campaign_id, "val_accuracy", 0.9, "max")
    assert firsts[["step", "val_error"]].to_dict("records") == [{"step": 20, "val_error": 0.05}]
    state = data.IncrementalState(first_read_in_sql)
    for _ in range(2):  # the first read, then a refresh folding in nothing new
        light = data.load_light_incremental(engine, "acc", state)
        assert light.results()["steps_to_result"].tolist() == [20]
    full = data.load_campaign_fast(engine, "acc")
    pdt.assert_frame_equal(light.results(), full.results())
    engine.dispose()
