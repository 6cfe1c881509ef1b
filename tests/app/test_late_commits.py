"""The dashboard's incremental reads see a measurement row committed long after its id was
handed out (PostgreSQL: ids come from a sequence before commit, so a slow transaction can
commit an id far below the newest one already read), and stay exact after rolled-back
ids (permanent gaps). Two real connections to a real PostgreSQL."""
from __future__ import annotations

import itertools

import pandas.testing as pdt
import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app import data
from db import queries
from db.engine import make_engine
from db.models import Campaign, Cell, Measurement, Trial
from tests.app.conftest import CAMPAIGN, OTHER, build_database

_names = itertools.count()


@pytest.fixture
def pg_url(local_postgres):
    return build_database(local_postgres.create_database(f"late_{next(_names)}"))


def _row(trial_id: int, step: int, val_error: float) -> dict:
    return {"trial_id": trial_id, "step": step, "examples": step * 16, "epoch": step * 0.016,
            "wall_seconds": 0.1, "eval_seconds": 0.01, "learning_rate": 0.1, "batch_size": 16,
            "train_loss": val_error, "val_loss": val_error, "val_error": val_error, "extra": {}}


def _trial(engine, campaign: str, batch_size: int, number: int) -> int:
    with Session(engine) as session:
        return session.scalar(select(Trial.id).join(Cell).join(Campaign).where(
            Campaign.name == campaign, Cell.batch_size == batch_size,
            Trial.trial_number == number))


def _other_trial(engine) -> int:
    with Session(engine) as session:
        return session.scalar(select(Trial.id).join(Cell).join(Campaign)
                              .where(Campaign.name == OTHER).order_by(Trial.id).limit(1))


def _commit_many(writer, trial_id: int, first_step: int, count: int) -> None:
    """Another worker's rows (another campaign): `count` ids above the slow one's."""
    with writer.begin() as connection:
        connection.execute(insert(Measurement), [_row(trial_id, first_step + i, 0.5)
                                                 for i in range(count)])


def _reads(engine, state, marks):
    """What the pages read: the campaign's version, its first on-target rows, its
    measurement summary and the trials with probes."""
    info = data.campaign_info(engine, CAMPAIGN)
    return (data.campaign_version(engine, CAMPAIGN, marks),
            data.first_beating_rows(engine, info, state),
            data.measurement_summary(engine, info, state),
            data.probe_summary(engine, info, state), info)


def _assert_exact(engine, state, marks):
    version, firsts, summary, probes, info = _reads(engine, state, marks)
    expected = queries.first_beating_measurements(engine, info.id, info.metric,
                                                  info.threshold, info.mode)
    pdt.assert_frame_equal(firsts.reset_index(drop=True), expected, check_dtype=False)
    full = data.load_campaign_fast(engine, CAMPAIGN)
    assert summary.rows == len(full.measurements)
    assert probes[1] == sorted(int(t) for t in full.measurements.loc[
        full.measurements["extra"].map(bool), "trial_id"].unique())
    return version, firsts, summary


@pytest.mark.parametrize("many", [5, 1500])
def test_a_row_committed_after_higher_ids_is_read(pg_url, many):
    writer, reader = make_engine(pg_url), make_engine(pg_url, read_only=True)
    state = marks = data.IncrementalState()
    slow_trial = _trial(writer, CAMPAIGN, 64, 1)  # B=64's second trial never reaches 0.1
    other = _other_trial(writer)
    _assert_exact(reader, state, marks)
    slow = writer.connect()
    transaction = slow.begin()  # a worker whose transaction is slow (e.g. waits on a lock)
    slow.execute(insert(Measurement), [_row(slow_trial, 5, 0.01) | {"extra": {"probe": 1.0}}])
    _commit_many(writer, other, 10_000, many)  # others commit higher ids meanwhile
    before, firsts, summary = _assert_exact(reader, state, marks)
    assert slow_trial not in set(firsts["trial_id"])
    _commit_many(writer, other, 15_000, 2)  # a refresh while the slow one is still open
    _assert_exact(reader, state, marks)
    transaction.commit()  # the slow row arrives, its id far below the newest one read
    slow.close()
    after, firsts, late = _assert_exact(reader, state, marks)
    assert after != before  # the pages' caches are invalidated
    assert slow_trial in set(firsts["trial_id"]) and late.rows == summary.rows + 1
    _commit_many(writer, other, 20_000, many)  # and it stays counted once afterwards
    _assert_exact(reader, state, marks)
    _assert_exact(reader, state, marks)
    writer.dispose()
    reader.dispose()


def test_rolled_back_ids_are_forgotten(pg_url):
    """A rolled-back transaction's ids never appear: the reads stay exact, and the ids
    are not re-checked forever."""
    writer, reader = make_engine(pg_url), make_engine(pg_url, read_only=True)
    state = marks = data.IncrementalState()
    other = _other_trial(writer)
    _assert_exact(reader, state, marks)
    with writer.connect() as connection:
        transaction = connection.begin()
        connection.execute(insert(Measurement), [_row(other, 500 + i, 0.5) for i in range(50)])
        _commit_many(writer, other, 10_000, 3)
        _assert_exact(reader, state, marks)  # the 50 ids are missing: may still come
        assert sum(b - a + 1 for a, b in state.latest.ranges) == 50
        transaction.rollback()
    _commit_many(writer, other, 20_000, 3)
    _assert_exact(reader, state, marks)
    _assert_exact(reader, state, marks)
    assert all(not entry.mark.pending for entry in state.entries.values()
               if isinstance(entry, data.Folded))
    assert not any(mark.pending for mark, _ in state.versions.values())
    writer.dispose()
    reader.dispose()


def test_a_first_read_after_a_late_row_counts_it_once(pg_url):
    """An aggregate read for the first time starts from what earlier reads noted as
    missing (here the campaign version's): the late row, already in its SQL result, is
    not folded in a second time when it is found among those ids."""
    writer, reader = make_engine(pg_url), make_engine(pg_url, read_only=True)
    state = data.IncrementalState()
    slow_trial = _trial(writer, CAMPAIGN, 64, 1)
    other = _other_trial(writer)
    with writer.connect() as slow, writer.connect() as slower:
        transaction, longer = slow.begin(), slower.begin()
        slow.execute(insert(Measurement), [_row(slow_trial, 5, 0.01)])
        slower.execute(insert(Measurement), [_row(other, 7, 0.5)])
        _commit_many(writer, other, 10_000, 3)
        data.campaign_version(reader, CAMPAIGN, state)  # notes both ids as missing
        assert sum(b - a + 1 for a, b in state.latest.ranges) == 2
        transaction.commit()
        info = data.campaign_info(reader, CAMPAIGN)
        first = data.measurement_summary(reader, info, state)  # its first read: in SQL
        assert first.rows == len(data.load_campaign_fast(reader, CAMPAIGN).measurements)
        _assert_exact(reader, state, state)
        longer.commit()
    _assert_exact(reader, state, state)
    _commit_many(writer, other, 20_000, 3)
    _assert_exact(reader, state, state)
    writer.dispose()
    reader.dispose()


def _new_trial(connection, cell_id: int, number: int) -> int:
    return connection.execute(insert(Trial).returning(Trial.id), [dict(
        cell_id=cell_id, optuna_trial_id=1000 + number, trial_number=number,
        outcome="running", hparams={}, config={}, seed=number)]).scalar_one()


def test_trials_stay_exact_when_a_late_claim_meets_a_given_back_slot(pg_url):
    """Two workers claim trial rows; the one that drew the lower id commits last. Before
    it does, a third worker gives back a prefetched slot (deletes its running row). The
    incremental trials frame must equal a full read: the late row in it, the deleted one
    not (the row count alone cannot tell: one row more, one row less)."""
    writer, reader = make_engine(pg_url), make_engine(pg_url, read_only=True)
    state = data.IncrementalState()
    cid = int(queries.campaign_by_name(reader, CAMPAIGN)["id"])
    frame = data.campaign_trials(reader, cid, state)
    cell = int(frame["cell_id"].iloc[0])
    with writer.connect() as slow:
        transaction = slow.begin()
        late = _new_trial(slow, cell, 101)  # a claim whose transaction is slow
        with writer.begin() as connection:
            _new_trial(connection, cell, 102)
            given_back = _new_trial(connection, cell, -1)  # a prefetched slot
        assert late < given_back
        pdt.assert_frame_equal(data.campaign_trials(reader, cid, state),
                               data.report_campaign_trials(reader, cid))
        with writer.begin() as connection:  # the slot is given back: its row deleted
            connection.execute(Trial.__table__.delete().where(Trial.id == given_back))
        transaction.commit()
    got = data.campaign_trials(reader, cid, state)
    assert late in set(got["trial_id"]) and given_back not in set(got["trial_id"])
    pdt.assert_frame_equal(got, data.report_campaign_trials(reader, cid))
    writer.dispose()
    reader.dispose()


def test_a_late_probe_result_changes_the_versions(pg_url):
    """`batchlab probe` runs store their results each in one transaction: the one that
    drew the lower id may commit last. The Dynamics page's caches (keyed on the data
    version and the campaign's version) must see it."""
    from db.models import ProbeResult
    writer, reader = make_engine(pg_url), make_engine(pg_url, read_only=True)
    state = data.IncrementalState()
    cid = int(queries.campaign_by_name(reader, CAMPAIGN)["id"])

    def probe(connection, value):
        connection.execute(insert(ProbeResult), [dict(campaign_id=cid, kind="sharpness",
                                                      params={}, result={"sharpness": value})])
    with writer.connect() as slow:
        transaction = slow.begin()
        probe(slow, 1.0)
        with writer.begin() as connection:
            probe(connection, 2.0)
        before = (queries.data_version(reader), data.campaign_version(reader, CAMPAIGN, state))
        transaction.commit()
    after = (queries.data_version(reader), data.campaign_version(reader, CAMPAIGN, state))
    assert after[0] != before[0] and after[1] != before[1]
    writer.dispose()
    reader.dispose()
