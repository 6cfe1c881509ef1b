"""Schema migrations: a database made by schema version 1 (the DDL snapshot in
fixtures/) is upgraded in place by ensure_schema, on SQLite and PostgreSQL, and keeps
its rows."""
from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.models import SCHEMA_VERSION
from db.schema import ensure_schema, schema_version

FIXTURES = Path(__file__).parent / "fixtures"
V2_COLUMNS = {"heartbeat_at", "attempt", "attempt_of"}
V3_PROBE_COLUMNS = {"id", "campaign_id", "cell_id", "trial_id", "kind", "params", "result", "created_at"}


def load_v1(engine: sa.Engine, dialect: str) -> None:
    """Create the v1 schema from its snapshot and one campaign, cell and two trials."""
    statements = (FIXTURES / f"schema_v1_{dialect}.sql").read_text().split("\n;\n")
    with engine.begin() as connection:
        for statement in statements:
            body = "\n".join(line for line in statement.splitlines() if not line.startswith("--"))
            if body.strip():
                connection.exec_driver_sql(body)
        connection.execute(sa.text(
            "INSERT INTO bl_campaigns (id, name, workload, target_metric, target_threshold, "
            "target_mode, eval_every, max_steps, trials_per_cell, sampler, spec, spec_text, created_at) "
            "VALUES (1, 'old', 'digits_mlp', 'val_error', 0.1, 'min', 10, 100, 2, 'quasi_random', "
            "'{}', '', CURRENT_TIMESTAMP)"))
        connection.execute(sa.text(
            "INSERT INTO bl_cells (id, campaign_id, batch_size, optimizer, schedule, study_name, "
            "trials_planned, trials_claimed) VALUES (1, 1, 32, 'sgd', 'constant', 'old/bs=32', 2, 2)"))
        for trial_id, outcome, steps in ((1, "reached", 40), (2, "running", None)):
            connection.execute(sa.text(
                "INSERT INTO bl_trials (id, cell_id, optuna_trial_id, trial_number, outcome, hparams, "
                "config, seed, steps_to_result, message, device, host, code_version, "
                "package_versions, started_at) VALUES (:id, 1, :id, :number, :outcome, :hparams, "
                "'{}', 7, :steps, '', 'cpu', 'h', 'v1', '{}', '2024-01-02 03:04:05')"),
                {"id": trial_id, "number": trial_id - 1, "outcome": outcome, "steps": steps,
                 "hparams": json.dumps({"learning_rate": 0.5})})
        connection.execute(sa.text(
            "INSERT INTO bl_measurements (trial_id, step, examples, epoch, wall_seconds, eval_seconds, "
            "learning_rate, batch_size, val_error, extra) VALUES (1, 40, 1280, 1.0, 0.5, 0.1, 0.5, 32, "
            "0.05, '{}')"))


def check_upgraded(engine: sa.Engine) -> None:
    columns = {c["name"] for c in sa.inspect(engine).get_columns("bl_trials")}
    assert V2_COLUMNS <= columns and "checkpoint_path" in columns
    assert schema_version(engine) == SCHEMA_VERSION == 4
    assert "grace_seconds" in {c["name"] for c in sa.inspect(engine).get_columns("bl_workers")}
    probe_columns = {c["name"] for c in sa.inspect(engine).get_columns("bl_probe_results")}
    assert probe_columns == V3_PROBE_COLUMNS
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT id, outcome, steps_to_result, hparams, attempt, attempt_of, heartbeat_at, "
            "started_at FROM bl_trials ORDER BY id")).all()
        versions = connection.execute(sa.text("SELECT version FROM bl_schema_version ORDER BY version")).scalars().all()
        view = connection.execute(sa.text("SELECT trials_finished, trials_running, steps_to_result "
                                          "FROM bl_cell_results")).one()
        measurements = connection.execute(sa.text("SELECT COUNT(*) FROM bl_measurements")).scalar()
    assert [(r.id, r.outcome, r.steps_to_result) for r in rows] == [(1, "reached", 40), (2, "running", None)]
    hparams = rows[0].hparams if isinstance(rows[0].hparams, dict) else json.loads(rows[0].hparams)
    assert hparams == {"learning_rate": 0.5}
    assert [r.attempt for r in rows] == [1, 1] and [r.attempt_of for r in rows] == [None, None]
    # The running v1 trial got its start time as heartbeat, so the reaper can judge it.
    assert rows[0].heartbeat_at is None and rows[1].heartbeat_at is not None
    assert str(rows[1].heartbeat_at)[:19] == str(rows[1].started_at)[:19]
    assert versions == [1, 2, 3, 4]
    assert tuple(view) == (1, 1, 40) and measurements == 1
    check_v3_usable(engine)


def check_v3_usable(engine: sa.Engine) -> None:
    """Old trials have no checkpoint; the new table takes a probe result with JSON."""
    from sqlalchemy.orm import Session
    from db.models import ProbeResult, Trial
    with Session(engine) as session, session.begin():
        assert [t.checkpoint_path for t in session.query(Trial).order_by(Trial.id)] == [None, None]
        session.query(ProbeResult).delete()  # idempotence check runs this twice
        session.add(ProbeResult(campaign_id=1, cell_id=1, trial_id=1, kind="sharpness",
                                params={"epsilon": 1e-3}, result={"sharpness": 1.5}))
    with Session(engine) as session:
        row = session.query(ProbeResult).one()
        assert (row.kind, row.params, row.result) == ("sharpness", {"epsilon": 1e-3}, {"sharpness": 1.5})


def test_sqlite_v1_database_is_upgraded(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'v1.db'}")
    load_v1(engine, "sqlite")
    assert schema_version(engine) == 1
    ensure_schema(engine)
    check_upgraded(engine)
    ensure_schema(engine)  # idempotent: nothing left to apply
    check_upgraded(engine)


def test_postgres_v1_database_is_upgraded(local_postgres):
    engine = make_engine(local_postgres.create_database(f"v1_{uuid.uuid4().hex[:8]}"))
    try:
        load_v1(engine, "postgresql")
        ensure_schema(engine)
        check_upgraded(engine)
    finally:
        engine.dispose()


def test_concurrent_ensure_schema_on_postgres(local_postgres):
    """Eight processes' worth of ensure_schema at once, on a v1 database: one upgrade."""
    url = local_postgres.create_database(f"race_{uuid.uuid4().hex[:8]}")
    first = make_engine(url)
    load_v1(first, "postgresql")
    engines = [make_engine(url) for _ in range(8)]
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ensure_schema, engines))
        check_upgraded(first)
    finally:
        for engine in (first, *engines):
            engine.dispose()


def test_fresh_database_gets_the_newest_schema(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    ensure_schema(engine)
    assert schema_version(engine) == SCHEMA_VERSION
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT version FROM bl_schema_version")).scalars().all() == [SCHEMA_VERSION]


def test_newer_database_is_refused(tmp_path):
    from db.engine import StorageError
    engine = make_engine(f"sqlite:///{tmp_path / 'future.db'}")
    ensure_schema(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO bl_schema_version (version, applied_at) "
                                   "VALUES (99, CURRENT_TIMESTAMP)"))
    with pytest.raises(StorageError, match="schema version 99 is newer"):
        ensure_schema(engine)
