"""`batchlab analyze`: one campaign's analysis as summary.json plus PNG and SVG figures.

The numbers come from `study.report` (the functions the dashboard uses) and the figures
from `study.figures` (the dashboard's figure functions), so a report and the dashboard
never disagree. Never imports torch.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from study import report
from study.analysis import hparam_scaling, relative_change, steps_vs_trial_count
from study.analysis.bootstrap import DEFAULT_POOL
from study.analysis.distance import distance_fits, distance_series, fit_distance_growth
from study.figures import (budget_chart, distance_growth_chart, distance_growth_frame,
                           hparam_scaling_chart, hparam_scatter_chart, interpolation_chart,
                           interpolation_frame, regime_bands, save_chart, scaling_fit_curves,
                           scaling_points, scaling_study_chart, sharpness_chart)

CENSORING_NOTE = (
    "Steps-to-result of a cell is the fewest steps at which any eligible trial (reached, "
    "not_reached, pruned) first strictly beat the target. Bootstrap: the cell's trials are "
    "resampled with replacement; reached, not_reached, pruned and diverged trials are "
    "resampled, diverged ones never win, failed (crashed) trials are left out. A pruned "
    "(censored) trial counts as 'not reached by its censoring step': exact in the full "
    "sample, possibly pessimistic in a resample that omits the trial that set the bar, so "
    "intervals can only be biased upward.")


@dataclass(frozen=True)
class AnalyzeOptions:
    n_resamples: int = 1000
    level: float = 0.95
    seed: int = 0
    edge_tolerance: float = 0.05
    cell_figures: bool = True  # the search-space scatter of every cell
    formats: tuple[str, ...] = ("png", "svg")


@dataclass
class AnalyzeResult:
    summary: dict
    figures: list[Path] = field(default_factory=list)


def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _records(frame: pd.DataFrame, columns: list[str] | None = None) -> list[dict]:
    if frame is None or frame.empty:
        return []
    shown = frame[[c for c in (columns or frame.columns) if c in frame.columns]]
    return _clean(shown.astype(object).where(shown.notna(), None).to_dict("records"))


def sensitivity_counts(trials_per_cell: int) -> list[int]:
    """N values for the trial-count sensitivity: halving down from the cell's count."""
    counts, n = [], max(1, int(trials_per_cell))
    while n >= 1 and len(counts) < 5:
        counts.append(n)
        n //= 2
    return sorted(set(counts))


def eval_interval_note(data: report.CampaignData) -> str:
    intervals = data.spec.get("eval_intervals") if isinstance(data.spec, dict) else None
    if intervals:
        return (f"evaluation intervals vary; {data.info.eval_every} steps is the most common "
                f"(interval: count of consecutive evaluation pairs): {intervals}")
    return f"every {data.info.eval_every} steps"


def build_summary(data: report.CampaignData, analysis: report.ScalingAnalysis,
                  winners: pd.DataFrame, edges: pd.DataFrame, options: AnalyzeOptions) -> dict:
    """Everything `batchlab analyze` reports, as plain JSON-ready data."""
    info = data.info
    cells = data.cells[["cell_id", "batch_size", "optimizer", "schedule"]]
    per_cell = cells.merge(data.table[["cell_id", "trials", "reached", "diverged",
                                       "steps_to_result", "examples_to_result"]],
                           on="cell_id", how="left")
    if len(analysis.summary):
        per_cell = per_cell.merge(analysis.summary.drop(
            columns=["steps_to_result", "examples_to_result"]), on="cell_id", how="left")
    if len(analysis.regimes):
        per_cell = per_cell.merge(analysis.regimes[["cell_id", "regime", "slope_to_next"]],
                                  on="cell_id", how="left")
    boundaries = []
    if len(analysis.regimes):
        boundaries = _records(analysis.regimes.groupby(["optimizer", "schedule"], as_index=False)
                              [["perfect_boundary", "plateau_batch_size"]].first())
    counts = sensitivity_counts(int(data.table["trials"].max()) if len(data.table) else 0)
    sensitivity = steps_vs_trial_count(data.finished_trials, data.measurements,
                                       metric=info.metric, threshold=info.threshold,
                                       counts=counts, mode=info.mode)
    sensitivity = relative_change(sensitivity).merge(cells, on="cell_id", how="left")
    outcomes = data.finished_trials["outcome"].value_counts().to_dict()
    return _clean({
        "campaign": info.name, "workload": info.workload,
        "target": {"metric": info.metric, "threshold": info.threshold, "mode": info.mode,
                   "text": info.target_text},
        "evaluation_interval": {"steps": info.eval_every, "note": eval_interval_note(data)},
        "trials": {"finished": int(len(data.finished_trials)), "by_outcome": outcomes},
        "censoring": {"note": CENSORING_NOTE, "pruned_trials": int(outcomes.get("pruned", 0)),
                      "bootstrap_pool": list(DEFAULT_POOL),
                      "n_resamples": options.n_resamples, "level": options.level,
                      "seed": options.seed},
        "cells": _records(per_cell.sort_values(["optimizer", "schedule", "batch_size"])),
        "fits": _records(analysis.fits),
        "regime_boundaries": boundaries,
        "optimal_hparams": {
            "winners": _records(winners, ["batch_size", "optimizer", "schedule", "winner_trial_id",
                                          "steps_to_result", "learning_rate", "momentum",
                                          "effective_learning_rate"]),
            "power_laws": _records(hparam_scaling(winners)) if len(winners) else []},
        "edge_warnings": [report.edge_text(row) for row in edges.to_dict("records")],
        "edge_tolerance": options.edge_tolerance,
        "trial_count_sensitivity": _records(sensitivity.sort_values(
            ["optimizer", "schedule", "batch_size", "n_trials"]),
            ["optimizer", "schedule", "batch_size", "n_trials", "n_used", "steps_to_result",
             "ratio_to_final"]),
    })


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


class _FigureWriter:
    """Saves each chart in every requested format under the output folder."""

    def __init__(self, output: Path, formats: tuple[str, ...]):
        self.output, self.formats, self.paths = output, formats, []

    def save(self, chart, stem: str) -> None:
        for fmt in self.formats:
            self.paths.append(save_chart(chart, self.output / f"{stem}.{fmt}"))


def _context(data: report.CampaignData) -> dict:
    return {"workload": data.info.figure_workload, "target": data.info.target_text,
            "eval_every": data.info.eval_every}


def _scaling_figures(writer, data, analysis, context) -> None:
    fits = analysis.fits
    intervals = analysis.summary if len(analysis.summary) else None
    b_crit = ({f"{r.optimizer} / {r.schedule}": r.b_crit for r in fits.itertuples()
               if np.isfinite(r.b_crit)} if len(fits) else {})
    series = list(dict.fromkeys(report.series_of(data.table)))
    shade = series[0] if series else ""
    bands = None
    if shade and len(analysis.regimes):
        chosen = analysis.regimes.loc[report.series_of(analysis.regimes) == shade]
        bands = regime_bands(chosen) if len(chosen) else None
    for y, stem in (("steps_to_result", "steps_vs_batch_size"),
                    ("examples_to_result", "examples_vs_batch_size")):
        points = scaling_points(data.table, y, intervals=intervals)
        if points.empty:
            continue
        curves = scaling_fit_curves(fits, points, y)
        writer.save(scaling_study_chart(points, y=y, curves=curves, bands=bands,
                                        shaded_series=shade, b_crit=b_crit, **context), stem)


def _hparam_figures(writer, winners, context) -> None:
    if winners.empty:
        return
    choices = [("learning_rate", True, True), ("effective_learning_rate", True, True)]
    if (winners["momentum"].fillna(0) != 0).any():
        choices.insert(1, ("momentum", False, False))
    for parameter, heuristics, log_y in choices:
        writer.save(hparam_scaling_chart(winners, parameter, heuristics=heuristics, log_y=log_y,
                                         **context), f"optimal_{parameter}_vs_batch_size")


def _scatter_figures(writer, data, edges, context) -> None:
    scatter = report.scatter(data)
    for cell in data.cells.sort_values(["optimizer", "schedule", "batch_size"]).itertuples():
        cell_scatter = scatter.loc[scatter["cell_id"] == cell.cell_id]
        frame = cell_scatter.loc[(cell_scatter["learning_rate"] > 0)
                                 & (cell_scatter["one_minus_momentum"] > 0)]
        if frame.empty:
            continue
        label = f"{cell.optimizer} / {cell.schedule} / B={cell.batch_size}"
        notes = [f"warning: {report.edge_text(r)}"
                 for r in edges.loc[edges["cell_id"] == cell.cell_id].to_dict("records")]
        writer.save(hparam_scatter_chart(cell_scatter, cell_label=label, edge_warnings=notes,
                                         **context),
                    f"search_space/{_safe(f'{cell.optimizer}_{cell.schedule}_B{cell.batch_size}')}")


def _budget_figures(writer, data, context) -> dict:
    """Best metric under step budgets (and epoch budgets when epochs are recorded)."""
    out = {}
    m = data.measurements
    if m.empty:
        return out
    step_budgets = report.default_budgets(float(m["step"].max()))
    steps = report.budget_frame(data, step_budgets, "steps")
    writer.save(budget_chart(steps, kind="steps", metric=data.info.metric, **context),
                "best_under_step_budget")
    out["steps"] = _records(steps, ["budget", "batch_size", "optimizer", "schedule",
                                    "best_value", "best_step"])
    size = report.examples_per_epoch(m)
    if np.isfinite(size):
        epoch_budgets = report.default_budgets(float(m["epoch"].max()))
        epochs = report.budget_frame(data, epoch_budgets, "epochs", size)
        writer.save(budget_chart(epochs, kind="epochs", metric=data.info.metric, **context),
                    "best_under_epoch_budget")
        out["epochs"] = _records(epochs, ["budget_label", "batch_size", "optimizer", "schedule",
                                          "best_value", "best_step"])
    return out


def _winner_labels(winners: pd.DataFrame) -> dict[int, str]:
    return {int(r.winner_trial_id): f"B={int(r.batch_size)} {r.optimizer}/{r.schedule} "
                                    f"(trial {int(r.winner_trial_id)})"
            for r in winners.itertuples() if pd.notna(r.winner_trial_id)}


def _distance_section(writer, data, winners, context) -> list[dict]:
    """Hoffer et al.'s d = a + b ln t per cell winner whose measurements hold the
    "distance" probe (`study.analysis.distance`), plus the figure; [] when none do."""
    if winners.empty or data.measurements.empty or "extra" not in data.measurements:
        return []
    labels = _winner_labels(winners)
    rows, series, fits = [], {}, {}
    for r in winners.sort_values(["optimizer", "schedule", "batch_size"]).itertuples():
        if pd.isna(r.winner_trial_id):
            continue
        trial = data.measurements.loc[data.measurements["trial_id"] == r.winner_trial_id]
        points = distance_series(trial)
        if points.empty:
            continue
        fit = fit_distance_growth(trial)
        label = labels[int(r.winner_trial_id)]
        series[label], fits[label] = points, fit
        layers = distance_fits(trial).iloc[1:]  # the global fit is the row itself
        rows.append({"cell_id": r.cell_id, "batch_size": r.batch_size, "optimizer": r.optimizer,
                     "schedule": r.schedule, "trial_id": r.winner_trial_id,
                     "final_distance": float(points["distance"].iloc[-1]),
                     **({k: getattr(fit, k) for k in ("intercept", "slope", "r_squared", "n_points",
                                                        "first_step", "last_step", "phase_end_step")}
                        if fit is not None else {}),
                     "per_layer": _records(layers)})
    if series:
        writer.save(distance_growth_chart(distance_growth_frame(series, fits), **context),
                    "distance_from_init")
    return _clean(rows)


def _json_dict(value) -> dict:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def _probe_section(writer, probes: pd.DataFrame | None, context) -> dict:
    """Post-training probes stored by `batchlab probe` (bl_probe_results, e.g.
    `db.queries.probe_results`): sharpness and Hessian per probed trial (newest row per
    setting), the newest interpolation per batch-norm mode; figures of each."""
    if probes is None or probes.empty:
        return {}
    rows = []
    for r in probes.itertuples():
        params, result = _json_dict(r.params), _json_dict(r.result)
        if r.kind == "sharpness":
            setting = f"{params.get('space')}, eps {params.get('epsilon'):g}"
            rows.append({"trial_id": r.trial_id, "batch_size": result.get("batch_size", r.batch_size),
                         "kind": "sharpness", "setting": setting, "value": result.get("sharpness"),
                         "train_loss": result.get("loss")})
        elif r.kind == "hessian":
            for quantity in ("top_eigenvalue", "trace"):
                rows.append({"trial_id": r.trial_id, "batch_size": result.get("batch_size", r.batch_size),
                             "kind": "hessian", "setting": quantity, "value": result.get(quantity),
                             "train_loss": None})
    out: dict = {}
    if rows:
        frame = pd.DataFrame(rows).drop_duplicates(["trial_id", "kind", "setting"], keep="last")
        frame = frame.sort_values(["kind", "setting", "batch_size"])
        out["values"] = _records(frame)
        sharp = frame.loc[frame["kind"] == "sharpness"].rename(columns={"value": "sharpness"})
        if len(sharp):
            writer.save(sharpness_chart(sharp, **context), "probe_sharpness_vs_batch_size")
        hess = frame.loc[frame["kind"] == "hessian"].rename(columns={"value": "hessian_value"})
        if len(hess):
            writer.save(sharpness_chart(hess, y="hessian_value", **context), "probe_hessian_vs_batch_size")
    interpolations = probes.loc[probes["kind"] == "interpolation"]
    if len(interpolations):
        out["interpolation"] = []
        newest = {}
        for r in interpolations.itertuples():
            params = _json_dict(r.params)
            newest[params.get("batch_norm", "")] = (params, _json_dict(r.result))
        for mode, (params, result) in newest.items():
            out["interpolation"].append(_clean({"params": params, **result}))
            curves = {k: v for k, v in result.items() if k != "alphas"}
            chart = interpolation_chart(
                interpolation_frame(result["alphas"], curves),
                small_label=f"B={params.get('small_batch_size')} (trial {params.get('small_trial_id')})",
                large_label=f"B={params.get('large_batch_size')} (trial {params.get('large_trial_id')})",
                batch_norm=mode, **context)
            writer.save(chart, f"probe_interpolation_{_safe(mode) or 'default'}")
    return out


def analyze_campaign(data: report.CampaignData, output: str | Path,
                     options: AnalyzeOptions = AnalyzeOptions(),
                     probes: pd.DataFrame | None = None) -> AnalyzeResult:
    """Write summary.json and the figures for one loaded campaign into `output`.

    `probes`: the campaign's bl_probe_results rows (`db.queries.probe_results`), reported
    and drawn when given. The distance-from-initialization fits come from the measurements
    (campaigns with the "distance" probe) and need nothing extra."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    analysis = report.scaling_analysis(data, n_resamples=options.n_resamples,
                                       level=options.level, seed=options.seed)
    winners = report.winners(data)
    edges = report.edge_warnings(data, winners, tolerance=options.edge_tolerance)
    summary = build_summary(data, analysis, winners, edges, options)
    context = _context(data)
    writer = _FigureWriter(output, options.formats)
    _scaling_figures(writer, data, analysis, context)
    _hparam_figures(writer, winners, context)
    summary["budgets"] = _clean(_budget_figures(writer, data, context))
    distance = _distance_section(writer, data, winners, context)
    if distance:
        summary["distance_from_init"] = {
            "note": ("Hoffer et al.: d = a + b ln t (natural log) fitted to each cell winner's "
                     "||w_t - w_0|| over the initial-learning-rate phase (evaluations before "
                     "the learning rate first drops below 99% of its peak; constant "
                     "schedules: all)"),
            "winners": distance}
    probe_summary = _probe_section(writer, probes, context)
    if probe_summary:
        summary["probes"] = _clean(probe_summary)
    if options.cell_figures:
        _scatter_figures(writer, data, edges, context)
    summary["figures"] = [str(p.relative_to(output)) for p in writer.paths]
    (output / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return AnalyzeResult(summary, writer.paths)
