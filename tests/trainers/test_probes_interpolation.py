"""1-D interpolation curves (Keskar et al. 2016 section 2.2.1; methods.md 3.3), and the
checkpoints that hold their endpoint weights."""
import numpy as np
import pytest
import torch
from torch import nn

from trainers.probes.checkpoints import CheckpointBudgetError, load_checkpoint, save_checkpoint
from trainers.probes.interpolation import (
    BATCH_NORM_MODES, interpolate_states, interpolation_curve, keskar_alphas,
    reestimate_batch_norm)

ALPHA0, ALPHA1 = 8, 16  # indices of alpha = 0 and alpha = 1 in linspace(-1, 2, 25)


def _cross_entropy(logits, labels):
    per_example = nn.functional.cross_entropy(logits, labels, reduction="none")
    return per_example.sum(), labels.numel(), per_example


def _half_squared_error(output, target):
    per_example = 0.5 * ((output - target) ** 2).sum(-1)
    return per_example.sum(), target.shape[0], per_example


def _classification_splits():
    gen = torch.Generator().manual_seed(0)
    make = lambda n: (torch.randn(n, 4, generator=gen, dtype=torch.float64),
                      torch.randint(0, 3, (n,), generator=gen))
    return {"train": make(40), "test": make(30)}


def _two_states(build):
    torch.manual_seed(0)
    small = build()
    torch.manual_seed(1)
    large = build()
    return small, small.state_dict(), large.state_dict()


def _bn_net():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                        nn.Linear(8, 3)).double()
    with torch.no_grad():  # distinct running buffers, so the BN options differ
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def _plain_net():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def test_alphas_contain_the_endpoints_exactly():
    alphas = keskar_alphas()
    assert alphas.shape == (25,) and (alphas[0], alphas[-1]) == (-1.0, 2.0)
    assert (alphas[ALPHA0], alphas[ALPHA1]) == (0.0, 1.0)


def test_interpolated_state_is_exact_at_the_endpoints():
    _, small, large = _two_states(_bn_net)
    for alpha, endpoint in ((0.0, small), (1.0, large)):
        state = interpolate_states(small, large, alpha)
        assert all(torch.equal(state[k], endpoint[k]) for k in small)
    mid = interpolate_states(small, large, 0.5)
    torch.testing.assert_close(mid["0.weight"], (small["0.weight"] + large["0.weight"]) / 2)


def _direct(model, state, x, y, batch_stats):
    """The endpoint evaluated by hand: dropout off, BN in train mode or eval mode."""
    model.load_state_dict(state)
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.train(batch_stats)
    with torch.no_grad():
        logits = model(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).double().mean().item()


@pytest.mark.parametrize("mode", ["batch_stats", "interpolate_running"])
def test_endpoints_reproduce_the_endpoint_models(mode):
    model, small, large = _two_states(_bn_net)
    splits = _classification_splits()
    curve = interpolation_curve(model, small, large, splits, _cross_entropy, batch_norm=mode)
    for name, (x, y) in splits.items():
        for index, state in ((ALPHA0, small), (ALPHA1, large)):
            loss, accuracy = _direct(_bn_net(), state, x, y, mode == "batch_stats")
            # The same float64 computation on the same weights: equal up to the
            # summed-then-divided vs mean reduction (a few ulp).
            assert curve.loss[name][index] == pytest.approx(loss, rel=1e-14)
            assert curve.accuracy[name][index] == accuracy


def test_model_without_batch_norm_is_the_same_under_every_option():
    model, small, large = _two_states(_plain_net)
    splits = _classification_splits()
    curves = [interpolation_curve(model, small, large, splits, _cross_entropy, batch_norm=mode)
              for mode in BATCH_NORM_MODES]
    for curve in curves[1:]:
        for name in splits:
            np.testing.assert_array_equal(curve.loss[name], curves[0].loss[name])
            np.testing.assert_array_equal(curve.accuracy[name], curves[0].accuracy[name])
    assert curves[0].loss["train"].shape == (25,)


def test_batch_norm_options_differ_and_leave_the_model_alone():
    model, small, large = _two_states(_bn_net)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    splits = _classification_splits()
    curves = {mode: interpolation_curve(model, small, large, splits, _cross_entropy,
                                        batch_norm=mode, reestimate_batches=[splits["train"]])
              for mode in BATCH_NORM_MODES}
    assert not np.allclose(curves["batch_stats"].loss["test"], curves["interpolate_running"].loss["test"])
    assert not np.allclose(curves["reestimate"].loss["test"], curves["interpolate_running"].loss["test"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training


def test_reestimate_sets_running_stats_to_the_training_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x = torch.randn(50, 4, dtype=torch.float64) * 3 + 1
    reestimate_batch_norm(model, [(x, None)])
    # One batch, cumulative average: exactly that batch's mean and unbiased variance.
    torch.testing.assert_close(model[0].running_mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].running_var, x.var(0), rtol=1e-12, atol=1e-12)
    assert model[0].momentum == 0.1 and not model.training


def test_reestimate_requires_training_batches_when_there_is_batch_norm():
    model, small, large = _two_states(_bn_net)
    with pytest.raises(ValueError, match="reestimate_batches"):
        interpolation_curve(model, small, large, _classification_splits(), _cross_entropy,
                            batch_norm="reestimate")
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        interpolation_curve(model, small, large, {}, _cross_entropy, batch_norm="running")


def test_linear_model_mse_curve_is_an_exact_quadratic():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 2, generator=gen, dtype=torch.float64)
    model, small, large = _two_states(lambda: nn.Linear(5, 2).double())
    curve = interpolation_curve(model, small, large, {"train": (x, y)}, _half_squared_error,
                                batch_size=20)
    alphas, loss = curve.alphas, curve.loss["train"]
    # The residual is linear in alpha, so the mean squared error is a quadratic:
    # a degree-2 fit leaves only float64 rounding (loss values are O(1)).
    coefficients = np.polyfit(alphas, loss, 2)
    np.testing.assert_allclose(np.polyval(coefficients, alphas), loss, rtol=0, atol=1e-12)
    assert coefficients[0] > 0
    assert np.all(np.isnan(curve.accuracy["train"]))  # regression targets: no accuracy


# Checkpoints (trainers/probes/checkpoints.py) hold the endpoint weights that
# interpolation reads back; their tests live here, next to that use.

def test_checkpoint_round_trip_feeds_interpolation(tmp_path):
    model, small, large = _two_states(_bn_net)
    info_small = save_checkpoint(small, tmp_path / "runs" / "small.pt")
    info_large = save_checkpoint(large, tmp_path / "runs" / "large.pt", max_bytes=1_000_000)
    assert info_small.path == tmp_path / "runs" / "small.pt"
    assert info_small.size_bytes == info_small.path.stat().st_size
    loaded_small, loaded_large = load_checkpoint(info_small.path), load_checkpoint(info_large.path)
    assert all(torch.equal(loaded_small[k], small[k]) for k in small)
    splits = _classification_splits()
    direct = interpolation_curve(model, small, large, splits, _cross_entropy)
    reloaded = interpolation_curve(model, loaded_small, loaded_large, splits, _cross_entropy)
    np.testing.assert_array_equal(direct.loss["test"], reloaded.loss["test"])
    target = _bn_net()
    load_checkpoint(info_large.path, model=target)
    assert torch.equal(target[0].weight, large["0.weight"])


def test_checkpoint_saves_only_the_viewed_elements(tmp_path):
    # A view into a 1M-element buffer must not drag the whole storage onto disk.
    big = torch.zeros(1_000_000)
    info = save_checkpoint({"w": big[:10]}, tmp_path / "view.pt", max_bytes=10_000)
    assert info.size_bytes < 10_000


def test_checkpoint_over_budget_raises_and_leaves_no_file(tmp_path):
    model = nn.Linear(100, 100)  # 10,100 float32 values: 40,400 raw bytes
    with pytest.raises(CheckpointBudgetError, match="over the budget"):
        save_checkpoint(model, tmp_path / "a.pt", max_bytes=40_000)
    # Raw bytes fit but torch.save's framing does not: caught after writing, then removed.
    with pytest.raises(CheckpointBudgetError, match="would take"):
        save_checkpoint(model, tmp_path / "b.pt", max_bytes=40_400)
    assert list(tmp_path.iterdir()) == []
