"""Workloads of the four papers (Shallue et al., Smith et al., Hoffer et al., Keskar et al.).

`paper_workloads()` returns them as `Workload`s, built fresh on every call (no module
state); the registry in `trainers.workloads` merges them, and a duplicate name there is an
error. Targets: Shallue et al.'s Figure-1 goals where they define one (mnist/fashion simple
CNN, cifar10 ResNet-8, ImageNet ResNet-50 / VGG-11); elsewhere a validation error a
well-tuned run reaches with room to spare (the papers' reported errors plus a margin).

Normalisation: `Workload` takes one mean and std for all channels, so colour datasets use
the whole-dataset pixel mean and std (the per-channel values are kept below for when the
contract takes per-channel constants).

ImageNet: the in-memory path (`imagenet64_*`) decodes images pre-resized to
`IMAGENET_RESOLUTION` pixels; Shallue's goals (0.25 / 0.35 validation error) were set at
224 pixels, which the full-size workloads reach through the DataLoader path
(`imagenet_folder_data`, one trial at a time).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.augment import crop_and_flip
from trainers.config import Target
from trainers.data.errors import DataError

if TYPE_CHECKING:  # only for annotations: trainers.workloads may import this module
    from torch import nn

    from trainers.data.imagenet import FolderSplits
    from trainers.data.splits import ArraySplits
    from trainers.workloads import DataOptions, ModelOptions, Workload

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
# The usual per-channel pixel means and stds.
CIFAR10_CHANNEL_MEAN, CIFAR10_CHANNEL_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_CHANNEL_MEAN, CIFAR100_CHANNEL_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_CHANNEL_MEAN, IMAGENET_CHANNEL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_RESOLUTION = 64

# Standard pad-4 crop + flip for 32x32 (zero padding after normalisation = mean colour).
CIFAR_AUGMENT = partial(crop_and_flip, padding=4, mode="constant")
IMAGENET_AUGMENT = partial(crop_and_flip, padding=IMAGENET_RESOLUTION // 8, mode="constant")


def _data_dir(options: DataOptions) -> Path:
    if not options.data_dir:
        raise DataError("this workload reads files from disk: set data_dir in the campaign")
    # A relative data_dir means the worker's working directory; errors then show which.
    return Path(options.data_dir).absolute()


# --- data -------------------------------------------------------------------------------

def _common(options: DataOptions) -> dict:
    """Keyword arguments every loader takes; the validation size only when overridden."""
    extra = {"val_size": options.val_size} if options.val_size else {}
    return {"split_seed": options.split_seed, "download": options.download, **extra}


def mnist_data(options: DataOptions) -> ArraySplits:
    from trainers.data.mnist import load_mnist_splits
    return load_mnist_splits(_data_dir(options), **_common(options))


def mnist_t10k_data(options: DataOptions) -> ArraySplits:
    from trainers.data.mnist import load_mnist_t10k_splits
    return load_mnist_t10k_splits(_data_dir(options), **_common(options))


def fashion_mnist_data(options: DataOptions) -> ArraySplits:
    from trainers.data.fashion_mnist import load_fashion_mnist_splits
    return load_fashion_mnist_splits(_data_dir(options), **_common(options))


def cifar10_data(options: DataOptions) -> ArraySplits:
    from trainers.data.cifar import load_cifar10_splits
    return load_cifar10_splits(_data_dir(options), **_common(options))


def cifar100_data(options: DataOptions) -> ArraySplits:
    from trainers.data.cifar import load_cifar100_splits
    return load_cifar100_splits(_data_dir(options), **_common(options))


def imagenet_data(options: DataOptions) -> ArraySplits:
    from trainers.data.imagenet import load_imagenet_splits
    return load_imagenet_splits(_data_dir(options), resolution=IMAGENET_RESOLUTION, **_common(options))


def imagenet_folder_data(options: DataOptions, image_size: int = 224) -> FolderSplits:
    """The DataLoader path for the ImageNet workloads (uint8 items, same validation carve)."""
    from trainers.data.imagenet import imagenet_folder_datasets
    if options.download:
        from trainers.data.download import download_imagenet
        download_imagenet(_data_dir(options))  # explains that ImageNet is fetched by hand
    extra = {"val_size": options.val_size} if options.val_size else {}
    return imagenet_folder_datasets(_data_dir(options), image_size=image_size,
                                    split_seed=options.split_seed, **extra)


# --- models -----------------------------------------------------------------------------

def simple_cnn(options: ModelOptions) -> nn.Module:
    from trainers.models.convnets import SimpleCNN
    return SimpleCNN()


def keskar_f1(options: ModelOptions) -> nn.Module:
    from trainers.models.convnets import KeskarF1
    return KeskarF1(ghost_batch_size=options.ghost_batch_size)


def keskar_c1(options: ModelOptions, num_classes: int = 10) -> nn.Module:
    from trainers.models.convnets import KeskarC1
    return KeskarC1(num_classes, ghost_batch_size=options.ghost_batch_size)


def cifar_resnet(options: ModelOptions, depth: int) -> nn.Module:
    from trainers.models.resnets import CifarResNet
    return CifarResNet(depth, 10, ghost_batch_size=options.ghost_batch_size)


def wrn16_4(options: ModelOptions, num_classes: int) -> nn.Module:
    from trainers.models.resnets import WideResNet
    return WideResNet(16, 4, num_classes, ghost_batch_size=options.ghost_batch_size)


def resnet50(options: ModelOptions) -> nn.Module:
    from trainers.models import torchvision_models
    return torchvision_models.resnet50(1000, ghost_batch_size=options.ghost_batch_size)


def vgg11(options: ModelOptions) -> nn.Module:
    from trainers.models import torchvision_models
    return torchvision_models.vgg11(1000, ghost_batch_size=options.ghost_batch_size)


# --- entries ----------------------------------------------------------------------------

def _entry(name: str, description: str, load, build, mean, std, threshold: float,
           max_steps: int, augment=None) -> Workload:
    from trainers.workloads import Workload
    return Workload(name=name, description=description, load_data=load, build_model=build,
                    mean=mean, std=std, scale=255.0, default_target=Target("val_error", threshold),
                    default_max_steps=max_steps, augment=augment)


def _mnist_like() -> list[Workload]:
    mnist = "MNIST (55,000 train / 5,000 val / 10,000 test)"
    return [
        _entry("mnist_simple_cnn", f"{mnist}, Shallue's Simple CNN (conv 32, conv 64, FC 1024)",
               mnist_data, simple_cnn, MNIST_MEAN, MNIST_STD, 0.01, 20000),
        _entry("mnist10k_simple_cnn", "MNIST official test files only (8,000 train / 2,000 val), "
               "Shallue's Simple CNN", mnist_t10k_data, simple_cnn, MNIST_MEAN, MNIST_STD, 0.03, 5000),
        _entry("fashion_mnist_simple_cnn", "Fashion-MNIST (55,000 train / 5,000 val / 10,000 test), "
               "Shallue's Simple CNN", fashion_mnist_data, simple_cnn,
               FASHION_MNIST_MEAN, FASHION_MNIST_STD, 0.1, 30000),
        _entry("mnist_f1", f"{mnist}, Keskar's F1: 784 -> 5 x [512, BN, ReLU] -> 10",
               mnist_data, keskar_f1, MNIST_MEAN, MNIST_STD, 0.02, 20000),
        _entry("mnist10k_f1", "MNIST official test files only (8,000 train / 2,000 val), Keskar's F1",
               mnist_t10k_data, keskar_f1, MNIST_MEAN, MNIST_STD, 0.05, 5000),
    ]


def _cifar_workloads() -> list[Workload]:
    c10 = "CIFAR-10 (45,000 train / 5,000 val / 10,000 test, pad-4 crop + flip)"
    c100 = "CIFAR-100 (45,000 train / 5,000 val / 10,000 test, pad-4 crop + flip)"
    c10_norm = (CIFAR10_CHANNEL_MEAN, CIFAR10_CHANNEL_STD)
    c100_norm = (CIFAR100_CHANNEL_MEAN, CIFAR100_CHANNEL_STD)
    return [
        _entry("cifar10_c1", f"{c10}, Keskar's C1 shallow convnet", cifar10_data, keskar_c1,
               *c10_norm, 0.2, 50000, CIFAR_AUGMENT),
        _entry("cifar10_resnet8", f"{c10}, ResNet-8 (Shallue)", cifar10_data,
               partial(cifar_resnet, depth=8), *c10_norm, 0.3, 50000, CIFAR_AUGMENT),
        _entry("cifar10_resnet20", f"{c10}, ResNet-20 (He et al.)", cifar10_data,
               partial(cifar_resnet, depth=20), *c10_norm, 0.1, 64000, CIFAR_AUGMENT),
        _entry("cifar10_resnet44", f"{c10}, ResNet-44 (He et al.; Hoffer's default)", cifar10_data,
               partial(cifar_resnet, depth=44), *c10_norm, 0.08, 64000, CIFAR_AUGMENT),
        _entry("cifar10_wrn16_4", f"{c10}, Wide ResNet 16-4 (Smith et al.)", cifar10_data,
               partial(wrn16_4, num_classes=10), *c10_norm, 0.06, 80000, CIFAR_AUGMENT),
        _entry("cifar100_wrn16_4", f"{c100}, Wide ResNet 16-4 (Hoffer et al.)", cifar100_data,
               partial(wrn16_4, num_classes=100), *c100_norm, 0.3, 80000, CIFAR_AUGMENT),
    ]


def _imagenet_workloads() -> list[Workload]:
    from trainers.workloads import Workload
    small = (f"ImageNet pre-resized to {IMAGENET_RESOLUTION}px in memory (train minus 10,000 "
             f"carved val / official val as test, crop + flip on the device)")
    full = ("ImageNet at 224px through a DataLoader (random-resized crop + flip in worker "
            "processes; train minus 10,000 carved val / official val as test)")
    norm = (IMAGENET_CHANNEL_MEAN, IMAGENET_CHANNEL_STD)
    # At 64 px the published 224-px targets are out of reach; these are looser defaults.
    low_res = [
        _entry("imagenet64_resnet50", f"{small}, torchvision ResNet-50", imagenet_data, resnet50,
               *norm, 0.5, 150000, IMAGENET_AUGMENT),
        _entry("imagenet64_vgg11", f"{small}, torchvision VGG-11 with BN", imagenet_data, vgg11,
               *norm, 0.55, 150000, IMAGENET_AUGMENT)]
    full_size = [
        Workload(name=name, description=f"{full}, {model}", load_data=_no_in_memory_imagenet,
                 load_folders=imagenet_folder_data, build_model=build, mean=norm[0], std=norm[1],
                 scale=255.0, default_target=Target("val_error", threshold),
                 default_max_steps=600000)
        for name, model, build, threshold in (
            ("imagenet_resnet50", "torchvision ResNet-50 (Shallue's target 0.25)", resnet50, 0.25),
            ("imagenet_vgg11", "torchvision VGG-11 with BN (Shallue's target 0.35)", vgg11, 0.35))]
    return low_res + full_size


def _no_in_memory_imagenet(options: DataOptions) -> ArraySplits:
    raise DataError("full-size ImageNet streams through a DataLoader; use imagenet64_* for the "
                    "in-memory path")


def paper_workloads() -> list[Workload]:
    """The papers' workloads; names are unique (checked here, and again on registration)."""
    workloads = _mnist_like() + _cifar_workloads() + _imagenet_workloads()
    names = [w.name for w in workloads]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate workload names: {duplicates}")
    return workloads
