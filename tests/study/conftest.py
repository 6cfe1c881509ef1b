import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TINY_SPEC = textwrap.dedent("""
    [campaign]
    name = "tiny"
    workload = "digits_mlp"
    batch_sizes = [16, 64]
    optimizers = ["momentum"]
    schedules = ["constant"]
    trials_per_cell = 3
    max_steps = 300
    eval_every = 10
    seed = 0

    [target]
    metric = "val_error"
    threshold = 0.1

    [search_space.optimizer.momentum]
    learning_rate = { low = 0.01, high = 1.0, scale = "log" }
    momentum = { low = 0.8, high = 0.95, scale = "reverse_log" }
""")


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SPEC)
    return path


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'study.db'}"


def batchlab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process."""
    return subprocess.run([sys.executable, "-m", "study.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
