"""Engine factory: one place that knows how to talk to SQLite and PostgreSQL."""
from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import URL, Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import NullPool, QueuePool

DEFAULT_STORAGE = "sqlite:///batchlab.db"
SQLITE_BUSY_TIMEOUT_MS = 60_000


class StorageError(Exception):
    """A storage URL that cannot be used (malformed, unsupported, unreachable)."""


def storage_url(explicit: str | None = None) -> str:
    """`--storage`, else $BATCHLAB_STORAGE, else a SQLite file in the working directory."""
    return explicit or os.environ.get("BATCHLAB_STORAGE") or DEFAULT_STORAGE


def redact(url: str) -> str:
    """The URL with its password hidden, for logs and the UI."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return "<unparseable storage URL>"


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"storage URL {redact(url)!r} is not a database URL "
                           f"(expected e.g. sqlite:///batchlab.db or postgresql+psycopg://...)") from exc
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(parsed, read_only)
        if parsed.get_backend_name() == "postgresql":
            return _postgres_engine(parsed, read_only)
    except (NoSuchModuleError, ImportError) as exc:  # an unknown or missing driver
        raise StorageError(f"storage URL {redact(url)!r}: driver {parsed.drivername!r} is not "
                           f"available (use postgresql+psycopg://...; pip install 'psycopg[binary]')") from exc
    raise StorageError(f"storage URL {redact(url)!r}: only sqlite and postgresql are supported")


def connect(engine: Engine) -> Connection:
    """A connection, or StorageError naming the (redacted) URL and the driver's reason in
    one line (an unreachable server, a refused login, a file SQLite cannot open)."""
    try:
        return engine.connect()
    except (OperationalError, DBAPIError) as exc:
        reason = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        first = reason[0] if reason else type(exc).__name__
        raise StorageError(f"cannot connect to {engine.url.render_as_string(hide_password=True)}: "
                           f"{first}") from None


def check_connection(engine: Engine) -> None:
    """Open one connection and close it: StorageError (`connect`) where that fails, so a
    command ends with one line before it starts its work."""
    with connect(engine):
        pass


@contextmanager
def snapshot(engine: Engine):
    """A connection whose statements all see one snapshot of the database: a REPEATABLE
    READ transaction on PostgreSQL; on SQLite a read transaction (the read-only engine's
    BEGIN), which keeps the snapshot of its first read until it ends. Rolled back."""
    options = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
    with engine.connect().execution_options(**options) as connection:
        try:
            yield connection
        finally:
            connection.rollback()


def _sqlite_engine(parsed, read_only: bool) -> Engine:
    database = parsed.database or ""
    if read_only:
        if not database or database == ":memory:" or not os.path.exists(database):
            raise StorageError(f"{database or ':memory:'}: no such database file")
        # SQLite itself refuses writes on a read-only connection (mode=ro). The path goes
        # into a file: URI percent-encoded: a '?' or '#' in it would otherwise end the path
        # and drop mode=ro (SQLite would then create a new file at the cut-off path).
        uri = URL.create("sqlite", database=Path(database).absolute().as_uri(),
                         query={"mode": "ro", "uri": "true"})
        engine = create_engine(uri, poolclass=NullPool)
    else:
        if database and database != ":memory:":
            directory = os.path.dirname(os.path.abspath(database))
            if not os.path.isdir(directory):
                raise StorageError(f"{database}: directory {directory} does not exist")
        # A pool per process (workers are separate processes, never forked with an open
        # engine): opening a connection and running the pragmas below costs ~0.5 ms,
        # ~8x a pooled checkout, and a worker opens ~15 sessions per trial.
        engine = create_engine(parsed, poolclass=QueuePool, pool_size=4, max_overflow=8)

    configure_sqlite(engine, read_only=read_only)
    return engine


def configure_sqlite(engine: Engine, *, read_only: bool = False) -> None:
    """WAL, a busy timeout and write-locking transactions on every new connection.

    Applied to batchlab's engines and to Optuna's, so both wait for the lock instead of
    failing with "database is locked" when several workers share one file."""

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        # pysqlite's own transaction handling steps aside for the explicit BEGIN below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if not read_only:
            _use_wal(cursor)  # readers run beside one writer
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        # Writers take the lock when the transaction starts, not on its first write: two
        # deferred transactions that both read then write would deadlock, and SQLite
        # answers that with an immediate "database is locked" instead of waiting.
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _use_wal(cursor) -> None:
    """Switch the file to WAL (persistent: once per file, a no-op after).

    The switch needs the exclusive lock. Connections switching at once (workers or
    creates starting together on a file Optuna made in rollback mode) each hold a shared
    lock while they ask for it: SQLite sees a deadlock and answers "database is locked"
    at once, without its busy handler. Retried here for the busy timeout instead."""
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


# Many workers on many machines: a small pool per process, connections checked before
# use so a database restart costs a reconnect, not a crash. Also the pool of Optuna's
# storage (study.tuning.optuna_storage): a worker holds both (docs/distributed.md).
POSTGRES_POOL = {"pool_size": 2, "max_overflow": 2, "pool_pre_ping": True, "pool_recycle": 1800}
# An unreachable host fails in seconds, not after the OS's minutes.
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10


def _postgres_engine(parsed, read_only: bool) -> Engine:
    connect_args = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS}
    if read_only:
        # Read-only at the session level, not only per transaction: the transaction that
        # follows one a statement ended (COMMIT) is read-only too. (A session can still
        # turn this off itself; the SQL page sends one statement at a time, always rolled
        # back, so none can.) Appended to any `options` the URL gives libpq.
        given = parsed.query.get("options", "")
        given = " ".join(given) if isinstance(given, tuple) else given
        connect_args["options"] = f"{given} -c default_transaction_read_only=on".strip()
    engine = create_engine(parsed, **POSTGRES_POOL, connect_args=connect_args)
    if read_only:
        @event.listens_for(engine, "begin")
        def _read_only(connection):
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")
    return engine
