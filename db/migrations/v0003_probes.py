"""Schema v3: final-weight checkpoints on trials, and the results of post-training probes."""
from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 3
DESCRIPTION = "bl_trials.checkpoint_path, table bl_probe_results"


def upgrade(op: Operations, connection: sa.Connection) -> None:
    # Nullable ADD COLUMN: plain ALTER TABLE on SQLite and PostgreSQL, rows kept (NULL:
    # no checkpoint, which is what every older trial has).
    op.add_column("bl_trials", sa.Column("checkpoint_path", sa.String(1000), nullable=True))
    # Spelled out rather than left to create_all, so the step says what v3 is.
    op.create_table(
        "bl_probe_results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("campaign_id", sa.Integer(), sa.ForeignKey("bl_campaigns.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("cell_id", sa.Integer(), sa.ForeignKey("bl_cells.id", ondelete="CASCADE"), nullable=True),
        sa.Column("trial_id", sa.Integer(), sa.ForeignKey("bl_trials.id", ondelete="CASCADE"), nullable=True),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
    op.create_index("ix_bl_probe_results_campaign_kind", "bl_probe_results", ["campaign_id", "kind"])
