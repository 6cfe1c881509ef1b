"""Run examples/keskar_digits.toml and write docs/keskar_report.md: Keskar et al.'s
sharpness, Hessian and interpolation probes of the small- and large-batch winners.

    .venv/bin/python examples/keskar_digits_report.py            # a few minutes on 2 cores

Equivalent commands: `batchlab run examples/keskar_digits.toml --storage URL --workers 1`,
then `batchlab probe sharpness|hessian|interpolate --campaign keskar_digits --storage URL`
(the report reads what those commands stored in bl_probe_results).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPEC = ROOT / "examples" / "keskar_digits.toml"


def run_campaign(work: Path, *, trials_per_cell: int | None = None, max_epochs: int | None = None) -> str:
    """Create the campaign (checkpoints under `work`) and run one in-process worker."""
    from db.engine import make_engine
    from study.campaigns import create_campaign
    from study.spec import parse_spec
    from study.worker import CampaignWorker
    text = SPEC.read_text().replace('checkpoint_dir = "checkpoints"',
                                    f'checkpoint_dir = "{work / "checkpoints"}"')
    if trials_per_cell is not None:
        text = re.sub(r"trials_per_cell = \d+", f"trials_per_cell = {trials_per_cell}", text)
    if max_epochs is not None:
        text = re.sub(r"max_epochs = \d+", f"max_epochs = {max_epochs}", text)
    url = f"sqlite:///{work / 'keskar_digits.db'}"
    engine = make_engine(url)
    spec = parse_spec(text, str(SPEC))
    create_campaign(engine, url, spec)
    CampaignWorker(engine, url, spec.name, device="cpu", log=lambda line: print(line, flush=True)).run()
    return url


def run_probes(url: str, figure: Path | None, *, subspace: int = 100) -> None:
    from study.cli import main
    common = ["--campaign", "keskar_digits", "--storage", url]
    for argv in (["probe", "sharpness", *common, "--subspace", str(subspace)],
                 ["probe", "hessian", *common],
                 ["probe", "interpolate", *common, "--batch-norm", "batch_stats",
                  *(["--figure", str(figure)] if figure else [])]):
        if main(argv) != 0:
            raise SystemExit(f"{' '.join(argv[:2])} failed")


def probe_summary(url: str) -> dict:
    """Per winner (by batch size): sharpness per (space, epsilon), eigenvalue, trace,
    train loss; plus the interpolation row. Read from bl_probe_results."""
    from db import queries
    from db.engine import make_engine
    from study.results import campaign_info
    engine = make_engine(url)
    info = campaign_info(engine, "keskar_digits")
    rows = queries.probe_results(engine, info.id)
    by_batch: dict[int, dict] = {}
    for row in rows.itertuples():  # oldest first: a re-run's newer values overwrite
        if row.kind == "interpolation":
            continue
        entry = by_batch.setdefault(int(row.batch_size), {"trial_id": int(row.trial_id)})
        if row.kind == "sharpness":
            entry[(row.params["space"], row.params["epsilon"])] = row.result["sharpness"]
            entry["train_loss"] = row.result["loss"]
            entry["steps_to_result"] = row.result["steps_to_result"]
        elif row.kind == "hessian":
            entry["top_eigenvalue"] = row.result["top_eigenvalue"]
            entry["trace"] = row.result["trace"]
    interpolation = rows.loc[rows["kind"] == "interpolation"]
    return {"info": info, "by_batch": by_batch,
            "interpolation": interpolation.iloc[-1] if len(interpolation) else None}


def lb_sharper(summary: dict) -> dict[str, bool]:
    """Whether the largest-batch winner's value exceeds the smallest-batch winner's, per
    measure (sharpness per space and epsilon, top eigenvalue, trace)."""
    sizes = sorted(summary["by_batch"])
    small, large = summary["by_batch"][sizes[0]], summary["by_batch"][sizes[-1]]
    keys = [k for k in small if isinstance(k, tuple) or k in ("top_eigenvalue", "trace")]
    return {(f"sharpness {k[0]} eps {k[1]:g}" if isinstance(k, tuple) else k): large[k] > small[k]
            for k in keys if k in large}


def write_report(summary: dict, path: Path, figure: Path | None) -> None:
    info, by_batch = summary["info"], summary["by_batch"]
    sizes = sorted(by_batch)
    keys = sorted(k for k in by_batch[sizes[0]] if isinstance(k, tuple))
    header = ["measure", *[f"B = {b} (trial {by_batch[b]['trial_id']})" for b in sizes], "LB / SB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def add(name, key, fmt="{:.4g}"):
        values = [by_batch[b].get(key) for b in sizes]
        ratio = (values[-1] / values[0]) if values[0] else float("nan")
        lines.append(f"| {name} | " + " | ".join(fmt.format(v) for v in values) + f" | {ratio:.3g} |")
    add("steps to result", "steps_to_result", "{:.0f}")
    add("training loss f(x)", "train_loss")
    for space, epsilon in keys:
        add(f"sharpness, {space} space, eps {epsilon:g} (%)", (space, epsilon))
    add("Hessian top eigenvalue", "top_eigenvalue")
    add("Hessian trace (Hutchinson)", "trace")
    verdict = lb_sharper(summary)
    held = [k for k, v in verdict.items() if v]
    failed = [k for k, v in verdict.items() if not v]
    text = [
        "# Keskar et al. on digits: are large-batch winners sharper?",
        "",
        "Generated by `examples/keskar_digits_report.py` from `examples/keskar_digits.toml` "
        f"({info.workload}, target {info.target_text}, evaluated every {info.eval_every} steps; "
        "Adam, learning rate chosen per cell from {1e-3, 3e-3}, at most 100 epochs; CPU).",
        "Each cell's winner (fewest steps to the target) was checkpointed by the workers; the "
        "probes ran on its final weights over the 1,197 training examples: Keskar's "
        "(C_eps, A)-sharpness (10 L-BFGS-B iterations, full space and a random 100-column "
        "subspace), and the training-loss Hessian's top eigenvalue (power iteration) and "
        "trace (Hutchinson), PyHessian's method.",
        "",
        *lines,
        "",
        f"Large batch sharper than small batch on: {', '.join(held) or 'none'}." ,
        f"Not sharper on: {', '.join(failed) or 'none'}.",
        "",
    ]
    if figure is not None:
        rel = figure.relative_to(path.parent) if figure.is_relative_to(path.parent) else figure
        text += ["## 1-D interpolation", "",
                 f"![interpolation]({rel})", "",
                 "f(alpha x_LB + (1 - alpha) x_SB) for 25 alphas in [-1, 2], train and test "
                 "cross-entropy (log, left) and accuracy (right); the MLP has no batch norm, "
                 "so the three batch-norm modes coincide.", ""]
    text += NOTES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text) + "\n")


NOTES = [
    "## How robust is this on digits?",
    "",
    "Digits is tiny and the MLP has no batch norm, so the effect is far weaker than in the "
    "paper (Table 3: 1-2 orders of magnitude on F1/MNIST). With a validation-error target, "
    "both winners stop at about the same training loss, so this compares minima at equal "
    "loss. What we saw while choosing the setup (single runs, Adam, 2 CPU cores):",
    "",
    "- Same training loss (both trained until train_loss < 1e-3; lr 1e-3 / 3e-3 for B = 16, "
    "1e-3 / 3e-3 / 1e-2 for B = 1024): the top eigenvalue is 0.27 for B = 1024 vs 0.20-0.25 "
    "for B = 16 (LB larger in every pairing, by 1.1-1.4x); full-space sharpness is mixed "
    "(0.017-0.030 vs 0.014-0.043). Same picture as the table above.",
    "- Same epoch budget (100 epochs, lr 1e-3, no target; Keskar's Keras reference trains a "
    "fixed number of epochs): B = 1024 is far sharper (full-space eps 1e-3: 1.1-1.2 vs "
    "0.001-0.002; top eigenvalue 6.4-7.1 vs 0.04-0.05, two seeds), but it also ends at a "
    "~600x higher training loss (0.09 vs 0.00015): in 200 updates it is less converged, so "
    "there sharpness mixes the minimum's shape with how far training got.",
    "",
    "So on digits the robust part of Keskar's result is the curvature: the large-batch "
    "winner's top Hessian eigenvalue is higher (the slow test checks this ordering). "
    "Keskar sharpness at matched loss does not separate the two solutions here, and we do "
    "not claim it does; the MNIST F1 workload (`mnist_f1`, with batch norm) is the setup "
    "to try for the paper's magnitudes.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "build" / "keskar_digits"),
                        help="folder for the database and checkpoints")
    parser.add_argument("--report", default=str(ROOT / "docs" / "keskar_report.md"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "keskar_interpolation.png"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    url = run_campaign(work)
    figure = Path(args.figure)
    run_probes(url, figure)
    summary = probe_summary(url)
    write_report(summary, Path(args.report), figure)
    print(f"report: {args.report}")
    for name, sharper in lb_sharper(summary).items():
        print(f"  LB sharper on {name}: {sharper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
