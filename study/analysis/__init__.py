"""Scaling analysis over plain pandas frames (numpy, pandas and scipy only; never torch,
so the dashboard runs where torch is absent).

Frames: `cells` (cell_id, batch_size, optimizer, schedule), `trials` (cell_id, trial_id,
trial_number, outcome, hparams, steps_to_result) and `measurements` (trial_id, step,
examples, wall_seconds and metric columns such as val_error).
"""
from study.analysis.bootstrap import (
    BootstrapResult,
    bootstrap_steps_to_result,
    resample_cell,
    trial_first_steps,
)
from study.analysis.budgets import (
    best_under_budget,
    best_under_example_budget,
    best_under_step_budget,
    examples_seen,
)
from study.analysis.distance import (
    DistanceFit,
    distance_fits,
    distance_series,
    fit_distance_growth,
    fit_log_growth,
    initial_lr_phase,
)
from study.analysis.hparams import (
    edge_check,
    effective_learning_rate,
    fit_power_law,
    hparam_scaling,
    linear_heuristic,
    position_in_range,
    search_space_scatter,
    sqrt_heuristic,
    winning_hparams,
)
from study.analysis.scaling import (
    ScalingFit,
    classify_regimes,
    fit_scaling,
    fit_steps_curve,
    local_slopes,
    plateau_start,
    regime_labels,
)
from study.analysis.sensitivity import first_trials, relative_change, steps_vs_trial_count
from study.analysis.steps import (
    ELIGIBLE_OUTCOMES,
    beats,
    first_beating_rows,
    result_or_none,
    steps_to_result,
)

__all__ = [
    "ELIGIBLE_OUTCOMES", "BootstrapResult", "DistanceFit", "ScalingFit",
    "beats", "distance_fits", "distance_series", "fit_distance_growth", "fit_log_growth",
    "initial_lr_phase", "best_under_budget", "best_under_example_budget", "best_under_step_budget",
    "bootstrap_steps_to_result", "classify_regimes", "edge_check", "effective_learning_rate",
    "examples_seen", "first_beating_rows", "first_trials", "fit_power_law", "fit_scaling",
    "fit_steps_curve", "hparam_scaling", "linear_heuristic", "local_slopes", "plateau_start",
    "position_in_range", "regime_labels", "relative_change", "resample_cell",
    "result_or_none", "search_space_scatter", "sqrt_heuristic", "steps_to_result",
    "steps_vs_trial_count", "trial_first_steps", "winning_hparams",
]
