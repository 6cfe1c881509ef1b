"""Optuna glue: a cell's search space as Optuna distributions, quasi-random points,
storages and samplers, and how a trial's outcome is told to its study."""
from __future__ import annotations

import json
import math
import time
import warnings
from typing import Callable, Mapping

import numpy as np
import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)
from optuna.trial import TrialState
from scipy.stats import qmc
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from db.engine import configure_sqlite, make_engine
from study.spec import Param

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
                     else {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2})
    make_engine(url)  # validates the URL with batchlab's error messages
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    if is_sqlite:
        configure_sqlite(storage.engine)
    return storage


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


# The study's next enqueued trial, in the order Study.ask pops them (by number), and its
# fixed parameters (set once, by enqueue_trial). Optuna's own tables, stable since
# Optuna 1.x (study.recovery reads them too).
_NEXT_WAITING = text("""
SELECT t.trial_id, a.value_json FROM trials t
JOIN studies s ON s.study_id = t.study_id
LEFT JOIN trial_system_attributes a ON a.trial_id = t.trial_id AND a."key" = 'fixed_params'
WHERE s.study_name = :name AND t.state = 'WAITING' ORDER BY t.number LIMIT 1
""")


def pop_queued(study: optuna.Study, storage: optuna.storages.RDBStorage,
               fixed_distributions: Mapping[str, BaseDistribution]) -> optuna.Trial | None:
    """The study's next enqueued trial, set RUNNING with its fixed parameters; None if
    nothing is queued. `study.ask(fixed_distributions)` for an enqueued point, at a cost
    that does not grow with the queue: Optuna's ask reads every WAITING trial with all its
    attributes (its cached storage re-reads unfinished trials at each ask) to take the
    first, two thirds of an ask with 50 points queued. Here one query finds the first and
    its fixed parameters. The state and parameters go through `storage` (the study's
    uncached RDBStorage: the cache only knows trials it has read), then the Trial is built
    as Study.ask builds it. Two workers that select the same trial race on Optuna's
    RUNNING-only-from-WAITING update; the loser selects again."""
    while True:
        with storage.engine.connect() as connection:
            row = connection.execute(_NEXT_WAITING, {"name": study.study_name}).first()
        if row is None:
            return None
        trial_id, fixed = row[0], json.loads(row[1]) if row[1] is not None else {}
        try:
            if not storage.set_trial_state_values(trial_id, TrialState.RUNNING):
                continue  # another worker popped it first
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # failed meanwhile (a sweep of stranded points)
        missing = sorted(set(fixed_distributions) - set(fixed))
        if missing:  # batchlab enqueues whole points: this one was added by hand
            raise ValueError(f"enqueued trial {trial_id} of study {study.study_name!r} has no value "
                             f"for {', '.join(missing)}; enqueue every parameter of the cell's space")
        for name, dist in fixed_distributions.items():
            storage.set_trial_param(trial_id, name, dist.to_internal_repr(fixed[name]), dist)
        return optuna.Trial(study, trial_id)


def ask_queued(study: optuna.Study, storage: optuna.storages.RDBStorage,
               fixed_distributions: Mapping[str, BaseDistribution],
               rerun_pending: Callable[[], bool], *,
               wait_seconds: float = REQUEUE_WAIT_SECONDS) -> optuna.Trial:
    """Ask a cell's study for its next point: an enqueued one if any (`pop_queued`: all of
    a quasi-random or random cell's points were enqueued at creation, and every cell's
    re-runs of lost trials are), else one the sampler draws. A reaper gives a lost trial's
    slot back and then re-queues its point (recovery.abandon_trial): a claim in between
    finds no queued point, and the sampler would draw a point in place of the re-run,
    leaving the re-queued one unrun. So while `rerun_pending()` says a re-run has not been
    asked yet, a drawn trial is failed at once and the ask repeated (for at most
    `wait_seconds`). Otherwise a drawn point is kept: TPE draws its points, and in the
    other cells the queue ran dry for another reason (an ask whose acknowledgement was
    lost took a point), and the cell still needs its trial."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.01
    while True:
        trial = pop_queued(study, storage, fixed_distributions)
        if trial is not None:
            return trial
        trial = study.ask(fixed_distributions=fixed_distributions)
        # Cheapest check first: a re-run is rarely pending (TPE cells get here every ask).
        if time.monotonic() >= deadline or not rerun_pending() \
                or "fixed_params" in trial.storage.get_trial_system_attrs(trial._trial_id):
            return trial
        study.tell(trial, state=TrialState.FAIL)
        time.sleep(delay)
        delay = min(2 * delay, 0.5)


def outcome_state(outcome: str, steps_to_result: int | None) -> tuple[TrialState, list[float] | None]:
    """Optuna minimises steps-to-result: a reached trial is COMPLETE with that value;
    trials that stopped without reaching the target are PRUNED (censored); diverged and
    crashed trials are FAIL."""
    if outcome == "reached":
        return TrialState.COMPLETE, [float(steps_to_result)]
    if outcome in ("pruned", "not_reached"):
        return TrialState.PRUNED, None
    return TrialState.FAIL, None


def tell(study: optuna.Study, trial: optuna.Trial, outcome: str, steps_to_result: int | None) -> None:
    """Tell the trial's outcome (`outcome_state`). A trial already finished (a retried tell
    whose first commit went through, or a reaper that settled it) is left as it is."""
    state, values = outcome_state(outcome, steps_to_result)
    study.tell(trial, values, state=state, skip_if_finished=True)


def tell_queued(storage: optuna.storages.RDBStorage, trial: optuna.Trial, outcome: str,
                steps_to_result: int | None) -> None:
    """`tell` for a cell whose points were all enqueued (quasi-random, random), in one
    update: their samplers (RandomSampler, and QMCSampler over it) do nothing after a
    trial, so what Study.tell adds around the update is two full reads of the trial
    (14 of its 17 statements). A trial already finished is left as it is."""
    state, values = outcome_state(outcome, steps_to_result)
    try:
        storage.set_trial_state_values(trial._trial_id, state, values)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
