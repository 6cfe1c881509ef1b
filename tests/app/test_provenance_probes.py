"""The trial inspector (provenance), the post-training probe results on the Dynamics page,
empty and half-filled databases on every page, and the fast loader's equality with
`study.report.load_campaign`."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import make_engine
from db.models import Campaign, Cell, Measurement, ProbeResult, Trial
from db.schema import ensure_schema
from tests.app.conftest import (CAMPAIGN, CONFIG, OTHER, add_provenance_and_probes,
                                build_database)
from tests.app.test_pages import chart_specs, frame_with, open_page

PAGES = [None, "scaling", "hparams", "curves", "budgets", "dynamics", "sql"]


@pytest.fixture(scope="module")
def rich_db(tmp_path_factory) -> dict:
    """The fixture database with provenance and post-training probe results."""
    url = build_database(tmp_path_factory.mktemp("rich") / "rich.db")
    return {"url": url, **add_provenance_and_probes(url)}


# ---- provenance ---------------------------------------------------------------------------------
def test_trial_inspector_shows_provenance(rich_db, monkeypatch):
    at = open_page(rich_db["url"], None, monkeypatch)
    at.selectbox(key="inspect_cell").set_value(rich_db["small_cell"])
    at.run()
    at.selectbox(key="inspect_trial").set_value(rich_db["small"])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    shown = frame_with(at, "field").set_index("field")["value"]
    assert shown["trial id"] == str(rich_db["small"])
    assert shown["cell"] == "B=16 momentum/constant"
    assert shown["batchlab version"] == "0.3.1"
    assert shown["git commit"] == "0123456789ab"
    assert shown["uncommitted changes (dirty)"] == "yes"
    assert shown["Python"] == "3.11.7" and shown["torch"] == "2.5.1"
    assert shown["CUDA (torch build)"] == "12.4" and shown["optuna"] == "4.1.0"
    assert shown["numpy version"] == "2.1.0"
    assert shown["device"] == "cuda:0 (NVIDIA H100 80GB HBM3)"
    assert shown["host"] == "gpu-node-7"
    assert shown["seed"] == "123456789"
    assert shown["attempt"] == "1" and shown["attempt of"].startswith("- (first")
    assert shown["worker"] == "worker-live"
    configs = [json.loads(j.proto.body) for j in at.json]
    assert CONFIG in configs
    assert {"learning_rate": 0.01, "momentum": 0.9} in configs

    at.selectbox(key="inspect_trial").set_value(rich_db["rerun"])
    at.run()
    shown = frame_with(at, "field").set_index("field")["value"]
    assert shown["attempt"] == "2"
    assert shown["attempt of"] == f"trial id {rich_db['small']}"
    assert shown["git commit"] == "-" and shown["uncommitted changes (dirty)"] == "unknown"
    assert any("no resolved config" in c.value for c in at.caption)


def test_parse_code_version():
    from app.data import parse_code_version
    assert parse_code_version("0.1.0+g0123456789ab") == {"version": "0.1.0",
                                                         "commit": "0123456789ab", "dirty": "no"}
    assert parse_code_version("shallue2018")["commit"] == ""
    assert parse_code_version("")["dirty"] == "unknown"


# ---- post-training probes ----------------------------------------------------------------------
def test_dynamics_page_shows_probe_results(rich_db, monkeypatch):
    at = open_page(rich_db["url"], "dynamics", monkeypatch)
    sharpness = frame_with(at, "sharpness").set_index("batch_size")
    assert sharpness["sharpness"].to_dict() == {16: 0.5, 128: 2.0}  # the newest B=16 row
    assert sharpness.loc[16, "trial_id"] == rich_db["small"]
    assert sharpness.loc[128, "train_loss"] == pytest.approx(0.04)
    hessian = frame_with(at, "top_eigenvalue").set_index("batch_size")
    assert hessian["top_eigenvalue"].to_dict() == {16: 10.0, 128: 40.0}
    assert hessian.loc[128, "trace"] == pytest.approx(420.0)
    specs = chart_specs(at)
    text = json.dumps(specs)
    assert "Sharpness of each cell's winner" in text
    assert "Top eigenvalue of each cell's winner" in text
    assert "between the small- and large-batch solutions" in text
    assert f"alpha = 0: B=16 (trial {rich_db['small']})" in text
    assert "batch norm: batch_stats" in text
    assert len(specs) == 2 + 1 + 3  # two training probes, distance vs log step; sharpness, Hessian, interpolation
    for spec in specs:
        assert "digits_mlp" in json.dumps(spec.get("title"))


def test_dynamics_page_probe_results_alone(rich_db, monkeypatch):
    """A campaign with probe results but no training probes shows only the results."""
    url = rich_db["url"]
    engine = make_engine(url)
    with Session(engine) as session:
        other = session.execute(select(Campaign).where(Campaign.name == OTHER)).scalar_one()
        trial = session.execute(select(Trial).join(Cell).where(Cell.campaign_id == other.id)
                                ).scalars().first()
        session.add(ProbeResult(campaign_id=other.id, cell_id=trial.cell_id, trial_id=trial.id,
                                kind="hessian", params={}, result={"top_eigenvalue": 3.0,
                                                                   "trace": 9.0}))
        session.commit()
    engine.dispose()
    at = open_page(url, "dynamics", monkeypatch, campaign=OTHER)
    assert not any("No probe data recorded" in i.value for i in at.info)
    assert frame_with(at, "top_eigenvalue")["top_eigenvalue"].tolist() == [3.0]
    assert any("No probes were recorded during training" in c.value for c in at.caption)


# ---- empty and half-filled databases -------------------------------------------------------------
@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('empty') / 'empty.db'}"
    engine = make_engine(url)
    ensure_schema(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def half_db(tmp_path_factory) -> str:
    """`fresh`: cells, no trial. `starting`: one running trial with two measurements (no
    finished trial). `bare`: a campaign without cells."""
    url = f"sqlite:///{tmp_path_factory.mktemp('half') / 'half.db'}"
    engine = make_engine(url)
    ensure_schema(engine)
    with Session(engine) as session:
        for name in ("bare", "fresh", "starting"):
            campaign = Campaign(name=name, workload="digits_mlp", target_metric="val_error",
                                target_threshold=0.1, target_mode="min", eval_every=10,
                                max_steps=100, trials_per_cell=2, sampler="random", spec={},
                                spec_text="")
            session.add(campaign)
            session.flush()
            if name == "bare":
                continue
            for batch_size in (32, 64):
                cell = Cell(campaign_id=campaign.id, batch_size=batch_size, optimizer="momentum",
                            schedule="constant", study_name=f"{name}-{batch_size}",
                            trials_planned=2, trials_claimed=0)
                session.add(cell)
                session.flush()
                if name == "starting" and batch_size == 32:
                    trial = Trial(cell_id=cell.id, optuna_trial_id=1, trial_number=0,
                                  outcome="running", hparams={"learning_rate": 0.1}, config={},
                                  seed=1)
                    session.add(trial)
                    session.flush()
                    session.add_all([Measurement(
                        trial_id=trial.id, step=s, examples=s * 32, epoch=s * 32 / 1000,
                        wall_seconds=s * 0.01, eval_seconds=0.0, learning_rate=0.1,
                        batch_size=32, train_loss=0.5, val_loss=0.5, val_error=0.5, extra={})
                        for s in (10, 20)])
        session.commit()
    engine.dispose()
    return url


def _messages(at) -> str:
    return " ".join(e.value for e in [*at.info, *at.caption, *at.warning])


@pytest.mark.parametrize("page", PAGES)
def test_empty_database_every_page(empty_db, page, monkeypatch):
    at = open_page(empty_db, page, monkeypatch, campaign="none")
    if page != "sql":
        assert "No campaigns yet" in _messages(at)


@pytest.mark.parametrize("campaign", ["bare", "fresh", "starting"])
@pytest.mark.parametrize("page", PAGES)
def test_half_filled_campaign_every_page(half_db, page, campaign, monkeypatch):
    at = open_page(half_db, page, monkeypatch, campaign=campaign)  # asserts no exception
    text = _messages(at)
    expected = {"scaling": "No cell has reached the target yet",
                "curves": "No cell has a winning trial yet",
                "dynamics": "No probe data recorded"}
    if page in expected:
        assert expected[page] in text, text
    if page == "hparams":
        assert ("This campaign has no cells yet" if campaign == "bare"
                else "No cell has a winning trial yet") in text, text
    if page == "budgets":
        assert "No measurements yet" in text or campaign == "starting", text
    if page is None:
        assert ("No trial has started" in text) == (campaign != "starting"), text
    assert not at.get("exception")


def test_sql_page_on_empty_database(empty_db, monkeypatch):
    from tests.app.test_pages import run_sql
    at = run_sql(open_page(empty_db, "sql", monkeypatch, campaign="none"),
                 "SELECT COUNT(*) AS n FROM bl_trials")
    assert frame_with(at, "n")["n"].tolist() == [0]


# ---- the fast loader -------------------------------------------------------------------------------
def test_fast_loader_matches_load_campaign(dashboard_db, half_db):
    from study.report import load_campaign, load_campaign_fast, load_progress
    for url, names in ((dashboard_db, [CAMPAIGN, OTHER]), (half_db, ["bare", "fresh", "starting"])):
        engine = make_engine(url, read_only=True)
        for name in names:
            slow, fast = load_campaign(engine, name), load_campaign_fast(engine, name)
            for field in ("cells", "trials", "measurements", "table", "workers"):
                pd.testing.assert_frame_equal(getattr(slow, field), getattr(fast, field),
                                              check_dtype=bool(len(getattr(slow, field))))
            assert slow.info == fast.info and slow.spec == fast.spec
            light = load_progress(engine, name)
            pd.testing.assert_frame_equal(light.trials, slow.trials)
        engine.dispose()


def test_data_version_changes_on_write(tmp_path):
    from db.queries import data_version
    url = build_database(tmp_path / "v.db")
    engine = make_engine(url)
    before = data_version(engine)
    assert data_version(engine) == before
    with Session(engine) as session:
        trial = session.execute(select(Trial).where(Trial.outcome == "running")).scalar_one()
        trial.outcome, trial.finished_at = "not_reached", datetime.now(timezone.utc)
        session.commit()
    assert data_version(engine) != before
    engine.dispose()
