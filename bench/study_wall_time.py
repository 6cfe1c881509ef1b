"""Study wall time: a whole campaign end to end, a plain Optuna loop vs `batchlab run`.

The campaign is a fixed grid (default: MNIST-10k MLP, 8 batch sizes x 2 optimizers x 8
trials per cell -- `--trials 16` for issue 9's grid --, target val_error < 0.2, at most
50 steps, evaluated every 10 steps).
Every method runs as its own process (interpreter start, imports and data loading
included), on the same CPU threads, and does the same number of trials:

- **baseline**: what a typical Optuna user writes: one `optuna.create_study` per cell
  (storage: an SQLite file, or in memory with --baseline-storage memory) and
  `study.optimize(objective, n_trials=T)`, the objective training with a
  `DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)` over pre-normalised float
  tensors, evaluating on the validation set every `eval_every` steps and returning the
  steps to the target (`TrialPruned` when the budget is spent, or the loss diverged).
  To make the work comparable it uses batchlab's model (same initialisation from the
  seed), batchlab's divergence rule, and the *same hyperparameter points* batchlab's
  quasi-random cells enqueue (enqueued into each baseline study);
- **batchlab**: `python -m study.cli run SPEC --workers 1 --device cpu` (that is,
  `batchlab run`) on a fresh SQLite file -- or, when --threads differs from the core count
  (the default, 1), its two steps `batchlab campaign create` + `batchlab worker --threads`,
  since `batchlab run` has no --threads -- one trial at a time (K = 1) and with
  `--trials-at-once K` (vectorized), each with pruning as shipped (`prune = true`: a
  trial stops once it can no longer beat its cell's best) and with `prune = false`
  (every trial runs to its target, divergence or budget, like the baseline: the fair
  raw-throughput comparison).

    python -m bench.study_wall_time                                  # ~5-6 min on 2 shared CPU cores
    python -m bench.study_wall_time --trials 16                      # issue 9's grid, ~12 min
    python -m bench.study_wall_time --workload digits_mlp --trials 4 --batch-sizes 16,128
    python -m bench.study_wall_time --ks 8,16 --prune off --max-steps 100

Prints the device, torch version and date, one row per method (wall seconds, trials/s,
steps trained, cells that reached the target) and one `ratio` line per batchlab method:
its trials/s over the baseline's, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.versions import versions_line

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = "/work/shared/datasets/mnist-t10k"
SPACES = {
    "sgd": '[search_space.optimizer.sgd]\nlearning_rate = { low = 1e-2, high = 10.0, scale = "log" }\n',
    "momentum": ('[search_space.optimizer.momentum]\n'
                 'learning_rate = { low = 1e-3, high = 3.0, scale = "log" }\n'
                 'momentum = { low = 0.5, high = 0.99, scale = "reverse_log" }\n'),
}


def spec_text(args, prune: bool) -> str:
    """The campaign both methods run (TOML, as a user would write it)."""
    data_dir = f'data_dir = "{args.data_dir}"\n' if args.workload != "digits_mlp" else ""
    return (
        f'[campaign]\nname = "bench_wall_time"\nworkload = "{args.workload}"\n{data_dir}'
        f"batch_sizes = {list(args.batch_sizes)}\n"
        f"optimizers = {json.dumps(list(args.optimizers))}\n"
        f'schedules = ["constant"]\ntrials_per_cell = {args.trials}\n'
        f"max_steps = {args.max_steps}\neval_every = {args.eval_every}\nseed = 0\n"
        f"prune = {'true' if prune else 'false'}\n\n"
        f'[target]\nmetric = "val_error"\nthreshold = {args.target}\n\n'
        f'[sampler]\nkind = "quasi_random"\n\n'
        + "\n".join(SPACES[o] for o in args.optimizers))


# ----- the baseline: runs in its own process (--baseline-child SPEC) -----------------
def baseline_child(spec_path: str, storage: str, threads: int) -> None:
    """Every cell of the spec through plain `study.optimize`; prints one JSON summary."""
    import optuna
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from study.spec import load_spec
    from study.tuning import distributions, quasi_random_points
    from trainers.config import TrialConfig
    from trainers.loop import build_model
    from trainers.workloads import DataOptions, get_workload

    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(spec_path)
    workload = get_workload(spec.workload)
    splits = workload.load_data(DataOptions.of(spec))
    train = TensorDataset(workload.preprocess(splits.train_x), splits.train_y)
    val_x, val_y = workload.preprocess(splits.val_x), splits.val_y
    threshold = spec.target.threshold
    totals = {"trials": 0, "steps": 0, "cells_reached": 0}

    def objective_for(batch_size: int, optimizer: str):
        def objective(trial: optuna.Trial) -> float:
            lr = trial.suggest_float("learning_rate", *_bounds(spec, optimizer, "learning_rate"), log=True)
            momentum = 0.0
            if optimizer == "momentum":
                low, high = _bounds(spec, optimizer, "momentum")
                momentum = 1.0 - trial.suggest_float("one_minus_momentum", 1 - high, 1 - low, log=True)
            config = TrialConfig(workload=spec.workload, batch_size=batch_size, optimizer=optimizer,
                                 schedule="constant", seed=trial.number)
            model = build_model(workload, config, torch.device("cpu"))
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            loader = DataLoader(train, batch_size=batch_size, shuffle=True)
            step, interval_loss, interval_count, first_loss = 0, 0.0, 0, None
            try:
                while True:
                    for x, y in loader:
                        loss = F.cross_entropy(model(x), y)
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        step += 1
                        interval_loss += loss.item() * len(y)
                        interval_count += len(y)
                        if step % spec.eval_every and step < spec.max_steps:
                            continue
                        with torch.no_grad():
                            error = (model(val_x).argmax(1) != val_y).float().mean().item()
                        if error < threshold:
                            return float(step)
                        train_loss = interval_loss / interval_count
                        interval_loss, interval_count = 0.0, 0
                        first_loss = train_loss if first_loss is None else first_loss
                        if not math.isfinite(train_loss) or train_loss > 10 * first_loss:
                            raise optuna.TrialPruned("diverged")
                        if step >= spec.max_steps:
                            raise optuna.TrialPruned("budget spent")
            finally:
                totals["trials"] += 1
                totals["steps"] += step
        return objective

    for batch_size, optimizer, _ in spec.cells():
        study = optuna.create_study(
            study_name=f"bs={batch_size}/opt={optimizer}", direction="minimize",
            storage=None if storage == "memory" else storage,
            sampler=optuna.samplers.RandomSampler(seed=spec.seed))
        # The same points batchlab's quasi-random cell enqueues: identical hyperparameters.
        for params in quasi_random_points(distributions(spec.cell_space(optimizer, "constant")),
                                          spec.trials_per_cell, spec.seed):
            study.enqueue_trial(params)
        study.optimize(objective_for(batch_size, optimizer), n_trials=spec.trials_per_cell)
        totals["cells_reached"] += any(t.value is not None for t in study.trials)
    print("BASELINE " + json.dumps(totals), flush=True)


def _bounds(spec, optimizer: str, name: str) -> tuple[float, float]:
    param = next(p for p in spec.cell_space(optimizer, "constant") if p.name == name)
    return param.low, param.high


# ----- the parent: runs every method as a process and times it -----------------------
@dataclass
class Row:
    method: str
    seconds: float
    trials: int
    steps: int
    cells_reached: int
    cells: int

    @property
    def rate(self) -> float:
        return self.trials / self.seconds


def run_baseline(args, workdir: Path) -> Row:
    spec_path = workdir / "baseline.toml"
    spec_path.write_text(spec_text(args, prune=False))
    storage = "memory" if args.baseline_storage == "memory" else f"sqlite:///{workdir / 'baseline.db'}"
    command = [sys.executable, "-m", "bench.study_wall_time", "--baseline-child", str(spec_path),
               "--baseline-storage", storage, "--threads", str(args.threads)]
    seconds, output = _timed_process(command)
    totals = json.loads(next(line for line in output.splitlines() if line.startswith("BASELINE "))[9:])
    label = f"baseline (Optuna study.optimize + DataLoader, {args.baseline_storage})"
    return Row(label, seconds, totals["trials"], totals["steps"], totals["cells_reached"], _cells(args))


def run_batchlab(args, workdir: Path, k: int, prune: bool) -> Row:
    tag = f"k{k}_{'prune' if prune else 'noprune'}"
    spec_path = workdir / f"{tag}.toml"
    spec_path.write_text(spec_text(args, prune))
    url = f"sqlite:///{workdir / f'{tag}.db'}"
    cli = [sys.executable, "-m", "study.cli"]
    if args.threads == os.cpu_count():  # what `batchlab run` gives its one worker
        seconds, _ = _timed_process([*cli, "run", str(spec_path), "--workers", "1", "--device", "cpu",
                                     "--storage", url, "--trials-at-once", str(k)])
        how = "batchlab run"
    else:  # `batchlab run` has no --threads: its two steps, with the worker's --threads
        create, _ = _timed_process([*cli, "campaign", "create", str(spec_path), "--storage", url])
        work, _ = _timed_process([*cli, "worker", "--campaign", "bench_wall_time", "--storage", url,
                                  "--device", "cpu", "--threads", str(args.threads), "--quiet",
                                  "--trials-at-once", str(k)])
        seconds, how = create + work, "batchlab campaign create + worker"
    trials, steps, reached = _batchlab_totals(url)
    label = f"{how}, 1 worker, K={k}, prune={'on' if prune else 'off'}"
    return Row(label, seconds, trials, steps, reached, _cells(args))


def _batchlab_totals(url: str) -> tuple[int, int, int]:
    from sqlalchemy import create_engine, text
    engine = create_engine(url)
    with engine.connect() as connection:
        trials, steps = connection.execute(text(
            "SELECT count(*), coalesce(sum(steps), 0) FROM bl_trials WHERE outcome != 'running' "
            "AND outcome != 'abandoned'")).one()
        reached = connection.execute(text(
            "SELECT count(DISTINCT cell_id) FROM bl_trials WHERE outcome = 'reached'")).scalar()
    engine.dispose()
    return int(trials), int(steps), int(reached)


def _timed_process(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def _cells(args) -> int:
    return len(args.batch_sizes) * len(args.optimizers)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",") if v]
    names = lambda text: [v for v in text.split(",") if v]
    parser.add_argument("--workload", default="mnist10k_mlp", choices=("mnist10k_mlp", "digits_mlp"))
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="MNIST t10k files (mnist10k_mlp)")
    parser.add_argument("--batch-sizes", type=ints, default=[4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--optimizers", type=names, default=["sgd", "momentum"])
    parser.add_argument("--trials", type=int, default=8, help=(
        "trials per cell (default 8 keeps the default run near 5 minutes on a shared 2-core "
        "machine; --trials 16 is issue 9's grid, ~12 minutes there)"))
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.2, help="reached when val_error < this")
    parser.add_argument("--ks", type=ints, default=[8], help="--trials-at-once values besides 1")
    parser.add_argument("--prune", choices=("both", "on", "off"), default="both",
                        help="batchlab runs with pruning on (as shipped), off (same work as the baseline), or both")
    parser.add_argument("--baseline-storage", default="sqlite",
                        help="sqlite (a file) | memory; the child gets the URL")
    parser.add_argument("--threads", type=int, default=1, help=(
        "torch CPU threads of every method (default 1: on a shared 2-core machine two "
        "threads spin against other processes and run ~50x slower). Equal to the core "
        "count: batchlab goes through `batchlab run` (which gives its one worker every "
        "core); otherwise through `batchlab campaign create` + `batchlab worker --threads`"))
    parser.add_argument("--baseline-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.baseline_child:
        baseline_child(args.baseline_child, args.baseline_storage, args.threads)
        return
    print(f"device: cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s) per method; "
          f"load average {os.getloadavg()[0]:.1f} at start, shared with other processes)")
    print(versions_line())
    print(f"campaign: {args.workload}, batch sizes {args.batch_sizes}, optimizers {args.optimizers}, "
          f"{args.trials} trials per cell ({_cells(args) * args.trials} trials), max_steps {args.max_steps}, "
          f"eval_every {args.eval_every}, target val_error < {args.target}\n", flush=True)
    prunes = {"both": (True, False), "on": (True,), "off": (False,)}[args.prune]
    with tempfile.TemporaryDirectory(prefix="bench_wall_time_") as tmp:
        workdir = Path(tmp)
        rows = [run_baseline(args, workdir)]
        _print_header()
        _print_row(rows[0], rows[0])
        for k in [1, *[k for k in args.ks if k != 1]]:
            for prune in prunes:
                rows.append(run_batchlab(args, workdir, k, prune))
                _print_row(rows[-1], rows[0])
    print()
    for row in rows[1:]:
        print(f"ratio {row.method} vs baseline: {row.rate / rows[0].rate:.2f}x trials/s", flush=True)


def _print_header() -> None:
    print("| method | wall s | trials | trials/s | steps trained | cells reached | vs baseline |\n"
          "|---|---:|---:|---:|---:|---:|---:|")


def _print_row(row: Row, baseline: Row) -> None:
    print(f"| {row.method} | {row.seconds:.1f} | {row.trials} | {row.rate:.2f} | {row.steps} | "
          f"{row.cells_reached}/{row.cells} | {row.rate / baseline.rate:.2f}x |", flush=True)


RATIO_LINE = re.compile(r"^ratio (?P<method>.+) vs baseline: (?P<ratio>\d+\.\d+)x trials/s$", re.M)

if __name__ == "__main__":
    main()
