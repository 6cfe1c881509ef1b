"""The dashboard's data: plain functions over a read-only engine, no Streamlit (so they are
tested directly), never torch.

Everything a page shows is built here from `db.queries`, `study.results`, `study.report`
(the campaign analysis shared with `batchlab analyze`) and `study.analysis`; the pages
only lay it out.
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from study.analysis.budgets import examples_seen
from study.analysis.steps import ELIGIBLE_OUTCOMES, beats
from study.results import FINISHED, CampaignInfo, campaign_info
# The campaign analysis lives in study.report (shared with `batchlab analyze`); these
# names are re-exported so the pages keep calling data.<name>.
from db import queries  # noqa: F401
from db.engine import snapshot
from db.queries import data_version  # noqa: F401
from study.analysis import search_space_scatter, winning_hparams
from study.report import _as_dict, _parse_extras  # the loader's JSON parsing
from study.report import campaign_trials as report_campaign_trials
from study.report import (CampaignData, ScalingAnalysis, budget_frame, campaign_names,  # noqa: F401,E501
                          campaign_spec, default_budgets, edge_text, edge_warnings,
                          examples_per_epoch, load_campaign, load_campaign_fast, load_campaign_light,
                          load_progress, measurements_of_trials,
                          scaling_analysis, scaling_inputs_key, scatter, search_space,
                          series_of, winners)

# A worker whose last heartbeat is older than this is shown as stale (probably dead).
STALE_HEARTBEAT_SECONDS = 120
# Trials per minute are measured over this recent window (falls back to the whole run).
RATE_WINDOW_MINUTES = 15


# ---- progress -----------------------------------------------------------------------------
def _utc(values: pd.Series) -> pd.Series:
    """Timestamps as UTC-aware (SQLite returns naive datetimes, written in UTC)."""
    stamps = pd.to_datetime(values, errors="coerce")
    if getattr(stamps.dt, "tz", None) is None:
        return stamps.dt.tz_localize("UTC")
    return stamps.dt.tz_convert("UTC")


def progress_table(data: CampaignData) -> pd.DataFrame:
    """One row per cell: finished / running / planned trials (and of the finished, how many
    reached, diverged, failed) and steps-to-result."""
    trials = data.trials
    counts = pd.DataFrame({
        "cell_id": trials["cell_id"],
        "finished": trials["outcome"].isin(FINISHED).astype(int),
        "running": (trials["outcome"] == "running").astype(int),
        "reached": (trials["outcome"] == "reached").astype(int),
        "diverged": (trials["outcome"] == "diverged").astype(int),
        "failed": (trials["outcome"] == "failed").astype(int)}).groupby("cell_id").sum()
    table = data.cells.rename(columns={"trials_planned": "planned"}).merge(
        counts, left_on="cell_id", right_index=True, how="left")
    for column in counts.columns:
        table[column] = table[column].fillna(0).astype(int)
    table = table.merge(data.table[["cell_id", "steps_to_result"]], on="cell_id", how="left")
    columns = ["batch_size", "optimizer", "schedule", "finished", "running", "planned",
               "reached", "diverged", "failed", "steps_to_result", "cell_id"]
    return table[columns].sort_values(["optimizer", "schedule", "batch_size"]).reset_index(drop=True)


@dataclass(frozen=True)
class Throughput:
    finished: int
    running: int
    planned: int
    trials_per_minute: float  # NaN before two trials have finished
    eta_seconds: float  # NaN when unknown, 0 when done

    @property
    def eta_text(self) -> str:
        if self.finished >= self.planned:
            return "done"
        if not np.isfinite(self.eta_seconds):
            return "-"
        minutes = self.eta_seconds / 60
        return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def throughput(data: CampaignData, now: datetime | None = None,
               window_minutes: float = RATE_WINDOW_MINUTES) -> Throughput:
    """Finished trials per minute over the last `window_minutes` (or, when nothing finished
    in that window, over the whole run from the first start to the last finish) and the
    ETA of the remaining planned trials at that rate."""
    now = now or datetime.now(timezone.utc)
    trials = data.trials
    finished = trials.loc[trials["outcome"].isin(FINISHED)]
    planned = int(data.cells["trials_planned"].sum())
    running = int((trials["outcome"] == "running").sum())
    rate = float("nan")
    ends = _utc(finished["finished_at"]).dropna()
    if len(ends):
        recent = ends[ends >= pd.Timestamp(now) - pd.Timedelta(minutes=window_minutes)]
        if len(recent):
            rate = len(recent) / window_minutes
        else:
            starts = _utc(trials["started_at"]).dropna()
            span = (ends.max() - starts.min()).total_seconds() / 60 if len(starts) else 0
            rate = len(ends) / span if span > 0 else float("nan")
    remaining = max(planned - len(finished), 0)
    eta = 0.0 if remaining == 0 else (remaining / rate * 60 if rate and rate > 0 else float("nan"))
    return Throughput(len(finished), running, planned, rate, eta)


def worker_table(data: CampaignData, now: datetime | None = None,
                 stale_after: float = STALE_HEARTBEAT_SECONDS) -> pd.DataFrame:
    """Workers with their heartbeat age (seconds) and `state`: live (running, recent
    heartbeat), stale (running, no heartbeat for `stale_after` s) or their final status."""
    now = now or datetime.now(timezone.utc)
    workers = data.workers.copy()
    columns = ["id", "host", "pid", "device", "state", "heartbeat_age_s", "trials_done",
               "current_trial_id", "started_at"]
    if workers.empty:
        return pd.DataFrame(columns=columns)
    age = (pd.Timestamp(now) - _utc(workers["heartbeat_at"])).dt.total_seconds()
    workers["heartbeat_age_s"] = age.round(1)
    running = workers["status"] == "running"
    workers["state"] = np.where(running & (age <= stale_after), "live",
                                np.where(running, "stale", workers["status"]))
    return workers[columns]


def failures(data: CampaignData) -> pd.DataFrame:
    """Failed (crashed) and diverged trials with their messages, newest first."""
    shown = data.trials.loc[data.trials["outcome"].isin(("failed", "diverged"))]
    columns = ["batch_size", "optimizer", "schedule", "trial_number", "outcome", "message",
               "host", "device", "finished_at"]
    return shown.sort_values("finished_at", ascending=False)[columns].reset_index(drop=True)


# ---- learning curves, traces and probes -------------------------------------------------------
def run_labels(trials: pd.DataFrame) -> pd.Series:
    """'B=64 momentum/constant #3' per trial (index: trial_id)."""
    labels = ("B=" + trials["batch_size"].astype(str) + " " + trials["optimizer"] + "/"
              + trials["schedule"] + " #" + trials["trial_number"].astype(str))
    return pd.Series(labels.to_numpy(), index=trials["trial_id"].to_numpy())


def curves(data: CampaignData, trial_ids) -> pd.DataFrame:
    """The measurements of `trial_ids` with a `run` label, a `noise_scale` column (from the
    measurement's extra JSON, NaN when absent) and one column per numeric extra key."""
    rows = data.measurements.loc[data.measurements["trial_id"].isin(list(trial_ids))].copy()
    labels = run_labels(data.trials)
    rows["run"] = rows["trial_id"].map(labels)
    for key in probe_keys(rows):
        rows[key] = rows["extra"].map(lambda e, k=key: _number(e.get(k)))
    if "noise_scale" not in rows.columns:
        rows["noise_scale"] = np.nan
    return rows.reset_index(drop=True)


def campaign_version(engine: Engine, name: str, state: "IncrementalState") -> tuple:
    """A fingerprint of one campaign that changes when workers write to it (and not when
    they write to another campaign): its trials, cells and probe results
    (`queries.campaign_trial_version`) and a marker of its measurements: the newest id and
    how many rows were found since the first look. Only the rows written since the last
    call, and those that were missing below the newest id then (`ReadMark`: a PostgreSQL
    transaction can commit a row far below ids already read), are looked at; the
    campaign's marks are kept in `state`."""
    row = queries.campaign_by_name(engine, name)
    if row is None:
        return ("none", name)
    cid = int(row["id"])
    with state.versions_lock:
        held = state.versions.get(cid)  # (ReadMark, marker)
        newest_before, writers = _before_snapshot(engine)
        with snapshot(engine) as connection:
            newest = queries.max_measurement_id(connection)
            base = held[0] if held is not None and newest >= held[0].newest else None
            found = present_ids(connection, base)
            marker = (newest, 0)  # first look (or rows deleted at the top): start from here
            if base is not None:
                marker = held[1]
                count, top = queries.campaign_measurement_max(connection, cid, base.newest,
                                                              newest, found)
                if count:
                    marker = (max(top, marker[0]), marker[1] + count)
            mark = state.advance(connection, base, newest, writers, newest_before, found)
            trials = queries.campaign_trial_version(connection, cid)
        state.versions[cid] = (mark, marker)
    return (cid, str(row["created_at"]), marker) + trials


def _number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return number if np.isfinite(number) else float("nan")


def probe_keys(measurements: pd.DataFrame) -> list[str]:
    """Keys of the measurements' extra JSON that hold numbers somewhere, sorted."""
    keys: set[str] = set()
    for extra in measurements.get("extra", pd.Series(dtype=object)):
        if isinstance(extra, dict):
            keys.update(k for k, v in extra.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool))
    return sorted(keys)


def winner_trial_ids(data: CampaignData, results: pd.DataFrame | None = None) -> list[int]:
    results = data.results() if results is None else results
    return [int(t) for t in results["winner_trial_id"].dropna()]


def winners_from(data: CampaignData, results: pd.DataFrame) -> pd.DataFrame:
    """`study.report.winners` with the campaign's `results()` already computed."""
    cells = data.cells[["cell_id", "batch_size", "optimizer", "schedule"]]
    return winning_hparams(results, data.trials, cells)


def scatter_from(data: CampaignData, results: pd.DataFrame) -> pd.DataFrame:
    """`study.report.scatter` with the campaign's `results()` already computed."""
    return search_space_scatter(data.trials, data.measurements, results,
                                metric=data.info.metric, threshold=data.info.threshold,
                                mode=data.info.mode)


def parse_budgets(text: str) -> list[float]:
    """'100, 200 400' -> [100.0, 200.0, 400.0]; non-numbers and non-positive values dropped."""
    values = []
    for token in re.split(r"[,\s;]+", text.strip()):
        try:
            value = float(token)
        except ValueError:
            continue
        if value > 0:
            values.append(value)
    return sorted(set(values))


# ---- the schema ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemaProblem:
    level: str  # "info" (nothing to show yet) or "error"
    message: str


def schema_problem(engine: Engine) -> SchemaProblem | None:
    """None when the database has the schema this dashboard reads; otherwise what is wrong
    and what to do, for the page to show instead of a traceback. Reads only (the dashboard
    never writes): `batchlab dashboard` upgrades the schema before it starts the app."""
    from db.engine import StorageError
    from db.models import SCHEMA_VERSION
    from db.schema import is_current, schema_version
    try:
        if is_current(engine):
            return None
        version = schema_version(engine)
    except StorageError as exc:  # unreachable, or newer than this code
        return SchemaProblem("error", str(exc))
    if version is None:
        return SchemaProblem("info", "No campaigns yet: this database has no batchlab tables. "
                                     "Create a campaign with `batchlab campaign create SPEC`.")
    found = (f"has batchlab schema version {version}" if version < SCHEMA_VERSION else
             "lacks batchlab's views (bl_cell_results)")
    return SchemaProblem("error", (
        f"This database {found}; the dashboard needs version "
        f"{SCHEMA_VERSION}. Upgrade it (batchlab's migrations keep every row): start the "
        f"dashboard with `batchlab dashboard --storage URL`, which upgrades it first, or run "
        f"`batchlab status --storage URL`."))


# ---- read-only SQL ----------------------------------------------------------------------------
class QueryError(Exception):
    """A query the SQL page refuses or the database rejected; the message is shown."""


@dataclass(frozen=True)
class QueryResult:
    frame: pd.DataFrame
    truncated: bool  # more rows than the row limit existed
    seconds: float


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")
_WORD_CHAR = re.compile(r"[A-Za-z_0-9$]")


def _skip_quoted(sql: str, start: int) -> int:
    """The index after the quoted text, comment or dollar-quoted string at `start`, or
    `start` when none begins there. Follows PostgreSQL's lexer, which accepts more than
    SQLite's: E'...' with backslash escapes, nested /* */ comments. The end of an
    unterminated one is the end of `sql`."""
    char, rest = sql[start], sql[start:start + 2]
    if rest == "--":
        newline = sql.find("\n", start)
        return len(sql) if newline < 0 else newline + 1
    if rest == "/*":
        depth, i = 1, start + 2
        while i < len(sql) and depth:
            pair = sql[i:i + 2]
            depth, i = ((depth + 1, i + 2) if pair == "/*" else
                        (depth - 1, i + 2) if pair == "*/" else (depth, i + 1))
        return min(i, len(sql))
    escapes = (char in "eE" and sql[start + 1:start + 2] == "'"
               and (start == 0 or not _WORD_CHAR.match(sql[start - 1])))
    if char in "'\"" or escapes:
        quote = "'" if escapes else char
        i = start + (2 if escapes else 1)
        while i < len(sql):
            if escapes and sql[i] == "\\":
                i += 2
            elif sql[i] == quote:
                if sql[i + 1:i + 2] != quote:  # a doubled quote stands for one
                    return i + 1
                i += 2
            else:
                i += 1
        return len(sql)
    if char == "$" and (start == 0 or not _WORD_CHAR.match(sql[start - 1])):
        tag = _DOLLAR_TAG.match(sql, start)
        if tag:
            close = sql.find(tag.group(), tag.end())
            return len(sql) if close < 0 else close + len(tag.group())
    return start


def single_statement(sql: str) -> str:
    """`sql` without trailing semicolons; QueryError when it is empty or holds more than one
    statement. Reads strings and comments as PostgreSQL does (E'\\'' strings, nested
    comments). The first line of defence only: on PostgreSQL the statement is sent with
    the extended query protocol, where the server itself refuses a second one (see
    `run_read_only_query`), and SQLite's driver runs one statement at a time."""
    end, semicolon, i = 0, False, 0
    while i < len(sql):
        after = _skip_quoted(sql, i)
        if after > i:
            if sql[i] not in "-/":  # a string is part of the statement, a comment is not
                if semicolon:
                    raise QueryError("one statement at a time: remove the ';' between statements")
                end = after
            i = after
        elif sql[i] == ";":
            semicolon, i = True, i + 1
        elif sql[i].isspace():
            i += 1
        else:
            if semicolon:
                raise QueryError("one statement at a time: remove the ';' between statements")
            end, i = i + 1, i + 1
    if end == 0:
        raise QueryError("the query is empty")
    return sql[:end].strip()


def run_read_only_query(engine: Engine, sql: str, *, row_limit: int = 1000,
                        timeout_seconds: float = 10.0) -> QueryResult:
    """Run one statement on a read-only connection and return at most `row_limit` rows.

    The statement runs verbatim: no parameters, so `%` and `?` are the SQL's own.
    SQLite: the engine opens the file with mode=ro (SQLite refuses every write), this
    connection also sets `PRAGMA query_only` (no temporary tables either) and a progress
    handler interrupts the statement after `timeout_seconds`. PostgreSQL: the engine's
    sessions and transactions are READ ONLY; `SET LOCAL statement_timeout` bounds the
    statement, which is sent with the extended query protocol (the server refuses more
    than one statement: none can follow a COMMIT). The transaction is always rolled
    back. Raises QueryError with the database's message."""
    statement = single_statement(sql)
    started = time.monotonic()
    backend = engine.dialect.name
    driver_error = getattr(engine.dialect.dbapi, "Error", DBAPIError)
    try:
        with engine.connect() as connection:
            raw = None
            if backend == "sqlite":
                connection.exec_driver_sql("PRAGMA query_only = ON")
                raw = connection.connection.driver_connection
                deadline = started + timeout_seconds
                raw.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
            elif backend == "postgresql":
                connection.exec_driver_sql(
                    f"SET LOCAL statement_timeout = {max(1, int(timeout_seconds * 1000))}")
            try:
                if backend == "postgresql":
                    columns, rows = _postgres_verbatim(connection, statement, row_limit + 1)
                else:
                    result = connection.exec_driver_sql(
                        statement, execution_options={"no_parameters": True})
                    columns = list(result.keys()) if result.returns_rows else None
                    rows = result.fetchmany(row_limit + 1) if result.returns_rows else []
                if columns is None:
                    columns, rows = ["result"], [("statement returned no rows",)]
            finally:
                if raw is not None:
                    raw.set_progress_handler(None, 0)
                connection.rollback()
    except DBAPIError as exc:
        message = str(exc.orig).strip() or type(exc.orig).__name__
        if backend == "sqlite" and "interrupted" in message:
            message += f" (the statement ran longer than {timeout_seconds:g} s)"
        raise QueryError(message) from None
    except driver_error as exc:  # from the driver's own cursor (PostgreSQL)
        raise QueryError(str(exc).strip() or type(exc).__name__) from None
    except SQLAlchemyError as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
    frame = pd.DataFrame([tuple(r) for r in rows[:row_limit]], columns=columns)
    return QueryResult(frame, len(rows) > row_limit, time.monotonic() - started)


def _postgres_verbatim(connection, statement: str, max_rows: int):
    """(column names or None when the statement returns no rows, at most `max_rows` rows).

    psycopg's own cursor, given no parameters, sends the text as written (SQLAlchemy would
    pass an empty parameter set, and psycopg would then read `%` as a placeholder). In a
    pipeline it uses the extended query protocol, which takes exactly one statement;
    where libpq has no pipeline mode (before 14), a prepared statement does the same."""
    import psycopg

    driver = connection.connection.driver_connection
    with driver.cursor() as cursor:
        if psycopg.Pipeline.is_supported():
            with driver.pipeline():
                cursor.execute(statement)
        else:
            cursor.execute(statement, prepare=True)
        if cursor.description is None:
            return None, []
        return [column.name for column in cursor.description], cursor.fetchmany(max_rows)


EXAMPLE_QUERIES = {
    "Steps to result per cell (view)": (
        "SELECT c.name AS campaign, r.batch_size, r.optimizer, r.schedule,\n"
        "       r.trials_finished, r.trials_planned, r.steps_to_result\n"
        "FROM bl_cell_results r JOIN bl_campaigns c ON c.id = r.campaign_id\n"
        "ORDER BY c.name, r.optimizer, r.schedule, r.batch_size"),
    "Campaigns": "SELECT id, name, workload, target_metric, target_threshold, eval_every, "
                 "trials_per_cell, created_at\nFROM bl_campaigns ORDER BY id",
    "Trial outcomes per cell": (
        "SELECT cl.batch_size, cl.optimizer, cl.schedule, t.outcome, COUNT(*) AS trials\n"
        "FROM bl_trials t JOIN bl_cells cl ON cl.id = t.cell_id\n"
        "GROUP BY cl.batch_size, cl.optimizer, cl.schedule, t.outcome\n"
        "ORDER BY cl.optimizer, cl.schedule, cl.batch_size, t.outcome"),
    "Failed trials with messages": (
        "SELECT t.id, cl.batch_size, cl.optimizer, t.trial_number, t.host, t.message\n"
        "FROM bl_trials t JOIN bl_cells cl ON cl.id = t.cell_id\n"
        "WHERE t.outcome = 'failed' ORDER BY t.finished_at DESC"),
    "Learning curve of one trial": (
        "SELECT step, epoch, examples, wall_seconds, learning_rate, val_error\n"
        "FROM bl_measurements WHERE trial_id = 1 ORDER BY step"),
    "Workers and heartbeats": (
        "SELECT id, host, pid, device, status, heartbeat_at, trials_done\n"
        "FROM bl_workers ORDER BY heartbeat_at DESC"),
}


# ---- provenance of one trial -------------------------------------------------------------------
_CODE_VERSION = re.compile(r"^(?P<version>[^+]*)(?:\+g(?P<commit>[0-9a-f]+)(?P<dirty>\.dirty)?)?$")
# package_versions keys shown first, with readable names (the rest follow, sorted)
_PACKAGES = {"python": "Python", "torch": "torch", "cuda": "CUDA (torch build)", "cudnn": "cuDNN",
             "cuda_devices": "CUDA devices", "optuna": "optuna"}


def parse_code_version(text: str | None) -> dict:
    """'0.1.0+g0123456789ab.dirty' -> version 0.1.0, commit 0123456789ab, dirty 'yes'.
    Without a commit (not run from a git checkout, or imported) commit is '' and dirty
    'unknown'."""
    match = _CODE_VERSION.match(text or "")
    if not text or match is None:
        return {"version": text or "", "commit": "", "dirty": "unknown"}
    commit = match.group("commit") or ""
    dirty = ("yes" if match.group("dirty") else "no") if commit else "unknown"
    return {"version": match.group("version"), "commit": commit, "dirty": dirty}


def _text(value) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    try:
        if pd.isna(value):
            return "-"
    except (TypeError, ValueError):
        pass
    return str(value)


def provenance_table(row: dict) -> pd.DataFrame:
    """One trial's provenance as (field, value) rows of text: where and with what code it
    ran (`db.queries.trial_provenance`)."""
    code = parse_code_version(row.get("code_version"))
    versions = _as_mapping(row.get("package_versions"))
    attempt_of = row.get("attempt_of")
    fields = [
        ("trial id", row.get("trial_id")),
        ("cell", f"B={row.get('batch_size')} {row.get('optimizer')}/{row.get('schedule')}"),
        ("trial number", row.get("trial_number")),
        ("outcome", row.get("outcome")),
        ("attempt", row.get("attempt")),
        ("attempt of", "- (first attempt)" if attempt_of is None or pd.isna(attempt_of)
         else f"trial id {int(attempt_of)}"),
        ("batchlab version", code["version"] or "-"),
        ("git commit", code["commit"] or "-"),
        ("uncommitted changes (dirty)", code["dirty"]),
        ("code version (as stored)", row.get("code_version") or "-"),
    ]
    for key, label in _PACKAGES.items():
        fields.append((label, versions.get(key, "-")))
    fields += [(f"{key} version", value) for key, value in sorted(versions.items())
               if key not in _PACKAGES]
    fields += [
        ("device", row.get("device") or "-"),
        ("host", row.get("host") or "-"),
        ("worker", row.get("worker_id")),
        ("seed", row.get("seed")),
        ("started at", row.get("started_at")),
        ("finished at", row.get("finished_at")),
        ("checkpoint", row.get("checkpoint_path")),
        ("message", row.get("message") or "-"),
    ]
    return pd.DataFrame([(name, _text(value)) for name, value in fields], columns=["field", "value"])


def trial_provenance(engine: Engine, trial_id: int) -> dict | None:
    row = queries.trial_provenance(engine, trial_id)
    if row is not None:
        for key in ("config", "hparams", "package_versions"):
            row[key] = _as_mapping(row.get(key))
    return row


def _as_mapping(value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def trial_choice_label(row) -> str:
    attempt = int(row["attempt"]) if "attempt" in row and pd.notna(row["attempt"]) else 1
    return (f"#{int(row['trial_number'])} {row['outcome']}"
            + (f" (attempt {attempt})" if attempt > 1 else "") + f" · id {int(row['trial_id'])}")


# ---- post-training probes (bl_probe_results, `batchlab probe`) -----------------------------------
PROBE_KINDS = ("sharpness", "hessian", "interpolation")


def probe_results(engine: Engine, campaign_id: int) -> pd.DataFrame:
    """bl_probe_results of the campaign with `params` and `result` as dicts."""
    frame = queries.probe_results(engine, campaign_id)
    for column in ("params", "result"):
        frame[column] = frame[column].map(_as_mapping)
    return frame


def _series_setting(frame: pd.DataFrame) -> pd.Series:
    return frame["optimizer"].astype(str) + " / " + frame["schedule"].astype(str)


def sharpness_table(probes: pd.DataFrame) -> pd.DataFrame:
    """Keskar sharpness per winner, space and epsilon (the newest row of each), with a
    `setting` label ('full, eps 0.001', plus the series when there are several)."""
    columns = ["batch_size", "optimizer", "schedule", "trial_id", "space", "epsilon",
               "subspace_dim", "sharpness", "train_loss", "max_loss", "steps_to_result",
               "setting", "created_at"]
    rows = probes.loc[probes["kind"] == "sharpness"] if len(probes) else probes
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = pd.DataFrame({
        "batch_size": rows["batch_size"].astype("Int64"), "optimizer": rows["optimizer"],
        "schedule": rows["schedule"], "trial_id": rows["trial_id"].astype("Int64"),
        "space": rows["params"].map(lambda p: p.get("space", "full")),
        "epsilon": rows["params"].map(lambda p: _number(p.get("epsilon"))),
        "subspace_dim": rows["params"].map(lambda p: p.get("subspace_dim")),
        "sharpness": rows["result"].map(lambda r: _number(r.get("sharpness"))),
        "train_loss": rows["result"].map(lambda r: _number(r.get("loss"))),
        "max_loss": rows["result"].map(lambda r: _number(r.get("max_loss"))),
        "steps_to_result": rows["result"].map(lambda r: _number(r.get("steps_to_result"))),
        "created_at": rows["created_at"]})
    out = out.drop_duplicates(["trial_id", "space", "epsilon", "subspace_dim"], keep="last")
    series = _series_setting(out)
    several = series.nunique() > 1
    out["setting"] = (out["space"] + ", eps " + out["epsilon"].map(lambda e: f"{e:g}")
                      + ((" · " + series) if several else ""))
    return out[columns].sort_values(["optimizer", "schedule", "setting", "batch_size"]).reset_index(drop=True)


def hessian_table(probes: pd.DataFrame) -> pd.DataFrame:
    """Top Hessian eigenvalue and Hutchinson trace per winner (the newest row of each)."""
    columns = ["batch_size", "optimizer", "schedule", "trial_id", "top_eigenvalue", "converged",
               "eigen_iterations", "trace", "trace_samples", "steps_to_result", "setting",
               "created_at"]
    rows = probes.loc[probes["kind"] == "hessian"] if len(probes) else probes
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = pd.DataFrame({
        "batch_size": rows["batch_size"].astype("Int64"), "optimizer": rows["optimizer"],
        "schedule": rows["schedule"], "trial_id": rows["trial_id"].astype("Int64"),
        "top_eigenvalue": rows["result"].map(lambda r: _number(r.get("top_eigenvalue"))),
        "converged": rows["result"].map(lambda r: r.get("converged")),
        "eigen_iterations": rows["result"].map(lambda r: r.get("eigen_iterations")),
        "trace": rows["result"].map(lambda r: _number(r.get("trace"))),
        "trace_samples": rows["result"].map(lambda r: r.get("trace_samples")),
        "steps_to_result": rows["result"].map(lambda r: _number(r.get("steps_to_result"))),
        "created_at": rows["created_at"]})
    out = out.drop_duplicates(["trial_id"], keep="last")
    out["setting"] = _series_setting(out)
    return out[columns].sort_values(["optimizer", "schedule", "batch_size"]).reset_index(drop=True)


@dataclass(frozen=True)
class Interpolation:
    id: int
    label: str
    small_label: str
    large_label: str
    batch_norm: str
    frame: pd.DataFrame  # study.figures.interpolation_frame: alpha, quantity, split, value


def interpolations(probes: pd.DataFrame) -> list[Interpolation]:
    """Each stored interpolation between two winners, newest first."""
    from study.figures import interpolation_frame
    rows = probes.loc[probes["kind"] == "interpolation"] if len(probes) else probes
    out = []
    for row in rows.iloc[::-1].itertuples():
        params, result = row.params, row.result
        small = f"B={params.get('small_batch_size')} (trial {params.get('small_trial_id')})"
        large = f"B={params.get('large_batch_size')} (trial {params.get('large_trial_id')})"
        curves = {k: v for k, v in result.items() if k != "alphas" and isinstance(v, list)}
        frame = interpolation_frame(result.get("alphas", []), curves)
        out.append(Interpolation(int(row.id), f"{small} -> {large} (probe {int(row.id)}, "
                                 f"{row.created_at})", small, large,
                                 str(params.get("batch_norm") or ""), frame))
    return out


# ---- incremental reads: aggregates over a campaign's measurements kept up to date -----------
# After more new rows than this (the dashboard was closed while workers wrote) an aggregate
# is recomputed in SQL instead of folding the rows in.
MAX_FOLDED_IDS = 200_000


@dataclass(frozen=True)
class Pending:
    """Measurement ids found missing below the newest id read ((first, last) ranges) that
    a transaction open at that read (`writers`: `queries.measurement_writers`, read after
    it) may still commit. Once none of those transactions is open any more, one more read
    of the ranges finds every row they committed; the ids still missing then are gone for
    good (rolled back) and are forgotten."""
    ranges: tuple
    writers: frozenset


@dataclass(frozen=True)
class ReadMark:
    """How far a reader has read bl_measurements: every row with id <= `newest` except the
    ids in `pending`, which it reads again until they appear or are known never to.

    PostgreSQL draws ids from a sequence before the transaction commits, so a slow
    transaction commits a row below ids others committed (and a reader read) long before;
    a rolled-back one leaves ids that never appear. SQLite's writers commit one at a time
    and in id order: nothing is ever pending there."""
    newest: int
    pending: tuple = ()

    @property
    def ranges(self) -> tuple:
        return tuple(r for p in self.pending for r in p.ranges)


def _without(ranges, found: list[int]) -> tuple:
    """`ranges` ((first, last) pairs) less the ids in `found` (sorted)."""
    out, ids = [], np.asarray(found, dtype=np.int64)
    for first, last in ranges:
        inside = ids[(ids >= first) & (ids <= last)]
        start = first
        for found_id in inside:
            if found_id > start:
                out.append((start, int(found_id) - 1))
            start = int(found_id) + 1
        if start <= last:
            out.append((start, last))
    return tuple(out)


def _read_mark(connection, base: ReadMark | None, newest: int, writers: frozenset,
               newest_before: int, found: list[int]) -> ReadMark:
    """The ReadMark of a read (on `connection`, one snapshot) of every row with id <=
    `newest` after the read marked `base` (None: nothing read before), which found the
    ids `found` of `base.ranges` (`present_ids`). `writers` (`queries.measurement_writers`)
    and `newest_before` (the newest id) were read before the snapshot, in that order.
    Ids missing now and below `newest` are pending, with the
    transactions open after the snapshot; `base`'s pending ids found now are dropped, and
    so are all of a Pending's once none of its writers was open before the snapshot."""
    if connection.dialect.name != "postgresql":
        return ReadMark(newest)
    kept: list[Pending] = []
    if base is None:
        # Ids <= newest_before were drawn before `writers` was read: with no writer open
        # then, those not visible now never will be; otherwise any id may still come.
        after = newest_before if not writers else 0
    else:
        after = base.newest
        for pending in base.pending:
            ranges = _without(pending.ranges, found)
            if ranges and pending.writers & writers:  # a writer of then is still open
                kept.append(Pending(ranges, pending.writers))
    missing = queries.missing_measurement_ids(connection, min(after, newest), newest)
    if missing:
        kept.append(Pending(tuple(missing), queries.measurement_writers(connection)))
    return ReadMark(newest, tuple(kept))


@dataclass
class Folded:
    """An aggregate over every measurement row of a campaign that `mark` says was read."""
    mark: ReadMark
    value: object


class IncrementalState:
    """The folded aggregates of one storage (key -> Folded) and the campaigns' version
    marks, shared by every session of the dashboard, each with a lock: two refreshes of
    one aggregate do not interleave. `latest`: the newest ReadMark any read made (a
    first read starts from its pending ids). `first_read_in_sql` False: an aggregate's
    first read folds every row in as later reads do, instead of computing it in SQL (the
    tests compare the fold with the SQL this way)."""

    def __init__(self, first_read_in_sql: bool = True):
        self.first_read_in_sql = first_read_in_sql
        self.entries: dict = {}
        self.lock = threading.Lock()
        self.versions: dict = {}
        self.versions_lock = threading.Lock()
        self.latest: ReadMark | None = None

    def advance(self, connection, base: ReadMark | None, newest: int, writers: frozenset,
                newest_before: int, found: list[int] | None = None) -> ReadMark:
        """`_read_mark`; a first read (`base` None) starts from `latest` (what it read in
        full is what `latest` says was read, plus its pending ids found now). `found`:
        `present_ids(connection, base)` when the caller has it."""
        if base is None and self.latest is not None and self.latest.newest <= newest:
            base, found = self.latest, None
        if found is None:
            found = present_ids(connection, base)
        mark = _read_mark(connection, base, newest, writers, newest_before, found)
        latest = self.latest
        if latest is None or mark.newest >= latest.newest:
            self.latest = mark
        return mark


def present_ids(connection, mark: ReadMark | None) -> list[int]:
    """The ids of `mark`'s pending ranges that are visible now (sorted)."""
    return queries.present_measurement_ids(connection, mark.ranges) if mark else []


def _before_snapshot(engine: Engine) -> tuple[int, frozenset]:
    """(the newest measurement id, then the open writers): read before a snapshot."""
    newest = queries.max_measurement_id(engine)
    return newest, queries.measurement_writers(engine)


def folded(state: IncrementalState, key, engine: Engine, campaign_id: int, full, fold):
    """The aggregate `key` over all the campaign's measurement rows, now: computed once in
    SQL (`full(connection, upto_id)`: rows with id <= upto_id), then kept up to date by
    reading only the rows written since and those that were missing below the newest id
    (`ReadMark`, `queries.measurements_after`) and folding them in (`fold(value, rows)`,
    which returns a new value). Each row is folded in exactly once, all reads of one
    refresh in one snapshot."""
    with state.lock:
        entry = state.entries.get(key)
        newest_before, writers = _before_snapshot(engine)
        with snapshot(engine) as connection:
            newest = queries.max_measurement_id(connection)
            if entry is not None and newest < entry.mark.newest:
                entry = None  # rows deleted at the top (or another database): start afresh
            if entry is None and not state.first_read_in_sql:
                entry = Folded(ReadMark(0), full(connection, 0))
            base = entry.mark if entry is not None else None
            found = present_ids(connection, base)
            if entry is None or newest - base.newest > MAX_FOLDED_IDS:
                value = full(connection, newest)
            else:
                rows = queries.measurements_after(connection, campaign_id, base.newest, newest,
                                                  found)
                value = fold(entry.value, rows) if len(rows) else entry.value
            mark = state.advance(connection, base, newest, writers, newest_before, found)
        state.entries[key] = Folded(mark, value)
        return value


def _sql_metric(info: CampaignInfo) -> bool:
    """Whether the SQL aggregates can compare the campaign's metric (a column, not extra)."""
    return info.metric in queries.SQL_METRICS and info.mode in ("min", "max")


def _fold_firsts(info: CampaignInfo):
    columns = list(queries.MEASUREMENT_COLUMNS) + ["val_accuracy"]

    def fold(firsts: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
        beat = rows.loc[beats(rows[info.metric], info.threshold, info.mode), columns]
        if beat.empty:
            return firsts
        both = pd.concat([firsts, beat], ignore_index=True) if len(firsts) else beat
        both = both.sort_values(["trial_id", "step"], kind="stable")
        return both.drop_duplicates("trial_id", keep="first").reset_index(drop=True)
    return fold


def first_beating_rows(engine: Engine, info: CampaignInfo,
                       state: IncrementalState) -> pd.DataFrame | None:
    """`queries.first_beating_measurements` of the campaign, now, folded incrementally
    (`folded`); None for a metric the SQL cannot compare."""
    if not _sql_metric(info):
        return None

    def full(connection, upto: int) -> pd.DataFrame:
        return queries.first_beating_measurements(connection, info.id, info.metric, info.threshold,
                                                  info.mode, upto_id=upto)
    key = ("firsts", info.id, info.metric, info.threshold, info.mode)
    return folded(state, key, engine, info.id, full, _fold_firsts(info)).copy()


def load_progress_incremental(engine: Engine, name: str,
                              state: IncrementalState) -> CampaignData | None:
    """`study.report.load_progress` with the trials of `campaign_trials` (shared with
    `load_light_incremental`: one read of the changed trials serves both)."""
    info = campaign_info(engine, name)
    if info is None:
        return None
    return load_progress(engine, name, trials=campaign_trials(engine, info.id, state))


def load_light_incremental(engine: Engine, name: str,
                           state: IncrementalState) -> CampaignData | None:
    """`study.report.load_campaign_light` whose first on-target rows are kept up to date
    from the rows written since the last call (`first_beating_rows`) instead of re-running
    the query over every measurement of the campaign, and whose trials are re-read only
    where they changed (`campaign_trials`)."""
    info = campaign_info(engine, name)
    if info is None:
        return None
    firsts = first_beating_rows(engine, info, state)
    trials = campaign_trials(engine, info.id, state)
    return load_campaign_light(engine, name, firsts=firsts, info=info, trials=trials)


# -- budgets: the best value per cell under each budget, from per-trial bests in SQL --
def _spent(rows: pd.DataFrame, kind: str) -> pd.Series:
    if kind == "steps":
        return rows["step"].astype(float)
    cell = rows.drop(columns=["batch_size"]).rename(columns={"cell_batch_size": "batch_size"})
    return examples_seen(cell.assign(row_batch_size=rows["batch_size"]))


def _fold_minima(info: CampaignInfo, amounts: list[float], kind: str):
    columns = [f"b{i}" for i in range(len(amounts))]
    better = np.fmin if info.mode == "min" else np.fmax

    def fold(minima: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
        values = rows[info.metric].astype(float)
        spent = _spent(rows, kind)
        new = pd.DataFrame({"trial_id": rows["trial_id"], "cell_id": rows["cell_id"]})
        for column, amount in zip(columns, amounts):
            new[column] = values.where((spent <= amount) & values.notna())
        grouped = new.groupby(["trial_id", "cell_id"], sort=True)
        new = (grouped.min() if info.mode == "min" else grouped.max()).reset_index()
        both = minima.merge(new, on=["trial_id", "cell_id"], how="outer", suffixes=("", "_new"))
        for column in columns:
            both[column] = better(both[column].astype(float), both[f"{column}_new"].astype(float))
        return both[["trial_id", "cell_id", *columns]].sort_values("trial_id").reset_index(drop=True)
    return fold


def budget_candidates(minima: pd.DataFrame, trials: pd.DataFrame, mode: str) -> list[int]:
    """The eligible trials that hold their cell's best value under some budget: the only
    trials `best_under_budget` can pick (ties among them are broken on their rows)."""
    eligible = trials.loc[trials["outcome"].isin(ELIGIBLE_OUTCOMES), "trial_id"]
    rows = minima.loc[minima["trial_id"].isin(eligible)]
    chosen: set[int] = set()
    for column in [c for c in rows.columns if c.startswith("b") and c[1:].isdigit()]:
        grouped = rows.groupby("cell_id")[column]
        best = grouped.transform("min" if mode == "min" else "max")
        chosen.update(int(t) for t in rows.loc[rows[column] == best, "trial_id"])
    return sorted(chosen)


def budget_table(engine: Engine, data: CampaignData, budgets: list[float], kind: str,
                 size: float, state: IncrementalState) -> pd.DataFrame | None:
    """`study.report.budget_frame` without reading every measurement: each trial's best
    value under each budget comes from one SQL aggregate (`queries.budget_trial_minima`,
    then folded incrementally), and `budget_frame` itself runs on the rows of the trials
    that hold a cell's best only, which gives the same table (tie-breaking included).
    `data` may be the light load (its trials and cells are what counts). None where the
    SQL cannot compute it (a metric stored in `extra`)."""
    info = data.info
    amounts = budgets if kind == "steps" else [b * size for b in budgets]
    spent_kind = "steps" if kind == "steps" else "examples"
    if not _sql_metric(info):
        return None

    def full(connection, upto: int) -> pd.DataFrame:
        return queries.budget_trial_minima(connection, info.id, info.metric, info.mode, amounts,
                                           spent_kind, upto)
    key = ("budget", info.id, info.metric, info.mode, spent_kind, tuple(amounts))
    minima = folded(state, key, engine, info.id, full, _fold_minima(info, amounts, spent_kind))
    chosen = budget_candidates(minima, data.trials, info.mode)
    rows = measurements_of_trials(engine, info, chosen)
    return budget_frame(replace(data, measurements=rows), budgets, kind, size)


@dataclass(frozen=True)
class MeasurementSummary:
    """What the Budgets page reads off all the measurements: how many, the largest step
    and epoch, and the training-set size (`study.report.examples_per_epoch`)."""
    rows: int
    max_step: float
    max_epoch: float
    examples_per_epoch: float


def _fold_epochs(value: tuple, rows: pd.DataFrame) -> tuple:
    count, max_step, max_epoch, ratios = value
    kept = rows.loc[(rows["epoch"] > 0) & rows["examples"].notna()]
    new = (kept["examples"].astype(float) / kept["epoch"].astype(float)).value_counts()
    ratios = ratios.add(new, fill_value=0).astype("int64")
    return (count + len(rows), float(np.fmax(max_step, rows["step"].max())),
            float(np.fmax(max_epoch, rows["epoch"].astype(float).max())), ratios)


def median_of_counts(counts: pd.Series) -> float:
    """np.median of the values `counts` (value -> how often) stands for; NaN when empty."""
    counts = counts.loc[counts > 0].sort_index()
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    ends = np.cumsum(counts.to_numpy())
    values = counts.index.to_numpy(float)

    def nth(k: int) -> float:  # the k-th smallest (0-based)
        return float(values[np.searchsorted(ends, k, side="right")])
    if total % 2:
        return nth(total // 2)
    return float(np.mean([nth(total // 2 - 1), nth(total // 2)]))


def measurement_summary(engine: Engine, info: CampaignInfo,
                        state: IncrementalState) -> MeasurementSummary:
    key = ("epochs", info.id)
    count, max_step, max_epoch, ratios = folded(
        state, key, engine, info.id,
        lambda connection, upto: queries.epoch_counts(connection, info.id, upto),
        _fold_epochs)
    return MeasurementSummary(count, max_step, max_epoch, median_of_counts(ratios))


# -- Dynamics: which probes were recorded, and by which trials --
def _fold_probes(value: tuple, rows: pd.DataFrame) -> tuple:
    keys, trials = value
    extras = _parse_extras(rows["extra"])
    new_keys = set(probe_keys(pd.DataFrame({"extra": extras})))
    new_trials = {int(t) for t, e in zip(rows["trial_id"], extras) if e}
    return keys | new_keys, trials | new_trials


def probe_summary(engine: Engine, info: CampaignInfo,
                  state: IncrementalState) -> tuple[list[str], list[int]] | None:
    """The measurements' probe keys (`probe_keys` over every row) and the trials with a
    non-empty `extra` (sorted), from the database's JSON functions (then folded
    incrementally) instead of parsing every row's JSON; None without JSON functions."""
    if engine.dialect.name not in ("sqlite", "postgresql"):
        return None

    def full(connection, upto: int) -> tuple:
        keys, trials, unread = queries.probe_keys_of(connection, info.id, upto)
        if unread:  # rows the database could not read as JSON: parsed as the loader does
            rows = pd.DataFrame(unread, columns=["trial_id", "extra"])
            return _fold_probes((keys, trials), rows)
        return keys, trials
    keys, trials = folded(state, ("probes", info.id), engine, info.id, full, _fold_probes)
    return sorted(keys), sorted(trials)


# -- trials: re-read only the new ones and the ones that were running --
@dataclass(frozen=True)
class TrialsSnapshot:
    frame: pd.DataFrame  # campaign_trials' frame
    max_id: int
    running: tuple  # ids of the trials that were running (the only rows a worker updates)


def _merged_trials(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """`old` with the rows of `new` replacing or adding theirs, in the query's order
    ((cell_id, trial_number)); columns whose type the new rows change are rebuilt as the
    full query would type them."""
    kept = old.loc[~old["trial_id"].isin(new["trial_id"])]
    merged = pd.concat([kept, new], ignore_index=True)
    for column in merged.columns:
        target, now = old[column].dtype, merged[column].dtype
        if now != target and target != object:
            try:  # e.g. a new row's None in a datetime or string column: NaT / NaN
                merged[column] = merged[column].astype(target)
                continue
            except (TypeError, ValueError):
                pass
        elif now == target and not (target == object and old[column].isna().any()
                                    and not merged[column].isna().any()):
            continue  # (an object column that lost its last None may type differently)
        values = [None if v is pd.NaT or (isinstance(v, float) and np.isnan(v)) else v
                  for v in merged[column].astype(object)]
        values = [v.to_pydatetime() if isinstance(v, pd.Timestamp) else v for v in values]
        merged[column] = pd.DataFrame({column: values})[column]
    merged = merged.sort_values(["cell_id", "trial_number", "trial_id"], kind="stable")
    return merged.reset_index(drop=True)


def campaign_trials(engine: Engine, campaign_id: int,
                    state: IncrementalState) -> pd.DataFrame:
    """`study.report.campaign_trials`, reading only the trials added since the last call
    and those that were running then (workers update a trial row only while it runs:
    `WHERE outcome = 'running'`; a running row that is gone was deleted: a prefetched
    slot given back); read whole the first time, or when the row count (read in the same
    snapshot) says a row is missing: one committed late, below the newest id read (a
    PostgreSQL transaction draws its ids before it commits)."""
    key = ("trials", int(campaign_id))
    with state.lock:
        last = state.entries.get(key)
        frame = None
        if last is not None:
            with snapshot(engine) as connection:
                changed = queries.trials_fast(connection, campaign_id,
                                              after_id=last.max_id, ids=last.running)
                count = queries.trial_count(connection, campaign_id)
            changed["hparams"] = changed["hparams"].map(_as_dict)
            frame = last.frame
            gone = set(last.running) - set(changed["trial_id"].astype(int))
            if gone:
                frame = frame.loc[~frame["trial_id"].isin(gone)].reset_index(drop=True)
            frame = _merged_trials(frame, changed) if len(changed) else frame
            if len(frame) != count:
                frame = None
        if frame is None:
            frame = report_campaign_trials(engine, campaign_id)
        max_id = int(frame["trial_id"].max()) if len(frame) else 0
        running = tuple(int(t) for t in frame.loc[frame["outcome"] == "running", "trial_id"])
        state.entries[key] = TrialsSnapshot(frame, max_id, running)
        return frame
