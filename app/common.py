"""Streamlit helpers shared by the pages: the read-only engine, the campaign picked in the
sidebar, cached loads and the live-refresh fragment. Never imports torch."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

import altair as alt
import pandas as pd
import streamlit as st

from app import data
from db.engine import StorageError, make_engine, redact, storage_url
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
def _version(storage: str) -> tuple:
    return data.data_version(_engine(storage))


def version() -> tuple:
    """The database's data version (`db.queries.data_version`): every cache below is keyed
    on it, so a rerun (widget change, live-refresh tick) with no new writes reuses what the
    last run computed, and a write by any worker invalidates it."""
    return _version(url())


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False, max_entries=64)
def _campaign_version(storage: str, name: str) -> tuple:
    return data.campaign_version(_engine(storage), name, _state(storage))


def campaign_version(name: str) -> tuple:
    """One campaign's data version (`data.campaign_version`): the caches of a campaign's
    frames and analyses are keyed on it, so a worker writing to another campaign does not
    invalidate them."""
    return _campaign_version(url(), name)


@st.cache_data(show_spinner=False, max_entries=8)
def _campaign_names(storage: str, version: tuple) -> list[str]:
    return data.campaign_names(_engine(storage))


def campaign_names() -> list[str]:
    return _campaign_names(url(), version())


# Large frames are held with cache_resource (shared, not copied per call: st.cache_data
# would unpickle millions of rows on every hit); the pages only read them.
@st.cache_resource(show_spinner=False, max_entries=4)
def _campaign(storage: str, name: str, version: tuple):
    return data.load_campaign_fast(_engine(storage), name)


@st.cache_resource(show_spinner=False, max_entries=16)
def _progress(storage: str, name: str, version: tuple):
    return data.load_progress_incremental(_engine(storage), name, _state(storage))


@st.cache_resource(show_spinner=False)
def _state(storage: str) -> data.IncrementalState:
    """The aggregates over measurements kept up to date from the rows written since the
    last refresh (`data.folded`) and the campaigns' version marks, shared by every
    session."""
    return data.IncrementalState()


@st.cache_resource(show_spinner=False, max_entries=8)
def _light(storage: str, name: str, version: tuple):
    return data.load_light_incremental(_engine(storage), name, _state(storage))


def _fresh_workers(campaign, storage: str):
    """Workers heartbeat without writing trials: read them on every run (a small table)."""
    if campaign is None:
        return None
    return replace(campaign, workers=data.queries.workers(_engine(storage), campaign.info.id))


def load(name: str) -> data.CampaignData | None:
    """The campaign with its measurements (cached until the data version changes)."""
    return _fresh_workers(_campaign(url(), name, campaign_version(name)), url())


def progress(name: str) -> data.CampaignData | None:
    """The campaign's cells, trials and workers only (no measurements): for the overview."""
    return _fresh_workers(_progress(url(), name, campaign_version(name)), url())


def light(name: str) -> data.CampaignData | None:
    """The campaign with only each trial's first on-target measurement
    (`data.load_campaign_light`): enough for the cell table, results, winners and the
    bootstrap; cached until the campaign's data version changes."""
    return _fresh_workers(_light(url(), name, campaign_version(name)), url())


@st.cache_resource(show_spinner=False, max_entries=16)
def _trial_rows(storage: str, name: str, trial_ids: tuple, version: tuple):
    campaign = _light(storage, name, version)
    rows = data.measurements_of_trials(_engine(storage), campaign.info, trial_ids)
    return replace(campaign, measurements=rows)


def with_trials(name: str, trial_ids) -> data.CampaignData | None:
    """`light(name)` whose `measurements` are all the rows of `trial_ids` (what a page that
    plots those trials needs), cached."""
    if light(name) is None:
        return None
    ids = tuple(sorted({int(t) for t in trial_ids}))
    return _fresh_workers(_trial_rows(url(), name, ids, campaign_version(name)), url())


@st.cache_resource(show_spinner=False)
def _scaling_store(storage: str) -> dict:
    return {}


@st.cache_resource(show_spinner=False, max_entries=8)
def _scaling(storage: str, name: str, n_resamples: int, version: tuple) -> data.ScalingAnalysis:
    # The bootstrap and its refits depend only on each trial's first on-target row: a write
    # that changes none (a measurement of a running trial, a heartbeat) reuses the last one.
    campaign = _light(storage, name, version)
    key = data.scaling_inputs_key(campaign, n_resamples=n_resamples)
    store = _scaling_store(storage)
    held = store.get((name, n_resamples))
    if held is not None and held[0] == key:
        return held[1]
    analysis = data.scaling_analysis(campaign, n_resamples=n_resamples)
    store[(name, n_resamples)] = (key, analysis)
    return analysis


def scaling(name: str, n_resamples: int = 500) -> data.ScalingAnalysis:
    return _scaling(url(), name, n_resamples, campaign_version(name))


@st.cache_resource(show_spinner=False, max_entries=16)
def _derived(storage: str, name: str, what: str, version: tuple):
    if what == "results":  # only the first on-target rows are read: the light load
        return _light(storage, name, version).results()
    if what == "winners":
        return data.winners_from(_light(storage, name, version),
                                 _derived(storage, name, "results", version))
    if what == "scatter":  # first on-target rows only, as results
        return data.scatter_from(_light(storage, name, version),
                                 _derived(storage, name, "results", version))
    if what in ("probe_keys", "probe_trials"):
        campaign = _light(storage, name, version)
        found = data.probe_summary(_engine(storage), campaign.info, _state(storage))
        if found is not None:  # from the database's JSON functions, folded incrementally
            return found[0] if what == "probe_keys" else found[1]
        rows = _campaign(storage, name, version).measurements
        if what == "probe_keys":
            return data.probe_keys(rows)
        return [int(t) for t in rows.loc[rows["extra"].map(bool), "trial_id"].unique()]
    if what == "summary":
        campaign = _light(storage, name, version)
        return data.measurement_summary(_engine(storage), campaign.info, _state(storage))
    raise ValueError(what)


def results(name: str):
    """Exact steps-to-result per cell (`CampaignData.results`), cached."""
    return _derived(url(), name, "results", campaign_version(name))


def winners(name: str):
    return _derived(url(), name, "winners", campaign_version(name))


def scatter(name: str):
    return _derived(url(), name, "scatter", campaign_version(name))


def probe_keys(name: str) -> list[str]:
    """The probe keys recorded in the campaign's measurements (`data.probe_keys`)."""
    return _derived(url(), name, "probe_keys", campaign_version(name))


def probe_trials(name: str) -> list[int]:
    """The campaign's trials with a non-empty measurement `extra`, sorted."""
    return _derived(url(), name, "probe_trials", campaign_version(name))


def summary(name: str) -> data.MeasurementSummary:
    """Row count, largest step and epoch, training-set size of the campaign's measurements."""
    return _derived(url(), name, "summary", campaign_version(name))


def examples_per_epoch(name: str) -> float:
    return summary(name).examples_per_epoch


@st.cache_resource(show_spinner=False, max_entries=32)
def _budget(storage: str, name: str, budgets: tuple, kind: str, size: float, version: tuple):
    table = data.budget_table(_engine(storage), _light(storage, name, version), list(budgets),
                              kind, size, _state(storage))
    if table is None:  # a metric stored in `extra`: from every measurement
        table = data.budget_frame(_campaign(storage, name, version), list(budgets), kind, size)
    return table


def budget(name: str, budgets: list[float], kind: str, size: float = float("nan")):
    """`study.report.budget_frame` (best value under each budget), cached."""
    return _budget(url(), name, tuple(budgets), kind, float(size), campaign_version(name))


@st.cache_data(show_spinner=False, max_entries=16)
def _probe_results(storage: str, campaign_id: int, version: tuple):
    return data.probe_results(_engine(storage), campaign_id)


def probe_results(campaign_id: int):
    return _probe_results(url(), campaign_id, version())


@st.cache_data(ttl=CACHE_SECONDS, show_spinner=False)
def _schema_problem(storage: str) -> data.SchemaProblem | None:
    try:
        engine = _engine(storage)
    except StorageError as exc:  # e.g. no such SQLite file
        return data.SchemaProblem("error", str(exc))
    return data.schema_problem(engine)


def schema_ready() -> bool:
    """Whether the database has the schema the pages read; if not, says why (an older
    schema, no batchlab tables, a newer database, an unreachable server) instead of every
    page failing with a traceback. Re-checked every few seconds: a database upgraded
    meanwhile (`batchlab dashboard`, a worker) is picked up."""
    problem = _schema_problem(url())
    if problem is None:
        return True
    st.sidebar.caption(f"storage: `{redact(url())}` (read-only)")
    (st.info if problem.level == "info" else st.error)(problem.message)
    return False


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
    return {"workload": info.figure_workload, "target": info.target_text,
            "eval_every": info.eval_every}


def figure_context(info) -> FigureContext:
    return FigureContext(info.figure_workload, info.target_text, info.eval_every, info.name)


def header(info, text: str) -> None:
    st.title(f"{text}: {info.name}")
    st.caption(f"{info.figure_workload} · target {info.target_text} · evaluated every "
               f"{info.eval_every} steps")


def chart(figure: alt.TopLevelMixin, *, stretch: bool = True) -> None:
    st.altair_chart(figure, width="stretch" if stretch else "content")


def table(frame: pd.DataFrame, *, key: str | None = None, file_name: str | None = None) -> None:
    """A dataframe with a CSV download button under it."""
    st.dataframe(frame, hide_index=True, width="stretch", key=key)
    if file_name:
        st.download_button("Download CSV", frame.to_csv(index=False), file_name=file_name,
                           mime="text/csv", key=f"download_{file_name}")
