"""A small SQLite database with known outcomes, written through db.models, for the
dashboard's tests (AppTest pages, data helpers, the real-browser test)."""
from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import make_engine
from db.models import Campaign, Cell, Measurement, ProbeResult, Trial, Worker
from db.schema import ensure_schema

APP = Path(__file__).resolve().parents[2] / "app" / "main.py"
CAMPAIGN = "demo_scaling"
OTHER = "other_campaign"
THRESHOLD = 0.1
EVAL_EVERY = 10
TRAIN_SIZE = 1000  # examples per epoch
# batch size -> steps to result of the cell's winning trial (its first val_error < 0.1)
STEPS_TO_RESULT = {16: 160, 32: 80, 64: 50, 128: 40}
# batch size -> the winner's learning rate; B=128's sits at the top of the search range
WINNER_LR = {16: 0.01, 32: 0.02, 64: 0.04, 128: 0.99}
FAILED_MESSAGE = "RuntimeError: CUDA out of memory (test fixture)"
SPEC = {
    "name": CAMPAIGN, "workload": "digits_mlp",
    "spaces": {"optimizer:momentum": [
        {"name": "learning_rate", "low": 0.001, "high": 1.0, "scale": "log", "integer": False,
         "choices": None, "value": None},
        {"name": "momentum", "low": 0.8, "high": 0.99, "scale": "reverse_log",
         "integer": False, "choices": None, "value": None}]},
}


DISTANCE_A, DISTANCE_B = 0.5, 0.25  # the probed trials' distance from init: a + b ln(step)


def _measurements(trial: Trial, batch_size: int, lr: float, *, last_step: int,
                  first_reached: int | None, diverged: bool = False, probes: bool = False):
    """Evaluations every EVAL_EVERY steps: val_error 0.5 before `first_reached`, 0.05 from
    it on (never below the target when None); NaN at the end of a diverged trial."""
    rows = []
    for step in range(EVAL_EVERY, last_step + 1, EVAL_EVERY):
        reached = first_reached is not None and step >= first_reached
        error = 0.05 if reached else 0.5
        if diverged and step == last_step:
            error = None
        extra = ({"noise_scale": 100.0 + step,  # Hoffer's log growth, exactly:
                  "distance_from_init": DISTANCE_A + DISTANCE_B * math.log(step)}
                 if probes else {})
        rows.append(Measurement(
            trial_id=trial.id, step=step, examples=step * batch_size,
            epoch=step * batch_size / TRAIN_SIZE, wall_seconds=step * 0.01,
            eval_seconds=step * 0.001, learning_rate=lr, batch_size=batch_size,
            train_loss=error, val_loss=error, val_error=error, extra=extra))
    return rows


def build_database(path: Path | str) -> str:
    """Two campaigns. `demo_scaling`: momentum/constant cells at B = 16, 32, 64, 128 (3
    trials each: a winner reaching the target at STEPS_TO_RESULT, a later or not-reaching
    one, and a diverged or failed one) and B = 256 with one running trial; two workers
    (one live, one stale). `other_campaign`: two cells, no probes."""
    url = path if isinstance(path, str) and "://" in path else f"sqlite:///{path}"  # or a URL
    engine = make_engine(url)
    ensure_schema(engine)
    now = datetime.now(timezone.utc)
    with Session(engine) as session:
        demo = Campaign(name=CAMPAIGN, workload="digits_mlp", target_metric="val_error",
                        target_threshold=THRESHOLD, target_mode="min", eval_every=EVAL_EVERY,
                        max_steps=300, trials_per_cell=3, sampler="quasi_random", spec=SPEC,
                        spec_text="# test", created_at=now - timedelta(hours=1))
        other = Campaign(name=OTHER, workload="mnist_simple_cnn", target_metric="val_error",
                         target_threshold=0.2, target_mode="min", eval_every=20,
                         max_steps=400, trials_per_cell=2, sampler="random", spec={},
                         spec_text="# test", created_at=now - timedelta(minutes=50))
        session.add_all([demo, other])
        session.flush()
        number = 0

        def trial(cell, n, outcome, hparams, minutes_ago, **fields):
            nonlocal number
            number += 1
            row = Trial(cell_id=cell.id, optuna_trial_id=number, trial_number=n, outcome=outcome,
                        hparams=hparams, config={}, seed=n, host="host-a", device="cpu",
                        started_at=now - timedelta(minutes=minutes_ago + 2),
                        finished_at=None if outcome == "running" else now - timedelta(minutes=minutes_ago),
                        **fields)
            session.add(row)
            session.flush()
            return row

        for i, (batch_size, steps) in enumerate(STEPS_TO_RESULT.items()):
            cell = Cell(campaign_id=demo.id, batch_size=batch_size, optimizer="momentum",
                        schedule="constant", study_name=f"demo-{batch_size}", trials_planned=3,
                        trials_claimed=3)
            session.add(cell)
            session.flush()
            lr = WINNER_LR[batch_size]
            winner = trial(cell, 0, "reached", {"learning_rate": lr, "momentum": 0.9}, 30 - i,
                           steps=steps, examples=steps * batch_size, wall_seconds=steps * 0.01,
                           steps_to_result=steps, examples_to_result=steps * batch_size,
                           seconds_to_result=steps * 0.01, best_metric=0.05)
            session.add_all(_measurements(winner, batch_size, lr, last_step=steps,
                                          first_reached=steps, probes=batch_size == 16))
            second = trial(cell, 1, "reached" if batch_size != 64 else "not_reached",
                           {"learning_rate": lr * 3, "momentum": 0.95}, 20 - i,
                           steps=steps + 20, best_metric=0.05 if batch_size != 64 else 0.5,
                           steps_to_result=steps + 20 if batch_size != 64 else None)
            session.add_all(_measurements(second, batch_size, lr * 3, last_step=steps + 20,
                                          first_reached=steps + 20 if batch_size != 64 else None))
            if batch_size == 32:
                trial(cell, 2, "failed", {"learning_rate": 0.005, "momentum": 0.85}, 5,
                      message=FAILED_MESSAGE)
            else:
                third = trial(cell, 2, "diverged", {"learning_rate": 0.9, "momentum": 0.99}, 3 + i,
                              steps=30, message="loss became NaN at step 30")
                session.add_all(_measurements(third, batch_size, 0.9, last_step=30,
                                              first_reached=None, diverged=True))
        big = Cell(campaign_id=demo.id, batch_size=256, optimizer="momentum", schedule="constant",
                   study_name="demo-256", trials_planned=3, trials_claimed=1)
        session.add(big)
        session.flush()
        running = trial(big, 0, "running", {"learning_rate": 0.1, "momentum": 0.9}, 0)
        session.add_all(_measurements(running, 256, 0.1, last_step=20, first_reached=None))
        session.add_all([
            Worker(id="worker-live", campaign_id=demo.id, host="host-a", pid=101, device="cpu",
                   started_at=now - timedelta(minutes=40), heartbeat_at=now, status="running",
                   current_trial_id=running.id, trials_done=9),
            Worker(id="worker-stale", campaign_id=demo.id, host="host-b", pid=202, device="cuda:0",
                   started_at=now - timedelta(minutes=40), heartbeat_at=now - timedelta(minutes=10),
                   status="running", trials_done=3)])

        for batch_size, steps in ((32, 200), (128, 120)):
            cell = Cell(campaign_id=other.id, batch_size=batch_size, optimizer="adam",
                        schedule="constant", study_name=f"other-{batch_size}", trials_planned=2,
                        trials_claimed=1)
            session.add(cell)
            session.flush()
            row = trial(cell, 0, "reached", {"learning_rate": 0.001}, 40, steps=steps,
                        steps_to_result=steps, best_metric=0.05)
            session.add_all(_measurements(row, batch_size, 0.001, last_step=steps,
                                          first_reached=steps))
        session.commit()
    engine.dispose()
    return url


CODE_VERSION = "0.3.1+g0123456789ab.dirty"
PACKAGES = {"python": "3.11.7", "torch": "2.5.1", "cuda": "12.4", "cudnn": "90100",
            "optuna": "4.1.0", "numpy": "2.1.0"}
CONFIG = {"workload": "digits_mlp", "batch_size": 16, "optimizer": "momentum",
          "hparams": {"learning_rate": 0.01, "momentum": 0.9}, "max_steps": 300}


def _winner(session: Session, batch_size: int) -> Trial:
    return session.execute(
        select(Trial).join(Cell, Cell.id == Trial.cell_id).join(Campaign)
        .where(Campaign.name == CAMPAIGN, Cell.batch_size == batch_size,
               Trial.trial_number == 0)).scalar_one()


def add_provenance_and_probes(url: str) -> dict:
    """Provenance on B=16's trials of `build_database` (the second one a re-run, attempt 2
    of the first) and bl_probe_results rows (sharpness, Hessian, interpolation) for B=16
    and B=128's winners; returns the ids involved."""
    engine = make_engine(url)
    now = datetime.now(timezone.utc)
    with Session(engine) as session:
        small, large = _winner(session, 16), _winner(session, 128)
        small.code_version, small.package_versions = CODE_VERSION, PACKAGES
        small.device, small.host, small.seed, small.config = ("cuda:0 (NVIDIA H100 80GB HBM3)",
                                                              "gpu-node-7", 123456789, CONFIG)
        small.worker_id = "worker-live"
        rerun = session.execute(select(Trial).where(Trial.cell_id == small.cell_id,
                                                    Trial.trial_number == 1)).scalar_one()
        rerun.attempt, rerun.attempt_of, rerun.code_version = 2, small.id, "0.3.1"
        campaign_id = session.execute(select(Campaign.id).where(Campaign.name == CAMPAIGN)).scalar()

        def probe(trial, kind, params, result, minutes_ago):
            session.add(ProbeResult(campaign_id=campaign_id,
                                    cell_id=trial.cell_id if trial else None,
                                    trial_id=trial.id if trial else None, kind=kind,
                                    params=params, result=result,
                                    created_at=now - timedelta(minutes=minutes_ago)))

        sharp = {"space": "full", "epsilon": 0.001, "subspace_dim": None, "maxiter": 10}
        probe(small, "sharpness", sharp, {"sharpness": 99.0, "loss": 1.0, "max_loss": 2.0,
                                          "batch_size": 16, "steps_to_result": 160}, 30)  # older
        probe(small, "sharpness", sharp, {"sharpness": 0.5, "loss": 0.05, "max_loss": 0.06,
                                          "batch_size": 16, "steps_to_result": 160}, 10)
        probe(large, "sharpness", sharp, {"sharpness": 2.0, "loss": 0.04, "max_loss": 0.08,
                                          "batch_size": 128, "steps_to_result": 40}, 9)
        probe(small, "hessian", {"max_iter": 30}, {"top_eigenvalue": 10.0, "converged": True,
                                                   "eigen_iterations": 12, "trace": 150.0,
                                                   "trace_samples": 30, "batch_size": 16,
                                                   "steps_to_result": 160}, 8)
        probe(large, "hessian", {"max_iter": 30}, {"top_eigenvalue": 40.0, "converged": True,
                                                   "eigen_iterations": 9, "trace": 420.0,
                                                   "trace_samples": 30, "batch_size": 128,
                                                   "steps_to_result": 40}, 7)
        probe(None, "interpolation",
              {"small_trial_id": small.id, "large_trial_id": large.id, "small_batch_size": 16,
               "large_batch_size": 128, "batch_norm": "batch_stats"},
              {"alphas": [-1.0, 0.0, 1.0, 2.0], "train_loss": [2.0, 0.05, 0.04, 3.0],
               "train_accuracy": [0.4, 0.99, 0.99, 0.3], "test_loss": [2.2, 0.1, 0.12, 3.1],
               "test_accuracy": [0.35, 0.97, 0.96, 0.28]}, 5)
        ids = {"small": small.id, "large": large.id, "small_cell": small.cell_id,
               "rerun": rerun.id}
        session.commit()
    engine.dispose()
    return ids


@pytest.fixture(scope="session")
def dashboard_db(tmp_path_factory) -> str:
    """URL of the test database (built once; the dashboard only reads it)."""
    return build_database(tmp_path_factory.mktemp("dashboard") / "dashboard.db")
