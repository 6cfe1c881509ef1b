"""Figures: one module for the dashboard (interactive) and static export (PNG/SVG).

Altair charts; vl-convert renders them to PNG and SVG offline, with no browser.
Scaling plots use log2 axes in batch size; every figure names the workload, the target
and the evaluation interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import altair as alt
import numpy as np
import pandas as pd

Y_AXES = {"steps_to_result": "Steps to result", "examples_to_result": "Examples to result",
          "seconds_to_result": "Training seconds to result"}


def perfect_scaling(frame: pd.DataFrame, value: str, y: str) -> list[float]:
    """Each row's perfect-scaling reference from its series' first row (its smallest batch
    size B0; `frame` sorted by series, batch size): steps (and seconds) y[B0] * B0 / B,
    since doubling B halves them; examples = steps x B stay y[B0]."""
    first = frame.groupby("series").first()
    if y == "examples_to_result":
        return [float(first.loc[s, value]) for s in frame["series"]]
    return [first.loc[s, value] * first.loc[s, "batch_size"] / b
            for s, b in zip(frame["series"], frame["batch_size"])]


def scaling_frame(table: pd.DataFrame, y: str = "steps_to_result") -> pd.DataFrame:
    """Cells with a result, one series per (optimizer, schedule), plus each series'
    perfect-scaling reference from its smallest batch size with a result
    (`perfect_scaling`)."""
    frame = table.loc[table[y].notna(), ["batch_size", "optimizer", "schedule", y]].copy()
    frame[y] = frame[y].astype(float)
    frame["series"] = frame["optimizer"] + " / " + frame["schedule"]
    frame = frame.sort_values(["series", "batch_size"])
    frame["perfect_scaling"] = perfect_scaling(frame, y, y)
    return frame


def scaling_chart(table: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                  y: str = "steps_to_result", width: int = 520, height: int = 360) -> alt.Chart:
    frame = scaling_frame(table, y)
    x = alt.X("batch_size:Q", title="Batch size", axis=_batch_axis(frame["batch_size"]),
              scale=alt.Scale(type="log", base=2, domain=_log2_domain(frame["batch_size"]), nice=False))
    y_enc = alt.Y(f"{y}:Q", title=Y_AXES[y], scale=alt.Scale(type="log", base=2))
    color = alt.Color("series:N", title="optimizer / schedule")
    lines = alt.Chart(frame).mark_line(point=True).encode(
        x=x, y=y_enc, color=color,
        tooltip=["series", "batch_size", alt.Tooltip(f"{y}:Q", format=",.0f")])
    reference = alt.Chart(frame).mark_line(strokeDash=[4, 4], opacity=0.6).encode(
        x=x, y=alt.Y("perfect_scaling:Q", scale=alt.Scale(type="log", base=2)),
        color=color, detail="series:N")
    title = alt.TitleParams(
        f"{workload}: {Y_AXES[y].lower()} ({target})",
        subtitle=[f"evaluation every {eval_every} steps; dashed: perfect scaling from the "
                  f"smallest batch size"])
    return (reference + lines).properties(title=title, width=width, height=height)


def save_chart(chart: alt.Chart, path: str | Path) -> Path:
    """Write PNG or SVG (by suffix) with vl-convert; no browser, no network."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".svg"):
        raise ValueError(f"{path}: figures are written as .png or .svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    chart.save(str(path), scale_factor=2 if path.suffix.lower() == ".png" else 1)
    return path


# --------------------------------------------------------------------------------------
# The dashboard's figures. Each takes plain frames (built by `study.analysis` or by the
# data helpers below) and keyword `workload`, `target`, `eval_every`, so the same function
# serves the Streamlit app and static export through `save_chart`.
# --------------------------------------------------------------------------------------
LOG2 = alt.Scale(type="log", base=2)
REGIME_COLORS = {"perfect_scaling": "#cfe8cf", "diminishing_returns": "#fbe3c2",
                 "maximal_data_parallelism": "#f4c7c7"}
CATEGORY_COLORS = {"reached": "#2c7fb8", "not_reached": "#9e9e9e", "diverged": "#d7301f"}
# A five-pointed star as an SVG path in Vega's unit square (Vega has no "star" symbol).
STAR = ("M0,-1L0.2245,-0.309L0.951,-0.309L0.3633,0.118L0.5878,0.809L0,0.382L-0.5878,0.809"
        "L-0.3633,0.118L-0.951,-0.309L-0.2245,-0.309Z")
CURVE_X = {"step": "Steps", "epoch": "Epochs", "examples": "Examples",
           "wall_seconds": "Training seconds"}
HPARAM_LABELS = {"learning_rate": "Optimal learning rate", "momentum": "Optimal momentum",
                 "effective_learning_rate": "Optimal effective learning rate lr / (1 - momentum)",
                 "one_minus_momentum": "Optimal 1 - momentum"}


@dataclass(frozen=True)
class FigureContext:
    """What every figure states: the workload, the target and the evaluation interval
    (steps), optionally with the campaign's name (for overlays of several campaigns)."""
    workload: str
    target: str
    eval_every: int
    campaign: str = ""

    def line(self) -> str:
        prefix = f"{self.campaign}: " if self.campaign else ""
        return (f"{prefix}{self.workload} · target {self.target} · "
                f"evaluated every {self.eval_every} steps")


def figure_title(text: str, *, workload: str, target: str, eval_every: int,
                 notes: Iterable[str] = (), others: Sequence[FigureContext] = ()) -> alt.TitleParams:
    """Title `text` with a subtitle naming workload, target and evaluation interval (one
    line per campaign when others are overlaid), then `notes`."""
    lines = [FigureContext(workload, target, eval_every).line()]
    lines += [other.line() for other in others]
    return alt.TitleParams(text, subtitle=lines + [n for n in notes if n], anchor="start")


def _log2_domain(values) -> list[float]:
    """A log2 axis domain padded by half a doubling on each side of `values`."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return [1.0, 2.0]
    return [float(values.min()) / math.sqrt(2), float(values.max()) * math.sqrt(2)]


def _powers_of_two(values) -> list[int]:
    """Axis ticks at the powers of two spanned by `values` (batch sizes)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return [1, 2]
    low, high = int(math.floor(math.log2(values.min()))), int(math.ceil(math.log2(values.max())))
    return [2 ** k for k in range(low, high + 1)]


def _batch_axis(values) -> alt.Axis:
    return alt.Axis(values=_powers_of_two(values), format="d")


def _fmt(value: float) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


# ---- scaling: steps / examples / seconds to result vs batch size ---------------------
SCALING_COLUMNS = ["series", "batch_size", "value", "low", "high", "perfect_scaling", "cell_id"]
_INTERVAL_PREFIX = {"steps_to_result": "steps", "examples_to_result": "examples"}


def scaling_points(table: pd.DataFrame, y: str = "steps_to_result", *,
                   intervals: pd.DataFrame | None = None, normalize_at: int | None = None,
                   label_prefix: str = "") -> pd.DataFrame:
    """Cells with a result as SCALING_COLUMNS: `value` (y), bootstrap `low`/`high` (NaN
    without intervals, or for seconds), and each series' perfect-scaling reference from
    its smallest batch size B0 with a result (`perfect_scaling`: value[B0] * B0 / B for
    steps and seconds, value[B0] for examples).

    `table` is `study.results.cell_table`; `intervals` a bootstrap summary (cell_id,
    steps_low/high, examples_low/high). With `normalize_at`, every series is divided by its
    own value at that batch size (series without a result there are dropped)."""
    frame = table.loc[table[y].notna(), ["cell_id", "batch_size", "optimizer", "schedule", y]].copy()
    frame["value"] = frame[y].astype(float)
    frame["series"] = label_prefix + frame["optimizer"] + " / " + frame["schedule"]
    frame["low"] = frame["high"] = np.nan
    prefix = _INTERVAL_PREFIX.get(y)
    if intervals is not None and prefix and len(frame):
        bounds = intervals.set_index("cell_id")
        frame["low"] = frame["cell_id"].map(bounds[f"{prefix}_low"]).astype(float)
        frame["high"] = frame["cell_id"].map(bounds[f"{prefix}_high"]).astype(float)
    frame = frame.sort_values(["series", "batch_size"])
    if normalize_at is not None:
        at = frame.loc[frame["batch_size"] == normalize_at].set_index("series")["value"]
        frame = frame.loc[frame["series"].isin(at.index)].copy()
        scale = frame["series"].map(at).astype(float)
        for column in ("value", "low", "high"):
            frame[column] = frame[column] / scale
    frame["perfect_scaling"] = perfect_scaling(frame, "value", y)
    return frame[SCALING_COLUMNS].reset_index(drop=True)


def scaling_fit_curves(fits: pd.DataFrame, points: pd.DataFrame, y: str = "steps_to_result", *,
                       normalize_at: int | None = None, table: pd.DataFrame | None = None,
                       label_prefix: str = "", n: int = 60) -> pd.DataFrame:
    """The fitted S(B) = S_min (1 + B_crit / B) of every series over its batch-size range
    (columns series, batch_size, value, b_crit), in the units of `y`: steps, or examples
    S(B) * B; empty for wall-clock seconds (no model). `fits` is
    `study.analysis.fit_scaling`'s output. With `normalize_at`, divided by the observed
    value at that batch size (`table` gives it), as the points are."""
    columns = ["series", "batch_size", "value", "b_crit"]
    if y not in _INTERVAL_PREFIX or fits is None or fits.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for _, fit in fits.iterrows():
        series = f"{label_prefix}{fit['optimizer']} / {fit['schedule']}"
        observed = points.loc[points["series"] == series, "batch_size"]
        if observed.empty or not np.isfinite(fit["s_min"]):
            continue
        grid = np.geomspace(observed.min(), observed.max(), n)
        steps = fit["s_min"] * (1.0 + fit["b_crit"] / grid)
        value = steps if y == "steps_to_result" else steps * grid
        if normalize_at is not None and table is not None:
            cell = table.loc[(table["optimizer"] == fit["optimizer"])
                             & (table["schedule"] == fit["schedule"])
                             & (table["batch_size"] == normalize_at), y].dropna()
            if cell.empty:
                continue
            value = value / float(cell.iloc[0])
        rows.append(pd.DataFrame({"series": series, "batch_size": grid, "value": value,
                                  "b_crit": float(fit["b_crit"])}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)


def regime_bands(regimes: pd.DataFrame) -> pd.DataFrame:
    """Shading for one series' regimes (`classify_regimes` rows: batch_size, regime): one
    band per run of equal regimes, from the geometric midpoint with the previous batch
    size to the one with the next (half a step beyond the ends). Columns start, end, regime."""
    # Every batch size (no_result too) sets the band edges; only the three regimes are kept.
    frame = regimes[["batch_size", "regime"]].sort_values("batch_size").reset_index(drop=True)
    if frame.empty:
        return pd.DataFrame(columns=["start", "end", "regime"])
    b = frame["batch_size"].to_numpy(float)
    mids = np.sqrt(b[:-1] * b[1:])
    first_pad = b[0] / (mids[0] / b[0]) if len(b) > 1 else b[0] / math.sqrt(2)
    last_pad = b[-1] * (b[-1] / mids[-1]) if len(b) > 1 else b[-1] * math.sqrt(2)
    starts = np.concatenate([[first_pad], mids])
    ends = np.concatenate([mids, [last_pad]])
    bands = []
    for start, end, regime in zip(starts, ends, frame["regime"]):
        if bands and bands[-1]["regime"] == regime:
            bands[-1]["end"] = end
        else:
            bands.append({"start": start, "end": end, "regime": regime})
    out = pd.DataFrame(bands)
    return out.loc[out["regime"].isin(list(REGIME_COLORS))].reset_index(drop=True)


def scaling_study_chart(points: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                        y: str = "steps_to_result", curves: pd.DataFrame | None = None,
                        bands: pd.DataFrame | None = None, shaded_series: str = "",
                        b_crit: dict | None = None, normalize_at: int | None = None,
                        others: Sequence[FigureContext] = (), level: float = 0.95,
                        width: int = 640, height: int = 400) -> alt.LayerChart:
    """The scaling plot of the dashboard (Shallue et al. fig. 1 with intervals and fit):
    `points` from `scaling_points` (several series and campaigns on one log2-log2 axis),
    dashed perfect-scaling lines, bootstrap error bars, dotted fitted curves (`curves`
    from `scaling_fit_curves`) and regime `bands` (from `regime_bands`) shaded behind.
    `b_crit`: series -> fitted B_crit, listed in the subtitle."""
    label = Y_AXES[y] + (f" / value at B={normalize_at}" if normalize_at else "")
    x_values = list(points["batch_size"])
    if bands is not None and len(bands):
        x_values += list(bands["start"]) + list(bands["end"])
    x_scale = alt.Scale(type="log", base=2, domain=_log2_domain(x_values), nice=False)
    x = alt.X("batch_size:Q", title="Batch size", axis=_batch_axis(points["batch_size"]),
              scale=x_scale)
    y_scale = alt.Scale(type="log", base=2)
    y_enc = alt.Y("value:Q", title=label, scale=y_scale)
    color = alt.Color("series:N", title="optimizer / schedule")
    fmt = ",.3g" if normalize_at else ",.0f"
    layers = []
    if bands is not None and len(bands):
        layers.append(alt.Chart(bands).mark_rect(opacity=0.45, clip=True).encode(
            x=alt.X("start:Q", scale=x_scale, title="Batch size"), x2="end:Q",
            fill=alt.Fill("regime:N", title=f"regime ({shaded_series})",
                          scale=alt.Scale(domain=list(REGIME_COLORS),
                                          range=list(REGIME_COLORS.values())))))
    layers.append(alt.Chart(points).mark_line(strokeDash=[5, 4], opacity=0.55).encode(
        x=x, y=alt.Y("perfect_scaling:Q", scale=y_scale, title=label), color=color,
        detail="series:N"))
    if curves is not None and len(curves):
        layers.append(alt.Chart(curves).mark_line(strokeDash=[1, 3], strokeWidth=2.5).encode(
            x=x, y=y_enc, color=color, detail="series:N",
            tooltip=["series", alt.Tooltip("b_crit:Q", title="B_crit", format=",.0f")]))
    bars = points.loc[points["low"].notna() & points["high"].notna()]
    if len(bars):
        layers.append(alt.Chart(bars).mark_rule(strokeWidth=1.5).encode(
            x=x, y=alt.Y("low:Q", scale=y_scale, title=label), y2="high:Q", color=color))
    layers.append(alt.Chart(points).mark_line(point=True).encode(
        x=x, y=y_enc, color=color,
        tooltip=["series", "batch_size", alt.Tooltip("value:Q", title=label, format=fmt),
                 alt.Tooltip("low:Q", format=fmt), alt.Tooltip("high:Q", format=fmt)]))
    notes = ["dashed: perfect scaling from each series' smallest batch size"]
    if len(bars):
        notes.append(f"bars: {level:.0%} bootstrap interval over trials")
    if curves is not None and len(curves):
        notes.append("dotted: fit S(B) = S_min (1 + B_crit / B)")
    if b_crit:
        notes.append("B_crit: " + "; ".join(f"{s} {_fmt(v)}" for s, v in b_crit.items()))
    if bands is not None and len(bands):
        notes.append(f"shading: regimes of {shaded_series}")
    title = figure_title(f"{Y_AXES[y]} vs batch size", workload=workload, target=target,
                         eval_every=eval_every, notes=notes, others=others)
    return alt.layer(*layers).properties(title=title, width=width, height=height)


# ---- hyperparameters ------------------------------------------------------------------
def effective_lr_contours(scatter: pd.DataFrame, n_per_line: int = 2) -> pd.DataFrame:
    """Lines of constant effective learning rate lr / (1 - momentum) = c across the
    scatter's learning-rate range, one per power of ten spanning the data (columns
    learning_rate, one_minus_momentum, contour)."""
    lr = scatter["learning_rate"].to_numpy(float)
    om = scatter["one_minus_momentum"].to_numpy(float)
    keep = np.isfinite(lr) & np.isfinite(om) & (lr > 0) & (om > 0)
    if not keep.any():
        return pd.DataFrame(columns=["learning_rate", "one_minus_momentum", "contour"])
    lr_lo, lr_hi = lr[keep].min() / 2, lr[keep].max() * 2
    eff = lr[keep] / om[keep]
    rows = []
    for k in range(int(math.floor(math.log10(eff.min()))), int(math.ceil(math.log10(eff.max()))) + 1):
        c = 10.0 ** k
        for x in np.geomspace(lr_lo, lr_hi, n_per_line):
            rows.append({"learning_rate": x, "one_minus_momentum": x / c, "contour": f"{c:g}"})
    return pd.DataFrame(rows)


def hparam_scatter_chart(scatter: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                         cell_label: str, edge_warnings: Iterable[str] = (),
                         width: int = 460, height: int = 380) -> alt.LayerChart:
    """Learning rate vs (1 - momentum) of one cell's trials, both log (Shallue et al.'s
    search-space plot): reached / not reached / diverged, contours of constant effective
    learning rate, the winner starred. `scatter` is `search_space_scatter` for one cell."""
    frame = scatter.loc[(scatter["learning_rate"] > 0) & (scatter["one_minus_momentum"] > 0)]
    x_dom = _log2_domain(frame["learning_rate"])
    y_dom = _log2_domain(frame["one_minus_momentum"])
    x = alt.X("learning_rate:Q", title="Learning rate",
              scale=alt.Scale(type="log", domain=x_dom, nice=False))
    y = alt.Y("one_minus_momentum:Q", title="1 - momentum",
              scale=alt.Scale(type="log", domain=y_dom, nice=False))
    contours = effective_lr_contours(frame)
    contour_lines = alt.Chart(contours).mark_line(color="#bbbbbb", strokeDash=[2, 2],
                                                  clip=True).encode(x=x, y=y, detail="contour:N")
    label_points = contours.groupby("contour").last().reset_index()
    label_points = label_points.assign(learning_rate=np.minimum(label_points["learning_rate"],
                                                                x_dom[1]))
    label_points["one_minus_momentum"] = label_points["learning_rate"] / label_points["contour"].astype(float)
    label_points = label_points.loc[(label_points["one_minus_momentum"] >= y_dom[0])
                                    & (label_points["one_minus_momentum"] <= y_dom[1])]
    contour_text = alt.Chart(label_points).mark_text(
        align="right", dx=-2, dy=-4, color="#888888", fontSize=10, clip=True).encode(
        x=x, y=y, text=alt.Text("contour:N"))
    category = alt.Color("category:N", title="trial", scale=alt.Scale(
        domain=list(CATEGORY_COLORS), range=list(CATEGORY_COLORS.values())))
    tooltip = ["trial_id", "category", alt.Tooltip("learning_rate:Q", format=".3g"),
               alt.Tooltip("one_minus_momentum:Q", format=".3g"),
               alt.Tooltip("effective_learning_rate:Q", format=".3g")]
    trials = alt.Chart(frame).mark_point(filled=True, size=45, opacity=0.8).encode(
        x=x, y=y, color=category, tooltip=tooltip)
    winner = alt.Chart(frame.loc[frame["is_winner"]]).mark_point(
        shape=STAR, size=380, filled=True, color="#f2b600", stroke="black", strokeWidth=0.8
    ).encode(x=x, y=y, tooltip=tooltip)
    title = figure_title(f"Search space of {cell_label}", workload=workload, target=target,
                         eval_every=eval_every,
                         notes=["grey dashed: constant effective learning rate lr / (1 - momentum)"
                                "; star: the winning trial", *edge_warnings])
    return alt.layer(contour_lines, contour_text, trials, winner).properties(
        title=title, width=width, height=height)


def hparam_vs_batch_frame(winners: pd.DataFrame, parameter: str, *,
                          heuristics: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The winners' `parameter` per series and batch size (series, batch_size, value), and
    the linear y0 B / B0 and square-root y0 sqrt(B / B0) heuristics from each series'
    smallest batch size (series, batch_size, value, heuristic)."""
    frame = winners.loc[winners[parameter].notna()].copy()
    frame["series"] = frame["optimizer"] + " / " + frame["schedule"]
    frame["value"] = frame[parameter].astype(float)
    frame = frame.sort_values(["series", "batch_size"])[["series", "batch_size", "value"]]
    rules = []
    if heuristics:
        for series, group in frame.groupby("series"):
            b0, y0 = float(group["batch_size"].iloc[0]), float(group["value"].iloc[0])
            b = group["batch_size"].to_numpy(float)
            rules.append(pd.DataFrame({"series": series, "batch_size": b, "value": y0 * b / b0,
                                       "heuristic": "linear y0 B/B0"}))
            rules.append(pd.DataFrame({"series": series, "batch_size": b,
                                       "value": y0 * np.sqrt(b / b0),
                                       "heuristic": "square root y0 sqrt(B/B0)"}))
    rules_frame = (pd.concat(rules, ignore_index=True) if rules
                   else pd.DataFrame(columns=["series", "batch_size", "value", "heuristic"]))
    return frame.reset_index(drop=True), rules_frame


def hparam_scaling_chart(winners: pd.DataFrame, parameter: str, *, workload: str, target: str,
                         eval_every: int, heuristics: bool = True, log_y: bool = True,
                         width: int = 420, height: int = 300) -> alt.LayerChart:
    """Optimal `parameter` (the winning trial's) vs batch size on log2 x, with the linear
    and square-root heuristics dashed. `winners` is `study.analysis.winning_hparams`."""
    frame, rules = hparam_vs_batch_frame(winners, parameter, heuristics=heuristics)
    label = HPARAM_LABELS.get(parameter, parameter)
    x = alt.X("batch_size:Q", title="Batch size", scale=LOG2, axis=_batch_axis(frame["batch_size"]))
    y = alt.Y("value:Q", title=label, scale=alt.Scale(type="log") if log_y else alt.Scale(zero=False))
    color = alt.Color("series:N", title="optimizer / schedule")
    layers = []
    if len(rules):
        layers.append(alt.Chart(rules).mark_line(opacity=0.6).encode(
            x=x, y=y, color=color, detail="series:N",
            strokeDash=alt.StrokeDash("heuristic:N", title="heuristic", scale=alt.Scale(
                domain=["linear y0 B/B0", "square root y0 sqrt(B/B0)"],
                range=[[6, 3], [2, 2]]))))
    layers.append(alt.Chart(frame).mark_line(point=True).encode(
        x=x, y=y, color=color,
        tooltip=["series", "batch_size", alt.Tooltip("value:Q", title=parameter, format=".4g")]))
    notes = ["dashed: linear and square-root heuristics from the smallest batch size"] if len(rules) else []
    title = figure_title(f"{label} vs batch size", workload=workload, target=target,
                         eval_every=eval_every, notes=notes)
    return alt.layer(*layers).properties(title=title, width=width, height=height)


# ---- learning curves and traces -------------------------------------------------------
# Columns that some trials hold as 0 at every evaluation because nothing was recorded
# (imported published data, the NQM's closed forms: bl_measurements' columns are NOT NULL).
UNRECORDED_ZERO = {"epoch": "epoch", "wall_seconds": "training time"}


def recorded_rows(frame: pd.DataFrame, x: str) -> pd.DataFrame:
    """`frame` without the rows whose `x` (epoch or wall_seconds) was not recorded: 0 (or
    NaN) after step 0, since any trained step advances both; and a trial's step-0 row when
    none of its later rows recorded `x`."""
    if x not in UNRECORDED_ZERO or x not in frame.columns or "step" not in frame.columns:
        return frame
    value = frame[x].astype(float)
    recorded = value > 0
    if "trial_id" in frame.columns:
        trial_recorded = recorded.groupby(frame["trial_id"]).transform("any")
    else:
        trial_recorded = pd.Series(bool(recorded.any()), index=frame.index)
    start = (frame["step"] == 0) & (value == 0) & trial_recorded
    return frame.loc[recorded | start]


def _unrecorded_note(curves: pd.DataFrame, x: str) -> str:
    """A subtitle line when `recorded_rows` leaves rows of `curves` out ("" otherwise)."""
    if x not in UNRECORDED_ZERO:
        return ""
    kept = len(recorded_rows(curves, x))
    if kept == len(curves):
        return ""
    what = UNRECORDED_ZERO[x]
    if kept:
        return f"no {what} recorded for some runs (imported data or closed-form trials): not shown"
    return f"no {what} recorded (imported data or closed-form trials): choose steps or examples"


def learning_curve_chart(curves: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                         x: str = "step", metric: str = "val_error",
                         threshold: float | None = None, log_x: bool | None = None,
                         width: int = 520, height: int = 340, title: str | None = None) -> alt.LayerChart:
    """`metric` vs `x` (step, epoch, examples or wall_seconds) for each run in `curves`
    (columns `run` plus x and metric), with the target as a horizontal rule."""
    log_x = x in ("step", "examples") if log_x is None else log_x
    frame = recorded_rows(curves.loc[curves[metric].notna()], x)
    if log_x:
        frame = frame.loc[frame[x] > 0]
    x_enc = alt.X(f"{x}:Q", title=CURVE_X.get(x, x),
                  scale=alt.Scale(type="log", base=2) if log_x else alt.Scale())
    lines = alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        x=x_enc, y=alt.Y(f"{metric}:Q", title=metric.replace("_", " ")),
        color=alt.Color("run:N", title="run"),
        tooltip=["run", alt.Tooltip(f"{x}:Q", format=",.4g"), alt.Tooltip(f"{metric}:Q", format=".4f")])
    layers = [lines]
    if threshold is not None:
        layers.append(alt.Chart(pd.DataFrame({"target": [threshold]})).mark_rule(
            color="black", strokeDash=[4, 3]).encode(y="target:Q"))
    heading = title or f"{metric.replace('_', ' ')} vs {CURVE_X.get(x, x).lower()}"
    notes = ["black dashed: the target"] if threshold is not None else []
    notes.append(_unrecorded_note(curves, x))
    return alt.layer(*layers).properties(
        title=figure_title(heading, workload=workload, target=target, eval_every=eval_every,
                           notes=notes),
        width=width, height=height)


def smith_comparison_chart(curves: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                           metric: str = "val_error", threshold: float | None = None,
                           width: int = 380, height: int = 300) -> alt.HConcatChart:
    """Smith et al.'s comparison: the same runs against epochs (left) and against
    parameter updates (right), side by side."""
    by_epoch = learning_curve_chart(curves, workload=workload, target=target,
                                    eval_every=eval_every, x="epoch", metric=metric,
                                    threshold=threshold, log_x=False, width=width,
                                    height=height, title=f"{metric} vs epochs")
    by_step = learning_curve_chart(curves, workload=workload, target=target,
                                   eval_every=eval_every, x="step", metric=metric,
                                   threshold=threshold, log_x=False, width=width,
                                   height=height, title=f"{metric} vs updates")
    title = figure_title("Same runs against epochs and against updates (Smith et al.)",
                         workload=workload, target=target, eval_every=eval_every)
    return alt.hconcat(by_epoch, by_step).properties(title=title)


def training_trace_chart(curves: pd.DataFrame, y: str, *, workload: str, target: str,
                         eval_every: int, x: str = "step", log_y: bool = False,
                         width: int = 420, height: int = 260) -> alt.Chart:
    """A quantity recorded at each evaluation (learning rate, batch size, gradient noise
    scale, a probe) vs `x` for each run in `curves` (columns run, x, y)."""
    frame = curves.loc[curves[y].notna()] if y in curves.columns else curves.iloc[0:0]
    frame = recorded_rows(frame, x)
    if log_y:
        frame = frame.loc[frame[y] > 0]
    label = y.replace("_", " ")
    chart = alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=10)).encode(
        x=alt.X(f"{x}:Q", title=CURVE_X.get(x, x)),
        y=alt.Y(f"{y}:Q", title=label, scale=alt.Scale(type="log") if log_y else alt.Scale(zero=False)),
        color=alt.Color("run:N", title="run"),
        tooltip=["run", alt.Tooltip(f"{x}:Q", format=",.4g"), alt.Tooltip(f"{y}:Q", format=".4g")])
    return chart.properties(
        title=figure_title(f"{label} over training", workload=workload, target=target,
                           eval_every=eval_every, notes=[_unrecorded_note(curves, x)]),
        width=width, height=height)


# ---- budgets ---------------------------------------------------------------------------
def budget_chart(frame: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                 kind: str = "steps", metric: str = "val_error",
                 width: int = 520, height: int = 340) -> alt.Chart:
    """Best `metric` reachable under each budget vs batch size (log2 x): one line per
    budget (`budget_label`) and series. `frame` has series, batch_size, budget_label,
    best_value (from `study.analysis.best_under_budget`)."""
    shown = frame.loc[frame["best_value"].notna()]
    unit = {"steps": "step", "epochs": "epoch", "examples": "example"}.get(kind, kind)
    chart = alt.Chart(shown).mark_line(point=True).encode(
        x=alt.X("batch_size:Q", title="Batch size", scale=LOG2,
                axis=_batch_axis(frame["batch_size"])),
        y=alt.Y("best_value:Q", title=f"best {metric.replace('_', ' ')}", scale=alt.Scale(zero=False)),
        color=alt.Color("budget_label:N", title=f"{unit} budget",
                        sort=list(dict.fromkeys(frame["budget_label"]))),
        strokeDash=alt.StrokeDash("series:N", title="optimizer / schedule"),
        tooltip=["series", "budget_label", "batch_size", alt.Tooltip("best_value:Q", format=".4f")])
    notes = [{"steps": "a step budget shows every regime",
              "epochs": "an epoch budget only probes the perfect-scaling regime"}.get(kind, "")]
    return chart.properties(
        title=figure_title(f"Best {metric.replace('_', ' ')} under a {unit} budget",
                           workload=workload, target=target, eval_every=eval_every, notes=notes),
        width=width, height=height)


# ---- campaign progress -------------------------------------------------------------------
def progress_chart(table: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                   width: int = 520, height: int | None = None) -> alt.Chart:
    """Trials per cell: finished, running, still planned (stacked bars). `table` has
    batch_size, optimizer, schedule, finished, running, planned."""
    frame = table.assign(cell=table["optimizer"] + " / " + table["schedule"] + " / B="
                         + table["batch_size"].astype(str))
    frame = frame.assign(waiting=(frame["planned"] - frame["finished"] - frame["running"]).clip(lower=0))
    long = frame.melt(id_vars=["cell"], value_vars=["finished", "running", "waiting"],
                      var_name="state", value_name="trials")
    order = {"finished": 0, "running": 1, "waiting": 2}
    long = long.assign(order=long["state"].map(order))
    chart = alt.Chart(long).mark_bar().encode(
        y=alt.Y("cell:N", title=None, sort=list(frame["cell"])),
        x=alt.X("trials:Q", title="trials", stack="zero"),
        color=alt.Color("state:N", scale=alt.Scale(domain=list(order),
                                                   range=["#2c7fb8", "#f2b600", "#dddddd"])),
        order="order:Q", tooltip=["cell", "state", "trials"])
    return chart.properties(
        title=figure_title("Trials per cell", workload=workload, target=target, eval_every=eval_every),
        width=width, height=height or max(120, 18 * len(frame)))


# ---- post-training probes (Keskar et al.): interpolation and sharpness -------------------
def interpolation_frame(alphas, curves: dict[str, Sequence[float]]) -> pd.DataFrame:
    """Long frame (alpha, quantity, split, value) from `curves`: "<split>_loss" and
    "<split>_accuracy" -> values per alpha (as stored in bl_probe_results)."""
    rows = []
    for name, values in curves.items():
        split, _, quantity = name.rpartition("_")
        for alpha, value in zip(alphas, values):
            if value is not None and np.isfinite(float(value)):
                rows.append({"alpha": float(alpha), "quantity": quantity, "split": split,
                             "value": float(value)})
    return pd.DataFrame(rows, columns=["alpha", "quantity", "split", "value"])


def interpolation_chart(frame: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                        small_label: str, large_label: str, batch_norm: str = "",
                        width: int = 520, height: int = 320) -> alt.Chart:
    """Keskar et al.'s 1-D parametric plot: cross-entropy (left axis, log) and accuracy
    (right axis) along alpha x_large + (1 - alpha) x_small; alpha = 0 is the small-batch
    solution, alpha = 1 the large-batch one. `frame`: `interpolation_frame`."""
    x = alt.X("alpha:Q", title="alpha (0: small-batch solution, 1: large-batch solution)")
    dash = alt.StrokeDash("split:N", title="split")
    loss = alt.Chart(frame.loc[frame["quantity"] == "loss"]).mark_line(point=True, color="#2c7fb8").encode(
        x=x, y=alt.Y("value:Q", title="cross-entropy", scale=alt.Scale(type="log"),
                     axis=alt.Axis(titleColor="#2c7fb8")),
        strokeDash=dash, tooltip=["split", "alpha", alt.Tooltip("value:Q", format=".4g")])
    accuracy = alt.Chart(frame.loc[frame["quantity"] == "accuracy"]).mark_line(
        point=True, color="#d7301f").encode(
        x=x, y=alt.Y("value:Q", title="accuracy", scale=alt.Scale(domain=[0, 1]),
                     axis=alt.Axis(titleColor="#d7301f")),
        strokeDash=dash, tooltip=["split", "alpha", alt.Tooltip("value:Q", format=".4f")])
    notes = [f"alpha = 0: {small_label}; alpha = 1: {large_label}",
             f"batch norm: {batch_norm}" if batch_norm else ""]
    return alt.layer(loss, accuracy).resolve_scale(y="independent").properties(
        title=figure_title("Loss and accuracy between the small- and large-batch solutions",
                           workload=workload, target=target, eval_every=eval_every, notes=notes),
        width=width, height=height)


def sharpness_chart(frame: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                    y: str = "sharpness", width: int = 520, height: int = 320) -> alt.Chart:
    """A post-training probe of each cell's winner vs batch size (log2 x, log y): Keskar
    sharpness (one line per `setting`, e.g. "full, eps 1e-3") or a Hessian quantity.
    `frame`: batch_size, setting, and the `y` column."""
    shown = frame.loc[frame[y].notna() & (frame[y] > 0)]
    chart = alt.Chart(shown).mark_line(point=True).encode(
        x=alt.X("batch_size:Q", title="Batch size", scale=LOG2, axis=_batch_axis(shown["batch_size"])),
        y=alt.Y(f"{y}:Q", title=y.replace("_", " "), scale=alt.Scale(type="log")),
        color=alt.Color("setting:N", title="setting"),
        tooltip=["setting", "batch_size", alt.Tooltip(f"{y}:Q", format=".4g")])
    return chart.properties(
        title=figure_title(f"{y.replace('_', ' ').capitalize()} of each cell's winner",
                           workload=workload, target=target, eval_every=eval_every,
                           notes=["Keskar et al.: large-batch solutions are sharper"]),
        width=width, height=height)


def smith_schedules_chart(curves: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                          metric: str = "val_error", log_y: bool = True,
                          width: int = 380, height: int = 300) -> alt.HConcatChart:
    """Smith et al.'s comparison with one colour per schedule and one line per seed:
    `metric` vs epochs (left) and vs parameter updates (right), side by side, on a shared
    (log, by default) y axis. `curves` has columns schedule, seed, epoch, step, `metric`."""
    frame = curves.loc[curves[metric].notna()]
    if log_y:
        frame = frame.loc[frame[metric] > 0]
    y = alt.Y(f"{metric}:Q", title=metric.replace("_", " "),
              scale=alt.Scale(type="log") if log_y else alt.Scale(zero=False))

    def panel(x: str, heading: str) -> alt.Chart:
        return alt.Chart(frame).mark_line(strokeWidth=1.4, opacity=0.85).encode(
            x=alt.X(f"{x}:Q", title=CURVE_X.get(x, x).replace("Steps", "Updates (steps)")),
            y=y, color=alt.Color("schedule:N", title="schedule"),
            strokeDash=alt.StrokeDash("seed:N", title="seed"),
            detail="seed:N",
            tooltip=["schedule", "seed", alt.Tooltip(f"{x}:Q", format=",.4g"),
                     alt.Tooltip(f"{metric}:Q", format=".4f")],
        ).properties(title=heading, width=width, height=height)

    title = figure_title("Same runs against epochs and against updates (Smith et al.)",
                         workload=workload, target=target, eval_every=eval_every)
    return alt.hconcat(panel("epoch", f"{metric.replace('_', ' ')} vs epochs"),
                       panel("step", f"{metric.replace('_', ' ')} vs updates")).properties(title=title)


# ---- Hoffer et al.'s ultra-slow diffusion: distance from initialization vs log step ------
def distance_growth_frame(series: dict[str, pd.DataFrame], fits: dict[str, object] | None = None,
                          n_line: int = 50) -> pd.DataFrame:
    """Long frame (trial, kind, step, distance) for `distance_growth_chart`: `series`:
    label -> `study.analysis.distance.distance_series` frame (kind "measured"); `fits`:
    label -> its `DistanceFit` or None (kind "fit": the fitted line over the fitted steps)."""
    from study.analysis.distance import fit_line
    parts = []
    for label, frame in series.items():
        shown = frame.loc[frame["step"] >= 1, ["step", "distance"]]
        parts.append(shown.assign(trial=label, kind="measured"))
        fit = (fits or {}).get(label)
        if fit is not None:
            parts.append(fit_line(fit, n_line).assign(trial=label, kind="fit"))
    columns = ["trial", "kind", "step", "distance"]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def distance_growth_chart(frame: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                          notes: Iterable[str] = (), width: int = 520,
                          height: int = 320) -> alt.LayerChart:
    """||w_t - w_0|| vs step on a log axis, one colour per trial (points: measured; line:
    the fit d = a + b ln t over the initial-learning-rate phase, a straight line here).
    `frame`: `distance_growth_frame`."""
    x = alt.X("step:Q", title="Step (log scale)", scale=alt.Scale(type="log"))
    y = alt.Y("distance:Q", title="||w_t - w_0|| (L2, all parameters)")
    color = alt.Color("trial:N", title="trial")
    points = alt.Chart(frame.loc[frame["kind"] == "measured"]).mark_point(filled=True, size=30).encode(
        x=x, y=y, color=color,
        tooltip=["trial", alt.Tooltip("step:Q", format=",d"), alt.Tooltip("distance:Q", format=".4g")])
    lines = alt.Chart(frame.loc[frame["kind"] == "fit"]).mark_line(strokeDash=[5, 3]).encode(
        x=x, y=y, color=color, detail="trial:N")
    return alt.layer(points, lines).properties(
        title=figure_title("Distance from initialization (Hoffer et al.: d = a + b ln t)",
                           workload=workload, target=target, eval_every=eval_every,
                           notes=["points: measured; dashed: least-squares fit over the "
                                  "initial-learning-rate phase", *notes]),
        width=width, height=height)
