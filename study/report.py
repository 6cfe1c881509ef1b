"""Campaign analysis assembled from the database: what `batchlab analyze` writes and the
dashboard shows (app/data.py imports these functions), so both give the same numbers.

Plain functions over an engine and pandas frames; never torch (the dashboard runs where
torch is absent). `load_campaign` reads one campaign into frames; the analysis functions
(`scaling_analysis`, `winners`, `edge_warnings`, `scatter`, `budget_frame`,
`sensitivity`) turn those frames into tables; `summary` gathers them into the JSON that
`batchlab analyze` writes (study/analyze.py draws the figures).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from db import queries
from db.models import Campaign
from study.analysis import (best_under_budget, bootstrap_steps_to_result, classify_regimes,
                            edge_check, fit_scaling, search_space_scatter,
                            steps_to_result, trial_first_steps, winning_hparams)
from study.results import (FINISHED, CampaignInfo, campaign_info, cell_table, cell_table_from,
                           with_metric)


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
    measurements = with_metric(measurements, info.metric)  # imported metrics live in extra
    trials = queries.trials(engine, info.id)
    trials["hparams"] = trials["hparams"].map(_as_dict)
    return CampaignData(info=info, spec=campaign_spec(engine, info.id),
                        cells=queries.cells(engine, info.id), trials=trials,
                        measurements=measurements, table=cell_table(engine, info),
                        workers=queries.workers(engine, info.id))


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


def scaling_inputs_key(data: CampaignData, *, n_resamples: int = 500, level: float = 0.95,
                       seed: int = 0) -> str:
    """A digest of everything `scaling_analysis` reads: per finished trial in the bootstrap
    pool its cell, number and first on-target step / examples / seconds
    (`trial_first_steps`), the cells with finished trials, the cells and the parameters.
    Equal digests give equal analyses, so a cache keyed on it recomputes the bootstrap and
    its 500 refits only when some cell's trials changed (not on every new measurement)."""
    trials = data.finished_trials
    info = data.info
    firsts = trial_first_steps(trials, data.measurements, metric=info.metric,
                               threshold=info.threshold, mode=info.mode)
    frames = (firsts, data.cells[["cell_id", "batch_size", "optimizer", "schedule"]],
              pd.DataFrame({"cell_id": sorted(pd.unique(trials["cell_id"]))}))
    digest = hashlib.sha256(repr((n_resamples, level, seed)).encode())
    for frame in frames:
        digest.update(repr(list(frame.columns)).encode())
        digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def series_of(frame: pd.DataFrame) -> pd.Series:
    return frame["optimizer"] + " / " + frame["schedule"]


def search_space(spec: dict, optimizer: str, schedule: str) -> dict:
    """The searched ranges of one cell as `study.analysis.edge_check` wants them:
    name -> {"low", "high", "scale"} (fixed values and choices left out)."""
    spaces = spec.get("spaces", {}) if isinstance(spec, dict) else {}
    params = []
    for key in ("all", f"optimizer:{optimizer}", f"schedule:{schedule}"):
        params.extend(spaces.get(key, []))
    return _ranges(params)


def _ranges(params: list[dict]) -> dict:
    out = {}
    for param in params:
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
    with the cell's optimizer and schedule. An imported campaign whose search ranges differ
    per batch size (spec `cell_spaces`) is checked against each cell's own ranges."""
    per_cell = bool(data.spec.get("cell_spaces")) if isinstance(data.spec, dict) else False
    keys = ["optimizer", "schedule", "batch_size"] if per_cell else ["optimizer", "schedule"]
    parts = []
    for key, group in winners_frame.groupby(keys):
        optimizer, schedule = key[0], key[1]
        space = (cell_search_space(data.spec, optimizer, int(key[2])) if per_cell
                 else search_space(data.spec, optimizer, schedule))
        checked = edge_check(group, space, tolerance=tolerance)
        parts.append(checked.assign(optimizer=optimizer, schedule=schedule))
    if not parts:
        return pd.DataFrame(columns=["cell_id", "batch_size", "optimizer", "schedule",
                                     "parameter", "value", "position", "at_edge"])
    out = pd.concat(parts, ignore_index=True)
    return out.loc[out["at_edge"].astype(bool)].reset_index(drop=True)


def cell_search_space(spec: dict, optimizer: str, batch_size: int) -> dict:
    """One cell's searched ranges from an imported campaign's `cell_spaces`
    ("<optimizer>/<batch size>" -> list of {name, low, high, scale})."""
    params = spec.get("cell_spaces", {}).get(f"{optimizer}/{batch_size}", [])
    return _ranges(params)


def edge_text(row) -> str:
    side = "lower" if row["near_low"] else "upper"
    return (f"{row['optimizer']} / {row['schedule']} B={row['batch_size']}: the winner's "
            f"{row['parameter']} = {row['value']:.4g} is at the {side} edge of the search "
            f"space; the optimum may lie outside it")


def scatter(data: CampaignData) -> pd.DataFrame:
    return search_space_scatter(data.trials, data.measurements, data.results(),
                                metric=data.info.metric, threshold=data.info.threshold,
                                mode=data.info.mode)


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


def budget_frame(data: CampaignData, budgets: list[float], kind: str,
                 examples_per_epoch_value: float = float("nan")) -> pd.DataFrame:
    """`best_under_budget` with `series` and a readable `budget_label`; `kind` "steps" or
    "epochs" (an epoch budget is turned into examples with the training-set size)."""
    cells = data.cells[["cell_id", "batch_size", "optimizer", "schedule"]]
    info = data.info
    amounts = budgets if kind == "steps" else [b * examples_per_epoch_value for b in budgets]
    best = best_under_budget(data.trials, data.measurements, cells, metric=info.metric,
                             budgets=amounts, kind="steps" if kind == "steps" else "examples",
                             mode=info.mode)
    labels = {a: f"{b:g} {'steps' if kind == 'steps' else 'epochs'}" for a, b in zip(amounts, budgets)}
    best = best.merge(cells[["cell_id", "optimizer", "schedule"]], on="cell_id", how="left")
    best["series"] = series_of(best)
    best["budget_label"] = best["budget"].map(lambda a: labels.get(a, f"{a:g}"))
    return best


# ---- the dashboard's loader: one pass over the measurements --------------------------------
def _parse_extras(values: pd.Series) -> pd.Series:
    """`_as_dict` per stored JSON text, parsing each distinct text once (most rows hold the
    same few texts, e.g. '{}'); rows with equal text share one dict: treat it as read-only."""
    parsed: dict = {}

    def one(value):
        if isinstance(value, str):
            if value not in parsed:
                parsed[value] = _as_dict(value)
            return parsed[value]
        return _as_dict(value)
    return values.map(one)


def load_campaign_fast(engine: Engine, name: str) -> CampaignData | None:
    """`load_campaign` with the same frames, for large databases: the measurements are read
    once (one raw query, `queries.measurements_fast`; each distinct extra JSON parsed
    once) and the cell table is computed from them (`cell_table_from`)."""
    info = campaign_info(engine, name)
    if info is None:
        return None
    measurements = queries.measurements_fast(engine, info.id)
    measurements["extra"] = _parse_extras(measurements["extra"])
    measurements = with_metric(measurements, info.metric)
    trials = queries.trials_fast(engine, info.id)
    trials["hparams"] = trials["hparams"].map(_as_dict)
    cells = queries.cells(engine, info.id)
    return CampaignData(info=info, spec=campaign_spec(engine, info.id), cells=cells,
                        trials=trials, measurements=measurements,
                        table=cell_table_from(info, cells, trials, measurements),
                        workers=queries.workers(engine, info.id))


def campaign_trials(engine: Engine, campaign_id: int) -> pd.DataFrame:
    """The campaign's trials (`queries.trials_fast`) with `hparams` as dicts."""
    trials = queries.trials_fast(engine, campaign_id)
    trials["hparams"] = trials["hparams"].map(_as_dict)
    return trials


def load_progress(engine: Engine, name: str, *,
                  trials: pd.DataFrame | None = None) -> CampaignData | None:
    """A campaign's cells, trials and workers without its measurements (`measurements`
    and `table` empty): what progress, rate and ETA need. `trials`: `campaign_trials`'
    frame already at hand (an incremental reader's)."""
    info = campaign_info(engine, name)
    if info is None:
        return None
    if trials is None:
        trials = campaign_trials(engine, info.id)
    return CampaignData(info=info, spec={}, cells=queries.cells(engine, info.id), trials=trials,
                        measurements=pd.DataFrame(), table=pd.DataFrame(),
                        workers=queries.workers(engine, info.id))


def load_campaign_light(engine: Engine, name: str, *, firsts: pd.DataFrame | None = None,
                        info: CampaignInfo | None = None,
                        trials: pd.DataFrame | None = None) -> CampaignData | None:
    """`load_campaign_fast` without reading every measurement: `measurements` holds only
    each trial's first evaluation that beats the target (`queries.first_beating_measurements`,
    computed in SQL), which is all that `results()`, the cell table, winners and the
    bootstrap read, so they equal `load_campaign_fast`'s. Pages that plot curves load the
    rows of the trials they show (`queries.measurements_of_trials`). Falls back to
    `load_campaign_fast` for a metric that lives in the extra JSON. `firsts`: those rows
    already at hand (an incremental reader's, `app.data.load_light_incremental`), and
    `trials` likewise (`campaign_trials`' frame)."""
    info = info or campaign_info(engine, name)
    if info is None:
        return None
    if firsts is None:
        firsts = queries.first_beating_measurements(engine, info.id, info.metric,
                                                    info.threshold, info.mode)
    if firsts is None:
        return load_campaign_fast(engine, name)
    firsts["extra"] = _parse_extras(firsts["extra"])
    if trials is None:
        trials = campaign_trials(engine, info.id)
    cells = queries.cells(engine, info.id)
    return CampaignData(info=info, spec=campaign_spec(engine, info.id), cells=cells,
                        trials=trials, measurements=firsts,
                        table=cell_table_from(info, cells, trials, firsts),
                        workers=queries.workers(engine, info.id))


def measurements_of_trials(engine: Engine, info: CampaignInfo, trial_ids) -> pd.DataFrame:
    """The rows `load_campaign_fast` holds for `trial_ids` (same columns and order)."""
    frame = queries.measurements_of_trials(engine, trial_ids)
    frame["extra"] = _parse_extras(frame["extra"])
    return with_metric(frame, info.metric)
