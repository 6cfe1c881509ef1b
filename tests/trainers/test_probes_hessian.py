"""Hessian probes against Hessians known in closed form (methods.md 3.5 and check 6)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainers.probes.hessian import HessianOperator, hutchinson_trace, top_eigenvalue

DIM = 8
EIGENVALUES = np.array([10.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1])


class _Quadratic(nn.Module):
    """Loss 0.5 x^T H x (+ nothing from the inputs): Hessian exactly H."""

    def __init__(self, hessian: np.ndarray):
        super().__init__()
        self.register_buffer("hessian", torch.from_numpy(hessian))
        self.x = nn.Parameter(torch.ones(hessian.shape[0], dtype=torch.float64))

    def forward(self, inputs):
        return (0.5 * self.x @ self.hessian @ self.x).reshape(1)


def _scalar_loss(output, labels):
    return output.sum(), 1, output


def _psd(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    return q @ np.diag(EIGENVALUES) @ q.T, q[:, 0]


def _quadratic_operator(hessian):
    return HessianOperator(_Quadratic(hessian), [(torch.zeros(1), torch.zeros(1))], _scalar_loss)


def test_hvp_is_the_matrix_product():
    hessian, _ = _psd()
    op = _quadratic_operator(hessian)
    v = torch.from_numpy(np.random.default_rng(1).normal(size=DIM))
    np.testing.assert_allclose(op([v])[0].numpy(), hessian @ v.numpy(), rtol=1e-12, atol=1e-12)


def test_power_iteration_finds_top_eigenvalue_within_tol():
    hessian, top_vector = _psd()
    result = top_eigenvalue(_quadratic_operator(hessian), tol=1e-3)
    assert result.converged
    # Gap 6/10: once successive estimates differ by < tol (relative), the remaining error
    # is below tol * 0.36 / 0.64 < tol.
    assert abs(result.eigenvalue - 10.0) / 10.0 < 1e-3
    cosine = abs(float(result.eigenvector[0] @ torch.from_numpy(top_vector)))
    assert cosine > 0.99
    tight = top_eigenvalue(_quadratic_operator(hessian), tol=1e-10, max_iter=500)
    assert tight.eigenvalue == pytest.approx(10.0, rel=1e-9)


def test_power_iteration_reports_non_convergence():
    hessian, _ = _psd()
    result = top_eigenvalue(_quadratic_operator(hessian), tol=1e-12, max_iter=3)
    assert not result.converged and result.iterations == 3


def test_hutchinson_mean_converges_to_trace():
    hessian, _ = _psd()
    result = hutchinson_trace(_quadratic_operator(hessian), tol=0.0, max_iter=2000)
    assert len(result.samples) == 2000
    # For Rademacher v, Var(v^T H v) = 2 sum_{i != j} H_ij^2 exactly; 4 standard errors.
    variance = 2 * (np.sum(hessian ** 2) - np.sum(np.diag(hessian) ** 2))
    assert np.var(result.samples) == pytest.approx(variance, rel=0.15)
    assert abs(result.mean - EIGENVALUES.sum()) < 4 * math.sqrt(variance / 2000)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # v_i^2 = 1, so v^T D v = tr(D) for every Rademacher draw.
    result = hutchinson_trace(_quadratic_operator(np.diag(EIGENVALUES)), max_iter=5, tol=0.0)
    np.testing.assert_allclose(result.samples, EIGENVALUES.sum(), rtol=1e-12)


def test_hutchinson_stops_early_with_pyhessian_tol():
    result = hutchinson_trace(_quadratic_operator(np.diag(EIGENVALUES)), tol=1e-3)
    assert len(result.samples) == 2  # the second sample leaves the running mean unchanged


def _regression(seed=0, n=100, d=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.array([0.5, 0.7, 0.9, 1.1, 3.0])
    y = rng.normal(size=(n, 1))
    return torch.from_numpy(x), torch.from_numpy(y)


def _half_squared_error(output, target):
    per_example = 0.5 * ((output - target) ** 2).sum(-1)
    return per_example.sum(), target.shape[0], per_example


@pytest.mark.parametrize("sizes", [(100,), (30, 50, 20)])
def test_linear_regression_hessian_matches_numpy(sizes):
    x, y = _regression()
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    bounds = np.cumsum((0,) + sizes)
    batches = [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    op = HessianOperator(model, batches, _half_squared_error)
    # Parameters (weight, bias): H = [X 1]^T [X 1] / n, whatever the batch split.
    design = np.hstack([x.numpy(), np.ones((100, 1))])
    exact = design.T @ design / 100
    v = np.random.default_rng(1).normal(size=6)
    hv = op([torch.from_numpy(v[:5]).reshape(1, 5), torch.from_numpy(v[5:])])
    np.testing.assert_allclose(torch.cat([t.reshape(-1) for t in hv]).numpy(), exact @ v,
                               rtol=1e-10, atol=1e-12)
    top = np.linalg.eigvalsh(exact)[-1]
    result = top_eigenvalue(op, tol=1e-3)
    # Relative error below tol, as for the PSD matrix: the eigenvalue ratio r is < 0.5,
    # so the remaining error, change * r^2 / (1 - r^2), is below tol.
    assert np.linalg.eigvalsh(exact)[-2] / top < 0.5
    assert abs(result.eigenvalue - top) / top < 1e-3
    assert hutchinson_trace(op, tol=1e-3).mean > 0


def test_probes_use_eval_mode_and_restore_training_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1)).double()
    model.train()
    model[1].running_mean.fill_(0.3)  # eval-mode BN uses these
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    running = model[1].running_mean.clone()
    op = HessianOperator(model, [(x, y)], _half_squared_error)
    v = [torch.ones_like(p) for p in op.params]
    # Eval mode: no dropout noise, so repeated products agree exactly; no stat updates.
    assert all(torch.equal(a, b) for a, b in zip(op(v), op(v)))
    assert torch.equal(model[1].running_mean, running)
    assert all(m.training for m in model.modules())


class _PartlyLinear(nn.Module):
    """Loss 0.5 a^2 + 3 b, plus a parameter the loss never uses: H = diag(1, 0, 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.unused = nn.Parameter(torch.tensor(5.0, dtype=torch.float64))

    def forward(self, inputs):
        return (0.5 * self.a ** 2 + 3 * self.b).reshape(1)


def test_linear_and_unused_parameters_have_zero_hessian_rows():
    op = HessianOperator(_PartlyLinear(), [(torch.zeros(1), torch.zeros(1))], _scalar_loss)
    hv = op([torch.tensor(2.0, dtype=torch.float64)] * 3)
    assert [float(t) for t in hv] == [2.0, 0.0, 0.0]
    assert top_eigenvalue(op).eigenvalue == pytest.approx(1.0, rel=1e-3)
