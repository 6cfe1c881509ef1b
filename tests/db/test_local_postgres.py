"""The throwaway PostgreSQL of db/local_postgres.py: connect, write, read, restart, CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from db.local_postgres import LocalPostgres, LocalPostgresError, find_binaries

REPO_ROOT = Path(__file__).resolve().parents[2]


def _table_name(prefix: str) -> str:
    # The session's server is shared by every test: never collide with another's table.
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_url_names_psycopg_on_localhost(postgres_url: str) -> None:
    url = sa.make_url(postgres_url)
    assert url.drivername == "postgresql+psycopg"
    assert url.host == "127.0.0.1"
    assert url.database == "batchlab"
    assert url.password is None  # trust auth on the throwaway cluster


def test_write_and_read_a_row(postgres_url: str) -> None:
    table = _table_name("roundtrip")
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)"))
            connection.execute(sa.text(f"INSERT INTO {table} VALUES (1, 'ünïcode ok')"))
        with engine.connect() as connection:
            rows = connection.execute(sa.text(f"SELECT id, note FROM {table}")).all()
        assert rows == [(1, "ünïcode ok")]
    finally:
        engine.dispose()


def test_server_settings_fit_many_workers(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            max_connections = int(connection.execute(sa.text("SHOW max_connections")).scalar())
            listen = connection.execute(sa.text("SHOW listen_addresses")).scalar()
        assert max_connections >= 200  # 32+ workers, each with a small pool
        assert listen == "127.0.0.1"  # never reachable from other machines
    finally:
        engine.dispose()


def test_restart_keeps_data_and_accepts_new_connections(local_postgres: LocalPostgres) -> None:
    table = _table_name("restart")
    port_before = local_postgres.port
    engine = sa.create_engine(local_postgres.url, pool_pre_ping=True)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text(f"CREATE TABLE {table} (value int)"))
            connection.execute(sa.text(f"INSERT INTO {table} VALUES (7), (11)"))
        held = engine.connect()  # open across the restart, like a worker's connection
        held.execute(sa.text("SELECT 1"))

        local_postgres.restart()

        assert local_postgres.is_running()
        assert local_postgres.port == port_before  # the URL stays valid
        with pytest.raises(sa.exc.OperationalError):
            held.execute(sa.text("SELECT 1"))  # the restart severed it
        held.close()
        # The pool's pre-ping replaces the dead connection; the data is still there.
        with engine.connect() as connection:
            total = connection.execute(sa.text(f"SELECT sum(value) FROM {table}")).scalar()
        assert total == 18
        fresh = sa.create_engine(local_postgres.url)
        with fresh.connect() as connection:
            assert connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() == 2
        fresh.dispose()
    finally:
        engine.dispose()


def test_create_database_gives_an_isolated_database(local_postgres: LocalPostgres) -> None:
    name = _table_name("isolated")
    url = local_postgres.create_database(name)
    assert local_postgres.create_database(name) == url  # idempotent
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT current_database()")).scalar() == name
    finally:
        engine.dispose()


def test_missing_binaries_say_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHLAB_PG_BIN", raising=False)
    with pytest.raises(LocalPostgresError, match=r"apt-get install -y postgresql"):
        find_binaries(search_globs=(str(tmp_path / "*" / "bin"),), use_path=False)


def test_module_imports_neither_torch_nor_a_driver() -> None:
    code = (
        "import sys, db.local_postgres; "
        "bad = {'torch', 'sqlalchemy', 'psycopg'} & set(sys.modules); "
        "sys.exit(sorted(bad) or 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "db.local_postgres", *args], cwd=REPO_ROOT,
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120, check=False,
    )


def test_cli_start_url_restart_stop(local_postgres: LocalPostgres) -> None:
    # Its own cluster; not under pytest's tmp_path, whose parent is private to root
    # (mode 700) and so unreachable for the server user when tests run as root.
    directory = Path(tempfile.mkdtemp(prefix="batchlab-pg-cli-"))
    try:
        started = _cli("start", "--dir", str(directory))
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url.startswith("postgresql+psycopg://batchlab@127.0.0.1:")
        assert _cli("url", "--dir", str(directory)).stdout.strip() == url
        assert _cli("start", "--dir", str(directory)).stdout.strip() == url  # idempotent
        assert _cli("status", "--dir", str(directory)).returncode == 0
        restarted = _cli("restart", "--dir", str(directory))
        assert restarted.returncode == 0, restarted.stderr
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 1")).scalar() == 1
        engine.dispose()
        stopped = _cli("stop", "--dir", str(directory), "--remove")
        assert stopped.returncode == 0, stopped.stderr
        assert not directory.exists()
        assert _cli("status", "--dir", str(directory)).returncode == 3
        missing = _cli("url", "--dir", str(directory))
        assert missing.returncode == 2
        assert missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    finally:
        if directory.exists():
            LocalPostgres(directory).stop(remove=True)
        shutil.rmtree(directory, ignore_errors=True)


def test_unreachable_directory_is_one_clear_error(local_postgres: LocalPostgres) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root hands the cluster to another user")
    private = Path(tempfile.mkdtemp(prefix="batchlab-pg-private-"))  # mode 700, root's
    try:
        with pytest.raises(LocalPostgresError, match="cannot reach"):
            LocalPostgres(private / "cluster").start()
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_context_manager_removes_its_temporary_directory(
    local_postgres: LocalPostgres,
) -> None:
    with LocalPostgres(max_connections=50) as server:
        directory = server.directory
        assert directory is not None and (directory / "data" / "PG_VERSION").exists()
    assert not directory.exists()
