"""Probes of the training dynamics (spec/methods.md 2.4, 3, 5): gradient noise scale,
distance from initialization, Keskar sharpness, Hessian eigenvalue and trace, 1-D
interpolation, and final-weight checkpoints. Pure PyTorch/NumPy/SciPy; no state shared
between trials (trackers and operators are per-instance).
"""
from trainers.probes.checkpoints import (
    CheckpointBudgetError, CheckpointInfo, load_checkpoint, save_checkpoint)
from trainers.probes.distance import (
    DistanceFromInit, distance_from_init, snapshot_parameters)
from trainers.probes.hessian import (
    EigenResult, HessianOperator, TraceResult, evaluation_mode, hutchinson_trace, top_eigenvalue)
from trainers.probes.interpolation import (
    BATCH_NORM_MODES, InterpolationCurve, evaluate_state, interpolate_states,
    interpolation_curve, keskar_alphas, reestimate_batch_norm)
from trainers.probes.noise_scale import (
    GradientNormSample, NoiseEstimate, NoiseScaleTracker, accumulate_gradient_norms,
    ddp_estimates, grad_sq_norm, two_batch_estimates)
from trainers.probes.sharpness import (
    SharpnessResult, box_half_widths, flatten_parameters, keskar_sharpness, model_loss_closure,
    model_sharpness, random_subspace)

__all__ = [
    "BATCH_NORM_MODES", "CheckpointBudgetError", "CheckpointInfo", "DistanceFromInit",
    "EigenResult", "GradientNormSample", "HessianOperator", "InterpolationCurve",
    "NoiseEstimate", "NoiseScaleTracker", "SharpnessResult", "TraceResult",
    "accumulate_gradient_norms", "box_half_widths", "ddp_estimates", "distance_from_init",
    "evaluate_state", "evaluation_mode", "flatten_parameters",
    "grad_sq_norm", "hutchinson_trace", "interpolate_states", "interpolation_curve",
    "keskar_alphas", "keskar_sharpness", "load_checkpoint", "model_loss_closure",
    "model_sharpness", "random_subspace", "reestimate_batch_norm", "save_checkpoint",
    "snapshot_parameters", "top_eigenvalue", "two_batch_estimates",
]
