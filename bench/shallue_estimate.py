"""Wall-time estimate of a Shallue-style MNIST simple-CNN study on this device (issue 9).

The study: `examples/shallue2018/mnist_simple_cnn.toml` (workload `mnist_simple_cnn`:
55,000 train / 5,000 val carved from MNIST's 60,000 training images) with issue 9's grid,
batch sizes 2^4..2^14 x the TOML's optimizers x 50 trials per cell, target val_error < 0.01.

What is measured (no dataset needed): batchlab's real training step on synthetic uint8
images / int64 labels of the real shapes and sizes, per batch size B, with K trials at once
(K = `choose_k` as the worker's vectorized groups pick it, or --k; K = 1 runs `run_trial`,
as the worker does for a group of one; on CUDA the step uncompiled, as the worker's tiered
compilation runs every variant for its first 40 s, or compiled with --compile). After one
untimed warm-up run of the same shape (graph capture; with --compile, the compilation),
a run of --steps steps that evaluates once at the end is timed; the trainer's own clocks
(synchronised on CUDA) split it into training and evaluation, and the rest of the run's
wall time is per-group setup (building K models, stacking them):
    ms per trial-step = training seconds / (steps x K)
    ms per trial-evaluation = evaluation seconds / K  (one pass over the 5,000 val images)
    s per group = wall - training - evaluation; "warm-up +s" = warm-up wall - wall.

The model (per cell = batch size x optimizer, T trials, budget M steps, evaluation every E):
    lower = T x min(S, M) trial-steps and T x ceil(min(S, M) / E) evaluations: every trial
            stops exactly at S, the cell's steps-to-result (the best case of batchlab's
            pruning; trials that diverge sooner would make it lower still). Pruning needs a
            result to prune against: in the study, the trials that run before their cell's
            first success stop only at their own result, divergence or M. A probe (--run
            with --run-trials / --run-max-steps) runs the study's first trials and shows
            how long those take;
    upper = T x M trial-steps and T x ceil(M / E) evaluations: nothing stops early;
    time  = trial-steps x ms/trial-step + evaluations x ms/evaluation + ceil(T / K) x setup.
S (steps-to-result) needs the data: give it per batch size (--steps-to-result, interpolated
linearly in log2 B vs log S, flat outside the given range) or read it per cell from a
batchlab campaign in SQL (--from-storage, e.g. Shallue's published data imported with
`batchlab import-shallue`); without either only the upper bound is printed.
Without S, two readings still hold: the column "min per 1,000 S" (what 1,000 more steps of
S cost at that batch size, over its cells and trials; the lower estimate is linear in S),
and the last line, the S that fits the whole study into 30 minutes at every batch size
alike (or, where even the upper estimate fits, that every S up to max_steps does).
--measure-batch-sizes times only some batch sizes (each costs a compilation on CUDA) and
interpolates the others' costs as S is interpolated.
Assumptions, not modelled: every optimizer costs what the first one measured does; one
worker on one device; every trial-step costs the full-K rate (a group that shrinks as its
trials stop runs smaller, less efficient stacks, and on the torch.func path stopped trials
are masked, not removed, until at most half remain: up to 2x the useful work);
storage; compilation: a variant of the step (batch size, optimizer, stack size, masked)
that has run 40 s uncompiled is compiled (7 to 17 s) and runs 1.25x to 1.7x faster from
then on, so the default timing is the per-step cost of a study's short-lived variants
and --compile's that of its long-lived ones, without their compilations.

    python -m bench.shallue_estimate --device cuda --steps-to-result "16:4000,1024:300"
    python -m bench.shallue_estimate --device cuda --measure-batch-sizes 16,256,4096,16384
    python -m bench.shallue_estimate --device cuda --measure-batch-sizes 16,4096 --profile
    python -m bench.shallue_estimate --device cuda --from-storage sqlite:///shallue.db
    python -m bench.shallue_estimate --device cuda --data-dir data --run    # + the real study
    python -m bench.shallue_estimate --device cuda --data-dir data --run --run-trials 8 \
        --run-max-steps 2000   # a probe: the study's first 8 trials per cell, cut at 2,000
                               # steps, whose S(B) feed a second estimate
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.versions import versions_line

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = ROOT / "examples" / "shallue2018" / "mnist_simple_cnn.toml"
TARGET_MINUTES = 30.0
DEFAULT_BATCH_SIZES = [2 ** e for e in range(4, 15)]  # issue 9's grid
# Shallue's published optimizer names (as `import-shallue` stores them) -> batchlab's.
OPTIMIZER_ALIASES = {"nesterov_momentum": "nesterov"}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Measured at one batch size with K trials at once."""
    k: int
    step_ms: float  # per trial-step
    eval_ms: float  # per trial-evaluation
    setup_s: float = 0.0  # per group
    compile_s: float = 0.0  # warm-up run's extra wall time (graph capture, --compile's compilation)


# ----- the arithmetic (pure) ---------------------------------------------------------
def parse_steps(text: str) -> dict[int, float]:
    """"16:4000,32:2000" -> {16: 4000.0, 32: 2000.0}."""
    steps = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        batch, sep, value = item.partition(":")
        if not sep or float(value) <= 0:
            raise ValueError(f"--steps-to-result: {item!r} is not BATCH:STEPS with STEPS > 0")
        steps[int(batch)] = float(value)
    return steps


def interpolate(points: dict[int, float], batch_size: int) -> float:
    """S at `batch_size`: linear in (log2 B, log S) between the given batch sizes, flat outside."""
    xs = sorted(points)
    if batch_size <= xs[0] or batch_size >= xs[-1]:
        return points[xs[0] if batch_size <= xs[0] else xs[-1]]
    hi = next(i for i, x in enumerate(xs) if x >= batch_size)
    b0, b1 = xs[hi - 1], xs[hi]
    t = (math.log2(batch_size) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
    return math.exp((1 - t) * math.log(points[b0]) + t * math.log(points[b1]))


def cell_steps(batch_sizes, optimizers, per_batch: dict[int, float] | None = None,
               per_cell: dict[tuple[int, str], float] | None = None) -> dict[tuple[int, str], float | None]:
    """S per (batch size, optimizer): the cell's own value, else the batch size's (given,
    or the fewest over the cells stored at that batch size, interpolated where absent),
    else None (unknown)."""
    per_cell = per_cell or {}
    if not per_batch and per_cell:
        per_batch = fewest_per_batch(per_cell)
    return {(b, o): per_cell.get((b, o), interpolate(per_batch, b) if per_batch else None)
            for b in batch_sizes for o in optimizers}


def estimate(costs: dict[int, Cost], steps: dict[tuple[int, str], float | None], *,
             trials: int, max_steps: int, eval_every: int) -> dict[int, tuple[float | None, float]]:
    """Per batch size: (lower, upper) seconds summed over its cells; lower is None when
    some cell's S is unknown."""
    def seconds(cost: Cost, trial_steps: float) -> float:
        evaluations = trials * math.ceil(trial_steps / eval_every)
        return (trials * trial_steps * cost.step_ms + evaluations * cost.eval_ms) / 1000 \
            + math.ceil(trials / cost.k) * cost.setup_s
    out = {}
    for batch, cost in costs.items():
        cells = [s for (b, _), s in steps.items() if b == batch]
        lower = None if any(s is None for s in cells) else \
            sum(seconds(cost, min(s, max_steps)) for s in cells)
        out[batch] = (lower, len(cells) * seconds(cost, max_steps))
    return out


def interpolate_cost(costs: dict[int, Cost], batch_size: int, k: int) -> Cost:
    """A batch size that was not timed: each per-unit cost interpolated from the timed ones
    as `interpolate` does S (log-log in B, flat outside), at the worker's K."""
    field = lambda name: interpolate({b: max(getattr(c, name), 1e-9) for b, c in costs.items()},
                                     batch_size)
    return Cost(k, field("step_ms"), field("eval_ms"), field("setup_s"))


def minutes_per_kilostep(cost: Cost, *, cells: int, trials: int, eval_every: int) -> float:
    """Minutes that 1,000 more steps of S cost at one batch size, over its `cells` cells
    (the lower estimate is linear in S below the budget, plus the groups' setup)."""
    return cells * trials * (1000 * cost.step_ms + math.ceil(1000 / eval_every) * cost.eval_ms) / 1000 / 60


def flat_steps_within(costs: dict[int, Cost], minutes: float, *, cells_per_batch: int, trials: int,
                      eval_every: int, max_steps: int | None = None) -> float:
    """The S that, at every batch size alike, makes the lower estimate take `minutes`;
    at most `max_steps`: no trial trains past the budget, so where even that fits (the
    upper bound takes `minutes` or less), every S up to the budget does."""
    setup = sum(cells_per_batch * math.ceil(trials / c.k) * c.setup_s for c in costs.values()) / 60
    slope = sum(minutes_per_kilostep(c, cells=cells_per_batch, trials=trials, eval_every=eval_every)
                for c in costs.values()) / 1000
    steps = max(0.0, (minutes - setup) / slope)
    return steps if max_steps is None else min(steps, float(max_steps))


# ----- S from storage ----------------------------------------------------------------
def steps_from_storage(url: str, name: str) -> dict[tuple[int, str], float]:
    """Steps-to-result per (batch size, optimizer) of a stored campaign (cells without a
    result left out; the fewest over schedules)."""
    import pandas as pd
    from db.engine import make_engine, redact
    from study.report import load_campaign_light
    data = load_campaign_light(make_engine(url, read_only=True), name)
    if data is None:
        raise SystemExit(f"error: no campaign {name!r} in {redact(url)}")
    out: dict[tuple[int, str], float] = {}
    for batch, optimizer, steps in zip(data.table["batch_size"], data.table["optimizer"],
                                       data.table["steps_to_result"]):
        if not pd.isna(steps):
            key = (int(batch), OPTIMIZER_ALIASES.get(optimizer, optimizer))
            out[key] = min(float(steps), out.get(key, math.inf))
    return out


def merge_steps(*tables: dict[tuple[int, str], float]) -> dict[tuple[int, str], float]:
    """Per cell, the fewest steps-to-result over the tables."""
    out: dict[tuple[int, str], float] = {}
    for table in tables:
        for key, steps in table.items():
            out[key] = min(steps, out.get(key, math.inf))
    return out


def fewest_per_batch(per_cell: dict[tuple[int, str], float]) -> dict[int, float]:
    out: dict[int, float] = {}
    for (batch, _), steps in per_cell.items():
        out[batch] = min(steps, out.get(batch, math.inf))
    return out


# ----- measuring the step --------------------------------------------------------------
def synthetic_cache(train_size: int, val_size: int, seed: int = 0):
    """A DataCache that hands the trainer synthetic MNIST-shaped splits (uint8 (N, 1, 28,
    28) images, int64 labels 0..9) instead of reading files: the trainers read in-memory
    data only through `DataCache.get`, so overriding it (a public method) is enough."""
    import torch
    from trainers.data.splits import ArraySplits
    from trainers.loop import DataCache
    g = torch.Generator().manual_seed(seed)
    images = lambda n: torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = lambda n: torch.randint(0, 10, (n,), generator=g, dtype=torch.int64)
    val_x, val_y = images(val_size), labels(val_size)
    splits = ArraySplits(images(train_size), labels(train_size), val_x, val_y, val_x, val_y, num_classes=10)

    on_device: dict[str, ArraySplits] = {}

    class SyntheticCache(DataCache):
        def get(self, workload, options, device):
            if str(device) not in on_device:
                on_device[str(device)] = splits.to(device)
            return on_device[str(device)]
    return SyntheticCache()


def trial_configs(spec, batch_size: int, optimizer: str, count: int, steps: int, device: str):
    """`count` trials resolved as the worker resolves them, that never stop early (target
    val_error < 0) and evaluate once, after `steps` steps."""
    from study.resolve import resolve_trial_config
    from trainers.config import Target
    schedule = spec.schedules[0]
    names = {p.name for p in spec.cell_space(optimizer, schedule)}
    configs = []
    for i in range(count):
        hparams = {"learning_rate": 0.01 * (1 + 0.1 * i), "momentum": 0.9, "end_factor": 0.01}
        config = resolve_trial_config(spec, batch_size=batch_size, optimizer=optimizer,
                                      schedule=schedule, seed=i, device=device,
                                      hparams={k: v for k, v in hparams.items() if k in names})
        configs.append(dataclasses.replace(config, max_steps=steps, eval_every=steps,
                                           target=Target("val_error", 0.0)))
    return configs


def worker_k(spec, batch_size: int, args, cache) -> int:
    """--k, else what the worker's vectorized groups use: choose_k with the data's input shape."""
    from trainers.loop import resolve_device
    from trainers.vectorized import choose_k
    from trainers.workloads import DataOptions, get_workload
    device = resolve_device(args.device)
    workload = get_workload(spec.workload)
    shape = tuple(cache.get(workload, DataOptions(), device).train_x.shape[1:])
    return args.k or choose_k(workload, batch_size, device, input_shape=shape)


def measure(spec, batch_size: int, args, cache, step_cache: dict, runs: dict | None = None) -> Cost:
    """The batch size's cost; its timed run is kept in `runs` (for --profile)."""
    from bench.trial_throughput import timed
    from trainers.loop import resolve_device, run_trial
    from trainers.vectorized import run_trials_vectorized
    device = resolve_device(args.device)
    k = worker_k(spec, batch_size, args, cache)
    configs = trial_configs(spec, batch_size, args.optimizers[0], k, args.steps, args.device)
    seen = []

    def run():
        sink = lambda *a: seen.append(a[-1])  # (m) from run_trial, (i, m) vectorized
        if k == 1:  # the worker trains a group of one with run_trial
            run_trial(configs[0], data_cache=cache, on_measurement=sink)
        else:
            run_trials_vectorized(configs, data_cache=cache, chunk_size=k, compile=args.compile,
                                  step_cache=step_cache, on_measurement=sink)
    warm = timed(run, device, 1)
    if runs is not None:
        runs[batch_size] = run
    best = None
    for _ in range(args.repeats):
        seen.clear()
        wall = timed(run, device, 1)
        train, evaluation = seen[0].wall_seconds, seen[0].eval_seconds  # the group's clock
        if best is None or wall < best[0]:
            best = (wall, train, evaluation)
    wall, train, evaluation = best
    return Cost(k, 1000 * train / (args.steps * k), 1000 * evaluation / k,
                max(0.0, wall - train - evaluation), max(0.0, warm - wall))


# ----- the real study ------------------------------------------------------------------
def study_spec_text(spec, args) -> str:
    """The campaign file with the run's grid (--run-*, by default the estimate's),
    validated by parse_spec. With --run-max-steps, trials stop there while every decaying
    schedule keeps the campaign's budget as its length (`decay_steps` pinned): each trial
    is the full study's, cut short."""
    from study.spec import parse_spec
    from trainers.schedules import SCHEDULES
    run = run_grid(args)
    overrides = {"name": run_name(spec, run),
                 "batch_sizes": list(run.batch_sizes), "optimizers": list(run.optimizers),
                 "trials_per_cell": run.trials, "data_dir": str(Path(args.data_dir).resolve()),
                 "download": False}
    if run.max_steps:
        if run.max_steps > spec.max_steps:
            raise SystemExit(f"error: --run-max-steps {run.max_steps} is over the campaign's "
                             f"budget of {spec.max_steps} steps")
        overrides["max_steps"] = run.max_steps
    text = spec.text
    for key, value in overrides.items():
        line = f"{key} = {json.dumps(value)}"
        pattern = re.compile(rf"^{key}\s*=.*$", re.M)
        text = pattern.sub(line, text, count=1) if pattern.search(text) else \
            text.replace("[campaign]\n", f"[campaign]\n{line}\n", 1)
    for name in set(spec.optimizers) - set(run.optimizers):  # its search space would be an error
        section = rf"^\[search_space\.optimizer\.{re.escape(name)}\]\n(?:(?!\[).*\n?)*"
        text = re.sub(section, "", text, flags=re.M)
    for name in spec.schedules if run.max_steps else ():
        if "decay_steps" not in SCHEDULES[name].optional or any(
                p.name == "decay_steps" for p in spec.cell_space(run.optimizers[0], name)):
            continue
        header = f"[search_space.schedule.{name}]\n"
        pin = f"decay_steps = {spec.max_steps}  # the full study's schedule, cut short\n"
        text = text.replace(header, header + pin, 1) if header in text else \
            text.rstrip("\n") + f"\n\n{header}{pin}"
    parse_spec(text, "overridden campaign")
    return text


@dataclasses.dataclass(frozen=True)
class RunGrid:
    batch_sizes: list[int]
    optimizers: list[str]
    trials: int
    max_steps: int | None


def run_grid(args) -> RunGrid:
    """The real run's grid: the --run-* options, each defaulting to the estimate's."""
    return RunGrid(args.run_batch_sizes or args.batch_sizes, args.run_optimizers or args.optimizers,
                   args.run_trials or args.trials, args.run_max_steps)


def run_name(spec, run: RunGrid) -> str:
    cap = f"_s{run.max_steps}" if run.max_steps else ""
    return f"{spec.name}_b{run.batch_sizes[0]}-{run.batch_sizes[-1]}_t{run.trials}{cap}"


def study_command(folder: Path, args, k_max: int, on_cuda: bool) -> list[str]:
    """`batchlab run` of the study's campaign file with one worker. On CUDA its groups are
    sized as the estimate sized them: `--trials-at-once auto` (the worker's default) fixes
    each cell's K once, at the start, with `auto_k`, i.e. `choose_k` as `worker_k` asked it;
    a fixed number would make the worker claim that many in every cell and let
    `run_trials_vectorized` split them by `choose_k` again mid-study, with the memory the
    worker's own steps hold by then (smaller stacks, more compiled variants, than timed).
    On CPU, where `auto` trains one trial at a time, the estimate's largest K (--k or
    `choose_k`; groups above a cell's `choose_k` are split to it, as timed)."""
    at_once = "auto" if on_cuda and not args.k else str(k_max)
    return [sys.executable, "-m", "study.cli", "run", str(folder / "study.toml"), "--workers", "1",
            "--device", args.device, "--storage", args.run_storage or f"sqlite:///{folder / 'study.db'}",
            "--trials-at-once", at_once]


def run_study(spec, args, k_max: int) -> tuple[str, str] | None:
    """Run (with --run) or print the real study; returns its (storage URL, campaign name)
    once it has run."""
    from trainers.data.errors import DataError
    from trainers.workloads import DataOptions, get_workload
    try:
        get_workload(spec.workload).load_data(DataOptions(args.data_dir))
    except DataError as exc:
        print(f"\nthe real study needs MNIST's files in --data-dir ({exc}); not run")
        return None
    folder = Path(tempfile.mkdtemp(prefix="shallue_study_"))
    (folder / "study.toml").write_text(study_spec_text(spec, args))
    from trainers.loop import resolve_device
    command = study_command(folder, args, k_max, resolve_device(args.device).type == "cuda")
    print("\nthe real study:\n  batchlab " + shlex.join(command[3:]))
    if not args.run:
        return None
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT)
    minutes = (time.perf_counter() - start) / 60
    run = run_grid(args)
    full = (not run.max_steps and run.trials == 50 and set(run.optimizers) == set(spec.optimizers)
            and list(run.batch_sizes) == DEFAULT_BATCH_SIZES)
    verdict = (f"target < {TARGET_MINUTES:g} min: {'met' if minutes < TARGET_MINUTES else 'missed'}"
               if full else "a part of the study, so no verdict")
    print(f"study wall time: {minutes:.1f} min (exit {done.returncode}; {verdict})")
    return command[command.index("--storage") + 1], run_name(spec, run)


# ----- command line ---------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",") if v]
    parser.add_argument("--campaign", default=str(DEFAULT_SPEC), help="campaign TOML")
    parser.add_argument("--batch-sizes", type=ints, default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--trials", type=int, default=50, help="trials per cell")
    parser.add_argument("--optimizers", type=lambda t: [v for v in t.split(",") if v], default=None,
                        help="default: the campaign's")
    parser.add_argument("--steps", type=int, default=20, help="steps of the timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (best)")
    parser.add_argument("--measure-batch-sizes", type=ints, default=None,
                        help="time only these of --batch-sizes; interpolate the rest (default: all)")
    parser.add_argument("--k", type=int, default=None, help="trials at once (default: choose_k)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="time the compiled step (default: uncompiled, as every variant's first 40 s)")
    parser.add_argument("--steps-to-result", type=parse_steps, default=None,
                        help='S per batch size, "16:4000,32:2000,..."')
    parser.add_argument("--from-storage", default=None, help="storage URL holding a campaign's S")
    parser.add_argument("--campaign-name", default="shallue/mnist/simple_cnn",
                        help="the campaign(s) in --from-storage, comma-separated: the fewest S per cell")
    parser.add_argument("--data-dir", default=None, help="MNIST files (default: the campaign's)")
    parser.add_argument("--run", action="store_true", help="run the real study (needs --data-dir)")
    parser.add_argument("--run-batch-sizes", type=ints, default=None,
                        help="the real run's batch sizes (default: --batch-sizes)")
    parser.add_argument("--run-optimizers", type=lambda t: [v for v in t.split(",") if v], default=None,
                        help="the real run's optimizers (default: --optimizers)")
    parser.add_argument("--run-trials", type=int, default=None,
                        help="the real run's trials per cell (default: --trials)")
    parser.add_argument("--run-max-steps", type=int, default=None,
                        help="the real run's trials stop here; schedules keep the campaign's "
                             "length (a probe of S(B): the study's trials, cut short)")
    parser.add_argument("--run-storage", default=None,
                        help="the real run's storage URL (default: a new SQLite file)")
    parser.add_argument("--profile", action="store_true",
                        help="then profile each timed batch size's run: its top kernels (ops on CPU)")
    # load_mnist_splits' sizes: 55,000 train / 5,000 val carved from the 60,000 images
    parser.add_argument("--train-size", type=int, default=55_000, help="synthetic data (smoke tests only)")
    parser.add_argument("--val-size", type=int, default=5_000, help="synthetic data (smoke tests only)")
    return parser.parse_args(argv)


def print_totals(costs: dict[int, Cost], steps, spec, args) -> None:
    """The whole study's lower and upper estimate and the S that fits the target."""
    totals = estimate(costs, steps, trials=args.trials, max_steps=spec.max_steps, eval_every=spec.eval_every)
    upper = sum(u for _, u in totals.values()) / 60
    lowers = [l for l, _ in totals.values()]
    verdict = lambda m: f"{m:.1f} min ({'under' if m < TARGET_MINUTES else 'over'} {TARGET_MINUTES:g})"
    if None in lowers:
        print(f"\ntotal: upper {verdict(upper)}; the lower estimate needs S(B) for every cell "
              f"(--steps-to-result or --from-storage)")
    else:
        print(f"\ntotal: lower {verdict(sum(lowers) / 60)}, upper {verdict(upper)} "
              f"vs the {TARGET_MINUTES:g}-minute target (compilation and storage not included)")
    flat = flat_steps_within(costs, TARGET_MINUTES, cells_per_batch=len(args.optimizers),
                             trials=args.trials, eval_every=spec.eval_every, max_steps=spec.max_steps)
    if flat >= spec.max_steps:
        print(f"{TARGET_MINUTES:g} minutes cover every S(B) up to the budget of {spec.max_steps:,} steps "
              f"(the upper estimate, every trial running the whole budget, fits)")
    else:
        print(f"{TARGET_MINUTES:g} minutes cover S(B) up to {flat:,.0f} steps at every batch size alike "
              f"(lower estimate: every trial stops at S)")


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    from study.spec import load_spec
    from trainers.loop import resolve_device
    spec = load_spec(args.campaign)
    args.optimizers = args.optimizers or list(spec.optimizers)
    args.data_dir = args.data_dir or spec.data_dir or "data"
    device = resolve_device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    print(f"device: {device} ({name}, {torch.get_num_threads()} CPU threads)")
    print(f"{versions_line()}; load average "
          + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    cells = len(args.batch_sizes) * len(args.optimizers)
    print(f"study: {spec.workload}, batch sizes {args.batch_sizes[0]}..{args.batch_sizes[-1]} "
          f"({len(args.batch_sizes)}) x {','.join(args.optimizers)} = {cells} cells x {args.trials} "
          f"trials, max_steps {spec.max_steps}, eval_every {spec.eval_every}, target {spec.target}; "
          f"synthetic data {args.train_size} train / {args.val_size} val; timed: {args.steps} steps "
          f"of {args.optimizers[0]}, best of {args.repeats}\n", flush=True)
    per_cell = merge_steps(*(steps_from_storage(args.from_storage, name)
                             for name in args.campaign_name.split(","))) if args.from_storage else None
    steps = cell_steps(args.batch_sizes, args.optimizers, args.steps_to_result, per_cell)
    cache, step_cache = synthetic_cache(args.train_size, args.val_size), {}
    timed_batches = [b for b in args.batch_sizes if b in (args.measure_batch_sizes or args.batch_sizes)]
    if not timed_batches:
        raise SystemExit("error: --measure-batch-sizes names none of --batch-sizes")
    print("| batch | K | ms/trial-step | ms/trial-eval | s setup/group | warm-up +s | min per 1,000 S "
          "| S(B) | lower min | upper min |\n|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    row = lambda batch, cost, warm: print(
        f"| {batch} | {cost.k} | {cost.step_ms:.3f} | {cost.eval_ms:.1f} | {cost.setup_s:.2f} | {warm} | "
        f"{minutes_per_kilostep(cost, cells=len(args.optimizers), trials=args.trials, eval_every=spec.eval_every):.2f} | "
        + " | ".join(estimate_cells(batch, cost)) + " |", flush=True)

    def estimate_cells(batch: int, cost: Cost) -> list[str]:
        lower, upper = estimate({batch: cost}, steps, trials=args.trials, max_steps=spec.max_steps,
                                eval_every=spec.eval_every)[batch]
        shown = sorted({round(s) for (b, _), s in steps.items() if b == batch and s is not None})
        return ['/'.join(map(str, shown)) or '-', '-' if lower is None else f'{lower / 60:.1f}',
                f'{upper / 60:.1f}']

    measured, runs = {}, {}
    for batch in timed_batches:
        measured[batch] = cost = measure(spec, batch, args, cache, step_cache, runs)
        row(batch, cost, f"{cost.compile_s:.1f}")
    costs = dict(measured)
    if len(timed_batches) < len(args.batch_sizes):
        print("\ninterpolated from the timed batch sizes (log-log in B), K as the worker picks it:")
        for batch in sorted(set(args.batch_sizes) - set(timed_batches)):
            costs[batch] = cost = interpolate_cost(measured, batch, worker_k(spec, batch, args, cache))
            row(batch, cost, "-")
    print_totals(costs, steps, spec, args)
    print("load average at end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))
    if args.profile:
        from bench.conv_stacking import profile
        for batch, run in runs.items():
            print(f"\nprofile: batch {batch}, K {measured[batch].k}: 3 runs of --steps {args.steps} "
                  f"and one evaluation")
            profile(run, device, rows=14)
    if args.run or Path(args.data_dir).exists():
        ran = run_study(spec, args, max(c.k for c in costs.values()))
        if ran:
            measured_s = steps_from_storage(*ran)
            print("\nS(B) measured by this run, the fewest over its cells: " + (", ".join(
                f"{b}: {s:.0f}" for b, s in sorted(fewest_per_batch(measured_s).items()))
                or "none reached the target"))
            per_cell = merge_steps(per_cell or {}, measured_s)
            missing = [b for b in args.batch_sizes if b not in fewest_per_batch(per_cell)]
            if per_cell and missing:
                print(f"no S at B = {', '.join(map(str, missing))} (no trial reached the target): "
                      f"interpolated from the others below")
            if per_cell:
                print_totals(costs, cell_steps(args.batch_sizes, args.optimizers, None, per_cell),
                             spec, args)

if __name__ == "__main__":
    main()
