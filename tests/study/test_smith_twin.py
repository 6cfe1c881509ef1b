"""A quick version of examples/twins/smith_mnist10k.toml (Smith, Kindermans & Le's three
schedules on MNIST-10k), run through `batchlab run` as examples/smith_twin_report.py does:
10 epochs with the noise scale divided by 5 at epochs 3, 6 and 8, one seed per schedule.

Checks, from what the workers stored:
- lr / B of every measurement is identical across the three schedules at every epoch and
  equals lr0 / B0 / 5^k after k milestones (the invariant of methods.md 1.2);
- the stored update counts equal `count_updates` exactly: 2,500 / 1,100 / 924 (ceil(N/B)
  updates per epoch, N = 8,000), so increasing the batch takes the fewest updates;
- the final validation errors agree within 0.015. Why 0.015: the three runs are the same
  computation up to epoch 3 (same seed, batch and learning rate) and then follow different
  noisy paths to a ~5% error. On 2,000 validation examples the binomial standard error at
  5% is 0.005, so two independent runs differ by ~0.007 (1 sigma); 0.015 is about 2 sigma
  of that difference, loose enough for seed-to-seed variation (the full 30-epoch run's
  gaps are ~0.002, docs/smith_report.md) yet tight enough to fail if one schedule did
  not train (the error at epoch 1 is ~0.11).
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import smith_twin_report as report  # noqa: E402

pytestmark = pytest.mark.slow

from tests.shared_data import MNIST_T10K as DATA


@pytest.mark.skipif(not (DATA / "t10k-images-idx3-ubyte.gz").exists(), reason=f"MNIST t10k files not in {DATA}")
def test_smith_twin_equal_noise_fewer_updates_same_error(tmp_path):
    url, _ = report.run_twin(tmp_path, workers=2, epochs=10, milestones=(3, 6, 8), seeds=1,
                             data_dir=str(DATA), name="twin_smith_quick")
    data = report.collect(url)
    assert data["train_size"] == 8000

    noise = report.noise_check(data)
    assert noise["equal"] and noise["matches_plan"]
    assert noise["epochs_compared"] >= 8  # every epoch but the last phase's unevaluated ones

    final = data["final"]
    expected = {s: data["expected"][s]["updates"] for s in report.SCHEDULES}
    assert expected == {"decaying_lr": 2500, "hybrid": 3 * 250 + 7 * 50,
                        "increasing_batch": 3 * 250 + 3 * 50 + 2 * 10 + 2 * 2}
    assert {r.schedule: int(r.step) for r in final.itertuples()} == expected
    assert expected["increasing_batch"] < expected["hybrid"] < expected["decaying_lr"]

    errors = final.set_index("schedule")["val_error"]
    assert errors.max() < 0.09
    assert errors.max() - errors.min() <= 0.015
