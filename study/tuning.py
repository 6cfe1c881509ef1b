"""Optuna glue: a cell's search space as Optuna distributions, quasi-random points,
storages and samplers, and how a trial's outcome is told to its study."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution, distribution_to_json)
from optuna.storages._rdb import models as optuna_models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import bindparam, func, insert, inspect, select, text, update
from sqlalchemy.pool import QueuePool

from db.engine import (POSTGRES_CONNECT_TIMEOUT_SECONDS, POSTGRES_POOL, configure_sqlite, connect,
                       make_engine)

if TYPE_CHECKING:  # study.spec imports the trainers' registries, and with them torch:
    from study.spec import Param  # `batchlab status` reaps through this module without it

REVERSE_PREFIX = "one_minus_"


def optuna_name(param: Param) -> str:
    """reverse_log parameters live in Optuna as `one_minus_<name>`, sampled in log space."""
    return REVERSE_PREFIX + param.name if param.scale == "reverse_log" else param.name


def distribution(param: Param) -> BaseDistribution:
    if param.choices is not None:
        return CategoricalDistribution(param.choices)
    if param.scale == "reverse_log":
        return FloatDistribution(1.0 - param.high, 1.0 - param.low, log=True)
    if param.integer:
        return IntDistribution(int(param.low), int(param.high), log=param.scale == "log")
    return FloatDistribution(param.low, param.high, log=param.scale == "log")


def distributions(space: tuple[Param, ...]) -> dict[str, BaseDistribution]:
    return {optuna_name(p): distribution(p) for p in space if not p.is_fixed}


def hparams_from_optuna(space: tuple[Param, ...], params: Mapping[str, object]) -> dict:
    """Optuna's sampled values (plus the fixed ones) as the trainer's hyperparameters."""
    out = {}
    for param in space:
        if param.is_fixed:
            out[param.name] = param.value
        elif param.scale == "reverse_log":
            out[param.name] = 1.0 - float(params[optuna_name(param)])
        else:
            out[param.name] = params[optuna_name(param)]
    return out


def from_unit(dist: BaseDistribution, u: float):
    """Map u in [0, 1) to a value of `dist`, as Optuna's QMCSampler does."""
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[min(int(u * len(dist.choices)), len(dist.choices) - 1)]
    low, high = float(dist.low), float(dist.high)
    if dist.log:
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    else:
        value = low + u * (high - low)
    if isinstance(dist, IntDistribution):
        return int(min(max(round(value), dist.low), dist.high))
    return min(max(value, low), high)


def quasi_random_points(dists: Mapping[str, BaseDistribution], count: int, seed: int) -> list[dict]:
    """The first `count` points of a scrambled Halton sequence (scipy's, which Optuna's
    QMCSampler uses), mapped into the distributions. Precomputed once per cell and
    enqueued, so concurrent workers never draw the same point twice."""
    if not dists:
        return [{} for _ in range(count)]
    from scipy.stats import qmc  # 1 s to import: only where a campaign's points are drawn
    names = sorted(dists)
    unit = qmc.Halton(d=len(names), scramble=True, seed=seed).random(count)
    return [{name: from_unit(dists[name], float(u)) for name, u in zip(names, row)} for row in unit]


def random_points(dists: Mapping[str, BaseDistribution], count: int, seed: int) -> list[dict]:
    """Independent uniform points (in each parameter's scale), reproducible from the seed."""
    names = sorted(dists)
    unit = np.random.default_rng(seed).random((count, len(names)))
    return [{name: from_unit(dists[name], float(u)) for name, u in zip(names, row)} for row in unit]


def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the same database as batchlab's tables."""
    is_sqlite = url.startswith("sqlite")
    # SQLite: pooled like batchlab's own engine (db.engine), for the same reason.
    engine_kwargs = ({"poolclass": QueuePool, "pool_size": 4, "max_overflow": 8} if is_sqlite
                     else {**POSTGRES_POOL,
                           "connect_args": {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS}})
    engine = make_engine(url)  # validates the URL with batchlab's error messages
    try:
        with _first_use_lock(engine):
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    finally:
        engine.dispose()
    if is_sqlite:
        configure_sqlite(storage.engine)
        # RDBStorage's own connections, pooled before the line above, lack the busy
        # timeout and BEGIN IMMEDIATE: closed, so every later one is configured.
        storage.engine.dispose()
    return storage


# Any fixed number (another than db.schema's): serialises Optuna's first use of a database.
OPTUNA_INIT_LOCK_KEY = 0x62_6C_6F_70  # "blop"


@contextlib.contextmanager
def _first_use_lock(engine):
    """On a PostgreSQL database where Optuna has not created its tables yet, one process
    at a time: RDBStorage creates its tables, version row and Alembic stamp in separate
    steps, and processes starting together on a new database (`batchlab run` on several
    machines) collide in them. An advisory lock, held on a connection of our own while
    RDBStorage initialises; nothing once the tables exist. (SQLite is one machine's
    file, and `batchlab run` creates the campaign before it starts its workers.)"""
    if engine.dialect.name != "postgresql":
        yield
        return
    with connect(engine) as connection:  # StorageError, one line, where it cannot connect
        if inspect(connection).has_table("alembic_version"):
            yield
            return
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": OPTUNA_INIT_LOCK_KEY})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": OPTUNA_INIT_LOCK_KEY})


def sampler_seed(campaign_seed: int, study_name: str, worker_id: str) -> int:
    """A worker's seed for a cell's sampler. Workers draw TPE's points independently, each
    with its own sampler, so a seed shared by every worker would make them draw the same
    random start-up points (and a restarted worker its earlier ones again)."""
    digest = hashlib.sha256(f"{campaign_seed}/{study_name}/{worker_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2 ** 31)


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    # quasi_random and random cells are fully enqueued at creation; their sampler only
    # matters if a user asks more trials of the study by hand.
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "quasi_random":
        with warnings.catch_warnings():  # QMCSampler is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(qmc_type="halton", scramble=True, seed=seed,
                                              warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


# How long an ask waits at most for a point being re-queued (`ask_queued`): a re-queue
# takes milliseconds; one whose reaper died in between is finished by the sweep, later.
REQUEUE_WAIT_SECONDS = 10.0


# Optuna's own tables, as its RDB storage defines them (the schema is pinned by the
# optuna<6 requirement): the worker's ask and tell write what RDBStorage writes, in fewer
# statements and in its own transactions (pop_queued, create_running, tell).
_STUDIES = optuna_models.StudyModel.__table__
_TRIALS = optuna_models.TrialModel.__table__
_PARAMS = optuna_models.TrialParamModel.__table__
_VALUES = optuna_models.TrialValueModel.__table__
_SYSTEM_ATTRS = optuna_models.TrialSystemAttributeModel.__table__
_USER_ATTRS = optuna_models.TrialUserAttributeModel.__table__

# pop_queued's statements, built once (parameters: study_name, count, datetime_start; ids).
_WAITING = _TRIALS.alias()  # not correlated with the updated table
# The first `count` WAITING trials, chosen once: MATERIALIZED, because PostgreSQL may
# otherwise plan the IN below as a nested-loop semi-join that runs the LIMIT ... SKIP
# LOCKED subquery again for each outer row, each run skipping the rows already updated,
# so that one pop took every WAITING trial (seen with statistics that counted none).
_CANDIDATES = (select(_WAITING.c.trial_id)
               .where(_WAITING.c.study_id == select(_STUDIES.c.study_id)
                      .where(_STUDIES.c.study_name == bindparam("study_name")).scalar_subquery(),
                      _WAITING.c.state == TrialState.WAITING)
               .order_by(_WAITING.c.number).limit(bindparam("count")).with_for_update(skip_locked=True)
               .cte("candidates").prefix_with("MATERIALIZED", dialect="postgresql"))
_POP = (update(_TRIALS)
        .where(_TRIALS.c.trial_id.in_(select(_CANDIDATES.c.trial_id)),
               _TRIALS.c.state == TrialState.WAITING)
        .values(state=TrialState.RUNNING)
        .returning(_TRIALS.c.number, _TRIALS.c.trial_id))
_FIXED_PARAMS = select(_SYSTEM_ATTRS.c.trial_id, _SYSTEM_ATTRS.c.value_json).where(
    _SYSTEM_ATTRS.c.trial_id.in_(bindparam("ids", expanding=True)), _SYSTEM_ATTRS.c.key == "fixed_params")
_USER_ATTRIBUTES = select(_USER_ATTRS.c.trial_id, _USER_ATTRS.c.key, _USER_ATTRS.c.value_json).where(
    _USER_ATTRS.c.trial_id.in_(bindparam("ids", expanding=True)))


@dataclass(frozen=True)
class Asked:
    """An Optuna trial the worker asked for, as far as the worker reads it: its id and
    number, its parameters (external values) and user attributes (a re-run carries its
    attempt and seed there, study.recovery.requeue)."""
    trial_id: int
    number: int
    params: dict
    user_attrs: dict

    @classmethod
    def of(cls, trial: optuna.Trial) -> "Asked":
        return cls(trial._trial_id, trial.number, trial.params, trial.user_attrs)


def pop_queued(storage: optuna.storages.RDBStorage, study_name: str,
               fixed_distributions: Mapping[str, BaseDistribution], count: int = 1) -> list[Asked]:
    """Up to `count` of the study's enqueued trials, first in first out as Study.ask pops
    them, set RUNNING with their fixed parameters: what `study.ask(fixed_distributions)`
    stores for each, in one transaction of four statements however many are popped and
    however long the queue. Empty if nothing is queued.

    Study.ask reads every WAITING trial of the study with all its attributes to take the
    first (two thirds of an ask with 50 points queued), then makes one transaction per
    parameter and reads the trial back whole: ~20 statements and 5 transactions a trial.
    Here the statements are on Optuna's own tables: the same WAITING -> RUNNING update and
    start time as
    RDBStorage.set_trial_state_values, the parameter rows RDBStorage.set_trial_param
    writes. Workers popping the same study take distinct trials: on PostgreSQL the
    candidates are locked SKIP LOCKED, SQLite serialises writers (BEGIN IMMEDIATE), and
    the update re-checks WAITING."""
    with storage.engine.begin() as connection:
        popped = sorted(connection.execute(_POP, dict(study_name=study_name, count=count,
                                                      datetime_start=datetime.now())).all())
        if not popped:
            return []
        ids = [trial_id for _, trial_id in popped]
        fixed = {trial_id: json.loads(value) for trial_id, value in connection.execute(_FIXED_PARAMS, {"ids": ids})}
        user_attrs: dict[int, dict] = {trial_id: {} for trial_id in ids}
        for trial_id, key, value in connection.execute(_USER_ATTRIBUTES, {"ids": ids}):
            user_attrs[trial_id][key] = json.loads(value)
        asked, rows = [], []
        for number, trial_id in popped:
            point = fixed.get(trial_id, {})
            missing = sorted(set(fixed_distributions) - set(point))
            if missing:  # batchlab enqueues whole points: this one was added by hand
                raise ValueError(f"enqueued trial {trial_id} of study {study_name!r} has no value "
                                 f"for {', '.join(missing)}; enqueue every parameter of the cell's space")
            asked.append(Asked(trial_id, number, _param_rows(rows, trial_id, fixed_distributions, point),
                               user_attrs[trial_id]))
        if rows:  # a cell with nothing to tune has no parameters
            connection.execute(insert(_PARAMS), rows)
    return asked


def _param_rows(rows: list[dict], trial_id: int, fixed_distributions: Mapping[str, BaseDistribution],
                point: Mapping[str, object]) -> dict:
    """Append the parameter rows RDBStorage.set_trial_param writes for `point` to `rows`;
    return the point's external values."""
    params = {}
    for name, dist in fixed_distributions.items():
        internal = dist.to_internal_repr(point[name])
        params[name] = dist.to_external_repr(internal)
        rows.append(dict(trial_id=trial_id, param_name=name, param_value=internal,
                         distribution_json=distribution_to_json(dist)))
    return params


# The statements of _insert_trials (create_running, enqueue_points) (parameters:
# study_name; rows; ids). A trial's number is the count of the study's trials created
# before it, as RDBStorage numbers a new trial, with the study's row locked as it locks it.
_STUDY_ID = select(_STUDIES.c.study_id).where(_STUDIES.c.study_name == bindparam("study_name")).with_for_update()
_CREATE = insert(_TRIALS).returning(_TRIALS.c.trial_id, sort_by_parameter_order=True)
_EARLIER = _TRIALS.alias()
_NUMBER = (update(_TRIALS)
           .where(_TRIALS.c.trial_id.in_(bindparam("ids", expanding=True)))
           .values(number=select(func.count(_EARLIER.c.trial_id))
                   .where(_EARLIER.c.study_id == _TRIALS.c.study_id,
                          _EARLIER.c.trial_id < _TRIALS.c.trial_id).scalar_subquery())
           .returning(_TRIALS.c.trial_id, _TRIALS.c.number))


def _insert_trials(connection, study_id: int, state: TrialState, start: datetime | None,
                   system_attrs: Sequence[Mapping]) -> list[tuple[int, int]]:
    """New trials of the study, one per entry of `system_attrs` (its system attributes),
    numbered as RDBStorage numbers a new trial: (trial_id, number) each, in order. The
    caller holds the study row's lock (`_STUDY_ID`)."""
    ids = connection.execute(_CREATE, [dict(study_id=study_id, state=state, datetime_start=start)
                                       for _ in system_attrs]).scalars().all()
    numbers = dict(connection.execute(_NUMBER, dict(ids=ids)).all())
    rows = [dict(trial_id=trial_id, key=key, value_json=json.dumps(value))
            for trial_id, attrs in zip(ids, system_attrs) for key, value in attrs.items()]
    if rows:
        connection.execute(insert(_SYSTEM_ATTRS), rows)
    return [(trial_id, numbers[trial_id]) for trial_id in ids]


def create_running(storage: optuna.storages.RDBStorage, study_name: str,
                   fixed_distributions: Mapping[str, BaseDistribution],
                   trials: Sequence[FrozenTrial]) -> list[Asked]:
    """New RUNNING trials of the study with these trials' parameters and system
    attributes, in one transaction of at most five statements: what `study.ask` stores
    for a point its sampler drew (RDBStorage's new trial, numbered as it numbers one,
    set_trial_param's rows, the sampler's system attributes), in ~5 transactions a trial."""
    if not trials:
        return []
    with storage.engine.begin() as connection:
        study_id = connection.execute(_STUDY_ID, dict(study_name=study_name)).scalar_one()
        created = _insert_trials(connection, study_id, TrialState.RUNNING, datetime.now(),
                                 [trial.system_attrs for trial in trials])
        params: list[dict] = []
        asked = [Asked(trial_id, number, _param_rows(params, trial_id, fixed_distributions, trial.params), {})
                 for (trial_id, number), trial in zip(created, trials)]
        if params:
            connection.execute(insert(_PARAMS), params)
    return asked


_STUDY_TRIALS = select(func.count(_TRIALS.c.trial_id)).where(_TRIALS.c.study_id == bindparam("study_id"))


def enqueue_points(storage: optuna.storages.RDBStorage, study_name: str,
                   points: Sequence[Mapping[str, object]]) -> int:
    """Enqueue a new cell's planned `points` once: what `study.enqueue_trial(point)` stores
    for each (a WAITING trial with the point as its `fixed_params`), for the points beyond
    the study's trial count, in one transaction under the study row's lock. A create that
    was interrupted, or one running at the same time, has enqueued the first ones: each
    point is queued exactly once however many creates run. Returns how many were queued."""
    with storage.engine.begin() as connection:
        study_id = connection.execute(_STUDY_ID, dict(study_name=study_name)).scalar_one()
        already = connection.execute(_STUDY_TRIALS, dict(study_id=study_id)).scalar_one()
        todo = list(points[already:])
        if todo:
            _insert_trials(connection, study_id, TrialState.WAITING, None,
                           [{"fixed_params": dict(point)} for point in todo])
    return len(todo)


_IN_MEMORY_LOG = logging.getLogger("optuna.storages._in_memory")
_QUIET_LOCK = threading.Lock()


def draw(study: optuna.Study, storage: optuna.storages.RDBStorage,
         fixed_distributions: Mapping[str, BaseDistribution], count: int) -> list[Asked]:
    """`count` new points of the study's sampler, each a RUNNING trial of the study.

    TPESampler reads nothing of a study but its trials (the finished ones, and the running
    ones with constant_liar, Optuna 5's default). Study.ask reads them all again from the
    database for every point and stores the point in ~5 transactions: 1.7 s for 32 points
    of a cell with 64 trials on SQLite. Here the study's own sampler object asks an
    in-memory copy of those trials (every trial but the waiting ones, which an ask would
    pop; so the copy numbers them as the study does) for the points, one after another as
    Study.ask would, and they are stored in one transaction (`create_running`). The points
    are the ones Study.ask gives, point for point (a test checks it). Other samplers keep
    state in the study (QMCSampler its place in the sequence, in the study's attributes),
    so they ask the study itself; batchlab enqueues their cells' points, and they draw
    only when a cell's queue ran dry."""
    if not isinstance(study.sampler, optuna.samplers.TPESampler):
        return [Asked.of(study.ask(fixed_distributions=fixed_distributions)) for _ in range(count)]
    with _QUIET_LOCK:  # without "A new study created in memory" at every draw
        level = _IN_MEMORY_LOG.level
        _IN_MEMORY_LOG.setLevel(logging.WARNING)
        try:
            copy = optuna.create_study(sampler=study.sampler, directions=study.directions)
        finally:
            _IN_MEMORY_LOG.setLevel(level)
    copy.add_trials(study.get_trials(deepcopy=False, states=_COPIED))
    for _ in range(count):
        copy.ask(fixed_distributions=fixed_distributions)
    return create_running(storage, study.study_name, fixed_distributions,
                          copy.get_trials(deepcopy=False)[-count:])


_COPIED = tuple(state for state in TrialState if state != TrialState.WAITING)


def ask_queued(storage: optuna.storages.RDBStorage, study_name: str,
               fixed_distributions: Mapping[str, BaseDistribution], count: int, *,
               point_pending: Callable[[list[dict]], bool], draw: Callable[[int], list[Asked]],
               wait_seconds: float = REQUEUE_WAIT_SECONDS) -> list[Asked]:
    """Ask a cell's study for its next `count` points: enqueued ones while there are
    (`pop_queued`: all of a quasi-random or random cell's points were enqueued at
    creation, and every cell's re-runs of lost trials are), then `draw(n)` new ones (the
    module's `draw`).
    A slot can come back before its point does: a reaper gives a lost trial's slot back
    and then re-queues its point (recovery.abandon_trial), and a stopping worker gives a
    prefetched slot back and then re-queues the point it had asked. A claim in between
    finds no queued point, and a draw would take the slot from that point, leaving it
    unrun. So while `point_pending(user_attrs)` says a point is on its way back (given
    the user attributes of the points popped here), nothing is drawn: the queue is read
    again, for at most `wait_seconds`. Then the cell still needs its trials: they are
    drawn (TPE draws its points; in the other cells the queue ran dry for another
    reason, such as an ask whose acknowledgement was lost)."""
    asked = pop_queued(storage, study_name, fixed_distributions, count)
    deadline = time.monotonic() + wait_seconds
    delay = 0.01
    while len(asked) < count and time.monotonic() < deadline \
            and point_pending([trial.user_attrs for trial in asked]):
        time.sleep(delay)
        delay = min(2 * delay, 0.5)
        asked += pop_queued(storage, study_name, fixed_distributions, count - len(asked))
    if len(asked) < count:
        asked += draw(count - len(asked))
    return asked


def outcome_state(outcome: str, steps_to_result: int | None) -> tuple[TrialState, list[float] | None]:
    """Optuna minimises steps-to-result: a reached trial is COMPLETE with that value;
    trials that stopped without reaching the target are PRUNED (censored); diverged and
    crashed trials are FAIL."""
    if outcome == "reached":
        return TrialState.COMPLETE, [float(steps_to_result)]
    if outcome in ("pruned", "not_reached"):
        return TrialState.PRUNED, None
    return TrialState.FAIL, None


def tell(connection, trial: Asked, outcome: str, steps_to_result: int | None) -> None:
    """Tell the trial's outcome (`outcome_state`), written on `connection` (a SQLAlchemy
    Connection or Session on the study's database) in the caller's transaction, so that
    the worker finishes its trial row and tells Optuna in one commit. What Study.tell
    stores: RDBStorage.set_trial_state_values's update and value row, on Optuna's tables
    (as `pop_queued`). The rest of Study.tell is the sampler's
    after_trial, which batchlab's samplers (RandomSampler, QMCSampler over it, TPESampler
    without constraints) do nothing in, and two full reads of the trial. A trial already
    finished (a retried tell whose first commit went through, or a reaper that settled
    it) is left as it is."""
    state, values = outcome_state(outcome, steps_to_result)
    told = connection.execute(
        update(_TRIALS).where(_TRIALS.c.trial_id == trial.trial_id, _TRIALS.c.state == TrialState.RUNNING)
        .values(state=state, datetime_complete=datetime.now())).rowcount
    if told and values:
        connection.execute(insert(_VALUES), [
            dict(trial_id=trial.trial_id, objective=objective, value=value,
                 value_type=optuna_models.TrialValueModel.TrialValueType.FINITE)
            for objective, value in enumerate(values)])
