"""Budgets: the best validation error reachable under a step budget and under an epoch
budget, vs batch size (Shallue et al.: an epoch budget only probes perfect scaling)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import common, data
from study.analysis import best_under_budget
from study.figures import budget_chart


def budget_frame(campaign: data.CampaignData, budgets: list[float], kind: str,
                 examples_per_epoch: float = float("nan")) -> pd.DataFrame:
    """`best_under_budget` with series and a readable `budget_label`; an epoch budget
    is turned into examples with the training-set size."""
    cells = campaign.cells[["cell_id", "batch_size", "optimizer", "schedule"]]
    info = campaign.info
    amounts = budgets if kind == "steps" else [b * examples_per_epoch for b in budgets]
    best = best_under_budget(campaign.trials, campaign.measurements, cells, metric=info.metric,
                             budgets=amounts, kind="steps" if kind == "steps" else "examples",
                             mode=info.mode)
    labels = {a: f"{b:g} {'steps' if kind == 'steps' else 'epochs'}" for a, b in zip(amounts, budgets)}
    best = best.merge(cells[["cell_id", "optimizer", "schedule"]], on="cell_id", how="left")
    best["series"] = data.series_of(best)
    best["budget_label"] = best["budget"].map(lambda a: labels.get(a, f"{a:g}"))
    return best


def body(name: str, step_budgets: list[float], epoch_budgets: list[float]) -> None:
    campaign = common.load(name)
    info = campaign.info
    if campaign.measurements.empty:
        st.info("No measurements yet.")
        return
    left, right = st.columns(2)
    with left:
        steps = budget_frame(campaign, step_budgets, "steps")
        common.chart(budget_chart(steps, kind="steps", metric=info.metric, **common.context(info)))
        common.table(steps.drop(columns=["cell_id"]), key="step_budget_table",
                     file_name=f"{name}_step_budgets.csv")
    with right:
        size = data.examples_per_epoch(campaign.measurements)
        if not np.isfinite(size):
            st.info("No epoch counts recorded: the epoch budget needs measurements with epochs.")
            return
        epochs = budget_frame(campaign, epoch_budgets, "epochs", size)
        common.chart(budget_chart(epochs, kind="epochs", metric=info.metric, **common.context(info)))
        st.caption(f"epoch = {size:,.0f} training examples (read off the measurements)")
        common.table(epochs.drop(columns=["cell_id"]), key="epoch_budget_table",
                     file_name=f"{name}_epoch_budgets.csv")


def render() -> None:
    name = common.current_campaign()
    if name is None:
        return
    campaign = common.load(name)
    common.header(campaign.info, "Budgets")
    m = campaign.measurements
    max_step = float(m["step"].max()) if len(m) else float("nan")
    max_epoch = float(m["epoch"].max()) if len(m) else float("nan")
    controls = st.columns(2)
    step_text = controls[0].text_input(
        "Step budgets", ", ".join(f"{b:g}" for b in data.default_budgets(max_step)),
        key="budget_steps")
    epoch_text = controls[1].text_input(
        "Epoch budgets", ", ".join(f"{b:g}" for b in data.default_budgets(max_epoch)),
        key="budget_epochs")
    common.live(body, name, data.parse_budgets(step_text), data.parse_budgets(epoch_text))


if __name__ == "__main__":
    render()
