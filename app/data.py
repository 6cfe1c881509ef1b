"""The dashboard's data: plain functions over a read-only engine, no Streamlit (so they are
tested directly), never torch.

Everything a page shows is built here from `db.queries`, `study.results` and
`study.analysis`; the pages only lay it out.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from db import queries
from db.models import Campaign
from study.analysis import (bootstrap_steps_to_result, classify_regimes, edge_check,
                            fit_scaling, search_space_scatter, steps_to_result,
                            winning_hparams)
from study.results import FINISHED, CampaignInfo, campaign_info, cell_table

# A worker whose last heartbeat is older than this is shown as stale (probably dead).
STALE_HEARTBEAT_SECONDS = 120
# Trials per minute are measured over this recent window (falls back to the whole run).
RATE_WINDOW_MINUTES = 15


@dataclass(frozen=True)
class CampaignData:
    """One campaign as the pages need it: `info`, the campaign's `spec` (JSON), `cells`,
    `trials` (all outcomes, running included), `measurements` (with `extra`, the probes'
    JSON), `table` (`study.results.cell_table`) and `workers`."""
    info: CampaignInfo
    spec: dict
    cells: pd.DataFrame
    trials: pd.DataFrame
    measurements: pd.DataFrame
    table: pd.DataFrame
    workers: pd.DataFrame

    @property
    def finished_trials(self) -> pd.DataFrame:
        return self.trials.loc[self.trials["outcome"].isin(FINISHED)]

    def results(self) -> pd.DataFrame:
        """Exact steps-to-result per cell (`study.analysis.steps_to_result`)."""
        return steps_to_result(self.finished_trials, self.measurements,
                               metric=self.info.metric, threshold=self.info.threshold,
                               mode=self.info.mode)


def campaign_names(engine: Engine) -> list[str]:
    return list(queries.campaigns(engine)["name"])


def campaign_spec(engine: Engine, campaign_id: int) -> dict:
    with Session(engine) as session:
        spec = session.execute(select(Campaign.spec).where(Campaign.id == campaign_id)).scalar()
    return _as_dict(spec)


def _as_dict(value) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def load_campaign(engine: Engine, name: str) -> CampaignData | None:
    info = campaign_info(engine, name)
    if info is None:
        return None
    measurements = queries.measurements(engine, info.id)
    measurements["extra"] = measurements["extra"].map(_as_dict)
    trials = queries.trials(engine, info.id)
    trials["hparams"] = trials["hparams"].map(_as_dict)
    return CampaignData(info=info, spec=campaign_spec(engine, info.id),
                        cells=queries.cells(engine, info.id), trials=trials,
                        measurements=measurements, table=cell_table(engine, info),
                        workers=queries.workers(engine, info.id))


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


# ---- scaling ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingAnalysis:
    """`summary`: bootstrap summary per cell; `fits`: S(B) fit per series; `regimes`: per
    cell regime and slope (`classify_regimes`); `resamples`: resampled steps."""
    summary: pd.DataFrame
    fits: pd.DataFrame
    regimes: pd.DataFrame


def scaling_analysis(data: CampaignData, *, n_resamples: int = 500, level: float = 0.95,
                     seed: int = 0) -> ScalingAnalysis:
    trials = data.finished_trials
    if trials.empty:
        empty = pd.DataFrame()
        return ScalingAnalysis(empty, empty, empty)
    boot = bootstrap_steps_to_result(trials, data.measurements, metric=data.info.metric,
                                     threshold=data.info.threshold, mode=data.info.mode,
                                     n_resamples=n_resamples, level=level, seed=seed)
    cells = data.cells[["cell_id", "batch_size", "optimizer", "schedule"]]
    fits = fit_scaling(boot.summary, cells, resampled_steps=boot.steps, level=level)
    regimes = classify_regimes(boot.summary, cells, fits)
    return ScalingAnalysis(boot.summary, fits, regimes)


def series_of(frame: pd.DataFrame) -> pd.Series:
    return frame["optimizer"] + " / " + frame["schedule"]


# ---- hyperparameters --------------------------------------------------------------------------
def search_space(spec: dict, optimizer: str, schedule: str) -> dict:
    """The searched ranges of one cell as `study.analysis.edge_check` wants them:
    name -> {"low", "high", "scale"} (fixed values and choices left out)."""
    spaces = spec.get("spaces", {}) if isinstance(spec, dict) else {}
    out = {}
    for key in ("all", f"optimizer:{optimizer}", f"schedule:{schedule}"):
        for param in spaces.get(key, []):
            if param.get("low") is None or param.get("high") is None:
                continue
            scale = param.get("scale") or "linear"
            if param.get("integer") and scale == "linear":
                scale = "integer"
            out[param["name"]] = {"low": float(param["low"]), "high": float(param["high"]),
                                  "scale": scale}
    return out


def winners(data: CampaignData) -> pd.DataFrame:
    """The winning trial's hyperparameters per cell with a result."""
    cells = data.cells[["cell_id", "batch_size", "optimizer", "schedule"]]
    return winning_hparams(data.results(), data.trials, cells)


def edge_warnings(data: CampaignData, winners_frame: pd.DataFrame,
                  tolerance: float = 0.05) -> pd.DataFrame:
    """Winners within `tolerance` of a search-range bound (edge_check rows with at_edge),
    with the cell's optimizer and schedule."""
    parts = []
    for (optimizer, schedule), group in winners_frame.groupby(["optimizer", "schedule"]):
        checked = edge_check(group, search_space(data.spec, optimizer, schedule),
                             tolerance=tolerance)
        parts.append(checked.assign(optimizer=optimizer, schedule=schedule))
    if not parts:
        return pd.DataFrame(columns=["cell_id", "batch_size", "optimizer", "schedule",
                                     "parameter", "value", "position", "at_edge"])
    out = pd.concat(parts, ignore_index=True)
    return out.loc[out["at_edge"].astype(bool)].reset_index(drop=True)


def edge_text(row) -> str:
    side = "lower" if row["near_low"] else "upper"
    return (f"{row['optimizer']} / {row['schedule']} B={row['batch_size']}: the winner's "
            f"{row['parameter']} = {row['value']:.4g} is at the {side} edge of the search "
            f"space; the optimum may lie outside it")


def scatter(data: CampaignData) -> pd.DataFrame:
    return search_space_scatter(data.trials, data.measurements, data.results(),
                                metric=data.info.metric, threshold=data.info.threshold,
                                mode=data.info.mode)


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


def winner_trial_ids(data: CampaignData) -> list[int]:
    results = data.results()
    return [int(t) for t in results["winner_trial_id"].dropna()]


def examples_per_epoch(measurements: pd.DataFrame) -> float:
    """The training-set size, read off the measurements (examples / epoch); NaN when no
    measurement has a positive epoch."""
    rows = measurements.loc[(measurements["epoch"] > 0) & measurements["examples"].notna()]
    if rows.empty:
        return float("nan")
    return float(np.median(rows["examples"].astype(float) / rows["epoch"].astype(float)))


def default_budgets(largest: float, count: int = 4) -> list[float]:
    """`count` budgets halving down from `largest` (e.g. 1000, 500, 250, 125)."""
    if not np.isfinite(largest) or largest <= 0:
        return []
    return sorted({float(f"{largest / 2 ** k:.3g}") for k in range(count)})


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


# ---- read-only SQL ----------------------------------------------------------------------------
class QueryError(Exception):
    """A query the SQL page refuses or the database rejected; the message is shown."""


@dataclass(frozen=True)
class QueryResult:
    frame: pd.DataFrame
    truncated: bool  # more rows than the row limit existed
    seconds: float


_TOKENS = re.compile(r"""
    (?P<comment>--[^\n]*|/\*.*?\*/)
  | (?P<string>'(?:[^']|'')*'|"(?:[^"]|"")*"|(?P<dollar>\$[A-Za-z_0-9]*\$).*?(?P=dollar))
  | (?P<semicolon>;)
""", re.VERBOSE | re.DOTALL)


def single_statement(sql: str) -> str:
    """`sql` without trailing semicolons; QueryError when it is empty or holds more than one
    statement (a second statement could end the read-only transaction: COMMIT; ...)."""
    end, semicolons, position = 0, [], 0

    def plain(text: str, offset: int) -> int:
        return offset + len(text.rstrip()) if text.strip() else end

    for match in _TOKENS.finditer(sql):
        end = plain(sql[position:match.start()], position)
        if match.group("semicolon"):
            semicolons.append(match.start())
        elif match.group("string"):
            end = match.end()
        position = match.end()
    end = plain(sql[position:], position)
    if end == 0:
        raise QueryError("the query is empty")
    if any(s < end for s in semicolons):
        raise QueryError("one statement at a time: remove the ';' between statements")
    return sql[:end].strip()


def run_read_only_query(engine: Engine, sql: str, *, row_limit: int = 1000,
                        timeout_seconds: float = 10.0) -> QueryResult:
    """Run one statement on a read-only connection and return at most `row_limit` rows.

    SQLite: the engine opens the file with mode=ro (SQLite refuses every write), this
    connection also sets `PRAGMA query_only` (no temporary tables either) and a progress
    handler interrupts the statement after `timeout_seconds`. PostgreSQL: the engine's
    transactions are READ ONLY; `SET LOCAL statement_timeout` bounds the statement.
    The transaction is always rolled back. Raises QueryError with the database's message."""
    statement = single_statement(sql)
    started = time.monotonic()
    backend = engine.dialect.name
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
                result = connection.exec_driver_sql(statement)
                if result.returns_rows:
                    columns = list(result.keys())
                    rows = result.fetchmany(row_limit + 1)
                else:
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
    except SQLAlchemyError as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
    frame = pd.DataFrame([tuple(r) for r in rows[:row_limit]], columns=columns)
    return QueryResult(frame, len(rows) > row_limit, time.monotonic() - started)


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
