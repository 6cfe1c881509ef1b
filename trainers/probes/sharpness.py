"""(C_eps, A)-sharpness of Keskar et al. 2016 (Metric 2.1; methods.md 3.2).

phi = (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)) * 100, in percent, where x is the
flat parameter vector, f the mean training loss, and C_eps the box
|y_i| <= eps (|(A^+ x)_i| + 1). A = I is the full-space variant; a random n x p matrix
(p = 100 in the paper) the subspace one. The maximum is found inexactly, as in the
paper, by 10 iterations of L-BFGS-B on -f from y = 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from trainers.probes.hessian import Batch, LossFn, evaluation_mode

# x (n,) float64 -> (f(x), grad f(x) as (n,) float64)
FlatLoss = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class SharpnessResult:
    """`sharpness`: phi in percent; `loss`: f(x); `max_loss`: the largest f found in the
    box; `evaluations`: loss-and-gradient evaluations spent."""

    sharpness: float
    loss: float
    max_loss: float
    epsilon: float
    subspace_dim: int | None  # None for the full space (A = I)
    evaluations: int


def random_subspace(n: int, p: int = 100, seed: int = 0) -> np.ndarray:
    """A (n, p) matrix with i.i.d. standard normal columns (the paper's "randomly
    generated columns"; Gaussian so that the columns are not all near one direction).
    The column scale sets how far A y reaches (|A y| ~ eps sqrt(n p)), so compare
    subspace values only between runs that use this same convention."""
    return np.random.default_rng(seed).standard_normal((n, p))


def box_half_widths(x: np.ndarray, epsilon: float, subspace: np.ndarray | None = None) -> np.ndarray:
    """eps (|x_i| + 1) for A = I, else eps (|(A^+ x)_i| + 1) with A^+ x by least squares."""
    coords = x if subspace is None else np.linalg.lstsq(subspace, x, rcond=None)[0]
    return epsilon * (np.abs(coords) + 1.0)


class _Ascent:
    """-f(x + A y) and its gradient for L-BFGS-B; remembers the largest f it saw (every
    point L-BFGS-B evaluates lies in the box, so each is a valid lower bound on the max)."""

    def __init__(self, loss_and_grad: FlatLoss, x: np.ndarray, subspace: np.ndarray | None):
        self.loss_and_grad, self.x, self.subspace = loss_and_grad, x, subspace
        self.max_loss, self.evaluations = -np.inf, 0

    def __call__(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        step = y if self.subspace is None else self.subspace @ y
        value, grad = self.loss_and_grad(self.x + step)
        self.evaluations += 1
        self.max_loss = max(self.max_loss, float(value))
        grad = np.asarray(grad, dtype=np.float64)
        if self.subspace is not None:
            grad = self.subspace.T @ grad  # chain rule: d f(x + A y) / dy = A^T grad f
        return -float(value), -grad


def keskar_sharpness(loss_and_grad: FlatLoss, x: np.ndarray, *, epsilon: float = 1e-3,
                     subspace: np.ndarray | None = None, maxiter: int = 10) -> SharpnessResult:
    """phi_{x,f}(eps, A) for a loss over a flat vector x of shape (n,).

    `subspace`: None for A = I, else A of shape (n, p) (see `random_subspace`).
    """
    import scipy.optimize  # half a second to import: not in every trainer process (the package's)
    x = np.asarray(x, dtype=np.float64)
    loss = float(loss_and_grad(x)[0])
    half = box_half_widths(x, epsilon, subspace)
    ascent = _Ascent(loss_and_grad, x, subspace)
    scipy.optimize.minimize(ascent, np.zeros_like(half), jac=True, method="L-BFGS-B",
                            bounds=scipy.optimize.Bounds(-half, half),
                            options={"maxiter": maxiter})
    max_loss = max(ascent.max_loss, loss)  # y = 0 is feasible, so phi >= 0
    return SharpnessResult(
        sharpness=(max_loss - loss) / (1.0 + loss) * 100.0, loss=loss, max_loss=max_loss,
        epsilon=epsilon, subspace_dim=None if subspace is None else subspace.shape[1],
        evaluations=ascent.evaluations + 1)


def flatten_parameters(model: nn.Module) -> np.ndarray:
    """The trainable parameters as one float64 vector, in `model.parameters()` order."""
    return torch.cat([p.detach().reshape(-1).double().cpu()
                      for p in model.parameters() if p.requires_grad]).numpy()


def model_loss_closure(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn) -> FlatLoss:
    """f(x) = mean loss over all examples of `batches` with the trainable parameters set
    to the flat vector x, and its gradient; the model itself is not modified.

    Runs in eval mode (BN running statistics, no dropout) so that f is deterministic,
    which L-BFGS-B's line search needs. Gradients accumulate batch by batch.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    reference = named[0][1]

    def loss_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        flat = torch.as_tensor(x, dtype=reference.dtype, device=reference.device).requires_grad_()
        params, offset = {}, 0
        for name, p in named:
            params[name] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        total, count, grad = 0.0, 0, torch.zeros_like(flat)
        with evaluation_mode(model):
            for inputs, labels in batches:
                summed, n = loss_fn(functional_call(model, params, (inputs,)), labels)[:2]
                grad += torch.autograd.grad(summed, flat)[0]
                total, count = total + float(summed.detach()), count + int(n)
        return total / count, (grad / count).double().cpu().numpy()

    return loss_and_grad


def model_sharpness(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, *,
                    epsilon: float = 1e-3, space: Literal["full", "random"] = "full",
                    subspace_dim: int = 100, seed: int = 0, maxiter: int = 10) -> SharpnessResult:
    """Keskar sharpness of a model's current weights on `batches` (the training set).

    `space="full"`: A = I; `"random"`: A is `random_subspace(n, subspace_dim, seed)`
    (memory n * subspace_dim float64). The paper reports eps = 1e-3 and 5e-4.
    """
    if space not in ("full", "random"):
        raise ValueError(f"space must be 'full' or 'random', got {space!r}")
    x = flatten_parameters(model)
    subspace = random_subspace(x.size, subspace_dim, seed) if space == "random" else None
    return keskar_sharpness(model_loss_closure(model, batches, loss_fn), x,
                            epsilon=epsilon, subspace=subspace, maxiter=maxiter)
