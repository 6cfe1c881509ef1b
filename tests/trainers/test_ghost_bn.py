"""Ghost batch norm against exact oracles: nn.BatchNorm applied chunk by chunk (float64)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.models.ghost_bn import (GhostBatchNorm1d, GhostBatchNorm2d, batch_norm_2d,
                                      convert_to_ghost_batch_norm)

ATOL = 1e-12


def _pair(dims: int, channels: int, ghost: int, momentum: float | None = 0.1):
    """A ghost layer and a plain BN with identical random affine parameters (float64)."""
    ghost_cls, plain_cls = ((GhostBatchNorm1d, nn.BatchNorm1d) if dims == 1 else
                            (GhostBatchNorm2d, nn.BatchNorm2d))
    layer = ghost_cls(channels, momentum=momentum, ghost_batch_size=ghost).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        layer.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        layer.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
    plain = plain_cls(channels, momentum=momentum).double()
    plain.load_state_dict(layer.state_dict())
    return layer, plain


def _input(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 3 + 1


@pytest.mark.parametrize("dims,shape", [(1, (8, 5)), (2, (8, 3, 4, 4)), (1, (8, 5, 3))])
def test_ghost_size_equal_to_batch_is_plain_batch_norm(dims, shape):
    layer, plain = _pair(dims, shape[1], ghost=shape[0])
    x = _input(shape)
    torch.testing.assert_close(layer(x), plain(x), atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_mean, plain.running_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_var, plain.running_var, atol=ATOL, rtol=0)
    assert int(layer.num_batches_tracked) == int(plain.num_batches_tracked) == 1


@pytest.mark.parametrize("dims,shape,ghost", [
    (2, (12, 3, 4, 4), 4),   # k = 3 equal ghost batches
    (2, (10, 3, 4, 4), 4),   # 4 + 4 + 2: the last ghost batch is smaller
    (1, (12, 6), 3),         # 1d, k = 4
    (1, (11, 6), 4),         # 1d, 4 + 4 + 3
])
def test_training_output_and_running_stats_equal_per_chunk_batch_norm(dims, shape, ghost):
    layer, plain = _pair(dims, shape[1], ghost)
    x = _input(shape)
    expected = torch.cat([plain(chunk) for chunk in x.split(ghost)])  # k sequential BN updates
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_mean, plain.running_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_var, plain.running_var, atol=ATOL, rtol=0)
    assert int(layer.num_batches_tracked) == int(plain.num_batches_tracked) == len(x.split(ghost))


@pytest.mark.parametrize("dims,shape,ghost,sizes", [
    (1, (129, 4), 128, [129]),        # B = G + 1: one ghost batch of 129, not 128 + 1
    (1, (9, 5), 4, [4, 5]),           # 4 + 4 + 1 -> 4 + 5
    (2, (9, 3, 1, 1), 4, [4, 5]),     # 2d with one value per channel per example
    (2, (13, 3, 2, 2), 4, [4, 4, 5]),  # 2d too: every layer of a model splits alike
    (1, (10, 5), 4, [4, 4, 2]),       # a remainder of two stays its own ghost batch
])
def test_a_last_ghost_batch_of_one_example_joins_the_previous_one(dims, shape, ghost, sizes):
    """One example has no batch variance (nn.BatchNorm1d raises on it in training): it is
    normalized with the ghost batch before it, and the running statistics get one update
    per ghost batch actually used."""
    layer, plain = _pair(dims, shape[1], ghost)
    x = _input(shape)
    expected = torch.cat([plain(chunk) for chunk in x.split(sizes)])
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_mean, plain.running_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_var, plain.running_var, atol=ATOL, rtol=0)
    assert int(layer.num_batches_tracked) == len(sizes)


def test_running_stats_follow_the_closed_form_of_k_momentum_updates():
    momentum, ghost = 0.3, 2
    layer, _ = _pair(2, 3, ghost, momentum=momentum)
    start_mean, start_var = layer.running_mean.clone(), layer.running_var.clone()
    x = _input((6, 3, 2, 2))
    layer(x)
    chunks = x.split(ghost)
    means = [c.mean(dim=(0, 2, 3)) for c in chunks]
    variances = [c.var(dim=(0, 2, 3), unbiased=True) for c in chunks]  # BN tracks unbiased var
    expected_mean, expected_var = start_mean, start_var
    for mean, var in zip(means, variances):
        expected_mean = (1 - momentum) * expected_mean + momentum * mean
        expected_var = (1 - momentum) * expected_var + momentum * var
    torch.testing.assert_close(layer.running_mean, expected_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_var, expected_var, atol=ATOL, rtol=0)


def test_cumulative_average_momentum_none_counts_each_ghost_batch():
    layer, plain = _pair(2, 3, ghost=2, momentum=None)
    for seed in range(2):  # two steps: the 1/n factors continue across calls
        x = _input((6, 3, 2, 2), seed)
        torch.testing.assert_close(layer(x), torch.cat([plain(c) for c in x.split(2)]), atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_mean, plain.running_mean, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.running_var, plain.running_var, atol=ATOL, rtol=0)
    assert int(layer.num_batches_tracked) == 6


def test_eval_uses_running_stats_over_the_whole_batch():
    layer, plain = _pair(2, 3, ghost=2)
    layer.eval()
    plain.eval()
    x = _input((8, 3, 4, 4))
    torch.testing.assert_close(layer(x), plain(x), atol=ATOL, rtol=0)
    assert int(layer.num_batches_tracked) == 0  # evaluation leaves the statistics alone


def test_gradients_equal_those_of_per_chunk_batch_norm():
    layer, plain = _pair(2, 3, ghost=4)
    x = _input((12, 3, 3, 3)).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    weights = _input((12, 3, 3, 3), seed=5)  # a non-trivial loss so gradients are not zero
    (layer(x) * weights).sum().backward()
    (torch.cat([plain(c) for c in x_plain.split(4)]) * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.bias.grad, plain.bias.grad, atol=1e-10, rtol=0)
    assert x.grad.abs().sum() > 0


def test_ghost_batches_differ_from_full_batch_norm():
    """The point of the layer: with k > 1 the output is not plain BN over the batch."""
    layer, plain = _pair(2, 3, ghost=2)
    x = _input((8, 3, 2, 2))
    assert (layer(x) - plain(x)).abs().max() > 1e-3


def test_drop_in_state_dict_and_isinstance():
    layer = batch_norm_2d(7, ghost_batch_size=16)
    assert isinstance(layer, nn.BatchNorm2d) and layer.ghost_batch_size == 16
    assert set(layer.state_dict()) == set(nn.BatchNorm2d(7).state_dict())
    assert type(batch_norm_2d(7, None)) is nn.BatchNorm2d
    with pytest.raises(ValueError):
        GhostBatchNorm2d(3, ghost_batch_size=0)


def test_convert_replaces_every_batch_norm_and_keeps_its_state():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 4),
                          nn.Sequential(nn.BatchNorm1d(4)))
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[4][0].weight.fill_(2.0)
    converted = convert_to_ghost_batch_norm(model, 2)
    assert type(converted[1]) is GhostBatchNorm2d and type(converted[4][0]) is GhostBatchNorm1d
    assert converted[1].running_mean.tolist() == [3.0, 3.0]
    assert converted[4][0].weight.tolist() == [2.0] * 4
    assert convert_to_ghost_batch_norm(nn.BatchNorm2d(2), None).__class__ is nn.BatchNorm2d
