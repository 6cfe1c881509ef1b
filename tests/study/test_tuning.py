"""study.tuning: pop_queued, draw and tell, the worker's cheaper ask of enqueued points
and of TPE's points (several trials at once) and its tell (in the worker's own
transaction), against Optuna's Study.ask and Study.tell."""
from __future__ import annotations

import dataclasses
import threading
import uuid

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from study.tuning import (Asked, create_running, draw, enqueue_points, optuna_storage, outcome_state,
                          pop_queued, tell)

DISTS = {"learning_rate": FloatDistribution(1e-3, 1.0, log=True),
         "one_minus_momentum": FloatDistribution(0.01, 0.2, log=True),
         "width": IntDistribution(16, 256, log=True),
         "act": CategoricalDistribution(["relu", "tanh"])}
POINTS = [{"learning_rate": 0.01 * (i + 1), "one_minus_momentum": 0.02 + 0.01 * i,
           "width": 16 * (i + 1), "act": ["relu", "tanh"][i % 2]} for i in range(6)]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuning.db'}"
    return request.getfixturevalue("local_postgres").create_database(f"tuning_{uuid.uuid4().hex[:8]}")


def queued_study(storage, name: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(0))
    for i, point in enumerate(POINTS):
        # a re-queued point carries its attempt as user attributes (study.recovery.requeue)
        study.enqueue_trial(point, user_attrs={"attempt": 2} if i == 2 else None)
    return study


def frozen(storage, trial_id: int) -> dict:
    t = storage.get_trial(trial_id)
    return {"number": t.number, "state": t.state, "params": t.params, "distributions": t.distributions,
            "user_attrs": t.user_attrs, "system_attrs": t.system_attrs, "started": t.datetime_start is not None}


def in_threads(target, count: int) -> None:
    """target(0), ..., target(count - 1) in threads at once, as separate workers run."""
    threads = [threading.Thread(target=target, args=(w,)) for w in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_pop_queued_gives_what_study_ask_gives(tmp_path):
    storage = optuna_storage(f"sqlite:///{tmp_path / 'tuning.db'}")
    asked, popped = queued_study(storage, "asked"), queued_study(storage, "popped")
    by_ask = [asked.ask(fixed_distributions=DISTS) for _ in POINTS]
    by_pop = pop_queued(storage, "popped", DISTS, 1) + pop_queued(storage, "popped", DISTS, 4)
    by_pop += pop_queued(storage, "popped", DISTS, 3)  # asks for more than is left
    assert len(by_pop) == len(by_ask)
    for one, other in zip(by_pop, by_ask):
        assert frozen(storage, one.trial_id) == frozen(storage, other._trial_id)
        # the same number, parameters and user attributes (another study: another id)
        assert dataclasses.replace(one, trial_id=other._trial_id) == Asked.of(other)
        popped.tell(one.number, 1.0)  # a popped trial is told like an asked one
    assert pop_queued(storage, "popped", DISTS, 2) == []  # the queue is empty: the caller samples
    assert [t.state.name for t in popped.trials] == ["COMPLETE"] * len(POINTS)
    assert [t.params for t in popped.trials] == POINTS


def test_concurrent_pops_take_every_point_exactly_once(url):
    storage = optuna_storage(url)
    for i in range(4):
        queued_study(storage, f"cell{i}")  # 24 points in 4 studies
    taken: list[tuple[str, int, dict]] = []
    lock = threading.Lock()

    def drain(worker: int) -> None:
        own = optuna_storage(url)  # one storage (engine) per worker, as in separate processes
        for i in (worker % 4, (worker + 1) % 4):
            while trials := pop_queued(own, f"cell{i}", DISTS, 1 + worker % 3):
                with lock:
                    taken.extend((f"cell{i}", trial.number, trial.params) for trial in trials)

    in_threads(drain, 8)
    assert sorted((name, number) for name, number, _ in taken) == \
        [(f"cell{i}", n) for i in range(4) for n in range(len(POINTS))]
    assert all(params == POINTS[number] for _, number, params in taken)


def test_a_pop_takes_at_most_count_whatever_plan_postgresql_picks(request):
    """With statistics that say no trial is WAITING (e.g. ANALYZEd after earlier campaigns
    finished), PostgreSQL ran the LIMIT ... SKIP LOCKED subquery once per outer row of a
    nested-loop semi-join, each run skipping the rows already updated: a pop of 1 took
    every WAITING trial, and the worker dropped the extras (their points were lost, and
    drawn points trained in their place). The candidates are now materialised once."""
    from sqlalchemy import text
    url = request.getfixturevalue("local_postgres").create_database(f"tuning_{uuid.uuid4().hex[:8]}")
    storage = optuna_storage(url)
    study = optuna.create_study(study_name="stats", storage=storage)
    for i in range(300):
        study.enqueue_trial({"learning_rate": 1e-3 * (1 + i % 900)})
    with storage.engine.begin() as connection:
        connection.execute(text("UPDATE trials SET state = 'COMPLETE'"))
        connection.execute(text("ANALYZE trials"))
        connection.execute(text("UPDATE trials SET state = 'WAITING' WHERE number < 3"))
    dists = {"learning_rate": DISTS["learning_rate"]}
    assert [a.number for a in pop_queued(storage, "stats", dists, 1)] == [0]
    assert [a.number for a in pop_queued(storage, "stats", dists, 1)] == [1]
    with storage.engine.connect() as connection:
        states = connection.execute(text("SELECT number, state FROM trials WHERE number < 3 ORDER BY number")).all()
    assert [str(state).rsplit(".", 1)[-1] for _, state in states] == ["RUNNING", "RUNNING", "WAITING"]


def test_a_point_lacking_a_parameter_is_refused(tmp_path):
    storage = optuna_storage(f"sqlite:///{tmp_path / 'tuning.db'}")
    study = optuna.create_study(study_name="hand", storage=storage)
    study.enqueue_trial({"learning_rate": 0.1})
    with pytest.raises(ValueError, match=r"no value for act, one_minus_momentum, width"):
        pop_queued(storage, "hand", DISTS)
    assert study.trials[0].state.name == "WAITING" and not study.trials[0].params  # nothing stored


def test_tell_stores_what_study_tell_stores(url):
    storage = optuna_storage(url)
    by_study, by_tell = queued_study(storage, "study"), queued_study(storage, "tell")
    outcomes = [("reached", 120), ("pruned", None), ("not_reached", None), ("diverged", None),
                ("failed", None), ("reached", 40), ("reached", 7)]
    for i, (outcome, steps) in enumerate(outcomes):
        if i < len(POINTS):
            [one], [other] = pop_queued(storage, "study", DISTS), pop_queued(storage, "tell", DISTS)
        else:  # the queue is empty: points a sampler draws (TPE's, in a TPE cell)
            one, other = (Asked.of(s.ask(DISTS)) for s in (by_study, by_tell))
        state, values = outcome_state(outcome, steps)
        by_study.tell(one.number, values, state=state)
        with storage.engine.begin() as connection:
            tell(connection, other, outcome, steps)
        with storage.engine.begin() as connection:  # a retried tell leaves a finished trial as it is
            tell(connection, other, "failed", None)
    told = [[(t.state.name, t.values, t.datetime_complete is not None) for t in s.trials]
            for s in (by_study, by_tell)]
    assert told[0] == told[1] == [("COMPLETE", [120.0], True), ("PRUNED", None, True),
                                  ("PRUNED", None, True), ("FAIL", None, True), ("FAIL", None, True),
                                  ("COMPLETE", [40.0], True), ("COMPLETE", [7.0], True)]
    assert by_tell.best_trial.number == 6


def finished_study(storage, name: str, finished: int) -> optuna.Study:
    """A study with `finished` trials told in every state TPE reads or skips, and one running."""
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(1))
    for i in range(finished + 2):
        trial = study.ask(DISTS)
        if i == 3:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # TPE skips failed trials
        elif i % 4 == 1:
            trial.report(0.5 + 0.01 * i, 7)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif i != finished + 1:  # the last stays running
            study.tell(trial, 10.0 + (i * 37) % 23)
    return study


@pytest.mark.parametrize("finished", [4, 24])  # TPE's random start-up (10 trials), then TPE
def test_draw_gives_what_study_ask_gives(url, finished):
    """TPE's points drawn from an in-memory copy of the study are the points Study.ask
    gives, one by one, with the same sampler seed (running trials included: Optuna 5's
    TPE is a constant liar); and they are stored as Study.ask stores them."""
    storage = optuna_storage(url)
    by_draw, by_ask = (optuna.load_study(study_name=finished_study(storage, name, finished).study_name,
                                         storage=storage, sampler=optuna.samplers.TPESampler(seed=5))
                       for name in ("drawn", "asked"))  # the same trials in two studies
    drawn = draw(by_draw, storage, DISTS, 3) + draw(by_draw, storage, DISTS, 5)  # the sampler goes on
    asked = [by_ask.ask(DISTS) for _ in drawn]
    assert [a.params for a in drawn] == [t.params for t in asked]
    assert len({tuple(sorted(a.params.items())) for a in drawn}) == len(drawn)
    first = finished + 2
    assert [a.number for a in drawn] == [t.number for t in asked] == list(range(first, first + len(drawn)))
    for one, other in zip(drawn, asked):
        assert frozen(storage, one.trial_id) == frozen(storage, other._trial_id)
        assert dataclasses.replace(one, trial_id=other._trial_id) == Asked.of(other)


def test_concurrent_creates_number_every_trial_once(url):
    storage = optuna_storage(url)
    optuna.create_study(study_name="cell", storage=storage)
    created: list[Asked] = []
    lock = threading.Lock()

    def create(worker: int) -> None:
        own = optuna_storage(url)  # one storage (engine) per worker, as in separate processes
        for _ in range(3):
            trials = create_running(own, "cell", DISTS, [
                optuna.trial.create_trial(params=point, distributions=DISTS, state=optuna.trial.TrialState.RUNNING)
                for point in POINTS[:1 + worker % 3]])
            with lock:
                created.extend(trials)

    in_threads(create, 6)
    study = optuna.load_study(study_name="cell", storage=storage)
    assert sorted(t.number for t in created) == [t.number for t in study.trials] == list(range(36))
    assert {t.trial_id: t.number for t in created} == {t._trial_id: t.number for t in study.trials}
    assert all(t.state.name == "RUNNING" and t.params == POINTS[t.params["width"] // 16 - 1] for t in study.trials)


def test_enqueue_points_stores_what_enqueue_trial_stores(url):
    storage = optuna_storage(url)
    by_enqueue = optuna.create_study(study_name="enqueue", storage=storage)
    for point in POINTS:
        by_enqueue.enqueue_trial(point)
    optuna.create_study(study_name="points", storage=storage)
    assert enqueue_points(storage, "points", POINTS[:2]) == 2
    assert enqueue_points(storage, "points", POINTS) == 4  # the rest: the first two are there
    assert enqueue_points(storage, "points", POINTS) == 0
    ours = optuna.load_study(study_name="points", storage=storage).trials
    theirs = by_enqueue.trials
    assert [frozen(storage, t._trial_id) for t in ours] == [frozen(storage, t._trial_id) for t in theirs]
    assert [t.system_attrs["fixed_params"] for t in ours] == POINTS
    popped, expected = (pop_queued(storage, name, DISTS, 6) for name in ("points", "enqueue"))
    assert [(a.number, a.params, a.user_attrs) for a in popped] == \
        [(a.number, a.params, a.user_attrs) for a in expected]  # and they are popped alike


def test_concurrent_enqueues_queue_every_point_once(url):
    storage = optuna_storage(url)
    optuna.create_study(study_name="cell", storage=storage)
    queued = []
    lock = threading.Lock()

    def enqueue(worker: int) -> None:
        count = enqueue_points(optuna_storage(url), "cell", POINTS)  # one engine each, as processes
        with lock:
            queued.append(count)

    in_threads(enqueue, 6)
    assert sorted(queued) == [0] * 5 + [len(POINTS)]
    study = optuna.load_study(study_name="cell", storage=storage)
    assert [t.system_attrs["fixed_params"] for t in study.trials] == POINTS
    assert [t.number for t in study.trials] == list(range(len(POINTS)))


def test_optuna_pool_on_postgresql_has_the_connect_timeout_of_batchlabs(postgres_url):
    """docs/distributed.md: both of a worker's pools (batchlab's and Optuna's) connect with
    connect_timeout=10, so an unreachable server fails in seconds, not the OS's minutes.
    Optuna's engine used to be built without it."""
    from db.engine import make_engine
    storage = optuna_storage(postgres_url)
    ours = make_engine(postgres_url)
    try:
        with storage.engine.connect() as connection:
            optuna_params = connection.connection.dbapi_connection.info.get_parameters()
        with ours.connect() as connection:
            our_params = connection.connection.dbapi_connection.info.get_parameters()
    finally:
        storage.engine.dispose()
        ours.dispose()
    assert our_params.get("connect_timeout") == "10"
    assert optuna_params.get("connect_timeout") == "10"
    assert (storage.engine.pool.size(), storage.engine.pool._max_overflow) == (2, 2)


def test_every_connection_of_optunas_sqlite_pool_is_configured(tmp_path):
    """Optuna's SQLite connections wait for the lock (db.engine.configure_sqlite) and take
    it at BEGIN. The connections RDBStorage opened while it initialised went back to the
    pool unconfigured (pysqlite's 5 s timeout, deferred transactions) and were reused."""
    from db.engine import SQLITE_BUSY_TIMEOUT_MS
    storage = optuna_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    # raw: a pool checkout without the BEGIN IMMEDIATE a Connection's first statement takes
    connections = [storage.engine.raw_connection() for _ in range(4)]  # the pool's size
    try:
        for connection in connections:
            assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == SQLITE_BUSY_TIMEOUT_MS
            assert connection.dbapi_connection.isolation_level is None  # BEGIN IMMEDIATE
    finally:
        for connection in connections:
            connection.close()
        storage.engine.dispose()
