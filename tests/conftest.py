"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from db.local_postgres import LocalPostgres


# ----- PostgreSQL: one throwaway server per test session (db/local_postgres.py) -----
def _postgres_unavailable(reason: str) -> None:
    """Skip, or fail where CI demands PostgreSQL (BATCHLAB_REQUIRE_POSTGRES=1)."""
    if os.environ.get("BATCHLAB_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"BATCHLAB_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def local_postgres() -> Iterator[LocalPostgres]:
    """The running ``db.local_postgres.LocalPostgres`` of this session.

    For tests that restart the server mid-run (``local_postgres.restart()``) or want a
    database of their own (``local_postgres.create_database(name)`` returns its URL).
    A restart severs every open connection: engines should use ``pool_pre_ping=True``.
    """
    from db.local_postgres import LocalPostgres, LocalPostgresError, find_binaries

    try:
        find_binaries()
    except LocalPostgresError as error:  # says: install PostgreSQL: apt-get install ...
        _postgres_unavailable(str(error))
    try:
        import psycopg  # noqa: F401  (the driver the URL names)
    except ImportError:
        _postgres_unavailable(
            "the psycopg driver is not installed (pip install 'psycopg[binary]')"
        )
    # A start failure with the binaries present is a real error, not a skip.
    with LocalPostgres() as server:  # a fresh temporary directory, removed at the end
        yield server


@pytest.fixture(scope="session")
def postgres_url(local_postgres: LocalPostgres) -> str:
    """SQLAlchemy URL ``postgresql+psycopg://batchlab@127.0.0.1:PORT/batchlab``."""
    return local_postgres.url
