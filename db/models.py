"""batchlab's tables: the public, documented SQL interface (docs/sql.md).

They live in the same database as Optuna's own tables, prefixed `bl_` so that names
such as `trials` never collide with Optuna's.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Bump together with a new step in db/migrations (ensure_schema applies the missing ones).
SCHEMA_VERSION = 4
# Campaign.sampler of a campaign of imported published data (study.importer): no trials to run.
IMPORTED_SAMPLER = "imported"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "bl_schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Campaign(Base):
    __tablename__ = "bl_campaigns"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    workload: Mapped[str] = mapped_column(String(100))
    target_metric: Mapped[str] = mapped_column(String(50))
    target_threshold: Mapped[float] = mapped_column(Float)
    target_mode: Mapped[str] = mapped_column(String(3))  # "min" ("<") or "max" (">")
    eval_every: Mapped[int] = mapped_column(Integer)  # evaluation interval in steps
    max_steps: Mapped[int] = mapped_column(Integer)
    trials_per_cell: Mapped[int] = mapped_column(Integer)
    sampler: Mapped[str] = mapped_column(String(50))
    spec: Mapped[dict] = mapped_column(JSON)  # the validated spec, as JSON
    spec_text: Mapped[str] = mapped_column(Text)  # the TOML file as written
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    cells: Mapped[list["Cell"]] = relationship(back_populates="campaign", order_by="Cell.id")


class Cell(Base):
    """One (batch size, optimizer, schedule) point; it owns one Optuna study."""

    __tablename__ = "bl_cells"
    __table_args__ = (UniqueConstraint("campaign_id", "batch_size", "optimizer", "schedule"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("bl_campaigns.id", ondelete="CASCADE"))
    batch_size: Mapped[int] = mapped_column(Integer)
    optimizer: Mapped[str] = mapped_column(String(50))
    schedule: Mapped[str] = mapped_column(String(50))
    study_name: Mapped[str] = mapped_column(String(300), unique=True)
    trials_planned: Mapped[int] = mapped_column(Integer)
    # Slots taken by running or finished trials; a worker claims one with a conditional
    # UPDATE (claimed < trials_planned), which is atomic on SQLite and PostgreSQL alike.
    trials_claimed: Mapped[int] = mapped_column(Integer, default=0)
    campaign: Mapped[Campaign] = relationship(back_populates="cells")


class Trial(Base):
    """One attempt at one trial. `outcome` is running, one of the finished outcomes
    (reached, not_reached, diverged, failed, pruned), or `abandoned`: its worker stopped
    or was lost, its measurements stay (marked by this outcome) and the same
    hyperparameters and seed run again as a new row (`attempt` + 1, `attempt_of`).
    A row claimed but not yet given its Optuna trial holds trial_number = -1."""

    __tablename__ = "bl_trials"
    __table_args__ = (Index("ix_bl_trials_cell_outcome", "cell_id", "outcome"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cell_id: Mapped[int] = mapped_column(ForeignKey("bl_cells.id", ondelete="CASCADE"))
    optuna_trial_id: Mapped[int] = mapped_column(Integer)
    trial_number: Mapped[int] = mapped_column(Integer)  # Optuna's number within the cell's study
    outcome: Mapped[str] = mapped_column(String(20), default="running")
    hparams: Mapped[dict] = mapped_column(JSON)
    config: Mapped[dict] = mapped_column(JSON)  # the resolved, frozen trial config
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)  # steps taken
    examples: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    wall_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    steps_to_result: Mapped[int | None] = mapped_column(Integer, nullable=True)
    examples_to_result: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    seconds_to_result: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_metric: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    worker_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    device: Mapped[str] = mapped_column(String(100), default="")
    host: Mapped[str] = mapped_column(String(200), default="")
    code_version: Mapped[str] = mapped_column(String(100), default="")
    package_versions: Mapped[dict] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Schema v2: crash recovery. The running worker's heartbeat (the database's clock, so
    # workers on machines with skewed clocks agree); a trial whose heartbeat is older than
    # the grace period is `abandoned` and re-run with the same hyperparameters and seed.
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # 1, 2, ...
    # The first attempt's bl_trials.id on re-runs of an abandoned trial; NULL on first attempts.
    attempt_of: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Schema v3: the trial's final weights (a torch state_dict file), when the campaign
    # keeps checkpoints; the path is as the worker saw it (a folder all machines share).
    checkpoint_path: Mapped[str | None] = mapped_column(String(1000), nullable=True)


class Measurement(Base):
    __tablename__ = "bl_measurements"
    __table_args__ = (UniqueConstraint("trial_id", "step"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("bl_trials.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    examples: Mapped[int] = mapped_column(BigInteger)
    epoch: Mapped[float] = mapped_column(Float)
    wall_seconds: Mapped[float] = mapped_column(Float)  # training time only
    eval_seconds: Mapped[float] = mapped_column(Float)  # cumulative evaluation time
    learning_rate: Mapped[float] = mapped_column(Float)
    batch_size: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_error: Mapped[float | None] = mapped_column(Float, nullable=True)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)  # probes: noise scale, norms, ...


class ProbeResult(Base):
    """Schema v3: one result of a probe run after training (`batchlab probe`): Keskar
    sharpness or Hessian eigenvalue/trace of one trial's final weights, or an
    interpolation between two trials (cell_id and trial_id NULL, both ids in params).
    `kind`: sharpness | hessian | interpolation; `params`: the probe's settings;
    `result`: its numbers (JSON)."""

    __tablename__ = "bl_probe_results"
    __table_args__ = (Index("ix_bl_probe_results_campaign_kind", "campaign_id", "kind"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("bl_campaigns.id", ondelete="CASCADE"))
    cell_id: Mapped[int | None] = mapped_column(ForeignKey("bl_cells.id", ondelete="CASCADE"), nullable=True)
    trial_id: Mapped[int | None] = mapped_column(ForeignKey("bl_trials.id", ondelete="CASCADE"), nullable=True)
    kind: Mapped[str] = mapped_column(String(50))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Worker(Base):
    __tablename__ = "bl_workers"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("bl_campaigns.id", ondelete="CASCADE"),
                                                    nullable=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # running | finished | stopped | lost (no heartbeat for the grace period)
    status: Mapped[str] = mapped_column(String(20), default="running")
    current_trial_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    trials_done: Mapped[int] = mapped_column(Integer, default=0)
    # The worker's --grace: reapers (other workers', `batchlab status`) wait at least this
    # long for its heartbeat before they call its trials lost. NULL: registered before v4.
    grace_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
