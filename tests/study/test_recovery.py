"""Crash recovery: heartbeats, the reaper (exactly once, even when several reap at once),
SIGTERM, kill -9 of random workers and a PostgreSQL restart mid-campaign. Every campaign
ends with exactly its planned finished trials per cell, and every abandoned attempt is
re-run with identical hyperparameters and seed."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pandas as pd
import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from db import queries
from db.engine import make_engine
from db.models import Trial, Worker
from study.campaigns import create_campaign
from study.results import FINISHED as FINISHED_OUTCOMES
from study import recovery
from study.recovery import (ATTEMPT_ATTR, ATTEMPT_OF_ATTR, SEED_ATTR, Heartbeat, abandon_trial,
                            reap_lost_trials, rerun_pending)
from study.results import campaign_info
from study.spec import parse_spec
from study.tuning import ask_queued, distributions, draw, optuna_storage
from study.worker import Attempt, CampaignWorker, claim_cell

FINISHED = {"reached", "not_reached", "diverged", "failed", "pruned"}
ROOT = Path(__file__).resolve().parents[2]


def spec_text(name: str, *, batch_sizes=(16, 64), trials_per_cell: int = 3, max_steps: int = 40,
              eval_every: int = 10, threshold: float = 0.001) -> str:
    """digits_mlp with a target it never reaches, so every trial runs its max_steps."""
    return textwrap.dedent(f"""
        [campaign]
        name = "{name}"
        workload = "digits_mlp"
        batch_sizes = {list(batch_sizes)}
        optimizers = ["momentum"]
        schedules = ["constant"]
        trials_per_cell = {trials_per_cell}
        max_steps = {max_steps}
        eval_every = {eval_every}
        seed = 3
        prune = false

        [target]
        metric = "val_error"
        threshold = {threshold}

        [search_space.optimizer.momentum]
        learning_rate = {{ low = 0.01, high = 0.5, scale = "log" }}
        momentum = {{ low = 0.8, high = 0.95, scale = "reverse_log" }}
    """)


def create(url: str, text_: str):
    spec = parse_spec(text_, "test.toml")
    engine = make_engine(url)
    create_campaign(engine, url, spec)
    return engine, campaign_info(engine, spec.name)


def start_worker(url: str, campaign: str, *, grace: float = 3.0, heartbeat: float = 0.5,
                 log: Path | None = None) -> subprocess.Popen:
    """A real `batchlab worker` process (its output goes to `log`)."""
    command = [sys.executable, "-m", "study.cli", "worker", "--campaign", campaign, "--storage", url,
               "--device", "cpu", "--threads", "1", "--heartbeat", str(heartbeat), "--grace", str(grace)]
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_all(processes, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]


def trial_rows(engine, campaign_id: int) -> pd.DataFrame:
    with engine.connect() as connection:
        return pd.read_sql(text(
            "SELECT t.id, t.cell_id, t.outcome, t.hparams, t.seed, t.attempt, t.attempt_of, "
            "t.message, t.trial_number, t.optuna_trial_id FROM bl_trials t JOIN bl_cells c "
            "ON c.id = t.cell_id WHERE c.campaign_id = :cid ORDER BY t.id"),
            connection, params={"cid": campaign_id})


def measured_steps(engine, trial_id: int) -> int:
    with engine.connect() as connection:
        return connection.execute(text("SELECT COUNT(*) FROM bl_measurements WHERE trial_id = :t"),
                                  {"t": trial_id}).scalar()


def check_exact_accounting(engine, url: str, campaign_id: int, trials_per_cell: int) -> pd.DataFrame:
    """Exactly `trials_per_cell` finished rows per cell, none running, slots consistent,
    every Optuna study settled, and every abandoned attempt re-run with the same point."""
    rows = trial_rows(engine, campaign_id)
    finished = rows[rows["outcome"].isin(FINISHED)]
    cells = queries.cells(engine, campaign_id)
    assert finished.groupby("cell_id").size().reindex(cells["cell_id"], fill_value=0).tolist() \
        == [trials_per_cell] * len(cells)
    assert set(rows["outcome"]) <= FINISHED | {"abandoned"}
    assert (finished["outcome"] != "failed").all(), finished["message"].tolist()
    with engine.connect() as connection:
        claimed = connection.execute(text("SELECT trials_claimed FROM bl_cells WHERE campaign_id = :c"),
                                     {"c": campaign_id}).scalars().all()
    assert claimed == [trials_per_cell] * len(cells)
    storage = optuna_storage(url)
    for name in cells["study_name"]:
        states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
        assert states.count("RUNNING") == 0 and states.count("WAITING") == 0, states
        assert len(states) - states.count("FAIL") == trials_per_cell
    for _, dead in rows[rows["outcome"] == "abandoned"].iterrows():
        if dead["trial_number"] < 0:
            continue  # killed before Optuna gave it a point: its Optuna trial was swept
        first = dead["attempt_of"] if pd.notna(dead["attempt_of"]) else dead["id"]
        reruns = rows[(rows["attempt_of"] == first) & (rows["attempt"] == dead["attempt"] + 1)]
        assert len(reruns) == 1, (dead.to_dict(), rows)
        rerun = reruns.iloc[0]
        assert rerun["hparams"] == dead["hparams"] and rerun["seed"] == dead["seed"]
        assert rerun["cell_id"] == dead["cell_id"]
    return rows


# ----- the reaper, in-process ------------------------------------------------------------
def running_trial(engine, url: str, info, worker_id: str = "ghost") -> int:
    """Claim a slot and ask Optuna as a worker would, then 'die' (return the row id)."""
    [claim] = claim_cell(engine, info.id, worker_id)
    spec = parse_spec(_spec_text(engine, info.id), "db")
    storage = optuna_storage(url)
    study = optuna.load_study(study_name=claim.study_name, storage=storage)
    trial = study.ask(fixed_distributions=distributions(spec.cell_space(claim.optimizer, claim.schedule)))
    with Session(engine) as session, session.begin():
        session.execute(update(Trial).where(Trial.id == claim.row_id).values(
            optuna_trial_id=trial._trial_id, trial_number=trial.number, hparams=dict(trial.params),
            seed=Attempt.of(trial, spec.seed).seed))
    return claim.row_id


def _spec_text(engine, campaign_id: int) -> str:
    with engine.connect() as connection:
        return connection.execute(text("SELECT spec_text FROM bl_campaigns WHERE id = :c"),
                                  {"c": campaign_id}).scalar()


def _utc_now_naive() -> datetime:
    # What both databases store for "UTC now" in a bound parameter of a raw statement.
    return datetime.now(timezone.utc).replace(tzinfo=None)


def age_heartbeat(engine, row_id: int, seconds: int) -> None:
    with engine.begin() as connection:
        connection.execute(text("UPDATE bl_trials SET heartbeat_at = :t WHERE id = :id"),
                           {"t": _utc_now_naive() - timedelta(seconds=seconds),
                            "id": row_id})


@pytest.fixture(params=["sqlite", "postgresql"])
def any_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'reap.db'}"
    server = request.getfixturevalue("local_postgres")
    return server.create_database(f"reap_{uuid.uuid4().hex[:8]}")


def test_concurrent_reapers_abandon_once_and_requeue_the_same_point(any_url):
    engine, info = create(any_url, spec_text("reap", batch_sizes=(16,), trials_per_cell=2))
    row_id = running_trial(engine, any_url, info)
    assert reap_lost_trials(engine, optuna_storage(any_url), info.id, 5.0) == []  # still fresh
    age_heartbeat(engine, row_id, 30)
    engines = [make_engine(any_url) for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda e: reap_lost_trials(e, optuna_storage(any_url), info.id, 5.0),
                                engines))
    assert sum(len(r) for r in results) == 1  # exactly one reaper won
    rows = trial_rows(engine, info.id)
    assert rows["outcome"].tolist() == ["abandoned"]
    assert rows["message"][0].startswith("worker ghost lost: no heartbeat for ")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT trials_claimed FROM bl_cells")).scalar() == 0
    study = optuna.load_study(study_name=queries.cells(engine, info.id)["study_name"][0],
                              storage=optuna_storage(any_url))
    by_state = {}
    for t in study.trials:
        by_state.setdefault(t.state.name, []).append(t)
    assert len(by_state["FAIL"]) == 1 and len(by_state["WAITING"]) == 2  # the re-run + the 2nd point
    failed, rerun = by_state["FAIL"][0], by_state["WAITING"][-1]
    assert rerun.system_attrs["fixed_params"] == failed.params  # what the next ask() gets
    assert rerun.user_attrs == {ATTEMPT_ATTR: 2, ATTEMPT_OF_ATTR: row_id, SEED_ATTR: int(rows["seed"][0])}


def test_a_reaper_waits_out_each_workers_own_grace(any_url):
    """A worker started with a longer --grace stores it; a reaper with a shorter one
    (`batchlab status`, another worker) leaves its trial alone until that grace is over."""
    engine, info = create(any_url, spec_text("patient", batch_sizes=(16,), trials_per_cell=2))
    worker = CampaignWorker(engine, any_url, "patient", device="cpu", log=lambda line: None,
                            heartbeat_seconds=100.0, grace_seconds=600.0)
    worker._register()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT grace_seconds FROM bl_workers")).scalar() == 600.0
    patient = running_trial(engine, any_url, info, worker.worker_id)
    ghost = running_trial(engine, any_url, info, "ghost")  # no worker row: the reaper's grace
    storage = optuna_storage(any_url)

    def age(seconds: int) -> None:
        for row_id in (patient, ghost):
            age_heartbeat(engine, row_id, seconds)
        with engine.begin() as connection:
            connection.execute(text("UPDATE bl_workers SET heartbeat_at = :t"),
                               {"t": _utc_now_naive() - timedelta(seconds=seconds)})

    def worker_status() -> str:
        with engine.connect() as connection:
            return connection.execute(text("SELECT status FROM bl_workers")).scalar()

    age(120)
    assert [r.trial_row_id for r in reap_lost_trials(engine, storage, info.id, 60.0)] == [ghost]
    assert worker_status() == "running"
    assert trial_rows(engine, info.id).set_index("id").loc[patient, "outcome"] == "running"
    age(700)
    assert [r.trial_row_id for r in reap_lost_trials(engine, storage, info.id, 60.0)] == [patient]
    assert worker_status() == "lost"


@pytest.mark.parametrize("sampler", ["quasi_random", "tpe"])
def test_a_claim_between_a_reapers_slot_and_its_requeue_waits_for_the_point(tmp_path, monkeypatch, sampler):
    """A reaper gives the slot back, then re-queues the point: a claim in that window finds
    no queued point. A plain ask samples a fresh one (the race); `ask_queued`, which the
    worker uses, fails that and gets the re-queued point."""
    url = f"sqlite:///{tmp_path / 'window.db'}"
    text_ = spec_text("window", batch_sizes=(16,), trials_per_cell=2)
    engine, info = create(url, text_ + f'\n[sampler]\nkind = "{sampler}"\n')
    lost = running_trial(engine, url, info, "ghost")
    running_trial(engine, url, info, "other")  # the cell's second and last queued point
    space = distributions(parse_spec(_spec_text(engine, info.id), "db").cell_space("momentum", "constant"))
    storage = optuna_storage(url)
    cell = queries.cells(engine, info.id).iloc[0]
    cell_id = int(cell["cell_id"])
    study = optuna.load_study(study_name=cell["study_name"], storage=storage)
    assert not rerun_pending(engine, cell_id)
    asked = {}

    def claim_and_ask() -> None:
        assert claim_cell(engine, info.id, "late")  # the slot is back already
        [asked["queued"]] = ask_queued(storage, study.study_name, space, 1,
                                       point_pending=lambda popped: rerun_pending(engine, cell_id, popped),
                                       draw=lambda n: draw(study, storage, space, n))

    real_requeue = recovery.requeue

    def requeue_later(*args, **kwargs):
        asked["plain"] = study.ask(fixed_distributions=space)  # what a plain ask gets here
        late = threading.Thread(target=claim_and_ask)
        late.start()
        time.sleep(0.3)  # the late claim asks, and finds nothing queued, before the re-queue
        assert rerun_pending(engine, cell_id)
        done = real_requeue(*args, **kwargs)
        late.join()
        return done
    monkeypatch.setattr(recovery, "requeue", requeue_later)
    assert abandon_trial(engine, storage, lost, "lost")
    row = trial_rows(engine, info.id).set_index("id").loc[lost]
    lost_point = json.loads(row["hparams"])
    sampled = storage.get_trial(asked["plain"]._trial_id)
    assert "fixed_params" not in sampled.system_attrs and sampled.params != lost_point  # the race
    rerun = storage.get_trial(asked["queued"].trial_id)
    assert rerun.params == lost_point and rerun.user_attrs[ATTEMPT_ATTR] == 2
    # nothing was drawn (and failed) while the re-run was pending: the lost trial is the only failure
    assert [t.number for t in study.trials if t.state.name == "FAIL"] == [int(row["trial_number"])]


def test_a_claim_between_a_given_back_slot_and_its_requeue_waits_for_the_point(tmp_path, monkeypatch):
    """A stopping worker gives a prefetched slot back, then re-queues the point it had
    asked. A claim in between finds the queue empty: in a quasi-random cell (every point
    queued) it waits for that point, where a draw would duplicate a point and leave the
    planned one unrun."""
    url = f"sqlite:///{tmp_path / 'giveback.db'}"
    engine, info = create(url, spec_text("giveback", batch_sizes=(16,), trials_per_cell=2))
    first, stopping, late = (CampaignWorker(engine, url, "giveback", device="cpu", log=lambda line: None)
                             for _ in range(3))
    [(_, trained, _)] = first._ask_group(first._claim_group(1)).started
    [(claim, prefetched, _)] = stopping._ask_group(stopping._claim_group(1)).started
    got = {}
    requeue_now = stopping._requeue_unrecorded

    def requeue_later(claim, trial):
        thread = threading.Thread(target=lambda: got.update(group=late._ask_group(late._claim_group(1))))
        thread.start()
        time.sleep(0.3)  # the late claim has the slot and finds no queued point
        requeue_now(claim, trial)
        thread.join()
    monkeypatch.setattr(stopping, "_requeue_unrecorded", requeue_later)
    stopping._give_back(claim, prefetched)
    [(_, asked, _)] = got["group"].started
    assert asked.params == prefetched.params != trained.params
    study = optuna.load_study(study_name=claim.study_name, storage=optuna_storage(url))
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "RUNNING", "RUNNING"]  # nothing drawn


def test_a_popped_rerun_is_not_waited_for(tmp_path):
    """A group that pops a lost trial's re-run with other points draws the others at once:
    the re-run it holds is pending only until the group is recorded."""
    url = f"sqlite:///{tmp_path / 'popped.db'}"
    engine, info = create(url, spec_text("popped", batch_sizes=(16,), trials_per_cell=3)
                          + '\n[sampler]\nkind = "tpe"\n')
    lost = running_trial(engine, url, info, "ghost")
    storage = optuna_storage(url)
    assert abandon_trial(engine, storage, lost, "lost")
    cell = queries.cells(engine, info.id).iloc[0]
    cell_id = int(cell["cell_id"])
    study = optuna.load_study(study_name=cell["study_name"], storage=storage)
    space = distributions(parse_spec(_spec_text(engine, info.id), "db").cell_space("momentum", "constant"))
    answers = []

    def pending(popped):
        answers.append(rerun_pending(engine, cell_id, popped))
        return answers[-1]

    assert rerun_pending(engine, cell_id)  # queued, not yet asked
    rerun, *drawn = ask_queued(storage, study.study_name, space, 3, point_pending=pending,
                               draw=lambda n: draw(study, storage, space, n), wait_seconds=60)
    assert answers == [False]  # asked once, not waited on
    lost_point = json.loads(trial_rows(engine, info.id).set_index("id").loc[lost]["hparams"])
    assert rerun.params == lost_point and rerun.user_attrs[ATTEMPT_ATTR] == 2
    assert len(drawn) == 2 and all(t.params != lost_point and not t.user_attrs for t in drawn)
    assert rerun_pending(engine, cell_id)  # for others, until the re-run's row is recorded


def test_a_heartbeat_during_the_storage_threads_transaction_does_not_deadlock(local_postgres):
    """The storage thread updates a worker's trial rows, then its worker row, in one
    transaction; a heartbeat in the middle of it must wait on the same order. (It used to
    take the worker row first: PostgreSQL then aborted one of the two as a deadlock, which
    the 32-worker load test caught once in CI.)"""
    url = local_postgres.create_database(f"beat_{uuid.uuid4().hex[:8]}")
    engine, info = create(url, spec_text("beat", batch_sizes=(16,), trials_per_cell=2))
    with Session(engine) as session, session.begin():
        session.add(Worker(id="w", campaign_id=info.id, host="h", pid=1, device="cpu"))
    rows = [running_trial(engine, url, info, "w") for _ in range(2)]
    heartbeat = Heartbeat(engine, "w", 1.0, log=print)
    heartbeat.trial_row_ids = frozenset(rows)
    errors = []

    def beat():
        try:
            heartbeat.beat()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    with Session(make_engine(url)) as session, session.begin():  # what _mark_started does
        session.execute(update(Trial).where(Trial.id.in_(rows)).values(started_at=_utc_now_naive()))
        beating = threading.Thread(target=beat)
        beating.start()
        time.sleep(0.5)  # the heartbeat now waits for a lock this transaction holds
        assert beating.is_alive()
        session.execute(update(Worker).where(Worker.id == "w").values(current_trial_id=rows[-1]))
    beating.join(timeout=10)
    assert not beating.is_alive() and errors == []
    with engine.connect() as connection:
        assert connection.execute(text("SELECT current_trial_id FROM bl_workers")).scalar() == rows[-1]


def test_a_worker_marked_lost_that_beats_again_is_running_again(tmp_path):
    """A live worker cut off from the database for longer than the grace is marked `lost`
    (and loses its trial to a re-run); once its heartbeats get through again it carries
    on with the campaign, and its row must say so: the dashboard counts only `running`
    workers as live, and a `lost` one stayed `lost` until it exited."""
    url = f"sqlite:///{tmp_path / 'back.db'}"
    engine, info = create(url, spec_text("back", batch_sizes=(16,), trials_per_cell=1))
    with Session(engine) as session, session.begin():
        session.add(Worker(id="w", campaign_id=info.id, host="h", pid=1, device="cpu"))
    with engine.begin() as connection:
        connection.execute(text("UPDATE bl_workers SET heartbeat_at = :t"),
                           {"t": _utc_now_naive() - timedelta(seconds=120)})
    reap_lost_trials(engine, optuna_storage(url), info.id, 60.0)

    def status() -> str:
        with engine.connect() as connection:
            return connection.execute(text("SELECT status FROM bl_workers")).scalar()
    assert status() == "lost"
    heartbeat = Heartbeat(engine, "w", 1.0, log=print)
    assert not heartbeat.fresh(3600.0)  # no beat has committed yet
    heartbeat.beat()  # the database is reachable again
    assert status() == "running"
    assert heartbeat.fresh(3600.0) and not heartbeat.fresh(0.0)
    cut_off = Heartbeat(make_engine(f"sqlite:///{tmp_path / 'empty.db'}"), "w", 1.0, log=print)  # no tables
    with pytest.raises(Exception):
        cut_off.beat()
    assert not cut_off.fresh(3600.0)  # a beat that failed is no sign of life
    reap_lost_trials(engine, optuna_storage(url), info.id, 60.0)
    assert status() == "running"


def test_reaper_settles_a_trial_killed_between_claim_and_ask(tmp_path):
    """A worker that died after Optuna gave it a point but before it recorded the point:
    its row is abandoned by heartbeat, its Optuna trial is swept and its point re-queued."""
    url = f"sqlite:///{tmp_path / 'orphan.db'}"
    engine, info = create(url, spec_text("orphan", batch_sizes=(16,), trials_per_cell=1))
    [claim] = claim_cell(engine, info.id, "ghost")
    storage = optuna_storage(url)
    study = optuna.load_study(study_name=claim.study_name, storage=storage)
    point = study.ask(fixed_distributions=distributions(
        parse_spec(_spec_text(engine, info.id), "db").cell_space("momentum", "constant"))).params
    age_heartbeat(engine, claim.row_id, 30)
    assert len(reap_lost_trials(engine, storage, info.id, 0.5)) == 1
    time.sleep(0.6)  # the Optuna trial must also be older than the grace period
    reap_lost_trials(engine, storage, info.id, 0.5)
    states = [(t.state.name, t.params or t.system_attrs.get("fixed_params")) for t in study.trials]
    assert states == [("FAIL", point), ("WAITING", point)]


def test_a_live_workers_ask_is_not_swept_whatever_the_clocks_say(any_url):
    """Between a live worker's ask and its recording of the point, the Optuna trial is
    RUNNING and no row names it. Optuna stamps its start with the asking machine's local
    clock: a reaper whose clock reads hours ahead (another time zone, a wrong clock) took
    it for an orphan, failed it and queued its point again, so the point ran twice and the
    worker's tell was lost. What tells a live ask from an orphan is the worker's claimed,
    unrecorded row and its heartbeat, on the database's clock."""
    engine, info = create(any_url, spec_text("clocks", batch_sizes=(16,), trials_per_cell=2))
    storage = optuna_storage(any_url)
    [claim] = claim_cell(engine, info.id, "alive")
    study = optuna.load_study(study_name=claim.study_name, storage=storage)
    asked = study.ask(fixed_distributions=distributions(
        parse_spec(_spec_text(engine, info.id), "db").cell_space("momentum", "constant")))
    with engine.begin() as connection:  # started "a day ago" by the asking machine's clock
        connection.execute(text("UPDATE trials SET datetime_start = :t WHERE trial_id = :id"),
                           {"t": datetime.now() - timedelta(days=1), "id": asked._trial_id})
    assert reap_lost_trials(engine, storage, info.id, 60.0) == []
    assert storage.get_trial(asked._trial_id).state == optuna.trial.TrialState.RUNNING
    # The worker dies before recording: once its row's heartbeat is older than the grace,
    # the ask is an orphan and its point is queued again.
    age_heartbeat(engine, claim.row_id, 120)
    assert [r.trial_row_id for r in reap_lost_trials(engine, storage, info.id, 60.0)] == [claim.row_id]
    assert storage.get_trial(asked._trial_id).state == optuna.trial.TrialState.FAIL
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "WAITING", "WAITING"]


def test_a_rerun_popped_by_a_worker_that_died_before_recording_it_keeps_its_attempt(tmp_path):
    """A lost trial's re-run (attempt 2) is popped by a worker that dies before recording
    it. The sweep re-queues the point as the same attempt (as a worker giving a popped
    point back does): it was never run, and the abandoned attempt 1 still waits for its
    attempt-2 row. Queued as attempt 3 instead, attempt 1 looked pending for ever and
    every later TPE ask in the cell waited REQUEUE_WAIT_SECONDS for a point that never
    came."""
    from study.tuning import pop_queued
    url = f"sqlite:///{tmp_path / 'popdead.db'}"
    engine, info = create(url, spec_text("popdead", batch_sizes=(16,), trials_per_cell=2, max_steps=20)
                          + '\n[sampler]\nkind = "tpe"\n')
    storage = optuna_storage(url)
    cell = queries.cells(engine, info.id).iloc[0]
    cell_id = int(cell["cell_id"])
    space = distributions(parse_spec(_spec_text(engine, info.id), "db").cell_space("momentum", "constant"))
    first = running_trial(engine, url, info, "ghost")
    assert abandon_trial(engine, storage, first, "lost")
    [claim] = claim_cell(engine, info.id, "ghost2")
    [popped] = pop_queued(storage, cell["study_name"], space, 1)  # ... and the worker dies here
    assert popped.user_attrs[ATTEMPT_ATTR] == 2 and popped.user_attrs[ATTEMPT_OF_ATTR] == first
    age_heartbeat(engine, claim.row_id, 30)
    assert [r.trial_row_id for r in reap_lost_trials(engine, storage, info.id, 0.5)] == [claim.row_id]
    time.sleep(0.6)  # the Optuna trial must also be older than the grace period
    reap_lost_trials(engine, storage, info.id, 0.5)
    study = optuna.load_study(study_name=cell["study_name"], storage=storage)
    [waiting] = [t for t in study.trials if t.state.name == "WAITING"]
    assert waiting.user_attrs[ATTEMPT_ATTR] == 2 and waiting.user_attrs[ATTEMPT_OF_ATTR] == first
    assert CampaignWorker(engine, url, "popdead", device="cpu", log=lambda line: None).run() == 2
    assert not rerun_pending(engine, cell_id)
    rows = trial_rows(engine, info.id).set_index("id")
    rerun = rows[rows["attempt_of"] == first]
    assert rerun["attempt"].tolist() == [2] and rerun["outcome"].tolist() == ["not_reached"]
    assert rerun["seed"].tolist() == [rows.loc[first, "seed"]]
    assert json.loads(rerun["hparams"].iloc[0])["learning_rate"] == popped.params["learning_rate"]
    assert sorted(rows["outcome"]) == ["abandoned", "abandoned", "not_reached", "not_reached"]
    states = sorted(t.state.name for t in study.trials)
    assert states == ["FAIL", "FAIL", "PRUNED", "PRUNED"], states  # not_reached is told PRUNED


# ----- real worker processes ------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_abandons_and_a_new_worker_resumes_with_identical_measurements(tmp_path):
    url = f"sqlite:///{tmp_path / 'term.db'}"
    engine, info = create(url, spec_text("term", batch_sizes=(16,), trials_per_cell=2,
                                         max_steps=3000, eval_every=10))
    first = start_worker(url, "term", log=tmp_path / "first.log")
    wait_for(lambda: (trial_rows(engine, info.id)["trial_number"] >= 0).any(), 90, "a trial to start")
    row_id = int(trial_rows(engine, info.id)["id"][0])
    wait_for(lambda: measured_steps(engine, row_id) >= 5, 60, "some measurements")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 143, (tmp_path / "first.log").read_text()  # 128 + SIGTERM
    assert "Traceback" not in (tmp_path / "first.log").read_text()
    rows = trial_rows(engine, info.id)
    assert rows["outcome"].tolist() == ["abandoned"] and rows["message"][0] == "worker stopped by a signal"
    kept = measured_steps(engine, row_id)
    assert kept >= 5  # the dead attempt's measurements stay, marked by its outcome
    second = start_worker(url, "term", log=tmp_path / "second.log")
    assert second.wait(timeout=240) == 0, (tmp_path / "second.log").read_text()
    rows = check_exact_accounting(engine, url, info.id, 2)
    assert rows["outcome"].tolist().count("abandoned") == 1 and len(rows) == 3
    rerun = rows[rows["attempt_of"] == row_id].iloc[0]
    assert rerun["attempt"] == 2
    assert measured_steps(engine, row_id) == kept  # nothing added to the dead attempt
    # Reproducibility: the re-run (same seed, CPU) measured exactly what the first attempt did.
    ms = queries.measurements(engine, info.id)
    columns = ["step", "examples", "learning_rate", "train_loss", "val_loss", "val_error"]
    dead = ms[ms["trial_id"] == row_id][columns].reset_index(drop=True)
    again = ms[ms["trial_id"] == rerun["id"]][columns].head(len(dead)).reset_index(drop=True)
    pd.testing.assert_frame_equal(dead, again, check_exact=True)
    workers = queries.workers(engine, info.id)
    assert sorted(workers["status"]) == ["finished", "stopped"]


@pytest.mark.slow
def test_kill_9_of_random_workers_on_postgres(local_postgres, tmp_path):
    url = local_postgres.create_database(f"kill_{uuid.uuid4().hex[:8]}")
    engine, info = create(url, spec_text("kill", batch_sizes=(8, 32), trials_per_cell=6,
                                         max_steps=150, eval_every=10))
    logs = tmp_path / "workers.log"
    workers = [start_worker(url, "kill", log=logs) for _ in range(4)]
    # every worker registered (a worker claims ahead, so 4 trial rows may be 2 workers')
    wait_for(lambda: set(queries.workers(engine, info.id)["pid"]) >= {w.pid for w in workers}
             and (trial_rows(engine, info.id)["trial_number"] >= 0).sum() >= 4, 120,
             "every worker to register and trials to start")
    rng = random.Random(7)
    victims = rng.sample(workers, 2)
    for victim in victims:
        time.sleep(rng.uniform(0.0, 1.0))
        os.kill(victim.pid, signal.SIGKILL)
    workers += [start_worker(url, "kill", log=logs)]
    survivors = [w for w in workers if w not in victims]
    assert wait_all(survivors, 300) == [0] * len(survivors), logs.read_text()[-3000:]
    assert [v.wait() for v in victims] == [-9, -9]
    rows = check_exact_accounting(engine, url, info.id, 6)
    lost = rows[rows["message"].str.contains("lost: no heartbeat", na=False)]
    assert len(lost) >= 1 and set(lost["outcome"]) == {"abandoned"}
    status = queries.workers(engine, info.id).set_index("pid")["status"]
    assert {status[v.pid] for v in victims} == {"lost"}


@pytest.mark.slow
def test_postgres_restart_mid_campaign(local_postgres, tmp_path):
    url = local_postgres.create_database(f"restart_{uuid.uuid4().hex[:8]}")
    engine, info = create(url, spec_text("restart", batch_sizes=(8, 32), trials_per_cell=4,
                                         max_steps=200, eval_every=10))
    logs = tmp_path / "workers.log"
    # A grace longer than the restart: no live trial is taken for a lost one.
    workers = [start_worker(url, "restart", grace=30, heartbeat=1, log=logs) for _ in range(3)]
    # Every worker registered too: one worker can hold three rows (it claims ahead), and a
    # worker still starting up when the server goes down exits (start-up is not retried).
    wait_for(lambda: set(queries.workers(engine, info.id)["pid"]) >= {w.pid for w in workers}
             and (trial_rows(engine, info.id)["trial_number"] >= 0).sum() >= 3, 120,
             "every worker to register and trials to start")
    finished_before = int(trial_rows(engine, info.id)["outcome"].isin(FINISHED_OUTCOMES).sum())
    engine.dispose()
    local_postgres.restart()
    assert finished_before < 8  # the restart came mid-campaign
    assert wait_all(workers, 300) == [0, 0, 0], logs.read_text()[-3000:]
    rows = check_exact_accounting(engine, url, info.id, 4)
    assert (rows["outcome"] != "abandoned").all()
    # The workers carried on across the restart: a failed heartbeat or a retried
    # transaction is logged when one fell inside it; pool_pre_ping may hide a short one.
