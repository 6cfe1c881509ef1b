"""Batch norm and ghost batch norm on the vmap path: per-trial running statistics,
updated every step as `run_trial`'s model updates them, frozen once a trial stops,
and evaluation in eval mode; measurements equal the sequential trainer's."""
import dataclasses
import os
import sys

import pytest
import torch
from torch import nn

import trainers.workloads as workloads_module
from trainers.config import Target, TrialConfig, TrialResult
from trainers.loop import DataCache, build_model, run_trial
from trainers.models.ghost_bn import batch_norm_1d, batch_norm_2d
from trainers.optim import get_optimizer
from trainers.vectorized import (_Clock, _make_context, _make_stack, _StepOptions, _train_step,
                                 evaluate_stacked, is_vectorizable, run_trials_vectorized)
from trainers.workloads import DataOptions, ModelOptions, Workload, get_workload

from tests.shared_data import MNIST_T10K

CPU = torch.device("cpu")
CACHE = DataCache()


def _bn_mlp(options: ModelOptions) -> nn.Module:
    """64 -> 2 x [Linear 32, BatchNorm1d, ReLU] -> 10: batch norm on the digits."""
    ghost = options.ghost_batch_size
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), batch_norm_1d(32, ghost), nn.ReLU(),
                         nn.Linear(32, 32), batch_norm_1d(32, ghost), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(autouse=True)
def digits_bn(monkeypatch):
    """A digits-sized batch-norm workload, registered for the duration of a test."""
    workload = dataclasses.replace(get_workload("digits_mlp"), name="digits_bn", build_model=_bn_mlp)
    monkeypatch.setattr(workloads_module, "WORKLOADS", {**workloads_module.WORKLOADS, "digits_bn": workload})
    return workload


def config(lr: float, seed: int, ghost: int | None = None, **overrides) -> TrialConfig:
    hparams = {"learning_rate": lr, "momentum": 0.9}
    if ghost:
        hparams["ghost_batch_size"] = ghost
    values = dict(workload="digits_bn", batch_size=64, optimizer="momentum", schedule="constant",
                  hparams=hparams, max_steps=60, eval_every=10, target=Target("val_error", 0.05),
                  seed=seed, device="cpu")
    values.update(overrides)
    return TrialConfig(**values)


def sequential(configs):
    runs = []
    for cfg in configs:
        measurements = []
        runs.append((run_trial(cfg, data_cache=CACHE, on_measurement=measurements.append), measurements))
    return runs


def vectorized(configs, **kwargs):
    measurements = [[] for _ in configs]
    results = run_trials_vectorized(configs, data_cache=CACHE, stacked=False,
                                    on_measurement=lambda i, m: measurements[i].append(m), **kwargs)
    return list(zip(results, measurements))


def assert_same_runs(expected, actual, rtol=1e-4, atol=1e-6, val_error_abs=0.0):
    """Outcomes, steps and schedules exactly; losses to `rtol`, validation error to
    `val_error_abs`."""
    for (want, want_ms), (got, got_ms) in zip(expected, actual, strict=True):
        assert (got.outcome, got.steps, got.examples, got.steps_to_result) == \
            (want.outcome, want.steps, want.examples, want.steps_to_result)
        assert [(m.step, m.examples, m.learning_rate) for m in got_ms] == \
            [(m.step, m.examples, m.learning_rate) for m in want_ms]
        for w, g in zip(want_ms, got_ms):
            assert g.val_error == pytest.approx(w.val_error, abs=val_error_abs)
            for name in ("train_loss", "val_loss"):
                a, b = getattr(g, name), getattr(w, name)
                assert (a != a and b != b) or a == pytest.approx(b, rel=rtol, abs=atol), (name, g.step)


def test_batch_norm_models_are_vectorized():
    assert is_vectorizable(config(0.1, 0)) and is_vectorizable(config(0.1, 0, ghost=16))
    assert is_vectorizable(dataclasses.replace(config(0.1, 0), workload="mnist10k_f1"))
    # Keskar's C1 has dropout (masks from run_trial's per-trial RNG streams): sequential.
    assert not is_vectorizable(dataclasses.replace(config(0.1, 0), workload="cifar10_c1"))


@pytest.fixture
def one_thread():
    """fp32 equivalence holds to rounding on one thread. With 16 (an H200 machine's Xeon)
    a parallel reduction sums in another order in one of the two trainers, and batch norm
    at momentum 0.9 amplifies that rounding to 1.1e-3 relative in 50 steps, 2 of 300
    validation images (0 images and 1.1e-7 on one thread there; float64 stays within
    2.6e-7 at any thread count: `test_vectorized_bn_equals_sequential_in_float64`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# One trial reaches the target early, one diverges, two run to the budget.
RUNS = ((0.1, 5), (1e9, 1), (0.01, 2), (0.003, 4))
OUTCOMES = [("reached", 20), ("diverged", 10), ("not_reached", 60), ("not_reached", 60)]


@pytest.mark.parametrize("ghost", [None, 16], ids=["bn", "ghost_bn"])
def test_vectorized_bn_equals_sequential(ghost, one_thread):
    configs = [config(lr, seed, ghost) for lr, seed in RUNS]
    expected = sequential(configs)
    assert [(r.outcome, r.steps) for r, _ in expected] == OUTCOMES
    assert_same_runs(expected, vectorized(configs, chunk_size=4))


class _Float64Workload(Workload):
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return super().preprocess(x).double()


@pytest.mark.parametrize("ghost", [None, 16], ids=["bn", "ghost_bn"])
def test_vectorized_bn_equals_sequential_in_float64(ghost, digits_bn, monkeypatch):
    """The same trials with float64 models and inputs, at whatever thread count the machine
    runs: the two trainers agree to the float32 rounding of the learning-rate and momentum
    tables and of the loss (which casts logits to float32), not to batch norm's amplified
    fp32 rounding. So the computation is the same, not merely close on one thread."""
    fields = {f.name: getattr(digits_bn, f.name) for f in dataclasses.fields(digits_bn)}
    workload = _Float64Workload(**{**fields, "build_model": lambda options: _bn_mlp(options).double()})
    monkeypatch.setattr(workloads_module, "WORKLOADS", {**workloads_module.WORKLOADS, "digits_bn": workload})
    monkeypatch.setattr(sys.modules[__name__], "CACHE", DataCache())
    configs = [config(lr, seed, ghost) for lr, seed in RUNS]
    assert next(build_model(workload, configs[0], CPU).parameters()).dtype == torch.float64
    expected = sequential(configs)
    assert [(r.outcome, r.steps) for r, _ in expected] == OUTCOMES
    assert_same_runs(expected, vectorized(configs, chunk_size=4), rtol=1e-6)


def test_a_last_ghost_batch_of_one_example_trains_alike_in_both_trainers(one_thread):
    """B = 64, G = 22: full batches are 22 + 22 + 20, and each epoch's last batch of
    1,197 - 18 x 64 = 45 examples would be 22 + 22 + 1, which batch norm cannot
    normalize: it is 22 + 23 (the single example joins the ghost batch before it) in the
    sequential model and under vmap alike, running statistics included."""
    configs = [config(lr, seed, ghost=22, max_steps=40, target=Target("val_error", 0.0))
               for lr, seed in ((0.05, 3), (0.01, 4))]
    expected = sequential(configs)
    assert [(r.outcome, r.steps) for r, _ in expected] == [("not_reached", 40)] * 2
    assert_same_runs(expected, vectorized(configs, chunk_size=2))


def test_one_trial_vectorized_equals_sequential(one_thread):
    for cfg in (config(0.05, 3), config(0.05, 3, ghost=16)):
        assert_same_runs(sequential([cfg]), vectorized([cfg], chunk_size=1))


@pytest.mark.parametrize("ghost", [None, 16], ids=["bn", "ghost_bn"])
def test_running_statistics_follow_the_sequential_model_and_freeze_when_stopped(ghost, one_thread):
    """The stacked buffers after each step equal those of K nn.Modules trained with
    torch.optim on the same batches (a batch of 45 = 2 ghost batches of 16 + one of 13
    included); a trial masked out after two steps keeps its buffers and parameters."""
    configs = [config(lr, seed, ghost) for lr, seed in ((0.1, 1), (0.05, 2), (0.02, 3))]
    workload = get_workload("digits_bn")
    splits = CACHE.get(workload, DataOptions(), CPU)
    models = [build_model(workload, c, CPU) for c in configs]
    references = [build_model(workload, c, CPU) for c in configs]
    optims = [get_optimizer("momentum").build(m.parameters(), c.hparams) for m, c in zip(references, configs)]
    context = _make_context(workload, CPU, splits, models[0], "momentum", _StepOptions(False, None))
    stack = _make_stack(configs, [0, 1, 2], models, CPU, splits.train_size)
    assert set(stack.buffers) == {f"{layer}.{name}" for layer in (2, 5)
                                  for name in ("running_mean", "running_var", "num_batches_tracked")}
    stack.orders = torch.stack([torch.randperm(splits.train_size, generator=g) for g in stack.generators])
    clock = _Clock()
    starts = (0, 64, 1152, 128, 192)  # 1152: the epoch's last batch, 45 examples
    for step, start in enumerate(starts):
        if step == 2:  # trial 1 decided, as _evaluate_and_decide leaves it: result and mask
            stack.trials[1].result = TrialResult("pruned", steps=2, examples=128, wall_seconds=0.0)
            stack.active = torch.tensor([True, False, True])
        _train_step(context, stack, clock, start, 64)
        clock.step += 1
        for k, (model, optim) in enumerate(zip(references, optims)):
            if step >= 2 and k == 1:
                continue
            index = stack.orders[k, start:start + 64]
            loss_sum, count, _ = workload.loss(model(workload.preprocess(splits.train_x[index])),
                                               splits.train_y[index])
            optim.zero_grad()
            (loss_sum / count).backward()
            optim.step()
        for k, model in enumerate(references):
            for name, buffer in model.named_buffers():
                torch.testing.assert_close(stack.buffers[name][k], buffer, rtol=1e-5, atol=1e-6)
            for name, param in model.named_parameters():
                torch.testing.assert_close(stack.params[name][k], param.detach(), rtol=1e-5, atol=1e-6)
    ghost_batches = {None: [1] * 5, 16: [4, 4, 3, 4, 4]}[ghost]
    tracked = stack.buffers["2.num_batches_tracked"]
    assert tracked.tolist() == [sum(ghost_batches), sum(ghost_batches[:2]), sum(ghost_batches)]
    # Evaluation uses each trial's running statistics (eval mode), as run_trial does.
    from trainers.loop import evaluate
    losses, errors = evaluate_stacked(context.skeleton, workload, stack.params, stack.buffers,
                                      splits.val_x, splits.val_y, 128)
    for k, model in enumerate(references):
        loss, error = evaluate(model, workload, splits.val_x, splits.val_y, 128)
        assert losses[k] == pytest.approx(loss, rel=1e-5) and errors[k] == error
        assert model.training  # evaluate restored training mode


@pytest.mark.slow
@pytest.mark.skipif(not MNIST_T10K.is_dir(), reason="needs the shared MNIST test files")
def test_keskar_f1_ghost_bn_equals_sequential(one_thread):
    """Keskar's F1 (5 x [Linear 512, BN, ReLU]) on the MNIST-10k files, ghost batch norm:
    one trial reaches the target, one diverges, one runs out of steps.

    F1 amplifies rounding: at lr 0.1 a ReLU input within 1e-6 of zero takes the other side
    and the two trainers drift ~1e-3 apart within 15 steps, as run_trial does against
    itself on one thread vs two (the vmap gradient is the one matching float64 there). So
    this uses learning rates where both trainers agree to ~2.5e-5 on one and on two threads,
    and a target 30 validation examples from every evaluation's error."""
    configs = [config(lr, seed, 32, workload="mnist10k_f1", batch_size=128, data_dir=str(MNIST_T10K),
                      max_steps=15, eval_every=5, target=Target("val_error", 0.13), eval_batch_size=1000)
               for lr, seed in ((0.01, 3), (1e9, 2), (0.02, 4))]
    expected = sequential(configs)
    assert [(r.outcome, r.steps) for r, _ in expected] == [("not_reached", 15), ("diverged", 5),
                                                          ("reached", 15)]
    assert_same_runs(expected, vectorized(configs), rtol=1e-3, val_error_abs=2 / 2000)


@pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("BATCHLAB_COMPILE_TESTS"),
                    reason="compiling on CPU takes ~1 min; set BATCHLAB_COMPILE_TESTS=1 to run it")
@pytest.mark.parametrize("ghost", [None, 16], ids=["bn", "ghost_bn"])
def test_compiled_bn_step_equals_eager(ghost):
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled path users run
    configs = [config(lr, seed, ghost, max_steps=30, device=device) for lr, seed in ((0.1, 5), (0.01, 2))]
    assert_same_runs(vectorized(configs, compile=False, precision="fp32"),
                     vectorized(configs, compile=True, precision="fp32"))


@pytest.mark.parametrize("batch_size, ghost, reason", [
    (64, 1, "ghost_batch_size 1 normalizes each example on its own"),
    (1, None, "batch size 1"),
    # 1,197 = 23 x 52 + 1: every epoch ends on a batch of one example.
    (52, None, "each epoch's last batch holds 1 of 1,197 training examples at batch size 52"),
    (52, 16, "each epoch's last batch holds 1 of 1,197"),
], ids=["ghost_1", "batch_1", "last_batch_1", "last_batch_1_ghost"])
def test_batch_norm_on_a_single_example_is_refused_before_training(batch_size, ghost, reason):
    """A BatchNorm1d layer (one value per channel per example) cannot normalize one
    example. Both trainers refuse such a config before it trains, with the same message
    naming the layer and the cause (not torch's "Expected more than 1 value per channel"
    at the first such step, possibly an epoch in), and the vectorized trainer fails that
    trial alone: a good config in the same call trains as run_trial trains it."""
    bad = config(0.05, 1, ghost, batch_size=batch_size, max_steps=30)
    measurements = []
    with pytest.raises(ValueError, match="sees one value per channel per example") as raised:
        run_trial(bad, data_cache=CACHE, on_measurement=measurements.append)
    assert reason in str(raised.value) and "'2' (" in str(raised.value) and measurements == []
    good = config(0.05, 2, 16, batch_size=batch_size if batch_size > 1 else 64, max_steps=30)
    if batch_size == 52:  # the good one must not end its epochs on one example either
        good = dataclasses.replace(good, batch_size=64)
    got = vectorized([bad, good])
    assert (got[0][0].outcome, got[0][0].steps, got[0][0].message, got[0][1]) == \
        ("failed", 0, str(raised.value), [])
    assert_same_runs(sequential([good]), got[1:])


def test_ghost_batch_size_1_is_per_example_normalization_on_convolutional_batch_norm():
    """On BatchNorm2d one example still has H x W values per channel: ghost_batch_size 1
    is allowed there (instance-style statistics) and trains in both trainers alike."""
    def cnn(options):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), batch_norm_2d(4, options.ghost_batch_size),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    workload = dataclasses.replace(get_workload("digits_mlp"), name="digits_gcnn", build_model=cnn)
    registry = {**workloads_module.WORKLOADS, "digits_gcnn": workload}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(workloads_module, "WORKLOADS", registry)
        configs = [config(lr, seed, 1, workload="digits_gcnn", batch_size=8, max_steps=10, eval_every=5)
                   for lr, seed in ((0.05, 1), (0.02, 2))]
        expected = sequential(configs)
        assert [(r.outcome, r.steps) for r, _ in expected] == [("not_reached", 10)] * 2
        assert_same_runs(expected, vectorized(configs, chunk_size=2))


def test_a_negative_ghost_batch_size_fails_that_trial_alone():
    bad, good = config(0.05, 1, -4, max_steps=10), config(0.05, 2, 16, max_steps=10)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive integer"):
        run_trial(bad, data_cache=CACHE)
    got = vectorized([bad, good])
    assert got[0][0].outcome == "failed" and "got -4" in got[0][0].message
    assert_same_runs(sequential([good]), got[1:])
