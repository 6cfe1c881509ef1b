"""ImageNet models from torchvision (randomly initialised, `weights=None`), with every
batch norm turned into ghost batch norm when a ghost batch size is given."""
from __future__ import annotations

from torch import nn

from trainers.models.ghost_bn import convert_to_ghost_batch_norm


def vgg11(num_classes: int = 1000, *, batch_norm: bool = True,
          ghost_batch_size: int | None = None) -> nn.Module:
    """VGG-11 (Simonyan & Zisserman configuration A): 8 conv3x3 layers (64, M, 128, M,
    256, 256, M, 512, 512, M, 512, 512, M), adaptive average pool to 7x7, then
    FC 4096, ReLU, Dropout, FC 4096, ReLU, Dropout, FC classes. `batch_norm=True` is
    torchvision's `vgg11_bn` (BN after every conv; 132.9M parameters), which is what
    ghost batch norm applies to; `batch_norm=False` is plain `vgg11`."""
    from torchvision import models

    if not batch_norm:
        return models.vgg11(weights=None, num_classes=num_classes)
    model = models.vgg11_bn(weights=None, num_classes=num_classes)
    return convert_to_ghost_batch_norm(model, ghost_batch_size)


def resnet50(num_classes: int = 1000, *, ghost_batch_size: int | None = None) -> nn.Module:
    """torchvision's ResNet-50 (v1.5: stride 2 in the 3x3 conv of each downsampling
    bottleneck): stem conv7x7/2 + max-pool, 3-4-6-3 bottleneck blocks (256, 512, 1024,
    2048 output channels), global average pool, FC classes. 25.6M parameters."""
    from torchvision import models

    model = models.resnet50(weights=None, num_classes=num_classes)
    return convert_to_ghost_batch_norm(model, ghost_batch_size)
