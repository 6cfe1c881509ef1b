"""A trial split over two processes (torchrun, gloo, CPU) equals the one-process trial
with the same global batch and seed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.config import Target, TrialConfig
from trainers.loop import run_trial

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("batch_size", [75])  # odd: the global batch splits unevenly
def test_two_process_trial_equals_one_process(tmp_path, batch_size):
    config = TrialConfig(workload="digits_mlp", batch_size=batch_size, optimizer="momentum",
                         schedule="constant", hparams={"learning_rate": 0.05, "momentum": 0.9},
                         max_steps=150, eval_every=10, target=Target("val_error", 0.05), seed=5,
                         device="cpu")
    single = []
    expected = run_trial(config, on_measurement=single.append)
    out = tmp_path / "ddp.json"
    payload = json.dumps(config.to_json_dict())
    script = Path(__file__).with_name("ddp_trial.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), str(out), payload],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # a crash shows its Python stack
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["result"]["outcome"] == expected.outcome == "reached"
    assert data["result"]["steps_to_result"] == expected.steps_to_result
    assert data["result"]["examples_to_result"] == expected.examples_to_result
    got = data["measurements"]
    assert [m["step"] for m in got] == [m.step for m in single]
    assert [m["examples"] for m in got] == [m.examples for m in single]
    for theirs, ours in zip(got, single):
        assert theirs["val_loss"] == pytest.approx(ours.val_loss, rel=1e-4)
        assert theirs["train_loss"] == pytest.approx(ours.train_loss, rel=1e-4)
        assert theirs["val_error"] == pytest.approx(ours.val_error, abs=1.5 / 300)
