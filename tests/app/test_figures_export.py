"""Static export of every dashboard figure (vl-convert, offline): PNG signature, and the
SVG's text names the workload, the target and the evaluation interval."""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import pytest

from app import data
from db.engine import make_engine
from study import figures
from tests.app.conftest import CAMPAIGN, STEPS_TO_RESULT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTEXT = {"workload": "digits_mlp", "target": "val_error < 0.1", "eval_every": 10}


@pytest.fixture(scope="module")
def campaign(dashboard_db):
    return data.load_campaign(make_engine(dashboard_db, read_only=True), CAMPAIGN)


def build(name: str, campaign: data.CampaignData):
    analysis = data.scaling_analysis(campaign, n_resamples=100)
    rows = data.curves(campaign, data.winner_trial_ids(campaign))
    if name == "scaling_study_chart":
        points = figures.scaling_points(campaign.table, intervals=analysis.summary)
        curves = figures.scaling_fit_curves(analysis.fits, points)
        bands = figures.regime_bands(analysis.regimes)
        return figures.scaling_study_chart(points, curves=curves, bands=bands,
                                           shaded_series="momentum / constant",
                                           b_crit={"momentum / constant": 90.0}, **CONTEXT)
    if name == "hparam_scatter_chart":
        scatter = data.scatter(campaign)
        return figures.hparam_scatter_chart(scatter.loc[scatter["cell_id"] == 1],
                                            cell_label="B=16", **CONTEXT)
    if name == "hparam_scaling_chart":
        return figures.hparam_scaling_chart(data.winners(campaign), "learning_rate", **CONTEXT)
    if name == "learning_curve_chart":
        return figures.learning_curve_chart(rows, threshold=0.1, **CONTEXT)
    if name == "smith_comparison_chart":
        return figures.smith_comparison_chart(rows, threshold=0.1, **CONTEXT)
    if name == "training_trace_chart":
        return figures.training_trace_chart(rows, "noise_scale", log_y=True, **CONTEXT)
    if name == "budget_chart":
        return figures.budget_chart(data.budget_frame(campaign, [50, 200], "steps"), **CONTEXT)
    if name == "progress_chart":
        return figures.progress_chart(data.progress_table(campaign), **CONTEXT)
    raise KeyError(name)


FIGURES = ["scaling_study_chart", "hparam_scatter_chart", "hparam_scaling_chart",
           "learning_curve_chart", "smith_comparison_chart", "training_trace_chart",
           "budget_chart", "progress_chart"]


def svg_text(path) -> str:
    root = ElementTree.parse(path).getroot()
    return " ".join("".join(node.itertext()) for node in root.iter()
                    if node.tag.endswith("text"))


@pytest.mark.parametrize("name", FIGURES)
def test_figure_exports_png_and_svg_with_context(name, campaign, tmp_path):
    chart = build(name, campaign)
    png = figures.save_chart(chart, tmp_path / f"{name}.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    svg = figures.save_chart(chart, tmp_path / f"{name}.svg")
    text = svg_text(svg)
    assert "digits_mlp" in text and "val_error < 0.1" in text
    assert "evaluated every 10 steps" in text


def test_scaling_points_normalise_and_perfect_scaling(campaign):
    points = figures.scaling_points(campaign.table, "steps_to_result", normalize_at=16)
    by_b = dict(zip(points["batch_size"], points["value"]))
    assert by_b[16] == pytest.approx(1.0)
    assert by_b[64] == pytest.approx(STEPS_TO_RESULT[64] / STEPS_TO_RESULT[16])
    perfect = dict(zip(points["batch_size"], points["perfect_scaling"]))
    assert perfect[128] == pytest.approx(16 / 128)


def test_regime_bands_cover_batch_sizes_between_midpoints():
    import pandas as pd
    regimes = pd.DataFrame({"batch_size": [16, 32, 64, 128],
                            "regime": ["perfect_scaling", "perfect_scaling",
                                       "diminishing_returns", "maximal_data_parallelism"]})
    bands = figures.regime_bands(regimes)
    assert bands["regime"].tolist() == ["perfect_scaling", "diminishing_returns",
                                        "maximal_data_parallelism"]
    assert bands["start"].iloc[0] == pytest.approx(16 / 2 ** 0.5)
    assert bands["end"].iloc[0] == pytest.approx((32 * 64) ** 0.5)


def test_existing_scaling_chart_still_exports(campaign, tmp_path):
    chart = figures.scaling_chart(campaign.table, **CONTEXT)
    assert figures.save_chart(chart, tmp_path / "s.png").read_bytes()[:8] == PNG_SIGNATURE


def test_scaling_chart_ticks_at_powers_of_two_even_for_two_batch_sizes():
    """`batchlab figure`'s x axis: ticks at the powers of two the batch sizes span (with
    two batch sizes a plain log axis ticked at 40, 50, ..., 120)."""
    import pandas as pd
    table = pd.DataFrame({"batch_size": [32, 128], "optimizer": "sgd", "schedule": "constant",
                          "steps_to_result": [400, 150]})
    x = figures.scaling_chart(table, **CONTEXT).to_dict()["layer"][1]["encoding"]["x"]
    assert x["axis"]["values"] == [32, 64, 128]
    assert x["scale"]["domain"] == pytest.approx([32 / 2 ** 0.5, 128 * 2 ** 0.5])


def test_perfect_scaling_reference_keeps_examples_constant():
    """Perfect scaling halves the steps when B doubles, so the examples (steps x B) stay
    what they were at the smallest batch size: the dashed line is flat on the examples
    plot (spec: steps[0] * B0 / B is the steps line)."""
    import pandas as pd
    table = pd.DataFrame({"cell_id": [1, 2, 3], "batch_size": [16, 32, 64],
                          "optimizer": "sgd", "schedule": "constant",
                          "steps_to_result": [100, 50, 40],
                          "examples_to_result": [1600, 1600, 2560]})
    steps = figures.scaling_points(table, "steps_to_result")
    assert steps["perfect_scaling"].tolist() == pytest.approx([100, 50, 25])
    examples = figures.scaling_points(table, "examples_to_result")
    assert examples["perfect_scaling"].tolist() == pytest.approx([1600, 1600, 1600])
    normalised = figures.scaling_points(table, "examples_to_result", normalize_at=32)
    assert normalised["perfect_scaling"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert figures.scaling_frame(table, "examples_to_result")["perfect_scaling"].tolist() == \
        pytest.approx([1600, 1600, 1600])


def test_curves_leave_out_epochs_and_seconds_that_were_never_recorded():
    """Imported published data and the NQM store epoch 0 and wall seconds 0 at every
    evaluation (the columns are NOT NULL; nothing was recorded). Plotted as values they
    put every run on a vertical line at 0 epochs / 0 s; they are left out instead, while
    a trained run's own step-0 evaluation (0 epochs, 0 s) stays."""
    import pandas as pd
    imported = pd.DataFrame({"run": "imported", "trial_id": 1, "step": [0, 100, 200],
                             "epoch": 0.0, "wall_seconds": 0.0, "examples": [0, 1600, 3200],
                             "learning_rate": 0.1, "val_error": [0.9, 0.2, 0.05]})
    trained = pd.DataFrame({"run": "trained", "trial_id": 2, "step": [0, 100, 200],
                            "epoch": [0.0, 0.5, 1.0], "wall_seconds": [0.0, 1.5, 3.0],
                            "examples": [0, 1600, 3200], "learning_rate": 0.1,
                            "val_error": [0.9, 0.3, 0.1]})
    rows = pd.concat([imported, trained], ignore_index=True)

    def plotted(chart):  # a layer chart may hold its one data frame at the top
        return chart.data if isinstance(chart.data, pd.DataFrame) else chart.layer[0].data
    for x in ("epoch", "wall_seconds"):
        chart = figures.learning_curve_chart(rows, x=x, **CONTEXT)
        assert plotted(chart)["run"].tolist() == ["trained"] * 3, x
        trace = figures.training_trace_chart(rows, "learning_rate", x=x, **CONTEXT)
        assert trace.data["run"].tolist() == ["trained"] * 3, x
    by_epoch = figures.smith_comparison_chart(rows, **CONTEXT).hconcat[0]
    assert plotted(by_epoch)["run"].tolist() == ["trained"] * 3
    by_step = figures.learning_curve_chart(rows, x="step", log_x=False, **CONTEXT)
    assert len(plotted(by_step)) == 6
    only_imported = figures.learning_curve_chart(imported, x="epoch", **CONTEXT)
    assert plotted(only_imported).empty
    assert "no epoch recorded" in " ".join(only_imported.title.subtitle)


def test_dashboard_figures_say_when_the_evaluation_interval_varies():
    """The dashboard's figure context and page captions name the workload with the note
    that an imported campaign's evaluation interval varies (CampaignInfo)."""
    from app import common
    from study.results import CampaignInfo
    varying = CampaignInfo(1, "shallue/mnist/simple_cnn", "mnist/simple_cnn", "val_error",
                           0.01, "min", 100, eval_interval_varies=True)
    assert "evaluation interval varies" in common.context(varying)["workload"]
    assert "evaluation interval varies" in common.figure_context(varying).line()
    native = CampaignInfo(2, "demo", "digits_mlp", "val_error", 0.1, "min", 10)
    assert common.context(native)["workload"] == "digits_mlp"
