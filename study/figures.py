"""Figures: one module for the dashboard (interactive) and static export (PNG/SVG).

Altair charts; vl-convert renders them to PNG and SVG offline, with no browser.
Scaling plots use log2 axes in batch size; every figure names the workload, the target
and the evaluation interval.
"""
from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd

Y_AXES = {"steps_to_result": "Steps to result", "examples_to_result": "Examples to result",
          "seconds_to_result": "Training seconds to result"}


def scaling_frame(table: pd.DataFrame, y: str = "steps_to_result") -> pd.DataFrame:
    """Cells with a result, one series per (optimizer, schedule), plus each series'
    perfect-scaling reference: y[B0] * B0 / B from its smallest batch size with a result."""
    frame = table.loc[table[y].notna(), ["batch_size", "optimizer", "schedule", y]].copy()
    frame[y] = frame[y].astype(float)
    frame["series"] = frame["optimizer"] + " / " + frame["schedule"]
    frame = frame.sort_values(["series", "batch_size"])
    first = frame.groupby("series").first()
    frame["perfect_scaling"] = [first.loc[s, y] * first.loc[s, "batch_size"] / b
                                for s, b in zip(frame["series"], frame["batch_size"])]
    return frame


def scaling_chart(table: pd.DataFrame, *, workload: str, target: str, eval_every: int,
                  y: str = "steps_to_result", width: int = 520, height: int = 360) -> alt.Chart:
    frame = scaling_frame(table, y)
    x = alt.X("batch_size:Q", title="Batch size",
              scale=alt.Scale(type="log", base=2), axis=alt.Axis(tickCount=12))
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
