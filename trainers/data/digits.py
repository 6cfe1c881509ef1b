"""scikit-learn's 8x8 digits (1,797 images): real data that ships with a dependency."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from trainers.data.splits import ArraySplits, as_tensors, carve_validation

VAL_SIZE = 300
TEST_SIZE = 300


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 8, 8) as float64, values 0..16, and the labels, as
    `sklearn.datasets.load_digits` gives them: read from the CSV that scikit-learn ships,
    without importing scikit-learn (its import costs ~1.5 s of every worker process: scipy
    and pandas). Falls back to `load_digits` where the file is not where it has always been."""
    spec = importlib.util.find_spec("sklearn")  # locates the package, runs none of it
    folders = (spec.submodule_search_locations or []) if spec else []
    path = next((Path(f) / "datasets" / "data" / "digits.csv.gz" for f in folders), None)
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits
        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(path, "rt") as file:
        table = np.loadtxt(file, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def load_digits_splits(*, split_seed: int = 0, val_size: int = VAL_SIZE) -> ArraySplits:
    images, labels = digits_arrays()
    images = images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), values 0..16
    labels = labels.astype(np.int64)
    rest_x, rest_y, test_x, test_y = carve_validation(images, labels, TEST_SIZE, split_seed)
    train_x, train_y, val_x, val_y = carve_validation(rest_x, rest_y, val_size, split_seed + 1)
    tensors = as_tensors(train_x, train_y, val_x, val_y, test_x, test_y)
    return ArraySplits(*tensors, num_classes=10)
