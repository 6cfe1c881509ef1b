"""Fashion-MNIST (Xiao et al. 2017) from IDX files in torchvision's layout
(`DATA_DIR/FashionMNIST/raw/` or `DATA_DIR/`).

Same format and sizes as MNIST; as in Shallue et al., 55,000 train / 5,000 validation
carved from the 60,000 training images with a fixed seed, the official 10,000 test
images kept as test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from trainers.data.download import download_fashion_mnist, load_or_download
from trainers.data.mnist import load_idx_splits
from trainers.data.splits import ArraySplits

# md5 sums by file name: the .gz archives torchvision downloads
# (torchvision.datasets.FashionMNIST.resources) and their unpacked content (what Debian's
# dataset-fashion-mnist package unpacks to, recompressed there under other archive md5s).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_MNIST_VAL_SIZE = 5000
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def load_fashion_mnist_splits(data_dir: str | Path, *, split_seed: int = 0,
                              val_size: int = FASHION_MNIST_VAL_SIZE, download: bool = False,
                              md5s: Mapping[str, str] = FASHION_MNIST_FILES) -> ArraySplits:
    """55,000 train / 5,000 validation / 10,000 test, uint8 (N, 1, 28, 28)."""
    return load_or_download(download, data_dir, download_fashion_mnist, lambda: load_idx_splits(
        data_dir, "FashionMNIST", md5s, split_seed=split_seed, val_size=val_size))
