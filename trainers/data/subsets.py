"""Data-set subsets, as in Shallue et al. section 4.5 (how steps-to-result changes with
the size of the training set): a fraction of the training images, or a subset of the
classes. Both are deterministic for a seed.

- `subset_examples` keeps round(fraction * N) training images. Stratified (the default)
  keeps each class's share exactly, up to rounding (largest-remainder allocation, so the
  total is exact); unstratified draws a uniform sample without replacement. Validation
  and test are left whole, so errors stay comparable across fractions.
- `subset_classes` keeps the examples of `num_classes` classes drawn by the seed in every
  split and re-indexes their labels 0..num_classes-1 in increasing order of the old label
  (e.g. Shallue's `imagenet_half_classes`).

The index functions work on label arrays, so the ImageNet loader can subset its file
list before decoding any JPEG.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from trainers.data.splits import ArraySplits


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")


def _stratified_counts(labels: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class counts proportional to class sizes that sum exactly to `total`."""
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * (total / len(labels))
    counts = np.floor(exact).astype(np.int64)
    # Largest remainders get the leftover images (ties broken by class order).
    leftover = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:leftover]] += 1
    return classes, counts


def example_subset_indices(labels: np.ndarray | torch.Tensor, fraction: float, *, seed: int,
                           stratified: bool = True) -> np.ndarray:
    """Sorted indices of round(fraction * N) examples chosen with `seed`."""
    _check_fraction(fraction)
    labels = np.asarray(labels)
    total = max(1, int(round(fraction * len(labels))))
    rng = np.random.default_rng(seed)
    if not stratified:
        return np.sort(rng.choice(len(labels), size=total, replace=False))
    classes, counts = _stratified_counts(labels, total)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
              for c, n in zip(classes, counts)]
    return np.sort(np.concatenate(chosen))


def choose_classes(num_classes_total: int, num_classes: int, *, seed: int) -> np.ndarray:
    """`num_classes` distinct class ids out of 0..num_classes_total-1, sorted."""
    if not 0 < num_classes <= num_classes_total:
        raise ValueError(f"num_classes must be in 1..{num_classes_total}, got {num_classes}")
    return np.sort(np.random.default_rng(seed).choice(num_classes_total, num_classes, replace=False))


def class_subset_indices(labels: np.ndarray | torch.Tensor, classes: np.ndarray):
    """(indices of examples whose label is in `classes`, their labels re-indexed 0..k-1)."""
    labels = np.asarray(labels)
    classes = np.sort(np.asarray(classes))
    keep = np.flatnonzero(np.isin(labels, classes))
    return keep, np.searchsorted(classes, labels[keep]).astype(np.int64)


def subset_examples(splits: ArraySplits, fraction: float, *, seed: int,
                    stratified: bool = True) -> ArraySplits:
    """Keep a fraction of the training images; validation and test unchanged."""
    keep = torch.from_numpy(example_subset_indices(splits.train_y.cpu(), fraction, seed=seed,
                                                   stratified=stratified))
    keep = keep.to(splits.train_y.device)
    return replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])


def _select(x: torch.Tensor, y: torch.Tensor, classes: np.ndarray):
    keep, new_labels = class_subset_indices(y.cpu(), classes)
    keep_t = torch.from_numpy(keep).to(x.device)
    return x[keep_t], torch.from_numpy(new_labels).to(y.device)


def subset_classes(splits: ArraySplits, num_classes: int, *, seed: int) -> ArraySplits:
    """Keep `num_classes` classes (drawn with `seed`) in every split, labels re-indexed."""
    classes = choose_classes(splits.num_classes, num_classes, seed=seed)
    train_x, train_y = _select(splits.train_x, splits.train_y, classes)
    val_x, val_y = _select(splits.val_x, splits.val_y, classes)
    test_x, test_y = _select(splits.test_x, splits.test_y, classes)
    return ArraySplits(train_x, train_y, val_x, val_y, test_x, test_y, num_classes=num_classes)
