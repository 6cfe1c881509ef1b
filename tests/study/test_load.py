"""Load: 32 worker processes on PostgreSQL, 8 on SQLite, each running a campaign of fast
trials to completion with exact counts and no errors; throughput and connections per
worker are measured and written to JSON. Every trial row carries its provenance."""
from __future__ import annotations

import json
import re
import threading
import time
import uuid

import pandas as pd
import pytest
from sqlalchemy import create_engine, text

from tests.study.test_recovery import (check_exact_accounting, create, spec_text, start_worker,
                                       trial_rows, wait_all)

pytestmark = pytest.mark.slow


def load_spec(name: str) -> str:
    # 8 cells x 8 trials of 20 steps: the work is the workers' coordination, not training.
    return spec_text(name, batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024), trials_per_cell=8,
                     max_steps=20, eval_every=10)


class ConnectionSampler:
    """Samples pg_stat_activity for the database every 0.5 s: the most connections seen."""

    def __init__(self, url: str, database: str):
        self.engine = create_engine(url, pool_size=1)
        self.database, self.peak, self._stop = database, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            with self.engine.connect() as connection:
                count = connection.execute(text(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"),
                    {"d": self.database}).scalar()
            self.peak = max(self.peak, count)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.engine.dispose()


def run_workers(url: str, name: str, count: int, tmp_path, timeout: float):
    logs = tmp_path / "workers.log"
    started = time.monotonic()
    workers = [start_worker(url, name, grace=60, heartbeat=5, log=logs) for _ in range(count)]
    codes = wait_all(workers, timeout)
    return codes, time.monotonic() - started, logs.read_text()


def throughput(engine, campaign_id: int) -> dict:
    with engine.connect() as connection:
        first, last, finished = connection.execute(text(
            "SELECT MIN(t.started_at), MAX(t.finished_at), COUNT(*) FROM bl_trials t JOIN bl_cells c "
            "ON c.id = t.cell_id WHERE c.campaign_id = :c AND t.outcome <> 'abandoned'"),
            {"c": campaign_id}).one()
    # SQLite hands the raw text back from a text() query; PostgreSQL datetimes.
    first, last = (pd.Timestamp(t).tz_localize(None) if pd.Timestamp(t).tzinfo is None
                   else pd.Timestamp(t).tz_convert(None) for t in (first, last))
    seconds = (last - first).total_seconds()
    return {"trials": finished, "trial_seconds": round(seconds, 2),
            "trials_per_second": round(finished / seconds, 2)}


def check_provenance(engine, campaign_id: int) -> None:
    """batchlab version + git commit (dirty flag), Python/torch/CUDA/optuna versions,
    device, host, seed and the resolved config, on every trial row."""
    with engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT t.code_version, t.package_versions, t.device, t.host, t.seed, t.config "
            "FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id WHERE c.campaign_id = :c"),
            {"c": campaign_id}).all()
    for code_version, versions, device, host, seed, config in rows:
        versions = versions if isinstance(versions, dict) else json.loads(versions)
        config = config if isinstance(config, dict) else json.loads(config)
        assert re.fullmatch(r"\d+\.\d+\.\d+(\+g[0-9a-f]{12}(\.dirty)?)?", code_version), code_version
        assert {"python", "torch", "optuna", "cuda", "cudnn", "sqlalchemy"} <= set(versions)
        assert device == "cpu" and host and config["seed"] == seed
        assert config["workload"] == "digits_mlp" and config["max_steps"] == 20


def test_32_workers_on_postgres(local_postgres, tmp_path):
    database = f"load_{uuid.uuid4().hex[:8]}"
    url = local_postgres.create_database(database)
    engine, info = create(url, load_spec("load32"))
    with ConnectionSampler(url, database) as sampler:
        codes, wall, logs = run_workers(url, "load32", 32, tmp_path, timeout=420)
    assert codes == [0] * 32, logs[-3000:]
    assert "Traceback" not in logs and "error" not in logs.lower()
    rows = check_exact_accounting(engine, url, info.id, 8)
    assert len(rows) == 64 and (rows["outcome"] != "abandoned").all()
    check_provenance(engine, info.id)
    report = {"workers": 32, "database": "postgresql", "wall_seconds": round(wall, 1),
              **throughput(engine, info.id), "peak_connections": sampler.peak,
              "connections_per_worker": round(sampler.peak / 32, 2)}
    (tmp_path / "load_postgres.json").write_text(json.dumps(report, indent=2))
    print(f"\nload (PostgreSQL): {json.dumps(report)}")
    assert sampler.peak <= 32 * 8  # two small pools per worker (batchlab's and Optuna's)


def test_8_workers_on_sqlite_never_locked(tmp_path):
    url = f"sqlite:///{tmp_path / 'load.db'}"
    engine, info = create(url, load_spec("load8"))
    codes, wall, logs = run_workers(url, "load8", 8, tmp_path, timeout=300)
    assert codes == [0] * 8, logs[-3000:]
    assert "locked" not in logs.lower() and "Traceback" not in logs
    rows = check_exact_accounting(engine, url, info.id, 8)
    assert len(rows) == 64 and trial_rows(engine, info.id)["outcome"].isin(["failed"]).sum() == 0
    check_provenance(engine, info.id)
    report = {"workers": 8, "database": "sqlite", "wall_seconds": round(wall, 1),
              **throughput(engine, info.id)}
    (tmp_path / "load_sqlite.json").write_text(json.dumps(report, indent=2))
    print(f"\nload (SQLite): {json.dumps(report)}")
