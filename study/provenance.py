"""Where a trial ran and with what code: stored with every trial."""
from __future__ import annotations

import platform
import socket
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "optuna", "sqlalchemy", "numpy", "scipy", "batchlab")


@cache
def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    versions.update(accelerator_versions())
    return versions


def accelerator_versions() -> dict[str, str]:
    """The CUDA and cuDNN versions torch was built with ("none" on CPU-only builds), and
    the driver's CUDA version when a GPU is visible."""
    import torch  # here, not at import: `batchlab status` never loads torch
    out = {"cuda": torch.version.cuda or "none"}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["cudnn"] = str(cudnn) if cudnn else "none"
    if torch.cuda.is_available():
        out["cuda_devices"] = str(torch.cuda.device_count())
    return out


@cache
def code_version() -> str:
    """batchlab's version, plus the git commit (and '+dirty') when run from a checkout."""
    version = package_versions().get("batchlab", "unknown")
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}"


def host() -> str:
    return socket.gethostname()
