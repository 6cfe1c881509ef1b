"""More `batchlab` commands: `nqm steps`, `import-shallue` and `analyze`.

Registered by `study.cli.build_parser` through `add_commands`. User errors are raised as
`study.errors.UserError` (one line on stderr, exit status 2).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    """Register `nqm`, `import-shallue` and `analyze` on batchlab's subparsers."""
    from study.cli import _storage_arg
    nqm = subparsers.add_parser("nqm", help="the noisy quadratic model in closed form").add_subparsers(
        title="nqm commands")
    steps = nqm.add_parser("steps", help=(
        "print the steps for the NQM's expected loss to fall below the target (the authors' "
        "notebook's number: the last step with loss >= target)"))
    steps.add_argument("--batch-size", type=float, required=True)
    steps.add_argument("--lr", type=float, required=True, help="learning rate")
    steps.add_argument("--momentum", type=float, default=0.0, help="heavy-ball momentum in [0, 1)")
    steps.add_argument("--ema", type=float, default=0.0, help="decay of an EMA of the iterates in [0, 1)")
    steps.add_argument("--precondition", type=float, default=0.0,
                       help="preconditioner power p in [0, 1] (P = H^-p)")
    steps.add_argument("--target", type=float, default=0.01, help="target expected loss (default 0.01)")
    steps.set_defaults(handler=cmd_nqm_steps)

    imp = subparsers.add_parser("import-shallue", help=(
        "import Shallue et al.'s published measurements (.tar.bz2 or its folder) as campaigns "
        "shallue/<dataset>/<model> (idempotent)"))
    imp.add_argument("path")
    imp.add_argument("--first-n-trials", type=int, default=None, help=(
        "keep the first N COMPLETE trials of each study by trial id (the paper used 100; 50 for "
        "Common Crawl and LM1B LSTM)"))
    imp.add_argument("--include-incomplete", action="store_true",
                     help="also import INCOMPLETE trials, as eligible (default: ignored)")
    imp.add_argument("--target-metric", default=None, help=(
        "override the Figure-1 goal's metric (val_error, val_loss, train_loss or an extra column "
        "such as val_average_precision); needs --threshold"))
    imp.add_argument("--threshold", type=float, default=None)
    imp.add_argument("--maximize", action="store_true", help="the target metric is maximised (>)")
    imp.add_argument("--prefix", default="", help="import only files under this folder, e.g. mnist/")
    _storage_arg(imp)
    imp.set_defaults(handler=cmd_import_shallue)

    analyze = subparsers.add_parser("analyze", help=(
        "write a campaign's analysis: summary.json and figures (PNG and SVG)"))
    analyze.add_argument("--campaign", required=True)
    analyze.add_argument("--output", required=True, help="output folder")
    analyze.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--no-cell-figures", action="store_true",
                         help="skip the search-space scatter of every cell")
    _storage_arg(analyze)
    analyze.set_defaults(handler=cmd_analyze)


def _check_range(name: str, value: float, low: float, high: float, closed_high: bool = False) -> None:
    from study.errors import UserError
    ok = math.isfinite(value) and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise UserError(f"{name} {value:g} must be in [{low:g}, {high:g}{bracket}")


def cmd_nqm_steps(args) -> int:
    from study.errors import UserError
    from trainers.nqm import nqm_steps_to_target
    if not (args.batch_size > 0 and math.isfinite(args.batch_size)):
        raise UserError(f"--batch-size {args.batch_size:g} must be > 0")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr {args.lr:g} must be > 0")
    if not (args.target > 0 and math.isfinite(args.target)):
        raise UserError(f"--target {args.target:g} must be > 0")
    _check_range("--momentum", args.momentum, 0.0, 1.0)
    _check_range("--ema", args.ema, 0.0, 1.0)
    _check_range("--precondition", args.precondition, 0.0, 1.0, closed_high=True)
    if args.momentum and args.ema:
        raise UserError("--momentum and --ema cannot be combined (the NQM closed forms model one)")
    steps = nqm_steps_to_target(args.batch_size, args.lr, momentum=args.momentum,
                                ema_decay=args.ema, precond_power=args.precondition,
                                target=args.target)
    if steps is None:
        print(f"never reached: the expected loss does not fall below {args.target:g} within the "
              f"search bound (steady state above the target, or the run diverges)", file=sys.stderr)
        return 2
    print(steps)
    return 0


def cmd_import_shallue(args) -> int:
    from db.engine import redact
    from study.cli import _engine
    from study.errors import UserError
    from study.importer import ImportOptions, ShallueImportError, import_shallue
    if args.first_n_trials is not None and args.first_n_trials < 1:
        raise UserError(f"--first-n-trials {args.first_n_trials} must be >= 1")
    if (args.target_metric is None) != (args.threshold is None):
        raise UserError("--target-metric and --threshold go together")
    url, engine = _engine(args, must_exist=False)
    options = ImportOptions(first_n_trials=args.first_n_trials,
                            include_incomplete=args.include_incomplete,
                            target_metric=args.target_metric, threshold=args.threshold,
                            mode="max" if args.maximize else None, prefix=args.prefix)
    try:
        stats = import_shallue(engine, args.path, options,
                               log=lambda line: print(line, flush=True))
    except ShallueImportError as exc:
        raise UserError(str(exc)) from None
    if not stats.studies:
        under = f" under --prefix {args.prefix}" if args.prefix else ""
        raise UserError(f"{args.path}: no published studies found{under} (folders "
                        f"dataset/model/optimizer/batch_size holding study.json); nothing imported")
    print(f"imported into {redact(url)}: {len(stats.campaigns)} campaigns, {stats.cells_imported} "
          f"new cells ({stats.cells_skipped} already there), {stats.trials} trials, "
          f"{stats.measurements} measurements")
    for name in sorted(stats.campaigns):
        print(f"  {name}")
    if stats.skipped_workloads:
        print(f"skipped (no goal): {', '.join(sorted(stats.skipped_workloads))}")
    if len(stats.warnings) > 20:
        print(f"{len(stats.warnings)} warnings in all (the first 20 are shown above)")
    return 0


def cmd_analyze(args) -> int:
    from study import report
    from study.analyze import AnalyzeOptions, analyze_campaign
    from study.cli import _engine
    from study.errors import CampaignNotFound, UserError
    if args.resamples < 1:
        raise UserError(f"--resamples {args.resamples} must be >= 1")
    _, engine = _engine(args)
    data = report.load_campaign(engine, args.campaign)
    if data is None:
        known = report.campaign_names(engine)
        raise CampaignNotFound(f"no campaign named {args.campaign!r}"
                               + (f"; known campaigns: {', '.join(known)}" if known else ""))
    options = AnalyzeOptions(n_resamples=args.resamples, seed=args.seed,
                             cell_figures=not args.no_cell_figures)
    from db import queries
    result = analyze_campaign(data, Path(args.output), options,
                              probes=queries.probe_results(engine, data.info.id))
    fits = result.summary.get("fits", [])
    print(f"{args.campaign}: target {data.info.target_text}, "
          f"evaluation interval {result.summary['evaluation_interval']['steps']} steps")
    for fit in fits:
        print(f"  {fit['optimizer']} / {fit['schedule']}: S_min {_num(fit.get('s_min'))} steps, "
              f"B_crit {_num(fit.get('b_crit'))} [{_num(fit.get('b_crit_low'))}, "
              f"{_num(fit.get('b_crit_high'))}]")
    for warning in result.summary.get("edge_warnings", [])[:10]:
        print(f"  warning: {warning}")
    print(f"wrote {Path(args.output) / 'summary.json'} and {len(result.figures)} figures")
    return 0


def _num(value) -> str:
    return "-" if value is None else f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"

