"""Budgets: the best validation error reachable under a step budget and under an epoch
budget, vs batch size (Shallue et al.: an epoch budget only probes perfect scaling)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from app import common, data
from study.figures import budget_chart


def body(name: str, step_budgets: list[float], epoch_budgets: list[float]) -> None:
    campaign = common.light(name)  # trials and cells; the budget tables come from SQL
    info = campaign.info
    if common.summary(name).rows == 0:
        st.info("No measurements yet.")
        return
    left, right = st.columns(2)
    with left:
        steps = common.budget(name, step_budgets, "steps")
        common.chart(budget_chart(steps, kind="steps", metric=info.metric, **common.context(info)))
        common.table(steps.drop(columns=["cell_id"]), key="step_budget_table",
                     file_name=f"{name}_step_budgets.csv")
    with right:
        size = common.examples_per_epoch(name)
        if not np.isfinite(size):
            st.info("No epoch counts recorded: the epoch budget needs measurements with epochs.")
            return
        epochs = common.budget(name, epoch_budgets, "epochs", size)
        common.chart(budget_chart(epochs, kind="epochs", metric=info.metric, **common.context(info)))
        st.caption(f"epoch = {size:,.0f} training examples (read off the measurements)")
        common.table(epochs.drop(columns=["cell_id"]), key="epoch_budget_table",
                     file_name=f"{name}_epoch_budgets.csv")


def render() -> None:
    name = common.current_campaign()
    if name is None:
        return
    campaign = common.light(name)
    common.header(campaign.info, "Budgets")
    summary = common.summary(name)  # over every measurement, without loading them
    max_step, max_epoch = summary.max_step, summary.max_epoch
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
