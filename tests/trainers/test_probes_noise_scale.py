"""Gradient-noise-scale estimators against synthetic per-example gradients with a known
mean G and covariance Sigma (spec/methods.md section 5 and check 8)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainers.probes.noise_scale import (
    NoiseEstimate, NoiseScaleTracker, accumulate_gradient_norms, ddp_estimates,
    two_batch_estimates)

DIM, B_SMALL, N_BATCHES = 100, 8, 4
B_BIG = B_SMALL * N_BATCHES


def _gradient_model(seed: int = 0):
    """Known mean G and covariance Sigma = L L^T of the per-example gradients."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=DIM) * 0.5
    chol = rng.normal(size=(DIM, DIM)) * 0.1
    return mean, chol, float(mean @ mean), float(np.trace(chol @ chol.T))


def _draw(rng, mean, chol, *shape):
    """Per-example gradients g = G + L z, shape (*shape, DIM)."""
    return mean + rng.normal(size=(*shape, DIM)) @ chol.T


def _norm_pairs(rng, mean, chol, draws):
    """(mean over n small batches of |G_small|^2, |G_big|^2) for many independent draws.

    The mean of B Gaussian rows G + L z is exactly G + L z / sqrt(B): drawn directly.
    """
    small = mean + _draw(rng, 0 * mean, chol, draws, N_BATCHES) / math.sqrt(B_SMALL)
    big = small.mean(axis=1)                               # (draws, DIM)
    return (small ** 2).sum(-1).mean(-1), (big ** 2).sum(-1)


def test_estimators_solve_the_expectation_equations_exactly():
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B: plugging exact expectations returns the truth.
    g2, tr = 3.0, 40.0
    est = two_batch_estimates(g2 + tr / 16, g2 + tr / 256, 16, 256)
    assert est.grad_sq_norm == pytest.approx(g2, rel=1e-12)
    assert est.trace_sigma == pytest.approx(tr, rel=1e-12)


def test_estimators_are_unbiased_over_many_draws():
    mean, chol, g2, tr = _gradient_model()
    rng = np.random.default_rng(1)
    sq_small, sq_big = _norm_pairs(rng, mean, chol, 40000)
    g2_hat = (B_BIG * sq_big - B_SMALL * sq_small) / (B_BIG - B_SMALL)
    tr_hat = (sq_small - sq_big) / (1 / B_SMALL - 1 / B_BIG)
    for samples, truth in ((g2_hat, g2), (tr_hat, tr)):
        stderr = samples.std() / math.sqrt(samples.size)
        # The mean of 40,000 i.i.d. estimates is within 4 standard errors of the truth
        # unless the estimator is biased (p < 1e-4); the stderr itself is < 2% of the truth.
        assert abs(samples.mean() - truth) < 4 * stderr
        assert stderr < 0.02 * truth
    # The library formula is the same as the vectorised one above.
    est = two_batch_estimates(sq_small[0], sq_big[0], B_SMALL, B_BIG)
    assert est.grad_sq_norm == pytest.approx(g2_hat[0], rel=1e-12)
    assert est.trace_sigma == pytest.approx(tr_hat[0], rel=1e-12)


def test_tracker_ratio_converges_to_b_simple():
    mean, chol, g2, tr = _gradient_model()
    rng = np.random.default_rng(2)
    sq_small, sq_big = _norm_pairs(rng, mean, chol, 3000)
    tracker = NoiseScaleTracker()  # beta = 0.99: an EMA over ~100 estimates
    for s, b in zip(sq_small, sq_big):
        tracker.update(two_batch_estimates(s, b, B_SMALL, B_BIG))
    # An EMA with beta 0.99 has 1/199 of one estimate's variance; here the estimates'
    # relative stds are 8% and 12%, so the ratio's is ~1.1% (measured over 40 seeds)
    # and 5% is a 4-sigma bound.
    assert tracker.b_simple == pytest.approx(tr / g2, rel=0.05)
    assert tracker.updates == 3000


def test_tracker_bias_correction_and_skipping():
    tracker = NoiseScaleTracker(beta=0.9)
    assert math.isnan(tracker.b_simple)
    assert tracker.update(NoiseEstimate(2.0, 10.0))
    # One update, bias-corrected: the EMA equals the value, not (1 - beta) times it.
    assert tracker.grad_sq_norm == pytest.approx(2.0, rel=1e-12)
    assert tracker.b_simple == pytest.approx(5.0, rel=1e-12)
    assert not tracker.update(NoiseEstimate(float("nan"), 1.0))
    assert not tracker.update(NoiseEstimate(1.0, float("inf")))
    assert (tracker.updates, tracker.skipped) == (1, 2)
    assert tracker.b_simple == pytest.approx(5.0, rel=1e-12)
    tracker.update(NoiseEstimate(4.0, 10.0))
    # Two updates: (0.9*0.1*2 + 0.1*4) / (1 - 0.81) = 0.58 / 0.19.
    assert tracker.grad_sq_norm == pytest.approx(0.58 / 0.19, rel=1e-12)
    assert tracker.trace_sigma == pytest.approx(10.0, rel=1e-12)


class _LinearProbe(nn.Module):
    """Summed loss -w . g_i over a batch of rows g_i: its gradient in w is -sum g_i, so
    the per-example gradients are exactly the synthetic rows."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(DIM, dtype=torch.float64))

    def loss(self, batch):
        per_example = -(batch @ self.w)
        return per_example.sum(), batch.shape[0], per_example


def test_accumulate_gradient_norms_matches_numpy_and_converges():
    mean, chol, g2, tr = _gradient_model()
    rng = np.random.default_rng(3)
    model = _LinearProbe()
    tracker = NoiseScaleTracker()
    for step in range(1500):
        rows = _draw(rng, mean, chol, N_BATCHES, B_SMALL)
        sample = accumulate_gradient_norms(model, model.loss, list(torch.from_numpy(rows)))
        if step == 0:
            small = rows.mean(axis=1)
            # Same float64 arithmetic up to summation order.
            assert sample.sq_norm_small == pytest.approx((small ** 2).sum(-1).mean(), rel=1e-12)
            assert sample.sq_norm_big == pytest.approx((small.mean(0) ** 2).sum(), rel=1e-12)
            np.testing.assert_allclose(sample.big_grad[0].numpy(), -small.mean(0), rtol=1e-12)
            assert (sample.batch_small, sample.batch_big) == (B_SMALL, B_BIG)
            assert model.w.grad is None  # .grad is left for the training step
        tracker.update(sample.estimates())
    # As in the tracker test (fewer steps, same EMA horizon): a 4-sigma 5% bound.
    assert tracker.b_simple == pytest.approx(tr / g2, rel=0.05)


def test_accumulate_rejects_unequal_batches():
    model = _LinearProbe()
    batches = [torch.ones(4, DIM, dtype=torch.float64), torch.ones(3, DIM, dtype=torch.float64)]
    with pytest.raises(ValueError, match="equal sizes"):
        accumulate_gradient_norms(model, model.loss, batches)


def test_ddp_estimates_average_local_norms():
    mean, chol, g2, tr = _gradient_model()
    rng = np.random.default_rng(4)
    world, local = 4, 8
    per_example = _draw(rng, mean, chol, world, local)
    local_means = per_example.mean(axis=1)
    local_sq = (local_means ** 2).sum(-1)
    global_sq = float((local_means.mean(0) ** 2).sum())
    est = ddp_estimates(list(local_sq), global_sq, local, world)
    expected = two_batch_estimates(local_sq.mean(), global_sq, local, local * world)
    assert est == expected
    # An already all-reduced mean, passed as one value, gives the same answer.
    assert ddp_estimates([local_sq.mean()], global_sq, local, world) == expected
