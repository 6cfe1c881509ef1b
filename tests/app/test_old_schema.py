"""A database with an older schema: the app says so on every page (it only reads, so it
cannot upgrade it) instead of failing with a traceback, and `batchlab dashboard` upgrades
it before it starts the app."""
from __future__ import annotations

import sqlite3
import uuid

import pytest
import sqlalchemy as sa

from db.engine import make_engine
from db.models import SCHEMA_VERSION
from db.schema import ensure_schema, schema_version
from tests.app.test_pages import frame_with, open_page
from tests.db.test_migrations import load_v1

PAGES = [None, "scaling", "hparams", "curves", "budgets", "dynamics", "sql"]


def _v1_database(request, tmp_path, backend: str) -> str:
    """Schema version 1 (as first released) with campaign `old`: one cell (B=32) whose
    trial 0 reached the target at step 40, trial 1 still running."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'v1.db'}"
    else:
        url = request.getfixturevalue("local_postgres").create_database(
            f"old_{uuid.uuid4().hex[:8]}")
    engine = make_engine(url)
    load_v1(engine, backend)
    assert schema_version(engine) == 1
    engine.dispose()
    return url


def _messages(at) -> str:
    return " ".join(e.value for e in [*at.error, *at.info])


@pytest.mark.parametrize("page", PAGES)
def test_app_explains_an_older_schema_on_every_page(tmp_path, request, page, monkeypatch):
    url = _v1_database(request, tmp_path, "sqlite")
    at = open_page(url, page, monkeypatch, campaign="old")  # asserts no exception
    text = _messages(at)
    assert f"schema version 1; the dashboard needs version {SCHEMA_VERSION}" in text, text
    assert "batchlab dashboard --storage URL" in text
    assert not at.dataframe and not at.get("vega_lite_chart")
    engine = make_engine(url)
    assert schema_version(engine) == 1  # the app never writes
    engine.dispose()


def test_app_on_a_database_without_batchlab_tables(tmp_path, monkeypatch):
    path = tmp_path / "bare.db"
    sqlite3.connect(path).execute("CREATE TABLE studies (study_id INTEGER)").connection.close()
    at = open_page(f"sqlite:///{path}", None, monkeypatch, campaign="none")
    assert "No campaigns yet: this database has no batchlab tables" in _messages(at)
    assert not at.error


def test_app_on_a_newer_database(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'future.db'}"
    engine = make_engine(url)
    ensure_schema(engine)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO bl_schema_version (version, applied_at) "
                                   "VALUES (:v, CURRENT_TIMESTAMP)"), {"v": SCHEMA_VERSION + 1})
    engine.dispose()
    at = open_page(url, "scaling", monkeypatch, campaign="old")
    assert f"schema version {SCHEMA_VERSION + 1} is newer" in _messages(at)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_dashboard_command_upgrades_the_schema_first(tmp_path, request, backend, monkeypatch,
                                                    capsys):
    from study import cli
    url = _v1_database(request, tmp_path, backend)
    started = []

    def execve(path, command, env):  # instead of becoming streamlit
        started.append((command, env["BATCHLAB_STORAGE"]))
        return 0
    monkeypatch.setattr(cli.os, "execve", execve)
    assert cli.main(["dashboard", "--storage", url, "--port", "8599"]) == 0
    [(command, storage)] = started
    assert storage == url and command[1:4] == ["-m", "streamlit", "run"]
    assert "upgraded the schema" in capsys.readouterr().out
    engine = make_engine(url)
    assert schema_version(engine) == SCHEMA_VERSION
    engine.dispose()
    # the pages now read the upgraded database, rows kept
    at = open_page(url, "scaling", monkeypatch, campaign="old")
    assert not at.error
    cells = frame_with(at, "steps_to_result").set_index("batch_size")
    assert cells.loc[32, "steps_to_result"] == 40
    # a second start finds the schema current and writes nothing
    assert cli.main(["dashboard", "--storage", url]) == 0
    assert "upgraded" not in capsys.readouterr().out


def test_schema_problem_names_what_is_missing(tmp_path):
    from app.data import schema_problem
    url = f"sqlite:///{tmp_path / 'views.db'}"
    engine = make_engine(url)
    ensure_schema(engine)
    assert schema_problem(make_engine(url, read_only=True)) is None
    with engine.begin() as connection:
        connection.execute(sa.text("DROP VIEW bl_cell_results"))
    problem = schema_problem(make_engine(url, read_only=True))
    assert problem.level == "error" and "lacks batchlab's views" in problem.message
    engine.dispose()
