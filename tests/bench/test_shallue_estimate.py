"""bench/shallue_estimate.py: the estimate's arithmetic against hand-computed numbers, the
--steps-to-result parser, S read back from a stored (imported) campaign, the real-study
campaign file, and a small real run on CPU."""
from __future__ import annotations

import math
import re

import pytest

from bench.shallue_estimate import (Cost, cell_steps, estimate, flat_steps_within, interpolate,
                                    interpolate_cost, main, minutes_per_kilostep, parse_args,
                                    parse_steps, run_study, steps_from_storage, study_command,
                                    study_spec_text)
from study.cli import main as batchlab
from study.spec import load_spec
from tests.study.shallue_fixtures import write_study


def test_parse_steps():
    assert parse_steps("16:4000, 32:2000,") == {16: 4000.0, 32: 2000.0}
    assert parse_steps("1024:312.5") == {1024: 312.5}
    for bad in ("16", "16:0", "16:-3", "a:3"):
        with pytest.raises(ValueError):
            parse_steps(bad)
    with pytest.raises(SystemExit):  # argparse turns it into a usage error
        parse_args(["--steps-to-result", "16"])


def test_interpolation_is_log_log_and_flat_outside():
    points = {16: 400.0, 256: 25.0}
    assert interpolate(points, 64) == pytest.approx(100.0)  # halfway in log2 B: sqrt(400 * 25)
    assert interpolate(points, 32) == pytest.approx(400 * (25 / 400) ** 0.25)
    assert interpolate(points, 16) == 400 and interpolate(points, 256) == 25
    assert interpolate(points, 2) == 400 and interpolate(points, 16384) == 25  # flat


def test_cell_steps_prefers_the_cell_then_the_batch_size():
    steps = cell_steps([16, 64, 1024], ["a", "b"], {16: 400.0, 256: 25.0}, {(16, "b"): 200.0})
    assert steps == {(16, "a"): 400.0, (16, "b"): 200.0, (64, "a"): pytest.approx(100.0),
                     (64, "b"): pytest.approx(100.0), (1024, "a"): 25.0, (1024, "b"): 25.0}
    # Only per-cell values: a batch size's value is its fewest; absent ones interpolated.
    steps = cell_steps([16, 64, 256], ["a", "b"], None, {(16, "a"): 300.0, (16, "b"): 400.0,
                                                         (256, "a"): 25.0})
    assert steps[(16, "b")] == 400 and steps[(256, "b")] == 25
    assert steps[(64, "a")] == steps[(64, "b")] == pytest.approx(math.sqrt(300 * 25))
    assert set(cell_steps([16], ["a"]).values()) == {None}


def test_estimate_against_hand_computed_totals():
    costs = {16: Cost(k=2, step_ms=10.0, eval_ms=100.0, setup_s=1.0),
             64: Cost(k=4, step_ms=20.0, eval_ms=200.0)}
    steps = cell_steps([16, 64], ["a", "b"], {16: 400.0, 256: 25.0}, {(16, "b"): 200.0})
    out = estimate(costs, steps, trials=4, max_steps=1000, eval_every=50)
    # B=16, a: 4 x 400 steps x 10 ms = 16 s, 4 x 8 evals x 0.1 s = 3.2 s, 2 groups x 1 s = 2 s
    #       b: 4 x 200 x 10 ms = 8 s, 4 x 4 x 0.1 = 1.6 s, 2 s
    # upper per cell: 4 x 1000 x 10 ms = 40 s + 4 x 20 x 0.1 = 8 s + 2 s = 50 s
    assert out[16] == (pytest.approx(21.2 + 11.6), pytest.approx(100.0))
    # B=64: S = 100 interpolated; 4 x 100 x 20 ms = 8 s + 4 x 2 x 0.2 s = 1.6 s per cell;
    # upper 4 x 1000 x 20 ms = 80 s + 4 x 20 x 0.2 = 16 s per cell; no setup, 1 group
    assert out[64] == (pytest.approx(2 * 9.6), pytest.approx(2 * 96.0))
    # S above the budget is capped (lower = upper); a partial interval still evaluates.
    one = {8: Cost(k=1, step_ms=1.0, eval_ms=10.0)}
    assert estimate(one, {(8, "a"): 5000.0}, trials=2, max_steps=1000, eval_every=50)[8] == \
        (pytest.approx(2 * 1.0 + 40 * 0.01),) * 2
    assert estimate(one, {(8, "a"): 60.0}, trials=2, max_steps=1000, eval_every=50)[8][0] == \
        pytest.approx(2 * 0.06 + 2 * 2 * 0.01)
    assert estimate(one, {(8, "a"): None}, trials=2, max_steps=1000, eval_every=50)[8][0] is None


def test_cost_interpolation_and_the_s_that_fits():
    costs = {16: Cost(k=8, step_ms=0.1, eval_ms=4.0, setup_s=0.0, compile_s=30.0),
             256: Cost(k=2, step_ms=1.6, eval_ms=4.0, setup_s=0.5)}
    mid = interpolate_cost(costs, 64, k=4)  # halfway in log2 B: geometric means
    assert (mid.k, mid.compile_s) == (4, 0.0)
    assert mid.step_ms == pytest.approx(0.4) and mid.eval_ms == pytest.approx(4.0)
    assert mid.setup_s == pytest.approx(math.sqrt(1e-9 * 0.5))  # a zero is floored, not log(0)
    assert interpolate_cost(costs, 4096, k=1).step_ms == 1.6  # flat outside
    # 2 cells x 10 trials x (1000 x 0.1 ms + 50 evals x 4 ms) = 6 s = 0.1 min per 1,000 S
    assert minutes_per_kilostep(costs[16], cells=2, trials=10, eval_every=20) == pytest.approx(0.1)
    # 256: 2 x 10 x (1000 x 1.6 + 50 x 4) ms = 36 s = 0.6 min; setup 2 cells x 5 groups x 0.5 s
    # = 5 s. S minutes-per-step 0.7 / 1000, so 10 min fit (10 - 5/60) / 0.0007 steps.
    assert flat_steps_within(costs, 10, cells_per_batch=2, trials=10, eval_every=20) == \
        pytest.approx((10 - 5 / 60) / 0.0007)
    # ... and the lower estimate at that S takes those 10 minutes (up to its ceil(S / E)
    # evaluations: the part of an evaluation interval counts as a whole evaluation).
    s = flat_steps_within(costs, 10, cells_per_batch=2, trials=10, eval_every=1)
    out = estimate(costs, {(b, o): s for b in costs for o in "ab"}, trials=10, max_steps=10 ** 9,
                   eval_every=1)
    assert sum(lower for lower, _ in out.values()) / 60 == pytest.approx(10, abs=0.004)


def _rows(*pairs):
    return {"step": [p[0] for p in pairs], "val/classification_error": [p[1] for p in pairs]}


def test_steps_from_an_imported_shallue_campaign(tmp_path, capsys):
    import pandas as pd
    root, params = tmp_path / "data", {"learning_rate": 0.1, "momentum": 0.99}
    write_study(root, "mnist/simple_cnn", "nesterov_momentum", 64, {
        1: ("COMPLETE", pd.DataFrame(_rows((100, 0.5), (200, 0.005))), params),
        2: ("COMPLETE", pd.DataFrame(_rows((100, 0.02), (300, 0.009))), params)})
    write_study(root, "mnist/simple_cnn", "nesterov_momentum", 256, {
        1: ("COMPLETE", pd.DataFrame(_rows((40, 0.2), (80, 0.009))), params)})
    write_study(root, "mnist/simple_cnn", "sgd", 64, {  # never reaches 0.01: no S
        1: ("COMPLETE", pd.DataFrame(_rows((500, 0.2))), {"learning_rate": 0.1})})
    url = f"sqlite:///{tmp_path / 's.db'}"
    assert batchlab(["import-shallue", str(root), "--storage", url]) == 0
    capsys.readouterr()
    steps = steps_from_storage(url, "shallue/mnist/simple_cnn")
    assert steps == {(64, "nesterov"): 200.0, (256, "nesterov"): 80.0}
    # The sgd cell falls back to its batch size's value.
    assert cell_steps([64], ["nesterov", "sgd"], None, steps) == {(64, "nesterov"): 200.0,
                                                                  (64, "sgd"): 200.0}
    with pytest.raises(SystemExit, match="no campaign 'nope'"):
        steps_from_storage(url, "nope")


def test_real_study_campaign_file_and_missing_data(tmp_path, capsys):
    args = parse_args(["--batch-sizes", "16,32", "--trials", "50", "--data-dir", str(tmp_path)])
    spec = load_spec(args.campaign)
    args.optimizers = ["nesterov", "sgd"]
    from study.spec import parse_spec
    study = parse_spec(study_spec_text(spec, args), "x")
    assert (study.batch_sizes, study.optimizers, study.trials_per_cell) == ((16, 32), ("nesterov", "sgd"), 50)
    assert (study.data_dir, study.download, study.max_steps) == (str(tmp_path), False, spec.max_steps)
    run_study(spec, args, 1)
    assert "not run" in capsys.readouterr().out


@pytest.mark.parametrize("k", [None, 2])  # K = 1 on CPU (run_trial), and a vectorized group
def test_small_real_run_on_cpu(k, tmp_path, capsys):
    main(["--batch-sizes", "16", "--steps", "2", "--trials", "2", "--repeats", "1",
          "--train-size", "256", "--val-size", "128", "--steps-to-result", "16:100",
          "--data-dir", str(tmp_path / "absent"), *(["--k", str(k)] if k else [])])
    out = capsys.readouterr().out
    assert out.startswith("device: cpu")
    row = re.search(r"^\| 16 \| (\d+) \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 100 "
                    r"\| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert row, out
    assert int(row[1]) == (k or 1)
    step_ms, eval_ms, lower, upper = map(float, row.groups()[1:])
    assert 0 < step_ms < math.inf and 0 < eval_ms < math.inf and 0 < lower < upper
    assert re.search(r"^total: lower [\d.]+ min \((under|over) 30\), upper", out, re.M), out


def test_untimed_batch_sizes_are_interpolated(tmp_path, capsys):
    main(["--batch-sizes", "16,32,64", "--measure-batch-sizes", "16,64", "--steps", "2", "--trials", "2",
          "--repeats", "1", "--train-size", "256", "--val-size", "128", "--k", "1",
          "--data-dir", str(tmp_path / "absent")])
    out = capsys.readouterr().out
    step = {int(m[1]): float(m[2]) for m in re.finditer(r"^\| (\d+) \| 1 \| ([\d.]+) \|", out, re.M)}
    assert sorted(step) == [16, 32, 64], out
    assert re.search(r"^\| 32 \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| - \|", out, re.M), out  # not timed
    assert step[32] == pytest.approx(math.sqrt(step[16] * step[64]), rel=0.02, abs=0.002)
    assert re.search(r"^30 minutes cover S\(B\) up to [\d,]+ steps", out, re.M), out
    with pytest.raises(SystemExit, match="names none"):
        main(["--batch-sizes", "16", "--measure-batch-sizes", "32", "--data-dir", str(tmp_path)])


def test_profile_follows_the_table_for_each_timed_batch_size(tmp_path, capsys):
    main(["--batch-sizes", "16,32,64", "--measure-batch-sizes", "16,64", "--steps", "1", "--trials", "1",
          "--repeats", "1", "--train-size", "256", "--val-size", "128", "--k", "1", "--profile",
          "--data-dir", str(tmp_path / "absent")])
    out = capsys.readouterr().out
    headers = re.findall(r"^profile: batch (\d+), K 1: 3 runs of --steps 1 and one evaluation", out, re.M)
    assert headers == ["16", "64"], out
    profiles = out[out.index("profile: batch 16"):]
    assert "aten::convolution_backward" in profiles and "Self CPU time total" in profiles
    assert out.index("30 minutes cover") < out.index("profile: batch 16")  # after the estimate


def test_the_s_that_fits_is_capped_by_the_budget(tmp_path, capsys):
    """Where even the upper bound (every trial runs all max_steps) fits the 30 minutes,
    no S above max_steps exists to quote: trials never train past the budget."""
    # 1 ms per trial-step, no evaluation cost: 1 minute holds 60,000 trial-steps.
    one = {16: Cost(k=1, step_ms=1.0, eval_ms=0.0)}
    assert flat_steps_within(one, 1, cells_per_batch=1, trials=1, eval_every=1000) == pytest.approx(60_000)
    assert flat_steps_within(one, 1, cells_per_batch=1, trials=1, eval_every=1000, max_steps=1000) == 1000
    assert flat_steps_within(one, 1, cells_per_batch=1, trials=1, eval_every=1000,
                             max_steps=100_000) == pytest.approx(60_000)
    # A study small enough to fit whole: the printed line says so instead of an S > budget.
    text = (load_spec(parse_args([]).campaign).text
            .replace("max_steps = 100000", "max_steps = 40"))
    campaign = tmp_path / "small.toml"
    campaign.write_text(text)
    main(["--campaign", str(campaign), "--batch-sizes", "16", "--steps", "2", "--trials", "1",
          "--repeats", "1", "--k", "1", "--train-size", "256", "--val-size", "64",
          "--data-dir", str(tmp_path / "absent")])
    out = capsys.readouterr().out
    assert "max_steps 40" in out, out
    upper = float(re.search(r"^total: upper ([\d.]+) min", out, re.M)[1])
    assert upper < 30, out
    line = re.search(r"^30 minutes cover .*$", out, re.M)[0]
    assert line.startswith("30 minutes cover every S(B) up to the budget of 40 steps"), line


def test_the_real_study_sizes_its_groups_as_the_worker_default_does_on_cuda(tmp_path):
    """The estimate times each batch size at the K `choose_k` gives it (as the worker's
    default, --trials-at-once auto, fixes per cell at its start). The real study must run
    that way too, not with the largest K forced on every cell (which the trainer then
    splits by choose_k mid-study). On CPU, where auto trains one at a time, the estimate's
    K is passed; an explicit --k is passed everywhere."""
    at_once = lambda command: command[command.index("--trials-at-once") + 1]
    cuda = parse_args(["--device", "cuda"])
    command = study_command(tmp_path, cuda, 32, on_cuda=True)
    assert at_once(command) == "auto"
    assert command[command.index("run") + 1] == str(tmp_path / "study.toml")
    assert at_once(study_command(tmp_path, parse_args(["--device", "cuda", "--k", "8"]), 8, on_cuda=True)) == "8"
    assert at_once(study_command(tmp_path, parse_args([]), 4, on_cuda=False)) == "4"


def test_a_probe_runs_the_full_study_s_trials_cut_short(tmp_path):
    """--run-max-steps caps the real run's trials but keeps every decaying schedule at the
    campaign's length, and --run-* pick a part of the grid: the same search space (the
    quasi-random sampler's points) and the same learning rates, step for step."""
    from study.spec import parse_spec
    from study.tuning import distributions
    from trainers.schedules import SCHEDULES
    args = parse_args(["--batch-sizes", "16,32,64", "--run-batch-sizes", "32,64", "--run-trials", "8",
                       "--run-optimizers", "nesterov,sgd", "--run-max-steps", "2000",
                       "--data-dir", str(tmp_path)])
    spec = load_spec(args.campaign)
    args.optimizers = list(spec.optimizers)
    probe = parse_spec(study_spec_text(spec, args), "probe")
    assert (probe.max_steps, probe.trials_per_cell, args.trials) == (2000, 8, 50)
    assert (probe.batch_sizes, probe.optimizers) == ((32, 64), ("nesterov", "sgd"))
    assert probe.name == spec.name + "_b32-64_t8_s2000"
    assert probe.schedules == spec.schedules == ("linear_decay",)
    for optimizer in probe.optimizers:
        ours, theirs = probe.cell_space(optimizer, "linear_decay"), spec.cell_space(optimizer, "linear_decay")
        assert distributions(ours) == distributions(theirs)
        assert {p.name: p.value for p in ours if p.is_fixed} == {"decay_steps": spec.max_steps}
    full = SCHEDULES["linear_decay"].build({"end_factor": 0.01}, max_steps=spec.max_steps)
    cut = SCHEDULES["linear_decay"].build({"end_factor": 0.01, "decay_steps": spec.max_steps}, max_steps=2000)
    assert [cut(t, 0.0) for t in (0, 1000, 1999)] == [full(t, 0.0) for t in (0, 1000, 1999)]
    assert full(1999, 0.0) < 1  # it does decay
    args.run_max_steps = spec.max_steps + 1
    with pytest.raises(SystemExit, match="over the campaign's budget"):
        study_spec_text(spec, args)


def test_a_probe_on_real_data_reports_its_s_and_the_estimate_with_the_stored_s(tmp_path, capsys):
    """End to end on CPU with the real MNIST-10k files: the probe runs at B = 64 through
    `batchlab run` into --run-storage; the S stored for B = 128 (an imported campaign, as
    an earlier probe's would be) completes the grid of the second estimate."""
    import pandas as pd
    from tests.shared_data import MNIST_T10K
    root = tmp_path / "published"
    write_study(root, "mnist/simple_cnn", "nesterov_momentum", 128, {
        1: ("COMPLETE", pd.DataFrame(_rows((40, 0.2), (80, 0.005))), {"learning_rate": 0.1, "momentum": 0.9})})
    stored = f"sqlite:///{tmp_path / 'stored.db'}"
    assert batchlab(["import-shallue", str(root), "--storage", stored]) == 0
    text = (load_spec(parse_args([]).campaign).text
            .replace('workload = "mnist_simple_cnn"', 'workload = "mnist10k_simple_cnn"')
            .replace("threshold = 0.01", "threshold = 0.5").replace("eval_every = 20", "eval_every = 10")
            .replace("learning_rate = { low = 1e-4, high = 10.0", "learning_rate = { low = 0.02, high = 0.1"))
    campaign = tmp_path / "probe.toml"
    campaign.write_text(text)
    probe_db = tmp_path / "probe.db"
    capsys.readouterr()
    main(["--campaign", str(campaign), "--batch-sizes", "64,128", "--optimizers", "nesterov",
          "--steps", "2", "--repeats", "1", "--k", "1", "--train-size", "256", "--val-size", "64",
          "--from-storage", stored, "--data-dir", str(MNIST_T10K), "--run", "--run-batch-sizes", "64",
          "--run-trials", "2", "--run-max-steps", "60", "--run-storage", f"sqlite:///{probe_db}"])
    out = capsys.readouterr().out
    assert re.search(rf"--storage sqlite:///{re.escape(str(probe_db))} --trials-at-once 1$", out, re.M), out
    assert "study wall time" in out and "a part of the study, so no verdict" in out, out
    measured = re.search(r"^S\(B\) measured by this run, the fewest over its cells: 64: (\d+)$", out, re.M)
    assert measured, out
    s = int(measured[1])
    assert 10 <= s <= 60 and s % 10 == 0  # an evaluation step within the cap
    assert "no S at" not in out
    totals = re.findall(r"^total: lower ([\d.]+) min", out, re.M)
    assert len(totals) == 2, out  # before the run (B = 64 from B = 128's S) and after it

    def cell_minutes(batch: int, steps: int) -> float:
        step_ms, eval_ms, setup = map(float, re.search(
            rf"^\| {batch} \| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M).groups())
        return ((50 * steps * step_ms + 50 * math.ceil(steps / 10) * eval_ms) / 1000 + 50 * setup) / 60
    assert float(totals[0]) == pytest.approx(cell_minutes(64, 80) + cell_minutes(128, 80), abs=0.11)
    assert float(totals[1]) == pytest.approx(cell_minutes(64, s) + cell_minutes(128, 80), abs=0.11)


def test_the_fixed_configuration_campaign_is_the_study_s_schedule_at_sqrt_scaled_rates():
    """bench/shallue_mnist_fixed.toml: one trial per batch size whose learning rate is
    0.0175 x sqrt(B / 128) and whose linear decay is the study's (100,000 steps)."""
    from pathlib import Path
    from study.resolve import resolve_trial_config
    from study.tuning import hparams_from_optuna
    fixed = load_spec(Path(__file__).resolve().parents[2] / "bench" / "shallue_mnist_fixed.toml")
    study = load_spec(parse_args([]).campaign)
    assert (fixed.workload, fixed.target, fixed.eval_every) == (study.workload, study.target, study.eval_every)
    rates = {}
    for batch in fixed.batch_sizes:
        fixed_values = hparams_from_optuna(fixed.cell_space("nesterov", "linear_decay"), {})
        config = resolve_trial_config(fixed, batch_size=batch, optimizer="nesterov", schedule="linear_decay",
                                      seed=0, device="cpu", hparams=fixed_values)
        assert config.hparams["decay_steps"] == study.max_steps and config.hparams["momentum"] == 0.9
        rates[batch] = config.hparams["learning_rate"]
    assert rates == pytest.approx({16: 0.0175 / math.sqrt(8), 128: 0.0175, 1024: 0.0175 * math.sqrt(8)})
