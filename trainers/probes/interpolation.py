"""1-D parametric interpolation plots (Keskar et al. 2016, section 2.2.1; methods.md 3.3).

f(alpha x_large + (1 - alpha) x_small) for alpha in linspace(-1, 2, 25): alpha = 0 is the
small-batch minimiser, alpha = 1 the large-batch one. Every floating-point state_dict
entry is interpolated (BN running buffers included, as in the reference code); what
batch norm then normalises with is explicit:

- "batch_stats": BN in train mode, i.e. each evaluation chunk's own statistics (Keras
  BN mode=2 and the PyTorch reference, which never calls eval()); ghost BN layers then
  normalise per ghost batch, as in their training;
- "interpolate_running": eval mode with the interpolated running buffers;
- "reestimate": running statistics reset and re-estimated (cumulative average) on
  training batches at each alpha, then eval mode.
Dropout is always off, so every mode is deterministic.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from trainers.probes.hessian import Batch, LossFn

BatchNormMode = Literal["batch_stats", "interpolate_running", "reestimate"]
BATCH_NORM_MODES = ("batch_stats", "interpolate_running", "reestimate")
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class InterpolationCurve:
    """`alphas`: (k,); `loss[split]`: (k,) mean loss; `accuracy[split]`: (k,) fraction of
    argmax hits (NaN where labels are not integer class indices)."""

    alphas: np.ndarray
    loss: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray]


def keskar_alphas() -> np.ndarray:
    """The reference code's 25 evenly spaced alphas from -1 to 2 (0 and 1 exact)."""
    return np.linspace(-1.0, 2.0, 25)


def interpolate_states(state_small: State, state_large: State, alpha: float) -> dict[str, torch.Tensor]:
    """alpha * large + (1 - alpha) * small for floating entries; integer entries (such
    as BN's num_batches_tracked) come from the nearer endpoint. Exact at alpha 0 and 1."""
    state = {}
    for name, small in state_small.items():
        large = state_large[name]
        if small.is_floating_point():
            state[name] = alpha * large + (1.0 - alpha) * small
        else:
            state[name] = (large if alpha >= 0.5 else small).clone()
    return state


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    # Duck-typed so that ghost batch norm variants with running buffers count too.
    return [m for m in model.modules()
            if hasattr(m, "running_mean") and hasattr(m, "reset_running_stats")]


def _set_mode(model: nn.Module, batch_stats: bool) -> None:
    model.eval()  # dropout off in every mode
    for module in _batch_norms(model):
        module.train(batch_stats)


def _inputs(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@contextlib.contextmanager
def _cumulative_momentum(norms: list[nn.Module]) -> Iterator[None]:
    # momentum=None makes BN keep an exact cumulative average over the batches seen.
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


@torch.no_grad()
def reestimate_batch_norm(model: nn.Module, batches: Sequence) -> None:
    """Reset BN running statistics and re-estimate them as the cumulative average over
    `batches` (input tensors or (inputs, labels) pairs); leaves the model in eval mode."""
    norms = _batch_norms(model)
    for module in norms:
        module.reset_running_stats()
    _set_mode(model, batch_stats=True)
    with _cumulative_momentum(norms):
        for batch in batches:
            model(_inputs(batch))
    model.eval()


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
              batch_size: int) -> tuple[float, float]:
    total, count, hits = 0.0, 0, 0
    classify = not (y.is_floating_point() or y.is_complex())
    for start in range(0, len(x), batch_size):
        logits, labels = model(x[start:start + batch_size]), y[start:start + batch_size]
        summed, n = loss_fn(logits, labels)[:2]
        total, count = total + float(summed), count + int(n)
        if classify:
            hits += int((logits.argmax(-1) == labels).sum())
    return total / count, (hits / count if classify else float("nan"))


def evaluate_state(model: nn.Module, state: State, splits: Mapping[str, Batch], loss_fn: LossFn,
                   *, batch_norm: BatchNormMode = "batch_stats",
                   reestimate_batches: Sequence | None = None,
                   batch_size: int = 5000) -> dict[str, tuple[float, float]]:
    """(mean loss, accuracy) per split of `model` loaded with `state`, BN handled as
    `batch_norm` says. `model` is loaded in place: pass a copy you own."""
    model.load_state_dict(state)
    if batch_norm == "reestimate":
        if _batch_norms(model) and reestimate_batches is None:
            raise ValueError('batch_norm="reestimate" needs reestimate_batches (training data)')
        reestimate_batch_norm(model, [] if reestimate_batches is None else reestimate_batches)
    else:
        _set_mode(model, batch_stats=batch_norm == "batch_stats")
    return {name: _evaluate(model, x, y, loss_fn, batch_size) for name, (x, y) in splits.items()}


def interpolation_curve(model: nn.Module, state_small: State, state_large: State,
                        splits: Mapping[str, Batch], loss_fn: LossFn, *,
                        alphas: Sequence[float] | None = None,
                        batch_norm: BatchNormMode = "batch_stats",
                        reestimate_batches: Sequence | None = None,
                        batch_size: int = 5000) -> InterpolationCurve:
    """Loss and accuracy per alpha per split along alpha x_large + (1 - alpha) x_small.

    `model`: the architecture (a copy is used; the model is not changed); `splits`: name
    -> (inputs, labels), evaluated in chunks of `batch_size` (Keskar used 5000, which
    matters under "batch_stats"); `reestimate_batches`: training batches for "reestimate".
    """
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {batch_norm!r}")
    alphas = keskar_alphas() if alphas is None else np.asarray(alphas, dtype=np.float64)
    work = copy.deepcopy(model)
    loss = {name: np.empty(len(alphas)) for name in splits}
    accuracy = {name: np.empty(len(alphas)) for name in splits}
    for i, alpha in enumerate(alphas):
        state = interpolate_states(state_small, state_large, float(alpha))
        results = evaluate_state(work, state, splits, loss_fn, batch_norm=batch_norm,
                                 reestimate_batches=reestimate_batches, batch_size=batch_size)
        for name, (split_loss, split_accuracy) in results.items():
            loss[name][i], accuracy[name][i] = split_loss, split_accuracy
    return InterpolationCurve(alphas=alphas, loss=loss, accuracy=accuracy)
