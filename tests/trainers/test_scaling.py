"""Scaling rules against methods.md section 7 and the papers' worked numbers."""
from __future__ import annotations

import math

import pytest

from trainers.scaling import (adapt_regime, equal_noise_batch_size, goyal_warmup_start_factor,
                              linear_scaled_lr, lost_epochs, noise_scale,
                              regime_adaptation_factor, sqrt_scaled_lr)


def test_noise_scale_of_the_cifar_baseline():
    # 0.1 * (50000 / 128 - 1) = 0.1 * 389.625
    assert noise_scale(0.1, 50_000, 128) == pytest.approx(38.9625)
    assert noise_scale(0.1, 50_000, 128, exact=False) == pytest.approx(39.0625)


def test_momentum_multiplies_the_noise_scale_by_one_over_one_minus_m():
    assert noise_scale(0.1, 50_000, 128, momentum=0.9) == pytest.approx(389.625)


def test_noise_scale_is_zero_for_full_batch_gradient_descent():
    assert noise_scale(0.1, 50_000, 50_000) == 0.0


def test_noise_scale_rejects_momentum_of_one():
    with pytest.raises(ValueError, match="momentum"):
        noise_scale(0.1, 100, 10, momentum=1.0)


def test_linear_and_square_root_rules():
    # Goyal et al.: 0.1 at 256 -> 3.2 at 8192 (k = 32)
    assert linear_scaled_lr(0.1, 8192, 256) == pytest.approx(3.2)
    # Hoffer et al.: 4096 vs 128 -> x sqrt(32) = 5.656854
    assert sqrt_scaled_lr(1.0, 4096, 128) == pytest.approx(5.656854249)
    assert sqrt_scaled_lr(0.1, 512, 128) == pytest.approx(0.2)


def test_equal_noise_batch_sizes_of_smith_et_al():
    # B ~ lr / (1 - m): 128 at (0.1, 0.9) -> 640 at (0.5, 0.9) -> 3200 at (0.5, 0.98)
    assert equal_noise_batch_size(128, 0.1, 0.9, 0.5, 0.9) == pytest.approx(640)
    assert equal_noise_batch_size(128, 0.1, 0.9, 0.5, 0.98) == pytest.approx(3200)
    # ImageNet: 8192 at m 0.9 -> 32768 at m 0.975, same lr
    assert equal_noise_batch_size(8192, 3.0, 0.9, 3.0, 0.975) == pytest.approx(32768)


def test_lost_epochs():
    # B / (N (1 - m)) = 3200 / (50000 * 0.02) = 3.2 epochs
    assert lost_epochs(3200, 50_000, 0.98) == pytest.approx(3.2)


def test_regime_adaptation_stretches_epochs_and_milestones():
    assert regime_adaptation_factor(4096, 128) == 32
    # ceil, as in Hoffer et al.'s code: 1000 / 128 = 7.8 -> 8
    assert regime_adaptation_factor(1000, 128) == 8
    epochs, milestones = adapt_regime(200, (81, 122, 164), 2048, 128)
    assert epochs == 3200 and milestones == (1296, 1952, 2624)


def test_goyal_warmup_start_factor():
    assert goyal_warmup_start_factor(8192, 256) == pytest.approx(1 / 32)
    assert goyal_warmup_start_factor(128, 256) == 1.0


def test_linear_rule_keeps_the_approximate_noise_scale():
    base = noise_scale(0.1, 50_000, 128, exact=False)
    scaled = noise_scale(linear_scaled_lr(0.1, 1024, 128), 50_000, 1024, exact=False)
    assert math.isclose(base, scaled)
