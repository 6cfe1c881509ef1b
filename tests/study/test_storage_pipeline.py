"""The worker's storage pipeline (study/pipeline.py): storage jobs run in order on one
background thread, their failures surface in the main thread, measurements are written
in batches (all of them, in order), pruning reads a cached best, and a stop mid-trial
still abandons the trial and gives a prefetched slot back. A fixed campaign stores what
the synchronous worker stored."""
from __future__ import annotations

import textwrap
import threading
import time
from concurrent.futures import Future

import optuna
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from db import queries
from db.engine import make_engine
from study.campaigns import create_campaign
from study.pipeline import CellBest, MeasurementBuffer, StorageJobError, StoragePipeline
from study.results import campaign_info
from study.spec import parse_spec
from study.tuning import optuna_storage
from study.worker import CampaignWorker, trial_seed
from tests.study.test_recovery import check_exact_accounting, spec_text, trial_rows


# ----- the pieces -------------------------------------------------------------------------
def test_jobs_run_in_order_on_one_thread():
    pipeline = StoragePipeline("t")
    seen, threads = [], set()

    def job(i):
        time.sleep(0.001 * (5 - i))  # later jobs are quicker: order must still hold
        seen.append(i)
        threads.add(threading.get_ident())
        return i * i
    futures = [pipeline.submit(f"job {i}", job, i) for i in range(5)]
    assert pipeline.wait(futures[2]) == 4
    pipeline.drain()
    pipeline.close()
    assert seen == [0, 1, 2, 3, 4] and len(threads) == 1 and threading.get_ident() not in threads


def test_waiting_for_a_job_does_not_wait_for_the_jobs_queued_after_it():
    # The worker waits for a group prepared long ago, right after queueing the previous
    # trials' finishes; a submit in between has already taken the done job off the queue.
    pipeline = StoragePipeline("t")
    prepared = pipeline.submit("prepare", lambda: "group")
    prepared.result()
    release = threading.Event()
    later = pipeline.submit("finish", release.wait, 10)  # its submit takes `prepared` off
    start = time.monotonic()
    assert pipeline.wait(prepared) == "group"
    assert time.monotonic() - start < 1 and not later.done()
    release.set()
    pipeline.drain()
    pipeline.close()


def test_a_failed_job_surfaces_in_the_main_thread():
    pipeline = StoragePipeline("t")

    def broken():
        raise ValueError("disk on fire")
    pipeline.submit("writing measurements", broken)
    time.sleep(0.05)
    with pytest.raises(StorageJobError, match="writing measurements: ValueError: disk on fire"):
        pipeline.submit("next", lambda: None)
    failed = pipeline.submit("again", broken)
    with pytest.raises(StorageJobError, match="again"):
        pipeline.wait(failed)
    pipeline.submit("last", broken)
    with pytest.raises(StorageJobError, match="last"):
        pipeline.drain()
    logged = []
    pipeline.submit("while stopping", broken)
    pipeline.settle(logged.append)
    assert logged == ["storage job failed while stopping: while stopping: ValueError: disk on fire"]
    pipeline.close()


def test_measurement_buffer_batches_by_time_and_size():
    now = [0.0]
    buffer = MeasurementBuffer(flush_seconds=1.0, max_rows=3, clock=lambda: now[0])
    assert buffer.add({"step": 10}) == [{"step": 10}]  # the first one goes at once
    now[0] = 0.3
    assert buffer.add({"step": 20}) is None
    now[0] = 0.6
    assert buffer.add({"step": 30}) is None
    now[0] = 1.1  # a second since the last batch
    assert buffer.add({"step": 40}) == [{"step": 20}, {"step": 30}, {"step": 40}]
    for step in (50, 60):
        assert buffer.add({"step": step}) is None
    assert buffer.add({"step": 70}) == [{"step": 50}, {"step": 60}, {"step": 70}]  # max_rows
    assert buffer.add({"step": 80}) is None and len(buffer) == 1
    assert buffer.take() == [{"step": 80}] and buffer.take() == []


def finish_job(recorded=None) -> Future:
    future = Future()
    if recorded is not None:
        future.set_result(recorded)
    return future


def test_cell_best_counts_own_results_once_recorded_and_refreshes_at_most_every_interval():
    now = [0.0]
    best = CellBest(refresh_seconds=1.0, clock=lambda: now[0])
    assert best.value(7) is None
    assert best.claim_refresh(7) and not best.claim_refresh(7)  # one refresh in flight
    best.store(7, 90)
    assert best.value(7) == 90 and not best.claim_refresh(7)
    pending = finish_job()
    best.reached(7, 60, pending)
    assert best.value(7) == 90 and best.unrecorded(7) == [pending]  # not recorded yet
    pending.set_result(True)
    assert best.value(7) == 60 and best.unrecorded(7) == []  # recorded: no read needed
    best.reached(7, 80, finish_job())
    assert best.value(7) == 60 and best.unrecorded(7) == []  # would not lower it
    taken = finish_job()
    best.reached(7, 50, taken)
    assert best.unrecorded(7) == [taken]
    taken.set_result(False)  # a reaper had taken the row: the result never counts
    assert best.value(7) == 60 and best.unrecorded(7) == []
    broken = finish_job()
    broken.set_exception(RuntimeError("finishing failed"))
    best.reached(7, 30, broken)
    assert best.value(7) == 60
    now[0] = 1.5
    assert best.claim_refresh(7)
    best.store(7, 40)  # another worker did better
    assert best.value(7) == 40 and best.value(8) is None


# ----- a worker ---------------------------------------------------------------------------
FIXED = textwrap.dedent("""
    [campaign]
    name = "fixed"
    workload = "digits_mlp"
    batch_sizes = [16, 64]
    optimizers = ["momentum"]
    schedules = ["constant"]
    trials_per_cell = 4
    max_steps = 150
    eval_every = 10
    seed = 5

    [target]
    metric = "val_error"
    threshold = 0.08

    [search_space.optimizer.momentum]
    learning_rate = { low = 0.003, high = 3.0, scale = "log" }
    momentum = { low = 0.5, high = 0.99, scale = "reverse_log" }
""")

# What the synchronous worker (every storage call on the training thread, before the
# pipeline) stored for FIXED: (batch size, trial number) -> (outcome, steps, steps to result).
BEFORE = {
    1: {(16, 0): ("not_reached", 150, None), (16, 1): ("reached", 60, 60), (16, 2): ("pruned", 60, None),
        (16, 3): ("pruned", 60, None), (64, 0): ("not_reached", 150, None), (64, 1): ("reached", 70, 70),
        (64, 2): ("reached", 40, 40), (64, 3): ("pruned", 40, None)},
    4: {(16, 0): ("pruned", 70, None), (16, 1): ("reached", 60, 60), (16, 2): ("pruned", 60, None),
        (16, 3): ("pruned", 60, None), (64, 0): ("pruned", 50, None), (64, 1): ("pruned", 50, None),
        (64, 2): ("reached", 40, 40), (64, 3): ("pruned", 40, None)},
}
BEFORE_MEASUREMENTS = {1: 63, 4: 43}


def campaign(tmp_path, text_: str, name: str):
    url = f"sqlite:///{tmp_path / name}.db"
    engine = make_engine(url)
    create_campaign(engine, url, parse_spec(text_, f"{name}.toml"))
    return url, engine


@pytest.mark.parametrize("k", [1, 4])
def test_fixed_campaign_stores_what_the_synchronous_worker_stored(tmp_path, k):
    url, engine = campaign(tmp_path, FIXED, f"fixed{k}")
    worker = CampaignWorker(engine, url, "fixed", device="cpu", log=lambda line: None, trials_at_once=k)
    assert worker.run() == 8
    info = campaign_info(engine, "fixed")
    trials = queries.trials(engine, info.id)
    got = {(int(r.batch_size), int(r.trial_number)):
           (r.outcome, int(r.steps), None if r.steps_to_result != r.steps_to_result else int(r.steps_to_result))
           for r in trials.itertuples()}
    assert got == BEFORE[k]
    assert sorted(trials["seed"]) == sorted(trial_seed(5, n) for n in range(4) for _ in range(2))
    # Every evaluation stored, once, in the order measured: ids grow with the step.
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT trial_id, step, id FROM bl_measurements ORDER BY id")).all()
    assert len(rows) == BEFORE_MEASUREMENTS[k]
    for trial in trials.itertuples():
        steps = [step for trial_id, step, _ in rows if trial_id == trial.trial_id]
        assert steps == list(range(10, int(trial.steps) + 1, 10))
    workers = queries.workers(engine, info.id)
    assert workers["status"].tolist() == ["finished"] and workers["trials_done"].tolist() == [8]
    assert workers["current_trial_id"].isna().all()


def test_a_failed_measurement_write_stops_the_worker(tmp_path, monkeypatch):
    url, engine = campaign(tmp_path, FIXED, "broken")
    worker = CampaignWorker(engine, url, "fixed", device="cpu", log=lambda line: None)

    def broken(rows):
        raise IntegrityError("INSERT INTO bl_measurements", {}, Exception("constraint"))
    monkeypatch.setattr(worker, "_write_measurements", broken)
    with pytest.raises(StorageJobError, match="writing measurements: IntegrityError"):
        worker.run()
    assert queries.workers(engine, campaign_info(engine, "fixed").id)["status"].tolist() == ["finished"]


def test_ctrl_c_mid_trial_records_the_worker_stopped(tmp_path):
    """Ctrl-C (KeyboardInterrupt) abandons the trials as SIGTERM does and propagates; the
    worker's row says `stopped`, as docs/sql.md promises, not `finished`."""
    url, engine = campaign(tmp_path, spec_text("ctrlc", batch_sizes=(16,), trials_per_cell=2,
                                               max_steps=60, eval_every=10), "ctrlc")
    info = campaign_info(engine, "ctrlc")
    worker = CampaignWorker(engine, url, "ctrlc", device="cpu", log=lambda line: None)
    buffer_measurement = worker._buffer_measurement

    def ctrl_c_at_the_second_evaluation(row_id, m):
        buffer_measurement(row_id, m)
        if m.step == 20:
            raise KeyboardInterrupt
    worker._buffer_measurement = ctrl_c_at_the_second_evaluation
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    assert not worker.stop_requested
    assert queries.workers(engine, info.id)["status"].tolist() == ["stopped"]
    assert trial_rows(engine, info.id)["outcome"].tolist()[0] == "abandoned"


def test_a_stop_mid_trial_abandons_it_and_gives_the_prefetched_slot_back(tmp_path):
    url, engine = campaign(tmp_path, spec_text("stop", batch_sizes=(16,), trials_per_cell=3,
                                               max_steps=60, eval_every=10), "stop")
    info = campaign_info(engine, "stop")
    worker = CampaignWorker(engine, url, "stop", device="cpu", log=lambda line: None)
    buffer_measurement, seen = worker._buffer_measurement, []

    def signal_on_the_second_trials_third_evaluation(row_id, m):
        seen.append(row_id)
        if len(set(seen)) == 2 and seen.count(row_id) == 3:
            worker._request_stop(15, None)  # what SIGTERM's handler does, mid-trial
        buffer_measurement(row_id, m)
    worker._buffer_measurement = signal_on_the_second_trials_third_evaluation
    assert worker.run() == 1 and worker.stop_requested
    rows = trial_rows(engine, info.id)
    first, second = int(rows["id"][0]), int(rows["id"][1])
    assert rows["outcome"].tolist() == ["not_reached", "abandoned"]  # the prefetched row is gone
    assert rows["message"][1] == "worker stopped by a signal"
    with engine.connect() as connection:
        stored = dict(connection.execute(text(
            "SELECT trial_id, COUNT(*) FROM bl_measurements GROUP BY trial_id")).all())
        claimed = connection.execute(text("SELECT trials_claimed FROM bl_cells")).scalar()
    assert stored == {first: 6, second: 2} and claimed == 1
    study = optuna.load_study(study_name=queries.cells(engine, info.id)["study_name"][0],
                              storage=optuna_storage(url))
    assert [t.state.name for t in study.trials] == ["PRUNED", "FAIL", "FAIL", "WAITING", "WAITING"]
    assert queries.workers(engine, info.id)["status"].tolist() == ["stopped"]
    # Another worker finishes the campaign with the same points and seeds.
    assert CampaignWorker(engine, url, "stop", device="cpu", log=lambda line: None).run() == 2
    rows = check_exact_accounting(engine, url, info.id, 3)
    finished = rows[rows["outcome"] != "abandoned"]
    assert sorted(finished["seed"]) == [trial_seed(3, n) for n in range(3)]
    rerun = finished[finished["attempt_of"] == second]
    assert len(rerun) == 1 and int(rerun["attempt"].iloc[0]) == 2


def test_max_trials_counts_prefetched_slots(tmp_path):
    url, engine = campaign(tmp_path, FIXED, "few")
    worker = CampaignWorker(engine, url, "fixed", device="cpu", log=lambda line: None, max_trials=3)
    assert worker.run() == 3
    rows = trial_rows(engine, campaign_info(engine, "fixed").id)
    assert len(rows) == 3 and (rows["outcome"] != "running").all()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT SUM(trials_claimed) FROM bl_cells")).scalar() == 3


@pytest.mark.parametrize("batch_sizes,late_prepare", [((16,), False), ((16,), True), ((16, 32), False)])
def test_tpe_asks_after_the_cells_previous_trials_are_told(tmp_path, batch_sizes, late_prepare):
    """TPE's next point depends on its cell's results told so far: it is prefetched while
    a trial of another cell trains, and asked after the tells while one of its own does,
    also when that trial has finished but is not told yet (`late_prepare`: the prepare job
    runs after the trial ended, before its finish job)."""
    text_ = spec_text("tpe", batch_sizes=batch_sizes, trials_per_cell=3, max_steps=20, eval_every=10)
    text_ = text_.replace("[target]", '[sampler]\nkind = "tpe"\n\n[target]')
    url, engine = campaign(tmp_path, text_, "tpe")
    worker = CampaignWorker(engine, url, "tpe", device="cpu", log=lambda line: None)
    assert not worker.points_enqueued
    asks = []  # (cell's study, trials of it told before the ask, asked ahead of time)
    ask_group, prepare = worker._ask_group, worker._prepare
    ahead = threading.local()

    def checked(group):
        name = group.claims[0].study_name
        study = optuna.load_study(study_name=name, storage=optuna_storage(url))
        asks.append((name, sum(t.state.is_finished() for t in study.trials), getattr(ahead, "on", False)))
        return ask_group(group)

    def prepared(room):
        if late_prepare:
            time.sleep(0.5)  # the trial training meanwhile ends and queues its finish
        ahead.on = True
        try:
            return prepare(room)
        finally:
            ahead.on = False
    worker._ask_group, worker._prepare = checked, prepared
    trials = 3 * len(batch_sizes)
    assert worker.run() == trials
    for name in {name for name, *_ in asks}:  # in each cell, every earlier trial was told
        assert [told for n, told, _ in asks if n == name] == [0, 1, 2]
    # one cell: never asked ahead; two: the worker alternates between them, and every group
    # but the first is asked ahead
    assert [ahead for *_, ahead in asks] == ([False] * 3 if trials == 3 else [False] + [True] * 5)
    rows = trial_rows(engine, campaign_info(engine, "tpe").id)
    assert len(rows) == trials and (rows["outcome"] == "not_reached").all()


def test_an_ask_no_row_names_is_settled_by_the_sweep_or_once_the_campaign_is_complete(tmp_path):
    """A database restart can swallow the acknowledgement of an ask whose commit went
    through; the retried ask leaves an Optuna trial RUNNING that no row names. With no
    live worker's unrecorded row in its cell, the sweep settles it (this one drew no point:
    failed, nothing re-queued). Once no slot is free and no row runs, the worker that finds
    the campaign complete fails any such trial left."""
    from study.recovery import fail_orphaned_asks
    url, engine = campaign(tmp_path, spec_text("orphan", batch_sizes=(16,), trials_per_cell=1,
                                               max_steps=10, eval_every=10), "orphan")
    info = campaign_info(engine, "orphan")
    storage = optuna_storage(url)
    study = optuna.load_study(study_name=queries.cells(engine, info.id)["study_name"][0], storage=storage)
    study.ask()  # the lost one: RUNNING, no row
    assert fail_orphaned_asks(engine, storage, info.id) == 0  # a slot is free: it may be a live ask
    assert CampaignWorker(engine, url, "orphan", device="cpu", log=lambda line: None).run() == 1
    states = [t.state.name for t in study.trials]
    assert states.count("RUNNING") == 0 and states.count("FAIL") == 1, states
    check_exact_accounting(engine, url, info.id, 1)
    late = study.ask()  # after the last trial: complete, so no worker can be asking
    assert fail_orphaned_asks(engine, storage, info.id) == 1
    assert storage.get_trial(late._trial_id).state.name == "FAIL"


def test_a_point_requeued_after_its_cells_last_ask_is_failed_once_the_campaign_is_complete(tmp_path):
    """A reaper (or the sweep of an unrecorded ask) can re-queue a dead attempt's point
    after its slot was already re-claimed and asked, when that was the cell's last slot:
    the re-run drew a fresh point and the re-queued one would stay WAITING for ever. While
    slots are free WAITING points are the plan and are left alone; once the campaign is
    complete the stranded one is failed and tagged."""
    from study.recovery import UNUSED_ATTR, fail_orphaned_asks
    url, engine = campaign(tmp_path, spec_text("stranded", batch_sizes=(16,), trials_per_cell=2,
                                               max_steps=10, eval_every=10), "stranded")
    info = campaign_info(engine, "stranded")
    storage = optuna_storage(url)
    study = optuna.load_study(study_name=queries.cells(engine, info.id)["study_name"][0], storage=storage)
    assert [t.state.name for t in study.trials] == ["WAITING", "WAITING"]  # the enqueued plan
    assert fail_orphaned_asks(engine, storage, info.id) == 0
    assert [t.state.name for t in study.trials] == ["WAITING", "WAITING"]
    assert CampaignWorker(engine, url, "stranded", device="cpu", log=lambda line: None).run() == 2
    study.enqueue_trial(dict(study.trials[0].params))  # the late re-queue
    assert fail_orphaned_asks(engine, storage, info.id) == 1
    stranded = study.trials[-1]
    assert stranded.state.name == "FAIL" and UNUSED_ATTR in stranded.user_attrs
    assert fail_orphaned_asks(engine, storage, info.id) == 0  # settled once
    check_exact_accounting(engine, url, info.id, 2)


def test_workers_draw_different_tpe_points(tmp_path):
    """Each worker seeds its TPE sampler with its own id: two workers (or one restarted)
    of a TPE cell draw different random start-up points, not the same ones twice."""
    text_ = spec_text("tpe_seeds", batch_sizes=(16,), trials_per_cell=6, max_steps=20, eval_every=10)
    url, engine = campaign(tmp_path, text_.replace("[target]", '[sampler]\nkind = "tpe"\n\n[target]'), "tpe_seeds")
    points = []
    for _ in range(2):
        worker = CampaignWorker(engine, url, "tpe_seeds", device="cpu", log=lambda line: None, trials_at_once=3)
        points += [tuple(sorted(trial.params.items()))
                   for _, trial, _ in worker._ask_group(worker._claim_group(3)).started]
    assert len(points) == 6 and len(set(points)) == 6


def test_a_trial_waiting_for_its_finish_is_still_heartbeated(tmp_path):
    """A trial's result waits in the storage thread's queue behind the jobs before it (here
    a slow prepare of the next trial, such as an ask waiting for a re-queued point). Its
    row must keep its heartbeat meanwhile: the worker is alive, and a reaper (its own,
    before its next claim) must not abandon the finished trial and discard its result."""
    url, engine = campaign(tmp_path, spec_text("slow", batch_sizes=(16,), trials_per_cell=2,
                                               max_steps=20, eval_every=10), "slow")
    logged = []
    worker = CampaignWorker(engine, url, "slow", device="cpu", log=logged.append,
                            heartbeat_seconds=0.2, grace_seconds=1.0)
    prepare, calls = worker._prepare, []

    def slow_prepare(room):
        calls.append(room)
        if len(calls) == 1:  # prepared while the first trial trains, and longer than the grace
            time.sleep(3.5)
        return prepare(room)
    worker._prepare = slow_prepare
    assert worker.run() == 2
    rows = trial_rows(engine, campaign_info(engine, "slow").id)
    assert rows["outcome"].tolist() == ["not_reached", "not_reached"], (rows, logged)
    assert not any("abandoned" in line for line in logged), logged


def test_pruning_never_uses_an_own_result_that_a_reaper_took(tmp_path):
    """A worker prunes its next trials against its own reached result at once, before the
    storage thread has recorded it. If a reaper took that trial's row meanwhile (the worker
    was considered dead: cut off from the database for longer than the grace), the result
    is discarded and never counts: a trial pruned against it was censored where the cell
    had no such result. Every pruned trial must be recorded at or after a step some
    recorded trial of its cell reached at."""
    from study.recovery import abandon_trial
    from study.worker import best_steps
    url, engine = campaign(tmp_path, FIXED.replace("batch_sizes = [16, 64]", "batch_sizes = [16]"), "taken")
    worker = CampaignWorker(engine, url, "fixed", device="cpu", log=lambda line: None)
    storage = optuna_storage(url)
    finish_trial, taken, pruned = worker._finish_trial, [], []

    def finish_after_a_reaper(row_id, result, rows=(), trial=None):
        if result.outcome == "reached" and not taken:  # the reaper wins the race for the row
            taken.append(row_id)
            time.sleep(1.0)  # a slow finish: the next trial evaluates meanwhile
            assert abandon_trial(engine, storage, row_id, "worker lost: no heartbeat for 61 s")
        finished = finish_trial(row_id, result, rows, trial)
        if finished and result.outcome == "pruned":  # what the cell had when it was recorded
            pruned.append((result.steps, best_steps(engine, cell_id)))
        return finished
    cell_id = int(queries.cells(engine, campaign_info(engine, "fixed").id)["cell_id"][0])
    worker._finish_trial = finish_after_a_reaper
    worker.heartbeat.fresh = lambda within_seconds: False  # cut off: no beat gets through
    assert worker.run() == 4
    rows = trial_rows(engine, campaign_info(engine, "fixed").id)
    assert taken and rows.set_index("id").loc[taken[0], "outcome"] == "abandoned"
    for steps, best in pruned:
        assert best is not None and best <= steps, (pruned, rows)
    check_exact_accounting(engine, url, campaign_info(engine, "fixed").id, 4)
