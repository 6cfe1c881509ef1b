"""Schema v2: heartbeats on running trials, and attempts of re-run trials."""
from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 2
DESCRIPTION = "bl_trials.heartbeat_at, bl_trials.attempt, bl_trials.attempt_of"


def upgrade(op: Operations, connection: sa.Connection) -> None:
    # Plain ADD COLUMN (nullable or with a server default) works on SQLite and PostgreSQL
    # alike and keeps every existing row.
    op.add_column("bl_trials", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("bl_trials", sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("bl_trials", sa.Column("attempt_of", sa.Integer(), nullable=True))
    # Trials that were running under v1 have no heartbeat yet: give them their start time,
    # so the reaper judges them like any other (a v1 worker still running writes none).
    op.execute("UPDATE bl_trials SET heartbeat_at = started_at WHERE outcome = 'running'")
