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
    """Run the real command line in a fresh process (`python -m study.cli`, the form
    torchrun uses)."""
    return subprocess.run([sys.executable, "-m", "study.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


# What the `batchlab` console script runs (pyproject's [project.scripts]); `-c` puts the
# working directory first on sys.path, as `-m` does, so the checkout under test is imported.
CONSOLE_SCRIPT = "import sys; from study.cli import main; sys.argv[0] = 'batchlab'; sys.exit(main())"


def batchlab_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real command line as the `batchlab` console script does."""
    return subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, *args], capture_output=True,
                          text=True, timeout=timeout)
