"""MNIST from IDX files in torchvision's layout (`DATA_DIR/MNIST/raw/` or `DATA_DIR/`).

Shallue et al.: 55,000 train / 5,000 validation carved from the 60,000 training images
with a fixed seed; the official 10,000 test images kept as test. The `t10k` variant uses
only the official test files (the ones that ship in ../shared/datasets/mnist-t10k):
8,000 train / 2,000 validation, and the validation split doubles as test.

The IDX reader here also serves Fashion-MNIST (same format, other folder and checksums).
Checksums: a file's unpacked content is checked against the original's md5, so the
originals, their unpacked files (torchvision's `raw/` folder keeps both) and other
compressions of the same bytes (Debian's `dataset-fashion-mnist` package, say) all load
and anything else is refused. A `.gz` whose own md5 is torchvision's is accepted without
unpacking it twice. The header and length are checked too.
"""
from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from trainers.data.download import download_mnist, load_or_download, md5_mismatch, md5_of
from trainers.data.errors import DataError
from trainers.data.splits import ArraySplits, as_tensors, carve_validation

# md5 sums by file name: the .gz archives torchvision downloads
# (torchvision.datasets.MNIST.resources) and their unpacked content, as widely published
# (e.g. the t10k pair in ../shared/datasets/mnist-t10k unpacks to exactly these).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1 dim, images: 3 dims
MNIST_VAL_SIZE = 5000
MNIST_T10K_VAL_SIZE = 2000


def find_file(data_dir: Path, name: str, subdirs: tuple[str, ...]) -> Path:
    for sub in subdirs:
        for candidate in (data_dir / sub / name, data_dir / sub / name.removesuffix(".gz")):
            if candidate.exists():
                return candidate
    raise DataError(
        f"{data_dir / subdirs[0] / name}: file not found; put the dataset's files there "
        f"or set download = true in the campaign where you have internet")


def read_idx(path: Path, md5s: Mapping[str, str]) -> np.ndarray:
    """Read an IDX file, gzipped or not, checking it against `md5s` (see the module)."""
    gzipped = path.suffix == ".gz"
    archive_md5 = md5s.get(path.name) if gzipped else None
    content_md5 = md5s.get(path.name.removesuffix(".gz"))
    verified = bool(archive_md5) and md5_of(path) == archive_md5
    if archive_md5 and not verified and not content_md5:
        raise md5_mismatch(path, f"expected {archive_md5}")
    try:
        with (gzip.open if gzipped else open)(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        if gzipped and content_md5:  # a damaged archive of a known file
            raise md5_mismatch(path, f"cannot be unpacked: {exc}") from exc
        raise DataError(f"{path}: cannot be read ({exc}); delete it and download it again") from exc
    if content_md5 and not verified and hashlib.md5(raw).hexdigest() != content_md5:
        raise md5_mismatch(path, f"expected content md5 {content_md5}")
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in IDX_MAGIC:
        raise DataError(f"{path}: not an IDX file (magic {magic}); delete it and download it again")
    ndim = IDX_MAGIC[magic]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: truncated ({len(raw) - offset} of {expected} bytes of data); "
                        f"delete it and download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def read_idx_pair(data_dir: Path, prefix: str, folder: str, md5s: Mapping[str, str],
                  num_classes: int = 10):
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of one IDX pair ('train' or 't10k')."""
    subdirs = (f"{folder}/raw", ".", folder)
    images_name, labels_name = f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"
    images_path = find_file(data_dir, images_name, subdirs)
    labels_path = find_file(data_dir, labels_name, subdirs)
    images = read_idx(images_path, md5s)
    labels = read_idx(labels_path, md5s)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path}: expected an image file and a label file for '{prefix}'")
    if len(images) != len(labels):
        raise DataError(f"{data_dir}: {len(images)} images but {len(labels)} labels for '{prefix}'")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{labels_path}: label {labels.max()} outside 0..{num_classes - 1}")
    return images[:, None].copy(), labels.astype(np.int64)


def load_idx_splits(data_dir: str | Path, folder: str, md5s: Mapping[str, str], *,
                    split_seed: int, val_size: int) -> ArraySplits:
    """Train/validation carved from the 'train' files with a fixed seed; 't10k' is test."""
    data_dir = Path(data_dir)
    images, labels = read_idx_pair(data_dir, "train", folder, md5s)
    test_x, test_y = read_idx_pair(data_dir, "t10k", folder, md5s)
    train_x, train_y, val_x, val_y = carve_validation(images, labels, val_size, split_seed)
    return ArraySplits(*as_tensors(train_x, train_y, val_x, val_y, test_x, test_y), num_classes=10)


def load_mnist_t10k_splits(data_dir: str | Path, *, split_seed: int = 0,
                           val_size: int = MNIST_T10K_VAL_SIZE, download: bool = False,
                           md5s: Mapping[str, str] = MNIST_FILES) -> ArraySplits:
    """The 10,000 official test images only: (10,000 - val_size) train / val_size
    validation by a fixed-seed permutation; the validation split doubles as test."""
    images, labels = load_or_download(download, data_dir, download_mnist,
                                      lambda: read_idx_pair(Path(data_dir), "t10k", "MNIST", md5s))
    train_x, train_y, val_x, val_y = carve_validation(images, labels, val_size, split_seed)
    return ArraySplits(*as_tensors(train_x, train_y, val_x, val_y, val_x, val_y), num_classes=10)


def load_mnist_splits(data_dir: str | Path, *, split_seed: int = 0,
                      val_size: int = MNIST_VAL_SIZE, download: bool = False,
                      md5s: Mapping[str, str] = MNIST_FILES) -> ArraySplits:
    """MNIST as in Shallue et al.: 55,000 train / 5,000 validation / 10,000 test.
    `md5s` maps file names (.gz archives and unpacked) to their md5 (the originals' by
    default)."""
    return load_or_download(download, data_dir, download_mnist, lambda: load_idx_splits(
        data_dir, "MNIST", md5s, split_seed=split_seed, val_size=val_size))
