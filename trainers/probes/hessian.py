"""Hessian probes after PyHessian (Yao et al.; methods.md 3.5): Hessian-vector products by
double backprop, the top eigenvalue by power iteration, the trace by Hutchinson.

The loss is the mean over every example of the given batches: per-batch Hv products of
the summed loss are added and divided by the total count, which is PyHessian's
"weighted by batch size" average. The model runs in eval mode (BN running statistics,
no dropout), as in PyHessian, so that H is a fixed matrix.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels)
# Workload.loss's contract: (logits, labels) -> (summed loss, example count, per-example)
LossFn = Callable[[torch.Tensor, torch.Tensor], tuple]
Vector = list[torch.Tensor]  # one tensor per trainable parameter


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, then restore each module's own flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.train(flag)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalized(v: Vector) -> Vector:
    # +1e-6 as in PyHessian: keeps a zero vector finite instead of NaN.
    norm = _dot(v, v).sqrt() + 1e-6
    return [x / norm for x in v]


class HessianOperator:
    """v -> H v, H the Hessian of the mean loss over `batches` w.r.t. the trainable
    parameters. With one batch, the first-order graph is built once and reused (as
    PyHessian does); with several, each product recomputes it batch by batch so that
    memory stays at one batch's graph. Build a new operator after the parameters change:
    the cached graph belongs to the parameter values at construction.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn):
        if len(batches) == 0:
            raise ValueError("need at least one batch")
        self.model, self.batches, self.loss_fn = model, list(batches), loss_fn
        self.params = trainable_parameters(model)
        self._cached: tuple[Vector, int] | None = None
        if len(self.batches) == 1:
            self._cached = self._grads_with_graph(self.batches[0])

    def _grads_with_graph(self, batch: Batch) -> tuple[Vector, int]:
        inputs, labels = batch
        with evaluation_mode(self.model):
            summed, count = self.loss_fn(self.model(inputs), labels)[:2]
        grads = torch.autograd.grad(summed, self.params, create_graph=True,
                                    materialize_grads=True)  # unused parameters: zeros
        return list(grads), int(count)

    def _summed_hvp(self, grads: Vector, vector: Vector, retain: bool) -> Vector:
        # A gradient with no graph is constant in the parameters (its Hessian rows are 0).
        pairs = [(g, v) for g, v in zip(grads, vector) if g.requires_grad]
        if not pairs:
            return [torch.zeros_like(p) for p in self.params]
        outputs, grad_outputs = zip(*pairs)
        return list(torch.autograd.grad(outputs, self.params, grad_outputs=grad_outputs,
                                        retain_graph=retain, materialize_grads=True))

    def __call__(self, vector: Vector) -> Vector:
        if self._cached is not None:
            grads, total = self._cached
            product = self._summed_hvp(grads, vector, retain=True)
        else:
            product, total = [torch.zeros_like(p) for p in self.params], 0
            for batch in self.batches:
                grads, count = self._grads_with_graph(batch)
                for acc, hv in zip(product, self._summed_hvp(grads, vector, retain=False)):
                    acc.add_(hv)
                total += count
        return [hv.detach() / total for hv in product]


@dataclass
class EigenResult:
    """Top eigenvalue (largest in magnitude; loss units per parameter unit^2), its unit
    eigenvector (one tensor per parameter), iterations run, and whether tol was met."""

    eigenvalue: float
    eigenvector: Vector
    iterations: int
    converged: bool


@dataclass
class TraceResult:
    """Hutchinson trace estimate: `mean` of the samples v^T H v (Rademacher v)."""

    mean: float
    samples: list[float]


def _generator(like: Vector, seed: int) -> torch.Generator:
    return torch.Generator(device=like[0].device).manual_seed(seed)


def top_eigenvalue(operator: HessianOperator, *, max_iter: int = 100, tol: float = 1e-3,
                   seed: int = 0) -> EigenResult:
    """Power iteration: v <- Hv/||Hv||, lambda = v^T H v, until the relative change of
    lambda is below `tol` or `max_iter` products. Unlike PyHessian, which returns the
    previous estimate on convergence, this returns the latest (closer) one."""
    gen = _generator(operator.params, seed)
    v = _normalized([torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
                     for p in operator.params])
    eigenvalue = None
    for iteration in range(1, max_iter + 1):
        hv = operator(v)
        # Rayleigh quotient: v is unit only up to PyHessian's +1e-6 in the normalisation.
        new = float(_dot(v, hv) / _dot(v, v))
        v = _normalized(hv)
        if eigenvalue is not None and abs(new - eigenvalue) / (abs(eigenvalue) + 1e-6) < tol:
            return EigenResult(new, v, iteration, converged=True)
        eigenvalue = new
    return EigenResult(eigenvalue, v, max_iter, converged=False)


def hutchinson_trace(operator: HessianOperator, *, max_iter: int = 100, tol: float = 1e-3,
                     seed: int = 0) -> TraceResult:
    """Hutchinson: tr(H) = E[v^T H v] for Rademacher v (entries +-1, not normalised).

    Stops, as PyHessian does, once the running mean changes by a relative amount
    below `tol`; pass tol=0 to always draw `max_iter` samples.
    """
    gen = _generator(operator.params, seed)
    samples: list[float] = []
    running = 0.0
    for _ in range(max_iter):
        v = [torch.randint(0, 2, p.shape, generator=gen, device=p.device).to(p.dtype) * 2 - 1
             for p in operator.params]
        samples.append(float(_dot(v, operator(v))))
        mean = sum(samples) / len(samples)
        if abs(mean - running) / (abs(running) + 1e-6) < tol:
            break
        running = mean
    return TraceResult(mean=sum(samples) / len(samples), samples=samples)
