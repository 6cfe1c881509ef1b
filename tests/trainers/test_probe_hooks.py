"""Probes during training (trainers/probe_hooks.py) and final-weight checkpoints:
probes never change the trajectory, distances and norms match hand computations on
saved weights, and the noise-scale probe converges to tr(Sigma)/|G|^2 on a model whose
per-example gradients are known."""
import json

import pytest
import torch
from torch import nn

from trainers.config import Target, TrialConfig
from trainers.loop import DataCache, build_model, run_trial
from trainers.probe_hooks import PROBES, TrialProbes, make_probes
from trainers.probes.checkpoints import load_checkpoint
from trainers.workloads import get_workload

CACHE = DataCache()


def config(**overrides) -> TrialConfig:
    values = dict(workload="digits_mlp", batch_size=32, optimizer="sgd", schedule="constant",
                  hparams={"learning_rate": 0.1}, max_steps=40, eval_every=10,
                  target=Target("val_error", 0.0), seed=5, device="cpu")
    values.update(overrides)
    return TrialConfig(**values)


def run(cfg):
    measurements = []
    result = run_trial(cfg, data_cache=CACHE, on_measurement=measurements.append)
    return result, measurements


def trajectory(measurements):
    return [(m.step, m.examples, m.learning_rate, m.train_loss, m.val_loss, m.val_error)
            for m in measurements]


def test_no_probes_builds_nothing():
    assert make_probes(config(), nn.Linear(2, 2)) is None


def test_probes_do_not_change_the_training_trajectory():
    """Same losses with and without every probe; the probes only add extra keys."""
    cfg = config(optimizer="momentum", hparams={"learning_rate": 0.05, "momentum": 0.9},
                 max_steps=60, noise_scale_batches=2)
    _, plain = run(cfg)
    _, probed = run(TrialConfig(**{**cfg.__dict__, "probes": PROBES}))
    assert trajectory(plain) == trajectory(probed)
    for without, with_probes in zip(plain, probed):
        assert set(without.extra) == {"noise_scale"}
        assert {k: with_probes.extra[k] for k in without.extra} == dict(without.extra)
    last = probed[-1].extra
    for key in ("distance_from_init", "distance_per_layer", "grad_norm", "update_norm", "param_norm",
                "gns_b_simple", "gns_grad_sq_norm", "gns_trace_sigma"):
        assert key in last, key
    json.dumps(dict(last), allow_nan=False)  # storable in a PostgreSQL JSON column


def _flat(state):
    return torch.cat([t.double().reshape(-1) for t in state.values()])


def test_distance_and_norms_match_saved_weights(tmp_path):
    """distance at the first evaluation = ||w_5 - w_0||; update_norm = ||w_5 - w_4||;
    with plain SGD (no clipping) grad_norm = update_norm / lr."""
    workload = get_workload("digits_mlp")
    lr = 0.1
    saved = {}
    for steps in (4, 5):
        path = tmp_path / f"w{steps}.pt"
        result, ms = run(config(max_steps=steps, eval_every=5, probes=("distance", "norms"),
                                checkpoint_path=str(path), checkpoint_reached_only=False))
        assert result.checkpoint_path == str(path)
        saved[steps] = (load_checkpoint(path), ms)
    initial = build_model(workload, config(), torch.device("cpu")).state_dict()
    w4, (w5, ms) = saved[4][0], saved[5]
    extra = ms[0].extra
    assert ms[0].step == 5
    assert extra["distance_from_init"] == pytest.approx(float((_flat(w5) - _flat(initial)).norm()), rel=1e-6)
    for name, value in extra["distance_per_layer"].items():
        assert value == pytest.approx(float((w5[name].double() - initial[name].double()).norm()), rel=1e-6)
    update = float((_flat(w5) - _flat(w4)).norm())
    assert extra["update_norm"] == pytest.approx(update, rel=1e-5)
    assert extra["grad_norm"] * lr == pytest.approx(update, rel=1e-5)
    assert extra["param_norm"] == pytest.approx(float(_flat(w5).norm()), rel=1e-6)


class _LinearScore(nn.Module):
    """loss_i = -x_i . w: every example's gradient is -x_i whatever w is, so the
    gradient mean G = -mu and covariance Sigma = diag(sigma^2) are known exactly."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return -(x @ self.w)


def test_noise_scale_converges_to_trace_sigma_over_g_squared():
    torch.manual_seed(0)
    dim, batch = 20, 8
    mu = torch.full((dim,), 0.25)
    sigma = torch.linspace(0.5, 1.5, dim)
    expected = float((sigma ** 2).sum() / (mu ** 2).sum())  # B_simple = 11.65 / 1.25 = 9.32...
    model = _LinearScore(dim)
    probes = TrialProbes(model, ("noise_scale",), noise_scale_batches=10, noise_scale_beta=0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(6000):
        x = mu + sigma * torch.randn(batch, dim)
        optimizer.zero_grad()
        model(x).mean().backward()
        probes.after_backward(model, batch)
        optimizer.step()  # w moves; the per-example gradients do not depend on it
    extra = probes.extras(model)
    assert extra["gns_b_simple"] == pytest.approx(expected, rel=0.15)
    assert extra["gns_grad_sq_norm"] == pytest.approx(float((mu ** 2).sum()), rel=0.15)
    assert extra["gns_trace_sigma"] == pytest.approx(float((sigma ** 2).sum()), rel=0.15)
    assert probes.tracker.updates == 600  # one estimate per 10 steps


def test_remainder_batches_restart_the_big_batch():
    """Only n equal batches form B_big: a batch of another size starts over."""
    model = _LinearScore(3)
    probes = TrialProbes(model, ("noise_scale",), noise_scale_batches=3)
    for size in (4, 4, 2, 4, 4, 4):
        model.zero_grad()
        model(torch.randn(size, 3)).mean().backward()
        probes.after_backward(model, size)
    assert probes.tracker.updates == 1


def test_unknown_probe_is_refused():
    with pytest.raises(ValueError, match="unknown probe 'hessian'"):
        TrialProbes(nn.Linear(1, 1), ("hessian",))


def test_checkpoint_only_for_reached_trials_by_default(tmp_path):
    path = tmp_path / "not_reached.pt"
    result, _ = run(config(max_steps=5, eval_every=5, checkpoint_path=str(path)))
    assert result.outcome == "not_reached" and result.checkpoint_path is None and not path.exists()
    path = tmp_path / "reached.pt"
    result, _ = run(config(max_steps=200, target=Target("val_error", 0.5), checkpoint_path=str(path)))
    assert result.outcome == "reached" and result.checkpoint_path == str(path) and path.exists()


def test_checkpoint_over_budget_is_skipped_and_the_result_stands(tmp_path):
    path = tmp_path / "big.pt"
    result, _ = run(config(max_steps=5, eval_every=5, checkpoint_path=str(path),
                           checkpoint_reached_only=False, checkpoint_max_bytes=1000))
    assert result.outcome == "not_reached" and result.steps == 5
    assert result.checkpoint_path is None and not path.exists()
    assert "checkpoint not saved" in result.message and "budget" in result.message
