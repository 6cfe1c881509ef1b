"""The SQL page's query runner: one statement, read-only, bounded in time and rows, on
SQLite and (when a server can be started) PostgreSQL."""
from __future__ import annotations

import itertools

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app import data
from app.data import QueryError, run_read_only_query, single_statement
from db.engine import make_engine
from tests.app.conftest import build_database

WRITES = ["DELETE FROM bl_trials", "DROP TABLE bl_measurements",
          "UPDATE bl_campaigns SET name = 'x'", "CREATE TABLE evil (a INTEGER)",
          "COMMIT; DELETE FROM bl_trials", "SELECT 1; DROP TABLE bl_trials"]


@pytest.mark.parametrize("sql,expected", [
    ("SELECT 1;", "SELECT 1"), ("SELECT 1 ; -- trailing\n", "SELECT 1"),
    ("SELECT ';' AS s", "SELECT ';' AS s"), ("SELECT $$a;b$$", "SELECT $$a;b$$"),
    (r"SELECT E'\'' AS a, ';' AS b;", r"SELECT E'\'' AS a, ';' AS b"),
    ("SELECT $t$a';b$t$ /* c /* d */ ; */ ;", "SELECT $t$a';b$t$"),
    ("SELECT name'x;' -- ;\n;", "SELECT name'x;'")])
def test_single_statement_accepts_one(sql, expected):
    assert single_statement(sql) == expected


# The two escapes: an E'' string whose \' the scanner took for its end, a nested comment
# whose inner */ it took for the end (PostgreSQL nests /* */).
ESCAPES = [r"SELECT E'\''; COMMIT; DELETE FROM bl_workers; SELECT 'x'",
           "SELECT 1 /* /* */ ' */ ; COMMIT; DELETE FROM bl_workers; SELECT ' '"]


@pytest.mark.parametrize("sql", ["", "  ; ", "-- nothing", "SELECT 1; SELECT 2",
                                 "COMMIT; DELETE FROM bl_trials", *ESCAPES])
def test_single_statement_refuses_empty_or_several(sql):
    with pytest.raises(QueryError):
        single_statement(sql)


def snapshot(engine) -> tuple:
    with engine.connect() as connection:
        return tuple(connection.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar()
                     for t in ("bl_campaigns", "bl_trials", "bl_measurements"))


def test_sqlite_refuses_writes_times_out_and_limits_rows(tmp_path):
    engine = make_engine(build_database(tmp_path / "t.db"), read_only=True)
    before = snapshot(engine)
    for statement in WRITES + ["CREATE TEMP TABLE t (a INTEGER)"]:
        with pytest.raises(QueryError):
            run_read_only_query(engine, statement)
    assert snapshot(engine) == before
    result = run_read_only_query(engine, "SELECT id FROM bl_measurements", row_limit=3)
    assert len(result.frame) == 3 and result.truncated
    with pytest.raises(QueryError, match="longer than 0.2 s"):
        run_read_only_query(engine, "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
                                    "FROM r) SELECT COUNT(*) FROM r", timeout_seconds=0.2)


def test_postgres_read_only_transaction_and_statement_timeout(local_postgres):
    from db.schema import ensure_schema
    url = local_postgres.create_database("dashboard_ro")
    writer = make_engine(url)
    ensure_schema(writer)
    with writer.begin() as connection:
        connection.execute(text(
            "INSERT INTO bl_campaigns (name, workload, target_metric, target_threshold, "
            "target_mode, eval_every, max_steps, trials_per_cell, sampler, spec, spec_text, "
            "created_at) VALUES ('pg', 'w', 'val_error', 0.1, 'min', 10, 100, 1, 'random', "
            "'{}', '', now())"))
    engine = make_engine(url, read_only=True)
    before = snapshot(engine)
    for statement in WRITES:
        with pytest.raises(QueryError):
            run_read_only_query(engine, statement)
    assert snapshot(engine) == before
    assert run_read_only_query(engine, "SELECT name FROM bl_campaigns").frame["name"].tolist() == ["pg"]
    with pytest.raises(QueryError, match="statement timeout"):
        run_read_only_query(engine, "SELECT pg_sleep(5)", timeout_seconds=0.3)
    engine.dispose()
    writer.dispose()


def _database(request, tmp_path, backend: str) -> str:
    if backend == "sqlite":
        return build_database(tmp_path / "verbatim.db")
    server = request.getfixturevalue("local_postgres")
    return build_database(server.create_database(f"verbatim_{next(_names)}"))


_names = itertools.count()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_query_runs_verbatim_percent_signs_included(request, tmp_path, backend):
    """No parameters are passed: psycopg would read `%` as a placeholder."""
    engine = make_engine(_database(request, tmp_path, backend), read_only=True)
    rows = lambda sql: run_read_only_query(engine, sql).frame.to_dict("records")  # noqa: E731
    assert rows("SELECT name FROM bl_campaigns WHERE name LIKE 'demo%' ORDER BY name") == [
        {"name": "demo_scaling"}]
    assert rows("SELECT 100 % 7 AS m") == [{"m": 2}]
    assert rows("SELECT '%s' AS x, '%%' AS y, '?' AS z") == [{"x": "%s", "y": "%%", "z": "?"}]
    assert rows(r"SELECT 'it''s' AS a, ';' AS b") == [{"a": "it's", "b": ";"}]
    engine.dispose()


def _workers(url) -> int:
    engine = make_engine(url)
    with engine.connect() as connection:
        count = connection.execute(text("SELECT COUNT(*) FROM bl_workers")).scalar()
    engine.dispose()
    return count


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "prepared"])
def test_postgres_server_refuses_a_second_statement(request, tmp_path, monkeypatch, pipeline):
    """Even with the client-side check out of the way (as a tokenizer bug would put it), no
    statement can follow a COMMIT or switch the session to read-write and commit that: the
    server takes one statement (extended protocol: a pipeline, else a prepared statement)."""
    import psycopg
    url = _database(request, tmp_path, "postgresql")
    assert _workers(url) == 2
    monkeypatch.setattr(psycopg.Pipeline, "is_supported", classmethod(lambda cls: pipeline))
    monkeypatch.setattr(data, "single_statement", lambda sql: sql.strip())
    engine = make_engine(url, read_only=True)
    for sql in ESCAPES + [
            "COMMIT; SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; COMMIT; "
            "DELETE FROM bl_workers"]:
        with pytest.raises(QueryError, match="multiple commands"):
            run_read_only_query(engine, sql)
    # one statement that ends the transaction is harmless; the pooled session is still
    # read-only and the page works after it
    run_read_only_query(engine, "COMMIT")
    run_read_only_query(engine, "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
    assert run_read_only_query(engine, "SHOW default_transaction_read_only").frame.iloc[0, 0] == "on"
    assert run_read_only_query(engine, "SELECT 100 % 7 AS m").frame["m"].tolist() == [2]
    assert _workers(url) == 2
    engine.dispose()


def test_postgres_read_only_engine_is_read_only_per_session(local_postgres):
    """After a COMMIT the next transaction is read-only too (default_transaction_read_only),
    so even raw SQL on the dashboard's engine cannot write."""
    url = build_database(local_postgres.create_database(f"session_ro_{next(_names)}"))
    engine = make_engine(url, read_only=True)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "on"
        connection.exec_driver_sql("COMMIT")
        with pytest.raises(DBAPIError, match="read-only transaction"):
            connection.exec_driver_sql("DELETE FROM bl_workers")
    engine.dispose()
    assert _workers(url) == 2


@pytest.mark.parametrize("folder", ["run#1", "what?", "100%", "a b"])
def test_sqlite_read_only_path_is_escaped(tmp_path, folder):
    """'#' or '?' in the path cut the file: URI short (dropping mode=ro) and made SQLite
    create an empty database there; now the path is percent-encoded."""
    from urllib.parse import quote
    (tmp_path / folder).mkdir()
    path = tmp_path / folder / "b.db"
    encoded = f"sqlite:///{quote(str(path))}"  # a URL's '?' starts its query: encode it
    build_database(encoded)
    assert path.exists()
    before = sorted(p.name for p in tmp_path.iterdir())
    urls = [encoded] + ([f"sqlite:///{path}"] if folder in ("run#1", "a b") else [])
    for url in urls:
        engine = make_engine(url, read_only=True)
        assert run_read_only_query(engine, "SELECT name FROM bl_campaigns ORDER BY name").frame[
            "name"].tolist() == ["demo_scaling", "other_campaign"]
        with pytest.raises(QueryError, match="readonly"):
            run_read_only_query(engine, "DELETE FROM bl_workers")
        engine.dispose()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray file beside it
