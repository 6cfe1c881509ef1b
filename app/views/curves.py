"""Learning curves: the winner of each cell (and chosen trials) — validation error vs
steps, epochs, examples or wall-clock; Smith et al.'s view (the same runs against
epochs and against updates side by side); learning rate, batch size and gradient noise
scale over training."""
from __future__ import annotations

import streamlit as st

from app import common, data
from study.figures import (CURVE_X, learning_curve_chart, smith_comparison_chart,
                           training_trace_chart)

METRICS = ["val_error", "val_loss", "train_loss"]
# above this many trials "Also show trials" takes typed trial ids instead of a picker
MAX_TRIAL_OPTIONS = 2000


def body(name: str, trial_ids: list[int], x: str, metric: str) -> None:
    campaign = common.with_trials(name, trial_ids)  # only the plotted trials' rows
    info = campaign.info
    rows = data.curves(campaign, trial_ids)
    if rows.empty:
        st.info("No measurements for the chosen runs yet.")
        return
    threshold = info.threshold if metric == info.metric else None
    common.chart(learning_curve_chart(rows, x=x, metric=metric, threshold=threshold,
                                      **common.context(info)))
    st.subheader("Against epochs and against updates (Smith et al.)")
    common.chart(smith_comparison_chart(rows, metric=metric, threshold=threshold,
                                        **common.context(info)), stretch=False)
    st.subheader("Over training")
    columns = st.columns(2)  # three in a row leave the plots no room beside their legends
    with columns[0]:
        common.chart(training_trace_chart(rows, "learning_rate", x=x, **common.context(info)))
    with columns[1]:
        common.chart(training_trace_chart(rows, "batch_size", x=x, **common.context(info)))
    with columns[0]:
        if rows["noise_scale"].notna().any():
            common.chart(training_trace_chart(rows, "noise_scale", x=x, log_y=True,
                                              **common.context(info)))
        else:
            st.caption("no gradient noise scale recorded (measurement extra key "
                       "\"noise_scale\")")
    st.markdown("**Measurements**")
    shown = rows.drop(columns=["extra"])
    common.table(shown, key="curves_table", file_name=f"{name}_curves.csv")


def render() -> None:
    name = common.current_campaign()
    if name is None:
        return
    campaign = common.light(name)
    common.header(campaign.info, "Learning curves")
    labels = data.run_labels(campaign.trials)
    winners = data.winner_trial_ids(campaign, common.results(name))
    controls = st.columns([2, 3, 1, 1])
    show_winners = controls[0].toggle("Winner of each cell", value=True, key="curves_winners")
    if len(labels) <= MAX_TRIAL_OPTIONS:
        chosen = controls[1].multiselect("Also show trials", list(labels.index),
                                         format_func=lambda t: labels.get(t, str(t)),
                                         key="curves_trials")
    else:  # a picker with tens of thousands of options is slow to send and to use
        typed = controls[1].text_input("Also show trial ids", key="curves_trial_ids",
                                       placeholder="e.g. 17, 2048 (ids: Campaigns > Trial inspector)")
        chosen = [int(t) for t in data.parse_budgets(typed) if int(t) == t and int(t) in labels.index]
    x = controls[2].radio("x axis", list(CURVE_X), format_func=CURVE_X.get, key="curves_x")
    metric = controls[3].selectbox("Metric", METRICS, key="curves_metric")
    trial_ids = list(dict.fromkeys((winners if show_winners else []) + list(chosen)))
    if not trial_ids:
        st.info("No cell has a winning trial yet: choose trials to show above.")
        return
    common.live(body, name, trial_ids, x, metric)


if __name__ == "__main__":
    render()
