"""Creating and upgrading batchlab's tables and views."""
from __future__ import annotations

from sqlalchemy import Engine, inspect, select, text

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


def ensure_schema(engine: Engine) -> None:
    """Create batchlab's tables and views if they are missing (idempotent)."""
    Base.metadata.create_all(engine)
    existing_views = set(inspect(engine).get_view_names())
    with engine.begin() as connection:
        for name, ddl in VIEWS.items():
            if name not in existing_views:
                connection.execute(text(ddl))
        versions = connection.execute(select(SchemaVersion.version)).scalars().all()
        if SCHEMA_VERSION not in versions:
            connection.execute(SchemaVersion.__table__.insert().values(version=SCHEMA_VERSION))
