"""`batchlab probe sharpness|interpolate|hessian`: probes of each cell's winner after
training (Keskar et al. 2016; PyHessian; methods.md 3), on the final weights the workers
saved (campaign.checkpoints = "winners" or "all").

Every command rebuilds the winner's model from its stored trial config
(`trainers.loop.build_model`), loads its checkpoint, evaluates on the workload's training
set (test set too for interpolation), stores one bl_probe_results row per result and
prints a table. Cells whose winner has no checkpoint are listed and skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

INTERPOLATION_BATCH_NORM = ("batch_stats", "interpolate_running", "reestimate")


def add_commands(subparsers) -> None:
    """Register `probe` and its three sub-commands on the CLI's sub-parsers."""
    probe = subparsers.add_parser("probe", help="post-training probes of each cell's winner "
                                  "(sharpness, Hessian, interpolation)")
    commands = probe.add_subparsers(title="probe commands")

    sharpness = commands.add_parser("sharpness", help="Keskar (C_eps, A)-sharpness of each winner")
    _common_args(sharpness)
    sharpness.add_argument("--epsilon", type=float, nargs="+", default=[1e-3, 5e-4],
                           help="box sizes (default: 1e-3 5e-4, the paper's)")
    sharpness.add_argument("--subspace", type=int, default=100,
                           help="columns p of the random subspace A (default 100; 0: full space only)")
    sharpness.add_argument("--maxiter", type=int, default=10, help="L-BFGS-B iterations (default 10)")
    sharpness.set_defaults(handler=cmd_sharpness)

    hessian = commands.add_parser("hessian", help="Hessian top eigenvalue (power iteration) and "
                                  "trace (Hutchinson) of each winner, PyHessian's method")
    _common_args(hessian)
    hessian.add_argument("--max-iter", type=int, default=100, help="power / Hutchinson iterations (100)")
    hessian.add_argument("--tol", type=float, default=1e-3, help="relative tolerance (1e-3)")
    hessian.set_defaults(handler=cmd_hessian)

    interpolate = commands.add_parser("interpolate", help="1-D interpolation between the "
                                      "smallest-batch and the largest-batch winner")
    _common_args(interpolate)
    interpolate.add_argument("--batch-norm", choices=INTERPOLATION_BATCH_NORM, default="batch_stats",
                             help="batch-norm statistics at each alpha (default batch_stats, as Keskar)")
    interpolate.add_argument("--alphas", type=int, default=25, help="points in [-1, 2] (default 25)")
    interpolate.add_argument("--eval-batch-size", type=int, default=5000)
    interpolate.add_argument("--figure", default=None, help="also write the figure (.png or .svg)")
    interpolate.set_defaults(handler=cmd_interpolate)


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--campaign", required=True)
    parser.add_argument("--cells", type=int, nargs="+", default=None, help="cell ids (default: all)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="only cells with these batch sizes")
    parser.add_argument("--max-examples", type=int, default=None,
                        help="evaluate on a fixed random subset of the training set of this size")
    parser.add_argument("--batch-size", type=int, default=2048, help="evaluation chunk size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="random subspace / vectors / subset")
    parser.add_argument("--storage", default=None, help=(
        "database URL (default: $BATCHLAB_STORAGE, else sqlite:///batchlab.db)"))


# ---- finding and loading winners ---------------------------------------------------------
@dataclass
class Winner:
    cell_id: int
    trial_id: int
    batch_size: int
    optimizer: str
    schedule: str
    steps_to_result: int
    checkpoint_path: str
    config: dict

    @property
    def label(self) -> str:
        return f"B={self.batch_size} {self.optimizer}/{self.schedule} (trial {self.trial_id})"


def winners(engine, campaign_id: int, cells=None, batch_sizes=None, log=print) -> list[Winner]:
    """Each selected cell's winner (fewest steps to result) that has a checkpoint, batch
    size ascending; cells without a winner or a checkpoint are reported via `log`."""
    import pandas as pd
    from db import queries
    results = queries.cell_results(engine, campaign_id)
    trials = queries.trial_checkpoints(engine, campaign_id).set_index("trial_id")
    found = []
    for row in results.sort_values(["batch_size", "optimizer", "schedule"]).itertuples():
        if (cells and row.cell_id not in cells) or (batch_sizes and row.batch_size not in batch_sizes):
            continue
        if pd.isna(row.winner_trial_id):
            log(f"cell {row.cell_id} (B={row.batch_size}): no trial reached the target; skipped")
            continue
        trial = trials.loc[int(row.winner_trial_id)]
        if not trial["checkpoint_path"]:
            log(f"cell {row.cell_id} (B={row.batch_size}): winner trial {int(row.winner_trial_id)} "
                f"has no checkpoint (set campaign.checkpoints = \"winners\"); skipped")
            continue
        found.append(Winner(int(row.cell_id), int(row.winner_trial_id), int(row.batch_size),
                            row.optimizer, row.schedule, int(row.steps_to_result),
                            trial["checkpoint_path"], _as_dict(trial["config"])))
    return found


def _as_dict(value) -> dict:
    import json
    return json.loads(value) if isinstance(value, str) else dict(value or {})


def trial_config(values: dict):
    """The stored config JSON back into a TrialConfig (fields it does not know dropped)."""
    from trainers.config import Target, TrialConfig
    known = {f.name for f in dataclasses.fields(TrialConfig)}
    values = {k: v for k, v in values.items() if k in known}
    values["target"] = Target(**values["target"])
    return TrialConfig(**values)


def load_winner_model(winner: Winner, device):
    """(workload, model with the winner's final weights, config)."""
    from trainers.loop import build_model
    from trainers.probes.checkpoints import load_checkpoint
    from trainers.workloads import get_workload
    config = trial_config(winner.config)
    workload = get_workload(config.workload)
    model = build_model(workload, config, device)
    load_checkpoint(winner.checkpoint_path, map_location=device, model=model)
    return workload, model, config


def training_batches(workload, config, device, *, max_examples=None, batch_size=2048, seed=0,
                     split="train"):
    """Preprocessed (inputs, labels) chunks of a split, without augmentation (f must be a
    fixed function for L-BFGS-B and power iteration); `max_examples`: a fixed random subset."""
    import torch
    from trainers.loop import DataCache
    from trainers.workloads import DataOptions
    splits = DataCache().get(workload, DataOptions.of(config), device)
    x, y = getattr(splits, f"{split}_x"), getattr(splits, f"{split}_y")
    if max_examples is not None and max_examples < len(y):
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_examples]
        x, y = x[keep.to(x.device)], y[keep.to(y.device)]
    return [(workload.preprocess(x[s:s + batch_size]), y[s:s + batch_size])
            for s in range(0, len(y), batch_size)]


# ---- the probes ----------------------------------------------------------------------------
def sharpness_rows(winner: Winner, args) -> list[dict]:
    """Full-space and (when --subspace > 0) random-subspace sharpness per epsilon."""
    import torch
    from trainers.probes.sharpness import model_sharpness
    device = torch.device(args.device)
    workload, model, config = load_winner_model(winner, device)
    batches = training_batches(workload, config, device, max_examples=args.max_examples,
                               batch_size=args.batch_size, seed=args.seed)
    spaces = [("full", None)] + ([("random", args.subspace)] if args.subspace > 0 else [])
    rows = []
    for space, dim in spaces:
        for epsilon in args.epsilon:
            result = model_sharpness(model, batches, workload.loss, epsilon=epsilon, space=space,
                                     subspace_dim=dim or 100, seed=args.seed, maxiter=args.maxiter)
            params = {"epsilon": epsilon, "space": space, "subspace_dim": dim, "maxiter": args.maxiter,
                      "examples": _count(batches), "seed": args.seed}
            rows.append(_row(winner, "sharpness", params, {
                "sharpness": result.sharpness, "loss": result.loss, "max_loss": result.max_loss,
                "evaluations": result.evaluations}))
    return rows


def hessian_rows(winner: Winner, args) -> list[dict]:
    """Top eigenvalue and Hutchinson trace of the training-loss Hessian."""
    import torch
    from trainers.probes.hessian import HessianOperator, hutchinson_trace, top_eigenvalue
    device = torch.device(args.device)
    workload, model, config = load_winner_model(winner, device)
    batches = training_batches(workload, config, device, max_examples=args.max_examples,
                               batch_size=args.batch_size, seed=args.seed)
    operator = HessianOperator(model, batches, workload.loss)
    eigen = top_eigenvalue(operator, max_iter=args.max_iter, tol=args.tol, seed=args.seed)
    trace = hutchinson_trace(operator, max_iter=args.max_iter, tol=args.tol, seed=args.seed)
    params = {"max_iter": args.max_iter, "tol": args.tol, "examples": _count(batches), "seed": args.seed}
    return [_row(winner, "hessian", params, {
        "top_eigenvalue": eigen.eigenvalue, "eigen_iterations": eigen.iterations,
        "converged": eigen.converged, "trace": trace.mean, "trace_samples": len(trace.samples)})]


def interpolation_row(small: Winner, large: Winner, args) -> dict:
    """f(alpha x_large + (1 - alpha) x_small) on the train and test sets."""
    import torch
    from trainers.probes.checkpoints import load_checkpoint
    from trainers.probes.interpolation import interpolation_curve
    device = torch.device(args.device)
    workload, model, config = load_winner_model(small, device)
    state_small = load_checkpoint(small.checkpoint_path, map_location=device)
    state_large = load_checkpoint(large.checkpoint_path, map_location=device)
    train = training_batches(workload, config, device, max_examples=args.max_examples,
                             batch_size=args.eval_batch_size, seed=args.seed)
    test = training_batches(workload, config, device, batch_size=args.eval_batch_size, split="test")
    splits = {"train": _concat(train), "test": _concat(test)}
    curve = interpolation_curve(model, state_small, state_large, splits, workload.loss,
                                alphas=np.linspace(-1.0, 2.0, args.alphas), batch_norm=args.batch_norm,
                                reestimate_batches=train, batch_size=args.eval_batch_size)
    result = {"alphas": curve.alphas.tolist()}
    for split in splits:
        result[f"{split}_loss"] = curve.loss[split].tolist()
        result[f"{split}_accuracy"] = curve.accuracy[split].tolist()
    params = {"small_trial_id": small.trial_id, "large_trial_id": large.trial_id,
              "small_batch_size": small.batch_size, "large_batch_size": large.batch_size,
              "batch_norm": args.batch_norm, "eval_batch_size": args.eval_batch_size,
              "train_examples": _count(train), "test_examples": _count(test)}
    return {"cell_id": None, "trial_id": None, "kind": "interpolation", "params": params,
            "result": result, "label": f"{small.label} -> {large.label}"}


def _concat(batches):
    import torch
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _count(batches) -> int:
    return int(sum(len(y) for _, y in batches))


def _row(winner: Winner, kind: str, params: dict, result: dict) -> dict:
    return {"cell_id": winner.cell_id, "trial_id": winner.trial_id, "kind": kind, "params": params,
            "result": {**result, "batch_size": winner.batch_size,
                       "steps_to_result": winner.steps_to_result}, "label": winner.label}


# ---- storing and printing ----------------------------------------------------------------
def _finite(value):
    """JSON-safe: NaN/inf become None (PostgreSQL's JSON rejects them), recursively."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def store(engine, campaign_id: int, rows: list[dict]) -> None:
    """One bl_probe_results row per result, in one transaction."""
    from sqlalchemy.orm import Session
    from db.models import ProbeResult
    with Session(engine) as session, session.begin():
        for row in rows:
            session.add(ProbeResult(campaign_id=campaign_id, cell_id=row["cell_id"],
                                    trial_id=row["trial_id"], kind=row["kind"],
                                    params=_finite(row["params"]), result=_finite(row["result"])))


def _campaign(args):
    from study.cli import _engine, _info, check_device
    from study.errors import UserError
    check_device(args.device)  # one line when the device is not there
    if args.device == "auto":
        from trainers.loop import resolve_device
        args.device = str(resolve_device(args.device))
    url, engine = _engine(args)
    info = _info(engine, args.campaign)
    found = winners(engine, info.id, args.cells, args.batch_sizes)
    if not found:
        raise UserError(f"campaign {args.campaign!r}: no cell winner with a checkpoint to probe")
    return engine, info, found


def _print_table(data) -> None:
    """Rows (dicts) or columns (a dict of lists) as an aligned table, 4 significant digits."""
    import pandas as pd  # half a second to import: not on every batchlab command's start
    print(pd.DataFrame(data).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def cmd_sharpness(args) -> int:
    engine, info, found = _campaign(args)
    rows = [row for winner in found for row in sharpness_rows(winner, args)]
    store(engine, info.id, rows)
    _print_table([{"cell": r["cell_id"], "batch_size": r["result"]["batch_size"],
                   "trial": r["trial_id"], "space": r["params"]["space"],
                   "epsilon": r["params"]["epsilon"], "sharpness": r["result"]["sharpness"],
                   "train_loss": r["result"]["loss"]} for r in rows])
    return 0


def cmd_hessian(args) -> int:
    engine, info, found = _campaign(args)
    rows = [row for winner in found for row in hessian_rows(winner, args)]
    store(engine, info.id, rows)
    _print_table([{"cell": r["cell_id"], "batch_size": r["result"]["batch_size"],
                   "trial": r["trial_id"], "top_eigenvalue": r["result"]["top_eigenvalue"],
                   "converged": r["result"]["converged"], "trace": r["result"]["trace"]}
                  for r in rows])
    return 0


def cmd_interpolate(args) -> int:
    from study.errors import UserError
    engine, info, found = _campaign(args)
    small, large = found[0], found[-1]
    if small.batch_size == large.batch_size:
        raise UserError("interpolation needs winners at two different batch sizes")
    row = interpolation_row(small, large, args)
    store(engine, info.id, [row])
    result = row["result"]
    print(f"alpha 0: {small.label}; alpha 1: {large.label}; batch norm: {args.batch_norm}")
    _print_table({k: result[k] for k in ("alphas", "train_loss", "train_accuracy", "test_loss",
                                         "test_accuracy")})
    if args.figure:
        from study.figures import interpolation_chart, interpolation_frame, save_chart
        curves = {k: v for k, v in result.items() if k != "alphas"}
        chart = interpolation_chart(interpolation_frame(result["alphas"], curves),
                                    workload=info.figure_workload, target=info.target_text,
                                    eval_every=info.eval_every, small_label=small.label,
                                    large_label=large.label, batch_norm=args.batch_norm)
        print(f"figure: {save_chart(chart, args.figure)}")
    return 0
