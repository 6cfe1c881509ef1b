"""Scaling: steps (examples, seconds) to result vs batch size on log2-log2 axes, with
perfect scaling, bootstrap intervals, the fitted S(B) = S_min (1 + B_crit / B), the
regimes, normalisation at one batch size and an overlaid second campaign."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import common, data
from study.figures import (Y_AXES, regime_bands, scaling_fit_curves, scaling_points,
                           scaling_study_chart)

N_RESAMPLES = 500


def _campaign_points(name: str, y: str, normalize_at, series: list[str] | None, prefix: str = ""):
    campaign = common.light(name)
    analysis = common.scaling(name, N_RESAMPLES)
    table = campaign.table
    if series is not None:
        table = table.loc[data.series_of(table).isin(series)]
    intervals = analysis.summary if len(analysis.summary) else None
    points = scaling_points(table, y, intervals=intervals, normalize_at=normalize_at,
                            label_prefix=prefix)
    fits = analysis.fits
    if len(fits) and series is not None:
        fits = fits.loc[data.series_of(fits).isin(series)]
    curves = scaling_fit_curves(fits, points, y, normalize_at=normalize_at, table=table,
                                label_prefix=prefix)
    return campaign, analysis, points, curves, fits


def body(name: str, y: str, series: list[str], normalize_at, shade: str | None,
         overlay: str | None) -> None:
    campaign, analysis, points, curves, fits = _campaign_points(name, y, normalize_at, series)
    info = campaign.info
    others, overlay_points, overlay_curves = [], [], []
    if overlay:
        other, _, o_points, o_curves, _ = _campaign_points(overlay, y, normalize_at, None,
                                                           prefix=f"{overlay}: ")
        others.append(common.figure_context(other.info))
        overlay_points, overlay_curves = [o_points], [o_curves]
    all_points = pd.concat([points, *overlay_points], ignore_index=True)
    fitted = [c for c in [curves, *overlay_curves] if len(c)]
    all_curves = pd.concat(fitted, ignore_index=True) if fitted else None
    bands = None
    regimes = analysis.regimes
    if shade and len(regimes):
        chosen = regimes.loc[data.series_of(regimes) == shade]
        bands = regime_bands(chosen) if len(chosen) else None
    b_crit = {f"{r.optimizer} / {r.schedule}": r.b_crit for r in fits.itertuples()
              if np.isfinite(r.b_crit)} if len(fits) else {}
    done, planned = int(campaign.table["trials"].sum()), int(campaign.table["planned"].sum())
    st.caption(f"{done}/{planned} trials finished, {int(campaign.table['running'].sum())} running")
    if all_points.empty:
        st.info("No cell has reached the target yet: steps to result appear here as soon as "
                "a trial beats it.")
    else:
        common.chart(scaling_study_chart(
            all_points, y=y, curves=all_curves, bands=bands, shaded_series=shade or "",
            b_crit=b_crit, normalize_at=normalize_at, others=others, **common.context(info)))
    st.markdown("**Cells**")
    common.table(cell_rows(campaign, analysis), key="scaling_table",
                 file_name=f"{name}_scaling.csv")
    if len(fits):
        st.markdown("**Fit S(B) = S_min (1 + B_crit / B)** (95% bootstrap intervals)")
        shown = fits.copy()
        for column in [c for c in shown.columns if c.startswith(("s_min", "b_crit", "e_min"))]:
            shown[column] = shown[column].round(1)
        common.table(shown, key="fits_table", file_name=f"{name}_fits.csv")


def cell_rows(campaign: data.CampaignData, analysis: data.ScalingAnalysis) -> pd.DataFrame:
    """The results table: exact steps/examples/seconds to result, bootstrap interval,
    regime and slope per cell."""
    table = campaign.table.drop(columns=["winner_hparams"])
    if len(analysis.summary):
        bounds = analysis.summary[["cell_id", "steps_low", "steps_high", "fraction_no_result"]]
        table = table.merge(bounds, on="cell_id", how="left")
    if len(analysis.regimes):
        table = table.merge(analysis.regimes[["cell_id", "regime", "slope_to_next"]],
                            on="cell_id", how="left")
    return table.drop(columns=["cell_id"])


# The controls whose choices come from the campaign (its series, batch sizes, the others).
CAMPAIGN_CONTROLS = ("scaling_series", "scaling_normalize", "scaling_shade", "scaling_overlay")


def _reset_controls_for(name: str) -> None:
    """Start from the defaults when the campaign changes: a keyed widget keeps its value
    across reruns, and the previous campaign's series, none of them this one's, would leave
    the multiselect empty ("No cell has reached the target yet")."""
    if st.session_state.get("scaling_campaign") != name:
        for key in CAMPAIGN_CONTROLS:
            st.session_state.pop(key, None)
        st.session_state["scaling_campaign"] = name


def render() -> None:
    name = common.current_campaign()
    if name is None:
        return
    _reset_controls_for(name)
    campaign = common.light(name)
    common.header(campaign.info, "Scaling")
    all_series = list(dict.fromkeys(data.series_of(campaign.table)))
    controls = st.columns([2, 2, 1, 2, 2])
    series = controls[0].multiselect("Optimizers / schedules", all_series, default=all_series,
                                     key="scaling_series")
    y = controls[1].radio("y axis", list(Y_AXES), format_func=Y_AXES.get, key="scaling_y")
    batch_sizes = sorted(campaign.cells["batch_size"].unique())
    normalize_at = controls[2].selectbox("Normalise by B", [None, *batch_sizes],
                                         format_func=lambda b: "none" if b is None else str(b),
                                         key="scaling_normalize")
    shade = controls[3].selectbox("Shade regimes of", [None, *series],
                                  index=1 if series else 0,
                                  format_func=lambda s: "none" if s is None else s,
                                  key="scaling_shade")
    others = [n for n in common.campaign_names() if n != name]
    overlay = controls[4].selectbox("Overlay campaign", [None, *others],
                                    format_func=lambda s: "none" if s is None else s,
                                    key="scaling_overlay")
    common.live(body, name, y, series, normalize_at, shade, overlay)


if __name__ == "__main__":
    render()
