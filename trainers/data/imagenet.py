"""ImageNet (ILSVRC-2012) from ImageFolder trees of JPEGs: `DATA_DIR/train/<wnid>/*.JPEG`
and `DATA_DIR/val/<wnid>/*.JPEG` (the official validation images sorted into class
folders, as torchvision's `ImageNet` class or the usual valprep script leave them).

Splits: a validation set of `val_size` images (10,000 by default, about 0.8%) is carved
from `train/` with a fixed seed; the official `val/` images (50,000, whose labels are
public, unlike the test set's) are kept as the test split. Class indices are the sorted
folder names, exactly as torchvision's `ImageFolder` assigns them.

Two paths:
- `load_imagenet_splits`: decode into a pre-resized uint8 tensor (N, 3, R, R) (shorter side
  resized to R, then a centred R x R crop) for subsets and small resolutions that fit in
  memory; optional class / image subsets are applied to the file list before decoding.
- `imagenet_folder_datasets`: torchvision `ImageFolder` datasets with the standard
  transforms (train: RandomResizedCrop + horizontal flip; evaluation: resize to 256/224 of
  the size + centre crop) for the DataLoader path. They yield uint8 (3, S, S) tensors;
  normalisation happens on the device (`Workload.preprocess`), so 4x fewer bytes cross
  the host-device link.
"""
from __future__ import annotations

import hashlib
import os

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.data.download import download_imagenet, load_or_download
from trainers.data.errors import DataError
from trainers.data.splits import ArraySplits, carve_validation
from trainers.data.subsets import choose_classes, class_subset_indices, example_subset_indices

IMAGENET_VAL_SIZE = 10_000
IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageList:
    """Image files and their class indices (sorted folder order)."""

    paths: list[Path]
    labels: np.ndarray  # (N,) int64
    classes: list[str]

    def take(self, indices: np.ndarray) -> "ImageList":
        return ImageList([self.paths[i] for i in indices], self.labels[indices], self.classes)


def scan_image_folder(root: Path) -> ImageList:
    """List an ImageFolder tree the way torchvision's `ImageFolder` does."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root.is_dir():
        raise DataError(f"{root}: folder not found; unpack ImageNet there as <class>/<image>.JPEG "
                        f"(ImageNet cannot be downloaded automatically)")
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{root}: no usable class folders ({exc}); expected <class>/<image>.JPEG") from exc
    paths = [Path(p) for p, _ in samples]
    return ImageList(paths, np.array([label for _, label in samples], dtype=np.int64), classes)


def decode_resized(path: Path, resolution: int) -> np.ndarray:
    """One image as uint8 (3, R, R): shorter side resized to R, then a centred crop."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (resolution, resolution))  # JPEG DCT scaling: decode at >= R, fast
            image = image.convert("RGB")
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    except OSError as exc:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
        raise DataError(f"{path}: cannot be decoded ({exc}); delete or replace this image") from exc


def decode_all(images: ImageList, resolution: int, num_workers: int) -> torch.Tensor:
    """All images as one uint8 tensor (N, 3, R, R); decoding runs in threads (PIL releases
    the GIL while decoding)."""
    out = np.empty((len(images.paths), 3, resolution, resolution), dtype=np.uint8)

    def fill(index: int) -> None:
        out[index] = decode_resized(images.paths[index], resolution)

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        list(pool.map(fill, range(len(out))))
    return torch.from_numpy(out)


def _scan_splits(data_dir: Path) -> tuple[ImageList, ImageList]:
    train, test = scan_image_folder(data_dir / "train"), scan_image_folder(data_dir / "val")
    if train.classes != test.classes:
        raise DataError(f"{data_dir / 'val'}: its class folders differ from those of "
                        f"{data_dir / 'train'}; sort the validation images into the same classes")
    return train, test


def _keep_classes(images: ImageList, classes: np.ndarray) -> ImageList:
    keep, labels = class_subset_indices(images.labels, classes)
    names = [images.classes[c] for c in classes]
    return ImageList([images.paths[i] for i in keep], labels, names)


def _subset_lists(train: ImageList, test: ImageList, num_classes: int | None,
                  train_fraction: float, subset_seed: int) -> tuple[ImageList, ImageList]:
    if num_classes is not None:
        classes = choose_classes(len(train.classes), num_classes, seed=subset_seed)
        train, test = _keep_classes(train, classes), _keep_classes(test, classes)
    if train_fraction < 1.0:
        train = train.take(example_subset_indices(train.labels, train_fraction, seed=subset_seed))
    return train, test


def load_imagenet_splits(data_dir: str | Path, *, resolution: int = 64, split_seed: int = 0,
                         val_size: int = IMAGENET_VAL_SIZE, num_classes: int | None = None,
                         train_fraction: float = 1.0, subset_seed: int = 0,
                         num_workers: int = 8, download: bool = False) -> ArraySplits:
    """Pre-resized uint8 (N, 3, R, R) splits: train minus `val_size` carved images,
    validation, and the official val images as test. `num_classes` keeps that many classes
    (drawn with `subset_seed`, labels re-indexed); `train_fraction` keeps a stratified
    fraction of the training images. Memory: N * 3 * R * R bytes (R=64: 12 KiB an image)."""
    scanned = load_or_download(download, data_dir, download_imagenet, lambda: _scan_splits(Path(data_dir)))
    train, test = _subset_lists(*scanned, num_classes, train_fraction, subset_seed)
    index = np.arange(len(train.paths))
    train_idx, _, val_idx, _ = carve_validation(index, train.labels, val_size, split_seed)
    parts = [train.take(train_idx), train.take(val_idx), test]
    cache = _cache_file(Path(data_dir), resolution, parts)
    if cache.exists():  # decoded once: later workers and campaigns load the tensors
        return ArraySplits(**torch.load(cache, weights_only=True))
    tensors = []
    for part in parts:
        tensors += [decode_all(part, resolution, num_workers), torch.from_numpy(part.labels)]
    splits = ArraySplits(*tensors, num_classes=len(train.classes))
    _write_cache(cache, splits)
    return splits


def _cache_file(data_dir: Path, resolution: int, parts: list[ImageList]) -> Path:
    """A tensor file per resolution and exact image lists (so any other split, subset or
    set of files on disk gets its own file)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update("\n".join(map(str, part.paths)).encode())
        digest.update(part.labels.tobytes())
    return data_dir / ".batchlab_cache" / f"imagenet_{resolution}px_{digest.hexdigest()[:16]}.pt"


def _write_cache(path: Path, splits: ArraySplits) -> None:
    """Atomic: a half-written file never looks like a cache (and a read-only data
    directory just means no cache)."""
    try:
        path.parent.mkdir(exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save({name: getattr(splits, name) for name in
                    ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y", "num_classes")}, partial)
        os.replace(partial, path)
    except OSError:
        pass


@dataclass(frozen=True)
class FolderSplits:
    """Map-style datasets for the DataLoader path; items are (uint8 (3, S, S), label)."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    num_classes: int

    @property
    def train_size(self) -> int:
        return len(self.train)


def imagenet_transforms(image_size: int = 224):
    """(train, eval) torchvision transforms producing uint8 (3, S, S) tensors."""
    from torchvision import transforms

    train = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    resize = round(image_size * 256 / 224)  # 256 for 224, the standard evaluation ratio
    evaluation = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                     transforms.PILToTensor()])
    return train, evaluation


def imagenet_folder_datasets(data_dir: str | Path, *, image_size: int = 224, split_seed: int = 0,
                             val_size: int = IMAGENET_VAL_SIZE) -> FolderSplits:
    """torchvision `ImageFolder` datasets with the standard transforms; the validation
    split is the same fixed-seed carve of `train/` as in `load_imagenet_splits`."""
    from torch.utils.data import Subset
    from torchvision.datasets import ImageFolder

    data_dir = Path(data_dir)
    train_list, _ = _scan_splits(data_dir)
    index = np.arange(len(train_list.paths))
    train_idx, _, val_idx, _ = carve_validation(index, train_list.labels, val_size, split_seed)
    train_tf, eval_tf = imagenet_transforms(image_size)
    train = Subset(ImageFolder(str(data_dir / "train"), transform=train_tf), train_idx.tolist())
    val = Subset(ImageFolder(str(data_dir / "train"), transform=eval_tf), val_idx.tolist())
    test = ImageFolder(str(data_dir / "val"), transform=eval_tf)
    return FolderSplits(train, val, test, num_classes=len(train_list.classes))
