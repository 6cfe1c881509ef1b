"""The dashboard's SQL-side hot paths give the same numbers as the full in-memory load."""
from __future__ import annotations

import shutil
import sqlite3

import pandas.testing as pdt

from app import data
from db.engine import make_engine
from study.analysis.steps import steps_to_result


def _engine(url):
    return make_engine(url, read_only=True)


def test_first_beating_rows_give_steps_to_result(dashboard_db):
    engine = _engine(dashboard_db)
    for name in data.campaign_names(engine):
        full = data.load_campaign_fast(engine, name)
        light = data.load_campaign_light(engine, name)
        info = full.info
        expected = steps_to_result(full.finished_trials, full.measurements, metric=info.metric,
                                   threshold=info.threshold, mode=info.mode)
        pdt.assert_frame_equal(light.results(), expected)
        pdt.assert_frame_equal(light.table, full.table)
        pdt.assert_frame_equal(data.scatter_from(light, light.results()),
                               data.scatter_from(full, full.results()))
        boot_full = data.scaling_analysis(full, n_resamples=50)
        boot_light = data.scaling_analysis(light, n_resamples=50)
        pdt.assert_frame_equal(boot_light.summary, boot_full.summary)
        pdt.assert_frame_equal(boot_light.fits, boot_full.fits)


def test_measurements_of_trials_match_full_load(dashboard_db):
    engine = _engine(dashboard_db)
    name = data.campaign_names(engine)[0]
    full = data.load_campaign_fast(engine, name)
    ids = sorted(full.trials["trial_id"].head(5).astype(int))
    rows = data.measurements_of_trials(engine, full.info, ids)
    expected = full.measurements.loc[full.measurements["trial_id"].isin(ids)].reset_index(drop=True)
    pdt.assert_frame_equal(rows.reset_index(drop=True), expected, check_dtype=False)


def test_campaign_version_changes_only_for_that_campaign(dashboard_db, tmp_path):
    path = tmp_path / "copy.db"
    shutil.copy(dashboard_db.removeprefix("sqlite:///"), path)
    engine = _engine(f"sqlite:///{path}")
    marks = data.IncrementalState()
    names = data.campaign_names(engine)
    before = {n: data.campaign_version(engine, n, marks) for n in names}
    assert {n: data.campaign_version(engine, n, marks) for n in names} == before
    con = sqlite3.connect(path)
    cid = con.execute("SELECT id FROM bl_campaigns WHERE name = ?", (names[0],)).fetchone()[0]
    trial = con.execute("SELECT MAX(t.id) FROM bl_trials t JOIN bl_cells c ON c.id = t.cell_id "
                        "WHERE c.campaign_id = ?", (cid,)).fetchone()[0]
    con.execute("INSERT INTO bl_measurements (trial_id, step, examples, epoch, wall_seconds, "
                "eval_seconds, learning_rate, batch_size, train_loss, val_loss, val_error, "
                "extra) VALUES (?, 99999, 0, 0, 0, 0, 0.1, 16, 0.5, 0.5, 0.5, '{}')", (trial,))
    con.commit()
    con.close()
    after = {n: data.campaign_version(engine, n, marks) for n in names}
    assert after[names[0]] != before[names[0]]
    assert all(after[n] == before[n] for n in names[1:])
