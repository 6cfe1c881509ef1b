"""Smith, Kindermans & Le's schedules (methods.md 1.2-1.4 and the oracles of section 7)."""
from __future__ import annotations

import pytest

from trainers.batch_schedules import (BatchSizePlan, count_updates, increase_then_decay,
                                      updates_per_epoch)

CIFAR = 50_000
MILESTONES = (60, 120, 160)
EPOCHS = 200
PHASE_STARTS = (0, 60, 120, 160)


def cifar(mode: str, batch_size: int = 128, max_batch_size: int | None = None) -> BatchSizePlan:
    return BatchSizePlan(batch_size, mode, 5.0, MILESTONES, max_batch_size)


def check_phases(plan: BatchSizePlan, base_lr: float, expected: list[tuple[float, int]]):
    """(lr, B) at the start of each phase: lr to rounding, B exactly."""
    lrs = [base_lr * plan.lr_factor(e) for e in PHASE_STARTS]
    assert lrs == pytest.approx([lr for lr, _ in expected], rel=1e-12)
    assert [plan.batch_size(e) for e in PHASE_STARTS] == [b for _, b in expected]


def test_the_three_modes_of_the_cifar_table():
    # methods.md 1.2 table, one (lr, B) per phase.
    check_phases(cifar("decay_lr"), 0.1, [(0.1, 128), (0.02, 128), (0.004, 128), (0.0008, 128)])
    check_phases(cifar("hybrid"), 0.1, [(0.1, 128), (0.1, 640), (0.02, 640), (0.004, 640)])
    check_phases(cifar("increase_batch"), 0.1, [(0.1, 128), (0.1, 640), (0.1, 3200), (0.1, 16000)])


def test_lr_over_batch_is_the_same_in_every_mode_at_every_epoch():
    plans = [cifar(mode) for mode in ("decay_lr", "hybrid", "increase_batch")]
    for epoch in range(EPOCHS):
        ratios = [plan.lr_factor(epoch) / plan.batch_size(epoch) for plan in plans]
        assert ratios == pytest.approx([ratios[0]] * 3, rel=1e-12), epoch
        assert ratios[0] == pytest.approx(5.0 ** -plans[0].decays(epoch) / 128, rel=1e-12)


def test_batch_changes_exactly_at_the_milestone_epoch():
    plan = cifar("increase_batch")
    assert [plan.batch_size(e) for e in (59, 60, 119, 120, 159, 160, 199)] == [
        128, 640, 640, 3200, 3200, 16000, 16000]


def test_capped_plan_keeps_the_noise_scale_exact():
    # "Increased initial learning rate": lr 0.5, B0 640, B_max 5120 (methods.md 1.3):
    # B = 640, 3200, 5120, 5120; lr = 0.5, 0.5, 0.5 / 25 * 8 = 0.16, 0.16 / 5 = 0.032.
    plan = cifar("increase_batch", 640, 5120)
    check_phases(plan, 0.5, [(0.5, 640), (0.5, 3200), (0.16, 5120), (0.032, 5120)])


def test_ceil_update_counts_of_the_cifar_schedules():
    # 391 updates per epoch at B = 128 (ceil(50000 / 128)); 79 at 640; 16 at 3200;
    # 10 at 5120; 4 at 16000.
    assert count_updates(cifar("decay_lr"), CIFAR, EPOCHS) == (78_200, 10_000_000)
    # 60*391 + 60*79 + 40*16 + 40*4
    assert count_updates(cifar("increase_batch"), CIFAR, EPOCHS)[0] == 29_000
    # the same capped at B_max = 5120: last phase 40*10
    assert count_updates(cifar("increase_batch", 128, 5120), CIFAR, EPOCHS)[0] == 29_240
    # increased initial lr: 60*79 + 60*16 + 80*10
    assert count_updates(cifar("increase_batch", 640, 5120), CIFAR, EPOCHS)[0] == 6_500
    # increased momentum (B0 = 3200 at m = 0.98): 60*16 + 140*10
    assert count_updates(cifar("increase_batch", 3200, 5120), CIFAR, EPOCHS)[0] == 2_360


def test_updates_per_epoch_counts_the_remainder_batch():
    assert updates_per_epoch(128, 50_000) == 391  # 390 full batches + 80 examples
    assert updates_per_epoch(100, 50_000) == 500
    assert updates_per_epoch(64, 1) == 1


def test_imagenet_headline_schedule():
    # methods.md 1.4, m = 0.975: B0 32768, B_max 65536, lr 3, noise / 10 at 30, 60, 80.
    plan = BatchSizePlan(32768, "increase_batch", 10.0, (30, 60, 80), 65536)
    lrs = [3.0 * plan.lr_factor(e) for e in (0, 30, 60, 80)]
    assert lrs == pytest.approx([3.0, 0.6, 0.06, 0.006])
    # 30 * ceil(1281167 / 32768) + 60 * ceil(1281167 / 65536) = 30*40 + 60*20, "under 2500"
    assert count_updates(plan, 1_281_167, 90) == (2_400, 1_281_167 * 90)


def test_increase_until_a_tenth_of_the_data_then_decay():
    plan = increase_then_decay(128, CIFAR, factor=5.0, milestones="60,120,160")
    assert plan.max_batch_size == 5000
    # 128, 640, 3200, then the cap 5000 takes a factor 1.5625 and the lr the remaining 3.2
    check_phases(plan, 0.1, [(0.1, 128), (0.1, 640), (0.1, 3200), (0.1 * 5000 / 16000, 5000)])


def test_hybrid_can_grow_more_than_once_and_respects_the_cap():
    plan = BatchSizePlan(128, "hybrid", 5.0, MILESTONES, hybrid_increases=2)
    assert [plan.batch_size(e) for e in PHASE_STARTS] == [128, 640, 3200, 3200]
    capped = BatchSizePlan(128, "hybrid", 5.0, MILESTONES, max_batch_size=500, hybrid_increases=2)
    assert [capped.batch_size(e) for e in PHASE_STARTS] == [128, 500, 500, 500]


def test_no_milestones_is_a_constant_batch():
    plan = BatchSizePlan(256)
    assert (plan.batch_size(0), plan.batch_size(500), plan.lr_factor(500)) == (256, 256, 1.0)
    assert count_updates(plan, 1000, 3) == (12, 3000)


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "grow"}, "mode"),
    ({"milestones": "60.5"}, "whole epochs"),
    ({"max_batch_size": 64}, "below"),
    ({"factor": 0.0}, "factor"),
])
def test_invalid_plans_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchSizePlan(128, **kwargs)


def test_plan_is_frozen():
    with pytest.raises(AttributeError):
        cifar("hybrid").factor = 2.0  # type: ignore[misc]
