"""Streamlit helpers shared by the pages: the read-only engine, the campaign picked in the
sidebar, cached loads and the live-refresh fragment. Never imports torch."""
from __future__ import annotations

import os
from typing import Callable

import altair as alt
import pandas as pd
import streamlit as st

from app import data
from db.engine import make_engine, redact, storage_url
from study.figures import FigureContext

DEFAULT_REFRESH_SECONDS = 5
CACHE_SECONDS = 2  # every page in a refresh sees the same snapshot, none older than this


def url() -> str:
    return storage_url(os.environ.get("BATCHLAB_STORAGE"))


@st.cache_resource(show_spinner=False)
def _engine(storage: str):
    return make_engine(storage, read_only=True)


def engine():
    """The dashboard's only engine: read-only (SQLite mode=ro; PostgreSQL READ ONLY)."""
    return _engine(url())


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def _campaign_names(storage: str) -> list[str]:
    return data.campaign_names(_engine(storage))


def campaign_names() -> list[str]:
    return _campaign_names(url())


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def _campaign(storage: str, name: str):
    return data.load_campaign(_engine(storage), name)


def load(name: str) -> data.CampaignData | None:
    return _campaign(url(), name)


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def _scaling(storage: str, name: str, n_resamples: int) -> data.ScalingAnalysis:
    return data.scaling_analysis(_campaign(storage, name), n_resamples=n_resamples)


def scaling(name: str, n_resamples: int = 500) -> data.ScalingAnalysis:
    return _scaling(url(), name, n_resamples)


def sidebar() -> str | None:
    """Storage (password redacted), the campaign picker and the refresh setting; returns
    the chosen campaign's name (None when there is none)."""
    st.sidebar.caption(f"storage: `{redact(url())}` (read-only)")
    names = campaign_names()
    if not names:
        return None
    if st.session_state.get("campaign") not in names:
        # ?campaign=NAME in the address opens that campaign (links are shareable).
        wanted = st.query_params.get("campaign")
        st.session_state["campaign"] = wanted if wanted in names else names[-1]
    name = st.sidebar.selectbox("Campaign", names, key="campaign")
    st.sidebar.toggle("Live refresh", value=True, key="live")
    st.sidebar.number_input("Refresh every (s)", min_value=1, max_value=600,
                            value=DEFAULT_REFRESH_SECONDS, key="refresh_seconds")
    return name


def current_campaign() -> str | None:
    names = campaign_names()
    if not names:
        st.info("No campaigns yet. Create one with `batchlab campaign create SPEC`.")
        return None
    name = st.session_state.get("campaign")
    return name if name in names else names[-1]


def refresh_every() -> float | None:
    if not st.session_state.get("live", True):
        return None
    return float(st.session_state.get("refresh_seconds", DEFAULT_REFRESH_SECONDS))


def live(body: Callable[..., None], *args, **kwargs) -> None:
    """Run `body` as a fragment that reruns by itself every refresh interval (off when
    'Live refresh' is off): the page's data and figures update while workers write."""
    st.fragment(run_every=refresh_every())(body)(*args, **kwargs)


def context(info) -> dict:
    """The keyword arguments every figure takes: workload, target, evaluation interval."""
    return {"workload": info.workload, "target": info.target_text, "eval_every": info.eval_every}


def figure_context(info) -> FigureContext:
    return FigureContext(info.workload, info.target_text, info.eval_every, info.name)


def header(info, text: str) -> None:
    st.title(f"{text}: {info.name}")
    st.caption(f"{info.workload} · target {info.target_text} · evaluated every "
               f"{info.eval_every} steps")


def chart(figure: alt.TopLevelMixin, *, stretch: bool = True) -> None:
    st.altair_chart(figure, width="stretch" if stretch else "content")


def table(frame: pd.DataFrame, *, key: str | None = None, file_name: str | None = None) -> None:
    """A dataframe with a CSV download button under it."""
    st.dataframe(frame, hide_index=True, width="stretch", key=key)
    if file_name:
        st.download_button("Download CSV", frame.to_csv(index=False), file_name=file_name,
                           mime="text/csv", key=f"download_{file_name}")
