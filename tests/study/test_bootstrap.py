"""Bootstrap steps-to-result: hand-made rows whose answers are known."""
import numpy as np
import pandas as pd
import pytest

from study.analysis import (
    bootstrap_steps_to_result, resample_cell, steps_to_result, trial_first_steps,
)

TARGET = dict(metric="val_error", threshold=0.1)


def _trial(cell, tid, number, outcome):
    return {"cell_id": cell, "trial_id": tid, "trial_number": number, "outcome": outcome,
            "hparams": {"learning_rate": 0.1}, "steps_to_result": np.nan}


def _rows(tid, steps, errors, batch=10):
    return [{"trial_id": tid, "step": s, "examples": s * batch, "wall_seconds": s / 10.0,
             "val_error": e} for s, e in zip(steps, errors)]


@pytest.fixture
def frames():
    trials = pd.DataFrame([
        _trial("a", "a1", 0, "reached"),      # first beats at 100
        _trial("a", "a2", 1, "reached"),      # first beats at 200
        _trial("a", "a3", 2, "not_reached"),  # never
        _trial("a", "a4", 3, "diverged"),     # beats at 50 but diverged: never wins
        _trial("a", "a5", 4, "failed"),       # not resampled
        _trial("b", "b1", 0, "reached"),
        _trial("b", "b2", 1, "pruned"),       # censored at 300 without beating
    ])
    rows = (_rows("a1", [50, 100, 150], [0.5, 0.09, 0.05])
            + _rows("a2", [100, 200], [0.3, 0.08])
            + _rows("a3", [100, 200, 300], [0.4, 0.2, 0.1])  # 0.1 is not strictly below
            + _rows("a4", [50], [0.01])
            + _rows("a5", [50], [0.01])
            + _rows("b1", [100, 200, 400], [0.5, 0.2, 0.05])
            + _rows("b2", [100, 300], [0.5, 0.3]))
    return trials, pd.DataFrame(rows)


def test_first_steps_per_trial_are_known(frames):
    firsts = trial_first_steps(*frames, **TARGET).set_index("trial_id")
    assert list(firsts.index) == ["a1", "a2", "a3", "a4", "b1", "b2"]  # failed left out
    assert firsts["first_step"].to_dict() == pytest.approx(
        {"a1": 100, "a2": 200, "a3": np.nan, "a4": np.nan, "b1": 400, "b2": np.nan},
        nan_ok=True)
    assert firsts.loc["a2", "first_examples"] == 2000


def test_summary_matches_exact_result_and_known_probabilities(frames):
    result = bootstrap_steps_to_result(*frames, **TARGET, n_resamples=20_000, seed=1)
    a = result.summary.set_index("cell_id").loc["a"]
    assert a["steps_to_result"] == 100 and a["examples_to_result"] == 1000
    assert a["n_trials"] == 4
    # No result only if all 4 draws come from the 2 trials that never beat: (1/2)^4.
    assert abs(a["fraction_no_result"] - 1 / 16) < 4 * np.sqrt((1 / 16) * (15 / 16) / 20_000)
    # P(result = 100) = 1 - (3/4)^4 = 0.68 > 0.5: the median and the low end are 100.
    assert a["steps_median"] == 100 and a["steps_low"] == 100 and a["examples_median"] == 1000
    # More than 2.5% of resamples have no result: the high end is unbounded (NaN).
    assert np.isnan(a["steps_high"])
    share_100 = np.mean(result.steps["a"] == 100)
    assert abs(share_100 - (1 - 0.75 ** 4)) < 0.01


def test_cell_whose_trials_all_agree_has_a_degenerate_interval(frames):
    trials, rows = frames
    # Cell b: b1 beats at 400, b2 (pruned) never; 1/4 of resamples have no result.
    result = bootstrap_steps_to_result(trials, rows, **TARGET, n_resamples=4000, seed=0)
    b = result.summary.set_index("cell_id").loc["b"]
    assert b["steps_median"] == 400 and b["steps_low"] == 400
    assert abs(b["fraction_no_result"] - 0.25) < 0.03
    only_b1 = trials.loc[trials["trial_id"] != "b2"]
    b = bootstrap_steps_to_result(only_b1, rows, **TARGET, n_resamples=200).summary
    b = b.set_index("cell_id").loc["b"]
    assert (b["steps_low"], b["steps_median"], b["steps_high"], b["fraction_no_result"]) == (
        400, 400, 400, 0.0)


def test_vectorised_resample_equals_recomputing_steps_to_result(frames):
    trials, rows = frames
    # A tie at step 100 with a later trial number: the winner's examples must be a1's.
    trials = pd.concat([trials, pd.DataFrame([_trial("a", "a6", 5, "reached")])])
    rows = pd.concat([rows, pd.DataFrame(_rows("a6", [100], [0.01], batch=15))])
    cell = trial_first_steps(trials, rows, **TARGET).query("cell_id == 'a'")
    fast_steps, fast_examples = resample_cell(
        cell["first_step"].to_numpy(float), cell["first_examples"].to_numpy(float),
        n_resamples=60, rng=np.random.default_rng(7))
    picks = np.random.default_rng(7).integers(0, len(cell), size=(60, len(cell)))
    pool = trials.set_index("trial_id").loc[cell["trial_id"]].reset_index()
    for r in range(60):
        sample = pool.iloc[picks[r]].assign(trial_id=lambda f: [f"{t}#{i}" for i, t in
                                                                enumerate(f["trial_id"])])
        sample_rows = sample[["trial_id"]].assign(orig=pool["trial_id"].to_numpy()[picks[r]])
        sample_rows = sample_rows.merge(rows.rename(columns={"trial_id": "orig"}), on="orig")
        exact = steps_to_result(sample, sample_rows.drop(columns="orig"), **TARGET).iloc[0]
        assert fast_steps[r] == pytest.approx(exact["steps_to_result"], nan_ok=True)
        assert fast_examples[r] == pytest.approx(exact["examples_to_result"], nan_ok=True)


def test_seed_makes_resamples_reproducible(frames):
    one = bootstrap_steps_to_result(*frames, **TARGET, n_resamples=300, seed=3)
    two = bootstrap_steps_to_result(*frames, **TARGET, n_resamples=300, seed=3)
    pd.testing.assert_frame_equal(one.steps, two.steps)
    pd.testing.assert_frame_equal(one.summary, two.summary)
    assert one.steps.shape == (300, 2)


def test_cell_without_any_result_is_nan_not_zero(frames):
    trials, rows = frames
    result = bootstrap_steps_to_result(trials, rows, metric="val_error", threshold=0.001,
                                       n_resamples=100)
    summary = result.summary.set_index("cell_id")
    assert summary["fraction_no_result"].tolist() == [1.0, 1.0]
    ends = summary[["steps_to_result", "steps_median", "steps_low", "steps_high"]]
    assert ends.isna().all().all()


def _many_cells(seed: int, trials_per_cell: int):
    """Two series x four batch sizes, `trials_per_cell` trials each: first-beating steps
    drawn from a few values (so resamples repeat rows), some trials never beating."""
    rng = np.random.default_rng(seed)
    cells, trials, rows = [], [], []
    tid = 0
    for series in ("sgd", "adam"):
        for batch_size in (16, 64, 256, 1024):
            cell = f"{series}-{batch_size}"
            cells.append({"cell_id": cell, "batch_size": batch_size, "optimizer": series,
                          "schedule": "constant"})
            base = 4000 / np.sqrt(batch_size)
            for number in range(trials_per_cell):
                tid += 1
                beats = rng.random() < 0.7
                trials.append(_trial(cell, tid, number, "reached" if beats else "not_reached"))
                step = int(base * rng.choice([1, 1.5, 2, 3])) if beats else 10_000
                rows += _rows(tid, [step], [0.05 if beats else 0.5], batch=batch_size)
    return pd.DataFrame(cells), pd.DataFrame(trials), pd.DataFrame(rows)


@pytest.mark.parametrize("seed,trials_per_cell", [(0, 3), (1, 8), (2, 40)])
def test_refits_of_repeated_resamples_equal_fitting_every_resample(seed, trials_per_cell):
    """fit_scaling fits each distinct resample row once; its intervals must equal those
    from fitting every one of the resamples (many of which repeat) independently."""
    from study.analysis import fit_scaling
    from study.analysis.scaling import fit_steps_curve
    cells, trials, rows = _many_cells(seed, trials_per_cell)
    boot = bootstrap_steps_to_result(trials, rows, **TARGET, n_resamples=300, seed=seed)
    got = fit_scaling(boot.summary, cells, resampled_steps=boot.steps)
    assert (got["n_resamples_fitted"] > 0).all()
    for _, fit in got.iterrows():
        group = cells[cells["optimizer"] == fit["optimizer"]].sort_values("batch_size")
        columns = boot.steps.reindex(columns=list(group["cell_id"])).to_numpy(float)
        sizes = group["batch_size"].to_numpy(float)
        refits = [f for f in (fit_steps_curve(sizes, r) for r in columns) if f]
        assert fit["n_resamples_fitted"] == len(refits)
        for name in ("s_min", "b_crit"):
            values = [getattr(f, name) for f in refits]
            tail = 50.0 * (1.0 - 0.95)  # the default level, computed as fit_scaling does
            assert fit[f"{name}_low"] == np.percentile(values, tail)
            assert fit[f"{name}_high"] == np.percentile(values, 100.0 - tail)
