"""Optimizer registry: name -> factory(params, hparams) and the hyperparameters it reads.

Hyperparameter names are shared with campaign search spaces: `learning_rate`,
`momentum`, `weight_decay`, `beta1`, `beta2`, `epsilon`, `trust_coefficient`.

| name     | required                | optional (default)                                   |
|----------|-------------------------|------------------------------------------------------|
| sgd      | learning_rate           | weight_decay (0)                                     |
| momentum | learning_rate, momentum | weight_decay (0)                                     |
| nesterov | learning_rate, momentum | weight_decay (0)                                     |
| adam     | learning_rate           | beta1 (0.9), beta2 (0.999), epsilon (1e-8), weight_decay (0) |
| adamw    | learning_rate           | beta1 (0.9), beta2 (0.999), epsilon (1e-8), weight_decay (0.01) |
| lars     | learning_rate           | momentum (0.9), weight_decay (0), trust_coefficient (0.001) |
| lamb     | learning_rate           | beta1 (0.9), beta2 (0.999), epsilon (1e-6), weight_decay (0.01) |

`weight_decay` is L2 added to the gradient for sgd/momentum/nesterov/adam, decoupled
(w <- w - lr * wd * w) for adamw, and inside the layer-wise update for lars/lamb, which
exclude 1-D tensors (biases, norm scales) from it (see `trainers.lars_lamb`).

`validate_hparams` checks a trial's values before it trains (both trainers call it):
`nesterov` needs momentum > 0 (torch.optim.SGD refuses 0; use `sgd`), and whatever
torch.optim's constructors reject (negative rates, betas outside [0, 1)) is rejected.

Gradient clipping is not an optimizer: the training loop reads `grad_clip_norm`
(`GRAD_CLIP_NORM`; absent or 0 means no clipping) from the trial's hparams and calls
`clip_gradients(model.parameters(), hparams.get(GRAD_CLIP_NORM))` between
`backward()` and `optimizer.step()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import torch

from trainers.lars_lamb import LAMB, LARS

# The hyperparameter the training loop reads for global-norm gradient clipping.
GRAD_CLIP_NORM = "grad_clip_norm"


@dataclass(frozen=True)
class OptimizerSpec:
    factory: Callable[[Iterable[torch.nn.Parameter], Mapping[str, float]], torch.optim.Optimizer]
    required: tuple[str, ...]
    optional: Mapping[str, float]  # name -> default
    # Raises ValueError for resolved values this optimizer cannot train with (beyond
    # what torch.optim's constructor itself checks), with a message a user can act on.
    check: Callable[[Mapping[str, float]], None] | None = None

    def __post_init__(self) -> None:
        # Registry entries are shared by every trial in the process: lock the defaults.
        object.__setattr__(self, "optional", MappingProxyType(dict(self.optional)))

    def resolve(self, hparams: Mapping[str, float]) -> dict[str, float]:
        """The hyperparameters this optimizer trains with: those it reads from `hparams`,
        its registry defaults for the optional ones left out. What a trial records about
        its optimizer (e.g. the momentum in its noise scale) must come from here, not
        from `hparams`, which may leave a default (lars' momentum 0.9) out."""
        missing = [name for name in self.required if name not in hparams]
        if missing:
            raise ValueError(f"missing hyperparameters: {', '.join(missing)}")
        values = {**self.optional, **{k: v for k, v in hparams.items()
                                      if k in self.required or k in self.optional}}
        if self.check is not None:
            self.check(values)
        return values

    def build(self, params, hparams: Mapping[str, float]) -> torch.optim.Optimizer:
        return self.factory(params, self.resolve(hparams))

    @property
    def hparam_names(self) -> tuple[str, ...]:
        """Every hyperparameter this optimizer reads (search spaces may name these)."""
        return (*self.required, *self.optional)


def _sgd(params, hp):
    return torch.optim.SGD(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])


def _momentum(params, hp):
    # torch's heavy-ball form: v <- m v + g; w <- w - lr v (the learning rate is applied
    # after accumulation, as in Shallue et al.'s and Smith et al.'s formulation).
    return torch.optim.SGD(params, lr=hp["learning_rate"], momentum=hp["momentum"],
                           weight_decay=hp["weight_decay"])


def _check_nesterov(hp):
    # torch.optim.SGD refuses nesterov=True with momentum 0 (and the vectorized trainer,
    # whose update would reduce to plain SGD, must not train what run_trial refuses).
    if not float(hp["momentum"]) > 0:
        raise ValueError(f"momentum must be > 0 for nesterov, got {hp['momentum']}; "
                         "use the sgd optimizer for momentum 0")


def _nesterov(params, hp):
    return torch.optim.SGD(params, lr=hp["learning_rate"], momentum=hp["momentum"],
                           nesterov=True, weight_decay=hp["weight_decay"])


def _adam(params, hp):
    return torch.optim.Adam(params, lr=hp["learning_rate"], betas=(hp["beta1"], hp["beta2"]),
                            eps=hp["epsilon"], weight_decay=hp["weight_decay"])


def _adamw(params, hp):
    return torch.optim.AdamW(params, lr=hp["learning_rate"], betas=(hp["beta1"], hp["beta2"]),
                             eps=hp["epsilon"], weight_decay=hp["weight_decay"])


def _lars(params, hp):
    return LARS(params, lr=hp["learning_rate"], momentum=hp["momentum"],
                weight_decay=hp["weight_decay"], trust_coefficient=hp["trust_coefficient"])


def _lamb(params, hp):
    return LAMB(params, lr=hp["learning_rate"], betas=(hp["beta1"], hp["beta2"]),
                eps=hp["epsilon"], weight_decay=hp["weight_decay"])


def clip_gradients(params, max_norm: float | None) -> torch.Tensor | None:
    """Scale the gradients of `params` so their global L2 norm is at most `max_norm`.

    Returns the norm before clipping, or None (and touches nothing) when `max_norm` is
    None or <= 0, the "no clipping" values of the `grad_clip_norm` hyperparameter.
    Non-finite gradients are left for the loop's divergence check, not raised here.
    """
    if max_norm is None or float(max_norm) <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(params, float(max_norm))


def _registry(entries: Iterable[tuple[str, OptimizerSpec]]) -> Mapping[str, OptimizerSpec]:
    table: dict[str, OptimizerSpec] = {}
    for name, spec in entries:
        if name in table:
            raise ValueError(f"duplicate optimizer name {name!r}")
        table[name] = spec
    return MappingProxyType(table)


_ADAM_DEFAULTS = {"beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}

OPTIMIZERS: Mapping[str, OptimizerSpec] = _registry([
    ("sgd", OptimizerSpec(_sgd, ("learning_rate",), {"weight_decay": 0.0})),
    ("momentum", OptimizerSpec(_momentum, ("learning_rate", "momentum"), {"weight_decay": 0.0})),
    ("nesterov", OptimizerSpec(_nesterov, ("learning_rate", "momentum"), {"weight_decay": 0.0},
                               check=_check_nesterov)),
    ("adam", OptimizerSpec(_adam, ("learning_rate",), {**_ADAM_DEFAULTS, "weight_decay": 0.0})),
    ("adamw", OptimizerSpec(_adamw, ("learning_rate",), {**_ADAM_DEFAULTS, "weight_decay": 0.01})),
    # methods.md 6.1: trust coefficient 0.001 (TF / SimCLR default).
    ("lars", OptimizerSpec(_lars, ("learning_rate",), {
        "momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.001})),
    # methods.md 6.2: the BERT defaults.
    ("lamb", OptimizerSpec(_lamb, ("learning_rate",), {
        "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-6, "weight_decay": 0.01})),
])


def validate_hparams(name: str, hparams: Mapping[str, float]) -> dict[str, float]:
    """The resolved hyperparameters of optimizer `name`, or a ValueError naming the
    optimizer when it cannot train with them: a required one missing, a value its registry
    entry rejects (nesterov with momentum 0), or one torch.optim's constructor rejects
    (a negative learning rate or momentum, a beta outside [0, 1), ...). Checked before a
    trial trains, by the sequential and the vectorized trainer alike, so both refuse the
    same configs with the same message."""
    spec = get_optimizer(name)
    try:
        values = spec.resolve(hparams)
        spec.factory([torch.zeros(1, requires_grad=True)], values)  # torch's own checks
    except ValueError as exc:
        raise ValueError(f"optimizer {name!r}: {exc}") from None
    return values


def get_optimizer(name: str) -> OptimizerSpec:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(OPTIMIZERS))}") from None
