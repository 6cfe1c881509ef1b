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
