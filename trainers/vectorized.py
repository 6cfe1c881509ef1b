"""Vectorized trials: K trials of one cell trained as one computation (torch.func).

Trials of a cell share the workload, batch size, optimizer, step budget, evaluation
interval and target; they differ in hyperparameters and seed. `run_trials_vectorized`
stacks their parameters along a leading trial axis and trains them together:

- every trial is initialised exactly as `trainers.loop.build_model` does (its own seed),
  then the K models are stacked with `torch.func.stack_module_state`;
- every trial keeps its own `torch.Generator`, seeded like `run_trial`'s, so its data
  order (one `randperm` per epoch) and augmentation are the sequential ones; the per-step
  index tensors are stacked to (K, B);
- the loss and gradients come from `vmap(grad_and_value(functional_call(...)))`, or, for
  convnets once a trial's batch is large (`_CONV_LOOP_MIN_BATCH`: 1024 on CUDA, 64 on CPU),
  from the trials' plain convolutions run one after another (vmap would make them one
  grouped convolution, measured 1.3x to 2x slower there; same numbers either way); the
  optimizer updates are written functionally, with the learning rate and every other
  hyperparameter as (K,) tensors, and follow torch.optim's update formulas exactly
  (sgd / momentum / nesterov / adam / adamw, L2 `weight_decay` for the first four,
  decoupled for adamw, `grad_clip_norm` per trial as `clip_grad_norm_` computes it);
- a trial stops by masking: once it is decided (reached, diverged, not_reached, pruned)
  its parameters and optimizer state are frozen by `torch.where` and it is excluded from
  later measurements; when at most half of the stacked trials are still running the
  stack is compacted to the running ones (to a power of two when the step is compiled,
  so that a cell's groups share their compiled stack sizes);
- evaluation runs on the full validation set for every running trial at once (vmap over
  trials, or the same loop for convnets, in the same chunks of `eval_batch_size` examples
  and at the same precision: bf16 autocast on CUDA by default), exactly when `run_trial`
  evaluates, and the stopping rules are `run_trial`'s.

Fast path: plain MLPs (Flatten, Linear, ReLU) skip torch.func when the step is neither
compiled nor autocast (the CPU default): `trainers.stacked` runs the same computation as
batched matmuls with a hand-written backward and in-place optimizer updates, and a
stopped trial leaves the stack at the evaluation that decides it instead of being
masked. `stacked=False` forces the torch.func path.

Batch norm (incl. ghost batch norm, `hparams["ghost_batch_size"]`) is vectorized with
per-trial buffers: the stacked running_mean / running_var / num_batches_tracked (K, ...)
are passed to `functional_call` as copies, which the BN layers update in place under
vmap exactly as in `run_trial` (momentum, unbiased variance, one update per ghost
batch); the step returns them and writes them back, stopped trials keeping theirs
frozen like their parameters. Evaluation runs in eval mode on each trial's running
statistics. Trials of one group share the ghost batch size (it is part of the group key).

Not vectorized (each such config runs through `trainers.loop.run_trial` instead, with
identical results by construction): the `lars` and `lamb` optimizers, models with active
dropout (`run_trial` draws each trial's masks from global RNG streams seeded for that
trial, `trainers.loop.trial_rng`, which vmap cannot reproduce), workloads streamed
through a DataLoader or computed in closed form, batch norm with
`momentum=None` (a cumulative average) or without running statistics, and any config
that sets a `TrialConfig` field this module does not know (e.g. a batch-size plan) away
from its default.

Timing: the K trials share one clock, so `wall_seconds` of a vectorized trial is the
wall time of the whole group's training so far (what the trial really waited), not a
per-trial share of it.

On CUDA the step runs under bf16 autocast by default (`precision=` overrides), and a
small step (the vmapped step of a cell whose batch size is at most `_GRAPH_MAX_BATCH`) is
replayed from a captured CUDA graph (`trainers.cuda_graphs`; `cuda_graphs=` overrides),
its stacked state kept in static tensors that each new group of the same stack size is
copied into (reset in place, not reallocated). The vmapped step is compiled with
`torch.compile` by tiers on CUDA by default: each variant (batch size, stack size, masked
or not) runs uncompiled until it has spent `_EAGER_SECONDS_BEFORE_COMPILING`, then
compiled; `compile=True` compiles every variant from the start, `False` none. An epoch's
shorter last batch always takes the step uncompiled (replayed from its own graph): a
compilation per stack size for one step per epoch would cost more than it saves. On CPU
neither compilation nor autocast is used unless asked, and with fp32 the results equal `run_trial`'s up to floating-point rounding. Some models
amplify rounding (as they do between two `run_trial` runs on different thread counts):
with batch norm, a ReLU input within rounding of zero, or Adam's normalised steps on
the near-zero gradient of a bias that feeds a batch-norm layer, can move the losses by
1e-3 relative after tens of steps.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from trainers.config import Measurement, TrialConfig, TrialResult
from trainers.cuda_graphs import GraphedStep, writing_back
from trainers.loop import (DataCache, StopState, _memory_format, build_model, check_batch_statistics,
                           decide, example_shape, measurement_extras, resolve_device, run_trial)
from trainers.optim import validate_hparams
from trainers.schedules import get_schedule
from trainers.stacked import StackedMLP, StackedTrainer, preprocessed_train_x
from trainers.workloads import DataOptions, ModelOptions, Workload, get_workload

IndexedSink = Callable[[int, Measurement], None]
IndexedResultSink = Callable[[int, TrialResult], None]
BestSoFar = Callable[[], "int | None"]
Precision = Literal["auto", "fp32", "bf16"]

VECTORIZED_OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "adam", "adamw")

# The fields a vectorized group shares; the rest (hparams, seed, schedule) may differ.
_SHARED_FIELDS: tuple[str, ...] = (
    "workload", "batch_size", "optimizer", "max_steps", "eval_every", "target", "device",
    "data_dir", "download", "val_size", "divergence_factor", "eval_batch_size",
    "loader_workers")  # DataLoader workloads are never vectorized: no effect here
_PER_TRIAL_FIELDS: tuple[str, ...] = ("hparams", "seed", "schedule")

_CPU_MEMORY_BUDGET_BYTES = 1 << 30  # a modest 1 GiB of stacked trial state on CPU
_CPU_MAX_K = 16
_CUDA_MEMORY_FRACTION = 0.5  # of the currently free device memory


# --- public API ----------------------------------------------------------------------------

def run_trials_vectorized(configs: Sequence[TrialConfig], *, data_cache: DataCache | None = None,
                          on_measurement: IndexedSink | None = None,
                          best_so_far: BestSoFar | None = None, prune: bool = True,
                          chunk_size: int | None = None, compile: bool | None = None,
                          precision: Precision = "auto",
                          on_result: IndexedResultSink | None = None,
                          step_cache: dict | None = None,
                          stacked: bool = True,
                          cuda_graphs: bool | None = None) -> list[TrialResult]:
    """Train every config and return their results in the order given.

    Configs that share the cell fields (`_SHARED_FIELDS`) are trained together in groups
    of at most `chunk_size` trials (None: `choose_k`). `on_measurement(i, m)` receives
    every evaluation of `configs[i]` as it happens, `on_result(i, r)` its result as soon
    as it is decided; `best_so_far()` is read after every evaluation of every trial, as
    `run_trial` reads it. `compile` compiles the training step (True: every variant from
    its first step; default on CUDA: each variant once it has run uncompiled a while);
    `precision` "auto" means bf16 autocast on CUDA and fp32 elsewhere. `step_cache`, a
    dict the caller keeps (e.g. one per worker), reuses built (compiled) steps across
    calls, so a compiled step is not recompiled for every group of the same shape (and
    the seconds each variant has run uncompiled add up across calls).
    `stacked` (default) trains plain MLPs with the vmap-free fast path of
    `trainers.stacked` when the step is neither compiled nor autocast (CPU by default);
    False forces the torch.func path everywhere. `cuda_graphs` (default: on CUDA; True
    elsewhere is an error) replays small vmapped steps from CUDA graphs.
    Every config is checked first as `run_trial` checks it before training
    (`trainers.optim.validate_hparams`, `trainers.loop.check_batch_statistics`): a config
    its optimizer cannot train with, or whose batch norm would normalize a single example,
    is `failed` at once, with `run_trial`'s message, and the others train.
    """
    cache = data_cache or DataCache()
    steps = {} if step_cache is None else step_cache
    sinks = _Sinks(on_measurement, on_result, best_so_far or (lambda: None), prune)
    results: list[TrialResult | None] = [_refused(config, cache) for config in configs]
    for i, result in enumerate(results):
        if result is not None:
            sinks.result(i, result)
    for indices in _group_indices(configs):
        indices = [i for i in indices if results[i] is None]
        if not indices:
            continue
        group = [configs[i] for i in indices]
        if not is_vectorizable(group[0]):
            for i in indices:
                results[i] = _run_sequential(configs[i], i, cache, sinks)
            continue
        device = resolve_device(group[0].device)
        size = chunk_size or _group_k(group[0], cache, device)
        for start in range(0, len(indices), size):
            chunk = indices[start:start + size]
            options = _StepOptions.resolve(device, compile, precision, stacked, cuda_graphs)
            for i, result in zip(chunk, _run_group([configs[i] for i in chunk], chunk, cache,
                                                   sinks, options, steps)):
                results[i] = result
    return results  # type: ignore[return-value]


def _refused(config: TrialConfig, cache: DataCache) -> TrialResult | None:
    """A failed result for a config `run_trial` would refuse (it raises before training:
    hyperparameters its optimizer cannot train with, batch norm on a single example),
    else None. Refused here, one trial at a time, so that it does not fail the trials
    stacked or grouped with it."""
    workload = get_workload(config.workload)
    if workload.simulate is not None:
        return None
    try:
        validate_hparams(config.optimizer, config.hparams)
    except ValueError as exc:
        return TrialResult("failed", 0, 0, 0.0, message=str(exc))
    # The data as run_trial loads it (a data error raises, as there, instead of failing).
    data = cache.load(workload, DataOptions.of(config), resolve_device(config.device))
    try:
        check_batch_statistics(workload, config, data.train_size, lambda: example_shape(data))
    except ValueError as exc:
        return TrialResult("failed", 0, 0, 0.0, message=str(exc))
    return None


def auto_k(config: TrialConfig, data_cache: DataCache | None = None) -> int:
    """How many trials of `config`'s cell to train at once on its device: `choose_k` with
    the input shape of the data they train on, or 1 where `run_trials_vectorized` would
    train them one at a time anyway (not `is_vectorizable`)."""
    if not is_vectorizable(config):
        return 1
    return _group_k(config, data_cache or DataCache(), resolve_device(config.device))


def _group_k(config: TrialConfig, cache: DataCache, device: torch.device) -> int:
    """`choose_k` for a group, with the input shape of the data it will train on (the
    model alone does not fix a convnet's: MNIST's simple CNN sees 28 x 28 images)."""
    workload = get_workload(config.workload)
    splits = cache.get(workload, DataOptions.of(config), device)
    return choose_k(workload, config.batch_size, device, input_shape=tuple(splits.train_x.shape[1:]),
                    eval_batch_size=config.eval_batch_size)


def is_vectorizable(config: TrialConfig) -> bool:
    """Whether `run_trials_vectorized` trains `config` vectorized (else sequentially)."""
    if config.optimizer not in VECTORIZED_OPTIMIZERS:
        return False
    known = set(_SHARED_FIELDS) | set(_PER_TRIAL_FIELDS)
    for spec in dataclasses.fields(config):
        if spec.name not in known and getattr(config, spec.name) != _field_default(spec):
            return False  # a feature of run_trial this module does not reproduce
    return _model_is_vectorizable(get_workload(config.workload))


def choose_k(workload: str | Workload, batch_size: int, device: str | torch.device,
             max_k: int = 32, *, input_shape: Sequence[int] | None = None,
             eval_batch_size: int = 4096) -> int:
    """How many trials to stack: memory per trial (parameters, gradients, two optimizer
    states, saved activations of a training batch, activations of an evaluation chunk)
    against a budget: half the free memory on CUDA, 1 GiB on CPU (where K is also capped
    at 16: two cores gain little from wider stacks). Never below 1 or above `max_k`;
    non-increasing in `batch_size`."""
    workload = get_workload(workload) if isinstance(workload, str) else workload
    device = torch.device(device)
    per_trial = trial_memory_bytes(workload, batch_size, input_shape=input_shape,
                                   eval_batch_size=eval_batch_size)
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        budget, cap = int(free_bytes * _CUDA_MEMORY_FRACTION), max_k
    else:
        budget, cap = _CPU_MEMORY_BUDGET_BYTES, min(max_k, _CPU_MAX_K)
    return max(1, min(cap, budget // max(per_trial, 1)))


def trial_memory_bytes(workload: Workload, batch_size: int, *,
                       input_shape: Sequence[int] | None = None,
                       eval_batch_size: int = 4096) -> int:
    """Estimated fp32 bytes one stacked trial needs, from a forward pass on the meta
    device (no memory is allocated): 5 x parameters (weights, gradients, two optimizer
    states, an update temporary) + 3 x training activations (saved, gradient, temporary)
    + 1 x the activations of one evaluation chunk."""
    with torch.device("meta"):
        model = workload.build_model(ModelOptions())
    shape = tuple(input_shape) if input_shape is not None else _guess_input_shape(model)
    param_count = sum(p.numel() for p in model.parameters())
    train_activations = _activation_count(model, (batch_size, *shape))
    eval_activations = _activation_count(model, (eval_batch_size, *shape))
    return 4 * (5 * param_count + 3 * train_activations + eval_activations)


# --- grouping and fallback -----------------------------------------------------------------

@dataclass(frozen=True)
class _Sinks:
    on_measurement: IndexedSink | None
    on_result: IndexedResultSink | None
    best_so_far: BestSoFar
    prune: bool

    def measurement(self, index: int, measurement: Measurement) -> None:
        if self.on_measurement is not None:
            self.on_measurement(index, measurement)

    def result(self, index: int, result: TrialResult) -> None:
        if self.on_result is not None:
            self.on_result(index, result)


def _group_indices(configs: Sequence[TrialConfig]) -> list[list[int]]:
    """Indices of configs grouped by their shared cell fields, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(_group_key(config), []).append(i)
    return list(groups.values())


def _group_key(config: TrialConfig) -> tuple:
    # Unknown fields (e.g. a batch-size plan) separate groups too.
    others = tuple(repr(getattr(config, f.name)) for f in dataclasses.fields(config)
                   if f.name not in _PER_TRIAL_FIELDS)
    return (*others, _ghost_batch_size(config))


def _ghost_batch_size(config: TrialConfig) -> int | None:
    """The ghost batch size `trainers.loop.build_model` builds the model with."""
    ghost = config.hparams.get("ghost_batch_size")
    return int(ghost) if ghost else None


def _field_default(spec: dataclasses.Field):
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return object()  # a required field this module does not know: never "default"


def _run_sequential(config: TrialConfig, index: int, cache: DataCache, sinks: _Sinks) -> TrialResult:
    result = run_trial(config, data_cache=cache,
                       on_measurement=lambda m: sinks.measurement(index, m),
                       best_so_far=sinks.best_so_far, prune=sinks.prune)
    sinks.result(index, result)
    return result


def _model_is_vectorizable(workload: Workload) -> bool:
    """An in-memory workload with a network (no closed form, no DataLoader), without
    active dropout (`run_trial`'s masks come from the trial's own global RNG streams,
    which vmap would not draw the same), and with batch norm only where it
    keeps running statistics as an exponential average (momentum set)."""
    if workload.simulate is not None or workload.load_folders is not None:
        return False
    with torch.device("meta"):
        model = workload.build_model(ModelOptions())
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return False
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.momentum is None or not module.track_running_stats):
            return False
    return True


def _guess_input_shape(model: nn.Module) -> tuple[int, ...]:
    """The per-example input shape when the caller gives none: a first Linear layer
    fixes it; a first convolution is assumed to see 32 x 32 images."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, 32, 32)
    raise ValueError("cannot infer the input shape of this model; pass input_shape")


def _activation_count(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Elements of every leaf module's output for one forward pass on the meta device."""
    total = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(shape, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return total[0] + math.prod(shape)


# --- the vectorized group ------------------------------------------------------------------

@dataclass(frozen=True)
class _StepOptions:
    compile: bool
    autocast_dtype: torch.dtype | None
    stacked: bool = False  # use trainers.stacked where it covers the model
    graphs: bool = False  # replay small vmapped steps from CUDA graphs
    tiered: bool = False  # compile each step variant once it has run eager long enough

    @staticmethod
    def resolve(device: torch.device, compile: bool | None, precision: Precision,
                stacked: bool = False, cuda_graphs: bool | None = None) -> "_StepOptions":
        on_cuda = device.type == "cuda"
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs a CUDA device; the trials run on {device}")
        bf16 = precision == "bf16" or (precision == "auto" and on_cuda)
        compiled = on_cuda if compile is None else compile
        return _StepOptions(compiled, torch.bfloat16 if bf16 else None,
                            stacked and not compiled and not bf16,
                            on_cuda if cuda_graphs is None else cuda_graphs,
                            tiered=compile is None and on_cuda)

    @property
    def step_key(self) -> tuple:
        """What the built step depends on (graphs replay the same step)."""
        return self.compile, self.autocast_dtype, self.stacked


@dataclass
class _TrialState:
    """Per-trial counters that differ between trials of a group."""

    index: int  # position in the caller's config list
    config: TrialConfig
    stop: StopState = field(default_factory=StopState)
    result: TrialResult | None = None


@dataclass
class _Stack:
    """The stacked, still-trained trials: slot k of every tensor is trials[k]."""

    trials: list[_TrialState]
    params: dict[str, torch.Tensor]  # name -> (K, *shape)
    buffers: dict[str, torch.Tensor]  # name -> (K, *shape)
    opt_state: dict[str, dict[str, torch.Tensor]]  # state name -> param name -> (K, *shape)
    hparams: dict[str, torch.Tensor]  # name -> (K,)
    generators: list[torch.Generator]
    tables: _StepTables  # per-step scalars, and the exact learning rates for measurements
    active: torch.Tensor  # (K,) bool
    interval_loss: torch.Tensor  # (K,) float32 summed training loss since the last evaluation
    orders: torch.Tensor | None = None  # (K, N) this epoch's permutation per trial

    def running(self) -> list[int]:
        return [k for k, trial in enumerate(self.trials) if trial.result is None]


@dataclass
class _Clock:
    step: int = 0
    examples: int = 0
    interval_count: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0


# Tiered compilation (the default on CUDA): a step variant (batch size, stack size, masked
# or not) runs uncompiled, replayed from CUDA graphs where they apply, until it has spent
# this many seconds, and compiled from then on. A compilation costs 7 to 17 s per variant
# on an H100 or H200 (bench/README.md, warm-ups), and the compiled step is 1.25x to 1.7x
# faster than the uncompiled one in a graph: it saves 20% to 40% of a variant's uncompiled
# time, so a compilation (~12 s) pays for itself after ~40 s of uncompiled running.
# Compiling once that much has been spent (the ski-rental rule) costs at most about twice
# what the best choice in hindsight would, per variant; a study's many short-lived
# variants (a cell's last group, small stacks near its end) never compile, and a
# long-running variant runs compiled for all but its first 40 s.
_EAGER_SECONDS_BEFORE_COMPILING = 40.0


@dataclass
class _CompileTiers:
    """Uncompiled seconds per step variant, and the variants compiled so far."""

    eager_seconds: dict[tuple, float] = field(default_factory=dict)
    compiled: set[tuple] = field(default_factory=set)

    def spend(self, variant: tuple, seconds: float) -> None:
        """`variant` ran `seconds` more (uncompiled, unless it is compiled already)."""
        if variant in self.compiled:
            return
        spent = self.eager_seconds[variant] = self.eager_seconds.get(variant, 0.0) + seconds
        if spent >= _EAGER_SECONDS_BEFORE_COMPILING:
            self.compiled.add(variant)


def _variant(batch_size: int, stack: _Stack) -> tuple:
    """What a compiled step specialises on besides the model: (batch size, stack size,
    whether stopped trials are masked). The epoch's short last batch is never compiled."""
    return batch_size, len(stack.trials), len(stack.running()) < len(stack.trials)


@dataclass(frozen=True)
class _Context:
    """What a group shares: the workload, data, model skeleton and compiled step."""

    workload: Workload
    device: torch.device
    splits: object
    skeleton: nn.Module  # a copy on the meta device: structure only
    optimizer: str
    step_fn: Callable = field(repr=False)  # vmapped (compiled where options.compile)
    looped_step_fn: Callable = field(repr=False)  # the same step, trials in a loop, eager
    # step_fn uncompiled: the epoch's shorter last batch, one step per epoch, is not worth
    # a compilation of its own per stack size (step_fn itself where not compiled)
    eager_step_fn: Callable = field(repr=False)
    # step_fn and eager_step_fn in the in-place form CUDA graphs replay (writing_back); with
    # graphs on, the compiled one is compiled with its write-back (fused into the update)
    step_into_fn: Callable = field(repr=False)
    eager_step_into_fn: Callable = field(repr=False)
    options: _StepOptions
    # which step variants have been compiled under tiered compilation, shared like graphed
    tiers: _CompileTiers = field(default_factory=_CompileTiers, repr=False)
    # step_fn replayed from CUDA graphs, one per stack size K, shared by every group
    # (and every copy of this context) that replays graphs
    graphed: dict[int, GraphedStep] = field(default_factory=dict, repr=False)


def _run_group(configs: list[TrialConfig], indices: list[int], cache: DataCache, sinks: _Sinks,
               options: _StepOptions, steps: dict) -> list[TrialResult]:
    """Train one group of compatible trials to their end (`run_trial`'s loop, stacked)."""
    first = configs[0]
    workload = get_workload(first.workload)
    device = resolve_device(first.device)
    splits = cache.get(workload, DataOptions.of(first), device)
    models = [build_model(workload, config, device) for config in configs]
    stack = _make_stack(configs, indices, models, device, splits.train_size)
    key = (workload.name, str(device), first.optimizer, options.step_key, tuple(sorted(stack.hparams)),
           _ghost_batch_size(first), bool(stack.buffers))
    if key not in steps:  # same key: same skeleton and step function, so no recompilation
        steps[key] = _make_context(workload, device, splits, models[0], first.optimizer, options)
    context = dataclasses.replace(steps[key], splits=splits, options=options)
    trainer = _stacked_trainer(context, models[0], splits, steps) if options.stacked else None
    trials = list(stack.trials)
    clock = _Clock()
    train_size, batch_size = splits.train_size, first.batch_size
    started = time.perf_counter()
    while True:
        if trainer is not None:
            _train_interval_stacked(trainer, stack, clock, first, train_size)
        else:
            _train_interval(context, stack, clock, first, train_size)
        _sync(device)
        elapsed = time.perf_counter() - started
        clock.train_seconds += elapsed
        if trainer is None and context.options.tiered and _compiles_per_stack_size(context, batch_size):
            context.tiers.spend(_variant(batch_size, stack), elapsed)
        _evaluate_and_decide(context, stack, clock, sinks, train_size, first, trainer)
        started = time.perf_counter()
        if not stack.running():
            return [trial.result for trial in trials]  # type: ignore[misc]
        # The stacked path does not mask: a stopped trial leaves the stack at once.
        stack = _maybe_compact(stack, always=trainer is not None,
                               powers_of_two=_compiles_per_stack_size(context, batch_size))


def _steps_to_evaluation(clock: _Clock, config: TrialConfig) -> int:
    """Steps from the clock's to the next evaluation (every `eval_every` steps, and the last)."""
    return min((clock.step // config.eval_every + 1) * config.eval_every, config.max_steps) - clock.step


def _epoch_orders(generators: list[torch.Generator], train_size: int,
                  device: torch.device) -> torch.Tensor:
    """A new epoch's permutation of the training set per trial, from its own generator: (K, N)."""
    return torch.stack([torch.randperm(train_size, device=device, generator=g) for g in generators])


def _train_interval(context: _Context, stack: _Stack, clock: _Clock, config: TrialConfig,
                    train_size: int) -> None:
    """The steps up to the next evaluation, every trial at every step. An epoch starts
    where the examples seen so far are a multiple of the training set (its last batch
    is the remainder)."""
    for _ in range(_steps_to_evaluation(clock, config)):
        start = clock.examples % train_size
        if start == 0:
            stack.orders = _epoch_orders(stack.generators, train_size, stack.active.device)
        count = _train_step(context, stack, clock, start, config.batch_size)
        clock.step += 1
        clock.examples += count
        clock.interval_count += count


def _train_interval_stacked(trainer: StackedTrainer, stack: _Stack, clock: _Clock,
                            config: TrialConfig, train_size: int) -> None:
    """`_train_interval` on the fast path (trainers.stacked), in place, one sub-stack of
    trials after another (`StackedTrainer.parts`): trials are independent between
    evaluations, and a sub-stack whose parameters and optimizer state stay in the CPU's
    cache from step to step trains faster than the whole stack streamed from memory at
    every step. Each trial sees the same batches, scalars and generator draws as in
    `_train_interval`: its permutations come from its own generator, and the sub-stacks
    train in step order."""
    batch_size, device = config.batch_size, stack.active.device
    schedule, examples = [], clock.examples  # (start in the epoch, per-step scalars) per step
    for step in range(clock.step, clock.step + _steps_to_evaluation(clock, config)):
        start = examples % train_size
        schedule.append((start, stack.tables.row(step)))
        examples += min(batch_size, train_size - start)
    if stack.orders is None:
        stack.orders = torch.empty(len(stack.trials), train_size, dtype=torch.int64, device=device)
    for part in trainer.parts(stack.params):
        params = {n: p[part] for n, p in stack.params.items()}
        opt_state = {s: {n: t[part] for n, t in state.items()} for s, state in stack.opt_state.items()}
        hparams = {n: h[part] for n, h in stack.hparams.items()}
        generators, orders, losses = stack.generators[part], stack.orders[part], stack.interval_loss[part]
        for start, row in schedule:
            if start == 0:
                orders.copy_(_epoch_orders(generators, train_size, device))
            x, y = trainer.batch(orders[:, start:start + batch_size], generators)
            losses += trainer.step(params, opt_state, hparams, {n: r[part] for n, r in row.items()}, x, y)
    clock.step += len(schedule)
    clock.interval_count += examples - clock.examples
    clock.examples = examples


def _stacked_trainer(context: _Context, model: nn.Module, splits, steps: dict) -> StackedTrainer | None:
    """The fast path's trainer for this group, or None where it does not cover the model.
    The preprocessed training set it gathers from is kept in `steps` for later groups on
    the same data (one float copy per workload and device)."""
    layers = StackedMLP.of(model)
    if layers is None:
        return None
    key = ("stacked data", context.workload.name, str(context.device))
    cached = steps.get(key)
    if cached is None or cached[0] is not splits.train_x:
        cached = steps[key] = (splits.train_x, preprocessed_train_x(context.workload, splits))
    return StackedTrainer(layers, context.workload, context.optimizer, splits, cached[1])


# Every group builds its compiled step from the same function, and dynamo counts all
# compiled variants of one code object against `recompile_limit` (8 by default): a
# study's batch sizes x optimizers x stack sizes pass it, and every later group would
# fall back to eager with only a log warning. Each variant is an intended specialisation.
_RECOMPILE_LIMIT = 1024


def allow_recompiles(limit: int = _RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-function and total recompile limits to at least `limit`."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit",  # the latter: its name before torch 2.6
                 "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def _make_context(workload, device, splits, model, optimizer, options) -> _Context:
    skeleton = copy.deepcopy(model).to("meta")
    grads = _trial_loss_fn(skeleton, workload, options.autocast_dtype, device)
    eager = vmapped = _build_step(vmap(grad_and_value(grads, has_aux=True)), optimizer)
    eager_into = vmapped_into = writing_back(eager)
    if options.compile:
        allow_recompiles()
        vmapped = torch.compile(eager, dynamic=False)
        if options.graphs:  # what graphs replay: the step compiled with its write-back
            vmapped_into = torch.compile(eager_into, dynamic=False)
    # The loop runs eager even where the vmapped step is compiled: on an H200 the eager
    # loop beat the compiled vmapped step (1.35x at B = 4096, K = 9), and compiling K
    # unrolled copies of the model would cost a compilation per stack size.
    looped = _build_step(_looped_grads_fn(skeleton, workload, options.autocast_dtype, device), optimizer)
    return _Context(workload, device, splits, skeleton, optimizer, vmapped, looped, eager,
                    vmapped_into, eager_into, options)


def _make_stack(configs, indices, models, device, train_size) -> _Stack:
    params, buffers = stack_module_state(models)
    params = {name: p.detach() for name, p in params.items()}  # (K, *shape), no autograd leaves
    buffers = {name: b.detach() for name, b in buffers.items()}
    optimizer = configs[0].optimizer
    hparams = _hparam_tensors(configs, device)
    k = len(configs)
    return _Stack(
        trials=[_TrialState(i, c) for i, c in zip(indices, configs)],
        params=params, buffers=buffers, opt_state=_init_opt_state(optimizer, params),
        hparams=hparams,
        generators=[torch.Generator(device=device).manual_seed(c.seed) for c in configs],
        tables=_StepTables(configs, train_size, device),
        active=torch.ones(k, dtype=torch.bool, device=device),
        interval_loss=torch.zeros(k, dtype=torch.float32, device=device))


# --- hyperparameters and per-step scalar tables ----------------------------------------------

def _resolved_hparams(config: TrialConfig) -> dict[str, float]:
    """The optimizer's hyperparameters with its registry defaults filled in."""
    from trainers.optim import get_optimizer
    values = get_optimizer(config.optimizer).resolve(config.hparams)
    clip = config.hparams.get("grad_clip_norm")
    values["grad_clip_norm"] = float(clip) if clip else 0.0
    if "beta1" in values:  # torch.optim forms 1 - beta in double, then casts to float32
        values["one_minus_beta1"] = 1.0 - float(values["beta1"])
        values["one_minus_beta2"] = 1.0 - float(values["beta2"])
    return {name: float(value) for name, value in values.items()}


def _hparam_tensors(configs: list[TrialConfig], device: torch.device) -> dict[str, torch.Tensor]:
    resolved = [_resolved_hparams(c) for c in configs]
    # Weight decay and clipping are left out where no trial uses them: the step then
    # skips them statically (no data-dependent branch, no graph break when compiled).
    unused = {name for name in ("weight_decay", "grad_clip_norm") if not any(r[name] for r in resolved)}
    return {name: torch.tensor([r[name] for r in resolved], dtype=torch.float32, device=device)
            for name in resolved[0] if name not in unused}  # name -> (K,)


class _StepTables:
    """Per-step, per-trial scalars computed in Python doubles exactly as torch.optim and
    `run_trial` compute them, then stored as float32 (K columns): the learning rate, and
    for adam/adamw the bias-corrected step size and sqrt of the second bias correction,
    for adamw the decoupled decay factor 1 - lr * wd.

    Computed `chunk` steps at a time as the clock reaches them, not for the whole budget
    up front: a Shallue-style budget of 100,000 steps x 32 trials took 1.2 s of Python per
    group (and ~100 MB of floats) for trials that mostly stop within a few thousand."""

    def __init__(self, configs: list[TrialConfig], train_size: int, device: torch.device,
                 chunk: int = 1024):
        self.configs, self.train_size, self.device, self.chunk = configs, train_size, device, chunk
        self.factors = [get_schedule(c.schedule).build(c.hparams, max_steps=c.max_steps) for c in configs]
        self.resolved = [_resolved_hparams(c) for c in configs]
        self.lr_values: list[list[float]] = []  # [step][k] exact learning rates, every step so far
        self.start, self.examples = 0, 0  # first step of the chunk on the device; examples before `end`
        self.tables: dict[str, torch.Tensor] = {}  # name -> (chunk, K) float32

    @property
    def end(self) -> int:
        return len(self.lr_values)

    def row(self, step: int) -> dict[str, torch.Tensor]:
        """name -> (K,) scalars of `step` (steps are asked in order)."""
        if step >= self.end:
            self._compute(step)
        return {name: table[step - self.start] for name, table in self.tables.items()}

    def lr(self, step: int) -> list[float]:
        """The exact learning rates of a step already asked for, one per trial."""
        return self.lr_values[step]

    def select(self, keep: list[int]) -> "_StepTables":
        """The tables of the trials at `keep` (compaction)."""
        out = copy.copy(self)
        out.configs = [self.configs[k] for k in keep]
        out.factors = [self.factors[k] for k in keep]
        out.resolved = [self.resolved[k] for k in keep]
        out.lr_values = [[row[k] for k in keep] for row in self.lr_values]
        index = torch.tensor(keep, device=self.device)
        out.tables = {name: table.index_select(1, index) for name, table in self.tables.items()}
        return out

    def _compute(self, step: int) -> None:
        first = self.configs[0]
        self.start = step
        stop = min(max(step + self.chunk, self.end), first.max_steps)
        lr_rows, rows = [], {"step_size": [], "bias2_sqrt": [], "decay": []}
        for t in range(self.end, stop):
            epoch = self.examples / self.train_size
            lrs = [float(c.hparams["learning_rate"]) * f(t, epoch) for c, f in zip(self.configs, self.factors)]
            self.lr_values.append(lrs)
            if t >= step:
                lr_rows.append(lrs)
            if first.optimizer in ("adam", "adamw") and t >= step:
                n = t + 1
                rows["step_size"].append([lr / (1 - r["beta1"] ** n) for lr, r in zip(lrs, self.resolved)])
                rows["bias2_sqrt"].append([(1 - r["beta2"] ** n) ** 0.5 for r in self.resolved])
                rows["decay"].append([1 - lr * r["weight_decay"] for lr, r in zip(lrs, self.resolved)])
            self.examples += min(first.batch_size, self.train_size - (self.examples % self.train_size))
        self.tables = {"lr": torch.tensor(lr_rows, dtype=torch.float32, device=self.device)}
        self.tables.update({name: torch.tensor(values, dtype=torch.float32, device=self.device)
                            for name, values in rows.items() if values})


# --- the functional training step ------------------------------------------------------------

def _init_opt_state(optimizer: str, params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    if optimizer in ("momentum", "nesterov"):
        return {"momentum_buffer": {n: torch.zeros_like(p) for n, p in params.items()}}
    if optimizer in ("adam", "adamw"):
        return {"exp_avg": {n: torch.zeros_like(p) for n, p in params.items()},
                "exp_avg_sq": {n: torch.zeros_like(p) for n, p in params.items()}}
    return {}


# A convolution whose input and weight both carry the trial axis becomes, under vmap, one
# grouped convolution (groups = K). Once a trial's own batch is large enough, K plain
# convolutions in a loop beat it. MNIST's simple CNN, forward + backward, per trial-step
# (bench/conv_stacking.py):
# - H200, bf16, eager: the loop 1.6x faster at B = 1024 (K = 20), 1.8x at 4096 (K = 9),
#   2.0x at 16384 (K = 2); at B = 256 (K = 30) and below vmap is 2x to 7x faster;
# - 2-core CPU, fp32: the loop 1.35x faster at B = 64 (K = 2), 1.75x at 128 (K = 8),
#   1.35x at 512 (K = 4); even at B = 16.
# Other devices take CUDA's threshold.
_CONV_LOOP_MIN_BATCH = {"cuda": 1024, "cpu": 64}

# CUDA graphs replay the vmapped step of cells up to this batch size: there a step can be
# a few hundred short kernels whose launches, not their arithmetic, set its time (the
# MNIST MLP's compiled step, K = 8 or 32: 2.2x to 3.7x faster at B = 16 and 128 on an
# H200, 2.3x to 4.3x on an H100, also at B = 512; the simple CNN's uncompiled step 1.4x
# to 3.2x at B = 16, where its compiled step lost 8% to 16% to the copy of its new state
# into the static tensors, which compiling the write-back with the step removes). Larger
# steps are bound by arithmetic, and a graph would only hold their activations' memory
# (batch sizes above 512 were not measured).
_GRAPH_MAX_BATCH = 512
# Stack sizes whose static state and graphs a context keeps (least recently used freed):
# a group of 32 compacts to a few smaller sizes, and the next group starts at 32 again.
# Unbounded, a long study would hold one set per size ever compacted to, and `choose_k`,
# which sees only the device's free memory, would pick ever smaller stacks.
_GRAPHED_STACK_SIZES = 4


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _step_for(context: _Context, batch_size: int, k: int, short: bool = False,
              masked: bool = False) -> Callable:
    """The step a group of `k` trials at the cell's `batch_size` trains with: the trials
    in a loop (convnets at large batches), the vmapped step replayed from a CUDA graph
    (small batches, where graphs are on), or the vmapped step. The vmapped step is
    compiled where the options say so, except for a `short` batch (the epoch's last) and,
    under tiered compilation, a variant (`masked`: stopped trials in the stack) that has
    not yet run long enough uncompiled; with graphs on, either is replayed from its own
    graph on the same static state."""
    if _loops_trials(context.skeleton, batch_size, context.device):
        return context.looped_step_fn
    compiled = context.options.compile and not short and (
        not context.options.tiered or (batch_size, k, masked) in context.tiers.compiled)
    if context.options.graphs and batch_size <= _GRAPH_MAX_BATCH:
        step = context.step_into_fn if compiled else context.eager_step_into_fn
        graphed = context.graphed.pop(k, None) or GraphedStep(context.step_into_fn, context.device)
        context.graphed[k] = graphed  # the most recently used last
        if len(context.graphed) > _GRAPHED_STACK_SIZES:  # free the least recently used
            del context.graphed[next(iter(context.graphed))]
        return graphed if step is graphed.step else functools.partial(graphed, step=step)
    return context.step_fn if compiled else context.eager_step_fn


def _loops_trials(skeleton: nn.Module, batch_size: int, device: torch.device) -> bool:
    """Whether a convnet's trials run as a loop of plain convolutions at this batch size."""
    threshold = _CONV_LOOP_MIN_BATCH.get(device.type, _CONV_LOOP_MIN_BATCH["cuda"])
    return batch_size >= threshold and _has_conv(skeleton)


def _build_step(grads_fn: Callable, optimizer: str) -> Callable:
    """step(params, buffers, opt_state, hparams, row, x, y, active) ->
    (params, buffers, opt_state, loss_sums): one update of every trial, stopped trials
    (False in `active`; None: all running, no masking pass) unchanged. Batch-norm buffers
    come back as the forward pass left them (running statistics updated once per batch,
    or per ghost batch). `grads_fn` is vmapped `_trial_loss_fn` or `_looped_grads_fn`."""
    update = _UPDATES[optimizer]

    def step(params, buffers, opt_state, hparams, row, x, y, active):
        grads, (_, (loss_sums, new_buffers)) = grads_fn(params, buffers, x, y)  # (K, *shape), (K,)
        if "grad_clip_norm" in hparams:
            grads = _clip_per_trial(grads, hparams["grad_clip_norm"])
        new_params, new_state = update(params, grads, opt_state, hparams, row)
        if active is None:  # every trial running: nothing to freeze
            return new_params, new_buffers, new_state, loss_sums
        new_params = {n: _where_active(active, new_params[n], params[n]) for n in params}
        new_state = {s: {n: _where_active(active, new_state[s][n], opt_state[s][n]) for n in params}
                     for s in opt_state}
        new_buffers = {n: _where_active(active, new_buffers[n], buffers[n]) for n in buffers}
        return new_params, new_buffers, new_state, loss_sums
    return step


def _trial_loss_fn(skeleton, workload, autocast_dtype, device):
    """loss(params, buffers, x, y) of ONE trial -> (mean loss, (summed loss, buffers)).

    The model runs on copies of the buffers, which batch norm updates in place in
    training mode (under vmap each trial's own slice); the copies are returned, so the
    caller's buffers are never mutated."""
    def loss_fn(params, buffers, x, y):  # x (B, *input), y (B,)
        buffers = {name: b.clone() for name, b in buffers.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = functional_call(skeleton, (params, buffers), (x,))  # (B, classes)
        loss_sum, count, _ = workload.loss(logits, y)
        return loss_sum / count, (loss_sum.detach(), buffers)
    return loss_fn


def _looped_grads_fn(skeleton, workload, autocast_dtype, device):
    """What `vmap(grad_and_value(_trial_loss_fn(...), has_aux=True))` returns, computed by
    running the K trials one after another on plain (ungrouped) layers: the gradient of
    the sum of the trials' mean losses with respect to the stacked parameters is, slice
    by slice, each trial's own gradient (trial k's loss depends on slice k alone).
    `unbind` hands out the slices, so the backward stacks the K gradients once. Each
    trial's layers see run_trial's memory layout: on CUDA channels_last inputs and
    convolution weights (a slice of the stacked weights is laid out NCHW; with an input of
    one channel, whose layout is ambiguous, cuDNN would then run the whole network NCHW
    and convert each layer's tensors for its NHWC kernels)."""
    def total_loss(params, buffers, x, y):  # x (K, B, *input), y (K, B)
        buffers = {name: b.clone() for name, b in buffers.items()}  # updated in place, returned
        slices = {name: p.unbind(0) for name, p in params.items()}
        means, sums = [], []
        for k in range(x.shape[0]):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits = functional_call(skeleton, (_trial_params(slices, k, device),
                                                    {n: b[k] for n, b in buffers.items()}),
                                         (_memory_format(x[k], device),))  # as run_trial feeds it
            loss_sum, count, _ = workload.loss(logits, y[k])
            means.append(loss_sum / count)
            sums.append(loss_sum.detach())
        means = torch.stack(means)
        return means.sum(), (means.detach(), (torch.stack(sums), buffers))

    def grads_fn(params, buffers, x, y):
        grads, (_, aux) = grad_and_value(total_loss, has_aux=True)(params, buffers, x, y)
        return grads, aux
    return grads_fn


def _trial_params(stacked: dict, k: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Trial k's parameters from stacked (or unbound) ones, 4-D (convolution) weights
    channels_last on CUDA, as run_trial's model holds them."""
    return {name: _memory_format(values[k], device) for name, values in stacked.items()}


def _per_trial(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, ..., 1) broadcastable against a stacked (K, *shape) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _where_active(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(_per_trial(active, new), new, old)


def _clip_per_trial(grads: dict[str, torch.Tensor], max_norm: torch.Tensor) -> dict[str, torch.Tensor]:
    """`clip_grad_norm_` per trial: scale by min(1, max_norm / (norm + 1e-6)) where
    max_norm > 0 (trials without clipping keep their gradients bit for bit)."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()], dim=1)
    total = torch.linalg.vector_norm(norms, dim=1)  # (K,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    coef = torch.where(max_norm > 0, coef, torch.ones_like(coef))
    return {n: g * _per_trial(coef, g) for n, g in grads.items()}


def _l2(grads, params, hp):
    """torch.optim's coupled weight decay: g + wd * p (absent when every wd is 0)."""
    if "weight_decay" not in hp:
        return grads
    weight_decay = hp["weight_decay"]
    return {n: g + _per_trial(weight_decay, g) * params[n] for n, g in grads.items()}


def _sgd_update(params, grads, state, hp, row):
    grads = _l2(grads, params, hp)
    return {n: p - _per_trial(row["lr"], p) * grads[n] for n, p in params.items()}, state


def _momentum_update(params, grads, state, hp, row, nesterov=False):
    # torch.optim.SGD: buf <- m * buf + g (buf starts as g, i.e. from zero); the step is
    # buf, or g + m * buf for nesterov; w <- w - lr * step.
    grads = _l2(grads, params, hp)
    new_params, buffers = {}, {}
    for n, p in params.items():
        momentum = _per_trial(hp["momentum"], p)
        buf = state["momentum_buffer"][n] * momentum + grads[n]
        direction = grads[n] + momentum * buf if nesterov else buf
        new_params[n] = p - _per_trial(row["lr"], p) * direction
        buffers[n] = buf
    return new_params, {"momentum_buffer": buffers}


def _nesterov_update(params, grads, state, hp, row):
    return _momentum_update(params, grads, state, hp, row, nesterov=True)


def _adam_update(params, grads, state, hp, row, decoupled=False):
    # torch.optim.Adam/AdamW (no amsgrad): m <- lerp(m, g, 1 - b1); v <- b2 v + (1 - b2) g^2;
    # w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps); AdamW first w <- w (1 - lr wd).
    if not decoupled:
        grads = _l2(grads, params, hp)
    new_params, exp_avgs, exp_avg_sqs = {}, {}, {}
    for n, p in params.items():
        g = grads[n]
        beta2 = _per_trial(hp["beta2"], p)
        exp_avg = torch.lerp(state["exp_avg"][n], g, _per_trial(hp["one_minus_beta1"], p))
        exp_avg_sq = state["exp_avg_sq"][n] * beta2 + _per_trial(hp["one_minus_beta2"], p) * g * g
        denom = exp_avg_sq.sqrt() / _per_trial(row["bias2_sqrt"], p) + _per_trial(hp["epsilon"], p)
        base = p * _per_trial(row["decay"], p) if decoupled and "weight_decay" in hp else p
        new_params[n] = base - _per_trial(row["step_size"], p) * (exp_avg / denom)
        exp_avgs[n], exp_avg_sqs[n] = exp_avg, exp_avg_sq
    return new_params, {"exp_avg": exp_avgs, "exp_avg_sq": exp_avg_sqs}


def _adamw_update(params, grads, state, hp, row):
    return _adam_update(params, grads, state, hp, row, decoupled=True)


_UPDATES: dict[str, Callable] = {
    "sgd": _sgd_update, "momentum": _momentum_update, "nesterov": _nesterov_update,
    "adam": _adam_update, "adamw": _adamw_update}


def _train_step(context: _Context, stack: _Stack, clock: _Clock, start: int, batch_size: int) -> int:
    """Gather every running trial's batch and apply one update; returns the batch size."""
    workload, splits = context.workload, context.splits
    index = stack.orders[:, start:start + batch_size]  # (K, b)
    x = workload.preprocess(splits.train_x[index])  # (K, b, *input)
    if workload.augment is not None:  # per-trial generator, as run_trial draws it
        x = torch.stack([workload.augment(x[k], g) for k, g in enumerate(stack.generators)])
    y = splits.train_y[index]  # (K, b)
    row = stack.tables.row(clock.step)  # name -> (K,)
    active = None if len(stack.running()) == len(stack.trials) else stack.active
    # By the cell's batch size, not this batch's: an epoch's shorter last batch keeps the
    # path (and, compiled, needs no variant of the other one).
    step = _step_for(context, batch_size, len(stack.trials), short=index.shape[1] < batch_size,
                     masked=active is not None)
    stack.params, stack.buffers, stack.opt_state, loss_sums = step(
        stack.params, stack.buffers, stack.opt_state, stack.hparams, row, x, y, active)
    stack.interval_loss = stack.interval_loss + loss_sums.float()
    return int(index.shape[1])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- evaluation and stopping -------------------------------------------------------------------

@torch.no_grad()
def evaluate_stacked(skeleton: nn.Module, workload: Workload, params: dict[str, torch.Tensor],
                     buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                     batch_size: int, autocast_dtype: torch.dtype | None = None
                     ) -> tuple[list[float], list[float]]:
    """Mean loss and error rate of each of K stacked models over a whole split, in the
    chunks of `batch_size` examples `trainers.loop.evaluate` uses (eval mode), under
    autocast to `autocast_dtype` when given (as `run_trial` evaluates: bf16 on CUDA).
    Convnets evaluate chunks of `_CONV_LOOP_MIN_BATCH` or more one trial at a time."""
    k = next(iter(params.values())).shape[0]
    vmapped = vmap(lambda p, b, inputs: functional_call(skeleton, (p, b), (inputs,)),
                   in_dims=(0, 0, None))

    def looped(p, b, inputs):
        inputs = _memory_format(inputs, inputs.device)
        return torch.stack([functional_call(skeleton, (_trial_params(p, i, inputs.device),
                                                       {n: v[i] for n, v in b.items()}), (inputs,))
                            for i in range(k)])
    forward = looped if _loops_trials(skeleton, min(batch_size, len(y)), x.device) else vmapped
    loss_sum = torch.zeros(k, device=x.device, dtype=torch.float64)
    wrong = torch.zeros(k, device=x.device, dtype=torch.int64)
    skeleton.eval()
    try:
        for start in range(0, len(y), batch_size):
            with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits = forward(params, buffers, workload.preprocess(x[start:start + batch_size]))  # (K, b, C)
            labels = y[start:start + batch_size]  # (b,)
            loss_sum += vmap(lambda out: workload.loss(out, labels)[0])(logits).double()
            wrong += (logits.argmax(dim=2) != labels).sum(dim=1)
    finally:
        skeleton.train()
    count = len(y)
    return [v / count for v in loss_sum.tolist()], [v / count for v in wrong.tolist()]


def _evaluate_and_decide(context: _Context, stack: _Stack, clock: _Clock, sinks: _Sinks,
                         train_size: int, config: TrialConfig,
                         trainer: StackedTrainer | None = None) -> None:
    eval_start = time.perf_counter()
    splits = context.splits
    if trainer is not None:
        val_losses, val_errors = trainer.evaluate(stack.params, splits.val_x, splits.val_y,
                                                  config.eval_batch_size)
    else:
        val_losses, val_errors = evaluate_stacked(context.skeleton, context.workload, stack.params,
                                                  stack.buffers, splits.val_x, splits.val_y,
                                                  config.eval_batch_size, context.options.autocast_dtype)
    clock.eval_seconds += time.perf_counter() - eval_start
    train_losses = [v / clock.interval_count for v in stack.interval_loss.tolist()]
    stack.interval_loss = torch.zeros_like(stack.interval_loss)
    clock.interval_count = 0
    lr_row = stack.tables.lr(clock.step - 1)
    stopped = []
    for k in stack.running():
        trial = stack.trials[k]
        measurement = Measurement(
            step=clock.step, examples=clock.examples, epoch=clock.examples / train_size,
            wall_seconds=clock.train_seconds, eval_seconds=clock.eval_seconds,
            learning_rate=lr_row[k], batch_size=config.batch_size,
            train_loss=train_losses[k], val_loss=val_losses[k], val_error=val_errors[k],
            extra=measurement_extras(trial.config, lr_row[k], config.batch_size, train_size))
        sinks.measurement(trial.index, measurement)
        trial.result = _decide(trial, measurement, clock, sinks, trial.config, train_size)
        if trial.result is not None:
            sinks.result(trial.index, trial.result)
            stopped.append(k)
    if stopped:
        mask = torch.ones_like(stack.active)
        mask[stopped] = False
        stack.active = stack.active & mask


def _decide(trial: _TrialState, measurement: Measurement, clock: _Clock, sinks: _Sinks,
            config: TrialConfig, train_size: int) -> TrialResult | None:
    """`run_trial`'s stopping rules (trainers.loop.decide), then this trial's result."""
    cell_best = lambda: sinks.best_so_far() if sinks.prune else None
    decision = decide(trial.stop, measurement, config, cell_best, train_size)
    if decision is None:
        return None
    outcome, message = decision
    reached = measurement if outcome == "reached" else None
    return TrialResult(
        outcome=outcome, steps=clock.step, examples=clock.examples,
        wall_seconds=clock.train_seconds,
        steps_to_result=reached.step if reached else None,
        examples_to_result=reached.examples if reached else None,
        seconds_to_result=reached.wall_seconds if reached else None,
        best_metric=trial.stop.best_metric, message=message)


# --- compaction ----------------------------------------------------------------------------------

def _compiles_per_stack_size(context: _Context, batch_size: int) -> bool:
    """Whether every new stack size costs this group's step a compilation (the compiled
    vmapped step: 9 to 17 s each on an H200; the looped step runs eager)."""
    return context.options.compile and not _loops_trials(context.skeleton, batch_size, context.device)


def _maybe_compact(stack: _Stack, always: bool = False, powers_of_two: bool = False) -> _Stack:
    """Drop stopped trials from the stack once at most half of it is still running
    (halving bounds both the wasted work and, when compiled, the recompilations), or
    as soon as any trial stopped when `always`.

    With `powers_of_two` (a compiled step) the stack shrinks to the next power of two at
    or above the running count, keeping the first stopped trials as masked padding. Every
    group of a cell then compacts to the same few sizes (32, 16, ..., 1), whose compiled
    steps the later groups reuse; exact sizes differ from group to group and each costs a
    compilation. The padding costs no more than the masking before the compaction did:
    under half of the stack is stopped either way."""
    running = stack.running()
    if len(running) == len(stack.trials) or (not always and len(running) * 2 > len(stack.trials)):
        return stack
    keep = running
    if powers_of_two:
        size = 1 << (len(running) - 1).bit_length()  # below len(stack.trials), as 2 x running is
        stopped = [k for k in range(len(stack.trials)) if stack.trials[k].result is not None]
        keep = sorted(running + stopped[:size - len(running)])
    index = torch.tensor(keep, device=stack.active.device)

    def take(tensors: dict[str, torch.Tensor], dim: int = 0) -> dict[str, torch.Tensor]:
        return {n: t.index_select(dim, index) for n, t in tensors.items()}
    return _Stack(
        trials=[stack.trials[k] for k in keep], params=take(stack.params),
        buffers=take(stack.buffers),
        opt_state={s: take(state) for s, state in stack.opt_state.items()},
        hparams=take(stack.hparams), generators=[stack.generators[k] for k in keep],
        tables=stack.tables.select(keep),
        active=stack.active.index_select(0, index),
        interval_loss=stack.interval_loss.index_select(0, index),
        orders=stack.orders.index_select(0, index) if stack.orders is not None else None)
