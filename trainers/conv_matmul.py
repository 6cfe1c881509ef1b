"""Convolutions as one matrix product each, for K trials stacked under vmap.

Under `torch.func.vmap` a convolution whose input and weight both carry the trial axis
becomes one grouped convolution (groups = K). At small batches that is slow on CUDA: on
an H200, MNIST's simple CNN at B = 16 spent about 1.5 ms per step of 8 trials in its
grouped convolutions, roughly 50x its arithmetic at the card's matrix rate, and CUDA
graphs did not change it (bench/README.md).

`MatmulConv2d` computes the same convolution as a gather of the kernel's taps (im2col,
written as strided slices, so its backward is a sum of shifted slices, with no atomic
scatter) and a single matrix product: (N * H_out * W_out, C * kh * kw) @ (C * kh * kw, O).
Under vmap that product is one batched GEMM over the K trials. The taps are gathered from
a channels-last view, so the product's rows are already in the weight's (C, kh, kw)
order and its output is a channels-last view of the (N, O, H_out, W_out) result.

The gathered taps hold kh * kw times the input's activations (25x for a 5x5 kernel), saved
for the backward pass: the trainer uses this only for small batches
(`trainers.vectorized._CONV_MATMUL_MAX_BATCH`). `with_matmul_convs` swaps it into a copy
of a model; parameter and buffer names do not change, so `functional_call` with the
original model's state works on the copy.
"""
from __future__ import annotations

import copy

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Im2col = Literal["slices", "unfold"]


def conv2d_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                     dilation: tuple[int, int] = (1, 1), im2col: Im2col = "slices") -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding, dilation)` (groups = 1, zero padding)
    for x (N, C, H, W) and weight (O, C, kh, kw), as one matrix product. `im2col` gathers
    the taps with strided slices ("slices") or with `F.unfold` ("unfold": torch's im2col
    kernel, whose backward is col2im)."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    out_channels, in_channels, kh, kw = weight.shape
    n, _, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if im2col == "unfold":
        cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # (N, C * kh * kw, oh * ow)
        cols = cols.transpose(1, 2).reshape(n * oh * ow, in_channels * kh * kw)
    elif im2col == "slices":
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view where x is channels-last already
        if ph or pw:
            x = F.pad(x, (0, 0, pw, pw, ph, ph))
        taps = [x[:, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
                for i in range(kh) for j in range(kw)]  # kh * kw of (N, oh, ow, C)
        cols = torch.stack(taps, dim=-1).reshape(n * oh * ow, in_channels * kh * kw)  # (c, i, j) order
    else:
        raise ValueError(f"im2col must be 'slices' or 'unfold', got {im2col!r}")
    out = cols @ weight.reshape(out_channels, -1).t()  # (N * oh * ow, O)
    if bias is not None:
        out = out + bias
    return out.view(n, oh, ow, out_channels).permute(0, 3, 1, 2)  # (N, O, oh, ow), channels-last


class MatmulConv2d(nn.Conv2d):
    """An `nn.Conv2d` (groups = 1, zero padding, numeric padding) that computes its
    convolution with `conv2d_as_matmul`: same parameters, same result."""

    im2col: Im2col = "slices"

    def _conv_forward(self, input, weight, bias):  # noqa: A002 (nn.Conv2d's signature)
        return conv2d_as_matmul(input, weight, bias, self.stride, self.padding, self.dilation,
                                self.im2col)


def convertible(module: nn.Module) -> bool:
    """Whether `module` is a convolution `MatmulConv2d` computes."""
    return (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def with_matmul_convs(model: nn.Module, im2col: Im2col = "slices") -> nn.Module:
    """A copy of `model` whose convertible `nn.Conv2d` layers are `MatmulConv2d` (the
    others unchanged). The copy shares nothing with `model`."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if convertible(module):
            module.__class__ = MatmulConv2d  # a subclass adding no state: same attributes
            module.im2col = im2col
    return model


def has_convertible_convs(model: nn.Module) -> bool:
    return any(convertible(m) for m in model.modules())
