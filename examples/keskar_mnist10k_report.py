"""Run examples/keskar_mnist10k.toml and examples/keskar_mnist10k_val.toml and generate
docs/keskar_mnist10k_report.md: Keskar et al.'s probes of the small-batch and large-batch
campaign winners (F1 on MNIST-10k), under two protocols.

    .venv/bin/python examples/keskar_mnist10k_report.py        # about 17 minutes on 2 CPU cores

The headline follows the paper: both regimes are trained to a small training loss (target
train_loss < 0.01, the training-mode average since the last evaluation) and the minima
compared there. The second comparison uses batchlab's usual validation target
(val_error < 0.04, fewest steps to it), where training stops after a few epochs.

Steps per campaign, all through batchlab's own API and CLI, so every number in the report
is read back from the SQL tables:
1. create the campaign from the spec and run one in-process worker (the same as
   `batchlab run SPEC --workers 1`); the workers save each reached trial's final weights
   (checkpoints = "winners");
2. `batchlab probe sharpness`, `batchlab probe hessian` and `batchlab probe interpolate`
   (twice: batch statistics for Keskar's figure, running statistics with alphas
   -1, 0, 1, 2 for the endpoints in eval mode) on each cell's winner, stored in
   bl_probe_results;
3. read bl_probe_results, bl_trials and bl_measurements back, fit Hoffer et al.'s
   d = a + b ln t to each winner's stored distance from initialization
   (`study.analysis.distance`), draw the figures with `study.figures` and write the report.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA_DIR = ROOT.parent / "shared" / "datasets" / "mnist-t10k"
DOCS = ROOT / "docs"
REPORT = DOCS / "keskar_mnist10k_report.md"
COMMAND = ".venv/bin/python examples/keskar_mnist10k_report.py"


@dataclass(frozen=True)
class Protocol:
    """One campaign of the report: its spec, its folder under --work and its figures."""
    key: str
    title: str
    spec: Path
    interpolation_figure: Path | None = None
    distance_figure: Path | None = None


# The first protocol is the headline (the paper's); the others are further comparisons.
PROTOCOLS = (
    Protocol("train_loss", "Paper protocol: both trained to a small training loss",
             ROOT / "examples" / "keskar_mnist10k.toml",
             DOCS / "keskar_mnist10k_interpolation.png", DOCS / "keskar_mnist10k_distance.png"),
    Protocol("val_error", "batchlab's steps-to-result protocol: stopped at a validation target",
             ROOT / "examples" / "keskar_mnist10k_val.toml",
             DOCS / "keskar_mnist10k_val_interpolation.png", DOCS / "keskar_mnist10k_val_distance.png"),
)
SPEC = PROTOCOLS[0].spec


@dataclass(frozen=True)
class ProbeSettings:
    """What the probe commands are run with (their CLI options)."""
    epsilons: tuple[float, ...] = (1e-3, 5e-4)
    subspace: int = 100               # random-subspace columns p (0: full space only)
    sharpness_maxiter: int = 10       # L-BFGS-B iterations, as Keskar
    hessian_examples: int | None = 2000  # fixed random training subset for the Hessian
    hessian_max_iter: int = 30
    hessian_tol: float = 1e-3
    alphas: int = 25                  # Keskar's linspace(-1, 2, 25)
    eval_batch_size: int = 5000       # Keskar's evaluation batch (matters for batch statistics)


def fmt(value) -> str:
    """The one number format of the report (tests compare against it)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.4g}"


# ---- 1. the campaign -----------------------------------------------------------------------
def spec_text(work: Path, spec_path: Path = SPEC) -> str:
    """The spec with checkpoints under `work` and a relative data_dir made absolute
    (relative to the repository root, where `batchlab run` is meant to be started)."""
    text = spec_path.read_text()
    text = re.sub(r'checkpoint_dir = "[^"]*"', f'checkpoint_dir = "{work / "checkpoints"}"', text)

    def absolute(match: re.Match) -> str:
        path = Path(match.group(1))
        return f'data_dir = "{path if path.is_absolute() else (ROOT / path).resolve()}"'
    return re.sub(r'data_dir = "([^"]*)"', absolute, text)


def run_campaign(text: str, work: Path, spec_path: Path = SPEC, log=print) -> tuple[str, str]:
    """Create the campaign in a fresh SQLite file under `work` and run one in-process
    worker until every cell has its trials. Returns (storage URL, campaign name)."""
    from db.engine import make_engine
    from study.campaigns import create_campaign
    from study.spec import parse_spec
    from study.worker import CampaignWorker
    for stale in (work / "campaign.db", work / "checkpoints"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    work.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{work / 'campaign.db'}"
    engine = make_engine(url)
    spec = parse_spec(text, str(spec_path))
    create_campaign(engine, url, spec)
    CampaignWorker(engine, url, spec.name, device="cpu", log=log).run()
    return url, spec.name


# ---- 2. the probes, through the CLI --------------------------------------------------------
def probe_commands(url: str, campaign: str, settings: ProbeSettings) -> list[list[str]]:
    common = ["--campaign", campaign, "--storage", url]
    hessian_subset = ([] if settings.hessian_examples is None
                      else ["--max-examples", str(settings.hessian_examples)])
    return [
        ["probe", "sharpness", *common, "--epsilon", *map(str, settings.epsilons),
         "--subspace", str(settings.subspace), "--maxiter", str(settings.sharpness_maxiter)],
        ["probe", "hessian", *common, *hessian_subset, "--max-iter", str(settings.hessian_max_iter),
         "--tol", str(settings.hessian_tol)],
        ["probe", "interpolate", *common, "--batch-norm", "batch_stats",
         "--alphas", str(settings.alphas), "--eval-batch-size", str(settings.eval_batch_size)],
        ["probe", "interpolate", *common, "--batch-norm", "interpolate_running",
         "--alphas", "4", "--eval-batch-size", str(settings.eval_batch_size)],
    ]


def run_probes(url: str, campaign: str, settings: ProbeSettings, log=print) -> dict[str, float]:
    """Run the probe commands; returns wall seconds per command."""
    from study.cli import main
    seconds = {}
    for argv in probe_commands(url, campaign, settings):
        started = time.perf_counter()
        if main(argv) != 0:
            raise SystemExit(f"batchlab {' '.join(argv)} failed")
        name = " ".join(argv[:2]) + (f" ({argv[argv.index('--batch-norm') + 1]})"
                                      if "--batch-norm" in argv else "")
        seconds[name] = time.perf_counter() - started
        log(f"{name}: {seconds[name]:.0f} s")
    return seconds


# ---- 3. reading everything back from SQL ---------------------------------------------------
def _json(value) -> dict:
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def collect(url: str, campaign: str) -> dict:
    """Everything the report shows, read from SQL: per winner (smallest batch size
    first) its trial, training result, probes and distance fit; the interpolation rows;
    all trials of the campaign."""
    from db import queries
    from db.engine import make_engine
    from study.analysis.distance import distance_series, fit_distance_growth
    from study.probe_cli import winners
    from study.results import campaign_info
    engine = make_engine(url)
    info = campaign_info(engine, campaign)
    found = winners(engine, info.id, log=lambda line: None)
    trials = queries.trial_checkpoints(engine, info.id)
    measurements = queries.measurements_of_trials(engine, trials["trial_id"])
    probes = queries.probe_results(engine, info.id)
    rows = []
    for winner in found:
        m = measurements.loc[measurements["trial_id"] == winner.trial_id].sort_values("step")
        at = m.loc[m["step"] == winner.steps_to_result].iloc[0]
        fit = fit_distance_growth(m)
        series = distance_series(m)
        entry = {"cell_id": winner.cell_id, "trial_id": winner.trial_id,
                 "batch_size": winner.batch_size, "label": winner.label,
                 "learning_rate": winner.config["hparams"].get("learning_rate"),
                 "steps_to_result": winner.steps_to_result, "epochs_to_result": float(at["epoch"]),
                 "metric_at_result": float(at[info.metric]),
                 "val_error_at_result": float(at["val_error"]),
                 "interval_train_loss_at_result": float(at["train_loss"]),
                 "distance_fit": fit, "distance_series": series,
                 "final_distance": float(series["distance"].iloc[-1]) if len(series) else None,
                 "sharpness": {}}
        mine = probes.loc[probes["trial_id"] == winner.trial_id]
        for row in mine.itertuples():  # oldest first: a newer row of the same kind wins
            if row.kind == "sharpness":
                params, result = _json(row.params), _json(row.result)
                entry["sharpness"][(params["space"], float(params["epsilon"]))] = result["sharpness"]
                entry["probe_train_loss"] = result["loss"]
                entry["probe_examples"] = params["examples"]
                if params["space"] == "random":
                    entry["subspace_dim"] = params["subspace_dim"]
            elif row.kind == "hessian":
                params, result = _json(row.params), _json(row.result)
                entry.update(top_eigenvalue=result["top_eigenvalue"], trace=result["trace"],
                             eigen_converged=result["converged"],
                             eigen_iterations=result["eigen_iterations"],
                             trace_samples=result["trace_samples"],
                             hessian_examples=params["examples"])
        rows.append(entry)
    interpolation = {}
    for row in probes.loc[probes["kind"] == "interpolation"].itertuples():
        params = _json(row.params)
        interpolation[params["batch_norm"]] = {"params": params, "result": _json(row.result),
                                               "id": int(row.id)}
    small, large = (rows[0], rows[-1]) if rows else (None, None)
    running = interpolation.get("interpolate_running")
    if running is not None and small is not None:
        alphas = running["result"]["alphas"]
        for entry, alpha in ((small, 0.0), (large, 1.0)):
            i = min(range(len(alphas)), key=lambda k: abs(alphas[k] - alpha))
            for split in ("train", "test"):
                entry[f"eval_{split}_loss"] = running["result"][f"{split}_loss"][i]
                accuracy = running["result"][f"{split}_accuracy"][i]
                entry[f"eval_{split}_error"] = None if accuracy is None else 1.0 - accuracy
    return {"info": info, "winners": rows, "interpolation": interpolation,
            "trials": trials, "probe_rows": probes}


# ---- figures and the report ----------------------------------------------------------------
def draw_figures(summary: dict, interpolation_path: Path | None,
                 distance_path: Path | None) -> dict[str, Path]:
    """The interpolation figure and the distance-from-initialization figure, drawn with
    `study.figures` from the summary's SQL numbers; returns {"interpolation"|"distance": path}."""
    from study.figures import (distance_growth_chart, distance_growth_frame, interpolation_chart,
                               interpolation_frame, save_chart)
    info, written = summary["info"], {}
    context = {"workload": info.workload, "target": info.target_text, "eval_every": info.eval_every}
    batch_stats = summary["interpolation"].get("batch_stats")
    if interpolation_path is not None and batch_stats is not None:
        result = batch_stats["result"]
        small, large = summary["winners"][0], summary["winners"][-1]
        curves = {k: v for k, v in result.items() if k != "alphas"}
        chart = interpolation_chart(interpolation_frame(result["alphas"], curves),
                                    small_label=small["label"], large_label=large["label"],
                                    batch_norm="batch_stats", **context)
        written["interpolation"] = save_chart(chart, interpolation_path)
    if distance_path is not None and summary["winners"]:
        series = {f"B={w['batch_size']} (trial {w['trial_id']})": w["distance_series"]
                  for w in summary["winners"]}
        fits = {f"B={w['batch_size']} (trial {w['trial_id']})": w["distance_fit"]
                for w in summary["winners"]}
        chart = distance_growth_chart(distance_growth_frame(series, fits), **context)
        written["distance"] = save_chart(chart, distance_path)
    return written


def measures(summary: dict) -> list[tuple[str, object]]:
    """(name, key) of the sharpness-type measures compared between the two winners."""
    first = summary["winners"][0]
    p = first.get("subspace_dim")
    out = [(f"sharpness, {space} space{f' p={p}' if space == 'random' else ''}, "
            f"eps {eps:g} (%)", ("sharpness", (space, eps)))
           for space, eps in sorted(first["sharpness"], key=lambda k: (k[0] != "full", -k[1]))]
    out.append(("Hessian top eigenvalue", "top_eigenvalue"))
    out.append(("Hessian trace (Hutchinson)", "trace"))
    return out


def value_of(entry: dict, key):
    if isinstance(key, tuple) and key[0] == "sharpness":
        return entry["sharpness"].get(key[1])
    return entry.get(key)


def orderings(summary: dict) -> dict[str, bool | None]:
    """Per measure: is the largest-batch winner's value above the smallest-batch one's?"""
    small, large = summary["winners"][0], summary["winners"][-1]
    out = {}
    for name, key in measures(summary):
        a, b = value_of(small, key), value_of(large, key)
        out[name] = None if a is None or b is None else bool(b > a)
    return out


def interpolation_text(alphas: list[float], train_loss: list[float | None]) -> list[str]:
    """What the curve says, from its numbers: the barrier between the two solutions and
    how steeply the training loss rises outward from each (one unit of alpha beyond
    each endpoint, the same Euclidean step ||x_LB - x_SB|| on both sides)."""
    def at(alpha):
        i = min(range(len(alphas)), key=lambda k: abs(alphas[k] - alpha))
        return train_loss[i] if abs(alphas[i] - alpha) < 1e-9 else None
    f0, f1, f_left, f_right = at(0.0), at(1.0), at(-1.0), at(2.0)
    if f0 is None or f1 is None:
        return []
    inner = [(a, v) for a, v in zip(alphas, train_loss) if 0 < a < 1 and v is not None]
    out = []
    if inner:
        a_max, v_max = max(inner, key=lambda item: item[1])
        out.append(f"Between the two solutions the training loss peaks at {fmt(v_max)} (alpha "
                   f"{fmt(a_max)}), {fmt(v_max / max(f0, f1))} x the higher endpoint: "
                   + ("a barrier, so the two winners sit in different basins."
                      if v_max > 1.5 * max(f0, f1) else "no marked barrier between them."))
    if f_left is not None and f_right is not None:
        rise_small, rise_large = f_left - f0, f_right - f1
        steeper = "large-batch" if rise_large > rise_small else "small-batch"
        out.append(f"Stepping one alpha unit outward, the training loss rises by {fmt(rise_small)} "
                   f"beyond the small-batch solution (alpha 0 -> -1) and by {fmt(rise_large)} "
                   f"beyond the large-batch one (alpha 1 -> 2): along this line the {steeper} "
                   f"side is the steeper one.")
    return out


def _ratio(a, b):
    if a is None or b is None or not a:
        return None
    return b / a


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in rows])


def verdict(summary: dict) -> tuple[str, list[str], list[str]]:
    """(answer, headline measures, headline measures on which LB > SB): Keskar's headline
    measures are the full-space sharpness at each epsilon and the top Hessian eigenvalue."""
    order = orderings(summary)
    headline = [k for k in order if k.startswith("sharpness, full") or k == "Hessian top eigenvalue"]
    held = [k for k in headline if order[k]]
    answer = ("yes" if headline and len(held) == len(headline)
              else "no" if not held else "only on some measures")
    return answer, headline, held


def protocol_text(summary: dict) -> str:
    """How the campaign picked and stopped its winners, from its stored target."""
    info, small, large = summary["info"], summary["winners"][0], summary["winners"][-1]
    if info.metric == "train_loss":
        return (f"The paper's protocol: every trial trains until its training loss (the "
                f"training-mode average over the {info.eval_every} steps since the previous "
                f"evaluation) first falls below {info.threshold:g}, and each cell's winner is the "
                f"trial that gets there in the fewest steps. Keskar et al. train both regimes "
                f"to a small training loss and compare the minima there; the large batch, "
                f"{large['batch_size']}, is {_share(large)} of the "
                f"{fmt(small.get('probe_examples'))} training examples (the paper's LB: 10%).")
    return (f"batchlab's steps-to-result protocol: every trial stops as soon as "
            f"{info.target_text} and each cell's winner is the trial with the fewest steps to "
            f"it. These are the solutions at the moment each batch size first reached the "
            f"target, not trained to a small training loss as in the paper.")


def _share(entry: dict) -> str:
    examples = entry.get("probe_examples")
    return f"{100 * entry['batch_size'] / examples:.0f}%" if examples else "-"


def protocol_short(info) -> str:
    """One sentence: which minima this campaign compares, and why."""
    if info.metric == "train_loss":
        return (f"trains every run until its training loss first falls below {info.threshold:g} "
                f"({info.target_text}), as in the paper, which compares the minima reached after "
                f"training both regimes to a small training loss")
    return (f"stops every run as soon as {info.target_text}, batchlab's usual steps-to-result "
            f"target, so the minima are compared after only the few epochs it takes to get there")


def loss_match_text(summary: dict) -> str:
    info, small, large = summary["info"], summary["winners"][0], summary["winners"][-1]
    ratio = _ratio(small.get("probe_train_loss"), large.get("probe_train_loss"))
    if ratio is None:
        return ""
    crossed = ""
    if info.metric == "train_loss":
        crossed = (f"Both winners stopped just below the target in training mode (interval loss SB "
                   f"{fmt(small['metric_at_result'])}, LB {fmt(large['metric_at_result'])} at their "
                   f"result steps); in eval mode on the whole training set, which the probes use, ")
    if 1 / 1.5 <= ratio <= 1.5:
        text = (f"the two winners are at about the same training loss (f(x) LB / SB = "
                f"{fmt(ratio)}), as in the paper's comparison.")
    else:
        text = (f"the two winners are not at the same training loss: f(x) of the large-batch "
                f"winner is {fmt(ratio)} x the small-batch one's, so part of any difference can "
                f"be how far training got rather than the shape of the minimum.")
    return crossed + (text if crossed else text[0].upper() + text[1:])


def section(letter: str, protocol: Protocol, summary: dict, *, report_path: Path,
            figures: dict[str, Path], settings: ProbeSettings, spec_name: str) -> list[str]:
    """The report's section on one campaign (its trials, winners, probes, interpolation and
    distance from initialization), every number from `summary`."""
    import pandas as pd
    info, ws = summary["info"], summary["winners"]
    small, large = ws[0], ws[-1]
    head = ["measure", *[f"B = {w['batch_size']} (trial {w['trial_id']})" for w in (small, large)],
            "LB / SB"]

    def row(name, key, ratio=True):
        a, b = value_of(small, key), value_of(large, key)
        return [name, fmt(a), fmt(b), fmt(_ratio(a, b)) if ratio else ""]

    training = [row("learning rate (Adam)", "learning_rate", False),
                row("steps to result", "steps_to_result"),
                row("epochs to result", "epochs_to_result"),
                row(f"{info.metric} at the result step (target {info.target_text})",
                    "metric_at_result", False)]
    if info.metric != "train_loss":
        training.append(row("interval training loss at the result step (training mode)",
                            "interval_train_loss_at_result"))
    if info.metric != "val_error":
        training.append(row("val error at the result step", "val_error_at_result", False))
    training += [row("final training loss f(x), eval mode", "probe_train_loss"),
                 row("final training error, eval mode", "eval_train_error"),
                 row("final validation (= test) loss, eval mode", "eval_test_loss"),
                 row("final validation (= test) error, eval mode", "eval_test_error")]
    probes = [row(name, key) for name, key in measures(summary)]
    probes.append(row("power-iteration steps (converged?)", "eigen_iterations", False))
    probes[-1][1] += f" ({small.get('eigen_converged')})"
    probes[-1][2] += f" ({large.get('eigen_converged')})"

    dist_rows = []
    for w in ws:
        fit = w["distance_fit"]
        dist_rows.append([f"B = {w['batch_size']} (trial {w['trial_id']})", fmt(w["final_distance"]),
                          *([fmt(fit.intercept), fmt(fit.slope), fmt(fit.r_squared), fmt(fit.n_points),
                             f"{fit.first_step}-{fit.last_step}"] if fit else ["-"] * 5)])

    order = orderings(summary)
    held = [k for k, v in order.items() if v]
    failed = [k for k, v in order.items() if v is False]
    answer, headline, headline_held = verdict(summary)
    keskar_held = answer == "yes"
    dist_ratio = _ratio(large.get("final_distance"), small.get("final_distance"))  # SB / LB
    trials = summary["trials"]
    trial_rows = [[str(int(t.batch_size)), str(int(t.trial_id)),
                   fmt(_json(t.config).get("hparams", {}).get("learning_rate")), t.outcome,
                   fmt(None if pd.isna(t.steps_to_result) else int(t.steps_to_result)),
                   "yes" if any(w["trial_id"] == t.trial_id for w in ws) else ""]
                  for t in trials.sort_values(["batch_size", "trial_id"]).itertuples()]

    def rel(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(report_path.resolve().parent))
        except ValueError:
            return str(path)

    subset = (f"a fixed random subset of {fmt(small.get('hessian_examples'))} training examples"
              if small.get("hessian_examples") != small.get("probe_examples") else "the training set")
    lines = [
        f"## {letter}. {protocol.title}",
        "",
        f"Campaign `{info.name}` from `{spec_name}`: target {info.target_text}, evaluated "
        f"every {info.eval_every} steps. {protocol_text(summary)}",
        "",
        "### Trials",
        "",
        *_table(["batch size", "trial", "learning rate", "outcome", "steps to result", "winner"],
                trial_rows),
        "",
        "### The two winners",
        "",
        *_table(head, training),
        "",
        loss_match_text(summary),
        "",
        "### Sharpness and curvature",
        "",
        f"Keskar's (C_eps, A)-sharpness ({settings.sharpness_maxiter} L-BFGS-B iterations; full "
        f"space and a random {settings.subspace}-column subspace with Gaussian columns) on the "
        f"{fmt(small.get('probe_examples'))} training examples; the training-loss Hessian's top "
        f"eigenvalue (power iteration, at most {settings.hessian_max_iter} iterations, tolerance "
        f"{settings.hessian_tol:g}) and trace (Hutchinson, at most {settings.hessian_max_iter} "
        f"Rademacher samples) on {subset}. All in eval mode (batch norm with its running "
        "statistics, so f is a fixed function).",
        "",
        *_table(head, probes),
        "",
        f"The large-batch winner is sharper (LB > SB) on: {', '.join(held) or 'none'}. "
        f"Not sharper on: {', '.join(failed) or 'none'}.",
        "",
        (f"Keskar's qualitative result {'held' if keskar_held else 'did not hold'} under this "
         f"protocol: {len(headline_held)} of the {len(headline)} headline measures (full-space "
         f"sharpness at each epsilon, the top Hessian eigenvalue) are larger for "
         f"B = {large['batch_size']} than for B = {small['batch_size']}"
         + (f" ({', '.join(headline_held)})." if headline_held and not keskar_held else ".")),
        "",
    ]
    interp = summary["interpolation"].get("batch_stats")
    if interp is not None:
        r = interp["result"]
        lines += ["### 1-D interpolation", ""]
        if "interpolation" in figures:
            lines += [f"![interpolation, {info.target_text}]({rel(figures['interpolation'])})", ""]
        alphas = r["alphas"]
        pick = [i for i, a in enumerate(alphas) if any(abs(a - x) < 1e-9 for x in (-1, -0.5, 0, 0.5, 1, 1.5, 2))]
        lines += [f"f(alpha x_LB + (1 - alpha) x_SB) for {len(alphas)} alphas in [-1, 2] "
                  f"(alpha 0: B = {small['batch_size']} winner, alpha 1: B = {large['batch_size']} "
                  f"winner), every state_dict entry interpolated, batch norm with each "
                  f"evaluation chunk's own statistics ({settings.eval_batch_size} examples, as "
                  f"Keskar's reference code); train = the {fmt(interp['params']['train_examples'])} "
                  f"training examples, test = the {fmt(interp['params']['test_examples'])} "
                  f"validation examples.", "",
                  *_table(["alpha", "train loss", "train accuracy", "test loss", "test accuracy"],
                          [[fmt(alphas[i]), fmt(r["train_loss"][i]), fmt(r["train_accuracy"][i]),
                            fmt(r["test_loss"][i]), fmt(r["test_accuracy"][i])] for i in pick]),
                  ""]
        lines += [line for line in interpolation_text(alphas, r["train_loss"]) if line] + [""]
    lines += [
        "### Distance from initialization (Hoffer et al.)",
        "",
        "‖w_t − w_0‖ over all parameters, recorded at every evaluation by the \"distance\" "
        "probe; least-squares fit d = a + b ln t over the initial-learning-rate phase (the "
        "evaluations before the learning rate first drops; with a constant schedule, all of "
        "them), `study.analysis.distance.fit_distance_growth`.",
        "",
    ]
    if "distance" in figures:
        lines += [f"![distance from initialization, {info.target_text}]({rel(figures['distance'])})", ""]
    lines += [*_table(["winner", "final ‖w − w_0‖", "a", "b (per e-fold)", "R^2", "points", "steps"],
                      dist_rows), ""]
    fits = [w["distance_fit"] for w in (small, large)]
    if all(f is not None for f in fits):
        lines += [f"Slope b: {fmt(fits[0].slope)} for B = {small['batch_size']} and "
                  f"{fmt(fits[1].slope)} for B = {large['batch_size']} per e-fold of steps "
                  f"(LB / SB = {fmt(_ratio(fits[0].slope, fits[1].slope))}); R^2 "
                  f"{fmt(min(f.r_squared for f in fits))} or better, i.e. "
                  + ("close to a straight line in log t, as Hoffer et al. observe."
                     if min(f.r_squared for f in fits) > 0.95 else
                     "not a clean log-t law over this stretch."), ""]
    if dist_ratio is not None:
        lines += [f"Final distance ratio SB / LB = {fmt(dist_ratio)} (Keskar et al. report "
                  f"3-10 for their fully trained solutions).", ""]
    return lines


def render(parts: list[tuple[Protocol, dict, dict[str, float], dict[str, Path], str]], *,
           report_path: Path, settings: ProbeSettings, command: str = COMMAND) -> str:
    """The report: a summary over the campaigns, then one section per campaign. `parts`
    holds (protocol, summary, wall seconds, figures, spec name), the headline first."""
    letters = "ABCDEFGH"
    first = parts[0][1]
    answer, _, _ = verdict(first)
    workload = first["info"].workload
    campaigns = "; ".join(f"{letters[i]}: `{s['info'].name}` from `{spec}`, target "
                          f"{s['info'].target_text}" for i, (_, s, _, _, spec) in enumerate(parts))
    summary_head = ["LB / SB", *[f"{letters[i]}: {s['info'].target_text}"
                                 for i, (_, s, _, _, _) in enumerate(parts)]]
    summary_rows = []
    for name, key in [("final training loss f(x), eval mode", "probe_train_loss"),
                      ("steps to result", "steps_to_result"), ("epochs to result", "epochs_to_result"),
                      *measures(first)]:
        cells = []
        for _, s, _, _, _ in parts:
            small, large = s["winners"][0], s["winners"][-1]
            cells.append(fmt(_ratio(value_of(small, key), value_of(large, key))))
        summary_rows.append([name, *cells])
    conclusions = []
    for i, (protocol, s, _, _, _) in enumerate(parts):
        a, headline, held = verdict(s)
        others = [k for k, v in orderings(s).items() if v and k not in headline]
        conclusions.append(
            f"- {letters[i]} ({s['info'].target_text}): the large-batch winner is sharper on "
            f"{len(held)} of the {len(headline)} headline measures"
            + (f" ({', '.join(held)})" if held else "")
            + f"; of the other measures, on {', '.join(others) if others else 'none'}. "
            + f"Keskar's ordering: {a}. " + loss_match_text(s))
    if len(parts) > 1:
        answers = [verdict(s)[0] for _, s, _, _, _ in parts]
        held = [tuple(verdict(s)[2]) for _, s, _, _, _ in parts]
        conclusions.append(
            "- Keskar's ordering on the headline measures, by protocol: "
            + ", ".join(f"{letters[i]} {a}" for i, a in enumerate(answers)) + ". "
            + ("The protocols agree." if len(set(held)) == 1 else
               "The protocols disagree: which minima are compared (trained to a small training "
               "loss, or stopped at the target's first crossing) changes the answer here."))
    lines = [
        f"# Keskar et al. on {workload}: is the large-batch winner sharper? "
        f"{answer.capitalize()} (trained to {first['info'].target_text})",
        "",
        f"Generated by `{command}` (this file and its figures; do not edit by hand). "
        f"Workload `{workload}`, Adam, batch sizes "
        f"{first['winners'][0]['batch_size']} (SB) and {first['winners'][-1]['batch_size']} (LB), "
        f"CPU. Campaigns: {campaigns}. Each ran through batchlab's worker (checkpoints = "
        "\"winners\"), the probes through `batchlab probe sharpness|hessian|interpolate`, and "
        "every number below was read back from `bl_probe_results`, `bl_trials` and "
        "`bl_measurements`.",
        "",
        " ".join(f"{'The headline, ' + letters[i] + ',' if i == 0 else letters[i]} "
                 f"{protocol_short(s['info'])}."
                 for i, (_, s, _, _, _) in enumerate(parts))
        + ("" if len(parts) > 1 else " Only this protocol was run."),
        "",
        "## Summary",
        "",
        *_table(summary_head, summary_rows),
        "",
        *conclusions,
        "",
        "The paper's Table 3 (F1, full MNIST, trained to convergence) has sharpness 1.23 (SB) vs "
        "205.14 (LB) at eps 1e-3 and 0.61 vs 42.90 at eps 5e-4; compare ratios, not magnitudes: "
        "with batch norm in eval mode the loss here is very sensitive to weight perturbations.",
        "",
    ]
    for i, (protocol, s, _, figures, spec) in enumerate(parts):
        lines += section(letters[i], protocol, s, report_path=report_path, figures=figures,
                         settings=settings, spec_name=spec)
    lines += ["## Run", ""]
    for i, (_, s, seconds, _, _) in enumerate(parts):
        lines.append(f"- {letters[i]} (`{s['info'].name}`): "
                     + "; ".join(f"`{k}` {v:.0f} s" for k, v in seconds.items())
                     + f"; {sum(seconds.values()) / 60:.1f} min in all.")
    lines.append("")
    return "\n".join(lines) + "\n"


def _work(work: Path, protocol: Protocol) -> Path:
    return work / protocol.key


def run_protocol(protocol: Protocol, work: Path, settings: ProbeSettings, log=print) -> None:
    """Train and probe one campaign; its database, checkpoints and run.json under `work`."""
    started = time.perf_counter()
    url, name = run_campaign(spec_text(work, protocol.spec), work, protocol.spec, log=log)
    log(f"{name}: campaign {time.perf_counter() - started:.0f} s")
    seconds = {"campaign (training)": time.perf_counter() - started}
    seconds.update(run_probes(url, name, settings, log=log))
    (work / "run.json").write_text(json.dumps({"url": url, "campaign": name, "seconds": seconds}))


def build_report(*, work: Path, report_path: Path = REPORT,
                 protocols: tuple[Protocol, ...] = PROTOCOLS, only: tuple[str, ...] | None = None,
                 settings: ProbeSettings = ProbeSettings(), command: str = COMMAND,
                 log=print) -> dict:
    """The whole pipeline: run every protocol's campaign and probes (or those keyed in
    `only`, the others' last runs reused) and write the report; returns write_report's dict."""
    for protocol in protocols:
        if only is None or protocol.key in only:
            run_protocol(protocol, _work(work, protocol), settings, log=log)
    return write_report(work=work, report_path=report_path, protocols=protocols,
                        settings=settings, command=command)


def write_report(*, work: Path, report_path: Path = REPORT,
                 protocols: tuple[Protocol, ...] = PROTOCOLS,
                 settings: ProbeSettings = ProbeSettings(), command: str = COMMAND) -> dict:
    """Read the finished runs' databases under `work` back and write the report and
    figures. Returns the headline campaign's summary (plus `url`, `markdown`, `figures`)
    and `sections`: the same for every campaign, keyed by protocol."""
    parts, sections = [], {}
    for i, protocol in enumerate(protocols):
        path = _work(work, protocol) / "run.json"
        if not path.exists():
            if i == 0:
                raise SystemExit(f"no run of the headline campaign under {path.parent}")
            continue
        run = json.loads(path.read_text())
        summary = collect(run["url"], run["campaign"])
        ws = summary["winners"]
        if len(ws) < 2 or ws[0]["batch_size"] == ws[-1]["batch_size"]:
            raise SystemExit(f"{run['campaign']}: need winners with checkpoints at two batch sizes")
        figures = draw_figures(summary, protocol.interpolation_figure, protocol.distance_figure)
        try:
            spec_name = str(protocol.spec.resolve().relative_to(ROOT))
        except ValueError:
            spec_name = protocol.spec.name
        parts.append((protocol, summary, run["seconds"], figures, spec_name))
        sections[protocol.key] = {**summary, "url": run["url"], "figures": figures}
    markdown = render(parts, report_path=report_path, settings=settings, command=command)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(markdown)
    return {**sections[protocols[0].key], "markdown": markdown, "sections": sections}


def main(argv: list[str] | None = None) -> int:
    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "build" / "keskar_mnist10k"),
                        help="folder for the databases and checkpoints (recreated per campaign)")
    parser.add_argument("--report", default=str(REPORT))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--only", choices=[p.key for p in PROTOCOLS], action="append",
                        help="rerun only this campaign (repeatable); the others' last runs are reused")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the report and figures from the last runs' databases")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render_only:
        out = write_report(work=Path(args.work), report_path=Path(args.report))
    else:
        out = build_report(work=Path(args.work), report_path=Path(args.report),
                           only=tuple(args.only) if args.only else None)
    print(f"report: {args.report}")
    for key, summary in out["sections"].items():
        for name, sharper in orderings(summary).items():
            print(f"  {key}: LB sharper on {name}: {sharper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
