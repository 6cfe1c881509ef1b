"""Smoke test of examples/keskar_mnist10k_report.py (F1 on MNIST-10k, Keskar's probes):
trains both batch regimes for one epoch on a 1,000-image subset and checks the probes
return finite numbers. The ordering itself takes minutes per run: see docs/keskar_report.md."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import keskar_mnist10k_report as report  # noqa: E402

pytestmark = pytest.mark.skipif(not (report.DATA_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="needs ../shared/datasets/mnist-t10k")


def test_f1_trains_and_probes_on_a_subset():
    x, y, vx, vy = report.load()
    data = (x[:1000], y[:1000], vx[:500], vy[:500])
    for batch_size in (50, 100):
        model, history = report.train(data, batch_size, seed=0, max_epochs=1, log=lambda line: None)
        assert history[-1][1] == 1000 // batch_size
        result = report.probe(model, data, epsilons=(1e-3,), maxiter=2)
        assert result["top_eigenvalue"] > 0
        assert all(math.isfinite(v) for k, v in result.items() if k != "eigen_converged")
