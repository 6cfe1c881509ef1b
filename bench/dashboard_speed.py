"""Dashboard render time on a large database: 100,000 trials, 5,000,000 measurements.

    .venv/bin/python -m bench.dashboard_speed                 # builds /tmp/batchlab_dash_bench.db once
    .venv/bin/python -m bench.dashboard_speed --rebuild       # regenerate it
    .venv/bin/python -m bench.dashboard_speed --pages scaling,curves --repeats 3

The database is written with raw sqlite3 `executemany` (schema from db.schema), in two
campaigns: `bench_big` (40 cells x 2,000 trials x 50 evaluations = 4,000,000 rows) and
`bench_small` (20 cells x 1,000 trials x 50 = 1,000,000 rows). Each page of the app is
opened on `bench_big` with streamlit.testing (AppTest, one fresh app session per page, the
Streamlit caches shared within the process as in a real server): the *first* run (cold:
nothing cached) and then `--repeats` further runs of the same session (a rerun after a
widget change or a live-refresh tick while no worker writes) are timed. A last measurement
appends one measurement row through a second writable connection before a rerun (data
version changes: what a live page pays while workers write; `--after-write`), and with
`--after-finish` one more after a whole trial finished (a new trial row and its
measurements: the bootstrap's input changes). The writes stay in the file (`--rebuild`
starts afresh). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_PATH = Path("/tmp/batchlab_dash_bench.db")
APP = ROOT / "app" / "main.py"
EVALS = 50  # measurements per trial
EVAL_EVERY = 20
THRESHOLD = 0.1
CAMPAIGNS = {  # name -> (batch sizes, optimizer/schedule series, trials per cell)
    "bench_big": ([16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
                  [("momentum", "constant"), ("momentum", "linear_decay"), ("adam", "constant"),
                   ("sgd", "constant")], 2000),
    "bench_small": ([32, 64, 128, 256, 512], [("momentum", "constant"), ("adam", "constant"),
                                              ("sgd", "constant"), ("nesterov", "constant")], 1000),
}
PAGES = ["campaigns", "scaling", "hparams", "curves", "budgets", "dynamics", "sql"]


def build(path: Path, seed: int = 0) -> dict:
    """Create the schema (db.schema) and bulk-insert the campaigns with sqlite3."""
    from db.engine import make_engine
    from db.schema import ensure_schema
    if path.exists():
        path.unlink()
    engine = make_engine(f"sqlite:///{path}")
    ensure_schema(engine)
    engine.dispose()
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = OFF")
    con.execute("PRAGMA synchronous = OFF")
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    stamp = lambda t: t.strftime("%Y-%m-%d %H:%M:%S.%f")  # noqa: E731
    versions = json.dumps({"python": platform.python_version(), "torch": "2.5.1", "cuda": "none",
                           "optuna": "4.1.0", "batchlab": "0.1.0"})
    trial_id = measurement_id = cell_id = 0
    totals = {"trials": 0, "measurements": 0}
    started = time.monotonic()
    for campaign_id, (name, (batch_sizes, series, per_cell)) in enumerate(CAMPAIGNS.items(), 1):
        spec = {"name": name, "workload": "digits_mlp", "spaces": {"all": [
            {"name": "learning_rate", "low": 1e-4, "high": 10.0, "scale": "log"},
            {"name": "momentum", "low": 0.5, "high": 0.999, "scale": "reverse_log"}]}}
        con.execute("INSERT INTO bl_campaigns VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (campaign_id, name, "digits_mlp", "val_error", THRESHOLD, "min", EVAL_EVERY,
                     EVALS * EVAL_EVERY, per_cell, "quasi_random", json.dumps(spec), "# bench",
                     stamp(now - timedelta(days=2))))
        for optimizer, schedule in series:
            for batch_size in batch_sizes:
                cell_id += 1
                con.execute("INSERT INTO bl_cells VALUES (?,?,?,?,?,?,?,?)",
                            (cell_id, campaign_id, batch_size, optimizer, schedule,
                             f"{name}-{cell_id}", per_cell, per_cell))
                trials, rows = _cell_rows(rng, cell_id, batch_size, per_cell, trial_id,
                                          measurement_id, now, stamp, versions)
                con.executemany("INSERT INTO bl_trials VALUES (" + ",".join("?" * 27) + ")", trials)
                con.executemany("INSERT INTO bl_measurements VALUES (" + ",".join("?" * 13) + ")",
                                rows)
                trial_id += len(trials)
                measurement_id += len(rows)
                totals["trials"] += len(trials)
                totals["measurements"] += len(rows)
        con.commit()
    con.execute("INSERT INTO bl_workers VALUES (?,?,?,?,?,?,?,?,?,?)",
                ("bench-worker", 1, "bench-host", 1, "cpu", stamp(now), stamp(now), "finished",
                 None, 0))
    con.commit()
    con.execute("ANALYZE")
    con.close()
    totals["seconds"] = round(time.monotonic() - started, 1)
    return totals


def _cell_rows(rng, cell_id, batch_size, count, first_trial, first_measurement, now, stamp,
               versions):
    """`count` trials of one cell with EVALS evaluations each. val_error decays from 0.9
    towards a per-trial floor; trials whose floor is under THRESHOLD reach the target."""
    lr = np.exp(rng.uniform(np.log(1e-4), np.log(10.0), count))
    momentum = 1 - np.exp(rng.uniform(np.log(0.001), np.log(0.5), count))
    floor = rng.uniform(0.02, 0.4, count)
    rate = rng.uniform(0.02, 0.3, count) * np.sqrt(batch_size / 16)
    diverged = rng.random(count) < 0.06
    failed = (~diverged) & (rng.random(count) < 0.01)
    steps = np.arange(1, EVALS + 1) * EVAL_EVERY
    errors = floor[:, None] + (0.9 - floor[:, None]) * np.exp(-rate[:, None] * np.arange(1, EVALS + 1))
    trials, rows = [], []
    mid = first_measurement
    for i in range(count):
        tid = first_trial + i + 1
        curve = errors[i]
        beat = np.nonzero(curve < THRESHOLD)[0]
        n_rows = EVALS
        if failed[i]:
            outcome, n_rows = "failed", 0
        elif diverged[i]:
            outcome, n_rows = "diverged", int(rng.integers(2, EVALS))
        elif len(beat):
            outcome = "reached"
            n_rows = int(beat[0]) + 1
        else:
            outcome = "not_reached"
        if outcome == "reached":
            str_ = int(steps[beat[0]])
            etr, sec = str_ * batch_size, str_ * 0.01
        else:
            str_ = etr = sec = None
        finished = now - timedelta(seconds=(count - i) * 3)
        seed = int(rng.integers(0, 2**31))
        hparams = json.dumps({"learning_rate": float(lr[i]), "momentum": float(momentum[i])})
        trials.append((tid, cell_id, i, i, outcome, hparams, json.dumps({"seed": seed}), seed,
                       int(steps[n_rows - 1]) if n_rows else 0, None, None, str_, etr, sec,
                       float(curve[:max(n_rows, 1)].min()),
                       "RuntimeError: bench failure" if outcome == "failed" else "",
                       "bench-worker", "cpu", "bench-host", "0.1.0+g0123456789ab", versions,
                       stamp(finished - timedelta(seconds=2)), stamp(finished), None, 1, None, None))
        # to keep the file at EVALS rows per trial on average, reached trials keep
        # evaluating to the end (as a campaign with no early stop would)
        n_rows = EVALS if outcome in ("reached", "not_reached") else n_rows
        for k in range(n_rows):
            mid += 1
            error = float(curve[k])
            if outcome == "diverged" and k == n_rows - 1:
                error = None
            extra = (f'{{"noise_scale": {100.0 + 5 * k:.1f}}}' if tid % 10 == 0 else "{}")
            step = int(steps[k])
            rows.append((mid, tid, step, step * batch_size, step * batch_size / 1797.0,
                         step * 0.01, step * 0.001, float(lr[i]), batch_size, error, error, error,
                         extra))
    # failed trials have no rows; pad the count with extra rows on the last trial? no:
    # the totals are reported as measured
    return trials, rows


def _pad(path: Path, target: int) -> int:
    """Top the measurement count up to exactly `target` (later steps of finished trials)."""
    con = sqlite3.connect(path)
    have = con.execute("SELECT COUNT(*) FROM bl_measurements").fetchone()[0]
    missing = target - have
    if missing > 0:
        start = con.execute("SELECT MAX(id) FROM bl_measurements").fetchone()[0]
        ids = [r[0] for r in con.execute(
            "SELECT id FROM bl_trials WHERE outcome = 'failed' ORDER BY id")]
        rows, mid = [], start
        for n in range(missing):
            tid = ids[n % len(ids)]
            step = (n // len(ids) + 1) * EVAL_EVERY
            mid += 1
            rows.append((mid, tid, step, step * 64, step * 64 / 1797.0, step * 0.01,
                         step * 0.001, 0.1, 64, None, None, None, "{}"))
        con.executemany("INSERT INTO bl_measurements VALUES (" + ",".join("?" * 13) + ")", rows)
        con.commit()
    con.close()
    return max(missing, 0)


# ---- timing ---------------------------------------------------------------------------------
def time_pages(url: str, campaign: str, pages: list[str], repeats: int) -> list[dict]:
    from streamlit.testing.v1 import AppTest
    os.environ["BATCHLAB_STORAGE"] = url
    results = []
    for page in pages:
        at = AppTest.from_file(str(APP), default_timeout=900)
        at.session_state["campaign"] = campaign
        started = time.perf_counter()
        at.run()
        if page != "campaigns":
            at.switch_page(f"views/{page}.py")
            at.run()
        if page == "sql":
            at.text_area(key="sql_text").set_value(
                "SELECT batch_size, optimizer, schedule, steps_to_result FROM bl_cell_results "
                "WHERE campaign_id = 1")
            at.button(key="run_sql").click()
            at.run()
        first = time.perf_counter() - started
        errors = [e.value for e in at.exception]
        warm = []
        for _ in range(repeats):
            started = time.perf_counter()
            if page == "sql":
                at.button(key="run_sql").click()
            at.run()
            warm.append(time.perf_counter() - started)
            errors += [e.value for e in at.exception]
        results.append({"page": page, "first_s": first, "rerun_s": min(warm) if warm else None,
                        "rerun_max_s": max(warm) if warm else None, "errors": errors, "at": at})
    return results


def time_after_write(path: Path, url: str, campaign: str, pages: list[str]) -> dict[str, float]:
    """Rerun each page after one new measurement row (the data version changes)."""
    from streamlit.testing.v1 import AppTest
    os.environ["BATCHLAB_STORAGE"] = url
    out = {}
    for page in pages:
        at = AppTest.from_file(str(APP), default_timeout=900)
        at.session_state["campaign"] = campaign
        at.run()
        if page != "campaigns":
            at.switch_page(f"views/{page}.py")
            at.run()
        con = sqlite3.connect(path)
        # a reached trial of the campaign being timed (the newest one of the database
        # belongs to another campaign, whose writes no longer invalidate this one's caches)
        trial = con.execute(
            "SELECT MAX(t.id) FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id "
            "JOIN bl_campaigns p ON p.id = c.campaign_id "
            "WHERE t.outcome = 'reached' AND p.name = ?", (campaign,)).fetchone()[0]
        step = con.execute("SELECT MAX(step) FROM bl_measurements WHERE trial_id = ?",
                           (trial,)).fetchone()[0] + EVAL_EVERY
        con.execute("INSERT INTO bl_measurements (trial_id, step, examples, epoch, wall_seconds, "
                    "eval_seconds, learning_rate, batch_size, train_loss, val_loss, val_error, "
                    "extra) VALUES (?, ?, 0, 0, 0, 0, 0.1, 16, 0.5, 0.5, 0.5, '{}')", (trial, step))
        con.commit()
        con.close()
        time.sleep(3)  # the data version itself is cached for 2 s (app.common.CACHE_SECONDS)
        started = time.perf_counter()
        at.run()
        out[page] = time.perf_counter() - started
    return out


def _finish_a_trial(path: Path, campaign: str) -> None:
    """What a worker does when a trial ends: a new trial row of the campaign's first cell,
    finished ('reached' at its last evaluation) with its measurements, in one transaction
    (it changes the cell's trial count, so the bootstrap and the fits are recomputed)."""
    con = sqlite3.connect(path)
    cell, batch_size = con.execute(
        "SELECT c.id, c.batch_size FROM bl_cells c JOIN bl_campaigns p ON p.id = c.campaign_id "
        "WHERE p.name = ? ORDER BY c.id LIMIT 1", (campaign,)).fetchone()
    number = con.execute("SELECT MAX(trial_number) FROM bl_trials WHERE cell_id = ?",
                         (cell,)).fetchone()[0] + 1
    now = datetime.now(timezone.utc).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    steps = [EVAL_EVERY * (k + 1) for k in range(EVALS)]
    cur = con.execute(
        "INSERT INTO bl_trials (cell_id, optuna_trial_id, trial_number, outcome, hparams, "
        "config, seed, steps, steps_to_result, best_metric, message, host, device, "
        "code_version, package_versions, started_at, finished_at, attempt) VALUES (?, ?, ?, "
        "'reached', '{\"learning_rate\": 0.1, \"momentum\": 0.9}', '{}', 1, ?, ?, 0.09, '', "
        "'bench-host', 'cpu', '0.1.0', '{}', ?, ?, 1)",
        (cell, number, number, steps[-1], steps[-1], now, now))
    trial = cur.lastrowid
    con.executemany(
        "INSERT INTO bl_measurements (trial_id, step, examples, epoch, wall_seconds, "
        "eval_seconds, learning_rate, batch_size, train_loss, val_loss, val_error, extra) "
        "VALUES (?, ?, ?, ?, 0, 0, 0.1, ?, ?, ?, ?, '{}')",
        [(trial, step, step * batch_size, step * batch_size / 1797.0, batch_size,
          0.5 if step < steps[-1] else 0.09, 0.5 if step < steps[-1] else 0.09,
          0.5 if step < steps[-1] else 0.09) for step in steps])
    con.commit()
    con.close()


def time_after_finish(path: Path, url: str, campaign: str, pages: list[str]) -> dict[str, float]:
    """Rerun each page after a trial of the campaign finished (new trial row + its rows)."""
    from streamlit.testing.v1 import AppTest
    os.environ["BATCHLAB_STORAGE"] = url
    out = {}
    for page in pages:
        at = AppTest.from_file(str(APP), default_timeout=900)
        at.session_state["campaign"] = campaign
        at.run()
        if page != "campaigns":
            at.switch_page(f"views/{page}.py")
            at.run()
        _finish_a_trial(path, campaign)
        time.sleep(3)
        started = time.perf_counter()
        at.run()
        out[page] = time.perf_counter() - started
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--pages", default=",".join(PAGES))
    parser.add_argument("--campaign", default="bench_big")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--after-write", action="store_true",
                        help="also time a rerun after a new measurement row is written")
    parser.add_argument("--after-finish", action="store_true",
                        help="also time a rerun after a trial of the campaign finished (a new "
                             "trial row and its measurements; changes the bootstrap's input)")
    args = parser.parse_args(argv)
    if args.rebuild or not args.path.exists():
        totals = build(args.path)
        totals["padded"] = _pad(args.path, 5_000_000)
        print(f"built {args.path}: {totals}", flush=True)
    # A database built by an older batchlab is upgraded first, as `batchlab dashboard` does;
    # otherwise every page would time the "schema is out of date" notice instead.
    from db.engine import make_engine
    from db.schema import ensure_schema
    ensure_schema(make_engine(f"sqlite:///{args.path}"))
    con = sqlite3.connect(args.path)
    trials, rows = (con.execute("SELECT COUNT(*) FROM bl_trials").fetchone()[0],
                    con.execute("SELECT COUNT(*) FROM bl_measurements").fetchone()[0])
    con.close()
    url = f"sqlite:///{args.path}"
    pages = [p for p in args.pages.split(",") if p]
    print(f"# {datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, {os.cpu_count()} cpus, "
          f"python {platform.python_version()}; {trials:,} trials, {rows:,} measurements, "
          f"{args.path.stat().st_size / 2**20:,.0f} MiB; campaign {args.campaign}", flush=True)
    results = time_pages(url, args.campaign, pages, args.repeats)
    after = time_after_write(args.path, url, args.campaign, pages) if args.after_write else {}
    finish = (time_after_finish(args.path, url, args.campaign, pages) if args.after_finish
              else {})
    print("| page | first load (s) | rerun, best (s) | rerun, worst (s) |"
          + (" rerun after a write (s) |" if after else "")
          + (" rerun after a trial finished (s) |" if finish else "") + " errors |")
    print("|---|---|---|---|" + ("---|" if after else "") + ("---|" if finish else "") + "---|")
    for r in results:
        line = (f"| {r['page']} | {r['first_s']:.2f} | {r['rerun_s']:.2f} | {r['rerun_max_s']:.2f} |"
                + (f" {after[r['page']]:.2f} |" if after else "")
                + (f" {finish[r['page']]:.2f} |" if finish else "")
                + f" {len(r['errors'])} |")
        print(line, flush=True)
        for error in r["errors"][:2]:
            print("   error:", str(error)[:300])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
