"""The worker loop: claim a slot in the cell that most needs a trial, ask its study,
train, stream measurements to SQL, tell the study; until every cell has its trials.

Any number of workers, on any machines, may share one storage URL.
"""
from __future__ import annotations

import os
import signal
import traceback
import uuid
from dataclasses import dataclass
from typing import Callable

import optuna
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from db.models import Campaign, Cell, Measurement as MeasurementRow, Trial, Worker, utcnow
from study import provenance
from study.resolve import resolve_trial_config
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


def load_campaign(engine: Engine, name: str) -> Campaign:
    with Session(engine) as session:
        campaign = session.scalar(select(Campaign).where(Campaign.name == name))
        if campaign is None:
            known = session.scalars(select(Campaign.name)).all()
            hint = f"; known campaigns: {', '.join(known)}" if known else "; create it first"
            raise CampaignNotFound(f"no campaign named {name!r}{hint}")
        session.expunge(campaign)
        return campaign


def claim_cell(engine: Engine, campaign_id: int) -> Claim | None:
    """Take one trial slot in the cell with the fewest slots taken (finished + running).

    The conditional UPDATE is the lock: of two workers racing for a cell's last slot,
    exactly one sees a row updated."""
    with Session(engine) as session:
        cells = session.execute(
            select(Cell.id, Cell.batch_size, Cell.optimizer, Cell.schedule, Cell.study_name)
            .where(Cell.campaign_id == campaign_id, Cell.trials_claimed < Cell.trials_planned)
            .order_by(Cell.trials_claimed, Cell.id)).all()
    for cell in cells:
        with Session(engine) as session, session.begin():
            taken = session.execute(
                update(Cell).where(Cell.id == cell.id, Cell.trials_claimed < Cell.trials_planned)
                .values(trials_claimed=Cell.trials_claimed + 1)).rowcount
        if taken == 1:
            return Claim(*cell)
    return None


def release_slot(engine: Engine, cell_id: int) -> None:
    with Session(engine) as session, session.begin():
        session.execute(update(Cell).where(Cell.id == cell_id)
                        .values(trials_claimed=Cell.trials_claimed - 1))


def best_steps(engine: Engine, cell_id: int) -> int | None:
    with Session(engine) as session:
        return session.scalar(select(func.min(Trial.steps_to_result))
                              .where(Trial.cell_id == cell_id, Trial.outcome == "reached"))


def trial_seed(campaign_seed: int, trial_number: int) -> int:
    return (campaign_seed * 1_000_003 + trial_number) % (2 ** 31)


class CampaignWorker:
    """One worker process's loop over a campaign."""

    def __init__(self, engine: Engine, storage_url: str, campaign_name: str, *,
                 device: str = "auto", max_trials: int | None = None, log: Log = print):
        self.engine, self.storage_url, self.log = engine, storage_url, log
        self.campaign = load_campaign(engine, campaign_name)
        self.spec = parse_spec(self.campaign.spec_text, f"campaign {campaign_name}")
        self.device = resolve_device(device)
        self.max_trials = max_trials
        self.worker_id = uuid.uuid4().hex[:12]
        self.data = DataCache()
        self.storage = optuna_storage(storage_url)
        self.stop_requested = False

    def run(self) -> int:
        """Run trials until the campaign has all its trials (or `max_trials` are done);
        returns the number of trials this worker finished."""
        # Load the data before claiming anything: a missing file is the user's to fix,
        # and no trial should be spent finding that out.
        workload = get_workload(self.spec.workload)
        self.data.get(workload, DataOptions(self.spec.data_dir, self.spec.download), self.device)
        self._register()
        done = 0
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM,)}
        try:
            while self.max_trials is None or done < self.max_trials:
                claim = claim_cell(self.engine, self.campaign.id)
                if claim is None:
                    break
                self._run_one(claim)
                done += 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._set_status("stopped" if self.stop_requested else "finished")
        return done

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        raise Interrupted(f"signal {signum}")

    def _run_one(self, claim: Claim) -> None:
        space = self.spec.cell_space(claim.optimizer, claim.schedule)
        study = optuna.load_study(study_name=claim.study_name, storage=self.storage,
                                  sampler=make_sampler(self.spec.sampler, self.spec.seed))
        trial = study.ask(fixed_distributions=distributions(space))
        config = self._config(claim, space, trial)
        row_id = self._insert_trial(claim, trial, config)
        try:
            result = run_trial(config, data_cache=self.data,
                               on_measurement=lambda m: self._write_measurement(row_id, m),
                               best_so_far=lambda: best_steps(self.engine, claim.cell_id),
                               prune=self.spec.prune)
        except (Interrupted, KeyboardInterrupt):
            self._abandon(claim, study, trial, row_id)
            raise
        except Exception as exc:  # a crash fails this trial, not the worker
            result = TrialResult("failed", 0, 0, 0.0, message=_one_line(exc))
            self.log(traceback.format_exc())
        self._finish_trial(row_id, result)
        tell(study, trial, result.outcome, result.steps_to_result)
        self.log(f"[worker {self.worker_id}] bs={claim.batch_size} {claim.optimizer}/{claim.schedule} "
                 f"trial {trial.number}: {_describe(result)}")

    def _config(self, claim: Claim, space: tuple[Param, ...], trial: optuna.Trial) -> TrialConfig:
        return resolve_trial_config(
            self.spec, batch_size=claim.batch_size, optimizer=claim.optimizer,
            schedule=claim.schedule, hparams=hparams_from_optuna(space, trial.params),
            seed=trial_seed(self.spec.seed, trial.number), device=str(self.device))

    def _insert_trial(self, claim: Claim, trial: optuna.Trial, config: TrialConfig) -> int:
        with Session(self.engine) as session, session.begin():
            row = Trial(cell_id=claim.cell_id, optuna_trial_id=trial._trial_id,
                        trial_number=trial.number, outcome="running", hparams=dict(config.hparams),
                        config=config.to_json_dict(), seed=config.seed, worker_id=self.worker_id,
                        device=_device_name(self.device), host=provenance.host(),
                        code_version=provenance.code_version(),
                        package_versions=provenance.package_versions())
            session.add(row)
            session.flush()
            session.execute(update(Worker).where(Worker.id == self.worker_id)
                            .values(current_trial_id=row.id, heartbeat_at=utcnow()))
            return row.id

    def _write_measurement(self, trial_id: int, m: Measurement) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(MeasurementRow(
                trial_id=trial_id, step=m.step, examples=m.examples, epoch=m.epoch,
                wall_seconds=m.wall_seconds, eval_seconds=m.eval_seconds,
                learning_rate=m.learning_rate, batch_size=m.batch_size, train_loss=_finite(m.train_loss),
                val_loss=_finite(m.val_loss), val_error=_finite(m.val_error), extra=dict(m.extra)))
            session.execute(update(Worker).where(Worker.id == self.worker_id)
                            .values(heartbeat_at=utcnow()))

    def _finish_trial(self, row_id: int, result: TrialResult) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(Trial).where(Trial.id == row_id).values(
                outcome=result.outcome, steps=result.steps, examples=result.examples,
                wall_seconds=result.wall_seconds, steps_to_result=result.steps_to_result,
                examples_to_result=result.examples_to_result,
                seconds_to_result=result.seconds_to_result, best_metric=result.best_metric,
                message=result.message, finished_at=utcnow()))
            session.execute(update(Worker).where(Worker.id == self.worker_id).values(
                current_trial_id=None, heartbeat_at=utcnow(), trials_done=Worker.trials_done + 1))

    def _abandon(self, claim: Claim, study: optuna.Study, trial: optuna.Trial, row_id: int) -> None:
        """Give the slot back and queue the same hyperparameters again, so the cell still
        ends with exactly its planned number of finished trials."""
        with Session(self.engine) as session, session.begin():
            session.execute(update(Trial).where(Trial.id == row_id).values(
                outcome="abandoned", message="worker stopped", finished_at=utcnow()))
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        release_slot(self.engine, claim.cell_id)
        self.log(f"[worker {self.worker_id}] stopped; trial {trial.number} of "
                 f"bs={claim.batch_size} {claim.optimizer}/{claim.schedule} will be re-run")

    def _register(self) -> None:
        with Session(self.engine) as session, session.begin():
            session.add(Worker(id=self.worker_id, campaign_id=self.campaign.id, host=provenance.host(),
                               pid=os.getpid(), device=_device_name(self.device)))

    def _set_status(self, status: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(update(Worker).where(Worker.id == self.worker_id).values(
                status=status, heartbeat_at=utcnow(), current_trial_id=None))


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
