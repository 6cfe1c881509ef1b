"""Creating and upgrading batchlab's tables and views."""
from __future__ import annotations

from sqlalchemy import Connection, Engine, func, inspect, select, text

from db import migrations
from db.engine import StorageError, connect
from db.models import SCHEMA_VERSION, Base, SchemaVersion

# One row per cell with its steps-to-result: the reached trial with the fewest steps,
# ties broken by trial number (a trial records the first evaluation that beat the
# target, so this equals the minimum over the cell's measurements). NULL where no
# trial reached the target: no result, neither zero nor infinity.
CELL_RESULTS_VIEW = """
CREATE VIEW bl_cell_results AS
SELECT c.id AS cell_id, c.campaign_id, c.batch_size, c.optimizer, c.schedule,
       c.trials_planned,
       (SELECT COUNT(*) FROM bl_trials t WHERE t.cell_id = c.id AND t.outcome IN
           ('reached', 'not_reached', 'diverged', 'failed', 'pruned')) AS trials_finished,
       (SELECT COUNT(*) FROM bl_trials t WHERE t.cell_id = c.id AND t.outcome = 'running')
           AS trials_running,
       (SELECT COUNT(*) FROM bl_trials t WHERE t.cell_id = c.id AND t.outcome = 'reached')
           AS trials_reached,
       w.steps_to_result, w.examples_to_result, w.seconds_to_result,
       w.id AS winner_trial_id, w.trial_number AS winner_trial_number
FROM bl_cells c
LEFT JOIN bl_trials w ON w.id = (
    SELECT t.id FROM bl_trials t
    WHERE t.cell_id = c.id AND t.outcome = 'reached'
    ORDER BY t.steps_to_result, t.trial_number
    LIMIT 1)
"""
VIEWS = {"bl_cell_results": CELL_RESULTS_VIEW}
# Any fixed number: serialises schema changes of concurrent workers on PostgreSQL.
SCHEMA_LOCK_KEY = 0x62_6C_73_63  # "blsc"


def ensure_schema(engine: Engine) -> None:
    """Create batchlab's tables and views, or upgrade them to SCHEMA_VERSION (idempotent).

    Safe to call from many processes at once: on PostgreSQL the work runs in one
    transaction under an advisory lock (DDL is transactional there), on SQLite under
    the write lock that BEGIN IMMEDIATE takes. An unreachable database raises
    StorageError with one line and no password. A database newer than this code
    raises StorageError too, rather than writing rows an older schema would misread."""
    if is_current(engine):
        return  # the common case, without taking any lock
    with _connect(engine) as connection, connection.begin():
        _lock(connection)
        current = _version_in(connection)
        if current is None:  # a fresh database: create the newest schema whole
            Base.metadata.create_all(connection)
            _record(connection, SCHEMA_VERSION)
        else:
            for step in migrations.pending(current):
                migrations.apply(connection, step)
                _record(connection, step.version)
            Base.metadata.create_all(connection)  # tables added since, if any
        existing_views = set(inspect(connection).get_view_names())
        for name, ddl in VIEWS.items():
            if name not in existing_views:
                connection.execute(text(ddl))


def is_current(engine: Engine) -> bool:
    """Whether batchlab's tables and views are at SCHEMA_VERSION (read-only: changes
    nothing; StorageError as `schema_version`)."""
    return _current_version(engine) == SCHEMA_VERSION and _views_exist(engine)


def schema_version(engine: Engine) -> int | None:
    """The newest applied schema version, or None where batchlab's tables do not exist."""
    return _current_version(engine)


def _current_version(engine: Engine) -> int | None:
    with _connect(engine) as connection:
        version = _version_in(connection)
    if version is not None and version > SCHEMA_VERSION:
        raise StorageError(f"{_shown(engine)}: database "
                           f"schema version {version} is newer than this batchlab's "
                           f"({SCHEMA_VERSION}); upgrade batchlab")
    return version


def _version_in(connection: Connection) -> int | None:
    if not inspect(connection).has_table(SchemaVersion.__tablename__):
        return None
    return connection.execute(select(func.max(SchemaVersion.version))).scalar() or 1


def _views_exist(engine: Engine) -> bool:
    with _connect(engine) as connection:
        return set(VIEWS) <= set(inspect(connection).get_view_names())


def _record(connection: Connection, version: int) -> None:
    connection.execute(SchemaVersion.__table__.insert().values(version=version))


def _lock(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})


def _connect(engine: Engine) -> Connection:
    """A connection, or StorageError naming the (redacted) URL and the driver's reason."""
    return connect(engine)


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
