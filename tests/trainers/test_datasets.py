"""Dataset loaders on tiny real-format fixtures (IDX, CIFAR pickles, a JPEG ImageFolder),
on the real MNIST t10k files, and torchvision's own readers as the layout oracle."""
from __future__ import annotations

import gzip
import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.data import download as download_module
from trainers.data.cifar import (CIFAR10_FOLDER, CIFAR100_FOLDER, load_cifar10_splits,
                                 load_cifar100_splits)
from trainers.data.errors import DataError
from trainers.data.fashion_mnist import load_fashion_mnist_splits
from trainers.data.imagenet import imagenet_folder_datasets, load_imagenet_splits
from trainers.data.mnist import load_mnist_splits, load_mnist_t10k_splits
from trainers.data.splits import ArraySplits
from trainers.data.subsets import (choose_classes, class_subset_indices, example_subset_indices,
                                   subset_classes, subset_examples)

from tests.shared_data import MNIST_T10K as T10K_DIR
# Label histogram of the official MNIST test set (digits 0..9).
T10K_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --- fixture writers ----------------------------------------------------------------------

def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dataset(root: Path, folder: str, sizes=(("train", 30), ("t10k", 12)), seed=0):
    """torchvision's layout: ROOT/folder/raw/ with the .gz originals and the unpacked files.
    Returns ({file name: md5}, {prefix: (images, labels)}), md5s of the archives and of their
    content, as the loaders' tables hold them."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    md5s, arrays = {}, {}
    for prefix, count in sizes:
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        arrays[prefix] = (images, labels)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            (raw / name).write_bytes(idx_bytes(array))
            (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
            md5s[f"{name}.gz"] = md5(raw / f"{name}.gz")
            md5s[name] = md5(raw / name)
    return md5s, arrays


def write_cifar(root: Path, folder: str, files: dict[str, int], label_key: str, classes: int, seed=0):
    """Pickle batches as the CIFAR python version stores them; returns ({name: md5}, arrays)."""
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    md5s, arrays = {}, {}
    for name, count in files.items():
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, classes, count)]
        entry = {"batch_label": name, "data": data, label_key: labels,
                 "filenames": [f"{i}.png" for i in range(count)]}
        if label_key == "fine_labels":
            entry["coarse_labels"] = [v // 5 for v in labels]
        with open(target / name, "wb") as handle:
            pickle.dump(entry, handle)
        md5s[name] = md5(target / name)
        arrays[name] = (data.reshape(-1, 3, 32, 32), np.array(labels))
    return md5s, arrays


COLOURS = {"n01": (250, 10, 10), "n02": (10, 250, 10), "n03": (10, 10, 250)}


def write_image_folder(root: Path, per_class: dict[str, int]) -> None:
    """ROOT/<split>/<wnid>/<i>.JPEG: solid-colour JPEGs of assorted sizes, one colour a class."""
    from PIL import Image

    for split, count in per_class.items():
        for wnid, colour in COLOURS.items():
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                size = (20 + 3 * i, 14 + 2 * i) if i % 2 else (14 + i, 22)
                Image.new("RGB", size, colour).save(root / split / wnid / f"{i}.JPEG", quality=95)


# --- scikit-learn's digits ------------------------------------------------------------------

def test_digits_read_from_the_shipped_csv_equal_load_digits(monkeypatch):
    """The direct reader (no scikit-learn import) and `load_digits` give the same arrays,
    and so does the fallback taken where the file is not found."""
    import importlib.util
    from sklearn.datasets import load_digits
    from trainers.data import digits

    bunch = load_digits()
    direct = digits.digits_arrays()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    fallback = digits.digits_arrays()
    for images, labels in (direct, fallback):
        assert images.shape == (1797, 8, 8) and images.max() == 16
        np.testing.assert_array_equal(images, bunch.images)
        np.testing.assert_array_equal(labels, bunch.target)
        assert labels.dtype.kind == "i"


# --- MNIST / Fashion-MNIST ------------------------------------------------------------------

def test_mnist_fixture_loads_in_torchvision_layout(tmp_path):
    md5s, arrays = write_idx_dataset(tmp_path, "MNIST")
    splits = load_mnist_splits(tmp_path, split_seed=3, val_size=6, md5s=md5s)
    assert splits.train_x.shape == (24, 1, 28, 28) and splits.val_x.shape == (6, 1, 28, 28)
    assert splits.train_x.dtype == torch.uint8 and splits.train_y.dtype == torch.int64
    train_images, train_labels = arrays["train"]
    order = np.random.default_rng(3).permutation(30)  # the documented fixed-seed carve
    np.testing.assert_array_equal(splits.val_x[:, 0].numpy(), train_images[order[:6]])
    np.testing.assert_array_equal(splits.train_y.numpy(), train_labels[order[6:]])
    np.testing.assert_array_equal(splits.test_x[:, 0].numpy(), arrays["t10k"][0])


def test_mnist_fixture_agrees_with_torchvision_reader(tmp_path):
    from torchvision.datasets import MNIST

    md5s, _ = write_idx_dataset(tmp_path, "MNIST")
    ours = load_mnist_splits(tmp_path, val_size=5, md5s=md5s)
    theirs = MNIST(str(tmp_path), train=False, download=False)
    np.testing.assert_array_equal(ours.test_x[:, 0].numpy(), theirs.data.numpy())
    np.testing.assert_array_equal(ours.test_y.numpy(), theirs.targets.numpy())


def test_split_is_deterministic_and_seed_dependent(tmp_path):
    md5s, _ = write_idx_dataset(tmp_path, "MNIST")
    a, b = (load_mnist_splits(tmp_path, split_seed=1, val_size=5, md5s=md5s) for _ in range(2))
    c = load_mnist_splits(tmp_path, split_seed=2, val_size=5, md5s=md5s)
    assert torch.equal(a.val_x, b.val_x) and not torch.equal(a.val_x, c.val_x)


def test_fashion_mnist_uses_its_own_folder_and_checksums(tmp_path):
    md5s, arrays = write_idx_dataset(tmp_path, "FashionMNIST", seed=1)
    splits = load_fashion_mnist_splits(tmp_path, val_size=5, md5s=md5s)
    assert (splits.train_size, len(splits.val_y), len(splits.test_y)) == (25, 5, 12)
    with pytest.raises(DataError, match="md5 mismatch"):  # torchvision's real md5s by default
        load_fashion_mnist_splits(tmp_path, val_size=5)


def test_raw_files_without_gz_are_read_and_checked(tmp_path):
    md5s, arrays = write_idx_dataset(tmp_path, "MNIST")
    for gz in (tmp_path / "MNIST" / "raw").glob("*.gz"):
        gz.unlink()
    splits = load_mnist_splits(tmp_path, val_size=5, md5s=md5s)
    np.testing.assert_array_equal(splits.test_y.numpy(), arrays["t10k"][1])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: md5 mismatch \(expected content"):
        load_mnist_splits(tmp_path, val_size=5)  # the originals' md5s by default


def test_archive_md5_alone_still_guards_a_gz(tmp_path):
    md5s, _ = write_idx_dataset(tmp_path, "MNIST")
    only_archives = {name: value for name, value in md5s.items() if name.endswith(".gz")}
    gz = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(gzip.decompress(gz.read_bytes()), compresslevel=1))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: md5 mismatch \(expected "):
        load_mnist_splits(tmp_path, val_size=5, md5s=only_archives)
    load_mnist_splits(tmp_path, val_size=5, md5s=md5s)  # its content is the original's


def test_truncated_raw_file_names_the_file(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    for gz in raw.glob("*.gz"):
        gz.unlink()
    target = raw / "train-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: md5 mismatch"):
        load_mnist_splits(tmp_path, val_size=5)
    with pytest.raises(DataError, match="train-images-idx3-ubyte: truncated"):  # no checksums:
        load_mnist_splits(tmp_path, val_size=5, md5s={})  # the header still tells
    target.write_bytes(b"\x00\x00\x99\x99" + target.read_bytes()[4:])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not an IDX file"):
        load_mnist_splits(tmp_path, val_size=5, md5s={})


@pytest.mark.parametrize("load", [load_mnist_splits, load_mnist_t10k_splits, load_fashion_mnist_splits,
                                  load_cifar10_splits, load_cifar100_splits])
def test_missing_files_without_download_raise_data_error(tmp_path, load):
    with pytest.raises(DataError, match="not found.*download") as info:
        load(tmp_path / "nothing-here", download=False)
    assert "nothing-here" in str(info.value) and "\n" not in str(info.value)


def test_relative_data_dir_errors_name_the_absolute_path(tmp_path, monkeypatch):
    """A relative data_dir is resolved where the worker runs; the error shows where that was."""
    from trainers.workloads import DataOptions
    from trainers.workloads_papers import paper_workloads

    monkeypatch.chdir(tmp_path)
    workload = {w.name: w for w in paper_workloads()}["mnist_simple_cnn"]
    with pytest.raises(DataError) as info:
        workload.load_data(DataOptions(data_dir="data"))
    assert str(info.value).startswith(f"{tmp_path / 'data' / 'MNIST' / 'raw'}/train-images")


def test_download_true_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    write_idx_dataset(tmp_path, "MNIST")  # what the download would have left
    calls = []

    def fake(root, train=True, download=False):
        calls.append((root, train, download))

    monkeypatch.setattr(tvd, "MNIST", fake)
    with pytest.raises(DataError, match="md5 mismatch"):  # fake files, real checksums
        load_mnist_splits(tmp_path, download=True, val_size=5)
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]


def test_download_true_skips_files_that_load(tmp_path, monkeypatch):
    """With download on, data already in place (any layout the loader reads) is loaded,
    not fetched again: offline that fetch would fail, online it would overwrite the files.
    Only what is missing or fails the checks is fetched, and then loaded again."""
    import torchvision.datasets as tvd

    calls = []

    def fake(root, train=True, download=False):
        calls.append((root, train))
        if not (Path(root) / "MNIST" / "raw").exists():
            write_idx_dataset(Path(root), "MNIST")  # what a download leaves

    monkeypatch.setattr(tvd, "MNIST", fake)
    md5s, arrays = write_idx_dataset(tmp_path / "there", "MNIST")
    splits = load_mnist_splits(tmp_path / "there", download=True, val_size=5, md5s=md5s)
    assert calls == [] and splits.test_x.shape == (12, 1, 28, 28)
    flat = tmp_path / "flat"  # the MNIST-10k layout: the t10k pair directly in data_dir
    flat.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(tmp_path / "there" / "MNIST" / "raw" / name, flat / name)
    load_mnist_t10k_splits(flat, download=True, val_size=2, md5s=md5s)
    assert calls == [] and not (flat / "MNIST").exists()
    fetched = load_mnist_splits(tmp_path / "empty", download=True, val_size=5,
                                md5s=write_idx_dataset(tmp_path / "same", "MNIST")[0])
    assert calls == [(str(tmp_path / "empty"), True), (str(tmp_path / "empty"), False)]
    assert torch.equal(fetched.test_x[:, 0], torch.from_numpy(arrays["t10k"][0]))


def test_download_failure_is_one_data_error_line(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(**kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DataError, match="downloading CIFAR-10 failed"):
        download_module.download_cifar10(tmp_path)


def test_mnist_download_failure_message_is_one_line(tmp_path, monkeypatch):
    """torchvision's MNIST reports every mirror it tried on lines of their own; the
    DataError must still be the one line that the CLI prints."""
    import torchvision.datasets as tvd

    def offline(**kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n"
                           "Tried https://ossci-datasets.s3.amazonaws.com/mnist/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(tvd, "MNIST", offline)
    with pytest.raises(DataError) as info:
        download_module.download_mnist(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert ("downloading MNIST failed (Error downloading train-images-idx3-ubyte.gz: Tried "
            "https://ossci-datasets.s3.amazonaws.com/mnist/, got: <urlopen error [Errno -2] "
            "Name or service not known>); download it") in message


# --- the real MNIST t10k files -------------------------------------------------------------

def test_real_t10k_files_load():
    splits = load_mnist_t10k_splits(T10K_DIR)
    assert (splits.train_size, len(splits.val_y)) == (8000, 2000)
    assert torch.equal(splits.test_x, splits.val_x)
    labels = torch.cat([splits.train_y, splits.val_y])
    histogram = torch.bincount(labels, minlength=10)
    assert histogram.tolist() == T10K_HISTOGRAM and int(histogram.sum()) == 10_000
    assert splits.train_x.shape[1:] == (1, 28, 28) and int(splits.train_x.max()) == 255


def _copy_t10k(tmp_path: Path) -> Path:
    target = tmp_path / "t10k"
    shutil.copytree(T10K_DIR, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def test_real_t10k_with_one_flipped_byte_raises_naming_the_file(tmp_path):
    target = _copy_t10k(tmp_path)
    path = target / "t10k-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: md5 mismatch"):
        load_mnist_t10k_splits(target)


@pytest.mark.parametrize("form", ["unpacked", "recompressed"])
def test_real_t10k_unpacked_or_recompressed_loads_by_its_content_md5(tmp_path, form):
    """The official bytes in another container (torchvision's raw/ folder keeps the
    unpacked files; a distribution may recompress them) load with the default checksums
    and give the same splits; one flipped pixel byte is refused."""
    target = _copy_t10k(tmp_path)
    for gz in list(target.glob("*.gz")):
        content = gzip.decompress(gz.read_bytes())
        gz.unlink()
        if form == "unpacked":
            gz.with_suffix("").write_bytes(content)
        else:
            gz.write_bytes(gzip.compress(content, compresslevel=1, mtime=0))
    reference = load_mnist_t10k_splits(T10K_DIR)
    splits = load_mnist_t10k_splits(target)
    assert torch.equal(splits.train_x, reference.train_x) and torch.equal(splits.val_y, reference.val_y)
    images = target / ("t10k-images-idx3-ubyte" + ("" if form == "unpacked" else ".gz"))
    content = bytearray(images.read_bytes() if form == "unpacked" else gzip.decompress(images.read_bytes()))
    content[-1] ^= 0x01
    images.write_bytes(bytes(content) if form == "unpacked" else gzip.compress(bytes(content)))
    with pytest.raises(DataError, match=rf"{images.name}: md5 mismatch \(expected content md5"):
        load_mnist_t10k_splits(target)


def test_real_t10k_truncated_raises_naming_the_file(tmp_path):
    target = _copy_t10k(tmp_path)
    path = target / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz"):
        load_mnist_t10k_splits(target)


def test_mnist_normalisation_constants_fit_the_real_images():
    pixels = load_mnist_t10k_splits(T10K_DIR).train_x.float() / 255
    from trainers.workloads_papers import MNIST_MEAN, MNIST_STD
    assert abs(float(pixels.mean()) - MNIST_MEAN) < 0.005 and abs(float(pixels.std()) - MNIST_STD) < 0.005


def test_mnist10k_workload_end_to_end():
    from trainers.workloads import DataOptions, ModelOptions
    from trainers.workloads_papers import paper_workloads

    workload = {w.name: w for w in paper_workloads()}["mnist10k_simple_cnn"]
    splits = workload.load_data(DataOptions(data_dir=str(T10K_DIR)))
    x = workload.preprocess(splits.val_x[:4])
    assert abs(float(workload.preprocess(splits.val_x).mean())) < 0.1  # normalised
    logits = workload.build_model(ModelOptions())(x)
    summed, count, per_example = workload.loss(logits, splits.val_y[:4])
    assert logits.shape == (4, 10) and count == 4 and torch.isclose(summed, per_example.sum())


# --- CIFAR ------------------------------------------------------------------------------------

CIFAR10_SIZES = {f"data_batch_{i}": 8 for i in range(1, 6)}


def test_cifar10_fixture_loads_and_matches_torchvision(tmp_path):
    from torchvision.datasets import CIFAR10

    train_md5s, train = write_cifar(tmp_path, CIFAR10_FOLDER, CIFAR10_SIZES, "labels", 10)
    test_md5s, _ = write_cifar(tmp_path, CIFAR10_FOLDER, {"test_batch": 6}, "labels", 10, seed=1)
    meta_path = tmp_path / CIFAR10_FOLDER / "batches.meta"
    meta_path.write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))

    splits = load_cifar10_splits(tmp_path, val_size=5, train_md5s=train_md5s, test_md5s=test_md5s)
    assert splits.train_x.shape == (35, 3, 32, 32) and splits.num_classes == 10
    all_train = np.concatenate([train[name][0] for name in CIFAR10_SIZES])  # batch order 1..5
    order = np.random.default_rng(0).permutation(40)
    np.testing.assert_array_equal(splits.val_x.numpy(), all_train[order[:5]])

    class FixtureCIFAR10(CIFAR10):  # torchvision's reader, told our fixture's checksums
        train_list = [[n, m] for n, m in train_md5s.items()]
        test_list = [[n, m] for n, m in test_md5s.items()]
        meta = {"filename": "batches.meta", "key": "label_names", "md5": md5(meta_path)}

    theirs = FixtureCIFAR10(str(tmp_path), train=False)
    np.testing.assert_array_equal(splits.test_x.permute(0, 2, 3, 1).numpy(), theirs.data)  # HWC there
    assert splits.test_y.tolist() == theirs.targets


def test_cifar100_reads_fine_labels(tmp_path):
    train_md5s, train = write_cifar(tmp_path, CIFAR100_FOLDER, {"train": 30, "test": 7}, "fine_labels", 100)
    splits = load_cifar100_splits(tmp_path, val_size=5, train_md5s={"train": train_md5s["train"]},
                                  test_md5s={"test": train_md5s["test"]})
    assert splits.num_classes == 100 and len(splits.test_y) == 7
    np.testing.assert_array_equal(splits.test_y.numpy(), train["test"][1])


def test_cifar_checksum_and_truncation_errors_name_the_file(tmp_path):
    train_md5s, _ = write_cifar(tmp_path, CIFAR10_FOLDER, {**CIFAR10_SIZES, "test_batch": 4}, "labels", 10)
    test_md5s = {"test_batch": train_md5s.pop("test_batch")}
    with pytest.raises(DataError, match=r"data_batch_1: md5 mismatch"):
        load_cifar10_splits(tmp_path, val_size=5)  # torchvision's real checksums
    path = tmp_path / CIFAR10_FOLDER / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"data_batch_3: md5 mismatch"):
        load_cifar10_splits(tmp_path, val_size=5, train_md5s=train_md5s, test_md5s=test_md5s)
    unchecked = {**train_md5s, "data_batch_3": None}  # without a checksum, unpickling fails
    with pytest.raises(DataError, match=r"data_batch_3: not a readable CIFAR batch"):
        load_cifar10_splits(tmp_path, val_size=5, train_md5s=unchecked, test_md5s=test_md5s)


# --- ImageNet --------------------------------------------------------------------------------

def test_imagenet_in_memory_loader_resizes_and_labels(tmp_path):
    write_image_folder(tmp_path, {"train": 4, "val": 2})
    splits = load_imagenet_splits(tmp_path, resolution=8, val_size=3, num_workers=2)
    assert splits.train_x.shape == (9, 3, 8, 8) and splits.val_x.shape == (3, 3, 8, 8)
    assert splits.test_x.shape == (6, 3, 8, 8) and splits.num_classes == 3
    assert splits.train_x.dtype == torch.uint8 and splits.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # class c -> colour c
    for x, y in ((splits.train_x, splits.train_y), (splits.test_x, splits.test_y)):
        mean_colour = x.float().mean(dim=(2, 3))  # (N, 3), RGB order
        assert (mean_colour - colours[y]).abs().max() < 6  # JPEG is lossy, solid colours nearly exact


def test_imagenet_class_and_fraction_subsets_before_decoding(tmp_path):
    write_image_folder(tmp_path, {"train": 4, "val": 2})
    splits = load_imagenet_splits(tmp_path, resolution=4, val_size=1, num_classes=2,
                                  train_fraction=0.5, subset_seed=0, num_workers=1)
    assert splits.num_classes == 2 and splits.train_size + len(splits.val_y) == 4
    assert sorted(splits.test_y.tolist()) == [0, 0, 1, 1]


def test_imagenet_corrupt_jpeg_raises_naming_it(tmp_path):
    write_image_folder(tmp_path, {"train": 2, "val": 1})
    bad = tmp_path / "train" / "n02" / "1.JPEG"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DataError, match=r"n02/1\.JPEG: cannot be decoded"):
        load_imagenet_splits(tmp_path, resolution=4, val_size=1, num_workers=1)


def test_imagenet_missing_and_download_errors(tmp_path):
    with pytest.raises(DataError, match="train: folder not found"):
        load_imagenet_splits(tmp_path, val_size=1)
    with pytest.raises(DataError, match="cannot be downloaded automatically"):
        load_imagenet_splits(tmp_path, val_size=1, download=True)
    present = tmp_path / "present"  # in place already: download = true loads it
    write_image_folder(present, {"train": 2, "val": 1})
    assert load_imagenet_splits(present, resolution=4, val_size=1, num_workers=1,
                                download=True).test_x.shape == (3, 3, 4, 4)
    write_image_folder(tmp_path, {"train": 2})
    (tmp_path / "val").mkdir()
    shutil.copytree(tmp_path / "train" / "n01", tmp_path / "val" / "n09")
    with pytest.raises(DataError, match="class folders differ"):
        load_imagenet_splits(tmp_path, val_size=1)


def test_imagenet_folder_datasets_for_the_dataloader_path(tmp_path):
    write_image_folder(tmp_path, {"train": 4, "val": 2})
    folders = imagenet_folder_datasets(tmp_path, image_size=16, val_size=3)
    assert (len(folders.train), len(folders.val), len(folders.test)) == (9, 3, 6)
    image, label = folders.val[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and 0 <= label < 3
    image, label = folders.train[0]
    assert image.shape == (3, 16, 16)
    in_memory = load_imagenet_splits(tmp_path, resolution=8, val_size=3, num_workers=1)
    assert [folders.val[i][1] for i in range(3)] == in_memory.val_y.tolist()  # same carve
    # The batch-norm check's example shape draws nothing from the global RNG (a training
    # item's random crop would, shifting a trial's dropout stream).
    from trainers.loop import example_shape
    state = torch.get_rng_state()
    assert example_shape(folders) == (3, 16, 16)
    assert torch.equal(torch.get_rng_state(), state)


# --- subsets ---------------------------------------------------------------------------------

def _toy_splits() -> ArraySplits:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    images = torch.arange(100, dtype=torch.uint8)[:, None, None, None]
    return ArraySplits(images, labels, images[:10], labels[::10], images[:20], labels[::5], num_classes=3)


def test_stratified_fraction_keeps_class_shares_exactly():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    keep = example_subset_indices(labels, 0.1, seed=0)
    assert np.bincount(labels[keep]).tolist() == [5, 3, 2]
    odd = example_subset_indices(labels, 0.25, seed=0)  # 12.5 / 7.5 / 5: largest remainders
    assert len(odd) == 25 and np.bincount(labels[odd]).tolist() in ([13, 7, 5], [12, 8, 5])
    np.testing.assert_array_equal(keep, example_subset_indices(labels, 0.1, seed=0))
    assert not np.array_equal(keep, example_subset_indices(labels, 0.1, seed=1))
    assert len(np.unique(example_subset_indices(labels, 0.3, seed=2, stratified=False))) == 30


def test_subset_examples_touches_only_the_training_split():
    splits = _toy_splits()
    half = subset_examples(splits, 0.5, seed=4)
    assert half.train_size == 50 and torch.bincount(half.train_y).tolist() == [25, 15, 10]
    assert torch.equal(half.val_x, splits.val_x) and torch.equal(half.test_y, splits.test_y)
    # images and labels stay paired (image value = original index)
    assert torch.equal(splits.train_y[half.train_x.flatten().long()], half.train_y)
    with pytest.raises(ValueError):
        subset_examples(splits, 0.0, seed=0)


def test_class_subset_reindexes_labels_in_every_split():
    classes = choose_classes(3, 2, seed=0)
    assert len(classes) == 2 and np.array_equal(classes, np.sort(classes))
    keep, labels = class_subset_indices(np.array([2, 0, 1, 2]), np.array([0, 2]))
    assert keep.tolist() == [0, 1, 3] and labels.tolist() == [1, 0, 1]
    splits = _toy_splits()
    two = subset_classes(splits, 2, seed=0)
    assert two.num_classes == 2 and set(two.train_y.tolist()) == {0, 1}
    expected = sum(int((splits.train_y == c).sum()) for c in classes)
    assert two.train_size == expected
    assert set(two.test_y.tolist()) <= {0, 1} and len(two.val_y) == int(np.isin(splits.val_y, classes).sum())


@pytest.mark.parametrize("workload", ["cifar10_resnet8", "cifar100_wrn16_4", "imagenet_resnet50"])
def test_colour_workloads_normalise_per_channel(workload):
    """An image whose channels sit at their dataset means maps to ~0; one std up to ~1."""
    from trainers.workloads import get_workload

    w = get_workload(workload)
    means, stds = np.array(w.mean), np.array(w.std)
    assert means.shape == stds.shape == (3,)
    image = torch.tensor(np.round(means * 255), dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = w.preprocess(image)
    assert out.shape == (2, 3, 4, 4)
    assert out.abs().max().item() < 0.5 / 255 / stds.min() + 1e-6
    brighter = torch.tensor(np.round((means + stds) * 255), dtype=torch.uint8).view(1, 3, 1, 1)
    assert w.preprocess(brighter).flatten().tolist() == pytest.approx([1, 1, 1], abs=0.01)


def test_imagenet_pre_resized_tensors_are_cached_once(tmp_path, monkeypatch):
    """The first load decodes the JPEGs and writes a tensor file; the next one reads it
    and decodes nothing; another resolution gets its own file."""
    import trainers.data.imagenet as imagenet

    write_image_folder(tmp_path, {"train": 4, "val": 2})
    first = load_imagenet_splits(tmp_path, resolution=8, val_size=3, num_workers=1)
    files = list((tmp_path / ".batchlab_cache").glob("imagenet_8px_*.pt"))
    assert len(files) == 1
    monkeypatch.setattr(imagenet, "decode_all", lambda *a, **k: pytest.fail("decoded again"))
    again = load_imagenet_splits(tmp_path, resolution=8, val_size=3, num_workers=1)
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    monkeypatch.undo()
    load_imagenet_splits(tmp_path, resolution=4, val_size=3, num_workers=1)
    assert len(list((tmp_path / ".batchlab_cache").glob("*.pt"))) == 2
