"""Downloads through torchvision's own downloaders, so files land in torchvision's layout
(`ROOT/MNIST/raw/`, `ROOT/FashionMNIST/raw/`, `ROOT/cifar-10-batches-py/`,
`ROOT/cifar-100-python/`) with torchvision's checksums verified on the way.

ImageNet cannot be downloaded automatically (its licence requires a manual download);
`download_imagenet` says so in a `DataError`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, TypeVar

from trainers.data.errors import DataError

T = TypeVar("T")


def load_or_download(download: bool, data_dir: str | Path, fetch: Callable[[Path], None],
                     load: Callable[[], T]) -> T:
    """`load()`; with `download` on, files that are missing or fail the loader's checks
    are fetched (`fetch(data_dir)`) and loaded again. Files already there that load are
    never downloaded again, so `download = true` works offline once the data is in place,
    in any layout and compression the loader accepts."""
    if not download:
        return load()
    try:
        return load()
    except DataError:
        fetch(Path(data_dir))
    return load()


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def md5_mismatch(path: Path, detail: str) -> DataError:
    return DataError(f"{path}: md5 mismatch ({detail}); the file is corrupt, truncated or not "
                     f"the original: delete it and download it again")


def check_md5(path: Path, expected_md5: str | None) -> None:
    """Raise DataError when `path`'s md5 differs from `expected_md5` (None: no check)."""
    if expected_md5 and md5_of(path) != expected_md5:
        raise md5_mismatch(path, f"expected {expected_md5}")


def _torchvision_download(name: str, root: str | Path, make: Callable[..., object]) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    try:
        make(root=str(root), download=True)
    except Exception as exc:  # network errors, checksum errors, disk full: one clear line
        reason = " ".join(str(exc).split())  # torchvision's MNIST lists each mirror on a line
        raise DataError(f"{root}: downloading {name} failed ({reason}); download it where you have "
                        f"internet and copy the files into {root}") from exc


def download_mnist(root: str | Path) -> None:
    from torchvision.datasets import MNIST
    _torchvision_download("MNIST", root, lambda **kw: (MNIST(train=True, **kw), MNIST(train=False, **kw)))


def download_fashion_mnist(root: str | Path) -> None:
    from torchvision.datasets import FashionMNIST
    _torchvision_download("Fashion-MNIST", root,
                          lambda **kw: (FashionMNIST(train=True, **kw), FashionMNIST(train=False, **kw)))


def download_cifar10(root: str | Path) -> None:
    from torchvision.datasets import CIFAR10
    _torchvision_download("CIFAR-10", root, CIFAR10)


def download_cifar100(root: str | Path) -> None:
    from torchvision.datasets import CIFAR100
    _torchvision_download("CIFAR-100", root, CIFAR100)


def download_imagenet(root: str | Path) -> None:
    raise DataError(f"{root}: ImageNet cannot be downloaded automatically; get it from "
                    f"image-net.org and unpack it into {root}/train/<class>/*.JPEG and "
                    f"{root}/val/<class>/*.JPEG")
