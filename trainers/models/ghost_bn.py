"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017, Algorithm 1).

In training mode a batch of B examples is split into consecutive ghost batches of
`ghost_batch_size` examples (the last one smaller when B is not a multiple); each ghost
batch is normalized with its own mean and variance, and the running statistics receive
one ordinary momentum update per ghost batch, in order. A last ghost batch of a single
example has no variance to normalize with (nn.BatchNorm1d refuses it): it joins the
one before, which then holds G + 1 examples (B = 129, G = 128: one ghost batch of 129,
one update). The split depends only on B and G, so every layer of a model, 1d or 2d,
uses the same ghost batches. Evaluation (or a batch no larger
than one ghost batch) behaves exactly like `nn.BatchNorm1d/2d`, so a model trained with
ghost batches evaluates like any batch-norm model.

Why: the normalization noise (and so the regularization) then depends on the ghost size,
not on the batch size, which lets a batch-size study change B without changing BN.

The layers subclass `nn.BatchNorm1d/2d`: same parameters, buffers and state_dict keys,
and `isinstance(layer, nn.BatchNorm2d)` still holds (weight-decay exclusions keep working).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ghost_batches(batch_size: int, ghost: int) -> list[tuple[int, int, int]]:
    """How a training batch of `batch_size` (> `ghost`) examples splits into ghost batches:
    (first example, ghost batch size, how many) runs of equal ghost batches, in order.
    Whole ghost batches of `ghost`, then the remainder; a remainder of one example is
    merged into the last whole ghost batch (G + 1 examples)."""
    whole, rest = divmod(batch_size, ghost)
    if rest == 1:  # one example alone has no batch statistics
        whole, rest = whole - 1, ghost + 1
    runs = [(0, ghost, whole)] if whole else []
    if rest:
        runs.append((whole * ghost, rest, 1))
    return runs


def normalization_groups(batch_size: int, ghost: int | None) -> set[int]:
    """The sizes of the groups of examples a batch-norm layer computes statistics over in
    a training batch of `batch_size`: the batch itself for plain batch norm (`ghost` None)
    or a batch no larger than one ghost batch, else its ghost batches."""
    if ghost is None or batch_size <= ghost:
        return {batch_size}
    return {size for _, size, _ in ghost_batches(batch_size, ghost)}


class _GhostBatchNorm:
    """Mixin holding the ghost-batch forward; combined with an `nn.BatchNorm*d` class."""

    ghost_batch_size: int | None

    def _set_ghost_batch_size(self, ghost_batch_size: int | None) -> None:
        if ghost_batch_size is not None and ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be a positive integer or None, got {ghost_batch_size}")
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        uses_batch_stats = self.training or not self.track_running_stats
        ghost = self.ghost_batch_size
        if not uses_batch_stats or ghost is None or x.shape[0] <= ghost:
            return super().forward(x)
        return self._ghost_forward(x, ghost)

    def _ghost_forward(self, x: torch.Tensor, ghost: int) -> torch.Tensor:
        pieces = [(x[start:start + size * count], size) for start, size, count in
                  ghost_batches(x.shape[0], ghost)]
        results = [self._normalize_equal_chunks(part, size) for part, size in pieces]
        outputs, means, variances = zip(*results)
        if self.training and self.track_running_stats:
            self._update_running_stats(torch.cat(means), torch.cat(variances))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _normalize_equal_chunks(self, x: torch.Tensor, ghost: int):
        """Normalize k = len(x) / ghost equal chunks in one fused `F.batch_norm` call.

        Chunks are moved into the channel axis, (k*G, C, *S) -> (G, k*C, *S), so the
        fused kernel computes per-(chunk, channel) statistics and its backward is reused.
        Returns the output (k*G, C, *S) and each chunk's mean and unbiased variance (k, C).
        """
        k, channels, spatial = x.shape[0] // ghost, x.shape[1], x.shape[2:]
        grouped = x.reshape(k, ghost, channels, *spatial).transpose(0, 1)  # (G, k, C, *S)
        grouped = grouped.reshape(ghost, k * channels, *spatial)  # (G, k*C, *S)
        weight = self.weight.repeat(k) if self.weight is not None else None
        bias = self.bias.repeat(k) if self.bias is not None else None
        out = F.batch_norm(grouped, None, None, weight, bias, True, 0.0, self.eps)
        out = out.reshape(ghost, k, channels, *spatial).transpose(0, 1)  # (k, G, C, *S)
        out = out.reshape(k * ghost, channels, *spatial)
        with torch.no_grad():
            reduce_dims = [0] + list(range(2, grouped.dim()))
            var, mean = torch.var_mean(grouped.float() if grouped.dtype in (torch.float16, torch.bfloat16)
                                       else grouped, dim=reduce_dims, correction=1)
        return out, mean.reshape(k, channels), var.reshape(k, channels)

    @torch.no_grad()
    def _update_running_stats(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        """Apply len(means) sequential BN updates, one per ghost batch, in order."""
        count = means.shape[0]
        self.num_batches_tracked.add_(count)
        if self.momentum is None:  # cumulative moving average: factor 1/n per update
            start = int(self.num_batches_tracked) - count
            for i in range(count):
                factor = 1.0 / (start + i + 1)
                self.running_mean.lerp_(means[i].to(self.running_mean.dtype), factor)
                self.running_var.lerp_(variances[i].to(self.running_var.dtype), factor)
            return
        # Closed form of k updates r <- (1-m) r + m s_i:
        #   r_k = (1-m)^k r_0 + sum_i m (1-m)^(k-i) s_i   (i = 1..k)
        m = float(self.momentum)
        powers = torch.arange(count - 1, -1, -1, dtype=torch.float64, device=means.device)
        weights = (m * (1.0 - m) ** powers).to(means.dtype)[:, None]  # (k, 1)
        decay = (1.0 - m) ** count
        self.running_mean.mul_(decay).add_((weights * means).sum(0).to(self.running_mean.dtype))
        self.running_var.mul_(decay).add_((weights * variances).sum(0).to(self.running_var.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """Drop-in for `nn.BatchNorm1d` with statistics per ghost batch in training."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, ghost_batch_size: int | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._set_ghost_batch_size(ghost_batch_size)


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """Drop-in for `nn.BatchNorm2d` with statistics per ghost batch in training."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, ghost_batch_size: int | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._set_ghost_batch_size(ghost_batch_size)


def batch_norm_1d(num_features: int, ghost_batch_size: int | None = None) -> nn.BatchNorm1d:
    """Ordinary `nn.BatchNorm1d` when `ghost_batch_size` is None, else the ghost version."""
    if ghost_batch_size is None:
        return nn.BatchNorm1d(num_features)
    return GhostBatchNorm1d(num_features, ghost_batch_size=ghost_batch_size)


def batch_norm_2d(num_features: int, ghost_batch_size: int | None = None) -> nn.BatchNorm2d:
    """Ordinary `nn.BatchNorm2d` when `ghost_batch_size` is None, else the ghost version."""
    if ghost_batch_size is None:
        return nn.BatchNorm2d(num_features)
    return GhostBatchNorm2d(num_features, ghost_batch_size=ghost_batch_size)


_GHOST_CLASS = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}


def _ghost_copy(layer: nn.modules.batchnorm._BatchNorm, ghost_batch_size: int) -> nn.Module:
    ghost_class = _GHOST_CLASS[type(layer)]
    weight = layer.weight if layer.affine else None
    reference = weight if weight is not None else layer.running_mean
    ghost = ghost_class(layer.num_features, layer.eps, layer.momentum, layer.affine,
                        layer.track_running_stats, ghost_batch_size=ghost_batch_size,
                        device=reference.device if reference is not None else None,
                        dtype=reference.dtype if reference is not None else None)
    ghost.load_state_dict(layer.state_dict())
    ghost.train(layer.training)
    return ghost


def convert_to_ghost_batch_norm(module: nn.Module, ghost_batch_size: int | None) -> nn.Module:
    """Replace every plain `nn.BatchNorm1d/2d` in `module` (in place) by its ghost version
    with the same parameters and buffers; returns `module`. None leaves it unchanged."""
    if ghost_batch_size is None:
        return module
    if type(module) in _GHOST_CLASS:
        return _ghost_copy(module, ghost_batch_size)
    for name, child in module.named_children():
        setattr(module, name, convert_to_ghost_batch_norm(child, ghost_batch_size))
    return module
