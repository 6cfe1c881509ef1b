"""Read queries shared by the CLI, the analysis and the dashboard, as pandas frames."""
from __future__ import annotations

import pandas as pd
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from db.models import Campaign, Cell, Measurement, ProbeResult, Trial, Worker


def campaigns(engine: Engine) -> pd.DataFrame:
    columns = [Campaign.id, Campaign.name, Campaign.workload, Campaign.target_metric,
               Campaign.target_threshold, Campaign.target_mode, Campaign.eval_every,
               Campaign.max_steps, Campaign.trials_per_cell, Campaign.sampler, Campaign.created_at]
    return _frame(engine, select(*columns).order_by(Campaign.id))


def campaign_by_name(engine: Engine, name: str) -> dict | None:
    frame = campaigns(engine)
    rows = frame.loc[frame["name"] == name]
    return None if rows.empty else rows.iloc[0].to_dict()


def cell_results(engine: Engine, campaign_id: int) -> pd.DataFrame:
    """The `bl_cell_results` view: progress and steps-to-result per cell."""
    query = text("SELECT * FROM bl_cell_results WHERE campaign_id = :cid ORDER BY optimizer, "
                 "schedule, batch_size")
    with engine.connect() as connection:
        return pd.read_sql(query, connection, params={"cid": campaign_id})


def cells(engine: Engine, campaign_id: int) -> pd.DataFrame:
    query = (select(Cell.id.label("cell_id"), Cell.batch_size, Cell.optimizer, Cell.schedule,
                    Cell.trials_planned, Cell.study_name)
             .where(Cell.campaign_id == campaign_id).order_by(Cell.id))
    return _frame(engine, query)


def trials(engine: Engine, campaign_id: int) -> pd.DataFrame:
    query = (select(Trial.id.label("trial_id"), Trial.cell_id, Trial.trial_number, Trial.outcome,
                    Trial.hparams, Trial.seed, Trial.steps, Trial.examples, Trial.wall_seconds,
                    Trial.steps_to_result, Trial.examples_to_result, Trial.seconds_to_result,
                    Trial.best_metric, Trial.message, Trial.worker_id, Trial.device, Trial.host,
                    Trial.started_at, Trial.finished_at, Cell.batch_size, Cell.optimizer,
                    Cell.schedule)
             .join(Cell, Cell.id == Trial.cell_id)
             .where(Cell.campaign_id == campaign_id).order_by(Trial.cell_id, Trial.trial_number))
    return _frame(engine, query)


def measurements(engine: Engine, campaign_id: int) -> pd.DataFrame:
    query = (select(Measurement.trial_id, Measurement.step, Measurement.examples,
                    Measurement.epoch, Measurement.wall_seconds, Measurement.eval_seconds,
                    Measurement.learning_rate, Measurement.batch_size, Measurement.train_loss,
                    Measurement.val_loss, Measurement.val_error, Measurement.extra)
             .join(Trial, Trial.id == Measurement.trial_id).join(Cell, Cell.id == Trial.cell_id)
             .where(Cell.campaign_id == campaign_id).order_by(Measurement.trial_id, Measurement.step))
    frame = _frame(engine, query)
    frame["val_accuracy"] = 1.0 - frame["val_error"]
    return frame


def workers(engine: Engine, campaign_id: int) -> pd.DataFrame:
    query = (select(Worker.id, Worker.host, Worker.pid, Worker.device, Worker.status,
                    Worker.started_at, Worker.heartbeat_at, Worker.trials_done, Worker.current_trial_id)
             .where(Worker.campaign_id == campaign_id).order_by(Worker.started_at))
    return _frame(engine, query)


def trial_checkpoints(engine: Engine, campaign_id: int) -> pd.DataFrame:
    """Trials with their cell, outcome, steps to result, saved weights (`checkpoint_path`,
    NULL when none) and resolved config (JSON), for the post-training probes."""
    query = (select(Trial.id.label("trial_id"), Trial.cell_id, Trial.trial_number, Trial.outcome,
                    Trial.steps_to_result, Trial.checkpoint_path, Trial.config, Cell.batch_size,
                    Cell.optimizer, Cell.schedule)
             .join(Cell, Cell.id == Trial.cell_id)
             .where(Cell.campaign_id == campaign_id).order_by(Trial.cell_id, Trial.trial_number))
    return _frame(engine, query)


def probe_results(engine: Engine, campaign_id: int, kind: str | None = None) -> pd.DataFrame:
    """Rows of bl_probe_results (params and result as stored JSON), with the cell's batch
    size, optimizer and schedule where the row names a cell; oldest first."""
    query = (select(ProbeResult.id, ProbeResult.cell_id, ProbeResult.trial_id, ProbeResult.kind,
                    ProbeResult.params, ProbeResult.result, ProbeResult.created_at,
                    Cell.batch_size, Cell.optimizer, Cell.schedule)
             .outerjoin(Cell, Cell.id == ProbeResult.cell_id)
             .where(ProbeResult.campaign_id == campaign_id).order_by(ProbeResult.id))
    if kind is not None:
        query = query.where(ProbeResult.kind == kind)
    return _frame(engine, query)


def _frame(engine: Engine, query) -> pd.DataFrame:
    with Session(engine) as session:
        result = session.execute(query)
        return pd.DataFrame(result.all(), columns=list(result.keys()))


# ---- for the dashboard: cheap change detection, fast bulk loads, one trial's provenance ----
def data_version(engine: Engine) -> tuple:
    """A cheap fingerprint that changes whenever workers write: campaigns, cells, trials
    (count, newest id, latest finish, how many run), newest measurement and probe result.
    The dashboard keys its caches on it (MAX(id) is an index lookup; the one scan is over
    bl_trials, not bl_measurements)."""
    sql = ("SELECT (SELECT MAX(id) FROM bl_campaigns), (SELECT COUNT(*) FROM bl_cells), "
           "(SELECT MAX(id) FROM bl_measurements), (SELECT MAX(id) FROM bl_probe_results), "
           "COUNT(*), MAX(id), MAX(finished_at), "
           "SUM(CASE WHEN outcome = 'running' THEN 1 ELSE 0 END), "
           "SUM(CASE WHEN outcome = 'abandoned' THEN 1 ELSE 0 END), MAX(trial_number) "
           "FROM bl_trials")
    with engine.connect() as connection:
        row = connection.exec_driver_sql(sql).one()
    return tuple(str(v) for v in row)


def measurements_fast(engine: Engine, campaign_id: int) -> pd.DataFrame:
    """What `measurements` returns (same columns, rows and order; `extra` still the stored
    JSON text) through one raw query, without building ORM rows: for large campaigns."""
    sql = ("SELECT m.trial_id, m.step, m.examples, m.epoch, m.wall_seconds, m.eval_seconds, "
           "m.learning_rate, m.batch_size, m.train_loss, m.val_loss, m.val_error, m.extra "
           "FROM bl_measurements m WHERE m.trial_id IN (SELECT t.id FROM bl_trials t "
           "JOIN bl_cells c ON c.id = t.cell_id WHERE c.campaign_id = :cid) "
           "ORDER BY m.trial_id, m.step")  # IN: walks the (trial_id, step) index, no sort
    with engine.connect() as connection:
        result = connection.execute(text(sql), {"cid": int(campaign_id)})
        columns = list(result.keys())
        frame = pd.DataFrame(result.cursor.fetchall(), columns=columns)
    for column in ("train_loss", "val_loss", "val_error"):
        frame[column] = frame[column].astype(float)
    frame["val_accuracy"] = 1.0 - frame["val_error"]
    return frame


def trial_provenance(engine: Engine, trial_id: int) -> dict | None:
    """One trial's provenance: code version (git commit, dirty flag), package versions,
    device, host, seed, attempt / attempt_of, worker, times, checkpoint and the resolved
    config, with its cell and campaign; None when there is no such trial."""
    query = (select(Trial.id.label("trial_id"), Trial.trial_number, Trial.optuna_trial_id,
                    Trial.outcome, Trial.code_version, Trial.package_versions, Trial.device,
                    Trial.host, Trial.seed, Trial.attempt, Trial.attempt_of, Trial.worker_id,
                    Trial.started_at, Trial.finished_at, Trial.heartbeat_at, Trial.checkpoint_path,
                    Trial.hparams, Trial.config, Trial.message, Trial.cell_id, Cell.batch_size,
                    Cell.optimizer, Cell.schedule, Cell.study_name, Cell.campaign_id)
             .join(Cell, Cell.id == Trial.cell_id).where(Trial.id == int(trial_id)))
    frame = _frame(engine, query)
    return None if frame.empty else frame.iloc[0].to_dict()


# ---- per-campaign change detection and SQL-side steps-to-result (dashboard hot paths) ----
def max_measurement_id(engine: Engine) -> int:
    """The newest measurement id in the database (a primary-key lookup); 0 when none."""
    with engine.connect() as connection:
        return int(connection.exec_driver_sql("SELECT MAX(id) FROM bl_measurements").scalar() or 0)


def campaign_measurement_max(engine: Engine, campaign_id: int, after_id: int) -> int | None:
    """The newest id among the campaign's measurements with id > `after_id` (None when there
    is none): walks only the rows written since `after_id` (primary-key range)."""
    sql = ("SELECT MAX(m.id) FROM bl_measurements m JOIN bl_trials t ON t.id = m.trial_id "
           "JOIN bl_cells c ON c.id = t.cell_id WHERE m.id > :after AND c.campaign_id = :cid")
    with engine.connect() as connection:
        value = connection.execute(text(sql), {"after": int(after_id),
                                               "cid": int(campaign_id)}).scalar()
    return None if value is None else int(value)


def campaign_trial_version(engine: Engine, campaign_id: int) -> tuple:
    """A fingerprint of one campaign's campaign row, cells, trials and probe results: what
    `data_version` checks, restricted to the campaign (bl_trials rows of its cells only)."""
    sql = ("SELECT (SELECT COUNT(*) FROM bl_cells WHERE campaign_id = :cid), "
           "(SELECT MAX(id) FROM bl_probe_results WHERE campaign_id = :cid), "
           "COUNT(*), MAX(t.id), MAX(t.finished_at), "
           "SUM(CASE WHEN t.outcome = 'running' THEN 1 ELSE 0 END), "
           "SUM(CASE WHEN t.outcome = 'abandoned' THEN 1 ELSE 0 END), MAX(t.trial_number), "
           "SUM(CASE WHEN t.outcome = 'reached' THEN 1 ELSE 0 END) "
           "FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id WHERE c.campaign_id = :cid")
    with engine.connect() as connection:
        row = connection.execute(text(sql), {"cid": int(campaign_id)}).one()
    return tuple(str(v) for v in row)


# metrics the SQL side can compare (bl_measurements columns; val_accuracy is derived)
SQL_METRICS = {"val_error": "m.val_error", "val_loss": "m.val_loss",
               "train_loss": "m.train_loss", "val_accuracy": "(1.0 - m.val_error)"}


def first_beating_measurements(engine: Engine, campaign_id: int, metric: str,
                               threshold: float, mode: str) -> pd.DataFrame | None:
    """Per trial of the campaign (any outcome), its first measurement whose `metric`
    strictly beats `threshold` (NULL never beats): columns as `measurements_fast`, rows
    ordered by (trial_id, step). `study.analysis.steps_to_result` and the bootstrap only
    read these rows, so they give the same results from this frame as from all rows.
    None when `metric` is not a column the query can compare (see SQL_METRICS)."""
    if metric not in SQL_METRICS or mode not in ("min", "max"):
        return None
    expr, op = SQL_METRICS[metric], "<" if mode == "min" else ">"
    beats = f"{expr} {op} :thr"
    sql = ("SELECT m.trial_id, m.step, m.examples, m.epoch, m.wall_seconds, m.eval_seconds, "
           "m.learning_rate, m.batch_size, m.train_loss, m.val_loss, m.val_error, m.extra "
           "FROM bl_measurements m JOIN (SELECT m.trial_id AS tid, MIN(m.step) AS first_step "
           "FROM bl_measurements m WHERE m.trial_id IN (SELECT t.id FROM bl_trials t "
           "JOIN bl_cells c ON c.id = t.cell_id WHERE c.campaign_id = :cid) "
           f"AND {beats} GROUP BY m.trial_id) f ON f.tid = m.trial_id AND f.first_step = m.step "
           f"WHERE {beats} ORDER BY m.trial_id, m.step")
    with engine.connect() as connection:
        result = connection.execute(text(sql), {"cid": int(campaign_id), "thr": float(threshold)})
        frame = pd.DataFrame(result.cursor.fetchall(), columns=list(result.keys()))
    for column in ("train_loss", "val_loss", "val_error"):
        frame[column] = frame[column].astype(float)
    frame["val_accuracy"] = 1.0 - frame["val_error"]
    return frame


def measurements_of_trials(engine: Engine, trial_ids) -> pd.DataFrame:
    """`measurements_fast`'s columns for the given trials only, ordered by (trial_id, step)."""
    ids = sorted({int(t) for t in trial_ids})
    columns = ["trial_id", "step", "examples", "epoch", "wall_seconds", "eval_seconds",
               "learning_rate", "batch_size", "train_loss", "val_loss", "val_error", "extra"]
    rows = []
    with engine.connect() as connection:
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            params = {f"t{i}": t for i, t in enumerate(chunk)}
            sql = (f"SELECT m.{', m.'.join(columns)} FROM bl_measurements m WHERE m.trial_id IN "
                   f"({', '.join(':' + k for k in params)}) ORDER BY m.trial_id, m.step")
            rows.extend(connection.execute(text(sql), params).cursor.fetchall())
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("train_loss", "val_loss", "val_error"):
        frame[column] = frame[column].astype(float)
    frame["val_accuracy"] = 1.0 - frame["val_error"]
    return frame
