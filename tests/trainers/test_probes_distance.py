"""Distance from initialization and the d = a + b log t fit (methods.md 2.4)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from trainers.probes.distance import distance_from_init, fit_log_growth, snapshot_parameters


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_distance_is_zero_at_init_and_exact_after_a_known_shift():
    model = _model()
    initial = snapshot_parameters(model)
    assert distance_from_init(model, initial).total == 0.0
    with torch.no_grad():
        model[0].weight.add_(0.5)      # 12 entries moved by 0.5: norm sqrt(12) / 2
        model[2].bias.sub_(2.0)        # 2 entries moved by 2: norm 2 sqrt(2)
    result = distance_from_init(model, initial)
    # Differences of float32 values by exact binary amounts: float32 rounding only.
    assert result.per_layer["0.weight"] == pytest.approx(math.sqrt(12) / 2, rel=1e-6)
    assert result.per_layer["2.bias"] == pytest.approx(2 * math.sqrt(2), rel=1e-6)
    assert result.per_layer["0.bias"] == 0.0 and result.per_layer["2.weight"] == 0.0
    assert result.total == pytest.approx(math.sqrt(3 + 8), rel=1e-6)
    assert set(result.per_layer) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_snapshot_is_a_copy():
    model = _model()
    initial = snapshot_parameters(model)
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    assert not torch.equal(initial["0.bias"], model[0].bias)


def test_log_fit_recovers_intercept_and_slope_exactly():
    steps = np.unique(np.geomspace(1, 10000, 40).round())
    fit = fit_log_growth(steps, 0.7 + 1.3 * np.log(steps))
    # Noise-free data: least squares is exact up to float64 rounding.
    assert fit.intercept == pytest.approx(0.7, abs=1e-10)
    assert fit.slope == pytest.approx(1.3, abs=1e-10)


def test_log_fit_with_noise_matches_numpy_polyfit():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 500)
    d = 2.0 + 0.4 * np.log(steps) + rng.normal(scale=0.05, size=steps.size)
    fit = fit_log_growth(list(steps), list(d))
    slope, intercept = np.polyfit(np.log(steps), d, 1)
    assert (fit.slope, fit.intercept) == pytest.approx((slope, intercept), rel=1e-9)


def test_log_fit_rejects_step_zero():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit_log_growth([0, 1, 2], [0.0, 1.0, 2.0])
