"""Read queries shared by the CLI, the analysis and the dashboard, as pandas frames."""
from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime

import pandas as pd
from sqlalchemy import JSON, Connection, DateTime, Engine, bindparam, or_, select, text
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
    return _frame(engine, _trials_query(campaign_id))


def trials_fast(engine: Engine | Connection, campaign_id: int, *, after_id: int | None = None,
                ids=()) -> pd.DataFrame:
    """What `trials` returns (same columns, values and order) without building ORM rows:
    the driver's rows, with JSON and timestamps converted as SQLAlchemy would. With
    `after_id`: only the trials with id > after_id or id in `ids` (what changed since a
    snapshot: new rows, and the ones that were running; a finished row never changes)."""
    query = _trials_query(campaign_id)
    if after_id is None:
        return _core_frame(engine, query)
    ids = sorted({int(t) for t in ids})
    chunks = [ids[i:i + 500] for i in range(0, len(ids), 500)]
    query = query.where(or_(Trial.id > int(after_id), *[Trial.id.in_(c) for c in chunks]))
    return _core_frame(engine, query)


def trial_count(engine: Engine | Connection, campaign_id: int) -> int:
    sql = ("SELECT COUNT(*) FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id "
           "WHERE c.campaign_id = :cid")
    with connected(engine) as connection:
        return int(connection.execute(text(sql), {"cid": int(campaign_id)}).scalar() or 0)


def _trials_query(campaign_id: int):
    return (select(Trial.id.label("trial_id"), Trial.cell_id, Trial.trial_number, Trial.outcome,
                    Trial.hparams, Trial.seed, Trial.steps, Trial.examples, Trial.wall_seconds,
                    Trial.steps_to_result, Trial.examples_to_result, Trial.seconds_to_result,
                    Trial.best_metric, Trial.message, Trial.worker_id, Trial.device, Trial.host,
                    Trial.started_at, Trial.finished_at, Cell.batch_size, Cell.optimizer,
                    Cell.schedule)
             .join(Cell, Cell.id == Trial.cell_id)
             .where(Cell.campaign_id == campaign_id).order_by(Trial.cell_id, Trial.trial_number))


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


def _core_frame(engine: Engine | Connection, query) -> pd.DataFrame:
    """`_frame` for large results: the Core statement's raw driver rows (no ORM or
    result-processing per row); JSON text is parsed (each distinct text once) and SQLite's
    timestamp text turned into datetimes, as SQLAlchemy's types do."""
    columns = list(query.selected_columns)
    with connected(engine) as connection:
        result = connection.execute(query)
        names = list(result.keys())
        rows = result.cursor.fetchall()
    if not rows:
        return pd.DataFrame(rows, columns=names)
    values = [list(v) for v in zip(*rows)]
    for i, column in enumerate(columns):
        if isinstance(column.type, JSON):
            values[i] = _parse_json_values(values[i])
        elif isinstance(column.type, DateTime):
            values[i] = [datetime.fromisoformat(v) if isinstance(v, str) else v
                         for v in values[i]]
    return pd.DataFrame(dict(zip(names, values)), columns=names)


def _parse_json_values(values: list) -> list:
    parsed: dict = {}
    out = []
    for value in values:
        if isinstance(value, str):
            if value not in parsed:
                parsed[value] = json.loads(value)
            value = parsed[value]
        out.append(value)
    return out


# ---- for the dashboard: cheap change detection, fast bulk loads, one trial's provenance ----
def data_version(engine: Engine) -> tuple:
    """A cheap fingerprint that changes whenever workers write: campaigns, cells, trials
    (count, newest id, latest finish, how many run), newest measurement, probe results
    (newest id and count: a PostgreSQL transaction can commit a row below the newest id).
    The dashboard keys its caches on it (MAX(id) is an index lookup; the scans are over
    bl_trials and bl_probe_results, not bl_measurements)."""
    sql = ("SELECT (SELECT MAX(id) FROM bl_campaigns), (SELECT COUNT(*) FROM bl_cells), "
           "(SELECT MAX(id) FROM bl_measurements), (SELECT MAX(id) FROM bl_probe_results), "
           "(SELECT COUNT(*) FROM bl_probe_results), "
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
@contextmanager
def connected(bind: Engine | Connection):
    """`bind` itself when it is a Connection (its transaction, hence its snapshot, is the
    caller's), else a new connection of the engine."""
    if isinstance(bind, Connection):
        yield bind
    else:
        with bind.connect() as connection:
            yield connection


def max_measurement_id(bind: Engine | Connection) -> int:
    """The newest measurement id in the database (a primary-key lookup); 0 when none."""
    with connected(bind) as connection:
        return int(connection.exec_driver_sql("SELECT MAX(id) FROM bl_measurements").scalar() or 0)


def measurement_writers(bind: Engine | Connection) -> frozenset[str]:
    """PostgreSQL: the transactions that may still commit bl_measurements rows, by virtual
    transaction id: those holding (or waiting for) the lock every INSERT takes on the table
    before its ids are drawn from the sequence, and keeps until the transaction ends.
    Live (pg_locks is no snapshot). Empty on SQLite, whose writers commit one at a time and
    in id order (a row never appears below an id already visible)."""
    if bind.dialect.name != "postgresql":
        return frozenset()
    sql = ("SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation' "
           "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
           "AND relation = to_regclass('bl_measurements') AND mode = 'RowExclusiveLock'")
    with connected(bind) as connection:
        return frozenset(str(v) for v in connection.exec_driver_sql(sql).scalars())


def missing_measurement_ids(bind: Engine | Connection, after_id: int,
                            upto_id: int) -> list[tuple[int, int]]:
    """The ranges (first, last) of ids in (after_id, upto_id] with no visible
    bl_measurements row, read off the primary key alone."""
    if upto_id <= after_id:
        return []
    bounds = {"after": int(after_id), "upto": int(upto_id)}
    inner = ("SELECT id, LEAD(id) OVER (ORDER BY id) AS next_id FROM bl_measurements "
             "WHERE id > :after AND id <= :upto")
    with connected(bind) as connection:
        low, high = connection.execute(text(
            "SELECT MIN(id), MAX(id) FROM bl_measurements WHERE id > :after AND id <= :upto"),
            bounds).one()
        if low is None:
            return [(int(after_id) + 1, int(upto_id))]
        holes = connection.execute(text(
            f"SELECT id + 1, next_id - 1 FROM ({inner}) AS ids WHERE next_id > id + 1 "
            "ORDER BY id"), bounds).all()
    ranges = [(int(after_id) + 1, int(low) - 1)] if low > after_id + 1 else []
    ranges += [(int(a), int(b)) for a, b in holes]
    if high < upto_id:
        ranges.append((int(high) + 1, int(upto_id)))
    return ranges


def _in_ranges(connection: Connection, ranges) -> tuple[str, dict]:
    """(a FROM item `g` with columns first_id, last_id holding `ranges`, its parameters)."""
    if connection.dialect.name == "postgresql":
        return ("unnest(CAST(:firsts AS BIGINT[]), CAST(:lasts AS BIGINT[])) AS g(first_id, last_id)",
                {"firsts": [int(a) for a, _ in ranges], "lasts": [int(b) for _, b in ranges]})
    values = " UNION ALL ".join(f"SELECT :f{i} AS first_id, :l{i} AS last_id"
                                for i in range(len(ranges)))
    params = {f"f{i}": int(a) for i, (a, _) in enumerate(ranges)}
    params.update({f"l{i}": int(b) for i, (_, b) in enumerate(ranges)})
    return f"({values}) AS g", params


def present_measurement_ids(bind: Engine | Connection, ranges) -> list[int]:
    """The ids of the visible bl_measurements rows within the (first, last) `ranges`
    (each an index range scan), sorted."""
    if not ranges:
        return []
    with connected(bind) as connection:
        source, params = _in_ranges(connection, ranges)
        sql = (f"SELECT m.id FROM {source} JOIN bl_measurements m "
               "ON m.id BETWEEN g.first_id AND g.last_id ORDER BY m.id")
        return [int(v) for v in connection.execute(text(sql), params).scalars()]


def _campaign_rows(select_list: str, campaign_id: int, after_id: int, upto_id: int | None,
                   ids) -> tuple[str, dict]:
    """(SQL, parameters; run it through `_query`) for the campaign's measurements with after_id < id <= upto_id (no
    upper bound when None) or an id in `ids` (below after_id): primary-key lookups, each
    row joined to the campaign's trials."""
    joins = "JOIN bl_trials t ON t.id = m.trial_id JOIN bl_cells c ON c.id = t.cell_id"
    params = {"after": int(after_id), "cid": int(campaign_id)}
    upper = ""
    if upto_id is not None:
        upper, params["upto"] = " AND m.id <= :upto", int(upto_id)
    sql = (f"SELECT {select_list} FROM bl_measurements m {joins} WHERE m.id > :after{upper} "
           "AND c.campaign_id = :cid")
    if ids:
        params["ids"] = sorted(int(i) for i in ids)
        sql += (f" UNION ALL SELECT {select_list} FROM bl_measurements m {joins} "
                "WHERE m.id IN :ids AND c.campaign_id = :cid")
    return sql, params


def _query(sql: str, params: dict):
    """text(sql), its `ids` parameter (if any) a list expanded into IN (...)."""
    query = text(sql)
    return query.bindparams(bindparam("ids", expanding=True)) if "ids" in params else query


def campaign_measurement_max(bind: Engine | Connection, campaign_id: int, after_id: int,
                             upto_id: int | None = None, ids=()) -> tuple[int, int | None]:
    """How many of the campaign's measurements have after_id < id <= upto_id or an id in
    `ids` (below after_id), and the newest of their ids (None when there is none): walks
    only those ids of the primary key."""
    sql, params = _campaign_rows("m.id", campaign_id, after_id, upto_id, ids)
    with connected(bind) as connection:
        count, newest = connection.execute(
            _query(f"SELECT COUNT(*), MAX(id) FROM ({sql}) AS found_rows", params), params).one()
    return int(count), None if newest is None else int(newest)


def campaign_trial_version(engine: Engine | Connection, campaign_id: int) -> tuple:
    """A fingerprint of one campaign's campaign row, cells, trials and probe results: what
    `data_version` checks, restricted to the campaign (bl_trials rows of its cells only)."""
    sql = ("SELECT (SELECT COUNT(*) FROM bl_cells WHERE campaign_id = :cid), "
           "(SELECT MAX(id) FROM bl_probe_results WHERE campaign_id = :cid), "
           "(SELECT COUNT(*) FROM bl_probe_results WHERE campaign_id = :cid), "
           "COUNT(*), MAX(t.id), MAX(t.finished_at), "
           "SUM(CASE WHEN t.outcome = 'running' THEN 1 ELSE 0 END), "
           "SUM(CASE WHEN t.outcome = 'abandoned' THEN 1 ELSE 0 END), MAX(t.trial_number), "
           "SUM(CASE WHEN t.outcome = 'reached' THEN 1 ELSE 0 END) "
           "FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id WHERE c.campaign_id = :cid")
    with connected(engine) as connection:
        row = connection.execute(text(sql), {"cid": int(campaign_id)}).one()
    return tuple(str(v) for v in row)


# metrics the SQL side can compare (bl_measurements columns; val_accuracy is derived)
SQL_METRICS = {"val_error": "m.val_error", "val_loss": "m.val_loss",
               "train_loss": "m.train_loss", "val_accuracy": "(1.0 - m.val_error)"}


def first_beating_measurements(engine: Engine | Connection, campaign_id: int, metric: str,
                               threshold: float, mode: str,
                               upto_id: int | None = None) -> pd.DataFrame | None:
    """Per trial of the campaign (any outcome), its first measurement whose `metric`
    strictly beats `threshold` (NULL never beats): columns as `measurements_fast`, rows
    ordered by (trial_id, step). `study.analysis.steps_to_result` and the bootstrap only
    read these rows, so they give the same results from this frame as from all rows.
    None when `metric` is not a column the query can compare (see SQL_METRICS).
    `upto_id`: only rows with id <= it (an incremental reader folds in the rest)."""
    if metric not in SQL_METRICS or mode not in ("min", "max"):
        return None
    expr, op = SQL_METRICS[metric], "<" if mode == "min" else ">"
    # PostgreSQL sorts NaN above every number (NaN > 0.9 is true there); in Python, as in
    # study.analysis.steps, NaN beats nothing. (SQLite stores NaN as NULL.)
    nan = f" AND {expr} <> 'NaN'" if engine.dialect.name == "postgresql" else ""
    beats = f"{expr} {op} :thr{nan}" + ("" if upto_id is None else " AND m.id <= :upto")
    sql = ("SELECT m.trial_id, m.step, m.examples, m.epoch, m.wall_seconds, m.eval_seconds, "
           "m.learning_rate, m.batch_size, m.train_loss, m.val_loss, m.val_error, m.extra "
           "FROM bl_measurements m JOIN (SELECT m.trial_id AS tid, MIN(m.step) AS first_step "
           "FROM bl_measurements m WHERE m.trial_id IN (SELECT t.id FROM bl_trials t "
           "JOIN bl_cells c ON c.id = t.cell_id WHERE c.campaign_id = :cid) "
           f"AND {beats} GROUP BY m.trial_id) f ON f.tid = m.trial_id AND f.first_step = m.step "
           f"WHERE {beats} ORDER BY m.trial_id, m.step")
    with connected(engine) as connection:
        params = {"cid": int(campaign_id), "thr": float(threshold)}
        if upto_id is not None:
            params["upto"] = int(upto_id)
        result = connection.execute(text(sql), params)
        frame = pd.DataFrame(result.cursor.fetchall(), columns=list(result.keys()))
    return _with_floats(frame)


def _with_floats(frame: pd.DataFrame) -> pd.DataFrame:
    for column in ("train_loss", "val_loss", "val_error"):
        frame[column] = frame[column].astype(float)
    frame["val_accuracy"] = 1.0 - frame["val_error"]
    return frame


MEASUREMENT_COLUMNS = ["trial_id", "step", "examples", "epoch", "wall_seconds", "eval_seconds",
                       "learning_rate", "batch_size", "train_loss", "val_loss", "val_error",
                       "extra"]


def measurements_after(bind: Engine | Connection, campaign_id: int, after_id: int,
                       upto_id: int | None = None, ids=()) -> pd.DataFrame:
    """The campaign's measurements with after_id < id <= upto_id (no upper bound when
    None) or an id in `ids` (below after_id: rows that were missing when last read and
    have appeared since), through the primary key: the rows written since.
    `measurements_fast`'s columns plus `id`, `cell_id` and the cell's `cell_batch_size`,
    ordered by id; `extra` still the stored JSON text."""
    select_list = ("m.id, m." + ", m.".join(MEASUREMENT_COLUMNS) + ", t.cell_id, "
                   "c.batch_size AS cell_batch_size")
    sql, params = _campaign_rows(select_list, campaign_id, after_id, upto_id, ids)
    with connected(bind) as connection:
        result = connection.execute(_query(f"{sql} ORDER BY 1", params), params)
        frame = pd.DataFrame(result.cursor.fetchall(), columns=list(result.keys()))
    return _with_floats(frame)


def budget_trial_minima(engine: Engine | Connection, campaign_id: int, metric: str, mode: str,
                        budgets: list[float], kind: str, upto_id: int) -> pd.DataFrame | None:
    """Per trial of the campaign (any outcome) the best `metric` among its rows with
    id <= `upto_id` and step (kind "steps") or examples seen (kind "examples": the row's
    examples, else its batch size or the cell's times step, as
    `study.analysis.budgets.examples_seen`) within each budget: columns `trial_id`, `cell_id`
    and `b0`, `b1`, ... (NULL/NaN where no row qualifies). One pass over the rows; the
    dashboard's budget table reads only the rows of the trials that hold a cell's best.
    None when `metric` is not a column the query can compare."""
    if metric not in SQL_METRICS or mode not in ("min", "max") or kind not in ("steps", "examples"):
        return None
    expr = SQL_METRICS[metric]
    # the cell's batch size only where a row lacks both examples and its own batch size
    cell_batch = ("(SELECT c.batch_size FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id "
                  "WHERE t.id = m.trial_id)")
    spent = ("m.step" if kind == "steps" else
             f"CAST(COALESCE(m.examples, COALESCE(m.batch_size, {cell_batch}) * m.step) "
             "AS DOUBLE PRECISION)")
    best = "MIN" if mode == "min" else "MAX"
    nan = f" AND {expr} <> 'NaN'" if engine.dialect.name == "postgresql" else ""
    aggregates = ", ".join(f"{best}(CASE WHEN {spent} <= :b{i}{nan} THEN {expr} END) AS b{i}"
                           for i in range(len(budgets)))
    trials = ("SELECT t.id FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id "
              "WHERE c.campaign_id = :cid")
    # IN (...) and GROUP BY m.trial_id alone: walks the (trial_id, step) index in order
    sql = (f"SELECT m.trial_id, {aggregates} FROM bl_measurements m "
           f"WHERE m.trial_id IN ({trials}) AND m.id <= :upto GROUP BY m.trial_id "
           "ORDER BY m.trial_id")
    cells_sql = ("SELECT t.id AS trial_id, t.cell_id FROM bl_trials t JOIN bl_cells c "
                 "ON c.id = t.cell_id WHERE c.campaign_id = :cid")
    params = {"cid": int(campaign_id), "upto": int(upto_id)}
    params.update({f"b{i}": float(b) for i, b in enumerate(budgets)})
    with connected(engine) as connection:
        result = connection.execute(text(sql), params)
        frame = pd.DataFrame(result.cursor.fetchall(), columns=list(result.keys()))
        result = connection.execute(text(cells_sql), {"cid": int(campaign_id)})
        cells = pd.DataFrame(result.cursor.fetchall(), columns=list(result.keys()))
    frame = frame.merge(cells, on="trial_id", how="inner")
    frame = frame[["trial_id", "cell_id", *[f"b{i}" for i in range(len(budgets))]]]
    for i in range(len(budgets)):
        frame[f"b{i}"] = frame[f"b{i}"].astype(float)
    return frame


def epoch_counts(engine: Engine | Connection, campaign_id: int, upto_id: int) -> tuple[int, float, float, pd.Series]:
    """Of the campaign's measurements with id <= `upto_id`: how many, the largest step and
    epoch (NaN ignored), and how often each value of examples / epoch occurs among rows
    with epoch > 0 and examples recorded (a Series: ratio -> count), from which
    `study.report.examples_per_epoch`'s median follows exactly."""
    finite = "m.epoch <> 'NaN' AND " if engine.dialect.name == "postgresql" else ""
    trials = ("m.trial_id IN (SELECT t.id FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id "
              "WHERE c.campaign_id = :cid) AND m.id <= :upto")
    # one pass: rows without a ratio (epoch <= 0, no examples) fall in the NULL group
    ratio = (f"CASE WHEN {finite}m.epoch > 0 AND m.examples IS NOT NULL THEN "
             "CAST(m.examples AS DOUBLE PRECISION) / m.epoch END")
    sql = (f"SELECT {ratio} AS r, COUNT(*), MAX(m.step), "
           f"MAX(CASE WHEN {finite}1 = 1 THEN m.epoch END) FROM bl_measurements m "
           f"WHERE {trials} GROUP BY {ratio}")
    params = {"cid": int(campaign_id), "upto": int(upto_id)}
    with connected(engine) as connection:
        groups = connection.execute(text(sql), params).all()
    steps = [float(g[2]) for g in groups if g[2] is not None]
    epochs = [float(g[3]) for g in groups if g[3] is not None]
    count = sum(int(g[1]) for g in groups)
    max_step = max(steps) if steps else None
    max_epoch = max(epochs) if epochs else None
    pairs = [(g[0], g[1]) for g in groups if g[0] is not None]
    counts = pd.Series([int(c) for _, c in pairs], index=[float(r) for r, _ in pairs],
                       dtype="int64")
    return (int(count or 0), float("nan") if max_step is None else float(max_step),
            float("nan") if max_epoch is None else float(max_epoch), counts)


def probe_keys_of(engine: Engine | Connection, campaign_id: int, upto_id: int) -> tuple[set, set, list] | None:
    """From the campaign's measurements with id <= `upto_id`, through the database's JSON
    functions: the keys of `extra` objects that hold a number in some row, the trials
    with a non-empty `extra` object, and the `extra` texts the database could not read as
    JSON (SQLite: e.g. NaN; the caller parses those). None on a backend without them."""
    backend = engine.dialect.name
    if backend == "sqlite":
        each = ("FROM bl_measurements m, json_each(m.extra) j WHERE m.extra <> '{}' "
                "AND json_valid(m.extra) AND json_type(m.extra) = 'object'")
        numeric = "j.type IN ('integer', 'real')"
        bad = ("SELECT m.trial_id, m.extra FROM bl_measurements m WHERE m.trial_id IN ({trials}) "
               "AND m.id <= :upto AND m.extra IS NOT NULL AND NOT json_valid(m.extra)")
    elif backend == "postgresql":
        each = ("FROM bl_measurements m, json_each(CASE WHEN json_typeof(m.extra) = 'object' "
                "THEN m.extra ELSE '{}'::json END) j WHERE m.extra::text <> '{}'")
        numeric = "json_typeof(j.value) = 'number'"
        bad = None
    else:
        return None
    trials = ("SELECT t.id FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id "
              "WHERE c.campaign_id = :cid")
    sql = (f"SELECT m.trial_id, j.key, MAX(CASE WHEN {numeric} THEN 1 ELSE 0 END) {each} "
           f"AND m.trial_id IN ({trials}) AND m.id <= :upto GROUP BY m.trial_id, j.key")
    params = {"cid": int(campaign_id), "upto": int(upto_id)}
    with connected(engine) as connection:
        rows = connection.execute(text(sql), params).all()
        unread = ([(int(r[0]), r[1]) for r in
                   connection.execute(text(bad.format(trials=trials)), params)] if bad else [])
    keys = {str(key) for _, key, number in rows if number}
    with_probes = {int(trial) for trial, _, _ in rows}
    return keys, with_probes, unread


def measurements_of_trials(engine: Engine | Connection, trial_ids) -> pd.DataFrame:
    """`measurements_fast`'s columns for the given trials only, ordered by (trial_id, step)."""
    ids = sorted({int(t) for t in trial_ids})
    columns = ["trial_id", "step", "examples", "epoch", "wall_seconds", "eval_seconds",
               "learning_rate", "batch_size", "train_loss", "val_loss", "val_error", "extra"]
    rows = []
    with connected(engine) as connection:
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
