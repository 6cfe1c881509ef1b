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

import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from trainers.batch_schedules import BatchSizePlan
from trainers.config import Measurement, TrialConfig, TrialResult
from trainers.data.splits import ArraySplits
from trainers.optim import GRAD_CLIP_NORM, clip_gradients, get_optimizer
from trainers.scaling import noise_scale
from trainers.schedules import get_schedule
from trainers.workloads import DataOptions, ModelOptions, Workload, get_workload

MeasurementSink = Callable[[Measurement], None]
SGD_FAMILY = ("sgd", "momentum", "nesterov", "lars")
BestSoFar = Callable[[], "int | None"]


class DataCache:
    """Datasets loaded once per worker and device (a worker runs many trials)."""

    def __init__(self) -> None:
        self._splits: dict[tuple, ArraySplits] = {}

    def get(self, workload: Workload, options: DataOptions, device: torch.device) -> ArraySplits:
        key = (workload.name, options, str(device))
        if key not in self._splits:
            self._splits[key] = workload.load_data(options).to(device)
        return self._splits[key]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def build_model(workload: Workload, config: TrialConfig, device: torch.device) -> torch.nn.Module:
    """Initialise the model from the trial seed without touching the global RNG state."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        ghost = config.hparams.get("ghost_batch_size")
        model = workload.build_model(ModelOptions(ghost_batch_size=int(ghost) if ghost else None))
    return model.to(device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor,
             batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and error rate over a whole split."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    wrong = torch.zeros((), device=x.device, dtype=torch.int64)
    for start in range(0, len(y), batch_size):
        logits = model(workload.preprocess(x[start:start + batch_size]))
        labels = y[start:start + batch_size]
        loss_sum += workload.loss(logits, labels)[0].double()
        wrong += (logits.argmax(dim=1) != labels).sum()
    model.train(was_training)
    count = len(y)
    return loss_sum.item() / count, wrong.item() / count


@dataclass
class _Progress:
    """Counters of one trial; the only mutable state of the loop."""

    step: int = 0
    examples: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    interval_loss: torch.Tensor | None = None
    interval_count: int = 0
    first_train_loss: float | None = None
    best_metric: float | None = None
    last_lr: float = 0.0
    batch_size: int = 0


def run_trial(config: TrialConfig, *, data_cache: DataCache | None = None,
              on_measurement: MeasurementSink = lambda m: None,
              best_so_far: BestSoFar = lambda: None,
              prune: bool = True) -> TrialResult:
    """Train one trial. `on_measurement` receives every evaluation as it happens;
    `best_so_far` returns the cell's best steps-to-result (or None), read after every
    evaluation so that a trial which can no longer win stops early when `prune` is set."""
    workload = get_workload(config.workload)
    if workload.simulate is not None:
        result, measurements = workload.simulate(config)
        for measurement in measurements:
            on_measurement(measurement)
        return result
    device = resolve_device(config.device)
    splits = (data_cache or DataCache()).get(
        workload, DataOptions(config.data_dir, config.download), device)
    model = build_model(workload, config, device)
    optimizer = get_optimizer(config.optimizer).build(model.parameters(), config.hparams)
    lr_factor = get_schedule(config.schedule).build(config.hparams, max_steps=config.max_steps)
    base_lr = float(config.hparams["learning_rate"])
    clip_norm = config.hparams.get(GRAD_CLIP_NORM)
    plan = BatchSizePlan(config.batch_size, **config.batch_plan) if config.batch_plan else None
    generator = torch.Generator(device=device).manual_seed(config.seed)
    progress = _Progress()
    train_size = splits.train_size
    model.train()
    clock = time.perf_counter()
    for epoch_index in itertools.count():
        batch_size = plan.batch_size(epoch_index) if plan else config.batch_size
        plan_factor = plan.lr_factor(epoch_index) if plan else 1.0
        last_epoch = config.max_epochs is not None and epoch_index + 1 >= config.max_epochs
        order = torch.randperm(train_size, device=device, generator=generator)
        for start in range(0, train_size, batch_size):
            index = order[start:start + batch_size]
            lr = base_lr * plan_factor * lr_factor(progress.step, progress.examples / train_size)
            _train_step(model, workload, optimizer, splits, index, lr, clip_norm, generator, progress)
            progress.batch_size = batch_size
            epoch_done = last_epoch and start + batch_size >= train_size
            if progress.step % config.eval_every and progress.step < config.max_steps and not epoch_done:
                continue
            _sync(device)
            progress.train_seconds += time.perf_counter() - clock
            result = _evaluate_and_decide(model, workload, splits, config, progress,
                                          on_measurement, best_so_far, prune, train_size)
            clock = time.perf_counter()
            if result is not None:
                return result


def _train_step(model, workload, optimizer, splits, index, lr, clip_norm, generator, progress):
    x = workload.preprocess(splits.train_x[index])
    if workload.augment is not None:
        x = workload.augment(x, generator)
    labels = splits.train_y[index]
    loss_sum, count, _ = workload.loss(model(x), labels)
    optimizer.zero_grad(set_to_none=True)
    (loss_sum / count).backward()
    clip_gradients(model.parameters(), clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    detached = loss_sum.detach()
    progress.interval_loss = detached if progress.interval_loss is None else progress.interval_loss + detached
    progress.interval_count += count
    progress.step += 1
    progress.examples += count
    progress.last_lr = lr


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _evaluate_and_decide(model, workload, splits, config, progress, on_measurement,
                         best_so_far, prune, train_size) -> TrialResult | None:
    eval_start = time.perf_counter()
    val_loss, val_error = evaluate(model, workload, splits.val_x, splits.val_y, config.eval_batch_size)
    progress.eval_seconds += time.perf_counter() - eval_start
    train_loss = progress.interval_loss.item() / progress.interval_count
    progress.interval_loss, progress.interval_count = None, 0
    measurement = Measurement(
        step=progress.step, examples=progress.examples, epoch=progress.examples / train_size,
        wall_seconds=progress.train_seconds, eval_seconds=progress.eval_seconds,
        learning_rate=progress.last_lr, batch_size=progress.batch_size,
        train_loss=train_loss, val_loss=val_loss, val_error=val_error,
        extra=_sgd_noise_scale(config, progress, train_size))
    on_measurement(measurement)
    value = measurement.metric(config.target.metric)
    if math.isfinite(value) and (progress.best_metric is None or
                                 (value < progress.best_metric if config.target.mode == "min"
                                  else value > progress.best_metric)):
        progress.best_metric = value
    if config.target.is_beaten_by(value):
        return _result(progress, "reached", measurement)
    if _diverged(train_loss, val_loss, progress, config.divergence_factor):
        return _result(progress, "diverged", message=f"loss {train_loss:.4g} at step {progress.step}")
    epochs = progress.examples / train_size
    if progress.step >= config.max_steps or (config.max_epochs is not None and epochs >= config.max_epochs):
        return _result(progress, "not_reached")
    best = best_so_far() if prune else None
    if best is not None and progress.step >= best:
        return _result(progress, "pruned", message=f"cell best is {best} steps")
    return None


def _sgd_noise_scale(config: TrialConfig, progress: _Progress, train_size: int) -> dict:
    """Smith & Le's noise scale g = lr / (1 - m) (N / B - 1) for SGD-family optimizers,
    at the current learning rate and batch size."""
    if config.optimizer not in SGD_FAMILY:
        return {}
    momentum = float(config.hparams.get("momentum", 0.0)) if config.optimizer != "sgd" else 0.0
    return {"noise_scale": noise_scale(progress.last_lr, train_size, progress.batch_size, momentum)}


def _diverged(train_loss: float, val_loss: float, progress: _Progress, factor: float) -> bool:
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        return True
    if progress.first_train_loss is None:
        progress.first_train_loss = train_loss
        return False
    return train_loss > factor * progress.first_train_loss


def _result(progress: _Progress, outcome: str, reached_at: Measurement | None = None,
            message: str = "") -> TrialResult:
    return TrialResult(
        outcome=outcome, steps=progress.step, examples=progress.examples,
        wall_seconds=progress.train_seconds,
        steps_to_result=reached_at.step if reached_at else None,
        examples_to_result=reached_at.examples if reached_at else None,
        seconds_to_result=reached_at.wall_seconds if reached_at else None,
        best_metric=progress.best_metric, message=message)
