"""The noisy quadratic model: closed forms vs recursions and Monte-Carlo, steps to target."""
import numpy as np
import pytest

from trainers.nqm import (
    binary_search_steps, ema_second_moments, expected_loss, momentum_second_moments,
    nqm_optimal_steps, nqm_spectrum, nqm_steps_to_target, sgd_second_moments, step_and_noise,
)

H = np.array([1.0, 0.1, 0.01])


def _notebook_bins(ndim, nbins):
    """The notebook's toy_problem loop, verbatim in logic."""
    full_h = 1.0 / np.arange(1, ndim + 1)
    bins = np.geomspace(full_h[0], full_h[-1], nbins)
    counts, curr_bin, i = np.zeros(nbins), 0, 0
    while i < ndim:
        while i < ndim and full_h[i] >= bins[curr_bin]:
            counts[curr_bin] += 1
            i += 1
        curr_bin += 1
    return bins, counts


def test_binned_spectrum_equals_the_notebook_loop():
    h, counts = nqm_spectrum()
    bins, expected = _notebook_bins(10_000, 100)
    assert np.array_equal(h, bins) and np.array_equal(counts, expected)
    assert counts.sum() == 10_000
    full_h, ones = nqm_spectrum(binned=False)
    assert expected_loss(full_h, np.ones_like(full_h), ones) == pytest.approx(
        0.5 * np.sum(1.0 / np.arange(1, 10_001)))  # about 4.89


@pytest.mark.parametrize("lr,batch,p", [(0.5, 8, 0.0), (1.9, 64, 0.0), (0.05, 2, 0.5),
                                        (0.3, 1024, 1.0)])
def test_sgd_closed_form_equals_unrolled_recursion(lr, batch, p):
    h, _ = nqm_spectrum()
    x, noise = step_and_noise(h, lr, batch, p)
    s = np.ones_like(h)
    for k in range(1, 301):
        s = (1 - x) ** 2 * s + noise
        if k in (1, 7, 100, 300):
            assert np.allclose(sgd_second_moments(x, noise, 1.0, k), s, rtol=1e-12, atol=0)


def _unrolled_momentum(x, noise, m, steps):
    theta2, v2, theta_v = np.ones_like(x), np.zeros_like(x), np.zeros_like(x)
    for _ in range(steps):
        theta2, v2, theta_v = (
            (1 - x) ** 2 * theta2 + m ** 2 * v2 + 2 * (1 - x) * m * theta_v + noise,
            x ** 2 * theta2 + m ** 2 * v2 - 2 * x * m * theta_v + noise,
            -(1 - x) * x * theta2 + m ** 2 * v2 + (1 - 2 * x) * m * theta_v + noise)
    return theta2


def _unrolled_ema(x, noise, g, steps):
    """E[theta^2], E[ema^2], E[theta ema] of theta' = (1-x) theta - eps, ema' = g ema +
    (1 - g) theta', written on the EMA itself (not the notebook's u = ema / (1 - g))."""
    theta2, ema2, cross = np.ones_like(x), np.ones_like(x), np.ones_like(x)
    for _ in range(steps):
        new_theta2 = (1 - x) ** 2 * theta2 + noise
        new_cross = g * (1 - x) * cross + (1 - g) * new_theta2
        ema2 = g ** 2 * ema2 + 2 * g * (1 - g) * (1 - x) * cross + (1 - g) ** 2 * new_theta2
        theta2, cross = new_theta2, new_cross
    return ema2


@pytest.mark.parametrize("lr,batch,m", [(0.5, 8, 0.9), (0.1, 64, 0.99), (1.5, 4, 0.3)])
def test_momentum_closed_form_equals_unrolled_recursion(lr, batch, m):
    h, _ = nqm_spectrum()
    x, noise = step_and_noise(h, lr, batch)
    for steps in (1, 13, 250):
        assert np.allclose(momentum_second_moments(x, noise, 1.0, steps, m),
                           _unrolled_momentum(x, noise, m, steps), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("lr,batch,g", [(0.5, 8, 0.95), (0.02, 64, 0.999), (1.2, 2, 0.5)])
def test_ema_closed_form_equals_unrolled_recursion(lr, batch, g):
    h, _ = nqm_spectrum()
    x, noise = step_and_noise(h, lr, batch)
    for steps in (1, 13, 250):
        assert np.allclose(ema_second_moments(x, noise, 1.0, steps, g),
                           _unrolled_ema(x, noise, g, steps), rtol=1e-9, atol=1e-14)


def test_defective_transition_falls_back_to_the_matrix_power():
    # decay = 1 - x makes all three EMA eigenvalues equal: no eigenbasis.
    x, noise = np.array([0.2, 0.05]), np.array([1e-3, 1e-4])
    assert np.allclose(ema_second_moments(x, noise, 1.0, 40, 0.8),
                       _unrolled_ema(x, noise, 0.8, 40), rtol=1e-9)
    # Critical damping of heavy ball: (1 + m - x)^2 = 4 m.
    m = 0.81
    x = np.array([(1 + m) - 2 * np.sqrt(m)])
    assert np.allclose(momentum_second_moments(x, np.array([1e-3]), 1.0, 40, m),
                       _unrolled_momentum(x, np.array([1e-3]), m, 40), rtol=1e-9)


def test_closed_forms_agree_with_monte_carlo():
    rng = np.random.default_rng(0)
    runs, steps, lr, batch, m, g = 20_000, 60, 0.5, 8, 0.9, 0.95
    theta = rng.standard_normal((runs, 3))
    velocity, plain, ema = np.zeros_like(theta), theta.copy(), theta.copy()
    for _ in range(steps):
        noise = rng.standard_normal((2, runs, 3)) * np.sqrt(H / batch)
        velocity = m * velocity - lr * (H * theta + noise[0])
        theta = theta + velocity
        plain = plain - lr * (H * plain + noise[1])
        ema = g * ema + (1 - g) * plain
    x, var = step_and_noise(H, lr, batch)
    for samples, expected in ((theta, momentum_second_moments(x, var, 1.0, steps, m)),
                              (ema, ema_second_moments(x, var, 1.0, steps, g)),
                              (plain, sgd_second_moments(x, var, 1.0, steps))):
        estimate = np.mean(samples ** 2, axis=0)
        standard_error = np.std(samples ** 2, axis=0) / np.sqrt(runs)
        assert np.all(np.abs(estimate - expected) < 5 * standard_error)


def _first_below_by_iteration(lr, batch, target, limit):
    h, counts = nqm_spectrum()
    x, noise = step_and_noise(h, lr, batch)
    s = np.ones_like(h)
    for k in range(limit):
        if expected_loss(h, s, counts) < target:
            return k
        s = (1 - x) ** 2 * s + noise
    return None


def test_steps_to_target_is_the_notebooks_binary_search():
    # Largest k with L(k) >= C = (first k with L < C) - 1, found here by plain iteration.
    first = _first_below_by_iteration(1.0, 65536, 0.01, 30_000)
    assert nqm_steps_to_target(65536, 1.0) == first - 1
    first = _first_below_by_iteration(1.5, 4096, 0.05, 30_000)
    assert nqm_steps_to_target(4096, 1.5, target=0.05) == first - 1
    assert binary_search_steps(lambda k: 10.0 / (k + 1), 1.0, 1000) == 9


def test_steps_to_target_none_floor_and_bounds():
    assert nqm_steps_to_target(64, 2.5) is None      # x > 2 on the top eigenvalue: diverges
    assert nqm_steps_to_target(1, 1.0) is None       # steady-state loss ~1.2 > 0.01
    assert nqm_steps_to_target(64, 0.1, momentum=0.999) is None
    assert nqm_steps_to_target(64, 0.1, target=100.0) == 1   # SGD is floored at 1
    assert nqm_steps_to_target(64, 0.1, momentum=0.5, target=100.0) == 0
    assert nqm_steps_to_target(64, 0.1, ema_decay=0.5, target=100.0) == 0
    with pytest.raises(ValueError):
        nqm_steps_to_target(64, 0.1, momentum=0.5, ema_decay=0.5)


def test_momentum_and_ema_with_zero_coefficients_match_sgd():
    h, _ = nqm_spectrum()
    x, noise = step_and_noise(h, 0.7, 32, 0.25)
    plain = sgd_second_moments(x, noise, 1.0, 77)
    assert np.allclose(momentum_second_moments(x, noise, 1.0, 77, 1e-12), plain, rtol=1e-9)
    assert np.allclose(ema_second_moments(x, noise, 1.0, 77, 1e-12), plain, rtol=1e-9)


def test_optimal_steps_scale_perfectly_then_flatten_and_lr_grows_linearly():
    batches = 4 ** np.arange(1, 9)  # 4 .. 65536
    best = [nqm_optimal_steps(float(b)) for b in batches]
    steps = np.array([s for s, _, _ in best], dtype=float)
    rates = np.array([lr for _, lr, _ in best])
    assert np.all(np.diff(steps) <= 0)  # never more steps at a larger batch
    assert steps[1] / steps[0] == pytest.approx(0.25, rel=0.05)  # perfect scaling: 4x B, 1/4 steps
    assert steps[-1] / steps[-2] > 0.95  # flat at large B
    exponent = np.polyfit(np.log(batches[:3]), np.log(rates[:3]), 1)[0]
    assert exponent == pytest.approx(1.0, abs=0.1)  # optimal lr roughly proportional to B
    assert np.all(steps >= 10_000 / (2 * 0.01 * batches))  # above the figures' d / (2 C B) line


def test_momentum_helps_only_at_large_batch_sizes():
    rates = np.logspace(-3, 0.5, 24)
    gains = []
    for batch in (4.0, 65536.0):
        sgd = nqm_optimal_steps(batch, rates)[0]
        heavy = nqm_optimal_steps(batch, rates, momenta=(0.0, 0.5, 0.9))[0]
        gains.append(sgd / heavy)
    assert gains[0] < 1.1 and gains[1] > 1.5
