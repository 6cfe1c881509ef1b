"""Smoke test of the end-to-end benchmarks (bench/study_wall_time.py, bench/overhead.py,
bench/trial_throughput.py, bench/conv_stacking.py, bench/graphed_step.py):
each runs with its smallest options, as a user runs it, and prints the device header and
a ratio line that parses. Numbers are not checked (a shared CPU makes them noise)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WALL_RATIO = re.compile(r"^ratio (?P<method>.+) vs baseline: (?P<ratio>\d+\.\d+)x trials/s$", re.M)
OVERHEAD_RATIO = re.compile(
    r"^ratio storage/trial (?P<backend>\w+) K=(?P<k>\d+): (?P<share>\d+\.\d+) \(", re.M)


def _run(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"{module} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.startswith("device: "), done.stdout
    assert re.search(r"^torch \S+, .*\d{4}-\d\d-\d\dT", done.stdout, re.M), done.stdout
    return done.stdout


def _postgres_usable() -> bool:
    try:
        import psycopg  # noqa: F401
        from db.local_postgres import postgres_available
    except ImportError:
        return False
    return postgres_available()


def test_study_wall_time_smallest_run_prints_a_ratio():
    out = _run("bench.study_wall_time", "--workload", "digits_mlp", "--trials", "2",
               "--batch-sizes", "16", "--optimizers", "momentum", "--max-steps", "10",
               "--eval-every", "5", "--ks", "", "--prune", "off")
    ratios = WALL_RATIO.findall(out)
    assert len(ratios) == 1 and ratios[0][0].endswith("1 worker, K=1, prune=off"), out
    assert float(ratios[0][1]) > 0
    assert "| 2 |" in out  # both methods ran the 2 trials


def test_overhead_smallest_run_prints_a_share_per_backend():
    backends = "sqlite,postgresql" if _postgres_usable() else "sqlite"
    out = _run("bench.overhead", "--workload", "digits_mlp", "--trials", "1", "--batch-sizes", "16",
               "--max-steps", "10", "--eval-every", "5", "--ks", "1", "--backends", backends)
    shares = {backend: float(share) for backend, _, share in OVERHEAD_RATIO.findall(out)}
    assert set(shares) == set(backends.split(",")), out
    assert all(0 < share < 1 for share in shares.values()), shares


def test_trial_throughput_typical_baseline_feeds_the_model_what_batchlab_does():
    """The PIL + ToTensor + Normalize pipeline of the typical baseline gives the same
    inputs as `workload.preprocess` (so both baselines and batchlab do the same math)."""
    import torch

    from bench.trial_throughput import ImageDataset, image_transform
    from trainers.loop import DataCache
    from trainers.workloads import DataOptions, get_workload
    workload = get_workload("digits_mlp")
    splits = DataCache().get(workload, DataOptions(None, False), torch.device("cpu"))
    dataset = ImageDataset(splits.train_x[:50].squeeze(1), splits.train_y[:50], image_transform(workload))
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    torch.testing.assert_close(torch.stack(images), workload.preprocess(splits.train_x[:50]),
                               rtol=0, atol=1e-6)
    assert list(labels) == splits.train_y[:50].tolist()


def test_trial_throughput_smallest_run_prints_both_baselines():
    out = _run("bench.trial_throughput", "--batch-sizes", "16", "--steps", "2", "--ks", "2",
               "--repeats", "1", "--sequential-trials", "1", "--no-vmap-rows")
    rows = re.findall(r"^\| digits_mlp \| 16 \| (.+?) \| (\d+\.\d+) \| (\d+\.\d+)x \| (\d+\.\d+)x \|$",
                      out, re.M)
    methods = [method for method, *_ in rows]
    assert methods[:2] == ["baseline, typical (PIL transforms + DataLoader)",
                           "baseline, strong (normalised TensorDataset + DataLoader)"], out
    assert methods[2:] == ["batchlab sequential (run_trial)", "batchlab vectorized K=2"], out
    assert float(rows[0][2]) == 1.0 and float(rows[1][3]) == 1.0  # each baseline against itself


def test_conv_stacking_methods_compute_the_same_gradients_and_print_rows():
    """Every way bench/conv_stacking.py times is the same computation: the vmapped and
    looped trials' gradients equal each trial's own, and the textbook order's those of
    SimpleCNN's own order (fp32, CPU)."""
    import torch

    from bench.conv_stacking import methods
    found = methods(4, 2, torch.device("cpu"), None)
    vmapped, _ = found["vmap K=2"][0]()  # grads (K, *shape) per parameter name
    looped = found["loop K=2"][0]()  # per model, per parameter
    names = list(vmapped)
    for k in range(2):
        for i, name in enumerate(names):
            torch.testing.assert_close(vmapped[name][k], looped[k * len(names) + i], rtol=1e-4, atol=1e-6)
    ours, textbook = (found[name][0]() for name in ("single, channels_last", "single, channels_last, textbook order"))
    assert len(ours) == len(textbook) == 8
    for a, b in zip(ours, textbook):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    out = _run("bench.conv_stacking", "--cells", "4:2", "--iters", "1", "--repeats", "1")
    rows = re.findall(r"^\| 4 \| 2 \| (.+?) \| (\d+\.\d+) \| (\d+\.\d+)x \|$", out, re.M)
    assert [r[0] for r in rows] == ["single", "single, channels_last", "single, channels_last, textbook order",
                                    "vmap K=2", "loop K=2"], out
    assert all(float(ms) > 0 for _, ms, _ in rows)


@pytest.mark.skipif(not os.environ.get("BATCHLAB_COMPILE_TESTS"),
                    reason="compiles the simple CNN's step twice (~2 min on CPU); set BATCHLAB_COMPILE_TESTS=1")
def test_graphed_step_times_both_write_backs():
    out = _run("bench.graphed_step", "--k", "2", "--steps", "2", "--repeats", "1")
    rows = re.findall(r"^\| (functional \+ copy|compiled in place) \| (\d+\.\d+) \| (\d+\.\d+)x \|$", out, re.M)
    assert [method for method, _, _ in rows] == ["functional + copy", "compiled in place"], out
    assert rows[0][2] == "1.00" and all(float(ms) > 0 for _, ms, _ in rows)
