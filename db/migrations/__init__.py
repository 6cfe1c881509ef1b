"""batchlab's schema migrations: an explicit, ordered list of steps for the `bl_` tables.

Each step upgrades schema version N-1 to N with Alembic's operations API (Alembic is
Optuna's own migration tool, a well-kept SQLAlchemy project, so it is already installed):
`op.add_column`, `op.create_index`, `op.batch_alter_table` (which rebuilds a table on
SQLite, where ALTER TABLE is limited). The applied versions are rows of
`bl_schema_version`. Optuna's tables (and its `alembic_version` table) are Optuna's:
no step here touches them, and Optuna migrates them itself
(`optuna storage upgrade --storage URL`).

Adding a step: write `vNNNN_what.py` with `VERSION`, `DESCRIPTION` and
`upgrade(op, connection)`, append it to STEPS, bump `db.models.SCHEMA_VERSION`, and
extend tests/db/test_migrations.py.

`db` never imports torch: these modules need SQLAlchemy and Alembic only.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Callable

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from db.migrations import v0002_heartbeats, v0003_probes, v0004_worker_grace


@dataclass(frozen=True)
class Step:
    version: int
    description: str
    upgrade: Callable[[Operations, Connection], None]


def _step(module: ModuleType) -> Step:
    return Step(module.VERSION, module.DESCRIPTION, module.upgrade)


# Version 1 is the schema as first released: created whole, it has no step.
STEPS: tuple[Step, ...] = (_step(v0002_heartbeats), _step(v0003_probes), _step(v0004_worker_grace))


def pending(current: int) -> list[Step]:
    """The steps that take a database at version `current` to the newest version."""
    return [step for step in STEPS if step.version > current]


def apply(connection: Connection, step: Step) -> None:
    """Run one step inside the caller's transaction (PostgreSQL's DDL is transactional:
    a failed step leaves the database at the version it had)."""
    operations = Operations(MigrationContext.configure(connection))
    step.upgrade(operations, connection)
