"""Crash recovery: heartbeats, the reaper of lost trials, and abandoning a trial.

Every running trial row has a heartbeat (`bl_trials.heartbeat_at`, written by a
background thread of its worker with the database's clock). A trial whose heartbeat is
older than the grace period lost its worker (kill -9, machine gone, network partition):
the reaper marks it `abandoned` with the reason, gives its cell slot back, tells Optuna
FAIL and enqueues the same hyperparameters (and seed) as the next attempt. Every worker
runs the reaper before it claims a slot (at most every min(2 s, grace / 4): a lost trial
waits out its grace period anyway); `batchlab status` runs it too.

Exactly once, two locks:
- batchlab's side: the conditional UPDATE `... SET outcome='abandoned' WHERE
  outcome='running' AND heartbeat_at < cutoff`; its winner alone gives the slot back, in
  the same transaction.
- Optuna's side: the RUNNING -> FAIL transition (Optuna checks the state under a row
  lock); its winner alone enqueues the re-run. The Optuna step is also swept from
  Optuna's trial table, so a reaper that dies between the two steps, or a worker that
  died between claiming a slot and writing its Optuna trial id, leaves nothing stuck.

This module imports no torch: `batchlab status` reaps without loading it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable, Mapping

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState
from sqlalchemy import DateTime, Engine, bindparam, case, func, select, text, update
from sqlalchemy.orm import Session

from db.engine import snapshot
from db.models import Cell, Trial, Worker
from study.retry import call_with_retry

Log = Callable[[str], None]

DEFAULT_HEARTBEAT_SECONDS = 10.0
DEFAULT_GRACE_SECONDS = 60.0
# User attributes of an enqueued re-run: which attempt, of which first row, with what seed.
ATTEMPT_ATTR, ATTEMPT_OF_ATTR, SEED_ATTR = "batchlab_attempt", "batchlab_attempt_of", "batchlab_seed"
# Why a WAITING trial of a complete campaign was failed without being run.
UNUSED_ATTR = "batchlab_unused"
FINISHED = ("reached", "not_reached", "diverged", "failed", "pruned")


def database_now(session_or_connection) -> datetime:
    """The database's clock: heartbeats and their cutoff use it, so workers on machines
    whose clocks disagree still agree on who is late. (SQLite: UTC, whole seconds.)"""
    return session_or_connection.execute(select(func.current_timestamp())).scalar_one()


# ----- heartbeats ------------------------------------------------------------------------
class Heartbeat:
    """A daemon thread that stamps the worker row and its running trial row every
    `interval_seconds`, each time in its own short transaction (never inside the
    trainer's), so a long evaluation does not look like a dead worker."""

    def __init__(self, engine: Engine, worker_id: str, interval_seconds: float, log: Log):
        self.engine, self.worker_id, self.interval, self.log = engine, worker_id, interval_seconds, log
        # Rows of the trials running in this worker (several when they train vectorized);
        # replaced as a whole by the worker, read by the heartbeat thread.
        self.trial_row_ids: frozenset[int] = frozenset()
        self._last_beat = float("-inf")  # time.monotonic() of the last beat that committed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{worker_id}", daemon=True)

    def start(self) -> None:
        self._last_beat = time.monotonic()  # the worker's row was just written
        self._thread.start()

    def fresh(self, within_seconds: float) -> bool:
        """Whether a beat (or the start) committed within the last `within_seconds`."""
        return time.monotonic() - self._last_beat < within_seconds

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        """One heartbeat now.

        Trial rows first, then the worker row: the order of every transaction that
        updates both (the worker marks trials started and finishes them on its storage
        thread). In the opposite order, PostgreSQL aborts one of two such transactions
        as a deadlock."""
        with Session(self.engine) as session, session.begin():
            rows = self.trial_row_ids
            if rows:
                # Only running rows: a trial reaped while this worker was cut off stays dead.
                session.execute(update(Trial).where(Trial.id.in_(rows), Trial.outcome == "running")
                                .values(heartbeat_at=func.current_timestamp()))
            # A worker marked lost while cut off from the database is back: running again.
            session.execute(update(Worker).where(Worker.id == self.worker_id)
                            .values(heartbeat_at=func.current_timestamp(),
                                    status=case((Worker.status == "lost", "running"), else_=Worker.status)))
        self._last_beat = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # a blip: the next beat retries; the reaper's grace covers it
                self.log(f"[worker {self.worker_id}] heartbeat failed: {type(exc).__name__}")


# ----- abandoning one trial -------------------------------------------------------------
def abandon_trial(engine: Engine, storage: optuna.storages.BaseStorage, trial_row_id: int,
                  reason: str, *, stale_before: datetime | None = None) -> bool:
    """Mark a running trial row `abandoned` with `reason`, give its slot back and queue the
    same hyperparameters again. With `stale_before`, only if its heartbeat is older.
    Returns whether this call did it (False: it had finished, or another reaper won)."""
    row = call_with_retry(lambda: _mark_abandoned(engine, trial_row_id, reason, stale_before),
                          what="abandoning a trial")
    if row is None:
        return False
    if row.optuna_trial_id >= 0:
        call_with_retry(lambda: requeue(storage, row.optuna_trial_id, row.study_name,
                                        first_row_id=row.attempt_of or row.id, attempt=row.attempt,
                                        seed=row.seed),
                        what="re-queueing an abandoned trial")
    return True


_RERUNS_PENDING = text("""
SELECT COALESCE(r.attempt_of, r.id), r.attempt + 1 FROM bl_trials r
WHERE r.cell_id = :cell_id AND r.outcome = 'abandoned' AND r.optuna_trial_id >= 0
  AND NOT EXISTS (SELECT 1 FROM bl_trials s
                  WHERE s.attempt_of = COALESCE(r.attempt_of, r.id) AND s.attempt = r.attempt + 1)
""")


def rerun_pending(engine: Engine, cell_id: int, asked: Iterable[Mapping] = ()) -> bool:
    """Whether an abandoned attempt of this cell has no re-run row yet: its point is being
    re-queued (`abandon_trial` gives the slot back first), or is queued and not yet asked.
    `asked`: the user attributes of points the caller has popped and not recorded yet;
    the re-runs among them are not pending."""
    taken = {(attrs.get(ATTEMPT_OF_ATTR), attrs.get(ATTEMPT_ATTR)) for attrs in asked}
    with engine.connect() as connection:
        return any((first, attempt) not in taken for first, attempt in
                   connection.execute(_RERUNS_PENDING, {"cell_id": cell_id}))


def _mark_abandoned(engine: Engine, trial_row_id: int, reason: str, stale_before: datetime | None):
    conditions = [Trial.id == trial_row_id, Trial.outcome == "running"]
    if stale_before is not None:
        conditions.append(Trial.heartbeat_at < stale_before)
    with Session(engine) as session, session.begin():
        won = session.execute(update(Trial).where(*conditions).values(
            outcome="abandoned", message=reason, finished_at=func.current_timestamp())).rowcount
        if won != 1:
            return None
        row = session.execute(
            select(Trial.id, Trial.cell_id, Trial.optuna_trial_id, Trial.seed, Trial.attempt,
                   Trial.attempt_of, Cell.study_name)
            .join(Cell, Cell.id == Trial.cell_id).where(Trial.id == trial_row_id)).one()
        # The same transaction gives the slot back: a cell never loses or gains one.
        session.execute(update(Cell).where(Cell.id == row.cell_id)
                        .values(trials_claimed=Cell.trials_claimed - 1))
        return row


def requeue(storage: optuna.storages.BaseStorage, optuna_trial_id: int, study_name: str, *,
            first_row_id: int | None, attempt: int, seed: int | None) -> bool:
    """Fail the Optuna trial and enqueue its parameters as attempt `attempt` + 1, if this
    call is the one that moved it from RUNNING to FAIL (returns whether it was)."""
    frozen = storage.get_trial(optuna_trial_id)
    try:
        if not storage.set_trial_state_values(optuna_trial_id, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False  # another reaper (or the sweep) got here first
    if not frozen.params:
        return True  # an ask that drew no point (not batchlab's): nothing to run again
    # A trial that never got its row still carries its attempt's attributes in Optuna.
    first_row_id = first_row_id if first_row_id is not None else frozen.user_attrs.get(ATTEMPT_OF_ATTR)
    seed = seed if seed is not None else frozen.user_attrs.get(SEED_ATTR)
    attrs = {ATTEMPT_ATTR: attempt + 1}
    if first_row_id is not None:
        attrs[ATTEMPT_OF_ATTR] = first_row_id
    if seed is not None:
        attrs[SEED_ATTR] = seed
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    study.enqueue_trial(dict(frozen.params), user_attrs=attrs, skip_if_exists=False)
    return True


# ----- the reaper ----------------------------------------------------------------------
@dataclass(frozen=True)
class Reaped:
    trial_row_id: int
    worker_id: str | None
    silent_seconds: float


def reap_lost_trials(engine: Engine, storage: optuna.storages.BaseStorage, campaign_id: int,
                     grace_seconds: float, log: Log | None = None) -> list[Reaped]:
    """Abandon every running trial of the campaign whose heartbeat is older than its
    grace period, mark silent workers `lost`, and settle Optuna trials left RUNNING by a
    death between two steps. A trial's grace period is the longer of `grace_seconds` and
    its worker's own (`bl_workers.grace_seconds`, its --grace): a reaper started with a
    shorter one (`batchlab status`, another worker) does not take a live worker's trials.
    Cheap when nothing is late: two indexed queries."""
    # Settle first: an unrecorded ask of a dead worker is re-queued before the slots of
    # the rows abandoned below are given back, so their re-runs can draw it.
    settle_optuna_trials(engine, storage, campaign_id, grace_seconds)
    now, stale = call_with_retry(lambda: _stale_trials(engine, campaign_id, grace_seconds),
                                 what="looking for lost trials")
    reaped = []
    for row in stale:
        silent = (_utc(now) - _utc(row.heartbeat_at)).total_seconds()
        grace = max(grace_seconds, row.worker_grace or 0.0)
        if silent <= grace:
            continue  # its worker waits longer than this reaper would
        reason = f"worker {row.worker_id} lost: no heartbeat for {silent:.0f} s"
        if abandon_trial(engine, storage, row.id, reason, stale_before=now - timedelta(seconds=grace)):
            reaped.append(Reaped(row.id, row.worker_id, silent))
            if log is not None:
                log(f"reaper: trial row {row.id} abandoned ({reason}); it will be re-run")
    call_with_retry(lambda: _mark_workers_lost(engine, campaign_id, now, grace_seconds),
                    what="marking lost workers")
    return reaped


def _stale_trials(engine: Engine, campaign_id: int, grace_seconds: float):
    """The database's now, and the campaign's running trials silent for `grace_seconds`
    at least, with their worker's own grace (None if it has no row or none stored)."""
    with Session(engine) as session:
        now = database_now(session)
        cutoff = now - timedelta(seconds=grace_seconds)
        rows = session.execute(
            select(Trial.id, Trial.worker_id, Trial.heartbeat_at, Worker.grace_seconds.label("worker_grace"))
            .join(Cell, Cell.id == Trial.cell_id).outerjoin(Worker, Worker.id == Trial.worker_id)
            .where(Cell.campaign_id == campaign_id, Trial.outcome == "running",
                   Trial.heartbeat_at < cutoff).order_by(Trial.id)).all()
        return now, rows


def _mark_workers_lost(engine: Engine, campaign_id: int, now: datetime, grace_seconds: float) -> None:
    """Running workers silent for longer than their grace (the longer of theirs and
    `grace_seconds`) become `lost`."""
    cutoff = now - timedelta(seconds=grace_seconds)
    with Session(engine) as session, session.begin():
        silent = session.execute(select(Worker.id, Worker.grace_seconds).where(
            Worker.campaign_id == campaign_id, Worker.status == "running", Worker.heartbeat_at < cutoff)).all()
        for worker_id, own in silent:
            session.execute(update(Worker).where(
                Worker.id == worker_id, Worker.status == "running",
                Worker.heartbeat_at < now - timedelta(seconds=max(grace_seconds, own or 0.0)))
                .values(status="lost"))


# Optuna's own tables (trials, studies: stable since Optuna 1.x), joined to batchlab's.
_RUNNING_OPTUNA_TRIALS = text("""
SELECT t.trial_id, c.id AS cell_id, s.study_name, b.id AS row_id, b.outcome,
       b.steps_to_result, b.attempt, b.attempt_of, b.seed
FROM trials t
JOIN studies s ON s.study_id = t.study_id
JOIN bl_cells c ON c.study_name = s.study_name
LEFT JOIN bl_trials b ON b.optuna_trial_id = t.trial_id
WHERE c.campaign_id = :campaign_id AND t.state = 'RUNNING'
  AND (b.id IS NULL OR (b.outcome <> 'running' AND b.finished_at < :cutoff))
""").bindparams(bindparam("cutoff", type_=DateTime(timezone=True)))
_WAITING_OPTUNA_TRIALS = text("""
SELECT t.trial_id FROM trials t
JOIN studies s ON s.study_id = t.study_id
JOIN bl_cells c ON c.study_name = s.study_name
WHERE c.campaign_id = :campaign_id AND t.state = 'WAITING'
""")


def settle_optuna_trials(engine: Engine, storage: optuna.storages.BaseStorage, campaign_id: int,
                         grace_seconds: float) -> int:
    """Optuna trials still RUNNING whose batchlab row is finished or abandoned (their worker
    died between two steps), or that no row names in a cell where no live worker is
    between asking Optuna and recording the trial (theirs died there): tell the recorded
    outcome, or fail them and enqueue their parameters again. Returns how many were
    settled."""
    rows, asking = call_with_retry(lambda: _unsettled(engine, campaign_id, grace_seconds),
                                   what="sweeping Optuna trials")
    settled = 0
    for row in rows:
        if row.row_id is None and row.cell_id in asking:
            continue  # perhaps a live worker's ask, on its way to the worker's row
        settled += call_with_retry(lambda: _settle(storage, row), what="settling an Optuna trial")
    return settled


def _unsettled(engine: Engine, campaign_id: int, grace_seconds: float):
    """The RUNNING Optuna trials to settle, and the cells where a live worker holds a
    claimed row it has not recorded an Optuna trial in, both read in one snapshot.

    A worker commits its claimed rows before it asks Optuna and names the trial in its row
    after: so an Optuna trial no row names, seen in the same snapshot as no such row of a
    live worker in its cell (heartbeat within the longer of `grace_seconds` and the
    worker's own grace, on the database's clock), is an orphan. (Optuna's datetime_start
    is the asking machine's local time, which says nothing to a reaper elsewhere.) A row
    finished or abandoned within the grace period is left to its own worker (or reaper),
    which tells Optuna in its next step."""
    with snapshot(engine) as connection:
        now = database_now(connection)
        cutoff = now - timedelta(seconds=grace_seconds)
        rows = connection.execute(_RUNNING_OPTUNA_TRIALS, {"campaign_id": campaign_id,
                                                           "cutoff": cutoff}).all()
        claims = connection.execute(
            select(Trial.cell_id, Trial.heartbeat_at, Worker.grace_seconds)
            .join(Cell, Cell.id == Trial.cell_id).outerjoin(Worker, Worker.id == Trial.worker_id)
            .where(Cell.campaign_id == campaign_id, Trial.outcome == "running",
                   Trial.optuna_trial_id < 0)).all() if any(r.row_id is None for r in rows) else []
    asking = {claim.cell_id for claim in claims if claim.heartbeat_at is not None
              and (_utc(now) - _utc(claim.heartbeat_at)).total_seconds()
              <= max(grace_seconds, claim.grace_seconds or 0.0)}
    return rows, asking


def _settle(storage: optuna.storages.BaseStorage, row) -> bool:
    if row.outcome in FINISHED:
        state, values = _optuna_state(row.outcome, row.steps_to_result)
        try:
            return storage.set_trial_state_values(row.trial_id, state, values)
        except UpdateFinishedTrialError:
            return False
    # abandoned, or never recorded: re-run the same point
    if row.row_id is None:
        # Never recorded, so never run: queued again as the same attempt (its number is in
        # Optuna's attributes), as a worker gives back a point it popped and did not
        # record. The abandoned attempt it re-runs, if any, still waits for a row with
        # that number (`rerun_pending`).
        attempt = int(storage.get_trial(row.trial_id).user_attrs.get(ATTEMPT_ATTR, 1))
        return requeue(storage, row.trial_id, row.study_name, first_row_id=None, attempt=attempt - 1,
                       seed=None)
    return requeue(storage, row.trial_id, row.study_name, first_row_id=row.attempt_of or row.row_id,
                   attempt=row.attempt, seed=row.seed)


def _optuna_state(outcome: str, steps_to_result: int | None):
    # The same mapping as study.tuning.tell.
    if outcome == "reached":
        return TrialState.COMPLETE, [float(steps_to_result)]
    if outcome in ("pruned", "not_reached"):
        return TrialState.PRUNED, None
    return TrialState.FAIL, None


def _utc(moment: datetime) -> datetime:
    # PostgreSQL returns aware datetimes, SQLite naive ones (in UTC): compare them as naive UTC.
    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo else moment


def fail_orphaned_asks(engine: Engine, storage: optuna.storages.BaseStorage, campaign_id: int) -> int:
    """Once the campaign is complete (no free slot, no running row: nothing can claim, ask
    or abandon any more), settle what no worker will ever ask or train:

    - Optuna trials still RUNNING that no row names: an ask whose commit went through but
      whose acknowledgement was lost (a database restart) and that was retried;
    - Optuna trials still WAITING: a point re-queued (by a reaper, or by the sweep of an
      ask whose worker died before recording it) after its cell's last slot had already
      been re-claimed and asked, so that re-run drew a fresh point from the sampler.

    Every cell has its trials: these are failed, not re-queued (a WAITING one is tagged
    `batchlab_unused`). Returns how many."""
    def leftovers():
        with Session(engine) as session:
            free, running = session.execute(
                select(func.coalesce(func.sum(Cell.trials_planned - Cell.trials_claimed), 0),
                       select(func.count(Trial.id)).join(Cell, Cell.id == Trial.cell_id)
                       .where(Cell.campaign_id == campaign_id, Trial.outcome == "running")
                       .scalar_subquery())
                .where(Cell.campaign_id == campaign_id)).one()
            if free or running:
                return [], []
            cutoff = database_now(session)
            orphans = [row.trial_id for row in session.execute(
                _RUNNING_OPTUNA_TRIALS, {"campaign_id": campaign_id, "cutoff": cutoff}).all()
                if row.row_id is None]
            waiting = session.execute(_WAITING_OPTUNA_TRIALS, {"campaign_id": campaign_id}).scalars().all()
            return orphans, list(waiting)

    def fail(trial_id: int, tag: str | None) -> bool:
        try:
            if tag is not None:
                storage.set_trial_user_attr(trial_id, UNUSED_ATTR, tag)
            return bool(storage.set_trial_state_values(trial_id, TrialState.FAIL))
        except UpdateFinishedTrialError:
            return False  # another worker's sweep got here first

    orphans, waiting = call_with_retry(leftovers, what="looking for orphaned Optuna trials")
    failed = 0
    for trial_id in orphans:
        failed += call_with_retry(lambda: fail(trial_id, None), what="failing an orphaned Optuna trial")
    for trial_id in waiting:
        failed += call_with_retry(lambda: fail(trial_id, "re-queued after its cell's last slot was asked"),
                                  what="failing a stranded Optuna trial")
    return failed
