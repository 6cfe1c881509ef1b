"""The worker loop: claim a slot in the cell that most needs a trial, ask its study,
train, stream measurements to SQL, tell the study; until every cell has its trials.

Any number of workers, on any machines, may share one storage URL. Each heartbeats
(study/recovery.py), reaps the trials of lost workers before it claims a slot (at most
every `reap_seconds`), and retries its short transactions with backoff when the database
blips (study/retry.py).

Storage stays off the training's critical path (study/pipeline.py): one storage thread
runs the worker's storage jobs in order while the main thread trains. While group i
trains, it writes group i-1's last measurements, finishes its rows and tells Optuna (one
transaction per trial where the points were enqueued), then reaps, claims the next slots
and (quasi-random / random samplers, whose points are all enqueued at creation) asks and
records their trials; prefetched rows are heartbeated like running ones, and so are
the rows of concluded trials until their finish job has run. A stop gives a
prefetched slot that never trained back (row deleted, point re-queued as the same attempt
with the same seed) and abandons the trials in training as before. Pruning reads the
cell's best from a cache (see CellBest).
"""
from __future__ import annotations

import os
import signal
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import optuna
from sqlalchemy import Engine, Row, bindparam, delete, func, insert, select, update
from sqlalchemy.orm import Session

from db.models import (IMPORTED_SAMPLER, Campaign, Cell, Measurement as MeasurementRow, Trial, Worker,
                       utcnow)
from db.schema import ensure_schema
from study.errors import CampaignNotFound
from study import provenance
from study.distributed import announce, launched_ranks
from study.pipeline import CellBest, MeasurementBuffer, StorageJobError, StoragePipeline
from study.recovery import (ATTEMPT_ATTR, ATTEMPT_OF_ATTR, DEFAULT_GRACE_SECONDS,
                            DEFAULT_HEARTBEAT_SECONDS, SEED_ATTR, Heartbeat, abandon_trial,
                            fail_orphaned_asks, reap_lost_trials, requeue, rerun_pending)
from study.retry import call_with_retry
from study.resolve import resolve_trial_config, with_checkpoint
from study.spec import Param, parse_spec
from study.tuning import (Asked, ask_queued, distributions, draw, hparams_from_optuna, make_sampler,
                          optuna_storage, sampler_seed, tell)
from trainers.config import Measurement, TrialConfig, TrialResult
from trainers.loop import DataCache, resolve_device, run_trial
from trainers.workloads import DataOptions, get_workload

Log = Callable[[str], None]


class Interrupted(Exception):
    """SIGTERM or Ctrl-C: the current trial is abandoned and its slot given back."""


@dataclass(frozen=True)
class Claim:
    cell_id: int
    batch_size: int
    optimizer: str
    schedule: str
    study_name: str
    row_id: int  # the bl_trials row inserted with the claim (trial_number -1 until asked)


def load_campaign(engine: Engine, name: str) -> Campaign:
    with Session(engine) as session:
        campaign = session.scalar(select(Campaign).where(Campaign.name == name))
        if campaign is None:
            known = session.scalars(select(Campaign.name)).all()
            hint = f"; known campaigns: {', '.join(known)}" if known else "; create it first"
            raise CampaignNotFound(f"no campaign named {name!r}{hint}")
        session.expunge(campaign)
        return campaign


# The statements of the per-trial transactions, built once: SQLAlchemy then only binds
# their parameters (building them at each call was a third of the storage thread's CPU
# per trial). The parameters that name columns make the SET clause.
_CELLS, _TRIALS, _WORKERS = Cell.__table__, Trial.__table__, Worker.__table__
_MEASUREMENTS = MeasurementRow.__table__
_FREE_CELLS = (select(_CELLS.c.id, _CELLS.c.batch_size, _CELLS.c.optimizer, _CELLS.c.schedule,
                      _CELLS.c.study_name)
               .where(_CELLS.c.campaign_id == bindparam("campaign_id"),
                      _CELLS.c.trials_claimed < _CELLS.c.trials_planned)
               .order_by(_CELLS.c.trials_claimed, _CELLS.c.id))
_CAMPAIGN_CELLS = select(_CELLS.c.id, _CELLS.c.batch_size, _CELLS.c.optimizer, _CELLS.c.schedule).where(
    _CELLS.c.campaign_id == bindparam("campaign_id"))
_LOCK_CELL = (select(_CELLS.c.trials_claimed, _CELLS.c.trials_planned)
              .where(_CELLS.c.id == bindparam("cell_id")).with_for_update())
_TAKE_SLOTS = (update(_CELLS).where(_CELLS.c.id == bindparam("cell_id"))
               .values(trials_claimed=_CELLS.c.trials_claimed + bindparam("taken")))
_NEW_ROWS = (insert(_TRIALS).values(heartbeat_at=func.current_timestamp())
             .returning(_TRIALS.c.id, sort_by_parameter_order=True))
_RUNNING_ROW = (_TRIALS.c.id == bindparam("row_id")) & (_TRIALS.c.outcome == "running")
_RECORD_TRIAL = update(_TRIALS).where(_RUNNING_ROW).values(heartbeat_at=func.current_timestamp())
_FINISH_TRIAL = update(_TRIALS).where(_RUNNING_ROW).values(finished_at=func.current_timestamp())
_MARK_STARTED = update(_TRIALS).where(_TRIALS.c.id.in_(bindparam("row_ids", expanding=True)),
                                      _TRIALS.c.outcome == "running")
_BEAT_WORKER = (update(_WORKERS).where(_WORKERS.c.id == bindparam("worker"))
                .values(heartbeat_at=func.current_timestamp()))
_FINISH_WORKER = _BEAT_WORKER.values(current_trial_id=None,
                                     trials_done=_WORKERS.c.trials_done + bindparam("finished"))


def claim_cell(engine: Engine, campaign_id: int, worker_id: str,
               count: int | Callable[[Row], int] = 1) -> list[Claim]:
    """Take up to `count` trial slots in the cell with the fewest slots taken (finished +
    running), and insert their trial rows, heartbeating, in the same transaction; empty
    when every cell's slots are taken. `count` may depend on the cell: a function of its
    row (id, batch_size, optimizer, schedule, study_name).

    The cell's row is locked while its count is read and raised (FOR UPDATE on
    PostgreSQL; SQLite's writers take the database lock at BEGIN): of two workers racing
    for a cell's last slot, exactly one gets it. The rows come with the slots so that a
    worker killed before it has asked Optuna still leaves rows for the reaper to find."""
    with engine.connect() as connection:
        cells = connection.execute(_FREE_CELLS, {"campaign_id": campaign_id}).all()
    for cell in cells:
        row_ids = _take_slots(engine, cell.id, worker_id, count(cell) if callable(count) else count)
        if row_ids:
            return [Claim(*cell, row_id=row_id) for row_id in row_ids]
    return []


def _take_slots(engine: Engine, cell_id: int, worker_id: str, count: int) -> list[int]:
    """Up to `count` free slots of the cell and their running trial rows (trial_number -1
    until asked)."""
    with engine.begin() as connection:
        claimed, planned = connection.execute(_LOCK_CELL, {"cell_id": cell_id}).one()
        taken = min(count, planned - claimed)
        if taken <= 0:
            return []
        connection.execute(_TAKE_SLOTS, {"cell_id": cell_id, "taken": taken})
        rows = [dict(cell_id=cell_id, optuna_trial_id=-1, trial_number=-1, outcome="running",
                     hparams={}, config={}, seed=0, worker_id=worker_id)] * taken
        return list(connection.scalars(_NEW_ROWS, rows))


def running_trials(engine: Engine, campaign_id: int) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count(Trial.id)).join(Cell, Cell.id == Trial.cell_id)
                              .where(Cell.campaign_id == campaign_id, Trial.outcome == "running"))


def best_steps(engine: Engine, cell_id: int) -> int | None:
    with Session(engine) as session:
        return session.scalar(select(func.min(Trial.steps_to_result))
                              .where(Trial.cell_id == cell_id, Trial.outcome == "reached"))


# `trials_at_once="auto"` (the command line's default): on CUDA, each cell's K from
# trainers.vectorized.auto_k (the device's free memory and the workload), decided when
# the worker starts; on CPU one trial at a time, which keeps every trial's measurements
# bit for bit those of `run_trial` for its seed (a number stacks trials there too).
AUTO = "auto"


def trial_seed(campaign_seed: int, trial_number: int) -> int:
    return (campaign_seed * 1_000_003 + trial_number) % (2 ** 31)


@dataclass(frozen=True)
class Attempt:
    """Which attempt an asked Optuna trial is: a re-run of an abandoned trial carries its
    attempt number, first row and seed as user attributes (study.recovery.requeue)."""
    number: int
    first_row_id: int | None
    seed: int

    @classmethod
    def of(cls, trial: Asked, campaign_seed: int) -> "Attempt":
        attrs = trial.user_attrs
        return cls(int(attrs.get(ATTEMPT_ATTR, 1)), attrs.get(ATTEMPT_OF_ATTR),
                   int(attrs.get(SEED_ATTR, trial_seed(campaign_seed, trial.number))))


@dataclass
class Live:
    """A row this worker claimed and has not yet handed its result to the pipeline: what a
    stop must undo. `training` once the trainer has it (a stop abandons it); before that
    (prefetched) a stop gives the slot and the point back as if never claimed."""
    claim: Claim
    trial: Asked | None = None
    recorded: bool = False
    training: bool = False


@dataclass
class Group:
    """Slots of one cell claimed together, and the trials asked and recorded in them."""
    claims: list[Claim]
    started: list = field(default_factory=list)  # (claim, trial, config)
    asked: bool = False


class CampaignWorker:
    """One worker process's loop over a campaign.

    `heartbeat_seconds`: how often the worker stamps its rows; `grace_seconds`: how long
    another worker's silence lasts before its trial is abandoned and re-run. Keep the
    grace several heartbeats long (and longer than a database restart takes).

    Storage runs beside training (study/pipeline.py): while a group of trials trains, one
    background thread finishes and tells the previous group, reaps, claims the next slot
    and (for samplers whose points are enqueued at creation) asks and records its trial;
    measurements are written in batches at most `flush_seconds` apart, always before
    their trial is finished; the cell's best steps for pruning is re-read at most every
    `best_refresh_seconds` (this worker's own results count once recorded, which the
    next pruning decision in their cell waits for)."""

    def __init__(self, engine: Engine, storage_url: str, campaign_name: str, *,
                 device: str = "auto", max_trials: int | None = None, log: Log = print,
                 heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
                 grace_seconds: float = DEFAULT_GRACE_SECONDS, trials_at_once: int | str = 1,
                 compile: bool | None = None,
                 flush_seconds: float = 1.0, best_refresh_seconds: float = 1.0):
        if not 0 < heartbeat_seconds < grace_seconds:
            raise ValueError(f"heartbeat ({heartbeat_seconds} s) must be > 0 and shorter than "
                             f"the grace period ({grace_seconds} s)")
        if trials_at_once != AUTO and not (isinstance(trials_at_once, int) and trials_at_once >= 1):
            raise ValueError(f"trials_at_once must be a number >= 1 or {AUTO!r}, got {trials_at_once!r}")
        self.engine, self.storage_url, self.log = engine, storage_url, log
        ensure_schema(engine)  # upgrades a database made by an older batchlab
        self.campaign = load_campaign(engine, campaign_name)
        if self.campaign.sampler == IMPORTED_SAMPLER:
            raise CampaignNotFound(f"campaign {campaign_name!r} holds imported published data; "
                                   f"it has no trials to run (use results, analyze or the dashboard)")
        self.spec = parse_spec(self.campaign.spec_text, f"campaign {campaign_name}")
        self.device = resolve_device(device)
        self._device_name = _device_name(self.device)
        self.max_trials = max_trials
        self.worker_id = uuid.uuid4().hex[:12]
        self.data = DataCache()
        self.storage = optuna_storage(storage_url)
        self.grace_seconds = grace_seconds
        self.heartbeat = Heartbeat(engine, self.worker_id, heartbeat_seconds, log)
        # Beats this recent keep the stamped rows far from any reaper (see _best): one
        # late beat is no outage, and a reaper waits at least this worker's grace.
        self.fresh_seconds = min(2 * heartbeat_seconds, grace_seconds / 2)
        self.stop_requested = False
        # Trials of one cell trained together (trainers.vectorized); 1: one at a time;
        # AUTO: per cell, decided when the run starts (`_cell_k`, cell id -> K).
        self.trials_at_once = trials_at_once
        self._default_k = 1 if trials_at_once == AUTO else trials_at_once
        self._cell_k: dict[int, int] = {}
        self.step_cache: dict = {}  # compiled vectorized steps, reused across groups
        self.compile = compile  # run_trials_vectorized's: None tiered on CUDA, True, False
        self._studies: dict[str, optuna.Study] = {}  # the cells' studies, loaded once
        self.ranks = launched_ranks()  # under torchrun, this is rank 0: it leads the others
        # Quasi-random and random points are all enqueued at creation: asking for the next
        # one does not depend on the results not yet told, so it is prefetched. TPE's
        # next point depends on its cell's results: it is prefetched only when every trial
        # this worker trained in that cell is told (the worker moves from cell to cell, so
        # that is the rule), else asked once they are.
        self.points_enqueued = self.spec.sampler != "tpe"
        self.best = CellBest(best_refresh_seconds)
        self.measurements = MeasurementBuffer(flush_seconds)
        self.pipeline: StoragePipeline | None = None
        self._live: dict[int, Live] = {}  # row id -> what a stop must undo
        # Rows of trials concluded in training whose finish job has not run yet: no longer
        # the stop's to undo, still running in storage, so still heartbeated.
        self._unfinished: set[int] = set()
        self._live_lock = threading.Lock()  # the main and the storage thread both change them
        self._finishing: list = []  # futures of finish + tell jobs: True if the trial counts
        self._done = 0
        self._untold: Counter = Counter()  # cell id -> this worker's trials trained, not yet told
        # The reaper runs before a claim, at most this often: a lost trial waits out its
        # grace period anyway, so reaping before every short trial only costs queries.
        self.reap_seconds = min(2.0, grace_seconds / 4)
        self._reaped_at = float("-inf")
        # The process's provenance (git, package versions) is the same for every trial:
        # computed once here, not on the first trial's way.
        provenance.code_version(), provenance.package_versions()

    # ----- the loop (main thread) -----------------------------------------------------
    def run(self) -> int:
        """Run trials until the campaign has all its trials (or `max_trials` are done);
        returns the number of trials this worker finished. On SIGTERM it abandons its
        trials (re-queued for another worker), returns, and `stop_requested` is set. While
        no slot is free but trials still run elsewhere, it waits: one of them may be lost
        and need a re-run."""
        # Load the data before claiming anything: a missing file is the user's to fix,
        # and no trial should be spent finding that out.
        workload = get_workload(self.spec.workload)
        self.data.load(workload, DataOptions.of(self.spec), self.device)
        self._cell_k = self._retry(self._trials_at_once_per_cell, "reading the campaign's cells")
        self._retry(self._register, "registering the worker")
        self.heartbeat.start()
        self.pipeline = StoragePipeline(self.worker_id)
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM,)}
        interrupted = False
        try:
            try:
                self._loop()
                self._drain()
            except (Interrupted, KeyboardInterrupt) as exc:
                interrupted = True  # SIGTERM, or Ctrl-C (which stop_requested does not see)
                self._stop_all()
                if not isinstance(exc, Interrupted):
                    raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.pipeline.close()
            self.heartbeat.stop()
            if self.ranks is not None:
                announce(None)  # the other ranks exit with this one
            self._retry(lambda: self._set_status("stopped" if interrupted or self.stop_requested else "finished"),
                        "recording the worker's status")
        return self._done

    def _loop(self) -> None:
        # One group is prepared ahead (claimed, and asked where the sampler allows) while
        # the current one trains. More ahead would only hoard slots other workers could
        # take: bench/overhead.py measured the same share of run() with three single
        # trials ahead as with one.
        upcoming = None
        while True:
            self._collect()
            group = self._wait(upcoming) if upcoming is not None else None
            upcoming = None
            if group is None:  # nothing prefetched (first group, or no slot free then)
                group = self._claim_waiting()
                if group is None:
                    return
            if not group.asked:  # asked now, after the previous trials were told
                self._wait(self.pipeline.submit("asking Optuna", self._ask_group, group))
            if not group.started:
                continue  # every slot was reaped before its trial was recorded
            self._begin(group)
            room = self._room()
            if room > 0:
                upcoming = self.pipeline.submit("preparing the next trials", self._prepare, room)
            self._run_group(group)

    def _trials_at_once_per_cell(self) -> dict[int, int]:
        """Cell id -> how many of its trials this worker trains at once, where that is not
        `_default_k` (AUTO on a single CUDA device)."""
        if self.trials_at_once != AUTO or self.device.type != "cuda" or self.ranks is not None:
            return {}
        with self.engine.connect() as connection:
            cells = connection.execute(_CAMPAIGN_CELLS, {"campaign_id": self.campaign.id}).all()
        from trainers.vectorized import auto_k
        ks = {}
        for cell in cells:
            probe = resolve_trial_config(self.spec, batch_size=cell.batch_size, optimizer=cell.optimizer,
                                         schedule=cell.schedule, hparams={"learning_rate": 1.0}, seed=0,
                                         device=str(self.device))
            ks[cell.id] = auto_k(with_checkpoint(self.spec, probe, 0), self.data)
        chosen = sorted({(cell.batch_size, cell.optimizer, ks[cell.id]) for cell in cells})
        self.log(f"[worker {self.worker_id}] trials at once (auto, {self._device_name}): "
                 + ", ".join(f"B={b} {o} {k}" for b, o, k in chosen))
        return ks

    def _room(self) -> int:
        """How many more slots this worker may claim now: its largest K, less what
        max_trials leaves once the trials done and in flight (claimed, not settled) count."""
        most = max(self._cell_k.values(), default=self._default_k)
        if self.max_trials is None:
            return most
        with self._live_lock:
            in_flight = len(self._live)
        return min(most, self.max_trials - self._done - in_flight - len(self._finishing))

    def _claim_waiting(self) -> Group | None:
        """Claim a group in this thread, waiting while no slot is free but trials still run
        elsewhere; None when every slot is finished (or max_trials are done)."""
        self._drain()  # this worker's own finishes first: they free nothing, but count
        poll_seconds = min(2.0, self.grace_seconds / 4)
        while True:
            room = self._room()
            if room <= 0:
                return None
            group = self._claim_group(room)
            if group is not None:
                return group
            if self._retry(lambda: running_trials(self.engine, self.campaign.id), "counting trials") == 0:
                fail_orphaned_asks(self.engine, self.storage, self.campaign.id)
                return None  # every slot is finished
            time.sleep(poll_seconds)

    def _begin(self, group: Group) -> None:
        rows = [claim.row_id for claim, *_ in group.started]
        with self._live_lock:
            for row_id in rows:
                self._live[row_id].training = True
            self._untold[group.claims[0].cell_id] += len(rows)
        self.pipeline.submit("marking the trials started", self._mark_started, rows, utcnow())

    def _run_group(self, group: Group) -> None:
        configs = [config for *_, config in group.started]
        results = self._train([claim for claim, *_ in group.started], configs,
                              lambda index, result: self._conclude(group.started[index], result))
        for index, result in results.items():  # trials the trainer did not conclude (a crash)
            self._conclude(group.started[index], result)

    def _conclude(self, entry, result: TrialResult) -> None:
        """Hand a trial's result to the pipeline: its last measurements, its row and the
        tell are written behind the next trial's training, in that order."""
        claim, trial, _ = entry
        rows = self.measurements.take()
        with self._live_lock:  # heartbeated until its finish job has run
            self._unfinished.add(claim.row_id)
        finished = self.pipeline.submit("finishing the trial", self._finish_and_tell, claim, trial, result, rows)
        self._finishing.append(finished)
        if result.outcome == "reached":  # counts for pruning once recorded (see _best)
            self.best.reached(claim.cell_id, result.steps_to_result, finished)
        self._untrack(claim.row_id)

    def _buffer_measurement(self, row_id: int, m: Measurement) -> None:
        batch = self.measurements.add(_measurement_row(row_id, m))
        if batch:
            self.pipeline.submit("writing measurements", self._write_measurements, batch)

    def _best(self, cell_id: int) -> int | None:
        """The cell's best steps for pruning: cached; a stale value is refreshed in the
        background and this evaluation uses the cached one.

        This worker's own reached results count at once while its heartbeats get through
        (a beat committed within `fresh_seconds`): the rows of its concluded trials are
        stamped until their finish jobs have run, so a reaper could take one only if the
        beats then stopped for a whole grace period before that job ran. When the beats
        are failing (the worker is cut off from the database), a reaper may take such a
        row, and its result then never counts: a trial pruned against it would be
        censored where the cell has no such result. Then an own result that would lower
        the best is waited for until its finish job says whether it was recorded. (Always
        waiting would make the training thread wait behind the storage thread's claims
        and asks: about one point more storage share at K = 8.)"""
        if self.best.claim_refresh(cell_id):
            self.pipeline.submit("reading the cell's best", self._refresh_best, cell_id)
        if self.heartbeat.fresh(self.fresh_seconds):
            return self.best.value(cell_id, unrecorded=True)
        for recorded in self.best.unrecorded(cell_id):
            self._wait(recorded)
        return self.best.value(cell_id)

    def _wait(self, future):
        return self.pipeline.wait(future)

    def _drain(self) -> None:
        self.pipeline.drain()
        self._collect()

    def _collect(self) -> None:
        """Count the finishes the storage thread has settled."""
        self.pipeline.raise_failures()
        still = []
        for future in self._finishing:
            if future.done():
                self._done += bool(future.result())
            else:
                still.append(future)
        self._finishing = still

    def _stop_all(self) -> None:
        """SIGTERM / Ctrl-C: keep what was measured and finished, then abandon the trials
        in training and give back the prefetched ones."""
        rows = self.measurements.take()
        if rows:  # written before their trial is abandoned, never after
            self.pipeline.submit("writing measurements", self._write_measurements, rows)
        self.pipeline.settle(self.log)
        for future in self._finishing:
            self._done += bool(future.exception() is None and future.result())
        self._finishing = []
        with self._live_lock:
            live = list(self._live.values())
        for entry in live:
            if entry.training:
                self._abandon(entry.claim, entry.trial, entry.recorded)
            else:
                self._give_back(entry.claim, entry.trial)
            self._untrack(entry.claim.row_id)

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        raise Interrupted(f"signal {signum}")

    def _retry(self, operation, what: str):
        return call_with_retry(operation, what=what, log=self.log)

    def _track(self, claim: Claim) -> None:
        with self._live_lock:
            self._live[claim.row_id] = Live(claim)
            self._beat_rows()

    def _untrack(self, row_id: int) -> None:
        with self._live_lock:
            self._live.pop(row_id, None)
            self._beat_rows()

    def _beat_rows(self) -> None:
        """The rows the heartbeat stamps: claimed ones, and concluded ones until their finish
        job has run (it may wait behind a slow job; a reaper must not take a live worker's
        finished trial meanwhile). Called with `_live_lock` held."""
        self.heartbeat.trial_row_ids = frozenset(self._live) | frozenset(self._unfinished)

    def _train(self, claims: list[Claim], configs: list[TrialConfig], conclude) -> dict[int, TrialResult]:
        """Train the configs (one: `run_trial`; several: vectorized), concluding each trial
        as soon as its result is known. Returns the results left to conclude: every
        unconcluded trial is `failed` when the trainer crashed (the worker goes on)."""
        write = lambda i, m: self._buffer_measurement(claims[i].row_id, m)
        best = lambda: self._best(claims[0].cell_id)
        concluded: set[int] = set()

        def on_result(index: int, result: TrialResult) -> None:
            concluded.add(index)
            conclude(index, result)
        try:
            if len(configs) == 1:
                if self.ranks is not None:
                    announce(configs[0], self.spec.prune)  # the other ranks train it with us
                on_result(0, run_trial(configs[0], data_cache=self.data, on_measurement=lambda m: write(0, m),
                                       best_so_far=best, prune=self.spec.prune))
            else:
                from trainers.vectorized import run_trials_vectorized
                # A group AUTO sized is one stack: choose_k again, with the memory the
                # worker's own steps hold by now, would split it and compile the remainder.
                run_trials_vectorized(configs, data_cache=self.data, on_measurement=write,
                                      on_result=on_result, best_so_far=best, prune=self.spec.prune,
                                      step_cache=self.step_cache, compile=self.compile,
                                      chunk_size=len(configs) if self._cell_k else None)
            return {}
        except (Interrupted, KeyboardInterrupt, StorageJobError):
            raise  # a storage failure stops the worker, as it did before the pipeline
        except Exception as exc:  # a crash fails these trials, not the worker
            self.log(traceback.format_exc())
            failed = TrialResult("failed", 0, 0, 0.0, message=_one_line(exc))
            return {i: failed for i in range(len(configs)) if i not in concluded}

    # ----- storage jobs (the storage thread; `_claim_group` also the main thread) ------
    def _prepare(self, room: int) -> Group | None:
        """The next group, claimed (and asked, when the sampler allows) ahead of time;
        None if no slot is free now (the main thread then waits for one itself)."""
        group = self._claim_group(room)
        if group is not None and (self.points_enqueued or not self._untold_in(group.claims[0].cell_id)):
            self._ask_group(group)
        return group

    def _untold_in(self, cell_id: int) -> bool:
        """Whether a trial of this worker in the cell has trained and is not told yet (still
        training, or its finish job queued after this one)."""
        with self._live_lock:
            return self._untold[cell_id] > 0

    def _claim_group(self, room: int) -> Group | None:
        if time.monotonic() - self._reaped_at >= self.reap_seconds:
            reap_lost_trials(self.engine, self.storage, self.campaign.id, self.grace_seconds, self.log)
            self._reaped_at = time.monotonic()
        claims = self._retry(lambda: claim_cell(self.engine, self.campaign.id, self.worker_id,
                                                lambda cell: min(room, self._cell_k.get(cell.id, self._default_k))),
                             "claiming slots")
        for claim in claims:
            self._track(claim)
        return Group(claims) if claims else None

    def _ask_group(self, group: Group) -> Group:
        """Ask Optuna for each slot's point and record the rows, and read the cell's best."""
        self._refresh_best(group.claims[0].cell_id)
        first = group.claims[0]
        space = self.spec.cell_space(first.optimizer, first.schedule)
        asked = self._retry(lambda: self._ask(first, space, len(group.claims)), "asking Optuna")
        entries = []
        for claim, trial in zip(group.claims, asked):
            self._live[claim.row_id].trial = trial
            attempt = Attempt.of(trial, self.spec.seed)
            config = with_checkpoint(self.spec, self._config(claim, space, trial, attempt.seed), claim.row_id)
            entries.append((claim, trial, config, attempt))
        recorded = self._retry(lambda: self._record_trials(entries), "recording the trials")
        for (claim, trial, config, _), filled in zip(entries, recorded):
            if not filled:  # reaped between claim and ask
                self._requeue_unrecorded(claim, trial)
                self._untrack(claim.row_id)
                continue
            self._live[claim.row_id].recorded = True
            group.started.append((claim, trial, config))
        group.asked = True
        return group

    def _ask(self, claim: Claim, space, count: int) -> list[Asked]:
        """`count` points of the claim's cell (`ask_queued`). Quasi-random and random
        cells: every point was enqueued at creation (and is popped without loading the
        study), so a slot whose point is not queued has its point on the way back (a slot
        given back before its point). TPE cells: only re-runs of lost trials are queued;
        TPE draws the other points."""
        dists = distributions(space)
        return ask_queued(self.storage, claim.study_name, dists, count,
                          point_pending=lambda asked: self.points_enqueued
                          or rerun_pending(self.engine, claim.cell_id, asked),
                          draw=lambda n: draw(self._study(claim.study_name), self.storage, dists, n))

    def _study(self, name: str) -> optuna.Study:
        study = self._studies.get(name)
        if study is None:  # loading a study costs a few queries: once per cell per worker
            sampler = make_sampler(self.spec.sampler, sampler_seed(self.spec.seed, name, self.worker_id))
            study = optuna.load_study(study_name=name, storage=self.storage, sampler=sampler)
            self._studies[name] = study
        return study

    def _refresh_best(self, cell_id: int) -> None:
        try:
            value = self._retry(lambda: best_steps(self.engine, cell_id), "reading the cell's best")
        except BaseException:
            self.best.refresh_failed(cell_id)
            raise
        self.best.store(cell_id, value)

    def _finish_and_tell(self, claim: Claim, trial: Asked, result: TrialResult, rows: list[dict]) -> bool:
        """Write the trial's last measurements and its outcome and tell Optuna, in one
        transaction; False (nothing told) if a reaper abandoned the row meanwhile."""
        try:
            finished = self._retry(lambda: self._finish_trial(claim.row_id, result, rows, trial),
                                   "finishing the trial")
        finally:
            with self._live_lock:
                self._untold[claim.cell_id] -= 1
                self._unfinished.discard(claim.row_id)
                self._beat_rows()
        if not finished:
            self.log(f"[worker {self.worker_id}] trial row {claim.row_id} was abandoned by a reaper "
                     f"while this worker was silent; its result is discarded and it is re-run")
            return False
        self.log(f"[worker {self.worker_id}] bs={claim.batch_size} {claim.optimizer}/{claim.schedule} "
                 f"trial {trial.number}: {_describe(result)}")
        return True

    def _config(self, claim: Claim, space: tuple[Param, ...], trial: Asked,
                seed: int) -> TrialConfig:
        return resolve_trial_config(
            self.spec, batch_size=claim.batch_size, optimizer=claim.optimizer,
            schedule=claim.schedule, hparams=hparams_from_optuna(space, trial.params),
            seed=seed, device=str(self.device))

    def _record_trials(self, entries) -> list[bool]:
        """Fill each claimed row with its Optuna trial, resolved config and provenance, in
        one transaction; per row, False if it is no longer running (a reaper took it)."""
        with self.engine.begin() as connection:
            return [connection.execute(_RECORD_TRIAL, dict(
                row_id=claim.row_id, optuna_trial_id=trial.trial_id, trial_number=trial.number,
                hparams=dict(config.hparams), config=config.to_json_dict(), seed=config.seed,
                attempt=attempt.number, attempt_of=attempt.first_row_id,
                device=self._device_name, host=provenance.host(),
                code_version=provenance.code_version(),
                package_versions=provenance.package_versions())).rowcount == 1
                for claim, trial, config, attempt in entries]

    def _mark_started(self, row_ids: list[int], started_at) -> None:
        """Training began (a prefetched row was claimed earlier): its start time, and the
        worker's current trial."""
        def mark():
            with self.engine.begin() as connection:
                connection.execute(_MARK_STARTED, dict(row_ids=row_ids, started_at=started_at))
                connection.execute(_BEAT_WORKER, dict(worker=self.worker_id, current_trial_id=row_ids[-1]))
        self._retry(mark, "marking the trials started")

    def _write_measurements(self, rows: list[dict]) -> None:
        def write():
            with self.engine.begin() as connection:
                connection.execute(insert(_MEASUREMENTS), rows)
        self._retry(write, "writing measurements")

    def _finish_trial(self, row_id: int, result: TrialResult, rows: list[dict] = (),
                      trial: Asked | None = None) -> bool:
        """Record the outcome, only on a row still running: returns False if a reaper
        abandoned it meanwhile (its re-run is then already queued). `rows`: measurements
        still to write, written first in the same transaction; `trial`: the Optuna trial to
        tell in it too (`study.tuning.tell`), after the row and before the worker's row (the
        order every transaction takes them in)."""
        with self.engine.begin() as connection:
            if rows:
                connection.execute(insert(_MEASUREMENTS), list(rows))
            finished = connection.execute(_FINISH_TRIAL, dict(
                row_id=row_id, outcome=result.outcome, steps=result.steps, examples=result.examples,
                wall_seconds=result.wall_seconds, steps_to_result=result.steps_to_result,
                examples_to_result=result.examples_to_result,
                seconds_to_result=result.seconds_to_result, best_metric=result.best_metric,
                message=result.message, checkpoint_path=result.checkpoint_path)).rowcount
            if finished and trial is not None:
                tell(connection, trial, result.outcome, result.steps_to_result)
            connection.execute(_FINISH_WORKER, dict(worker=self.worker_id, finished=finished))
            return finished == 1

    # ----- stopping (main thread, once the storage thread is idle) -----------------------
    def _abandon(self, claim: Claim, trial: Asked | None, recorded: bool) -> None:
        """SIGTERM / Ctrl-C: give the slot back and queue the same hyperparameters and seed
        again, so the cell still ends with exactly its planned number of finished trials."""
        if not abandon_trial(self.engine, self.storage, claim.row_id, "worker stopped by a signal"):
            return  # it had finished (or a reaper took it first)
        if trial is not None and not recorded:
            self._requeue_unrecorded(claim, trial)
        number = trial.number if trial is not None else "(not yet asked)"
        self.log(f"[worker {self.worker_id}] stopped; trial {number} of "
                 f"bs={claim.batch_size} {claim.optimizer}/{claim.schedule} will be re-run")

    def _give_back(self, claim: Claim, trial: Asked | None) -> None:
        """A prefetched slot that never trained: its row is deleted, the slot given back and
        its point queued again as the same attempt (same seed), as if never claimed."""
        if not self._retry(lambda: release_slot(self.engine, claim.row_id), "giving a slot back"):
            return  # a reaper took it first (and queued its point again)
        if trial is not None:
            self._requeue_unrecorded(claim, trial)

    def _requeue_unrecorded(self, claim: Claim, trial: Asked) -> None:
        attempt = Attempt.of(trial, self.spec.seed)
        self._retry(lambda: requeue(self.storage, trial.trial_id, claim.study_name,
                                    first_row_id=attempt.first_row_id, attempt=attempt.number - 1,
                                    seed=attempt.seed), "re-queueing a trial")

    def _register(self) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(Worker(id=self.worker_id, campaign_id=self.campaign.id, host=provenance.host(),
                               pid=os.getpid(), device=_device_name(self.device),
                               heartbeat_at=func.current_timestamp(), grace_seconds=self.grace_seconds))

    def _set_status(self, status: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(Worker).where(Worker.id == self.worker_id).values(
                status=status, heartbeat_at=func.current_timestamp(), current_trial_id=None))


def release_slot(engine: Engine, row_id: int) -> bool:
    """Delete a running trial row that never trained and give its cell slot back, in one
    transaction; False if the row is no longer running (a reaper abandoned it)."""
    with Session(engine) as session, session.begin():
        cell_id = session.scalar(select(Trial.cell_id).where(Trial.id == row_id, Trial.outcome == "running"))
        if cell_id is None:
            return False
        gone = session.execute(delete(Trial).where(Trial.id == row_id, Trial.outcome == "running")).rowcount
        if gone != 1:
            return False
        session.execute(update(Cell).where(Cell.id == cell_id).values(trials_claimed=Cell.trials_claimed - 1))
        return True


def _measurement_row(trial_id: int, m: Measurement) -> dict:
    return dict(trial_id=trial_id, step=m.step, examples=m.examples, epoch=m.epoch,
                wall_seconds=m.wall_seconds, eval_seconds=m.eval_seconds,
                learning_rate=m.learning_rate, batch_size=m.batch_size,
                train_loss=_finite(m.train_loss), val_loss=_finite(m.val_loss),
                val_error=_finite(m.val_error), extra=dict(m.extra))


def _device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


def _describe(result: TrialResult) -> str:
    if result.outcome == "reached":
        return f"reached at {result.steps_to_result} steps ({result.wall_seconds:.1f} s)"
    return f"{result.outcome} after {result.steps} steps" + (f" ({result.message})" if result.message else "")
