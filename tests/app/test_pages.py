"""Every dashboard page under streamlit.testing (AppTest) against the fixture database:
the values shown, not just the absence of exceptions."""
from __future__ import annotations

import json
import math

import pytest
from streamlit.testing.v1 import AppTest

from db.engine import make_engine
from tests.app.conftest import (APP, CAMPAIGN, DISTANCE_A, DISTANCE_B, FAILED_MESSAGE, OTHER,
                                STEPS_TO_RESULT, build_database)


def open_page(url: str, page: str | None, monkeypatch, campaign: str = CAMPAIGN) -> AppTest:
    monkeypatch.setenv("BATCHLAB_STORAGE", url)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.session_state["campaign"] = campaign
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def frame_with(at: AppTest, column: str):
    """The first dataframe shown that has `column`."""
    for element in at.dataframe:
        if column in element.value.columns:
            return element.value
    raise AssertionError(f"no dataframe with column {column!r}")


def chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(element.proto.spec) for element in at.get("vega_lite_chart")]


def titles_of(spec: dict) -> str:
    """All title and subtitle text of a Vega-Lite spec (nested charts included)."""
    return json.dumps(spec)


def assert_figures_state_context(at: AppTest, workload="digits_mlp", target="val_error < 0.1",
                                 interval="evaluated every 10 steps") -> None:
    specs = chart_specs(at)
    assert specs, "the page shows no chart"
    for spec in specs:
        title = spec.get("title", {})
        text = json.dumps(title)
        assert workload in text and target in text and interval in text, text


def test_campaigns_page_shows_progress_workers_and_failures(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, None, monkeypatch)
    overview = frame_with(at, "live_workers").set_index("campaign")
    assert overview.loc[CAMPAIGN, "finished"] == 12
    assert overview.loc[CAMPAIGN, "running"] == 1
    assert overview.loc[CAMPAIGN, "planned"] == 15
    assert overview.loc[CAMPAIGN, "live_workers"] == 1
    assert overview.loc[CAMPAIGN, "failed"] == 1
    assert overview.loc[OTHER, "finished"] == 2
    progress = frame_with(at, "steps_to_result").set_index("batch_size")
    assert progress.loc[16, ["finished", "running", "planned"]].tolist() == [3, 0, 3]
    assert progress.loc[256, ["finished", "running", "planned"]].tolist() == [0, 1, 3]
    assert progress.loc[32, "failed"] == 1
    workers = frame_with(at, "heartbeat_age_s").set_index("id")
    assert workers.loc["worker-live", "state"] == "live"
    assert workers.loc["worker-stale", "state"] == "stale"
    assert workers.loc["worker-stale", "heartbeat_age_s"] >= 590
    assert any(FAILED_MESSAGE in e.value for e in at.error)
    assert any("host-b:202" in w.value for w in at.warning)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Trials finished"] == "12/15"
    assert metrics["ETA"] not in ("-", "done")
    assert_figures_state_context(at)


def test_scaling_page_table_chart_and_fit(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "scaling", monkeypatch)
    table = frame_with(at, "steps_to_result").set_index("batch_size")
    for batch_size, steps in STEPS_TO_RESULT.items():
        assert table.loc[batch_size, "steps_to_result"] == steps
        assert table.loc[batch_size, "steps_low"] <= steps
    assert table["steps_to_result"].isna().loc[256]  # no result: neither 0 nor infinity
    assert set(table["regime"].dropna()) <= {"perfect_scaling", "diminishing_returns",
                                             "maximal_data_parallelism"}
    fits = frame_with(at, "b_crit")
    assert len(fits) == 1 and fits["b_crit"].iloc[0] > 0
    [spec] = chart_specs(at)
    text = json.dumps(spec)
    assert "B_crit" in text and "perfect scaling" in text and "bootstrap interval" in text
    assert '"type": "log"' in text and '"base": 2' in text
    assert_figures_state_context(at)


def test_scaling_page_switches_axis_normalises_and_overlays(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "scaling", monkeypatch)
    at.radio(key="scaling_y").set_value("examples_to_result")
    at.selectbox(key="scaling_normalize").set_value(16)
    at.selectbox(key="scaling_overlay").set_value(OTHER)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [spec] = chart_specs(at)
    text = json.dumps(spec)
    assert "Examples to result" in text and "value at B=16" in text
    # both campaigns are named in the subtitle, each with its workload, target and interval
    assert "mnist_simple_cnn" in text and "evaluated every 20 steps" in text
    at.radio(key="scaling_y").set_value("seconds_to_result")
    at.run()
    assert not at.exception


def test_scaling_page_controls_follow_the_campaign(dashboard_db, monkeypatch):
    """The series multiselect is keyed: it kept the previous campaign's series, none of
    them the new campaign's, so the new one showed "No cell has reached the target yet"."""
    at = open_page(dashboard_db, "scaling", monkeypatch)
    assert at.multiselect(key="scaling_series").value == ["momentum / constant"]
    at.selectbox(key="scaling_normalize").set_value(16).run()
    at.sidebar.selectbox(key="campaign").set_value(OTHER).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="scaling_series").value == ["adam / constant"]
    assert at.selectbox(key="scaling_shade").value == "adam / constant"
    assert at.selectbox(key="scaling_normalize").value is None
    assert not [i.value for i in at.info]
    [spec] = chart_specs(at)
    assert "mnist_simple_cnn" in json.dumps(spec)
    # a choice made for this campaign stays while it is shown
    at.multiselect(key="scaling_series").set_value([]).run()
    at.run()
    assert at.multiselect(key="scaling_series").value == []
    assert any("No cell has reached" in i.value for i in at.info)
    at.sidebar.selectbox(key="campaign").set_value(CAMPAIGN).run()
    assert at.multiselect(key="scaling_series").value == ["momentum / constant"]
    [spec] = chart_specs(at)
    assert "digits_mlp" in json.dumps(spec)


def test_hparams_page_scatter_winner_edges_and_heuristics(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "hparams", monkeypatch)
    assert any("learning_rate = 0.99" in w.value and "upper edge" in w.value for w in at.warning)
    winners = frame_with(at, "effective_learning_rate").set_index("batch_size")
    assert winners.loc[32, "learning_rate"] == pytest.approx(0.02)
    assert winners.loc[32, "effective_learning_rate"] == pytest.approx(0.2)
    assert winners.loc[64, "steps_to_result"] == 50
    counts = frame_with(at, "category").set_index("category")["trials"].to_dict()
    assert counts == {"reached": 2, "diverged": 1}  # the B=16 cell
    specs = chart_specs(at)
    assert len(specs) == 4  # scatter + lr, momentum, effective lr vs batch size
    scatter = json.dumps(specs[0])
    assert "constant effective learning rate" in scatter and "winning trial" in scatter
    assert "linear y0 B/B0" in json.dumps(specs[1])
    assert_figures_state_context(at)


def test_curves_page_shows_winners_with_smith_view(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "curves", monkeypatch)
    rows = frame_with(at, "run")
    assert set(rows["run"]) == {f"B={b} momentum/constant #0" for b in STEPS_TO_RESULT}
    assert rows.loc[rows["run"] == "B=16 momentum/constant #0", "step"].max() == 160
    specs = chart_specs(at)
    text = json.dumps(specs)
    assert "hconcat" in text and "vs epochs" in text and "vs updates" in text
    assert "noise scale over training" in text  # B=16's winner recorded noise_scale
    assert_figures_state_context(at)
    at.radio(key="curves_x").set_value("wall_seconds")
    at.run()
    assert not at.exception


def test_budgets_page_best_error_under_budgets(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "budgets", monkeypatch)
    at.text_input(key="budget_steps").set_value("50, 200")
    at.text_input(key="budget_epochs").set_value("1")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    steps = frame_with(at, "budget_label")
    best = steps.set_index(["budget", "batch_size"])["best_value"]
    assert best.loc[(200.0, 16)] == pytest.approx(0.05)  # reached at 160 <= 200
    assert best.loc[(50.0, 16)] == pytest.approx(0.5)  # not yet at 50 steps
    assert best.loc[(50.0, 64)] == pytest.approx(0.05)
    epochs = [e.value for e in at.dataframe if "budget_label" in e.value.columns][1]
    one_epoch = epochs.set_index("batch_size")["best_value"]  # 1 epoch = 1000 examples
    assert one_epoch.loc[16] == pytest.approx(0.5)  # B=16 needs 2560 examples
    assert_figures_state_context(at)


def test_dynamics_page_plots_probes(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "dynamics", monkeypatch)
    probes = frame_with(at, "noise_scale")
    assert probes["distance_from_init"].max() == pytest.approx(DISTANCE_A + DISTANCE_B * math.log(160))
    assert len(chart_specs(at)) == 3  # two probe traces + distance vs log step with its fit
    fits = frame_with(at, "slope b (per e-fold of steps)")  # one row per winner, exact fit
    assert len(fits) == len(set(probes["run"]))
    assert fits["intercept a"].to_numpy() == pytest.approx(DISTANCE_A)
    assert fits["slope b (per e-fold of steps)"].to_numpy() == pytest.approx(DISTANCE_B)
    assert fits["R^2"].to_numpy() == pytest.approx(1.0)
    assert_figures_state_context(at)


def test_dynamics_page_without_probes_says_so(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "dynamics", monkeypatch, campaign=OTHER)
    assert any("No probe data recorded for this campaign" in i.value for i in at.info)


def run_sql(at: AppTest, query: str) -> AppTest:
    at.text_area(key="sql_text").set_value(query)
    at.button(key="run_sql").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_sql_page_runs_select_and_offers_csv(dashboard_db, monkeypatch):
    at = open_page(dashboard_db, "sql", monkeypatch)
    run_sql(at, "SELECT batch_size, steps_to_result FROM bl_cell_results "
                "WHERE steps_to_result IS NOT NULL AND campaign_id = 1 ORDER BY batch_size")
    result = frame_with(at, "steps_to_result")
    assert dict(zip(result["batch_size"], result["steps_to_result"])) == STEPS_TO_RESULT
    assert any(b.label == "Download CSV" for b in at.get("download_button"))
    run_sql(at, "SELECT id FROM bl_measurements")  # more rows than the limit
    at.number_input(key="sql_row_limit").set_value(5)
    at.button(key="run_sql").click()
    at.run()
    assert len(frame_with(at, "id")) == 5
    assert any("truncated" in c.value for c in at.caption)


@pytest.mark.parametrize("statement", [
    "DELETE FROM bl_trials",
    "DROP TABLE bl_measurements",
    "INSERT INTO bl_workers (id, host, pid, device, started_at, heartbeat_at, status, "
    "trials_done) VALUES ('x', 'h', 1, 'cpu', '2024-01-01', '2024-01-01', 'running', 0)",
    "UPDATE bl_campaigns SET name = 'changed'",
    "SELECT 1; DELETE FROM bl_trials",
])
def test_sql_page_cannot_change_data(tmp_path, monkeypatch, statement):
    url = build_database(tmp_path / "writable.db")  # the file itself is writable
    before = counts(url)
    at = open_page(url, "sql", monkeypatch)
    run_sql(at, statement)
    assert at.error, "the refused statement shows no error"
    assert "Query failed" in at.error[0].value
    assert counts(url) == before


def counts(url: str) -> dict:
    from sqlalchemy import text
    engine = make_engine(url, read_only=True)
    with engine.connect() as connection:
        out = {table: connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar()
               for table in ("bl_campaigns", "bl_cells", "bl_trials", "bl_measurements",
                             "bl_workers")}
        out["names"] = connection.execute(text("SELECT group_concat(name) FROM bl_campaigns")).scalar()
    engine.dispose()
    return out


def test_storage_password_is_never_shown(dashboard_db, monkeypatch):
    """The sidebar shows the storage URL through db.engine.redact."""
    from app import common
    monkeypatch.setenv("BATCHLAB_STORAGE", "postgresql+psycopg://alice:s3cret@db.example/x")
    assert "s3cret" not in common.redact(common.url())
    at = open_page(dashboard_db, None, monkeypatch)
    assert any("(read-only)" in c.value for c in at.sidebar.caption)
