"""The training loop: one trial from a resolved `TrialConfig`, top to bottom.

Data sit on the device as uint8 tensors; every epoch is a fresh random permutation cut
into batches of the epoch's batch size (the last batch of an epoch holds the remainder,
so an epoch is exactly N examples and ceil(N / B) updates, in every schedule). A batch-size
plan changes B, and multiplies the learning rate, only at epoch boundaries. The loop
evaluates on the full validation set every `eval_every` steps and when the budget (steps,
or epochs) is spent, and stops as soon as the target is strictly beaten, the loss
diverges, the budget is spent, or the trial can no longer beat the cell's best
steps-to-result (it is then pruned: censored at that step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

import torch.distributed as dist

from trainers.batch_schedules import BatchSizePlan
from trainers.batches import LoaderBatches, ResidentBatches, Shard
from trainers.config import Measurement, TrialConfig, TrialResult
from trainers.data.splits import ArraySplits
from trainers.models.ghost_bn import normalization_groups
from trainers.optim import GRAD_CLIP_NORM, clip_gradients, get_optimizer, validate_hparams
from trainers.probe_hooks import TrialProbes, make_probes
from trainers.probes.checkpoints import CheckpointBudgetError, save_checkpoint
from trainers.scaling import noise_scale
from trainers.schedules import get_schedule
from trainers.workloads import DataOptions, ModelOptions, Workload, get_workload

MeasurementSink = Callable[[Measurement], None]
SGD_FAMILY = ("sgd", "momentum", "nesterov", "lars")
BestSoFar = Callable[[], "int | None"]


class DataCache:
    """Datasets loaded once per worker and device (a worker runs many trials)."""

    def __init__(self) -> None:
        self._splits: dict[tuple, object] = {}

    def get(self, workload: Workload, options: DataOptions, device: torch.device) -> ArraySplits:
        key = (workload.name, options, str(device))
        if key not in self._splits:
            self._splits[key] = workload.load_data(options).to(device)
        return self._splits[key]

    def folders(self, workload: Workload, options: DataOptions):
        key = (workload.name, options, "folders")
        if key not in self._splits:
            self._splits[key] = workload.load_folders(options)
        return self._splits[key]

    def load(self, workload: Workload, options: DataOptions, device: torch.device):
        """The workload's data as its trials will read it: folders for a DataLoader
        workload, else tensors on `device`. Both have `train_size`."""
        if workload.load_folders is not None:
            return self.folders(workload, options)
        return self.get(workload, options, device)


def trial_batches(workload: Workload, config: TrialConfig, cache: DataCache,
                  device: torch.device, shard: Shard):
    """The trial's batch source: a DataLoader for folder workloads, else resident tensors."""
    options = DataOptions.of(config)
    if workload.load_folders is not None:
        folders = cache.folders(workload, options)
        return LoaderBatches(folders.train, folders.val, workload, device,
                             num_workers=config.loader_workers, shard=shard)
    return ResidentBatches(cache.get(workload, options, device), workload, shard)


def current_shard() -> Shard:
    """This process's place in a torchrun / DDP group (rank 0 of 1 otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def build_model(workload: Workload, config: TrialConfig, device: torch.device) -> torch.nn.Module:
    """Initialise the model from the trial seed without touching the global RNG state.

    On CUDA the weights are created and drawn on the GPU, from its generator: drawing a
    few million weights with the CPU's generator takes ~10-20 ms per trial, which a group
    of stacked trials that trains in a few hundred ms would spend on the CPU before its
    first step. The same seed gives the same weights on each kind of device, not across
    them (a CPU trial and a CUDA trial of one seed start from different weights)."""
    on_cuda = device.type == "cuda"
    index = device.index if device.index is not None else torch.cuda.current_device() if on_cuda else 0
    with torch.random.fork_rng(devices=[index] if on_cuda else []):
        torch.manual_seed(config.seed)
        ghost = config.hparams.get("ghost_batch_size")
        with torch.device(device) if on_cuda else contextlib.nullcontext():
            model = workload.build_model(ModelOptions(ghost_batch_size=int(ghost) if ghost else None))
    return model.to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor,
             batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and error rate over a whole split of uint8 tensors."""
    batches = ((workload.preprocess(x[s:s + batch_size]), y[s:s + batch_size])
               for s in range(0, len(y), batch_size))
    return _evaluate_batches(model, workload, batches, x.device, Shard(), "fp32")


@torch.no_grad()
def _evaluate_batches(model, workload, batches, device, shard: Shard, precision: str):
    was_training = model.training
    model.eval()
    # (loss sum, wrong, count): summed over this rank's examples, then over ranks.
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    for inputs, labels in batches:
        with _autocast(device, precision):
            logits = model(_memory_format(inputs, device))
        totals[0] += workload.loss(logits, labels)[0].double()
        totals[1] += (logits.argmax(dim=1) != labels).sum()
        totals[2] += labels.numel()
    if shard.world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    loss_sum, wrong, count = totals.tolist()
    return loss_sum / count, wrong / count


def _autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (precision "auto" or "bf16"); plain fp32 elsewhere."""
    enabled = device.type == "cuda" and precision in ("auto", "bf16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _memory_format(inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and inputs.dim() == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    return inputs


@dataclass
class _Progress:
    """Counters of one trial; the only mutable state of the loop."""

    step: int = 0
    examples: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    interval_loss: torch.Tensor | None = None
    interval_count: int = 0
    stop: StopState = field(default_factory=lambda: StopState())
    last_lr: float = 0.0
    batch_size: int = 0


def run_trial(config: TrialConfig, *, data_cache: DataCache | None = None,
              on_measurement: MeasurementSink = lambda m: None,
              best_so_far: BestSoFar = lambda: None,
              prune: bool = True) -> TrialResult:
    """Train one trial. `on_measurement` receives every evaluation as it happens;
    `best_so_far` returns the cell's best steps-to-result (or None), read after every
    evaluation so that a trial which can no longer win stops early when `prune` is set.

    Every random draw follows from `config.seed`: data order and augmentation from the
    trial's generator, initial weights from `build_model`, and dropout masks from global
    RNG streams seeded for the trial (`trial_rng`); the caller's global RNG states are
    left as they were."""
    workload = get_workload(config.workload)
    if workload.simulate is not None:
        result, measurements = workload.simulate(config)
        for measurement in measurements:
            on_measurement(measurement)
        return result
    validate_hparams(config.optimizer, config.hparams)  # before loading data or training
    device = resolve_device(config.device)
    shard = current_shard()
    with trial_rng(config.seed, device, shard.rank):
        return _train(config, workload, device, shard, data_cache or DataCache(), on_measurement,
                      best_so_far, prune)


def _global_rng_seed(seed: int, rank: int) -> int:
    """The seed of a trial's global RNG streams (dropout masks), derived from the trial seed
    and the rank so that it is neither the initialisation's stream (`build_model` seeds the
    same generator with `seed` itself) nor the same on every rank of a DDP group."""
    digest = hashlib.sha256(f"batchlab global rng:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63


@contextlib.contextmanager
def trial_rng(seed: int, device: torch.device, rank: int = 0):
    """Run a trial on global RNG streams of its own: the CPU generator and, on CUDA, the
    trial device's generator are seeded from `_global_rng_seed(seed, rank)` inside
    `torch.random.fork_rng`, and the caller's states are restored afterwards.

    What draws from the global generators during training (dropout masks; nothing else
    of the loop: data order, augmentation and initialisation have generators of their
    own) then follows from the trial seed, so a trial with dropout reproduces whatever
    the process ran before it."""
    on_cuda = device.type == "cuda"
    index = device.index if device.index is not None else torch.cuda.current_device() if on_cuda else 0
    derived = _global_rng_seed(seed, rank)
    with torch.random.fork_rng(devices=[index] if on_cuda else []):
        torch.default_generator.manual_seed(derived)
        if on_cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(derived)
        yield


def _trained_batches(config: TrialConfig, train_size: int, shard: Shard) -> dict[int, str]:
    """Every number of examples one process's update trains on -> why: each epoch's batch
    size (a batch plan's too), the epoch's last, smaller batch where B does not divide N,
    and under data parallelism each rank's share of those."""
    plan = BatchSizePlan(config.batch_size, **config.batch_plan) if config.batch_plan else None
    global_sizes: dict[int, str] = {}
    for epoch_index in (0, *plan.milestones) if plan else (0,):
        batch_size = plan.batch_size(epoch_index) if plan else config.batch_size
        whole, rest = divmod(train_size, batch_size)
        if whole:
            global_sizes.setdefault(batch_size, f"batch size {batch_size}")
        if rest:
            global_sizes.setdefault(rest, f"each epoch's last batch holds {rest} of {train_size:,} "
                                          f"training examples at batch size {batch_size}")
    sizes: dict[int, str] = {}
    for size, why in global_sizes.items():
        for rank in range(shard.world):
            share = len(range(rank, size, shard.world))
            sizes.setdefault(share, why if shard.world == 1 else f"{why}, {share} on rank {rank}")
    return sizes


def check_batch_statistics(workload: Workload, config: TrialConfig, train_size: int,
                           example_shape: Callable[[], tuple[int, ...]], shard: Shard = Shard()) -> None:
    """Raise ValueError, before any training, where a batch-norm layer would have to
    normalize a single value per channel: a layer that sees one value per channel per
    example ((B, C) activations) trained on a batch, or a ghost batch, of one example
    (ghost_batch_size 1, batch size 1, an epoch's last batch of one example). Batch norm
    has no statistics there (torch raises "Expected more than 1 value per channel", deep
    in training); ghost_batch_size 1 on convolutional batch norm is per-example
    normalization over the spatial positions, which is allowed. `example_shape()` gives
    one input example's shape; it is asked for (and the model built on the meta device)
    only when a group of one example can arise at all."""
    ghost = config.hparams.get("ghost_batch_size")
    ghost = int(ghost) if ghost else None  # as build_model reads it (0: ordinary batch norm)
    if ghost is not None and ghost < 1:
        raise ValueError(f"ghost_batch_size must be a positive integer, got {config.hparams['ghost_batch_size']}")
    sizes = _trained_batches(config, train_size, shard)
    if 1 not in sizes and ghost != 1:
        return
    with torch.device("meta"):
        model = workload.build_model(ModelOptions(ghost_batch_size=ghost))
    values_per_example: dict[str, int] = {}
    names = {module: name for name, module in model.named_modules()}

    def record(module, inputs):
        values_per_example[names[module]] = math.prod(inputs[0].shape[2:])
    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model.eval()(torch.empty((2, *example_shape()), device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    for name, values in values_per_example.items():
        if values != 1:
            continue
        layer = model.get_submodule(name)
        layer_ghost = getattr(layer, "ghost_batch_size", None)
        for size, why in sorted(sizes.items()):
            if 1 in normalization_groups(size, layer_ghost):
                reason = ("ghost_batch_size 1 normalizes each example on its own; use 2 or more"
                          if layer_ghost == 1 and size > 1 else why)
                raise ValueError(f"batch-norm layer {name!r} ({type(layer).__name__}) sees one "
                                 f"value per channel per example and cannot normalize a single "
                                 f"example: {reason}")


def example_shape(data) -> tuple[int, ...]:
    """One training example's shape: resident tensors, or a folder set's first validation
    item (the same size; its transforms draw no random numbers, so asking changes no RNG
    stream of the trial or the caller)."""
    if hasattr(data, "train_x"):
        return tuple(data.train_x.shape[1:])
    return tuple(data.val[0][0].shape)


def _train(config: TrialConfig, workload: Workload, device: torch.device, shard: Shard,
           data_cache: DataCache, on_measurement: MeasurementSink, best_so_far: BestSoFar,
           prune: bool) -> TrialResult:
    batches = trial_batches(workload, config, data_cache, device, shard)
    check_batch_statistics(workload, config, batches.train_size,
                           lambda: example_shape(data_cache.load(workload, DataOptions.of(config), device)),
                           shard)
    model = build_model(workload, config, device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = get_optimizer(config.optimizer).build(model.parameters(), config.hparams)
    lr_factor = get_schedule(config.schedule).build(config.hparams, max_steps=config.max_steps)
    base_lr = float(config.hparams["learning_rate"])
    clip_norm = config.hparams.get(GRAD_CLIP_NORM)
    plan = BatchSizePlan(config.batch_size, **config.batch_plan) if config.batch_plan else None
    generator_device = device if isinstance(batches, ResidentBatches) else torch.device("cpu")
    generator = torch.Generator(device=generator_device).manual_seed(config.seed)
    progress = _Progress()
    probes = make_probes(config, model, shard.world)  # None unless the campaign asks
    train_size = batches.train_size
    model.train()
    clock = time.perf_counter()
    for epoch_index in itertools.count():
        batch_size = plan.batch_size(epoch_index) if plan else config.batch_size
        plan_factor = plan.lr_factor(epoch_index) if plan else 1.0
        last_epoch = config.max_epochs is not None and epoch_index + 1 >= config.max_epochs
        steps_in_epoch = -(-train_size // batch_size)
        for position, (inputs, labels, global_count) in enumerate(batches.epoch(batch_size, generator)):
            lr = base_lr * plan_factor * lr_factor(progress.step, progress.examples / train_size)
            _train_step(model, workload, optimizer, inputs, labels, global_count, lr, clip_norm,
                        device, config.precision, shard, progress, probes)
            progress.batch_size = batch_size
            epoch_done = last_epoch and position + 1 == steps_in_epoch
            if progress.step % config.eval_every and progress.step < config.max_steps and not epoch_done:
                continue
            _sync(device)
            progress.train_seconds += time.perf_counter() - clock
            result = _evaluate_and_decide(model, workload, batches, config, progress, on_measurement,
                                          best_so_far, prune, train_size, device, shard, probes)
            clock = time.perf_counter()
            if result is not None:
                return _with_checkpoint(result, model, config, shard)


def _train_step(model, workload, optimizer, inputs, labels, global_count, lr, clip_norm,
                device, precision, shard: Shard, progress, probes: TrialProbes | None = None):
    with _autocast(device, precision):
        loss_sum, count, _ = workload.loss(model(_memory_format(inputs, device)), labels)
    optimizer.zero_grad(set_to_none=True)
    # Divide by the global batch: with gradients summed over ranks below, every rank
    # applies exactly the single-process mean gradient.
    (loss_sum / global_count).backward()
    if probes is not None and shard.world > 1:
        probes.before_all_reduce(model, count, global_count)
    if shard.world > 1:
        _all_reduce_gradients(model)
    if probes is not None:
        probes.after_backward(model, global_count)  # before clipping and the step
    clip_gradients(model.parameters(), clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    detached = loss_sum.detach()
    progress.interval_loss = detached if progress.interval_loss is None else progress.interval_loss + detached
    progress.interval_count += count
    progress.step += 1
    progress.examples += global_count
    progress.last_lr = lr


def _all_reduce_gradients(model: torch.nn.Module) -> None:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluate_and_decide(model, workload, batches, config, progress, on_measurement,
                         best_so_far, prune, train_size, device, shard,
                         probes: TrialProbes | None = None) -> TrialResult | None:
    eval_start = time.perf_counter()
    val_loss, val_error = _evaluate_batches(model, workload, batches.eval_batches(config.eval_batch_size),
                                            device, shard, config.precision)
    progress.eval_seconds += time.perf_counter() - eval_start
    train_loss = _interval_train_loss(progress, device, shard)
    extra = measurement_extras(config, progress.last_lr, progress.batch_size, train_size)
    if probes is not None:
        extra = {**extra, **probes.extras(model)}
    measurement = Measurement(
        step=progress.step, examples=progress.examples, epoch=progress.examples / train_size,
        wall_seconds=progress.train_seconds, eval_seconds=progress.eval_seconds,
        learning_rate=progress.last_lr, batch_size=progress.batch_size,
        train_loss=train_loss, val_loss=val_loss, val_error=val_error,
        extra=extra)
    if shard.rank == 0:
        on_measurement(measurement)
    cell_best = lambda: _from_rank_zero(best_so_far() if prune and shard.rank == 0 else None, shard)
    decision = decide(progress.stop, measurement, config, cell_best, train_size)
    if decision is None:
        return None
    outcome, message = decision
    return TrialResult(
        outcome=outcome, steps=progress.step, examples=progress.examples,
        wall_seconds=progress.train_seconds,
        steps_to_result=measurement.step if outcome == "reached" else None,
        examples_to_result=measurement.examples if outcome == "reached" else None,
        seconds_to_result=measurement.wall_seconds if outcome == "reached" else None,
        best_metric=progress.stop.best_metric, message=message)


def _with_checkpoint(result: TrialResult, model, config: TrialConfig, shard: Shard) -> TrialResult:
    """Save the final weights where the config asks (rank 0 writes; every rank returns the
    path). Over the size budget, nothing is written and the trial's result stands."""
    if config.checkpoint_path is None:
        return result
    if config.checkpoint_reached_only and result.outcome != "reached":
        return result
    try:
        if shard.rank == 0:
            save_checkpoint(model, config.checkpoint_path, max_bytes=config.checkpoint_max_bytes)
    except CheckpointBudgetError as exc:
        note = f"checkpoint not saved: {exc}"
        return dataclasses.replace(result, message=f"{result.message}; {note}" if result.message else note)
    return dataclasses.replace(result, checkpoint_path=str(config.checkpoint_path))


@dataclass
class StopState:
    """What the stopping rules remember about one trial between evaluations."""

    first_train_loss: float | None = None
    best_metric: float | None = None


def decide(state: StopState, measurement: Measurement, config: TrialConfig,
           cell_best: Callable[[], "int | None"], train_size: int) -> tuple[str, str] | None:
    """The stopping rules, in order, after an evaluation: (outcome, message), or None to
    go on. Reached (strictly beats the target), diverged (NaN/inf, or the interval's
    training loss above `divergence_factor` x the first interval's), not_reached (step or
    epoch budget spent), pruned (as many steps as the cell's best, read lazily from
    `cell_best`, without reaching the target). Shared by the sequential and the
    vectorized trainers so both stop trials identically."""
    value = measurement.metric(config.target.metric)
    better = (lambda a, b: a < b) if config.target.mode == "min" else (lambda a, b: a > b)
    if math.isfinite(value) and (state.best_metric is None or better(value, state.best_metric)):
        state.best_metric = value
    if config.target.is_beaten_by(value):
        return "reached", ""
    if _diverged(measurement.train_loss, measurement.val_loss, state, config.divergence_factor):
        return "diverged", f"loss {measurement.train_loss:.4g} at step {measurement.step}"
    epochs = measurement.examples / train_size
    if measurement.step >= config.max_steps or (config.max_epochs is not None and epochs >= config.max_epochs):
        return "not_reached", ""
    best = cell_best()
    if best is not None and measurement.step >= best:
        return "pruned", f"cell best is {best} steps"
    return None


def _interval_train_loss(progress: _Progress, device, shard: Shard) -> float:
    """Mean training loss since the last evaluation, over all ranks' examples."""
    totals = torch.stack([progress.interval_loss.double(),
                          torch.tensor(float(progress.interval_count), device=device, dtype=torch.float64)])
    if shard.world > 1:
        dist.all_reduce(totals)
    progress.interval_loss, progress.interval_count = None, 0
    loss_sum, count = totals.tolist()
    return loss_sum / count


def _from_rank_zero(value, shard: Shard):
    """Rank 0 alone talks to storage; the others follow its answer (the stop decision
    must be the same everywhere)."""
    if shard.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def measurement_extras(config: TrialConfig, learning_rate: float, batch_size: int,
                       train_size: int) -> dict:
    """Per-evaluation quantities beyond the losses: Smith & Le's noise scale
    g = lr / (1 - m) (N / B - 1) for SGD-family optimizers, at the rate and batch in force,
    with the momentum the optimizer trains with (its registry default where the trial's
    hyperparameters leave it out: lars' 0.9; none for plain sgd)."""
    if config.optimizer not in SGD_FAMILY:
        return {}
    momentum = float(get_optimizer(config.optimizer).resolve(config.hparams).get("momentum", 0.0))
    return {"noise_scale": noise_scale(learning_rate, train_size, batch_size, momentum)}


def _diverged(train_loss: float, val_loss: float, state: StopState, factor: float) -> bool:
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        return True
    if state.first_train_loss is None:
        state.first_train_loss = train_loss
        return False
    return train_loss > factor * state.first_train_loss
