"""A quick version of examples/keskar_digits.toml: the large-batch winner's training-loss
Hessian has a larger top eigenvalue than the small-batch winner's (Keskar et al.'s
ordering, in the form that holds on digits; see docs/keskar_report.md for why sharpness
itself is not tested)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import keskar_digits_report as report  # noqa: E402

pytestmark = pytest.mark.slow


def test_large_batch_winner_has_the_larger_top_eigenvalue(tmp_path):
    url = report.run_campaign(tmp_path)  # 2 learning rates per cell: lr 1e-3 at B=1024 misses
    from study.cli import main
    assert main(["probe", "hessian", "--campaign", "keskar_digits", "--storage", url]) == 0
    summary = report.probe_summary(url)
    small, large = summary["by_batch"][16], summary["by_batch"][1024]
    assert large["top_eigenvalue"] > 1.2 * small["top_eigenvalue"] > 0
