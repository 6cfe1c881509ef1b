"""The noisy quadratic model (NQM) of Zhang et al. (NeurIPS 2019), in closed form.

Loss L(theta) = 1/2 theta^T H theta with H diagonal, eigenvalues h_i = 1/i (i = 1..d,
d = 10^4), so the condition number is d. A stochastic gradient is H theta + noise with
per-dimension variance h_i / B (gradient covariance = H, batch size B). theta_0 ~ N(0, I).
Every update is linear, so only the second moments s_i = E[theta_i^2] matter and the
expected loss is 1/2 sum_i h_i s_i. A preconditioner H^-p (0 <= p <= 1) scales the step
of dimension i by h_i^-p. Formulas: spec/methods.md section 4; the steps-to-target binary
search follows the authors' notebook (gd-zhang/noisy-quadratic-model, nqm.ipynb).

Per dimension, with x = lr * h_i^(1-p) and noise n = (lr * h_i^-p)^2 * h_i / B:
- SGD: s_{k+1} = (1 - x)^2 s_k + n, closed form s_k = s* + beta^k (s_0 - s*),
  beta = (1 - x)^2, s* = n / (1 - beta). The notebook adds 1e-8 to 1 - beta to avoid a
  division by zero; here the geometric sum is exact (k where beta == 1), so the closed form
  equals the recursion to rounding.
- heavy-ball momentum and EMA of iterates: a 3x3 linear recursion q_{k+1} = T q_k + n 1,
  solved by eigendecomposition T = V diag(lambda) V^-1 as in the notebook. Where V is
  numerically singular (a defective T: critical damping, or an EMA decay equal to 1 - x)
  the same affine recursion is raised to the k-th power by repeated squaring instead.

Only numpy and scipy: this workload needs no torch.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

DIMENSIONS = 10_000
N_BINS = 100
SGD_UPPER_STEPS = 1_000_000_000  # the notebook's binary-search bounds
MOMENTUM_UPPER_STEPS = 10_000_000
# Condition number of the eigenvector matrix beyond which the eigendecomposition is not
# trusted and the matrix-power form is used for that dimension.
_MAX_EIGVEC_COND = 1e8


def nqm_spectrum(d: int = DIMENSIONS, *, binned: bool = True,
                 n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues h and their multiplicities (counts) of the NQM Hessian.

    Unbinned: h_i = 1/i, counts 1. Binned (the notebook's speed-up): representatives
    geomspace(1, 1/d, n_bins); each 1/i is counted in the first bin whose value is <= it
    (the notebook's sequential loop, vectorised)."""
    full = 1.0 / np.arange(1, d + 1)
    if not binned:
        return full, np.ones(d)
    bins = np.geomspace(full[0], full[-1], n_bins)
    # First bin (in descending order) with bins[j] <= h: index into the ascending copy.
    ascending = bins[::-1]
    index = n_bins - np.searchsorted(ascending, full, side="right")
    return bins, np.bincount(index, minlength=n_bins).astype(float)


def step_and_noise(h: np.ndarray, learning_rate: float, batch_size: float,
                   precond_power: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per dimension: x = lr * p_i * h_i (the contraction of one step) and
    n = (lr * p_i)^2 * h_i / B (the variance the gradient noise adds), p_i = h_i^-p."""
    h = np.asarray(h, dtype=float)
    scaled_lr = learning_rate * h ** (-precond_power)
    return scaled_lr * h, scaled_lr ** 2 * h / batch_size


def expected_loss(h: np.ndarray, second_moments: np.ndarray,
                  counts: np.ndarray | None = None) -> float:
    """E[L] = 1/2 sum_i count_i h_i s_i."""
    counts = np.ones_like(h) if counts is None else counts
    return float(0.5 * np.sum(h * second_moments * counts))


def sgd_second_moments(x: np.ndarray, noise: np.ndarray, s0, k: int) -> np.ndarray:
    """E[theta^2] after k steps of (preconditioned) SGD: beta^k s0 + n (1 - beta^k)/(1 - beta)."""
    x = np.asarray(x, dtype=float)
    beta = (1.0 - x) ** 2
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        power = beta ** k
        one_minus_beta = x * (2.0 - x)  # = 1 - beta, without cancellation at small x
        geometric = np.where(one_minus_beta == 0.0, float(k),
                             (1.0 - power) / np.where(one_minus_beta == 0.0, 1.0, one_minus_beta))
        return power * s0 + noise * geometric


def momentum_transition(x: np.ndarray, momentum: float) -> np.ndarray:
    """Heavy-ball transition matrices T (shape (dims, 3, 3)) of q = (E[theta^2], E[v^2],
    E[theta v]) for v <- m v - lr P g, theta <- theta + v (paper eq. 21)."""
    x = np.asarray(x, dtype=float)
    m = momentum
    rows = [[(1 - x) ** 2, m ** 2 + 0 * x, 2 * (1 - x) * m],
            [x ** 2, m ** 2 + 0 * x, -2 * x * m],
            [-(1 - x) * x, m ** 2 + 0 * x, (1 - 2 * x) * m]]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def ema_transition(x: np.ndarray, decay: float) -> np.ndarray:
    """EMA-of-iterates transition matrices T (shape (dims, 3, 3)) of q = (E[theta^2],
    E[u^2], E[theta u]), u = EMA / (1 - decay) (paper eq. 38)."""
    x = np.asarray(x, dtype=float)
    g, zero, a = decay, 0 * x, (1 - x) ** 2
    rows = [[a, zero, zero], [a, g ** 2 + zero, 2 * g * (1 - x)], [a, zero, g * (1 - x)]]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def _affine_power(trans: np.ndarray, noise: np.ndarray, q0: np.ndarray, k: int) -> np.ndarray:
    """q_k of q_{j+1} = T q_j + n 1 by raising the augmented 4x4 matrix to the k-th power."""
    dims = trans.shape[0]
    augmented = np.zeros((dims, 4, 4))
    augmented[:, :3, :3] = trans
    augmented[:, :3, 3] = noise[:, None]
    augmented[:, 3, 3] = 1.0
    start = np.concatenate([q0, np.ones((dims, 1))], axis=1)[:, :, None]
    with np.errstate(over="ignore", invalid="ignore"):
        return (np.linalg.matrix_power(augmented, k) @ start)[:, :3, 0]


def linear_recursion(trans: np.ndarray, noise: np.ndarray, q0: np.ndarray, k: int) -> np.ndarray:
    """q_k of q_{j+1} = T q_j + n (1, 1, 1) per dimension, closed form:
    q_k = V [lambda^k (V^-1 q0 - q*) + q*], q* = V^-1 n 1 / (1 - lambda). Shapes: trans
    (dims, 3, 3), noise (dims,), q0 (dims, 3); returns (dims, 3)."""
    eigvals, eigvecs = np.linalg.eig(trans)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        inverse = np.linalg.inv(eigvecs)
        start = (inverse @ q0[:, :, None].astype(complex))[:, :, 0]
        forced = (inverse @ np.repeat(noise[:, None], 3, axis=1)[:, :, None])[:, :, 0]
        fixed = forced / (1.0 - eigvals)
        q = (eigvecs @ (eigvals ** k * (start - fixed) + fixed)[:, :, None])[:, :, 0].real
        bad = ~(np.linalg.cond(eigvecs) < _MAX_EIGVEC_COND)
    if bad.any():
        q[bad] = _affine_power(trans[bad], noise[bad], q0[bad], k)
    return q


def momentum_second_moments(x, noise, s0, k: int, momentum: float) -> np.ndarray:
    """E[theta^2] after k heavy-ball steps from v_0 = 0 (q_0 = (s0, 0, 0))."""
    x = np.asarray(x, dtype=float)
    q0 = np.zeros((x.size, 3))
    q0[:, 0] = s0
    return linear_recursion(momentum_transition(x, momentum), np.asarray(noise, float), q0, k)[:, 0]


def ema_second_moments(x, noise, s0, k: int, decay: float) -> np.ndarray:
    """E[theta_ema^2] after k SGD steps with an EMA of iterates (theta_ema_0 = theta_0):
    (1 - decay)^2 E[u^2]."""
    x = np.asarray(x, dtype=float)
    s0 = np.broadcast_to(np.asarray(s0, dtype=float), x.shape)
    q0 = np.stack([s0, s0 / (1 - decay) ** 2, s0 / (1 - decay)], axis=1)
    q = linear_recursion(ema_transition(x, decay), np.asarray(noise, float), q0, k)
    return q[:, 1] * (1 - decay) ** 2


def binary_search_steps(loss_at: Callable[[int], float], target: float,
                        upper: int) -> int | None:
    """The notebook's search: the largest k in [0, upper) with loss_at(k) >= target
    (the first k with loss < target, minus 1), assuming the loss falls monotonically.
    None when even k = upper - 1 is not below the target (never reached; a NaN or
    infinite loss from a diverging run never counts as below)."""
    low, high = 0, upper
    while low < high - 1:
        mid = (low + high) // 2
        if loss_at(mid) < target:
            high = mid
        else:
            low = mid
    return None if low == upper - 1 else low


def _second_moments_fn(x, noise, momentum: float, ema_decay: float):
    if momentum and ema_decay:
        raise ValueError("the NQM closed forms combine SGD with momentum or with an EMA, not both")
    if momentum:
        return lambda k: momentum_second_moments(x, noise, 1.0, k, momentum)
    if ema_decay:
        return lambda k: ema_second_moments(x, noise, 1.0, k, ema_decay)
    return lambda k: sgd_second_moments(x, noise, 1.0, k)


def nqm_steps_to_target(batch_size: float, learning_rate: float, momentum: float = 0.0,
                        ema_decay: float = 0.0, precond_power: float = 0.0,
                        target: float = 0.01, d: int = DIMENSIONS,
                        binned: bool = True) -> int | None:
    """Steps (optimizer updates) for the NQM's expected loss to fall below `target` at a
    constant learning rate, from s_0 = 1 (initial loss about 4.89 for d = 10^4).

    Exactly the notebook's binary search: the largest k with L(k) >= target, floored at 1
    for plain SGD only, upper bounds 1e9 (SGD) and 1e7 (momentum, EMA). None when the
    target is not reached within the bound (the steady-state loss is above the target,
    or the run is unstable and diverges)."""
    h, counts = nqm_spectrum(d, binned=binned)
    x, noise = step_and_noise(h, learning_rate, batch_size, precond_power)
    moments = _second_moments_fn(x, noise, momentum, ema_decay)
    plain = not momentum and not ema_decay
    upper = SGD_UPPER_STEPS if plain else MOMENTUM_UPPER_STEPS
    with np.errstate(over="ignore", invalid="ignore"):
        steps = binary_search_steps(lambda k: expected_loss(h, moments(k), counts), target, upper)
    if steps is None:
        return None
    return max(steps, 1) if plain else steps


def nqm_optimal_steps(batch_size: float, learning_rates=None, momenta=(0.0,),
                      **kwargs) -> tuple[int | None, float, float]:
    """Grid search (the notebook's): the fewest steps to target over `learning_rates`
    (default logspace(-5, 0.5, 100), the notebook's SGD grid) and `momenta`; returns
    (steps, learning_rate, momentum), the first grid point kept on ties; (None, nan, nan)
    when no grid point reaches the target. `kwargs` go to `nqm_steps_to_target`."""
    learning_rates = np.logspace(-5, 0.5, 100) if learning_rates is None else learning_rates
    best = (None, float("nan"), float("nan"))
    for lr in learning_rates:
        for momentum in momenta:
            steps = nqm_steps_to_target(batch_size, float(lr), momentum=momentum, **kwargs)
            if steps is not None and (best[0] is None or steps < best[0]):
                best = (steps, float(lr), float(momentum))
    return best
