"""examples/keskar_mnist10k_report.py end to end on a tiny configuration (digits, a few
dozen steps, cheap probe settings): the campaign runs through the worker, the probes
through `batchlab probe`, and the generated report must show exactly what
bl_probe_results and bl_measurements hold; the interpolation's endpoints must be the two
winners' losses evaluated directly from their checkpoints."""
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import keskar_mnist10k_report as report  # noqa: E402

from db import queries  # noqa: E402
from db.engine import make_engine  # noqa: E402
from study.analysis.distance import fit_distance_growth  # noqa: E402

TINY = textwrap.dedent("""
    [campaign]
    name = "keskar_tiny"
    workload = "digits_mlp"
    batch_sizes = [16, 256]
    optimizers = ["adam"]
    schedules = ["constant"]
    trials_per_cell = 2
    max_steps = 400
    eval_every = 5
    seed = 0
    prune = false
    checkpoints = "winners"
    checkpoint_dir = "checkpoints"
    probes = ["distance", "norms"]

    [target]
    metric = "train_loss"
    threshold = 0.2

    [search_space.optimizer.adam]
    learning_rate = { choices = [0.003, 0.01] }
""")
# The second comparison: the same campaign stopped at a validation target.
TINY_VAL = (TINY.replace('name = "keskar_tiny"', 'name = "keskar_tiny_val"')
            .replace('metric = "train_loss"', 'metric = "val_error"')
            .replace("threshold = 0.2", "threshold = 0.15"))
SETTINGS = report.ProbeSettings(epsilons=(1e-3, 5e-4), subspace=10, sharpness_maxiter=3,
                                hessian_examples=600, hessian_max_iter=8, alphas=7,
                                eval_batch_size=512)
KEYS = ("train_loss", "val_error")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    work = tmp_path_factory.mktemp("keskar")
    docs = work / "docs"
    protocols = []
    for key, title, spec_text in zip(KEYS, ("trained to a small training loss", "validation target"),
                                     (TINY, TINY_VAL)):
        spec = work / f"{key}.toml"
        spec.write_text(spec_text)
        protocols.append(report.Protocol(key, title, spec, docs / f"{key}_interp.png",
                                         docs / f"{key}_distance.png"))
    torch.set_num_threads(1)
    out = report.build_report(work=work / "run", report_path=docs / "report.md",
                              protocols=tuple(protocols), settings=SETTINGS, log=lambda line: None)
    return out, work


def _section(out: dict, key: str) -> tuple[dict, str]:
    """(that campaign's summary, the report's section on it: from its '## A.'/'## B.'
    heading to the next '## ' heading)."""
    letter = "AB"[KEYS.index(key)]
    markdown = out["markdown"]
    start = markdown.index(f"\n## {letter}. ")
    end = markdown.find("\n## ", start + 1)
    return out["sections"][key], markdown[start:end if end >= 0 else None]


def _row(markdown: str, name: str) -> list[str]:
    """The cells of the table row whose first cell is `name` (the first such row)."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no table row {name!r} in the report")


def _probe_rows(url: str) -> list[dict]:
    """bl_probe_results read with plain SQL, independently of the report's code."""
    with make_engine(url).connect() as connection:
        rows = connection.execute(text(
            "SELECT p.trial_id, p.kind, p.params, p.result, c.batch_size FROM bl_probe_results p "
            "LEFT JOIN bl_cells c ON c.id = p.cell_id ORDER BY p.id")).mappings().all()
    return [{**r, "params": json.loads(r["params"]), "result": json.loads(r["result"])} for r in rows]


@pytest.mark.parametrize("key", KEYS)
def test_report_numbers_are_the_stored_probe_results(built, key):
    out, _ = built
    summary, markdown = _section(out, key)
    url = summary["url"]
    small, large = summary["winners"][0], summary["winners"][-1]
    assert (small["batch_size"], large["batch_size"]) == (16, 256)
    column = {small["trial_id"]: 1, large["trial_id"]: 2}
    rows = _probe_rows(url)
    sharpness = [r for r in rows if r["kind"] == "sharpness"]
    hessian = [r for r in rows if r["kind"] == "hessian"]
    assert len(sharpness) == 2 * 2 * 2 and len(hessian) == 2  # 2 winners x 2 spaces x 2 eps
    for r in sharpness:
        space, eps = r["params"]["space"], r["params"]["epsilon"]
        name = (f"sharpness, {space} space{' p=10' if space == 'random' else ''}, eps {eps:g} (%)")
        assert _row(markdown, name)[column[r["trial_id"]]] == report.fmt(r["result"]["sharpness"])
        assert _row(markdown, "final training loss f(x), eval mode")[column[r["trial_id"]]] == \
            report.fmt(r["result"]["loss"])
    for r in hessian:
        assert r["params"]["examples"] == 600
        assert _row(markdown, "Hessian top eigenvalue")[column[r["trial_id"]]] == \
            report.fmt(r["result"]["top_eigenvalue"])
        assert _row(markdown, "Hessian trace (Hutchinson)")[column[r["trial_id"]]] == \
            report.fmt(r["result"]["trace"])
    # Ratios and the stated verdict follow from the same numbers, in the section and in
    # the summary table at the top (column A: the headline campaign, B: the second).
    top = {r["trial_id"]: r["result"]["top_eigenvalue"] for r in hessian}
    ratio = top[large["trial_id"]] / top[small["trial_id"]]
    assert _row(markdown, "Hessian top eigenvalue")[3] == report.fmt(ratio)
    assert _row(out["markdown"], "Hessian top eigenvalue")[1 + KEYS.index(key)] == report.fmt(ratio)
    assert report.orderings(summary)["Hessian top eigenvalue"] == (ratio > 1)
    listed = markdown.split("sharper (LB > SB) on:")[1].split("\n")[0].split("Not sharper on:")
    assert ("Hessian top eigenvalue" in listed[0]) == (ratio > 1)
    assert ("Hessian top eigenvalue" in listed[1]) == (ratio <= 1)
    loss = {r["trial_id"]: r["result"]["loss"] for r in sharpness}
    assert _row(out["markdown"], "final training loss f(x), eval mode")[1 + KEYS.index(key)] == \
        report.fmt(loss[large["trial_id"]] / loss[small["trial_id"]])


@pytest.mark.parametrize("key", KEYS)
def test_report_training_numbers_and_distance_fit_come_from_the_measurements(built, key):
    out, _ = built
    summary, markdown = _section(out, key)
    engine = make_engine(summary["url"])
    with engine.connect() as connection:
        metric, threshold = connection.execute(text(
            "SELECT target_metric, target_threshold FROM bl_campaigns")).one()
    assert metric == key  # the headline campaign's target is the training loss
    trials = queries.trial_checkpoints(engine, 1).set_index("trial_id")
    for i, winner in enumerate((summary["winners"][0], summary["winners"][-1]), start=1):
        trial = trials.loc[winner["trial_id"]]
        assert trial["outcome"] == "reached"
        # The winner is the cell's trial with the fewest steps to result.
        cell = trials.loc[trials["cell_id"] == trial["cell_id"]]
        assert trial["steps_to_result"] == cell["steps_to_result"].min()
        assert _row(markdown, "steps to result")[i] == str(int(trial["steps_to_result"]))
        m = queries.measurements_of_trials(engine, [winner["trial_id"]])
        at = m.loc[m["step"] == trial["steps_to_result"]].iloc[0]
        assert at[metric] < threshold  # reached: strictly below the target there...
        earlier = m.loc[m["step"] < trial["steps_to_result"], metric]
        assert (earlier >= threshold).all()  # ...and not before
        assert _row(markdown, "epochs to result")[i] == report.fmt(float(at["epoch"]))
        assert _row(markdown, f"{metric} at the result step (target {metric} < {threshold:g})")[i] \
            == report.fmt(float(at[metric]))
        fit = fit_distance_growth(m)
        name = f"B = {winner['batch_size']} (trial {winner['trial_id']})"
        if fit is not None:
            assert _row(markdown, name)[2:5] == [report.fmt(fit.intercept), report.fmt(fit.slope),
                                                 report.fmt(fit.r_squared)]
        last = json.loads(m["extra"].iloc[-1])["distance_from_init"]
        assert _row(markdown, name)[1] == report.fmt(last)


@pytest.mark.parametrize("key", KEYS)
def test_interpolation_endpoints_are_the_winners_losses(built, key):
    from study.probe_cli import load_winner_model, training_batches, winners
    out, _ = built
    summary, markdown = _section(out, key)
    engine = make_engine(summary["url"])
    found = {w.trial_id: w for w in winners(engine, 1, log=lambda line: None)}
    small, large = summary["winners"][0], summary["winners"][-1]
    for batch_norm in ("batch_stats", "interpolate_running"):
        row = summary["interpolation"][batch_norm]["result"]
        alphas = row["alphas"]
        for entry, alpha in ((small, 0.0), (large, 1.0)):
            winner = found[entry["trial_id"]]
            workload, model, config = load_winner_model(winner, torch.device("cpu"))
            (x, y), = training_batches(workload, config, torch.device("cpu"), batch_size=100_000)
            with torch.no_grad():
                direct = float(F.cross_entropy(model.eval()(x), y))  # digits_mlp: no batch norm
            assert row["train_loss"][alphas.index(alpha)] == pytest.approx(direct, rel=1e-5)
            # The sharpness probe's f(x) is the same function at the same weights.
            assert entry["probe_train_loss"] == pytest.approx(direct, rel=1e-5)
    table = _row(markdown, "0")  # the interpolation table's alpha = 0 row
    assert table[1] == report.fmt(summary["interpolation"]["batch_stats"]["result"]["train_loss"][2])


def test_figures_are_written_and_linked_and_the_headline_is_the_training_loss_protocol(built):
    out, work = built
    for key in KEYS:
        for name in (f"{key}_interp.png", f"{key}_distance.png"):
            path = work / "docs" / name
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in _section(out, key)[1]
    markdown = out["markdown"]
    assert markdown.startswith("# Keskar et al. on digits_mlp")
    answer = report.verdict(out["sections"]["train_loss"])[0]
    assert markdown.splitlines()[0].endswith(f"{answer.capitalize()} (trained to train_loss < 0.2)")
    assert f"Generated by `{report.COMMAND}`" in markdown
    # The title answers for the headline campaign, whose summary the build returns.
    assert out["url"] == out["sections"]["train_loss"]["url"]


def test_the_shipped_specs_follow_the_two_protocols():
    from study.spec import parse_spec
    headline, second = (parse_spec(p.spec.read_text(), str(p.spec)) for p in report.PROTOCOLS)
    assert (headline.target.metric, second.target.metric) == ("train_loss", "val_error")
    for spec in (headline, second):
        assert spec.batch_sizes == [128, 800] or tuple(spec.batch_sizes) == (128, 800)
        assert spec.trials_per_cell == 3
