"""Per-cell results of a campaign: the `batchlab results` table and the figures' data."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db import queries
from db.models import Campaign
from study.analysis.steps import steps_to_result

VARYING_INTERVAL_NOTE = "(evaluation interval varies: the most common is shown)"
FINISHED = ("reached", "not_reached", "diverged", "failed", "pruned")
TABLE_COLUMNS = ["batch_size", "optimizer", "schedule", "trials", "running", "planned", "reached",
                 "diverged", "steps_to_result", "examples_to_result", "seconds_to_result",
                 "winner_trial", "winner_hparams"]


@dataclass(frozen=True)
class CampaignInfo:
    id: int
    name: str
    workload: str
    metric: str
    threshold: float
    mode: str
    eval_every: int
    # Imported published studies are evaluated at intervals that differ between (and within)
    # trials; `eval_every` is then only the most common one (spec `eval_intervals`).
    eval_interval_varies: bool = False

    @property
    def target_text(self) -> str:
        return f"{self.metric} {'<' if self.mode == 'min' else '>'} {self.threshold:g}"

    @property
    def figure_workload(self) -> str:
        """The workload as figures name it: with a note when the evaluation interval
        varies, since they state "evaluated every `eval_every` steps"."""
        if self.eval_interval_varies:
            return f"{self.workload} {VARYING_INTERVAL_NOTE}"
        return self.workload


def campaign_info(engine: Engine, name: str) -> CampaignInfo | None:
    row = queries.campaign_by_name(engine, name)
    if row is None:
        return None
    return CampaignInfo(int(row["id"]), row["name"], row["workload"], row["target_metric"],
                        float(row["target_threshold"]), row["target_mode"], int(row["eval_every"]),
                        _eval_interval_varies(engine, int(row["id"])))


def _eval_interval_varies(engine: Engine, campaign_id: int) -> bool:
    """Whether the campaign's spec lists more than one evaluation interval (imports of
    published data record them as `eval_intervals`: interval -> count)."""
    with Session(engine) as session:
        spec = session.execute(select(Campaign.spec).where(Campaign.id == campaign_id)).scalar()
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return False
    intervals = spec.get("eval_intervals") if isinstance(spec, dict) else None
    return isinstance(intervals, dict) and len(intervals) > 1


def cell_table(engine: Engine, info: CampaignInfo) -> pd.DataFrame:
    """One row per cell: progress, steps/examples/seconds to result (NaN where no trial
    reached the target; seconds NaN also where the winner recorded no training time) and
    the winning trial with its hyperparameters."""
    return cell_table_from(info, queries.cells(engine, info.id), queries.trials(engine, info.id),
                           queries.measurements(engine, info.id))


def cell_table_from(info: CampaignInfo, cells: pd.DataFrame, trials: pd.DataFrame,
                    measurements: pd.DataFrame) -> pd.DataFrame:
    """`cell_table` from frames already loaded (a loader that has the measurements for
    other figures reads them once)."""
    measurements = with_metric(measurements, info.metric)
    finished = trials.loc[trials["outcome"].isin(FINISHED)]
    results = steps_to_result(finished, measurements,
                              metric=info.metric, threshold=info.threshold, mode=info.mode)
    table = cells.merge(results, on="cell_id", how="left")
    counts = _outcome_counts(trials)
    table = table.merge(counts, left_on="cell_id", right_index=True, how="left")
    table[list(counts.columns)] = table[list(counts.columns)].fillna(0).astype(int)
    hparams = trials.set_index("trial_id")["hparams"]
    table["winner_trial"] = table["winner_trial_number"].astype("Int64")
    table["winner_hparams"] = [
        json.dumps(hparams[t], sort_keys=True) if not pd.isna(t) else "" for t in table["winner_trial_id"]]
    table["seconds_to_result"] = _recorded_seconds(table, trials)
    table = table.rename(columns={"trials_planned": "planned"})
    for column in ("steps_to_result", "examples_to_result"):
        table[column] = table[column].astype("Int64")  # integers, with <NA> for "no result"
    return table[TABLE_COLUMNS + ["cell_id"]].sort_values(
        ["optimizer", "schedule", "batch_size"]).reset_index(drop=True)


def _recorded_seconds(table: pd.DataFrame, trials: pd.DataFrame) -> pd.Series:
    """`seconds_to_result`, NaN where the winning trial recorded no training time: its
    bl_trials.wall_seconds is NULL (imported published data) or 0 (the NQM's closed forms:
    nothing is trained). Their measurements hold wall_seconds 0, which is not a time to
    result; no trial that trained for a step took 0 seconds."""
    seconds = table["seconds_to_result"].astype(float)
    if "wall_seconds" not in trials.columns:
        return seconds
    trained = trials.set_index("trial_id")["wall_seconds"].astype(float)
    return seconds.where(table["winner_trial_id"].map(trained).gt(0))


def with_metric(measurements: pd.DataFrame, metric: str) -> pd.DataFrame:
    """`measurements` with a `metric` column: metrics outside bl_measurements' own columns
    (e.g. an imported `val_average_precision`) live in the `extra` JSON; NaN where absent."""
    if metric in measurements.columns or "extra" not in measurements.columns:
        return measurements
    values = [_extra_number(extra, metric) for extra in measurements["extra"]]
    return measurements.assign(**{metric: np.asarray(values, dtype=float)})


def _extra_number(extra, key: str) -> float:
    if isinstance(extra, str):
        extra = json.loads(extra or "{}")
    value = extra.get(key) if isinstance(extra, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _outcome_counts(trials: pd.DataFrame) -> pd.DataFrame:
    outcome = trials["outcome"]
    frame = pd.DataFrame({
        "cell_id": trials["cell_id"],
        "trials": outcome.isin(FINISHED).astype(int),
        "running": (outcome == "running").astype(int),
        "reached": (outcome == "reached").astype(int),
        "diverged": (outcome == "diverged").astype(int)})
    return frame.groupby("cell_id").sum().astype(int)


def format_table(table: pd.DataFrame, fmt: str) -> str:
    shown = table.drop(columns=["cell_id"])
    if fmt == "csv":
        return shown.to_csv(index=False)
    if fmt == "json":
        records = json.loads(shown.to_json(orient="records"))
        for record in records:
            record["winner_hparams"] = json.loads(record["winner_hparams"] or "null")
        return json.dumps(records, indent=2)
    shown = shown.astype(object).where(shown.notna(), "-")
    shown["seconds_to_result"] = [v if v == "-" else f"{v:.1f}" for v in shown["seconds_to_result"]]
    return shown.to_string(index=False)


def has_result(value) -> bool:
    return value is not None and not pd.isna(value) and np.isfinite(float(value))
