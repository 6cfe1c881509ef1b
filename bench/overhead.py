"""Storage overhead: the share of a trial's wall time spent talking to storage.

Runs a small campaign through `study.worker.CampaignWorker` in this process, once per
backend (an SQLite file; a throwaway local PostgreSQL from `db.local_postgres`) and per
`trials_at_once` K, with timing hooks wrapped around every storage operation of the
worker loop:

- claiming slots (`claim_cell`, `claim_more`), reaping lost trials, counting running ones;
- asking Optuna (`load_study` + `ask`), recording the trial row, writing every
  measurement, reading the cell's best steps after every evaluation (pruning), finishing
  the trial row, telling Optuna; registering the worker and its final status.

Around the trainer (`run_trial`, or `run_trials_vectorized` when K > 1) a second hook
measures training + evaluation, net of the storage calls the trainer makes from inside
(measurement writes, best-so-far reads). The worker's whole `run()` is timed too (the
dataset is loaded before, untimed, as a long-running worker loads it once). Per backend:

    storage share = storage seconds / run() seconds       (issue 9 target: below 5%)
    other         = run() - storage - trainer              (model building, Python glue)

The heartbeat thread's writes run beside the trainer and are not counted as storage time
(they slow the loop only through the GIL and the CPU they take, which shows up in the
other two columns). As a cross-check that does not rely on the hooks, it also reports
from PostgreSQL's rows, per K = 1 trial: (finished_at - started_at) - (training seconds +
evaluation seconds of its last measurement); SQLite's `CURRENT_TIMESTAMP` has one-second
resolution, too coarse for that.

    python -m bench.overhead                                     # ~2-3 min on 2 CPU cores
    python -m bench.overhead --workload digits_mlp --trials 2 --batch-sizes 16 --ks 1
    python -m bench.overhead --backends sqlite --eval-every 50

Prints the device, torch version and date, a table per backend and K, and one line per
run: `ratio storage/trial BACKEND K=k: 0.0xyz (x.y% of trial wall time; target < 5%)`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = "/work/shared/datasets/mnist-t10k"
TARGET_SHARE = 0.05
# (module attribute of study.worker, label): module-level storage functions the loop calls.
MODULE_OPS = [("claim_cell", "claim a slot"), ("claim_more", "claim more slots (K > 1)"),
              ("reap_lost_trials", "reap lost trials"), ("running_trials", "count running trials"),
              ("best_steps", "read the cell's best"), ("tell", "tell Optuna")]
# CampaignWorker methods that are storage operations.
METHOD_OPS = [("_ask", "ask Optuna (load_study once per cell + ask)"), ("_record_trial", "record the trial row"),
              ("_write_measurement", "write a measurement"), ("_finish_trial", "finish the trial row"),
              ("_register", "register the worker"), ("_set_status", "set the worker's status")]
TRAINERS = [("study.worker", "run_trial"), ("trainers.vectorized", "run_trials_vectorized")]


@dataclass
class Timings:
    """Seconds and calls per storage operation; trainer seconds net of nested storage."""

    storage: dict = field(default_factory=lambda: defaultdict(float))
    calls: dict = field(default_factory=lambda: defaultdict(int))
    trainer_gross: float = 0.0
    storage_in_trainer: float = 0.0
    depth: int = 0  # > 0 while inside the trainer

    @property
    def storage_seconds(self) -> float:
        return sum(self.storage.values())

    @property
    def trainer_seconds(self) -> float:
        return self.trainer_gross - self.storage_in_trainer


def _storage_hook(timings: Timings, label: str, function):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            timings.storage[label] += elapsed
            timings.calls[label] += 1
            if timings.depth:
                timings.storage_in_trainer += elapsed
    return timed


def _trainer_hook(timings: Timings, function):
    @functools.wraps(function)
    def timed(*args, **kwargs):
        timings.depth += 1
        start = time.perf_counter()
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
    import study.worker as worker_module
    saved = []
    for name, label in MODULE_OPS:
        saved.append((worker_module, name, getattr(worker_module, name)))
        setattr(worker_module, name, _storage_hook(timings, label, getattr(worker_module, name)))
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
        f'[sampler]\nkind = "quasi_random"\n\n'
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
    # From the rows (PostgreSQL, K = 1): mean seconds per trial outside training + eval,
    # and mean (finished_at - started_at).
    db_outside: tuple[float, float] | None

    @property
    def share(self) -> float:
        return self.timings.storage_seconds / self.wall


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
    worker.data.get(get_workload(spec.workload), DataOptions(spec.data_dir, spec.download), worker.device)
    timings = Timings()
    with hooked(worker, timings):
        start = time.perf_counter()
        trials = worker.run()
        wall = time.perf_counter() - start
    db_outside = _db_outside(engine) if backend == "postgresql" and k == 1 else None
    engine.dispose()
    worker.storage.engine.dispose()
    return RunResult(backend, k, trials, wall, timings, db_outside)


def _db_outside(engine) -> tuple[float, float] | None:
    """Means over trials of (finished_at - started_at) - (train + eval seconds), and of
    (finished_at - started_at)."""
    from sqlalchemy import text
    query = text("""
        SELECT extract(epoch FROM t.finished_at - t.started_at) AS span,
               m.wall_seconds + m.eval_seconds AS busy
        FROM bl_trials t
        JOIN LATERAL (SELECT wall_seconds, eval_seconds FROM bl_measurements
                      WHERE trial_id = t.id ORDER BY step DESC LIMIT 1) m ON true
        WHERE t.finished_at IS NOT NULL""")
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    if not rows:
        return None
    outside = sum(float(span) - float(busy) for span, busy in rows) / len(rows)
    return outside, sum(float(span) for span, _ in rows) / len(rows)


def print_result(result: RunResult) -> None:
    t, n = result.timings, result.trials
    per = lambda seconds: 1000 * seconds / n
    other = result.wall - t.storage_seconds - t.trainer_seconds
    print(f"\n### {result.backend}, K={result.k}: {n} trials, run() {result.wall:.2f} s "
          f"({per(result.wall):.1f} ms per trial)\n")
    print("| part | calls | ms per call | ms per trial | share of trial wall time |\n"
          "|---|---:|---:|---:|---:|")
    print(f"| training + evaluation (trainer, net) | | | {per(t.trainer_seconds):.1f} | "
          f"{t.trainer_seconds / result.wall:.1%} |")
    for label in sorted(t.storage, key=lambda label: -t.storage[label]):
        seconds, calls = t.storage[label], t.calls[label]
        print(f"| storage: {label} | {calls} | {1000 * seconds / calls:.2f} | {per(seconds):.2f} | "
              f"{seconds / result.wall:.1%} |")
    print(f"| **storage, all** | {sum(t.calls.values())} | | {per(t.storage_seconds):.1f} | "
          f"**{result.share:.1%}** |")
    print(f"| other (model build, glue) | | | {per(other):.1f} | {other / result.wall:.1%} |")
    if result.db_outside is not None:
        outside, span = result.db_outside
        print(f"\ncross-check from the rows: (finished_at - started_at) - (train + eval) = "
              f"{1000 * outside:.1f} ms of {1000 * span:.1f} ms per trial ({outside / span:.1%}; "
              f"includes model building, excludes the tell and the claim's reaping, which "
              f"fall outside the row's timestamps)")


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
    print(f"torch {torch.__version__}, optuna {optuna.__version__}, python {platform.python_version()}, "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"campaign: {args.workload}, momentum, batch sizes {args.batch_sizes}, {args.trials} trials "
          f"per cell, max_steps {args.max_steps}, eval_every {args.eval_every}, target val_error < "
          f"{args.target}, prune {'off' if args.no_prune else 'on'}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        for backend in args.backends:
            with backend_urls(backend, Path(tmp)) as new_url:
                for k in args.ks:
                    results.append(run_campaign(new_url(f"overhead_k{k}"), backend, k, args))
                    print_result(results[-1])
    print()
    for result in results:
        verdict = "met" if result.share < TARGET_SHARE else "MISSED"
        print(f"ratio storage/trial {result.backend} K={result.k}: {result.share:.4f} "
              f"({result.share:.1%} of trial wall time; target < 5%: {verdict})", flush=True)


RATIO_LINE = re.compile(r"^ratio storage/trial (?P<backend>\w+) K=(?P<k>\d+): (?P<share>\d+\.\d+) ", re.M)

if __name__ == "__main__":
    main()
