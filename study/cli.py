"""`batchlab`: the command line.

Errors a user can cause (spec, storage URL, data path, checksum) end the command with
one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from db.engine import StorageError, check_connection, make_engine, redact, storage_url
from study.cli_extra import add_commands
from study.errors import CampaignNotFound, UserError
from study import probe_cli

USER_ERROR = 2
BROKEN_PIPE = 128 + 13  # the status of a command ended by SIGPIPE, like `cat` or `seq`
# --compile -> trainers.vectorized.run_trials_vectorized(compile=): None is its tiered default
COMPILE_MODES = {"auto": None, "always": True, "never": False}


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return USER_ERROR
    try:
        code = args.handler(args) or 0
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at exit
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `batchlab results | head -1`: stop quietly, as `cat` does
        if not _stdout_closed():
            raise  # another pipe broke (a bug or a crashed child): not the reader's doing
        _drop_stdout()
        return BROKEN_PIPE
    except Exception as exc:  # user errors: one line, exit 2; anything else is a bug
        if _is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return USER_ERROR
        raise


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or stdout is not a file
        return True


def _drop_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for the closed pipe is dropped
    when the interpreter flushes it on exit, instead of a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (captured by a caller)
        pass


def _quiet_libraries() -> None:
    """batchlab prints its own progress; Optuna's per-study INFO lines would drown it."""
    import warnings
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _is_user_error(exc: Exception) -> bool:
    if isinstance(exc, (UserError, StorageError, CampaignNotFound)):
        return True
    # These modules import torch: only for an error the reading commands cannot raise.
    from study.campaigns import CampaignConflict
    from study.spec import SpecError
    from trainers.data.errors import DataError
    return isinstance(exc, (SpecError, CampaignConflict, DataError))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchlab", description=(
        "Study how training scales with batch size: tune every (batch size, optimizer, "
        "schedule) cell independently and measure the steps to reach a target."))
    commands = parser.add_subparsers(title="commands")

    campaign = commands.add_parser("campaign", help="create campaigns").add_subparsers(title="campaign commands")
    create = campaign.add_parser("create", help="validate SPEC and create its campaign, cells and studies (idempotent)")
    create.add_argument("spec")
    _storage_arg(create)
    create.set_defaults(handler=cmd_create)

    worker = commands.add_parser("worker", help="run trials of a campaign until every cell has its trials")
    worker.add_argument("--campaign", required=True)
    worker.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    worker.add_argument("--max-trials", type=int, default=None)
    worker.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    worker.add_argument("--quiet", action="store_true")
    _recovery_args(worker)
    _storage_arg(worker)
    worker.set_defaults(handler=cmd_worker)

    run = commands.add_parser("run", help="create SPEC's campaign and run N local workers to the end")
    run.add_argument("spec")
    run.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N, for every worker (default: auto)")
    run.add_argument("--figure", default=None, help="write the scaling figure here (.png or .svg)")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads for each worker's torch (default: cores / workers)")
    _recovery_args(run)
    _storage_arg(run)
    run.set_defaults(handler=cmd_run)

    status = commands.add_parser("status", help="progress per cell (first abandons and re-queues trials whose worker is silent)")
    status.add_argument("--campaign", default=None)
    status.add_argument("--grace", type=float, default=60.0, help=(
        "abandon (and re-queue) running trials silent for this many seconds (default 60)"))
    _storage_arg(status)
    status.set_defaults(handler=cmd_status)

    results = commands.add_parser("results", help="steps-to-result per cell")
    results.add_argument("--campaign", required=True)
    results.add_argument("--format", choices=("table", "csv", "json"), default="table")
    _storage_arg(results)
    results.set_defaults(handler=cmd_results)

    figure = commands.add_parser("figure", help="write the steps-vs-batch-size figure")
    figure.add_argument("--campaign", required=True)
    figure.add_argument("--output", required=True, help="a .png or .svg path")
    figure.add_argument("--y", choices=("steps_to_result", "examples_to_result", "seconds_to_result"),
                        default="steps_to_result")
    _storage_arg(figure)
    figure.set_defaults(handler=cmd_figure)

    dashboard = commands.add_parser("dashboard", help="open the Streamlit dashboard on the storage")
    dashboard.add_argument("--address", default="localhost",
                           help="bind address (default localhost; the app has no login)")
    dashboard.add_argument("--port", type=int, default=8501, help="default 8501")
    _storage_arg(dashboard)
    dashboard.set_defaults(handler=cmd_dashboard)

    workloads = commands.add_parser("workloads", help="list the registered workloads")
    workloads.set_defaults(handler=cmd_workloads)
    add_commands(commands)  # nqm, import-shallue, analyze (study/cli_extra.py)
    probe_cli.add_commands(commands)  # probe sharpness|hessian|interpolate (study/probe_cli.py)
    return parser


def _storage_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", default=None, help=(
        "database URL (default: $BATCHLAB_STORAGE, else sqlite:///batchlab.db)"))


def _trials_at_once(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 'auto' or a number >= 1")
    return value


def _recovery_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials-at-once", type=_trials_at_once, default="auto", help=(
        "train this many trials of a cell together as one vectorized computation; 'auto' "
        "(default): on CUDA as many as the device's memory and the workload allow, per "
        "cell; on CPU one at a time, which keeps every trial's measurements exactly those "
        "of its seed"))
    parser.add_argument("--compile", choices=tuple(COMPILE_MODES), default="auto", help=(
        "torch.compile of the vectorized training step on CUDA: 'auto' (default) compiles "
        "each variant of the step once it has run 40 s uncompiled; 'always' from its first "
        "step (long cells: no uncompiled start); 'never'"))
    parser.add_argument("--heartbeat", type=float, default=10.0,
                        help="seconds between a worker's heartbeats (default 10)")
    parser.add_argument("--grace", type=float, default=60.0, help=(
        "seconds without a heartbeat after which another worker abandons a trial and "
        "re-runs it with the same hyperparameters (default 60)"))


def _engine(args, *, must_exist: bool = True, read_only: bool = False):
    """The storage URL and an engine on it, connected once: an unreachable server, a
    refused login or a database that is not there ends the command here, with one line
    (StorageError or UserError), whatever the command. `must_exist=False` (create, run,
    import): a SQLite file may be new; it is not opened here, which would create it before
    the command has checked its input."""
    url = storage_url(args.storage)
    if must_exist and url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:" and not Path(path).exists():
            raise UserError(f"{path}: no such database; create a campaign first "
                            f"(batchlab campaign create SPEC --storage {url})")
    engine = make_engine(url, read_only=read_only)
    if must_exist or engine.url.get_backend_name() != "sqlite":
        check_connection(engine)
    return url, engine


def cmd_create(args) -> int:
    from study.campaigns import create_campaign
    from study.spec import load_spec
    spec = load_spec(args.spec)
    url, engine = _engine(args, must_exist=False)
    result = create_campaign(engine, url, spec)
    verb = "created" if result.created else "already exists (unchanged)"
    print(f"campaign {spec.name!r} {verb}: {result.cells} cells x {spec.trials_per_cell} trials "
          f"in {redact(url)}")
    return 0


def check_device(name: str) -> None:
    """`--device`: auto, cpu, or a CUDA device this machine has; otherwise UserError (one
    line), before any storage is touched or worker started."""
    if name == "auto":
        return
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise UserError(f"--device {name!r}: batchlab trains on auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine "
                        f"(use --device cpu or auto)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device"
                        f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")


def cmd_worker(args) -> int:
    check_device(args.device)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from study.distributed import exit_rank, follow, init_group, launched_ranks, leave_group
    url, engine = _engine(args)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, flush=True))
    if not 0 < args.heartbeat < args.grace:
        raise UserError(f"--heartbeat {args.heartbeat:g} must be > 0 and shorter than --grace {args.grace:g}")
    ranks = launched_ranks()
    if ranks is None:
        return _work(args, engine, url, log)
    if args.trials_at_once not in (1, "auto"):  # under torchrun: one trial spans every rank
        raise UserError("--trials-at-once must be 1 when a trial spans several processes")
    args.device = init_group(ranks, args.device)
    clean = False
    try:
        if ranks.rank != 0:
            follow(args.device)  # rank 0 alone talks to storage
            code = 0
        else:
            code = _work(args, engine, url, log)
        clean = True
    finally:
        leave_group(clean)
    exit_rank(code)


def _work(args, engine, url, log) -> int:
    from study.worker import CampaignWorker
    worker = CampaignWorker(engine, url, args.campaign, device=args.device,
                            max_trials=args.max_trials, log=log,
                            heartbeat_seconds=args.heartbeat, grace_seconds=args.grace,
                            trials_at_once=args.trials_at_once, compile=COMPILE_MODES[args.compile])
    done = worker.run()
    log(f"[worker {worker.worker_id}] finished {done} trials")
    if worker.stop_requested:  # non-zero, so a supervisor (Kubernetes) starts another
        print(f"worker {worker.worker_id} stopped by SIGTERM; its trial will be re-run", file=sys.stderr)
        return 128 + 15
    return 0


def cmd_run(args) -> int:
    from study.campaigns import create_campaign
    from study.spec import load_spec
    spec = load_spec(args.spec)
    if args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    if args.figure:
        _check_figure_path("--figure", args.figure)
    check_device(args.device)  # before the campaign is created and workers start
    url, engine = _engine(args, must_exist=False)
    result = create_campaign(engine, url, spec)
    print(f"campaign {spec.name!r}: {result.cells} cells x {spec.trials_per_cell} trials, "
          f"{args.workers} workers, storage {redact(url)}", flush=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    command = [sys.executable, "-m", "study.cli", "worker", "--campaign", spec.name,
               "--storage", url, "--device", args.device, "--threads", str(threads), "--quiet",
               "--heartbeat", str(args.heartbeat), "--grace", str(args.grace),
               "--trials-at-once", str(args.trials_at_once), "--compile", args.compile]
    processes = [subprocess.Popen(command) for _ in range(args.workers)]
    try:
        _watch(engine, spec.name, processes)
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C, or the progress's reader is gone
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
        raise
    codes = [p.returncode for p in processes]
    if any(codes):
        print(f"error: worker exit codes {codes}", file=sys.stderr)
        return codes[0] if codes[0] else 1
    print()
    _print_results(engine, spec.name, "table")
    if args.figure:
        path = _write_figure(engine, spec.name, args.figure, "steps_to_result")
        print(f"\nfigure: {path}")
    print(f"\nOpen the dashboard on this database:\n  batchlab dashboard --storage {redact(url)}")
    return 0


def _watch(engine, name: str, processes) -> None:
    """Print progress (cells complete, trials running, ETA) until every worker exits."""
    from db import queries
    from study.results import campaign_info
    info = campaign_info(engine, name)
    start, last_line, first_done = time.monotonic(), "", None
    while True:
        alive = any(p.poll() is None for p in processes)
        cells = queries.cell_results(engine, info.id)
        done, running = int(cells["trials_finished"].sum()), int(cells["trials_running"].sum())
        planned = int(cells["trials_planned"].sum())
        complete = int((cells["trials_finished"] >= cells["trials_planned"]).sum())
        first_done = done if first_done is None else first_done
        elapsed = time.monotonic() - start
        rate = (done - first_done) / elapsed if elapsed > 0 else 0
        eta = f"{(planned - done) / rate:.0f} s" if rate > 0 and done < planned else "-"
        line = (f"cells {complete}/{len(cells)} complete | trials {done}/{planned} finished, "
                f"{running} running | {elapsed:.0f} s elapsed, ETA {eta}")
        if line != last_line:
            print(line, flush=True)
            last_line = line
        if not alive:
            return
        time.sleep(2.0)


def _print_results(engine, name: str, fmt: str) -> None:
    from study.results import cell_table, format_table
    info = _info(engine, name)
    table = cell_table(engine, info)
    if fmt == "table":
        print(f"{info.name}: {info.workload}, target {info.target_text}, "
              f"evaluated every {info.eval_every} steps")
    print(format_table(table, fmt))


def _info(engine, name: str):
    from study.results import campaign_info
    from db.schema import ensure_schema
    ensure_schema(engine)
    info = campaign_info(engine, name)
    if info is None:
        from db import queries
        known = list(queries.campaigns(engine)["name"])
        hint = f"; known campaigns: {', '.join(known)}" if known else "; create it first"
        raise CampaignNotFound(f"no campaign named {name!r}{hint}")
    return info


def _check_figure_path(option: str, path: str) -> None:
    if Path(path).suffix.lower() not in (".png", ".svg"):
        raise UserError(f"{option} {path}: must end in .png or .svg")


def _write_figure(engine, name: str, output: str, y: str) -> Path:
    from study.figures import save_chart, scaling_chart
    from study.results import cell_table
    info = _info(engine, name)
    table = cell_table(engine, info)
    if y == "seconds_to_result" and table[y].isna().all() and table["steps_to_result"].notna().any():
        raise UserError(f"campaign {name!r} recorded no training time (imported published data "
                        f"or the NQM's closed forms): use --y steps_to_result or examples_to_result")
    chart = scaling_chart(table, workload=info.figure_workload,
                          target=info.target_text, eval_every=info.eval_every, y=y)
    try:
        return save_chart(chart, output)
    except OSError as exc:  # a folder that cannot be made, a read-only place
        raise UserError(f"{output}: cannot write the figure: {exc.strerror or exc}") from None


def _reap(engine, url: str, campaign_id: int, grace_seconds: float) -> None:
    """Abandon and re-queue trials of lost workers, so that status shows the truth."""
    from study.recovery import reap_lost_trials
    from study.tuning import optuna_storage
    for reaped in reap_lost_trials(engine, optuna_storage(url), campaign_id, grace_seconds):
        print(f"abandoned trial row {reaped.trial_row_id}: worker {reaped.worker_id} silent for "
              f"{reaped.silent_seconds:.0f} s; it will be re-run")


def cmd_status(args) -> int:
    from db import queries
    from db.schema import ensure_schema
    url, engine = _engine(args)
    ensure_schema(engine)
    names = [args.campaign] if args.campaign else list(queries.campaigns(engine)["name"])
    for name in names:
        info = _info(engine, name)
        _reap(engine, url, info.id, args.grace)
        cells = queries.cell_results(engine, info.id)
        done, planned = int(cells["trials_finished"].sum()), int(cells["trials_planned"].sum())
        print(f"{name}: {done}/{planned} trials finished, {int(cells['trials_running'].sum())} running")
        shown = cells[["batch_size", "optimizer", "schedule", "trials_finished", "trials_running",
                       "trials_planned", "trials_reached", "steps_to_result"]]
        # Whole numbers, '-' where a cell has no result (a NULL makes pandas read the
        # column as floats: 95.0)
        shown = shown.astype({"steps_to_result": "Int64"})
        print(shown.astype(object).where(shown.notna(), "-").to_string(index=False))
    return 0


def cmd_results(args) -> int:
    _, engine = _engine(args)
    _print_results(engine, args.campaign, args.format)
    return 0


def cmd_figure(args) -> int:
    _check_figure_path("--output", args.output)
    _, engine = _engine(args)
    print(_write_figure(engine, args.campaign, args.output, args.y))
    return 0


def cmd_dashboard(args) -> int:
    url, reader = _engine(args, read_only=True)  # before Streamlit starts: one line, exit 2
    _upgrade_schema(url, reader)
    app = Path(__file__).resolve().parent.parent / "app" / "main.py"
    env = {**os.environ, "BATCHLAB_STORAGE": url}
    print(f"dashboard on http://{args.address}:{args.port} reading {redact(url)}", flush=True)
    command = [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", args.address,
               "--server.port", str(args.port), "--server.headless", "true",
               "--browser.gatherUsageStats", "false"]
    # Become streamlit (no child left behind when the dashboard is stopped).
    os.execve(sys.executable, command, env)


def _upgrade_schema(url: str, reader) -> None:
    """Bring an older schema up to date before the dashboard starts: the app only reads (its
    engine is read-only), and its pages read the newest tables. A current schema is checked
    on a read-only connection and not written to (a file on read-only media, a role with
    SELECT only); a newer one ends the command (StorageError). `reader`: a read-only
    engine on `url` (disposed here)."""
    from sqlalchemy.exc import SQLAlchemyError
    from db.schema import ensure_schema, is_current
    try:
        if is_current(reader):
            return
    finally:
        reader.dispose()
    writer = make_engine(url)
    try:
        ensure_schema(writer)
    except SQLAlchemyError as exc:  # e.g. a role with SELECT only, or a read-only file
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise UserError(f"cannot upgrade the schema of {redact(url)}: {reason} (run "
                        f"`batchlab status --storage URL` once as a user that may)") from None
    finally:
        writer.dispose()
    print(f"upgraded the schema of {redact(url)}", flush=True)


def cmd_workloads(args) -> int:
    from trainers.workloads import WORKLOADS
    for name in sorted(WORKLOADS):
        workload = WORKLOADS[name]
        print(f"{name:28s} {workload.description} (default target {workload.default_target})")
    return 0


if __name__ == "__main__":
    # `python -m study.cli` (torchrun's form) runs this file as __main__, a second copy of
    # the module: hand over to the one every command module imports, so that there is
    # one set of functions (and `batchlab` and `python -m study.cli` behave the same).
    from study.cli import main as _main
    sys.exit(_main())
