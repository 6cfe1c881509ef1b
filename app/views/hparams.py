"""Hyperparameters: per cell, learning rate vs (1 - momentum) of every trial (reached /
not reached / diverged, constant effective-lr contours, the winner starred, edge
warnings); the optimal lr, momentum and effective lr vs batch size with the linear and
square-root heuristics."""
from __future__ import annotations

import streamlit as st

from app import common, data
from study.analysis import hparam_scaling
from study.figures import hparam_scaling_chart, hparam_scatter_chart


def cell_label(row) -> str:
    return f"{row['optimizer']} / {row['schedule']} / B={row['batch_size']}"


def body(name: str, cell_id: int) -> None:
    campaign = common.light(name)
    info = campaign.info
    cells = campaign.cells.set_index("cell_id")
    winners = common.winners(name)
    edges = data.edge_warnings(campaign, winners)
    for row in edges.to_dict("records"):
        st.warning(data.edge_text(row))

    scatter = common.scatter(name)
    cell_scatter = scatter.loc[scatter["cell_id"] == cell_id]
    label = cell_label(cells.loc[cell_id].to_dict() | {"batch_size": int(cells.loc[cell_id, "batch_size"])})
    left, right = st.columns([3, 2])
    with left:
        if cell_scatter.empty:
            st.info(f"No finished trial in {label} yet.")
        else:
            notes = [f"warning: {data.edge_text(r)}" for r in
                     edges.loc[edges["cell_id"] == cell_id].to_dict("records")]
            common.chart(hparam_scatter_chart(cell_scatter, cell_label=label, edge_warnings=notes,
                                              **common.context(info)))
    with right:
        counts = cell_scatter["category"].value_counts()
        st.markdown("**Trials of this cell**")
        st.dataframe(counts.rename_axis("category").reset_index(name="trials"),
                     hide_index=True, width="stretch", key="category_counts")
        won = winners.loc[winners["cell_id"] == cell_id]
        if len(won):
            w = won.iloc[0]
            st.markdown(f"**Winner**: trial {int(w['winner_trial_id'])}, steps to result "
                        f"{int(w['steps_to_result'])}, lr {w['learning_rate']:.4g}, momentum "
                        f"{w['momentum']:.4g}, effective lr {w['effective_learning_rate']:.4g}")
        else:
            st.caption("no trial of this cell has reached the target")

    st.subheader("Optimal hyperparameters vs batch size")
    if winners.empty:
        st.info("No cell has a winning trial yet.")
        return
    # one tab per parameter: three side by side leave the plots no room beside their legends
    tabs = st.tabs(["Learning rate", "Momentum", "Effective learning rate"])
    for tab, parameter, heuristics, log_y in (
            (tabs[0], "learning_rate", True, True),
            (tabs[1], "momentum", False, False),
            (tabs[2], "effective_learning_rate", True, True)):
        with tab:
            common.chart(hparam_scaling_chart(winners, parameter, heuristics=heuristics,
                                              log_y=log_y, width=560, **common.context(info)),
                         stretch=False)
    shown = winners[["batch_size", "optimizer", "schedule", "winner_trial_id", "steps_to_result",
                     "learning_rate", "momentum", "effective_learning_rate"]]
    common.table(shown, key="winners_table", file_name=f"{name}_optimal_hparams.csv")
    st.markdown("**Power-law fits** y = prefactor * B^exponent (1 = linear rule, 0.5 = square root)")
    fits = hparam_scaling(winners)
    st.dataframe(fits, hide_index=True, width="stretch", key="hparam_fits")


def render() -> None:
    name = common.current_campaign()
    if name is None:
        return
    campaign = common.light(name)
    common.header(campaign.info, "Hyperparameters")
    cells = campaign.cells.sort_values(["optimizer", "schedule", "batch_size"])
    if cells.empty:
        st.info("This campaign has no cells yet.")
        return
    labels = {int(r["cell_id"]): cell_label(r) for r in cells.to_dict("records")}
    cell_id = st.selectbox("Cell", list(labels), format_func=labels.get, key="hparams_cell")
    common.live(body, name, cell_id)


if __name__ == "__main__":
    render()
