"""Learning-rate factors at hand-computed points."""
from __future__ import annotations

import pytest

from trainers.schedules import (SCHEDULES, ScheduleSpec, _registry, get_schedule,
                                parse_milestones)


def build(name: str, hparams: dict, max_steps: int = 100):
    return get_schedule(name).build(hparams, max_steps=max_steps)


def test_constant_and_linear_decay():
    assert build("constant", {})(57, 3.2) == 1.0
    linear = build("linear_decay", {"end_factor": 0.1})
    assert [linear(s, 0.0) for s in (0, 50, 100, 150)] == pytest.approx([1.0, 0.55, 0.1, 0.1])


@pytest.mark.parametrize("milestones", ["60,120,160", " 60, 120 ,160", (160, 60, 120), [60.0, 120.0, 160.0]])
def test_step_decay_at_epoch_milestones(milestones):
    # Smith et al.'s CIFAR base schedule: divide by 5 at epochs 60, 120, 160.
    step = build("step", {"milestones": milestones, "decay_factor": 0.2})
    factors = [step(0, epoch) for epoch in (0.0, 59.99, 60.0, 119.5, 120.0, 160.0, 199.9)]
    assert factors == pytest.approx([1.0, 1.0, 0.2, 0.2, 0.04, 0.008, 0.008])


def test_step_decay_defaults_to_a_tenth_and_takes_one_number():
    step = build("step", {"milestones": 30.0})
    assert [step(0, 29.0), step(0, 30.0), step(0, 90.0)] == pytest.approx([1.0, 0.1, 0.1])


def test_step_decay_ignores_the_step_counter():
    step = build("step", {"milestones": "1"})
    assert step(10_000, 0.5) == 1.0


@pytest.mark.parametrize("bad", ["60,abc", "-1", [float("nan")]])
def test_bad_milestones_are_rejected(bad):
    with pytest.raises(ValueError, match="milestones"):
        build("step", {"milestones": bad})


def test_parse_milestones_sorts():
    assert parse_milestones("80,30,60") == (30.0, 60.0, 80.0)
    assert parse_milestones("") == ()


def test_cosine():
    cosine = build("cosine", {})
    # 0.5 (1 + cos(pi t / 100)): t = 25 -> 0.5 (1 + 0.70710678) = 0.85355339
    assert [cosine(s, 0.0) for s in (0, 25, 50, 100, 130)] == pytest.approx(
        [1.0, 0.8535533906, 0.5, 0.0, 0.0])
    to_tenth = build("cosine", {"end_factor": 0.1, "decay_steps": 40})
    # 0.1 + 0.9 * 0.5 at half of 40 steps
    assert [to_tenth(20, 0.0), to_tenth(40, 0.0), to_tenth(99, 0.0)] == pytest.approx([0.55, 0.1, 0.1])


def test_polynomial_power_two_by_default():
    poly = build("polynomial", {})
    # (1 - t/100)^2
    assert [poly(s, 0.0) for s in (0, 50, 90, 100, 120)] == pytest.approx([1.0, 0.25, 0.01, 0.0, 0.0])
    shifted = build("polynomial", {"end_factor": 0.1, "power": 1.0})
    assert shifted(50, 0.0) == pytest.approx(0.55)
    assert build("polynomial", {"end_factor": 0.1})(50, 0.0) == pytest.approx(0.325)


def test_goyal_warmup_then_step_decay():
    # Goyal et al.: target lr 3.2 at B = 8192, ramp from 0.1 (= 3.2 / 32) over 5 epochs,
    # then / 10 at 30, 60, 80.
    schedule = build("warmup_step", {"milestones": "30,60,80", "warmup_start_factor": 1 / 32})
    lrs = [3.2 * schedule(0, epoch) for epoch in (0.0, 2.5, 5.0, 29.0, 30.0, 85.0)]
    # at 2.5 epochs: 1/32 + (31/32) * 0.5 = 0.515625 of 3.2
    assert lrs == pytest.approx([0.1, 1.65, 3.2, 3.2, 0.32, 0.0032])


def test_warmup_multiplies_the_inner_schedule():
    schedule = build("warmup_cosine", {"warmup_epochs": 2.0}, max_steps=100)
    # step 50 at epoch 1: warm-up 0.5 (from 0) times cosine 0.5
    assert schedule(50, 1.0) == pytest.approx(0.25)
    assert schedule(50, 2.0) == pytest.approx(0.5)


def test_zero_warmup_epochs_is_no_warmup():
    schedule = build("warmup_constant", {"warmup_epochs": 0.0})
    assert schedule(0, 0.0) == 1.0


def test_warmup_defaults():
    optional = get_schedule("warmup_linear_decay").optional
    assert optional["warmup_epochs"] == 5.0 and optional["warmup_start_factor"] == 0.0
    assert get_schedule("warmup_linear_decay").required == ("end_factor",)


def test_every_schedule_has_a_warmup_variant():
    bases = {name for name in SCHEDULES if not name.startswith("warmup_")}
    assert bases == {"constant", "linear_decay", "step", "cosine", "polynomial"}
    assert set(SCHEDULES) == bases | {f"warmup_{name}" for name in bases}


def test_schedule_parameters_come_from_hparams_and_others_are_ignored():
    hparams = {"learning_rate": 0.3, "momentum": 0.9, "power": 1.0, "decay_steps": 10}
    assert build("polynomial", hparams)(5, 0.0) == pytest.approx(0.5)
    assert get_schedule("polynomial").hparam_names == ("end_factor", "power", "decay_steps")


def test_registry_is_read_only_and_checked():
    with pytest.raises(TypeError):
        SCHEDULES["mine"] = SCHEDULES["constant"]  # type: ignore[index]
    with pytest.raises(KeyError, match="constant, cosine"):
        get_schedule("onecycle")
    spec = ScheduleSpec(lambda hp, n: (lambda s, e: 1.0), (), {})
    with pytest.raises(ValueError, match="duplicate schedule name 'x'"):
        _registry([("x", spec), ("x", spec)])
    with pytest.raises(ValueError, match="milestones"):
        get_schedule("step").build({}, max_steps=10)
