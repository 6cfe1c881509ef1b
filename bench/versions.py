"""The line every benchmark prints under its device line: what ran, with which code, when
(issue 9: each result names the device, the versions and the date)."""
from __future__ import annotations

import datetime

from study.provenance import code_version, package_versions


def versions_line() -> str:
    """torch (with its CUDA build tag), optuna, SQLAlchemy and Python versions, batchlab's
    version and git commit ('.dirty' with uncommitted changes), and the local time."""
    import torch  # when printing, as the scripts import it

    versions = package_versions()
    others = ", ".join(f"{name} {versions[name]}" for name in ("optuna", "sqlalchemy", "python")
                       if name in versions)
    return (f"torch {torch.__version__}, {others}, batchlab {code_version()}, "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}")
