"""Dynamics: the probes recorded during training in measurements.extra (gradient noise
scale, distance from initialisation, ...) vs step, and the probes run after training by
`batchlab probe` (bl_probe_results): Keskar sharpness and Hessian eigenvalue / trace of
each cell's winner vs batch size, and the interpolation between two winners."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app import common, data
from study.analysis.distance import distance_series, fit_distance_growth
from study.figures import (distance_growth_chart, distance_growth_frame, interpolation_chart,
                           sharpness_chart, training_trace_chart)

NO_PROBES = "No probe data recorded for this campaign."
# "all trials" plots at most this many runs (a chart of every measurement of a campaign
# with thousands of trials is neither readable nor fast)
MAX_RUNS = 200


def body(name: str, scope: str, keys: list[str]) -> None:
    campaign = common.light(name)
    info = campaign.info
    if scope == "winners":
        trial_ids = data.winner_trial_ids(campaign, common.results(name))
    else:
        with_probes = common.probe_trials(name)  # trials with a non-empty extra, sorted
        trial_ids = list(with_probes[:MAX_RUNS])
        if len(with_probes) > MAX_RUNS:
            st.caption(f"showing the first {MAX_RUNS} of {len(with_probes)} trials with probes")
    rows = data.curves(common.with_trials(name, trial_ids), trial_ids)  # their rows only
    present = [k for k in keys if k in rows.columns and rows[k].notna().any()]
    if not present:
        st.info("The chosen runs recorded none of the chosen probes.")
        return
    columns = st.columns(2)
    for i, key in enumerate(present):
        with columns[i % 2]:
            positive = bool((rows[key].dropna() > 0).all())
            common.chart(training_trace_chart(rows, key, log_y=positive, **common.context(info)))
    if "distance_from_init" in present:
        distance_growth(rows, info, name)
    shown = rows[["run", "trial_id", "step", "epoch", *present]]
    common.table(shown.loc[shown[present].notna().any(axis=1)], key="probes_table",
                 file_name=f"{name}_probes.csv")


def distance_growth(rows, info, name: str) -> None:
    """Hoffer et al.: ||w_t - w_0|| vs log step per run with the fit d = a + b ln t over
    the initial-learning-rate phase (`study.analysis.distance`), and the fits as a table."""
    series, fits, table = {}, {}, []
    for run, trial in rows.groupby("run", sort=True):
        points = distance_series(trial)
        if points.empty:
            continue
        series[run], fits[run] = points, fit_distance_growth(trial)
        fit = fits[run]
        table.append({"run": run, "intercept a": getattr(fit, "intercept", None),
                      "slope b (per e-fold of steps)": getattr(fit, "slope", None),
                      "R^2": getattr(fit, "r_squared", None),
                      "points fitted": getattr(fit, "n_points", 0),
                      "phase ends at step": getattr(fit, "phase_end_step", None)})
    if not series:
        return
    st.markdown("**Distance from initialization vs log step** (Hoffer et al.: d = a + b ln t "
                "over the initial-learning-rate phase)")
    common.chart(distance_growth_chart(distance_growth_frame(series, fits), **common.context(info)),
                 stretch=False)
    common.table(pd.DataFrame(table), key="distance_fit_table", file_name=f"{name}_distance_fits.csv")


def training_probes(name: str, keys: list[str]) -> None:
    st.subheader("During training")
    controls = st.columns([3, 1])
    chosen = controls[0].multiselect("Probes", keys, default=keys[:6], key="dynamics_keys")
    scope = controls[1].radio("Runs", ["winners", "all trials"], key="dynamics_scope")
    common.live(body, name, scope, chosen)


def after_training(name: str) -> None:
    """bl_probe_results: sharpness and Hessian tables per cell, the interpolation plot."""
    campaign = common.light(name)
    info = campaign.info
    probes = common.probe_results(info.id)
    st.subheader("After training (`batchlab probe`)")
    sharpness = data.sharpness_table(probes)
    hessian = data.hessian_table(probes)
    if len(sharpness):
        common.chart(sharpness_chart(sharpness, y="sharpness", **common.context(info)),
                     stretch=False)
        common.table(sharpness.drop(columns=["setting"]), key="sharpness_table",
                     file_name=f"{name}_sharpness.csv")
    if len(hessian):
        st.markdown("**Hessian of the training loss** (top eigenvalue by power iteration, "
                    "trace by Hutchinson's estimator)")
        common.chart(sharpness_chart(hessian, y="top_eigenvalue", **common.context(info)),
                     stretch=False)
        common.table(hessian.drop(columns=["setting"]), key="hessian_table",
                     file_name=f"{name}_hessian.csv")
    found = data.interpolations(probes)
    if found:
        labels = {item.id: item.label for item in found}
        chosen = (st.selectbox("Interpolation", list(labels), format_func=labels.get,
                               key="dynamics_interpolation") if len(found) > 1 else found[0].id)
        item = next(i for i in found if i.id == chosen)
        if item.frame.empty:
            st.info("This interpolation stored no finite values.")
        else:
            common.chart(interpolation_chart(item.frame, small_label=item.small_label,
                                             large_label=item.large_label,
                                             batch_norm=item.batch_norm, **common.context(info)),
                         stretch=False)
    if not (len(sharpness) or len(hessian) or found):
        st.caption("No post-training probe results: run `batchlab probe sharpness|hessian|"
                   f"interpolate --campaign {name}` on a campaign that keeps checkpoints.")


def render() -> None:
    name = common.current_campaign()
    if name is None:
        return
    campaign = common.light(name)
    common.header(campaign.info, "Dynamics")
    keys = common.probe_keys(name)
    has_results = len(common.probe_results(campaign.info.id)) > 0
    if not keys and not has_results:
        st.info(NO_PROBES + " Probes (gradient noise scale, distance from initialisation, "
                "sharpness) are written to bl_measurements.extra when a campaign enables them; "
                "`batchlab probe` stores sharpness, Hessian and interpolation results after "
                "training.")
        return
    if keys:
        training_probes(name, keys)
    else:
        st.caption("No probes were recorded during training (bl_measurements.extra).")
    after_training(name)


if __name__ == "__main__":
    render()
