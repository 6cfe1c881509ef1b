"""CIFAR-10 and CIFAR-100 from the python pickle batches, in torchvision's layout:
`DATA_DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}` and
`DATA_DIR/cifar-100-python/{train,test}` (the batch folder itself is accepted as DATA_DIR).

Splits: 45,000 train / 5,000 validation carved from the 50,000 training images with a
fixed seed (Shallue et al.'s CIFAR-10 split), the official 10,000 test images kept as
test; CIFAR-100 uses the same sizes. Every file is checked against torchvision's md5
before it is unpickled (a pickle from elsewhere is never loaded unchecked).
CIFAR-100 labels are the 100 fine labels.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping

import numpy as np

from trainers.data.download import check_md5, download_cifar10, download_cifar100, load_or_download
from trainers.data.errors import DataError
from trainers.data.splits import ArraySplits, as_tensors, carve_validation

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
# torchvision's file names and md5 sums (torchvision.datasets.CIFAR10/CIFAR100 train_list,
# test_list); dict order is the order the batches are concatenated in.
CIFAR10_TRAIN_FILES = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
}
CIFAR10_TEST_FILES = {"test_batch": "40351d587109b95175f43aff81a1287e"}
CIFAR100_TRAIN_FILES = {"train": "16019d7e3df5f24257cddd939b257f8d"}
CIFAR100_TEST_FILES = {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}
CIFAR_VAL_SIZE = 5000
IMAGE_SHAPE = (3, 32, 32)


def find_cifar_folder(data_dir: Path, folder: str, first_file: str) -> Path:
    for candidate in (data_dir / folder, data_dir):
        if (candidate / first_file).exists():
            return candidate
    raise DataError(f"{data_dir / folder / first_file}: file not found; unpack the dataset's python "
                    f"version there or set download = true in the campaign where you have internet")


def read_cifar_batch(path: Path, expected_md5: str | None, label_key: str, num_classes: int):
    """One pickle batch as images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    if not path.exists():
        raise DataError(f"{path}: file not found; unpack the complete dataset there "
                        f"or set download = true in the campaign")
    check_md5(path, expected_md5)
    try:
        with open(path, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
                        f"delete it and download it again") from exc
    if data.ndim != 2 or data.shape[1] != np.prod(IMAGE_SHAPE) or len(data) != len(labels):
        raise DataError(f"{path}: unexpected shapes {data.shape} / {labels.shape}; "
                        f"delete it and download it again")
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def read_cifar_files(folder: Path, md5s: Mapping[str, str | None], label_key: str, num_classes: int):
    parts = [read_cifar_batch(folder / name, md5, label_key, num_classes) for name, md5 in md5s.items()]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_cifar(data_dir: Path, folder_name: str, train_md5s: Mapping, test_md5s: Mapping,
                label_key: str, num_classes: int, split_seed: int, val_size: int) -> ArraySplits:
    folder = find_cifar_folder(data_dir, folder_name, next(iter(train_md5s)))
    images, labels = read_cifar_files(folder, train_md5s, label_key, num_classes)
    test_x, test_y = read_cifar_files(folder, test_md5s, label_key, num_classes)
    train_x, train_y, val_x, val_y = carve_validation(images, labels, val_size, split_seed)
    tensors = as_tensors(train_x, train_y, val_x, val_y, test_x, test_y)
    return ArraySplits(*tensors, num_classes=num_classes)


def load_cifar10_splits(data_dir: str | Path, *, split_seed: int = 0, val_size: int = CIFAR_VAL_SIZE,
                        download: bool = False, train_md5s: Mapping[str, str | None] = CIFAR10_TRAIN_FILES,
                        test_md5s: Mapping[str, str | None] = CIFAR10_TEST_FILES) -> ArraySplits:
    """CIFAR-10: 45,000 train / 5,000 validation / 10,000 test, uint8 (N, 3, 32, 32).
    `train_md5s`/`test_md5s` name the batch files and their md5 (torchvision's by default)."""
    return load_or_download(download, data_dir, download_cifar10, lambda: _load_cifar(
        Path(data_dir), CIFAR10_FOLDER, train_md5s, test_md5s, "labels", 10, split_seed, val_size))


def load_cifar100_splits(data_dir: str | Path, *, split_seed: int = 0, val_size: int = CIFAR_VAL_SIZE,
                         download: bool = False, train_md5s: Mapping[str, str | None] = CIFAR100_TRAIN_FILES,
                         test_md5s: Mapping[str, str | None] = CIFAR100_TEST_FILES) -> ArraySplits:
    """CIFAR-100 (fine labels): 45,000 train / 5,000 validation / 10,000 test."""
    return load_or_download(download, data_dir, download_cifar100, lambda: _load_cifar(
        Path(data_dir), CIFAR100_FOLDER, train_md5s, test_md5s, "fine_labels", 100, split_seed, val_size))
