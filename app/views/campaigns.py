"""Campaigns: every campaign's progress; per cell finished / running / planned trials,
live workers with heartbeat age, trials per minute, ETA, failures with their messages;
and the trial inspector: one trial's provenance (code version and git commit, package
versions, device, host, seed, attempt) and its resolved config."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common, data
from study.figures import progress_chart


def overview() -> pd.DataFrame:
    """One row per campaign: progress, rate, ETA, live workers, failures."""
    rows = []
    for name in common.campaign_names():
        campaign = common.progress(name)  # no measurements: cheap for every campaign
        if campaign is None:
            continue
        rate = data.throughput(campaign)
        workers = data.worker_table(campaign)
        rows.append({
            "campaign": name, "workload": campaign.info.workload,
            "target": campaign.info.target_text, "eval_every": campaign.info.eval_every,
            "cells": len(campaign.cells), "finished": rate.finished, "running": rate.running,
            "planned": rate.planned,
            "trials_per_min": round(rate.trials_per_minute, 2) if pd.notna(rate.trials_per_minute) else None,
            "eta": rate.eta_text,
            "live_workers": int((workers["state"] == "live").sum()) if len(workers) else 0,
            "failed": int((campaign.trials["outcome"] == "failed").sum())})
    return pd.DataFrame(rows)


def details(name: str) -> None:
    campaign = common.light(name)
    if campaign is None:
        st.warning(f"campaign {name!r} no longer exists")
        return
    info = campaign.info
    rate = data.throughput(campaign)
    st.subheader(f"{name}")
    st.caption(f"{info.figure_workload} · target {info.target_text} · evaluated every "
               f"{info.eval_every} steps")
    done = rate.finished / rate.planned if rate.planned else 0.0
    st.progress(min(done, 1.0), text=f"{rate.finished}/{rate.planned} trials finished, "
                                     f"{rate.running} running")
    workers = data.worker_table(campaign)
    columns = st.columns(4)
    columns[0].metric("Trials finished", f"{rate.finished}/{rate.planned}")
    columns[1].metric("Trials per minute", "-" if pd.isna(rate.trials_per_minute)
                      else f"{rate.trials_per_minute:.2f}")
    columns[2].metric("ETA", rate.eta_text)
    columns[3].metric("Live workers", int((workers["state"] == "live").sum()) if len(workers) else 0)

    progress = data.progress_table(campaign)
    st.markdown("**Progress per cell**")
    common.table(progress.drop(columns=["cell_id"]), key="progress_table",
                 file_name=f"{name}_progress.csv")
    if len(progress):
        # an explicit pixel height: with height="content" this nominal-y bar chart was
        # drawn one row high in Chromium (docs/screenshots)
        st.altair_chart(progress_chart(progress, **common.context(info)), width="content",
                        height=max(120, 18 * len(progress)) + 110)

    st.markdown("**Workers**")
    if workers.empty:
        st.caption("no worker has registered for this campaign")
    else:
        stale = workers.loc[workers["state"] == "stale"]
        if len(stale):
            st.warning(f"{len(stale)} worker(s) without a heartbeat for more than "
                       f"{data.STALE_HEARTBEAT_SECONDS} s: "
                       + ", ".join(f"{w.host}:{w.pid}" for w in stale.itertuples()))
        st.dataframe(workers, hide_index=True, width="stretch", key="workers_table")

    failed = data.failures(campaign)
    st.markdown(f"**Failures** ({int((failed['outcome'] == 'failed').sum())} failed, "
                f"{int((failed['outcome'] == 'diverged').sum())} diverged)")
    if failed.empty:
        st.caption("no failed or diverged trials")
    else:
        for row in failed.loc[failed["outcome"] == "failed"].head(20).itertuples():
            st.error(f"B={row.batch_size} {row.optimizer}/{row.schedule} trial "
                     f"#{row.trial_number} on {row.host or '?'}: {row.message or '(no message)'}")
        st.dataframe(failed, hide_index=True, width="stretch", key="failures_table")


def inspector(name: str) -> None:
    """Pick a cell, then one of its trials: where and with what code it ran."""
    st.subheader("Trial inspector")
    campaign = common.progress(name)
    if campaign is None:
        return
    trials = campaign.trials
    if trials.empty:
        st.info("No trial has started in this campaign yet: provenance (code version, "
                "packages, device, host, seed, config) appears here once workers run it.")
        return
    cells = campaign.cells.loc[campaign.cells["cell_id"].isin(trials["cell_id"])].sort_values(
        ["optimizer", "schedule", "batch_size"])
    labels = {int(r["cell_id"]): f"{r['optimizer']} / {r['schedule']} / B={r['batch_size']}"
              for r in cells.to_dict("records")}
    controls = st.columns(2)
    cell_id = controls[0].selectbox("Cell", list(labels), format_func=labels.get,
                                    key="inspect_cell")
    in_cell = trials.loc[trials["cell_id"] == cell_id]
    choices = {int(r["trial_id"]): data.trial_choice_label(r) for r in in_cell.to_dict("records")}
    trial_id = controls[1].selectbox("Trial", list(choices), format_func=choices.get,
                                     key="inspect_trial")
    row = data.trial_provenance(common.engine(), trial_id) if trial_id is not None else None
    if row is None:
        st.warning("that trial no longer exists")
        return
    left, right = st.columns([2, 3])
    with left:
        st.markdown("**Provenance**")
        table = data.provenance_table(row)
        st.dataframe(table, hide_index=True, width="stretch", key="provenance_table",
                     height=35 * (len(table) + 1) + 3)
        st.download_button("Download CSV", table.to_csv(index=False),
                           file_name=f"{name}_trial_{trial_id}_provenance.csv", mime="text/csv",
                           key="download_provenance")
    with right:
        st.markdown("**Hyperparameters**")
        st.json(row["hparams"], expanded=True)
        st.markdown("**Resolved config**")
        if row["config"]:
            st.json(row["config"], expanded=True)
        else:
            st.caption("no resolved config stored for this trial (e.g. an imported one)")


def body(name: str | None) -> None:
    table = overview()
    st.markdown("**All campaigns**")
    st.dataframe(table, hide_index=True, width="stretch", key="campaigns_table")
    if name is not None:
        details(name)


def render() -> None:
    st.title("Campaigns")
    name = common.current_campaign()
    if name is None:
        return
    common.live(body, name)
    inspector(name)


if __name__ == "__main__":
    render()
