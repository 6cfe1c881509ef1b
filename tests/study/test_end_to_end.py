"""A real campaign on real data (scikit-learn's digits), end to end through the CLI,
workers, Optuna and SQL; then the exact semantics checked on what was stored."""
import json

import optuna
import pandas as pd
import pytest
from sqlalchemy import text

from db import queries
from db.engine import make_engine
from study.analysis.steps import steps_to_result
from study.results import campaign_info, cell_table
from study.tuning import optuna_storage
from study.worker import CampaignWorker
from tests.study.conftest import TINY_SPEC, batchlab

pytestmark = pytest.mark.slow

FINISHED = {"reached", "not_reached", "diverged", "failed", "pruned"}


@pytest.fixture(scope="module")
def finished_campaign(tmp_path_factory):
    """`batchlab run` of the tiny spec with 2 workers; returns (url, stdout, figure path)."""
    folder = tmp_path_factory.mktemp("e2e")
    spec = folder / "tiny.toml"
    spec.write_text(TINY_SPEC)
    url = f"sqlite:///{folder / 'e2e.db'}"
    figure = folder / "scaling.png"
    result = batchlab("run", str(spec), "--storage", url, "--workers", "2", "--device", "cpu",
                      "--figure", str(figure))
    assert result.returncode == 0, result.stderr
    return url, result.stdout, figure


def test_every_cell_has_exactly_its_trials(finished_campaign):
    url, stdout, _ = finished_campaign
    engine = make_engine(url)
    info = campaign_info(engine, "tiny")
    trials = queries.trials(engine, info.id)
    assert set(trials["outcome"]) <= FINISHED
    assert trials.groupby("batch_size").size().to_dict() == {16: 3, 64: 3}
    assert (trials["outcome"] != "failed").all(), trials["message"].tolist()
    for name in ("tiny/bs=16/opt=momentum/sched=constant", "tiny/bs=64/opt=momentum/sched=constant"):
        states = [t.state.name for t in optuna.load_study(study_name=name, storage=optuna_storage(url)).trials]
        assert len(states) == 3 and not {"RUNNING", "WAITING"} & set(states)
    assert "cells 2/2 complete" in stdout and "batchlab dashboard --storage" in stdout


def test_trials_stop_at_the_first_evaluation_that_beats_the_target(finished_campaign):
    url, _, _ = finished_campaign
    engine = make_engine(url)
    info = campaign_info(engine, "tiny")
    trials = queries.trials(engine, info.id).set_index("trial_id")
    measurements = queries.measurements(engine, info.id)
    for trial_id, rows in measurements.groupby("trial_id"):
        trial = trials.loc[trial_id]
        beaten = rows.loc[rows["val_error"] < 0.1]
        assert (rows["step"] % 10 == 0).all()  # quantised by the evaluation interval
        if trial["outcome"] == "reached":
            first = beaten.iloc[0]
            assert trial["steps_to_result"] == first["step"] == rows["step"].max()
            assert trial["examples_to_result"] == first["examples"]
        else:
            assert beaten.empty and pd.isna(trial["steps_to_result"])
        if trial["outcome"] == "not_reached":
            assert rows["step"].max() == 300
        assert trial["steps"] == rows["step"].max()


def test_results_agree_three_ways(finished_campaign):
    """CLI json == analysis over measurements == the SQL view users query."""
    url, _, _ = finished_campaign
    engine = make_engine(url)
    info = campaign_info(engine, "tiny")
    cli = batchlab("results", "--campaign", "tiny", "--storage", url, "--format", "json")
    assert cli.returncode == 0, cli.stderr
    from_cli = {r["batch_size"]: r["steps_to_result"] for r in json.loads(cli.stdout)}
    trials, measurements = queries.trials(engine, info.id), queries.measurements(engine, info.id)
    analysed = steps_to_result(trials, measurements, metric="val_error", threshold=0.1)
    cells = queries.cells(engine, info.id).merge(analysed, on="cell_id")
    from_analysis = {int(b): (None if pd.isna(s) else int(s))
                     for b, s in zip(cells["batch_size"], cells["steps_to_result"])}
    with engine.connect() as connection:
        view = connection.execute(text("SELECT batch_size, steps_to_result FROM bl_cell_results")).all()
    assert from_cli == from_analysis == {b: s for b, s in view}
    assert any(v is not None for v in from_cli.values())  # the tiny campaign does reach its target


def test_results_table_has_winner_and_hparams(finished_campaign):
    url, _, _ = finished_campaign
    engine = make_engine(url)
    table = cell_table(engine, campaign_info(engine, "tiny"))
    for _, row in table.iterrows():
        if pd.isna(row["steps_to_result"]):
            assert row["winner_hparams"] == "" and pd.isna(row["winner_trial"])
        else:
            hparams = json.loads(row["winner_hparams"])
            assert row["seconds_to_result"] > 0  # a trained trial's time is kept
            assert set(hparams) == {"learning_rate", "momentum", "weight_decay"}  # + the default
            assert hparams["weight_decay"] == 0.0
            assert 0.01 <= hparams["learning_rate"] <= 1.0 and 0.8 <= hparams["momentum"] <= 0.95


def test_figure_written(finished_campaign):
    _, _, figure = finished_campaign
    data = figure.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_same_seed_same_measurements(tmp_path):
    """Two runs of one campaign in two databases store identical measurements."""
    spec = TINY_SPEC.replace("batch_sizes = [16, 64]", "batch_sizes = [32]").replace(
        "trials_per_cell = 3", "trials_per_cell = 2")
    tables = []
    for run in ("a", "b"):
        (tmp_path / f"{run}.toml").write_text(spec)
        url = f"sqlite:///{tmp_path / run}.db"
        assert batchlab("campaign", "create", str(tmp_path / f"{run}.toml"), "--storage", url).returncode == 0
        engine = make_engine(url)
        CampaignWorker(engine, url, "tiny", device="cpu", log=lambda line: None).run()
        info = campaign_info(engine, "tiny")
        ms = queries.measurements(engine, info.id).merge(
            queries.trials(engine, info.id)[["trial_id", "trial_number"]], on="trial_id")
        tables.append(ms[["trial_number", "step", "examples", "learning_rate", "train_loss",
                          "val_loss", "val_error"]].reset_index(drop=True))
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)
    assert len(tables[0]) > 2


def test_example_queries_in_the_sql_docs_run(finished_campaign):
    """Every ```sql block of docs/sql.md runs on a real campaign and returns rows."""
    import re
    from pathlib import Path
    url, _, _ = finished_campaign
    docs = (Path(__file__).resolve().parents[2] / "docs" / "sql.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", docs, flags=re.S)
    assert len(blocks) >= 2
    engine = make_engine(url, read_only=True)
    with engine.connect() as connection:
        for block in blocks:
            rows = connection.execute(text(block.replace("'demo_digits'", "'tiny'"))).all()
            assert rows, block


def test_postgresql_queries_in_the_sql_docs_run(local_postgres):
    """The ```postgresql blocks of docs/sql.md (PostgreSQL's forms of SQLite-only queries)
    run on batchlab's schema in PostgreSQL."""
    import re
    from pathlib import Path
    from db.schema import ensure_schema
    docs = (Path(__file__).resolve().parents[2] / "docs" / "sql.md").read_text()
    blocks = re.findall(r"```postgresql\n(.*?)```", docs, flags=re.S)
    assert blocks
    import uuid
    engine = make_engine(local_postgres.create_database(f"sqldocs_{uuid.uuid4().hex[:8]}"))
    ensure_schema(engine)
    with engine.connect() as connection:
        for block in blocks:
            connection.execute(text(block)).all()  # parses, and the types fit the schema
