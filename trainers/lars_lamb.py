"""LARS and LAMB: layer-wise adaptive large-batch optimizers (methods.md 6.1, 6.2).

Both treat every parameter tensor as one "layer". Tensors with at most one dimension
(biases, batch-norm scales and shifts) are excluded from weight decay and from the
trust-ratio adaptation, as in the SimCLR LARS and the BERT/ALBERT LAMB reference code;
those implementations exclude by name, we exclude by shape so that no model has to
name its parameters. Pass `exclude_1d=False` to adapt and decay every tensor.

Written here rather than taken from a package: torch-optimizer is unmaintained, and the
maintained collections differ from the papers in small ways (LAMB without bias
correction, weight norms clamped, 1-D tensors adapted) that a batch-size study must
control exactly.
"""
from __future__ import annotations

import torch


def _ratio_or_one(numerator: torch.Tensor, denominator: torch.Tensor,
                  weight_norm: torch.Tensor, other_norm: torch.Tensor) -> torch.Tensor:
    # A zero weight (fresh zero-init layer) or a zero gradient/update would freeze the
    # layer or divide by zero; the reference implementations fall back to a ratio of 1.
    usable = (weight_norm > 0) & (other_norm > 0)
    return torch.where(usable, numerator / denominator, torch.ones_like(numerator))


def _is_adapted(param: torch.Tensor, exclude_1d: bool) -> bool:
    return not (exclude_1d and param.ndim <= 1)


class _PerTensorOptimizer(torch.optim.Optimizer):
    """Layer-wise optimizers update each tensor on its own (`_update`)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


class LARS(_PerTensorOptimizer):
    """Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg 2017, Algorithm 1).

    For each adapted tensor w with gradient g:
        local_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w||)
                   (1 when ||w|| or ||g|| is 0)
        v <- momentum * v + lr * local_lr * (g + weight_decay * w)
        w <- w - v
    Excluded (1-D) tensors take the plain step v <- momentum * v + lr * g, no decay.
    The learning rate sits inside the velocity, as in the paper ("classic momentum").
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, exclude_1d: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr >= 0, momentum >= 0, weight_decay >= 0, "
                             "trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    def _update(self, param: torch.Tensor, group: dict) -> None:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError("LARS does not support sparse gradients")
        if _is_adapted(param, group["exclude_1d"]):
            decay = group["weight_decay"]
            weight_norm, grad_norm = param.norm(), grad.norm()
            local_lr = _ratio_or_one(group["trust_coefficient"] * weight_norm,
                                     grad_norm + decay * weight_norm, weight_norm, grad_norm)
            step = (grad + decay * param) * (local_lr * group["lr"])
        else:
            step = grad * group["lr"]
        state = self.state[param]
        if "velocity" not in state:
            state["velocity"] = torch.zeros_like(param)
        velocity = state["velocity"]
        velocity.mul_(group["momentum"]).add_(step)
        param.sub_(velocity)


class LAMB(_PerTensorOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019, Algorithm 2).

    For each tensor x with gradient g at step t (t = 1, 2, ...):
        m <- beta1 m + (1 - beta1) g;   v <- beta2 v + (1 - beta2) g^2
        r = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
        u = r + weight_decay * x
        x <- x - lr * ||x|| / ||u|| * u      (ratio 1 when ||x|| or ||u|| is 0)
    Excluded (1-D) tensors take u = r and a ratio of 1: a bias-corrected Adam step.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, exclude_1d: bool = True):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("LAMB needs lr >= 0, eps >= 0, weight_decay >= 0, 0 <= betas < 1")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    def _adam_direction(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        grad = param.grad
        if grad.is_sparse:
            raise RuntimeError("LAMB does not support sparse gradients")
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        first = state["exp_avg"] / (1 - beta1 ** state["step"])
        second = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
        return first / (second.sqrt() + group["eps"])

    def _update(self, param: torch.Tensor, group: dict) -> None:
        direction = self._adam_direction(param, group)
        if _is_adapted(param, group["exclude_1d"]):
            direction = direction + group["weight_decay"] * param
            weight_norm = param.norm()
            direction_norm = direction.norm()
            ratio = _ratio_or_one(weight_norm, direction_norm, weight_norm, direction_norm)
            param.sub_(direction * (ratio * group["lr"]))
        else:
            param.sub_(direction, alpha=group["lr"])
