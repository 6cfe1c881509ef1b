"""Keskar (C_eps, A)-sharpness against quadratics whose box maximum is known exactly
(methods.md 3.2 and check 5)."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from trainers.probes.sharpness import (
    box_half_widths, flatten_parameters, keskar_sharpness, model_loss_closure, model_sharpness,
    random_subspace)

OFFSET = 0.25  # the constant c in f = 0.5 x^T H x + c


def _quadratic(hessian):
    def loss_and_grad(x):
        return 0.5 * x @ hessian @ x + OFFSET, hessian @ x
    return loss_and_grad


def _phi(max_loss, loss):
    return (max_loss - loss) / (1 + loss) * 100


def _vertex_maximum(hessian, x, half, subspace=None):
    """A convex function's maximum over a box lies at a vertex: enumerate them all."""
    basis = np.eye(x.size) if subspace is None else subspace
    f = _quadratic(hessian)
    return max(f(x + basis @ (np.array(signs) * half))[0]
               for signs in itertools.product((-1, 1), repeat=half.size))


def _psd(n, top, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q @ np.diag(np.linspace(top / 10, top, n)) @ q.T


def test_diagonal_quadratic_reaches_the_exact_box_maximum():
    h = np.array([5.0, 2.0, 1.0, 0.5, 0.1])
    x = np.array([0.3, -0.2, 0.1, -0.5, 0.05])
    eps = 1e-3
    result = keskar_sharpness(_quadratic(np.diag(h)), x, epsilon=eps)
    # Separable convex f: the maximum is at y_i = sign(x_i) eps (|x_i| + 1).
    exact = 0.5 * np.sum(h * (np.abs(x) + eps * (np.abs(x) + 1)) ** 2) + OFFSET
    assert result.loss == pytest.approx(0.5 * np.sum(h * x * x) + OFFSET, rel=1e-15)
    # L-BFGS-B lands on the vertex: equal to float64 rounding of phi's ~1e-1 value.
    assert result.sharpness == pytest.approx(_phi(exact, result.loss), rel=1e-9)
    assert result.subspace_dim is None


def test_full_space_matches_vertex_enumeration_for_a_dense_hessian():
    hessian = _psd(6, 4.0)
    x = np.random.default_rng(1).normal(size=6) * 0.3
    result = keskar_sharpness(_quadratic(hessian), x, epsilon=1e-3)
    exact = _vertex_maximum(hessian, x, box_half_widths(x, 1e-3))
    assert result.sharpness == pytest.approx(_phi(exact, result.loss), rel=1e-9)


def test_value_scales_with_curvature_and_orders_sharp_above_flat():
    x = np.random.default_rng(2).normal(size=6) * 0.3
    rises = []
    for top in (1.0, 10.0, 100.0):
        result = keskar_sharpness(_quadratic(_psd(6, top)), x, epsilon=1e-3)
        rises.append(result.max_loss - result.loss)
    # f - c is linear in H, so the rise max f - f(x) grows by exactly the same factor.
    assert rises[1] / rises[0] == pytest.approx(10.0, rel=1e-9)
    assert rises[2] / rises[0] == pytest.approx(100.0, rel=1e-9)
    flat = keskar_sharpness(_quadratic(_psd(6, 1.0)), x, epsilon=5e-4).sharpness
    sharp = keskar_sharpness(_quadratic(_psd(6, 100.0)), x, epsilon=5e-4).sharpness
    assert 0 < flat < sharp


def test_sharpness_is_zero_at_an_exact_minimum_and_never_negative():
    # At x = 0 the gradient vanishes, L-BFGS-B stays at y = 0: phi = 0, not negative.
    assert keskar_sharpness(_quadratic(_psd(4, 3.0)), np.zeros(4)).sharpness == 0.0
    concave = keskar_sharpness(_quadratic(-np.eye(4)), np.full(4, 0.1))
    assert concave.sharpness >= 0.0


def test_box_half_widths():
    x = np.array([0.5, -2.0, 0.0])
    np.testing.assert_allclose(box_half_widths(x, 1e-3), [1.5e-3, 3e-3, 1e-3], rtol=1e-15)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 2)))
    # Orthonormal columns: A^+ = A^T.
    np.testing.assert_allclose(box_half_widths(x, 1e-3, q), 1e-3 * (np.abs(q.T @ x) + 1),
                               rtol=1e-12)


def test_random_subspace_matches_vertex_enumeration():
    hessian = _psd(20, 5.0)
    x = np.random.default_rng(4).normal(size=20) * 0.3
    subspace = random_subspace(20, p=5, seed=0)
    assert subspace.shape == (20, 5)
    result = keskar_sharpness(_quadratic(hessian), x, epsilon=1e-3, subspace=subspace)
    exact = _vertex_maximum(hessian, x, box_half_widths(x, 1e-3, subspace), subspace)
    assert result.subspace_dim == 5
    assert result.sharpness == pytest.approx(_phi(exact, result.loss), rel=1e-9)


def _half_squared_error(output, target):
    per_example = 0.5 * ((output - target) ** 2).sum(-1)
    return per_example.sum(), target.shape[0], per_example


def _regression_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(60, 1, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    return model, [(x[:25], y[:25]), (x[25:], y[25:])], x, y


def test_model_closure_equals_the_direct_loss_and_gradient():
    model, batches, x, y = _regression_problem()
    closure = model_loss_closure(model, batches, _half_squared_error)
    flat = flatten_parameters(model)
    before = [p.detach().clone() for p in model.parameters()]
    loss, grad = closure(flat + 0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    direct = 0.5 * ((model(x) - y) ** 2).mean()
    direct_grad = torch.autograd.grad(direct, list(model.parameters()))
    # Same float64 quantities, summed in a different order.
    assert loss == pytest.approx(float(direct.detach()), rel=1e-12)
    np.testing.assert_allclose(grad, torch.cat([g.reshape(-1) for g in direct_grad]).numpy(),
                               rtol=1e-10)
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    closure(flat + 1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_model_sharpness_equals_the_explicit_quadratic():
    model, batches, x, y = _regression_problem()
    # Linear regression with MSE is exactly quadratic in w = (weight, bias):
    # f(w) = 0.5 mean (Dw - y)^2, D = [X 1].
    design = torch.cat([x, torch.ones(60, 1, dtype=torch.float64)], 1).numpy()
    target = y.numpy()[:, 0]

    def explicit(w):
        residual = design @ w - target
        return 0.5 * np.mean(residual ** 2), design.T @ residual / 60

    flat = flatten_parameters(model)
    for space in ("full", "random"):
        subspace = random_subspace(4, 2, seed=0) if space == "random" else None
        expected = keskar_sharpness(explicit, flat, epsilon=1e-3, subspace=subspace)
        got = model_sharpness(model, batches, _half_squared_error, epsilon=1e-3,
                              space=space, subspace_dim=2, seed=0)
        # Same function up to summation order (1e-15 relative), same optimiser path.
        assert got.sharpness == pytest.approx(expected.sharpness, rel=1e-6)
        assert got.sharpness > 0


def test_model_sharpness_on_an_mlp_is_small_and_positive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    inputs, labels = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def cross_entropy(logits, target):
        per_example = nn.functional.cross_entropy(logits, target, reduction="none")
        return per_example.sum(), target.numel(), per_example

    small = model_sharpness(model, [(inputs, labels)], cross_entropy, epsilon=5e-4)
    large = model_sharpness(model, [(inputs, labels)], cross_entropy, epsilon=1e-3)
    # A larger box contains the smaller one's points and L-BFGS-B climbs further.
    assert 0 < small.sharpness < large.sharpness
    assert large.evaluations <= 1 + 10 * 21  # maxiter 10, at most 20 line-search steps each
