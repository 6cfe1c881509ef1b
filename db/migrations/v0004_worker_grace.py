"""Schema v4: each worker's grace period, so that every reaper judges a worker by its own."""
from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 4
DESCRIPTION = "bl_workers.grace_seconds"


def upgrade(op: Operations, connection: sa.Connection) -> None:
    # Nullable ADD COLUMN, rows kept: a worker registered before v4 has no grace of its
    # own (NULL), and reapers judge it by theirs, as they did.
    op.add_column("bl_workers", sa.Column("grace_seconds", sa.Float(), nullable=True))
