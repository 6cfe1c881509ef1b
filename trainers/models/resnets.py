"""Residual networks for 32x32 inputs: He et al.'s CIFAR ResNets (ResNet-8/20/44) and
Zagoruyko & Komodakis's Wide ResNets (WRN-16-4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.models.ghost_bn import batch_norm_2d


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convs, as He et al.; BN starts as the identity."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class _PadShortcut(nn.Module):
    """He et al.'s option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]  # (B, C, H/2, W/2)
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))  # (B, 2C, H/2, W/2)


class BasicBlock(nn.Module):
    """Post-activation block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 ghost_batch_size: int | None, shortcut: str):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = batch_norm_2d(out_channels, ghost_batch_size)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = batch_norm_2d(out_channels, ghost_batch_size)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = (_PadShortcut(out_channels - in_channels) if shortcut == "A" else
                             nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                           batch_norm_2d(out_channels, ghost_batch_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016, section 4.2) CIFAR ResNet of depth 6n+2: conv3x3 16, BN, ReLU;
    three stages of n basic blocks with 16, 32, 64 filters (the 2nd and 3rd start with
    stride 2); global average pooling; Linear 64 -> classes.

    depth 8 (n=1) is Shallue's ResNet-8 (75k parameters), 20 gives 0.27M, 44 gives 0.66M
    (Hoffer's default). `shortcut="A"` (He et al.'s CIFAR choice, parameter-free
    zero-padding) or "B" (1x1 conv + BN projections, as torchvision-style code and
    Hoffer's reference implementation use).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, ghost_batch_size: int | None = None,
                 shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(_conv3x3(3, 16), batch_norm_2d(16, ghost_batch_size), nn.ReLU())
        layers, width = [], 16
        for stage, out_width in enumerate((16, 32, 64)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(width, out_width, stride, ghost_batch_size, shortcut))
                width = out_width
        self.stages = nn.Sequential(*layers)  # (B, 16, 32, 32) -> (B, 64, 8, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class WideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the
    shortcut (identity, or a 1x1 conv on the activated input when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int,
                 ghost_batch_size: int | None, dropout: float):
        super().__init__()
        self.bn1 = batch_norm_2d(in_channels, ghost_batch_size)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = batch_norm_2d(out_channels, ghost_batch_size)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        shortcut = x if self.projection is None else self.projection(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """Zagoruyko & Komodakis (2016) WRN-d-k: conv3x3 16; three stages of (d-4)/6
    pre-activation blocks with 16k, 32k, 64k filters (strides 1, 2, 2); BN, ReLU, global
    average pooling, Linear -> classes. WRN-16-4 (Smith et al.'s and Hoffer et al.'s CIFAR
    model): 2 blocks a stage, widths 64/128/256, about 2.75M parameters. Dropout between the
    convs of a block is 0 by default (the paper's 0.3 is an option).
    """

    def __init__(self, depth: int = 16, widen_factor: int = 4, num_classes: int = 10,
                 dropout: float = 0.0, ghost_batch_size: int | None = None):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = _conv3x3(3, 16)  # (B, 16, 32, 32)
        layers, width = [], 16
        for stage, out_width in enumerate(widths):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(WideBlock(width, out_width, stride, ghost_batch_size, dropout))
                width = out_width
        self.stages = nn.Sequential(*layers)  # (B, 16, 32, 32) -> (B, 64k, 8, 8)
        self.head = nn.Sequential(batch_norm_2d(width, ghost_batch_size), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
