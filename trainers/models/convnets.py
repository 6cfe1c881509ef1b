"""The small models of the papers: Shallue's Simple CNN, Keskar's F1 and C1.

Inputs are (B, C, H, W) float batches; outputs are (B, num_classes) logits.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from trainers.models.ghost_bn import batch_norm_1d, batch_norm_2d


class SimpleCNN(nn.Module):
    """Shallue et al.'s "Simple CNN" for MNIST and Fashion-MNIST (the TensorFlow tutorial
    network): two conv layers (5x5, stride 1, 'same' padding, ReLU), each followed by 2x2
    max-pooling with stride 2, then one fully connected hidden layer with ReLU, then the
    linear output. Base widths 32 and 64 filters, 1024 hidden units (Shallue also vary
    them, hence the arguments); no batch norm, no dropout. 3,274,634 parameters at the
    base widths on 28x28x1 inputs.

    Each block pools before it adds the convolution's bias and applies its ReLU, so that
    these two and their backward passes touch a quarter of the elements (at B = 16,384
    the first block's activation is 822 MB in bf16, and cuDNN adds a bias in a pass of its
    own). That is exactly conv -> + bias -> ReLU -> pool: max-pooling commutes with ReLU
    (both take maxima, ties included) and with adding a per-channel constant (rounding is
    monotone). The outputs are bit for bit those of that order with the bias added after
    the convolution has rounded, as cuDNN adds it (a CPU convolution that accumulates its
    bias rounds once less), and so are the gradients, except where rounding `x + bias`
    tied two values of a window: the gradient then goes to the larger `x`, the window's
    maximum in exact arithmetic.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 channels: tuple[int, int] = (32, 64), hidden: int = 1024):
        super().__init__()
        first, second = channels
        conv1 = _BiasAfterPoolConv2d(in_channels, first, 5, padding=2)  # (B, 32, 28, 28)
        conv2 = _BiasAfterPoolConv2d(first, second, 5, padding=2)  # (B, 64, 14, 14)
        self.features = nn.Sequential(
            conv1, nn.MaxPool2d(2, 2), _BiasReLU(conv1),  # (B, 32, 14, 14)
            conv2, nn.MaxPool2d(2, 2), _BiasReLU(conv2),  # (B, 64, 7, 7)
        )
        pooled = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 3136)
            nn.Linear(second * pooled * pooled, hidden), nn.ReLU(),  # (B, 1024)
            nn.Linear(hidden, num_classes),  # (B, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BiasAfterPoolConv2d(nn.Conv2d):
    """A convolution that leaves its bias to the `_BiasReLU` after its pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


class _BiasReLU(nn.Module):
    """ReLU(x + the bias of `conv`, per channel). The conv is not a submodule: its bias
    stays its own parameter, under its own state-dict key, and is read at each call (so
    `torch.func.functional_call`'s substitutes are used)."""

    def __init__(self, conv: _BiasAfterPoolConv2d):
        super().__init__()
        self._conv = (conv,)  # a tuple: not registered as a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._conv[0].bias.to(x.dtype)  # bf16 under autocast, as inside a convolution
        return torch.relu(x + bias[:, None, None])


class KeskarF1(nn.Module):
    """Keskar et al.'s F1 (also Hoffer et al.'s `mnist_f1`): 784 -> 5 x [Linear 512,
    BatchNorm1d, ReLU] -> Linear 10. 1,462,794 parameters."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, width: int = 512,
                 depth: int = 5, ghost_batch_size: int | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]  # (B, 1, 28, 28) -> (B, 784)
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width),
                       batch_norm_1d(width, ghost_batch_size), nn.ReLU()]  # (B, 512)
        layers.append(nn.Linear(width, num_classes))  # (B, 10)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class KeskarC1(nn.Module):
    """Keskar et al.'s C1 ("shallow" AlexNet-like CIFAR network), as Hoffer et al.'s
    `cifar10_shallow` implements it (C3 is the same with 100 outputs):

        2 x [Conv 5x5 64 (pad 2, no bias), MaxPool 3x3 stride 2, BatchNorm2d, ReLU]
        -> Linear 3136 -> 384 (no bias), BatchNorm1d, ReLU, Dropout 0.5
        -> Linear 384 -> 192 (no bias), BatchNorm1d, ReLU, Dropout 0.5
        -> Linear 192 -> classes

    On 32x32 inputs the pools give 15x15 then 7x7 maps (no pool padding), so the flattened
    size is 64 * 7 * 7 = 3136. Keskar's Keras version pads its pools ('same') instead;
    this follows Hoffer's because ghost-BN results were reported on it.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5,
                 ghost_batch_size: int | None = None):
        super().__init__()
        gbs = ghost_batch_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, padding=2, bias=False),  # (B, 64, 32, 32)
            nn.MaxPool2d(3, 2), batch_norm_2d(64, gbs), nn.ReLU(),  # (B, 64, 15, 15)
            nn.Conv2d(64, 64, 5, padding=2, bias=False),  # (B, 64, 15, 15)
            nn.MaxPool2d(3, 2), batch_norm_2d(64, gbs), nn.ReLU(),  # (B, 64, 7, 7)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 3136)
            nn.Linear(64 * 7 * 7, 384, bias=False), batch_norm_1d(384, gbs), nn.ReLU(),
            nn.Dropout(dropout),  # (B, 384)
            nn.Linear(384, 192, bias=False), batch_norm_1d(192, gbs), nn.ReLU(),
            nn.Dropout(dropout),  # (B, 192)
            nn.Linear(192, num_classes),  # (B, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
