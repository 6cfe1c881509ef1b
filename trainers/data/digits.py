"""scikit-learn's 8x8 digits (1,797 images): real data that ships with a dependency."""
from __future__ import annotations

import numpy as np

from trainers.data.splits import ArraySplits, as_tensors, carve_validation

VAL_SIZE = 300
TEST_SIZE = 300


def load_digits_splits(*, split_seed: int = 0, val_size: int = VAL_SIZE) -> ArraySplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    rest_x, rest_y, test_x, test_y = carve_validation(images, labels, TEST_SIZE, split_seed)
    train_x, train_y, val_x, val_y = carve_validation(rest_x, rest_y, val_size, split_seed + 1)
    tensors = as_tensors(train_x, train_y, val_x, val_y, test_x, test_y)
    return ArraySplits(*tensors, num_classes=10)
