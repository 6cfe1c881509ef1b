"""Distance from initialization (methods.md 2.4); the d = a + b log t fit over stored
measurements is tested in tests/study/test_distance_fit.py."""
import math

import pytest
import torch
from torch import nn

from trainers.probes.distance import distance_from_init, snapshot_parameters


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
