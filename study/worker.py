"""The worker loop: claim a slot in the cell that most needs a trial, ask its study,
train, stream measurements to SQL, tell the study; until every cell has its trials.

Any number of workers, on any machines, may share one storage URL. Each heartbeats
(study/recovery.py), reaps the trials of lost workers before it claims a slot, and
retries its short transactions with backoff when the database blips (study/retry.py).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Callable

import optuna
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from db.models import Campaign, Cell, Measurement as MeasurementRow, Trial, Worker
from db.schema import ensure_schema
from study import provenance
from study.distributed import announce, launched_ranks
from study.importer import IMPORTED_SAMPLER
from study.recovery import (ATTEMPT_ATTR, ATTEMPT_OF_ATTR, DEFAULT_GRACE_SECONDS,
                            DEFAULT_HEARTBEAT_SECONDS, SEED_ATTR, Heartbeat, abandon_trial,
                            reap_lost_trials, requeue)
from study.retry import call_with_retry
from study.resolve import resolve_trial_config, with_checkpoint
from study.spec import Param, parse_spec
from study.tuning import (distributions, hparams_from_optuna, make_sampler, optuna_storage, tell)
from trainers.config import Measurement, TrialConfig, TrialResult
from trainers.loop import DataCache, resolve_device, run_trial
from trainers.workloads import DataOptions, get_workload

Log = Callable[[str], None]


class CampaignNotFound(Exception):
    pass


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


def claim_cell(engine: Engine, campaign_id: int, worker_id: str) -> Claim | None:
    """Take one trial slot in the cell with the fewest slots taken (finished + running),
    and insert its trial row, heartbeating, in the same transaction.

    The conditional UPDATE is the lock: of two workers racing for a cell's last slot,
    exactly one sees a row updated. The row comes with the slot so that a worker killed
    before it has asked Optuna still leaves a row for the reaper to find."""
    with Session(engine) as session:
        cells = session.execute(
            select(Cell.id, Cell.batch_size, Cell.optimizer, Cell.schedule, Cell.study_name)
            .where(Cell.campaign_id == campaign_id, Cell.trials_claimed < Cell.trials_planned)
            .order_by(Cell.trials_claimed, Cell.id)).all()
    for cell in cells:
        row_id = _take_slot(engine, cell.id, worker_id)
        if row_id is not None:
            return Claim(*cell, row_id=row_id)
    return None


def claim_more(engine: Engine, first: Claim, worker_id: str, count: int) -> list[Claim]:
    """Up to `count` more slots in `first`'s cell, for trials trained together."""
    claims = []
    for _ in range(count):
        row_id = _take_slot(engine, first.cell_id, worker_id)
        if row_id is None:
            break
        claims.append(dataclasses.replace(first, row_id=row_id))
    return claims


def _take_slot(engine: Engine, cell_id: int, worker_id: str) -> int | None:
    """One slot of the cell and its running trial row (trial_number -1 until asked), or
    None when the cell has no free slot."""
    with Session(engine) as session, session.begin():
        taken = session.execute(
            update(Cell).where(Cell.id == cell_id, Cell.trials_claimed < Cell.trials_planned)
            .values(trials_claimed=Cell.trials_claimed + 1)).rowcount
        if taken != 1:
            return None
        row = Trial(cell_id=cell_id, optuna_trial_id=-1, trial_number=-1, outcome="running",
                    hparams={}, config={}, seed=0, worker_id=worker_id,
                    heartbeat_at=func.current_timestamp())
        session.add(row)
        session.flush()
        return row.id


def running_trials(engine: Engine, campaign_id: int) -> int:
    with Session(engine) as session:
        return session.scalar(select(func.count(Trial.id)).join(Cell, Cell.id == Trial.cell_id)
                              .where(Cell.campaign_id == campaign_id, Trial.outcome == "running"))


def best_steps(engine: Engine, cell_id: int) -> int | None:
    with Session(engine) as session:
        return session.scalar(select(func.min(Trial.steps_to_result))
                              .where(Trial.cell_id == cell_id, Trial.outcome == "reached"))


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
    def of(cls, trial: optuna.Trial, campaign_seed: int) -> "Attempt":
        attrs = trial.user_attrs
        return cls(int(attrs.get(ATTEMPT_ATTR, 1)), attrs.get(ATTEMPT_OF_ATTR),
                   int(attrs.get(SEED_ATTR, trial_seed(campaign_seed, trial.number))))


class CampaignWorker:
    """One worker process's loop over a campaign.

    `heartbeat_seconds`: how often the worker stamps its rows; `grace_seconds`: how long
    another worker's silence lasts before its trial is abandoned and re-run. Keep the
    grace several heartbeats long (and longer than a database restart takes)."""

    def __init__(self, engine: Engine, storage_url: str, campaign_name: str, *,
                 device: str = "auto", max_trials: int | None = None, log: Log = print,
                 heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
                 grace_seconds: float = DEFAULT_GRACE_SECONDS, trials_at_once: int = 1):
        if not 0 < heartbeat_seconds < grace_seconds:
            raise ValueError(f"heartbeat ({heartbeat_seconds} s) must be > 0 and shorter than "
                             f"the grace period ({grace_seconds} s)")
        self.engine, self.storage_url, self.log = engine, storage_url, log
        ensure_schema(engine)  # upgrades a database made by an older batchlab
        self.campaign = load_campaign(engine, campaign_name)
        if self.campaign.sampler == IMPORTED_SAMPLER:
            raise CampaignNotFound(f"campaign {campaign_name!r} holds imported published data; "
                                   f"it has no trials to run (use results, analyze or the dashboard)")
        self.spec = parse_spec(self.campaign.spec_text, f"campaign {campaign_name}")
        self.device = resolve_device(device)
        self.max_trials = max_trials
        self.worker_id = uuid.uuid4().hex[:12]
        self.data = DataCache()
        self.storage = optuna_storage(storage_url)
        self.grace_seconds = grace_seconds
        self.heartbeat = Heartbeat(engine, self.worker_id, heartbeat_seconds, log)
        self.stop_requested = False
        # Trials of one cell trained together (trainers.vectorized); 1: one at a time.
        self.trials_at_once = trials_at_once
        self.step_cache: dict = {}  # compiled vectorized steps, reused across groups
        self._studies: dict[str, optuna.Study] = {}  # the cells' studies, loaded once
        self.ranks = launched_ranks()  # under torchrun, this is rank 0: it leads the others

    def run(self) -> int:
        """Run trials until the campaign has all its trials (or `max_trials` are done);
        returns the number of trials this worker finished. On SIGTERM it abandons its
        trial (re-queued for another worker), returns, and `stop_requested` is set. While no slot is free but
        trials still run elsewhere, it waits: one of them may be lost and need a re-run."""
        # Load the data before claiming anything: a missing file is the user's to fix,
        # and no trial should be spent finding that out.
        workload = get_workload(self.spec.workload)
        self.data.get(workload, DataOptions(self.spec.data_dir, self.spec.download), self.device)
        self._retry(self._register, "registering the worker")
        self.heartbeat.start()
        done = 0
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM,)}
        try:
            while self.max_trials is None or done < self.max_trials:
                claim = self._next_claim()
                if claim is None:
                    break
                room = self.trials_at_once - 1
                if self.max_trials is not None:
                    room = min(room, self.max_trials - done - 1)
                extra = self._retry(lambda: claim_more(self.engine, claim, self.worker_id, room),
                                    "claiming more slots") if room > 0 else []
                done += self._run_claims([claim, *extra])
        except Interrupted:
            pass  # SIGTERM: the trial is abandoned and re-queued; stop_requested says so
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.heartbeat.stop()
            if self.ranks is not None:
                announce(None)  # the other ranks exit with this one
            self._retry(lambda: self._set_status("stopped" if self.stop_requested else "finished"),
                        "recording the worker's status")
        return done

    def _next_claim(self) -> Claim | None:
        poll_seconds = min(2.0, self.grace_seconds / 4)
        while True:
            reap_lost_trials(self.engine, self.storage, self.campaign.id, self.grace_seconds, self.log)
            claim = self._retry(lambda: claim_cell(self.engine, self.campaign.id, self.worker_id),
                                "claiming a slot")
            if claim is not None:
                return claim
            if self._retry(lambda: running_trials(self.engine, self.campaign.id), "counting trials") == 0:
                return None  # every slot is finished
            time.sleep(poll_seconds)

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        raise Interrupted(f"signal {signum}")

    def _retry(self, operation, what: str):
        return call_with_retry(operation, what=what, log=self.log)

    def _run_claims(self, claims: list[Claim]) -> int:
        """Trials in the claimed slots of one cell (trained together when several);
        returns how many finished here (a trial reaped while this worker was cut off from
        the database is re-run elsewhere and does not count)."""
        self.heartbeat.trial_row_ids = frozenset(c.row_id for c in claims)
        # row id -> (Optuna trial or None, recorded in its row): what a stop must undo.
        asked: dict[int, tuple[optuna.Trial | None, bool]] = {c.row_id: (None, False) for c in claims}
        started = []
        try:
            for claim in claims:
                entry = self._ask_and_record(claim, asked)
                if entry is not None:
                    started.append(entry)
            return self._train_group(started)
        except (Interrupted, KeyboardInterrupt):
            for claim in claims:
                trial, recorded = asked[claim.row_id]
                self._abandon(claim, trial, recorded)
            raise
        finally:
            self.heartbeat.trial_row_ids = frozenset()

    def _ask_and_record(self, claim: Claim, asked: dict):
        """Ask Optuna for the slot's point and fill its row; None if a reaper took the row."""
        space = self.spec.cell_space(claim.optimizer, claim.schedule)
        study, trial = self._retry(lambda: self._ask(claim, space), "asking Optuna")
        asked[claim.row_id] = (trial, False)
        attempt = Attempt.of(trial, self.spec.seed)
        config = with_checkpoint(self.spec, self._config(claim, space, trial, attempt.seed), claim.row_id)
        if not self._retry(lambda: self._record_trial(claim, trial, config, attempt), "recording the trial"):
            self._requeue_unrecorded(claim, trial)  # reaped between claim and ask
            asked[claim.row_id] = (None, False)
            return None
        asked[claim.row_id] = (trial, True)
        return claim, study, trial, config

    def _train_group(self, started) -> int:
        finished = 0

        def conclude(index: int, result: TrialResult) -> None:
            nonlocal finished
            claim, study, trial, _ = started[index]
            finished += self._conclude(claim, study, trial, result)

        configs = [config for *_, config in started]
        results = self._train([claim for claim, *_ in started], configs, conclude)
        for index, result in results.items():  # trials the trainer did not conclude (a crash)
            conclude(index, result)
        return finished

    def _conclude(self, claim: Claim, study: optuna.Study, trial: optuna.Trial,
                  result: TrialResult) -> bool:
        self.heartbeat.trial_row_ids = self.heartbeat.trial_row_ids - {claim.row_id}
        if not self._retry(lambda: self._finish_trial(claim.row_id, result), "finishing the trial"):
            self.log(f"[worker {self.worker_id}] trial row {claim.row_id} was abandoned by a reaper "
                     f"while this worker was silent; its result is discarded and it is re-run")
            return False
        self._retry(lambda: tell(study, trial, result.outcome, result.steps_to_result), "telling Optuna")
        self.log(f"[worker {self.worker_id}] bs={claim.batch_size} {claim.optimizer}/{claim.schedule} "
                 f"trial {trial.number}: {_describe(result)}")
        return True

    def _ask(self, claim: Claim, space) -> tuple[optuna.Study, optuna.Trial]:
        study = self._studies.get(claim.study_name)
        if study is None:  # loading a study costs a few queries: once per cell per worker
            study = optuna.load_study(study_name=claim.study_name, storage=self.storage,
                                      sampler=make_sampler(self.spec.sampler, self.spec.seed))
            self._studies[claim.study_name] = study
        return study, study.ask(fixed_distributions=distributions(space))

    def _train(self, claims: list[Claim], configs: list[TrialConfig], conclude) -> dict[int, TrialResult]:
        """Train the configs (one: `run_trial`; several: vectorized), concluding each trial
        as soon as its result is known. Returns the results left to conclude: every
        unconcluded trial is `failed` when the trainer crashed (the worker goes on)."""
        write = lambda i, m: self._retry(lambda: self._write_measurement(claims[i].row_id, m),
                                         "writing a measurement")
        best = lambda: self._retry(lambda: best_steps(self.engine, claims[0].cell_id),
                                   "reading the cell's best")
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
                run_trials_vectorized(configs, data_cache=self.data, on_measurement=write,
                                      on_result=on_result, best_so_far=best, prune=self.spec.prune,
                                      step_cache=self.step_cache)
            return {}
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # a crash fails these trials, not the worker
            self.log(traceback.format_exc())
            failed = TrialResult("failed", 0, 0, 0.0, message=_one_line(exc))
            return {i: failed for i in range(len(configs)) if i not in concluded}

    def _config(self, claim: Claim, space: tuple[Param, ...], trial: optuna.Trial,
                seed: int) -> TrialConfig:
        return resolve_trial_config(
            self.spec, batch_size=claim.batch_size, optimizer=claim.optimizer,
            schedule=claim.schedule, hparams=hparams_from_optuna(space, trial.params),
            seed=seed, device=str(self.device))

    def _record_trial(self, claim: Claim, trial: optuna.Trial, config: TrialConfig,
                      attempt: Attempt) -> bool:
        """Fill the claimed row with the Optuna trial, the resolved config and provenance;
        False if the row is no longer running (a reaper took it)."""
        with Session(self.engine) as session, session.begin():
            filled = session.execute(update(Trial).where(
                Trial.id == claim.row_id, Trial.outcome == "running").values(
                optuna_trial_id=trial._trial_id, trial_number=trial.number,
                hparams=dict(config.hparams), config=config.to_json_dict(), seed=config.seed,
                attempt=attempt.number, attempt_of=attempt.first_row_id,
                device=_device_name(self.device), host=provenance.host(),
                code_version=provenance.code_version(), package_versions=provenance.package_versions(),
                heartbeat_at=func.current_timestamp())).rowcount
            session.execute(update(Worker).where(Worker.id == self.worker_id)
                            .values(current_trial_id=claim.row_id, heartbeat_at=func.current_timestamp()))
            return filled == 1

    def _write_measurement(self, trial_id: int, m: Measurement) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(MeasurementRow(
                trial_id=trial_id, step=m.step, examples=m.examples, epoch=m.epoch,
                wall_seconds=m.wall_seconds, eval_seconds=m.eval_seconds,
                learning_rate=m.learning_rate, batch_size=m.batch_size, train_loss=_finite(m.train_loss),
                val_loss=_finite(m.val_loss), val_error=_finite(m.val_error), extra=dict(m.extra)))

    def _finish_trial(self, row_id: int, result: TrialResult) -> bool:
        """Record the outcome, only on a row still running: returns False if a reaper
        abandoned it meanwhile (its re-run is then already queued)."""
        with Session(self.engine) as session, session.begin():
            finished = session.execute(update(Trial).where(
                Trial.id == row_id, Trial.outcome == "running").values(
                outcome=result.outcome, steps=result.steps, examples=result.examples,
                wall_seconds=result.wall_seconds, steps_to_result=result.steps_to_result,
                examples_to_result=result.examples_to_result,
                seconds_to_result=result.seconds_to_result, best_metric=result.best_metric,
                message=result.message, checkpoint_path=result.checkpoint_path,
                finished_at=func.current_timestamp())).rowcount
            session.execute(update(Worker).where(Worker.id == self.worker_id).values(
                current_trial_id=None, heartbeat_at=func.current_timestamp(),
                trials_done=Worker.trials_done + finished))
            return finished == 1

    def _abandon(self, claim: Claim, trial: optuna.Trial | None, recorded: bool) -> None:
        """SIGTERM / Ctrl-C: give the slot back and queue the same hyperparameters and seed
        again, so the cell still ends with exactly its planned number of finished trials."""
        if not abandon_trial(self.engine, self.storage, claim.row_id, "worker stopped by a signal"):
            return  # it had finished (or a reaper took it first)
        if trial is not None and not recorded:
            self._requeue_unrecorded(claim, trial)
        number = trial.number if trial is not None else "(not yet asked)"
        self.log(f"[worker {self.worker_id}] stopped; trial {number} of "
                 f"bs={claim.batch_size} {claim.optimizer}/{claim.schedule} will be re-run")

    def _requeue_unrecorded(self, claim: Claim, trial: optuna.Trial) -> None:
        attempt = Attempt.of(trial, self.spec.seed)
        self._retry(lambda: requeue(self.storage, trial._trial_id, claim.study_name,
                                    first_row_id=attempt.first_row_id, attempt=attempt.number - 1,
                                    seed=attempt.seed), "re-queueing a trial")

    def _register(self) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(Worker(id=self.worker_id, campaign_id=self.campaign.id, host=provenance.host(),
                               pid=os.getpid(), device=_device_name(self.device),
                               heartbeat_at=func.current_timestamp()))

    def _set_status(self, status: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(Worker).where(Worker.id == self.worker_id).values(
                status=status, heartbeat_at=func.current_timestamp(), current_trial_id=None))


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
