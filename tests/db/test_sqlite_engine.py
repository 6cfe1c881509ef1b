"""batchlab's SQLite engines on a file several processes open at once."""
import sqlite3
import threading

from db.engine import connect, make_engine


def test_connections_switching_a_file_to_wal_together_never_fail(tmp_path):
    """Optuna creates a new file in rollback mode; the first connections of several
    workers then switch it to WAL together. SQLite answers that deadlock with "database
    is locked" at once (no busy handler); before the retry ~6% of rounds failed."""
    for round_ in range(300):
        path = tmp_path / f"{round_}.db"
        with sqlite3.connect(path) as made:  # rollback mode, as RDBStorage leaves it
            made.execute("CREATE TABLE t (a)")
        engines = [make_engine(f"sqlite:///{path}") for _ in range(4)]
        start, errors = threading.Barrier(len(engines)), []

        def open_one(engine):
            start.wait()
            try:
                with connect(engine):
                    pass
            except Exception as exc:  # noqa: BLE001 (collected for the assertion)
                errors.append(exc)

        threads = [threading.Thread(target=open_one, args=(e,)) for e in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for engine in engines:
            engine.dispose()
        assert errors == [], f"round {round_}: {errors[0]}"
        check = sqlite3.connect(path)
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        check.close()
