"""The training loop: stopping rules, exact example counting, schedules, determinism."""
import dataclasses
import math

import pytest
import torch
from torch import nn

import trainers.workloads as workloads_module
from trainers.config import Target, TrialConfig
from trainers.loop import DataCache, build_model, evaluate, run_trial
from trainers.workloads import DataOptions, get_workload

CACHE = DataCache()


def config(**overrides) -> TrialConfig:
    values = dict(workload="digits_mlp", batch_size=64, optimizer="momentum", schedule="constant",
                  hparams={"learning_rate": 0.05, "momentum": 0.9}, max_steps=200, eval_every=10,
                  target=Target("val_error", 0.0), seed=3, device="cpu")
    values.update(overrides)
    return TrialConfig(**values)


def run(cfg, **kwargs):
    measurements = []
    result = run_trial(cfg, data_cache=CACHE, on_measurement=measurements.append, **kwargs)
    return result, measurements


def metrics(measurements):
    return [(m.step, m.examples, m.learning_rate, m.train_loss, m.val_loss, m.val_error)
            for m in measurements]


def test_same_seed_same_measurements_and_other_seed_differs():
    _, first = run(config(max_steps=60))
    _, second = run(config(max_steps=60))
    _, other = run(config(max_steps=60, seed=4))
    assert metrics(first) == metrics(second)
    assert metrics(first) != metrics(other)


def _digits_dropout(options) -> nn.Module:
    """digits MLP 64-128-10 with dropout 0.5 after the hidden layer (as C1's dense layers)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))


def test_dropout_masks_follow_the_trial_seed_not_the_global_rng(monkeypatch):
    """Dropout draws from the global RNG: run_trial seeds it from the trial seed (inside a
    fork), so whatever the process drew before, one seed gives one set of measurements,
    and the caller's global RNG is left where it was."""
    workload = dataclasses.replace(get_workload("digits_mlp"), name="digits_dropout",
                                   build_model=_digits_dropout)
    monkeypatch.setattr(workloads_module, "WORKLOADS", {**workloads_module.WORKLOADS, "digits_dropout": workload})
    cfg = config(workload="digits_dropout", max_steps=40, hparams={"learning_rate": 0.1, "momentum": 0.9})
    runs = []
    for draws in (1, 5):
        torch.rand(draws)  # what else the worker did before this trial
        state = torch.get_rng_state()
        runs.append(run(cfg)[1])
        assert torch.equal(torch.get_rng_state(), state)
    assert metrics(runs[0]) == metrics(runs[1])
    # The masks are drawn: without dropout (same weights, same batches) the losses differ.
    without = lambda options: nn.Sequential(*(m for m in _digits_dropout(options) if not isinstance(m, nn.Dropout)))
    monkeypatch.setitem(workloads_module.WORKLOADS, "digits_dropout",
                        dataclasses.replace(workload, build_model=without))
    assert [m.train_loss for m in run(cfg)[1]] != [m.train_loss for m in runs[0]]


def _build_recording_draws(monkeypatch, workload, seed, device):
    """build_model's parameters, and the device of every uniform_ draw it made."""
    draws, uniform = [], torch.Tensor.uniform_
    monkeypatch.setattr(torch.Tensor, "uniform_",
                        lambda self, *a, **k: draws.append(self.device.type) or uniform(self, *a, **k))
    model = build_model(workload, config(seed=seed), device)
    monkeypatch.undo()
    return [p.detach() for p in model.parameters()], draws


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_build_model_draws_on_its_device_from_the_seed_alone(monkeypatch, device):
    """On CUDA the weights are drawn on the GPU (no CPU draws to wait for); on either
    device a seed fixes them, and the global RNG states are left as they were."""
    workload, device = get_workload("mnist_simple_cnn"), torch.device(device)
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if device.type == "cuda" else [])
    first, draws = _build_recording_draws(monkeypatch, workload, 1, device)
    assert draws and set(draws) == {device.type}
    assert all(p.device.type == device.type for p in first)
    again, _ = _build_recording_draws(monkeypatch, workload, 1, device)
    other, _ = _build_recording_draws(monkeypatch, workload, 2, device)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    after = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if device.type == "cuda" else [])
    assert all(torch.equal(a, b) for a, b in zip(states, after))


def test_budget_spent_evaluates_at_multiples_and_at_the_last_step():
    result, ms = run(config(max_steps=35))
    assert result.outcome == "not_reached" and result.steps == 35
    assert [m.step for m in ms] == [10, 20, 30, 35]
    assert result.steps_to_result is None


def test_reached_stops_at_first_evaluation_strictly_below_target():
    _, ms = run(config(max_steps=200))
    threshold = sorted(m.val_error for m in ms)[len(ms) // 2]  # reachable, not at once
    first = next(m for m in ms if m.val_error < threshold)
    result, again = run(config(max_steps=200, target=Target("val_error", threshold)))
    assert result.outcome == "reached"
    assert result.steps_to_result == first.step == again[-1].step
    assert result.examples_to_result == first.examples


def test_epochs_hold_exactly_n_examples_with_a_remainder_batch():
    n = get_workload("digits_mlp").load_data(DataOptions()).train_size  # 1,197
    _, ms = run(config(batch_size=500, max_steps=6, eval_every=1))
    assert [m.examples for m in ms] == [500, 1000, n, n + 500, n + 1000, 2 * n]
    assert ms[2].epoch == 1.0 and ms[5].epoch == 2.0


def test_divergence_is_detected():
    result, _ = run(config(optimizer="sgd", hparams={"learning_rate": 1e4}, max_steps=100))
    assert result.outcome == "diverged"


def test_pruned_once_it_cannot_beat_the_cell_best():
    result, ms = run(config(max_steps=200), best_so_far=lambda: 40)
    assert result.outcome == "pruned" and result.steps == 40 and ms[-1].step == 40
    result, _ = run(config(max_steps=60), best_so_far=lambda: 40, prune=False)
    assert result.outcome == "not_reached" and result.steps == 60


def test_linear_decay_learning_rates():
    cfg = config(schedule="linear_decay", max_steps=40, eval_every=10,
                 hparams={"learning_rate": 0.1, "momentum": 0.9, "end_factor": 0.01, "decay_steps": 20})
    _, ms = run(cfg)
    # The rate recorded at step s is the one used for update s - 1 (updates count from 0).
    expected = [0.1 * (1 - 0.99 * min(s - 1, 20) / 20) for s in (10, 20, 30, 40)]
    assert [m.learning_rate for m in ms] == pytest.approx(expected)


def test_evaluate_matches_a_direct_computation():
    workload = get_workload("digits_mlp")
    splits = workload.load_data(DataOptions())
    torch.manual_seed(0)
    model = workload.build_model(None)
    loss, error = evaluate(model, workload, splits.val_x, splits.val_y, batch_size=7)
    logits = model(workload.preprocess(splits.val_x))
    expected_loss = torch.nn.functional.cross_entropy(logits, splits.val_y).item()
    expected_error = (logits.argmax(1) != splits.val_y).float().mean().item()
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert error == pytest.approx(expected_error)
    assert math.isfinite(loss)


def test_batch_plan_changes_batch_at_epoch_boundaries_and_counts_exactly():
    """N = 1,197; B = 100, 200, 400 over three epochs: 12 + 6 + 3 updates, N examples each."""
    n = get_workload("digits_mlp").load_data(DataOptions()).train_size
    plan = {"mode": "increase_batch", "factor": 2.0, "milestones": (1, 2)}
    result, ms = run(config(batch_size=100, batch_plan=plan, max_steps=10_000, max_epochs=3,
                            eval_every=1, hparams={"learning_rate": 0.05, "momentum": 0.9}))
    assert result.outcome == "not_reached" and result.steps == 21 and result.examples == 3 * n
    assert [m.batch_size for m in ms] == [100] * 12 + [200] * 6 + [400] * 3
    assert ms[11].examples == n and ms[17].examples == 2 * n
    assert {m.learning_rate for m in ms} == {0.05}  # increasing B keeps the learning rate


def test_decay_lr_plan_keeps_noise_scale_equal_to_increase_batch():
    """lr / B per epoch is the same whether the batch grows or the rate decays."""
    common = dict(batch_size=100, max_steps=10_000, max_epochs=3, eval_every=1,
                  hparams={"learning_rate": 0.08, "momentum": 0.9})
    ratios = []
    for mode in ("decay_lr", "increase_batch"):
        plan = {"mode": mode, "factor": 2.0, "milestones": (1, 2)}
        _, ms = run(config(batch_plan=plan, **common))
        by_epoch = {}
        for m in ms:
            by_epoch.setdefault(math.ceil(m.epoch) - 1, m.learning_rate / m.batch_size)
        ratios.append(by_epoch)
    assert ratios[0] == pytest.approx(ratios[1])
    assert ratios[0][2] == pytest.approx(0.08 / 100 / 4)


def test_noise_scale_recorded_with_every_measurement():
    """g = lr / (1 - m) * (N / B - 1), at the rate and batch size in force."""
    n = get_workload("digits_mlp").load_data(DataOptions()).train_size
    _, ms = run(config(max_steps=20, hparams={"learning_rate": 0.05, "momentum": 0.9}))
    assert [m.extra["noise_scale"] for m in ms] == pytest.approx([0.05 / 0.1 * (n / 64 - 1)] * 2)
    _, adam = run(config(optimizer="adam", max_steps=10, hparams={"learning_rate": 1e-3}))
    assert "noise_scale" not in adam[0].extra


def test_noise_scale_uses_the_momentum_the_optimizer_trains_with():
    """lars' momentum defaults to 0.9 in the registry: a trial that leaves it out trains
    with 0.9 and records g with 0.9; plain sgd has no momentum even if hparams name one."""
    n = get_workload("digits_mlp").load_data(DataOptions()).train_size
    _, lars = run(config(optimizer="lars", max_steps=10, hparams={"learning_rate": 0.5}))
    assert lars[0].extra["noise_scale"] == pytest.approx(0.5 / (1 - 0.9) * (n / 64 - 1))
    _, lars = run(config(optimizer="lars", max_steps=10, hparams={"learning_rate": 0.5, "momentum": 0.5}))
    assert lars[0].extra["noise_scale"] == pytest.approx(0.5 / (1 - 0.5) * (n / 64 - 1))
    _, sgd = run(config(optimizer="sgd", max_steps=10, hparams={"learning_rate": 0.5, "momentum": 0.9}))
    assert sgd[0].extra["noise_scale"] == pytest.approx(0.5 * (n / 64 - 1))
