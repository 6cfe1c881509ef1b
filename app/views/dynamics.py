"""Dynamics: the probes recorded in measurements.extra (gradient noise scale, distance
from initialisation, sharpness, ...) vs step."""
from __future__ import annotations

import streamlit as st

from app import common, data
from study.figures import training_trace_chart

NO_PROBES = "No probe data recorded for this campaign."


def body(name: str, scope: str, keys: list[str]) -> None:
    campaign = common.load(name)
    info = campaign.info
    trial_ids = (data.winner_trial_ids(campaign) if scope == "winners"
                 else list(campaign.trials["trial_id"]))
    rows = data.curves(campaign, trial_ids)
    present = [k for k in keys if k in rows.columns and rows[k].notna().any()]
    if not present:
        st.info("The chosen runs recorded none of the chosen probes.")
        return
    columns = st.columns(2)
    for i, key in enumerate(present):
        with columns[i % 2]:
            positive = bool((rows[key].dropna() > 0).all())
            common.chart(training_trace_chart(rows, key, log_y=positive, **common.context(info)))
    shown = rows[["run", "trial_id", "step", "epoch", *present]]
    common.table(shown.loc[shown[present].notna().any(axis=1)], key="probes_table",
                 file_name=f"{name}_probes.csv")


def render() -> None:
    name = common.current_campaign()
    if name is None:
        return
    campaign = common.load(name)
    common.header(campaign.info, "Dynamics")
    keys = data.probe_keys(campaign.measurements)
    if not keys:
        st.info(NO_PROBES + " Probes (gradient noise scale, distance from initialisation, "
                "sharpness) are written to bl_measurements.extra when a campaign enables them.")
        return
    controls = st.columns([3, 1])
    chosen = controls[0].multiselect("Probes", keys, default=keys[:6], key="dynamics_keys")
    scope = controls[1].radio("Runs", ["winners", "all trials"], key="dynamics_scope")
    common.live(body, name, scope, chosen)


if __name__ == "__main__":
    render()
