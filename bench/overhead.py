"""Storage overhead: the share of a trial's wall time spent talking to storage.

Runs a small campaign through `study.worker.CampaignWorker` in this process, once per
backend (an SQLite file; a throwaway local PostgreSQL from `db.local_postgres`) and per
`trials_at_once` K, with timing hooks around the worker's storage operations. The worker
runs storage beside training (study/pipeline.py): one storage thread reaps, claims, asks
and records the next trial, writes measurement batches, finishes the last trial and
tells Optuna while the main thread trains. So each hooked operation counts where it ran:

- on the main (training) thread it is on the critical path: registering the worker and
  its final status, waiting for the storage thread (a prefetched claim not ready yet, an
  ask that must follow the last tell, the final drain), claiming in the main thread when
  nothing was prefetched, and queueing jobs (measurements, best-so-far cache reads,
  finishes);
- on the storage thread it runs beside training and is listed separately, with the
  thread's CPU time (`time.thread_time`: what it costs the cores, whatever the load).

Around the trainer (`run_trial`, or `run_trials_vectorized` when K > 1) a second hook
measures training + evaluation, net of the main-thread operations it calls from inside.
The worker's whole `run()` is timed too (the dataset is loaded before, untimed, as a
long-running worker loads it once; and before each timed run an untimed campaign of 2
trials per cell, same backend and K, pays the fresh process's first-use costs). Per backend:

    storage share = critical-path storage seconds / run() seconds   (issue 9: below 5%)
    other         = run() - storage - trainer                        (Python glue)

Two cross-checks that do not rely on the hooks:
- from the rows (K = 1): run() per trial - the training + evaluation seconds of each
  trial's last measurement = everything outside training (critical-path storage, model
  building, the trainer's setup); it bounds the critical-path storage from above;
- without storage: right after the run, the same trials (stored configs, same order,
  groups and pruning against an in-memory best) are trained again with no storage at
  all; run() - that = storage's whole cost, including what the storage thread takes from
  training through the CPU and the GIL (on a shared 2-core machine, mostly load noise).

The heartbeat thread's writes are not counted (as before).

    python -m bench.overhead                                     # ~2-3 min on 2 CPU cores
    python -m bench.overhead --workload digits_mlp --trials 2 --batch-sizes 16 --ks 1
    python -m bench.overhead --backends sqlite --eval-every 50
    python -m bench.overhead --sampler tpe

Prints the device, torch version and date, tables per backend and K, and one line per
run: `ratio storage/trial BACKEND K=k: 0.0xyz (x.y% of trial wall time; target < 5%)`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from bench.versions import versions_line

DEFAULT_DATA_DIR = "/work/shared/datasets/mnist-t10k"
TARGET_SHARE = 0.05
# CampaignWorker methods that talk to storage, or hand work to its storage thread, or
# wait for it. Wherever one runs decides how it counts: on the main (training) thread it
# is on the critical path; on the storage thread it runs beside training.
METHOD_OPS = [
    ("_register", "register the worker"), ("_set_status", "set the worker's status"),
    ("_wait", "wait for the storage thread (next claim / ask)"),
    ("_claim_waiting", "claim in the main thread (first group, or no slot prefetched)"),
    ("_drain", "wait for the storage thread (own finishes)"),
    ("_begin", "queue: mark trials started"), ("_buffer_measurement", "queue: a measurement"),
    ("_best", "read the cell's best (cache)"), ("_conclude", "queue: finish + tell"),
    ("_collect", "collect settled finishes"), ("_stop_all", "stop: abandon / give back"),
    # storage-thread jobs
    ("_prepare", "reap + claim + ask + record the next trial"), ("_ask_group", "ask + record"),
    ("_finish_and_tell", "last measurements + finish the row + tell Optuna"),
    ("_write_measurements", "write a batch of measurements"),
    ("_mark_started", "mark trials started"), ("_refresh_best", "re-read the cell's best"),
]
TRAINERS = [("study.worker", "run_trial"), ("trainers.vectorized", "run_trials_vectorized")]


@dataclass
class Timings:
    """Seconds and calls per operation, split by thread: `critical` ran on the worker's
    main (training) thread, `background` on its storage thread. Only the outermost hooked
    call of a thread counts (a drain inside a claim is not counted twice). Trainer
    seconds are net of the main-thread operations the trainer calls from inside."""

    critical: dict = field(default_factory=lambda: defaultdict(float))
    critical_calls: dict = field(default_factory=lambda: defaultdict(int))
    background: dict = field(default_factory=lambda: defaultdict(float))
    background_calls: dict = field(default_factory=lambda: defaultdict(int))
    background_cpu: dict = field(default_factory=lambda: defaultdict(float))  # thread CPU seconds
    trainer_gross: float = 0.0
    storage_in_trainer: float = 0.0
    depth: int = 0  # > 0 while the main thread is inside the trainer
    # Start-up, once per worker: critical-path storage before the trainer first ran
    # (registering, the first claim and ask, which nothing can be prefetched for).
    started: bool = False
    startup_storage: float = 0.0
    startup_wall: float = 0.0
    run_start: float = 0.0
    nesting: threading.local = field(default_factory=threading.local)

    @property
    def storage_seconds(self) -> float:
        """Storage on the critical path: what the training thread spent on it."""
        return sum(self.critical.values())

    @property
    def background_seconds(self) -> float:
        return sum(self.background.values())

    @property
    def trainer_seconds(self) -> float:
        return self.trainer_gross - self.storage_in_trainer


def _storage_hook(timings: Timings, label: str, function):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        nesting = timings.nesting
        outermost = getattr(nesting, "depth", 0) == 0
        nesting.depth = getattr(nesting, "depth", 0) + 1
        start, cpu_start = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            nesting.depth -= 1
            if outermost:
                if threading.current_thread() is threading.main_thread():
                    timings.critical[label] += elapsed
                    timings.critical_calls[label] += 1
                    if not timings.started:
                        timings.startup_storage += elapsed
                    if timings.depth:
                        timings.storage_in_trainer += elapsed
                else:
                    timings.background[label] += elapsed
                    timings.background_calls[label] += 1
                    timings.background_cpu[label] += time.thread_time() - cpu_start
    return timed


def _trainer_hook(timings: Timings, function):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        timings.depth += 1
        start = time.perf_counter()
        if not timings.started:
            timings.started, timings.startup_wall = True, start - timings.run_start
        try:
            return function(*args, **kwargs)
        finally:
            timings.trainer_gross += time.perf_counter() - start
            timings.depth -= 1
    return timed


@contextlib.contextmanager
def hooked(worker, timings: Timings):
    """Wrap the worker's storage operations and trainers; restore the modules after."""
    import importlib
    saved = []
    for module_name, name in TRAINERS:
        module = importlib.import_module(module_name)
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, _trainer_hook(timings, getattr(module, name)))
    for name, label in METHOD_OPS:  # instance attributes shadow the class's methods
        setattr(worker, name, _storage_hook(timings, label, getattr(worker, name)))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def spec_text(args) -> str:
    data_dir = f'data_dir = "{args.data_dir}"\n' if args.workload != "digits_mlp" else ""
    return (
        f'[campaign]\nname = "bench_overhead"\nworkload = "{args.workload}"\n{data_dir}'
        f"batch_sizes = {list(args.batch_sizes)}\noptimizers = [\"momentum\"]\n"
        f'schedules = ["constant"]\ntrials_per_cell = {args.trials}\n'
        f"max_steps = {args.max_steps}\neval_every = {args.eval_every}\nseed = 0\n"
        f"prune = {'false' if args.no_prune else 'true'}\n\n"
        f'[target]\nmetric = "val_error"\nthreshold = {args.target}\n\n'
        f'[sampler]\nkind = "{args.sampler}"\n\n'
        '[search_space.optimizer.momentum]\n'
        'learning_rate = { low = 1e-3, high = 3.0, scale = "log" }\n'
        'momentum = { low = 0.5, high = 0.99, scale = "reverse_log" }\n')


@dataclass
class RunResult:
    backend: str
    k: int
    trials: int
    wall: float
    timings: Timings
    # From the rows: per trial, mean training + evaluation seconds (its last measurement);
    # K = 1 only (a vectorized group's trials share their seconds).
    busy_per_trial: float | None
    # The same trials (same configs, same order, same pruning) trained with no storage
    # at all, right after: seconds, and whether every outcome and step count matched.
    bare_wall: float
    bare_same: bool

    @property
    def share(self) -> float:
        return self.timings.storage_seconds / self.wall

    @property
    def steady_share(self) -> float:
        """The share once the worker trains: start-up (register, first claim and ask)
        left out of both sides; a long-running worker pays start-up once."""
        t = self.timings
        return (t.storage_seconds - t.startup_storage) / (self.wall - t.startup_wall)


def run_campaign(url: str, backend: str, k: int, args) -> RunResult:
    from db.engine import make_engine
    from study.campaigns import create_campaign
    from study.spec import parse_spec
    from study.worker import CampaignWorker
    from trainers.workloads import DataOptions, get_workload

    spec = parse_spec(spec_text(args), "bench_overhead.toml")
    engine = make_engine(url)
    create_campaign(engine, url, spec)
    worker = CampaignWorker(engine, url, spec.name, device="cpu", log=lambda line: None,
                            trials_at_once=k)
    # Loaded once, untimed, as in a long-running worker; run() then finds it cached.
    worker.data.get(get_workload(spec.workload), DataOptions.of(spec), worker.device)
    timings = Timings()
    with hooked(worker, timings):
        start = timings.run_start = time.perf_counter()
        trials = worker.run()
        wall = time.perf_counter() - start
    stored = _stored_trials(engine)
    busy = _busy_per_trial(engine) if k == 1 else None
    engine.dispose()
    worker.storage.engine.dispose()
    bare_wall, bare_same = _train_without_storage(stored, k, worker.data, spec.prune, worker.step_cache)
    return RunResult(backend, k, trials, wall, timings, busy, bare_wall, bare_same)


def warm_up(url: str, k: int, args) -> None:
    """An untimed campaign of 2 trials per cell through a worker of the same K: pays what a
    fresh process pays once (lazy imports, SQLAlchemy's per-statement compilation cache,
    the allocator, the stacked path's float copy of the data) and a long-running worker
    has long amortised. Without it the first timed run carries ~2 s of that (measured:
    K = 1 run 5.7 s vs 3.8 s for the same campaign run second) and the storage-free
    replay, which runs after it, looks that much faster."""
    from db.engine import make_engine
    from study.campaigns import create_campaign
    from study.spec import parse_spec
    from study.worker import CampaignWorker

    spec = parse_spec(spec_text(argparse.Namespace(**{**vars(args), "trials": 2})), "warm_up.toml")
    engine = make_engine(url)
    create_campaign(engine, url, spec)
    worker = CampaignWorker(engine, url, spec.name, device="cpu", log=lambda line: None, trials_at_once=k)
    worker.run()
    engine.dispose()
    worker.storage.engine.dispose()


def _stored_trials(engine) -> list[tuple]:
    """(row id, cell id, config JSON, outcome, steps) of every finished trial, in the order
    the worker claimed (and trained) them."""
    from sqlalchemy import text
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT id, cell_id, config, outcome, steps FROM bl_trials "
            "WHERE outcome <> 'abandoned' ORDER BY id")).all()
    return [(i, c, cfg if isinstance(cfg, dict) else json.loads(cfg), o, s) for i, c, cfg, o, s in rows]


def _busy_per_trial(engine) -> float | None:
    """Mean over trials of the training + evaluation seconds of their last measurement."""
    from sqlalchemy import text
    query = text("""
        SELECT m.wall_seconds + m.eval_seconds FROM bl_measurements m
        JOIN (SELECT trial_id, MAX(step) AS step FROM bl_measurements GROUP BY trial_id) last
          ON last.trial_id = m.trial_id AND last.step = m.step""")
    with engine.connect() as connection:
        busy = [float(v) for v in connection.execute(query).scalars()]
    return sum(busy) / len(busy) if busy else None


def _train_without_storage(stored: list[tuple], k: int, data, prune: bool,
                           step_cache: dict) -> tuple[float, bool]:
    """Train the stored configs again in the worker's order and groups (K consecutive
    claims of a cell), pruning against an in-memory best per cell, no storage at all.
    Returns the seconds and whether every outcome and step count equals the worker's."""
    import study.worker as worker_module
    from trainers.config import Target, TrialConfig
    from trainers.vectorized import run_trials_vectorized
    configs = []
    for _, _, values, _, _ in stored:
        values = dict(values)
        values["target"] = Target(**values["target"])
        configs.append(TrialConfig(**values))
    groups, start = [], 0
    while start < len(stored):
        end = start + 1
        while end < len(stored) and end - start < k and stored[end][1] == stored[start][1]:
            end += 1
        groups.append(list(range(start, end)))
        start = end
    best: dict[int, int] = {}
    results = [None] * len(stored)

    def reached(index, result):
        results[index] = result
        if result.outcome == "reached":
            cell = stored[index][1]
            best[cell] = min(best.get(cell, result.steps_to_result), result.steps_to_result)
    began = time.perf_counter()
    for group in groups:
        cell = stored[group[0]][1]
        cell_best = lambda: best.get(cell)
        if len(group) == 1:
            reached(group[0], worker_module.run_trial(configs[group[0]], data_cache=data,
                                                      best_so_far=cell_best, prune=prune))
        else:
            run_trials_vectorized([configs[i] for i in group], data_cache=data, best_so_far=cell_best,
                                  prune=prune, step_cache=step_cache,
                                  on_result=lambda i, r, group=group: reached(group[i], r))
    seconds = time.perf_counter() - began
    same = all(r is not None and (r.outcome, r.steps) == (row[3], row[4]) for r, row in zip(results, stored))
    return seconds, same


def print_result(result: RunResult) -> None:
    t, n = result.timings, result.trials
    per = lambda seconds: 1000 * seconds / n
    other = result.wall - t.storage_seconds - t.trainer_seconds
    print(f"\n### {result.backend}, K={result.k}: {n} trials, run() {result.wall:.2f} s "
          f"({per(result.wall):.1f} ms per trial)\n")
    print("| part (training thread) | calls | ms per call | ms per trial | share of run() |\n"
          "|---|---:|---:|---:|---:|")
    print(f"| training + evaluation (trainer, net) | | | {per(t.trainer_seconds):.1f} | "
          f"{t.trainer_seconds / result.wall:.1%} |")
    for label in sorted(t.critical, key=lambda label: -t.critical[label]):
        seconds, calls = t.critical[label], t.critical_calls[label]
        print(f"| storage: {label} | {calls} | {1000 * seconds / calls:.2f} | {per(seconds):.2f} | "
              f"{seconds / result.wall:.1%} |")
    print(f"| **storage on the critical path, all** | {sum(t.critical_calls.values())} | | "
          f"{per(t.storage_seconds):.1f} | **{result.share:.1%}** |")
    print(f"| other (glue) | | | {per(other):.1f} | {other / result.wall:.1%} |")
    print(f"\nstart-up (register, first claim + ask; once per worker): {1000 * t.startup_wall:.0f} ms, "
          f"{1000 * t.startup_storage:.0f} ms of it storage; without it the critical-path storage "
          f"share is **{result.steady_share:.1%}**")
    print("\n| storage thread (beside training) | calls | ms per call | ms per trial | CPU ms per trial |\n"
          "|---|---:|---:|---:|---:|")
    for label in sorted(t.background, key=lambda label: -t.background[label]):
        seconds, calls = t.background[label], t.background_calls[label]
        print(f"| {label} | {calls} | {1000 * seconds / calls:.2f} | {per(seconds):.2f} | "
              f"{per(t.background_cpu[label]):.2f} |")
    print(f"| **all** | {sum(t.background_calls.values())} | | {per(t.background_seconds):.1f} | "
          f"{per(sum(t.background_cpu.values())):.1f} |")
    if result.busy_per_trial is not None:
        outside = result.wall / n - result.busy_per_trial
        print(f"\ncross-check from the rows: run() per trial - (train + eval of its last "
              f"measurement) = {1000 * outside:.1f} of {per(result.wall):.1f} ms per trial "
              f"({outside * n / result.wall:.1%}: storage on the critical path plus model "
              f"building and the trainer's own setup)")
    extra = result.wall - result.bare_wall
    print(f"cross-check without storage: the same {n} trials trained again with no storage "
          f"(same order, groups and pruning; outcomes and steps "
          f"{'identical' if result.bare_same else 'DIFFERENT'}): {result.bare_wall:.2f} s; "
          f"run() took {extra:+.2f} s more ({extra / result.wall:+.1%} of run(): storage in all, "
          f"storage thread's CPU and GIL included, plus load noise)")


@contextlib.contextmanager
def backend_urls(backend: str, workdir: Path):
    """A function from a tag to a fresh database URL of the backend."""
    if backend == "sqlite":
        yield lambda tag: f"sqlite:///{workdir / f'{tag}.db'}"
        return
    from db.local_postgres import LocalPostgres
    with LocalPostgres() as server:  # one throwaway server, a database per run
        yield server.create_database


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",") if v]
    names = lambda text: [v for v in text.split(",") if v]
    parser.add_argument("--workload", default="mnist10k_mlp", choices=("mnist10k_mlp", "digits_mlp"))
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--batch-sizes", type=ints, default=[16, 128, 512])
    parser.add_argument("--trials", type=int, default=8, help="trials per cell (momentum only)")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--ks", type=ints, default=[1, 8], help="trials_at_once values")
    parser.add_argument("--backends", type=names, default=["sqlite", "postgresql"])
    parser.add_argument("--threads", type=int, default=1, help=(
        "torch CPU threads (default 1: on a shared 2-core machine two threads spin against "
        "other processes and train ~50x slower, which would flatter the storage share)"))
    parser.add_argument("--no-prune", action="store_true", help="prune = false (default: as shipped, on)")
    parser.add_argument("--sampler", default="quasi_random", choices=("quasi_random", "random", "tpe"),
                        help="the campaign's sampler (default: batchlab's default, quasi_random)")
    args = parser.parse_args(argv)
    unknown = set(args.backends) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"--backends: unknown {', '.join(sorted(unknown))} (sqlite, postgresql)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import optuna
    import torch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads; load average {os.getloadavg()[0]:.1f} at start, "
          f"shared with other processes)")
    print(versions_line())
    print(f"campaign: {args.workload}, momentum, {args.sampler}, batch sizes {args.batch_sizes}, {args.trials} trials "
          f"per cell, max_steps {args.max_steps}, eval_every {args.eval_every}, target val_error < "
          f"{args.target}, prune {'off' if args.no_prune else 'on'}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        for backend in args.backends:
            with backend_urls(backend, Path(tmp)) as new_url:
                for k in args.ks:
                    warm_up(new_url(f"warm_up_k{k}"), k, args)
                    results.append(run_campaign(new_url(f"overhead_k{k}"), backend, k, args))
                    print_result(results[-1])
    print()
    for result in results:
        verdict = "met" if result.share < TARGET_SHARE else "MISSED"
        print(f"ratio storage/trial {result.backend} K={result.k}: {result.share:.4f} "
              f"({result.share:.1%} of trial wall time; target < 5%: {verdict})", flush=True)
    for result in results:
        print(f"steady state (start-up left out) {result.backend} K={result.k}: "
              f"{result.steady_share:.1%}", flush=True)


RATIO_LINE = re.compile(r"^ratio storage/trial (?P<backend>\w+) K=(?P<k>\d+): (?P<share>\d+\.\d+) ", re.M)

if __name__ == "__main__":
    main()
