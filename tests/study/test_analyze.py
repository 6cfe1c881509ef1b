"""`batchlab analyze` on an imported archive whose steps follow S(B) = S_min (1 + B_crit / B)."""
import json

import pytest

from study.cli import main

from tests.study.shallue_fixtures import scaling_archive

S_MIN, B_CRIT = 1000.0, 256.0
BATCH_SIZES = tuple(2 ** k for k in range(4, 15))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    expected = scaling_archive(tmp / "data", s_min=S_MIN, b_crit=B_CRIT, batch_sizes=BATCH_SIZES)
    url = f"sqlite:///{tmp / 'a.db'}"
    assert main(["import-shallue", str(tmp / "data"), "--storage", url]) == 0
    out = tmp / "report"
    assert main(["analyze", "--campaign", "shallue/mnist/simple_cnn", "--output", str(out),
                 "--resamples", "200", "--storage", url]) == 0
    return json.loads((out / "summary.json").read_text()), out, expected


def test_summary_recovers_the_curve_and_the_exact_steps(analyzed):
    summary, _, expected = analyzed
    cells = {c["batch_size"]: c for c in summary["cells"]}
    assert {b: cells[b]["steps_to_result"] for b in BATCH_SIZES} == expected
    (fit,) = summary["fits"]
    assert fit["b_crit"] == pytest.approx(B_CRIT, rel=0.1)
    assert fit["s_min"] == pytest.approx(S_MIN, rel=0.1)
    assert fit["b_crit_low"] <= fit["b_crit"] <= fit["b_crit_high"]
    # Regimes: the smallest batch sizes scale perfectly, the largest are a plateau.
    assert cells[16]["regime"] == "perfect_scaling"
    assert cells[16]["slope_to_next"] == pytest.approx(-0.95, abs=0.1)
    assert cells[2 ** 14]["regime"] in ("maximal_data_parallelism", "diminishing_returns")
    assert summary["target"] == {"metric": "val_error", "threshold": 0.01, "mode": "min",
                                 "text": "val_error < 0.01"}
    # The evaluation interval varies with B (S(B)/40): the most common is stored and said so.
    assert "vary" in summary["evaluation_interval"]["note"]
    assert summary["trials"]["by_outcome"]["diverged"] == len(BATCH_SIZES)
    assert "censor" in summary["censoring"]["note"]


def test_optimal_hparams_edges_and_sensitivity(analyzed):
    summary, _, _ = analyzed
    laws = {p["parameter"]: p for p in summary["optimal_hparams"]["power_laws"]}
    # lr_opt = 0.1 B / 16 up to B_crit = 256, then flat: a power law between 0 and 1.
    assert 0.2 < laws["learning_rate"]["exponent"] < 1.0
    assert laws["momentum"]["exponent"] == pytest.approx(0.0, abs=1e-9)
    # Momentum 0.99 lies inside 0.9 .. 0.9999; no learning rate is near 1e-4 or 10.
    assert summary["edge_warnings"] == []
    rows = [r for r in summary["trial_count_sensitivity"] if r["batch_size"] == 16]
    by_n = {r["n_trials"]: r for r in rows}
    assert by_n[max(by_n)]["ratio_to_final"] == 1.0
    assert by_n[1]["n_used"] == 1


def test_figures_are_png_and_svg(analyzed):
    summary, out, _ = analyzed
    figures = summary["figures"]
    stems = {f.rsplit(".", 1)[0] for f in figures}
    assert {"steps_vs_batch_size", "examples_vs_batch_size", "optimal_learning_rate_vs_batch_size",
            "optimal_effective_learning_rate_vs_batch_size", "best_under_step_budget"} <= stems
    assert len([s for s in stems if s.startswith("search_space/")]) == len(BATCH_SIZES)
    assert len(figures) == 2 * len(stems)
    for name in figures:
        data = (out / name).read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG_SIGNATURE)
        else:
            assert data.lstrip().startswith(b"<svg")
    assert b"Steps to result" in (out / "steps_vs_batch_size.svg").read_bytes()


def test_unknown_campaign_is_a_one_line_error(tmp_path, capsys, analyzed):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["analyze", "--campaign", "nope", "--output", str(tmp_path), "--storage", url]) == 2
    assert "no such database" in capsys.readouterr().err


PROBED = """
[campaign]
name = "probed_analysis"
workload = "digits_mlp"
batch_sizes = [16, 256]
optimizers = ["adam"]
schedules = ["constant"]
trials_per_cell = 1
max_steps = 300
eval_every = 5
probes = ["distance"]
checkpoints = "winners"
checkpoint_dir = "CKPT"

[target]
metric = "val_error"
threshold = 0.15

[search_space.optimizer.adam]
learning_rate = 0.01
"""


def test_analyze_reports_distance_fits_and_stored_probes(tmp_path):
    """A campaign with the distance probe: `batchlab analyze` fits d = a + b ln t to each
    winner's stored distances (the same numbers as study.analysis.distance on the rows);
    given bl_probe_results, it reports and draws them too."""
    import numpy as np

    from db import queries
    from db.engine import make_engine
    from study import report
    from study.analysis.distance import fit_distance_growth
    from study.analyze import AnalyzeOptions, analyze_campaign
    from study.campaigns import create_campaign
    from study.spec import parse_spec
    from study.worker import CampaignWorker
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = make_engine(url)
    create_campaign(engine, url, parse_spec(PROBED.replace("CKPT", str(tmp_path / "ckpt"))))
    CampaignWorker(engine, url, "probed_analysis", device="cpu", log=lambda line: None).run()
    out = tmp_path / "cli"
    assert main(["analyze", "--campaign", "probed_analysis", "--output", str(out),
                 "--resamples", "20", "--no-cell-figures", "--storage", url]) == 0
    summary = json.loads((out / "summary.json").read_text())
    fits = summary["distance_from_init"]["winners"]
    assert [f["batch_size"] for f in fits] == [16, 256]
    measurements = queries.measurements(engine, 1)
    for f in fits:
        trial = measurements.loc[measurements["trial_id"] == f["trial_id"]]
        expected = fit_distance_growth(trial)
        if expected is None:  # fewer than 3 evaluations
            assert "slope" not in f
            continue
        assert (f["intercept"], f["slope"], f["n_points"]) == pytest.approx(
            (expected.intercept, expected.slope, expected.n_points))
        stored = set(trial["extra"].iloc[-1]["distance_per_layer"])
        assert stored and {r["layer"] for r in f["per_layer"]} == stored
    assert "distance_from_init.png" in summary["figures"]
    assert "probes" not in summary  # the CLI passes no probe rows

    assert main(["probe", "hessian", "--campaign", "probed_analysis", "--max-iter", "5",
                 "--storage", url]) == 0
    assert main(["probe", "interpolate", "--campaign", "probed_analysis", "--alphas", "4",
                 "--storage", url]) == 0
    probes = queries.probe_results(engine, 1)
    data = report.load_campaign(engine, "probed_analysis")
    result = analyze_campaign(data, tmp_path / "api", AnalyzeOptions(n_resamples=20, cell_figures=False,
                                                                     formats=("png",)), probes=probes)
    values = {(v["trial_id"], v["setting"]): v["value"] for v in result.summary["probes"]["values"]}
    for row in probes.loc[probes["kind"] == "hessian"].itertuples():
        assert values[(row.trial_id, "top_eigenvalue")] == row.result["top_eigenvalue"]
    (interpolation,) = result.summary["probes"]["interpolation"]
    assert np.allclose(interpolation["alphas"], [-1, 0, 1, 2])
    assert {"probe_hessian_vs_batch_size.png", "probe_interpolation_batch_stats.png"} <= set(
        result.summary["figures"])
