"""Hoffer et al.'s d = a + b ln t fit over stored measurements (study.analysis.distance,
methods.md 2.4): exact oracles on synthetic distances, the initial-learning-rate-phase
rule, and the stored extra JSON as the trainers write it."""
import json

import numpy as np
import pandas as pd
import pytest

from study.analysis.distance import (DistanceFit, distance_fits, distance_series,
                                     fit_distance_growth, fit_log_growth, initial_lr_phase,
                                     layer_names)


def _trial(steps, distances, lrs=None, per_layer=None, as_text=True):
    """One trial's measurements as db.queries returns them (extra as stored JSON text)."""
    extras = []
    for i, d in enumerate(distances):
        extra = {"distance_from_init": float(d)}
        if per_layer:
            extra["distance_per_layer"] = {name: float(v[i]) for name, v in per_layer.items()}
        extras.append(json.dumps(extra) if as_text else extra)
    return pd.DataFrame({"trial_id": 1, "step": steps,
                         "learning_rate": 0.1 if lrs is None else lrs, "extra": extras})


def test_fit_recovers_intercept_and_slope_exactly():
    steps = np.unique(np.geomspace(1, 10000, 40).round())
    fit = fit_log_growth(steps, 0.7 + 1.3 * np.log(steps))
    # Noise-free data: least squares is exact up to float64 rounding.
    assert fit.intercept == pytest.approx(0.7, abs=1e-10)
    assert fit.slope == pytest.approx(1.3, abs=1e-10)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)
    assert (fit.n_points, fit.first_step, fit.last_step) == (len(steps), 1, 10000)


def test_fit_with_noise_matches_polyfit_and_recovers_the_truth():
    rng = np.random.default_rng(0)
    steps = np.arange(1, 2000)
    d = 2.0 + 0.4 * np.log(steps) + rng.normal(scale=0.05, size=steps.size)
    fit = fit_log_growth(list(steps), list(d))
    slope, intercept = np.polyfit(np.log(steps), d, 1)
    assert (fit.slope, fit.intercept) == pytest.approx((slope, intercept), rel=1e-9)
    # Standard error of the slope ~ 0.05 / (std(ln t) sqrt(n)) ~ 1e-3: 5 sigma tolerances.
    assert fit.slope == pytest.approx(0.4, abs=5e-3) and fit.intercept == pytest.approx(2.0, abs=0.04)
    residual = d - (intercept + slope * np.log(steps))
    assert fit.r_squared == pytest.approx(1 - residual.var() / d.var(), rel=1e-9)
    assert fit.predict([1, np.e]) == pytest.approx([fit.intercept, fit.intercept + fit.slope])


def test_fit_rejects_step_zero_and_too_few_points():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        fit_log_growth([0, 1, 2], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="length >= 2"):
        fit_log_growth([5], [1.0])


def test_constant_schedule_fits_every_evaluation_from_the_stored_json():
    steps = np.arange(10, 510, 10)
    trial = _trial(steps, 0.5 + 0.25 * np.log(steps))
    fit = fit_distance_growth(trial)
    assert isinstance(fit, DistanceFit) and fit.layer == "all"
    assert (fit.intercept, fit.slope) == pytest.approx((0.5, 0.25), abs=1e-10)
    assert (fit.n_points, fit.first_step, fit.last_step, fit.phase_end_step) == (50, 10, 500, None)
    with pytest.raises(AttributeError):
        fit.slope = 1.0  # frozen


def test_step_schedule_fits_only_before_the_first_decay():
    """Hoffer's regime: log growth at lr 0.1 until step 300, then the lr drops 10x and
    the distance follows a different law; the fit must use steps 10..290 only."""
    steps = np.arange(10, 610, 10)
    lrs = np.where(steps < 300, 0.1, 0.01)
    d = np.where(steps < 300, 1.0 + 2.0 * np.log(steps), 50.0 + steps / 10)
    fit = fit_distance_growth(_trial(steps, d, lrs))
    assert (fit.intercept, fit.slope) == pytest.approx((1.0, 2.0), abs=1e-10)
    assert (fit.last_step, fit.phase_end_step, fit.n_points) == (290, 300, 29)
    explicit = fit_distance_growth(_trial(steps, d, lrs), end_step=200)
    assert explicit.last_step == 200 and explicit.slope == pytest.approx(2.0, abs=1e-10)


def test_warmup_counts_as_initial_phase_and_smooth_decay_uses_the_near_peak_stretch():
    steps = np.arange(1, 11)
    warm = np.array([0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1, 0.05, 0.02, 0.01])
    mask, end = initial_lr_phase(steps, warm)
    assert mask.tolist() == [True] * 7 + [False] * 3 and end == 8
    cosine = 0.1 * 0.5 * (1 + np.cos(np.pi * (steps - 1) / 10))
    mask, end = initial_lr_phase(steps, cosine, drop_tolerance=0.05)
    assert mask.sum() == int(np.sum(cosine >= 0.095)) and end == steps[mask.sum()]


def test_per_layer_fits_and_missing_distance():
    steps = np.arange(5, 105, 5)
    layers = {"0.weight": 1.0 + 0.5 * np.log(steps), "0.bias": 0.1 * np.log(steps)}
    total = np.sqrt(layers["0.weight"] ** 2 + layers["0.bias"] ** 2)
    trial = _trial(steps, total, per_layer=layers, as_text=False)
    assert layer_names(trial) == ["0.weight", "0.bias"]
    fits = distance_fits(trial)
    assert list(fits["layer"]) == ["all", "0.weight", "0.bias"]
    weight = fits.set_index("layer").loc["0.weight"]
    assert (weight["intercept"], weight["slope"]) == pytest.approx((1.0, 0.5), abs=1e-10)
    assert distance_series(trial, "0.bias")["distance"].to_numpy() == pytest.approx(layers["0.bias"])
    no_probe = trial.assign(extra=[{}] * len(trial))
    assert fit_distance_growth(no_probe) is None and distance_fits(no_probe).empty


def test_fit_on_distances_a_real_training_run_recorded():
    """The trainer's probe writes what the fit reads: a tiny run on digits."""
    from trainers.config import Target, TrialConfig
    from trainers.loop import run_trial
    config = TrialConfig(workload="digits_mlp", batch_size=32, optimizer="sgd", schedule="constant",
                         hparams={"learning_rate": 0.05, "momentum": 0.0}, max_steps=60,
                         eval_every=10, target=Target("val_error", 0.0), seed=0, device="cpu",
                         probes=("distance",))
    seen = []
    run_trial(config, on_measurement=seen.append)
    frame = pd.DataFrame([{"step": m.step, "learning_rate": m.learning_rate, "extra": m.extra}
                          for m in seen])
    fit = fit_distance_growth(frame)
    assert fit is not None and fit.n_points == 6 and fit.slope > 0
    assert fit.predict([60])[0] == pytest.approx(frame["extra"].iloc[-1]["distance_from_init"], rel=0.3)
