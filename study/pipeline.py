"""The worker's storage pipeline: what keeps storage off the training's critical path.

- `StoragePipeline`: one background thread that runs the worker's storage jobs one at a
  time, in the order they were submitted (claiming and asking the next trial, writing
  measurements, finishing and telling the last one). A job's failure (after its own
  retries) is never lost: it is raised in the worker's main thread, as `StorageJobError`,
  at its next interaction with the pipeline.
- `MeasurementBuffer`: evaluations queued by the main thread and written in one
  executemany per batch, at most `flush_seconds` after the previous batch.
- `CellBest`: the cells' best steps-to-result for pruning, read from storage at most
  every `refresh_seconds` (in the background) and updated by this worker's own results
  at once while its heartbeats get through (its concluded trials' rows are stamped until
  their finish jobs run, so no reaper takes them), else once their finish jobs have
  recorded them (the worker waits for that job before its next pruning decision in the
  cell: a reaper may have taken the trial's row, and its result then never counts).
  Another worker's result reaches it up to
  `refresh_seconds` (plus the queue) late: pruning then stops a trial a little later
  than it could, never earlier, since a cell's best only ever decreases. Steps-to-result
  is unchanged: it is the fewest steps at which a trial beat the target, and a trial is
  pruned only at or after a step some other, recorded, trial reached at.

This module imports no torch.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class StorageJobError(RuntimeError):
    """A storage job of the background thread failed after its retries."""


class StoragePipeline:
    """A single background thread with its own database connections (the engines' pools
    hand each thread its own), running jobs first in, first out: a job sees every write
    of the jobs submitted before it."""

    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"storage-{name}")
        self._pending: deque[tuple[str, Future]] = deque()  # submitted, failures not yet raised

    def submit(self, what: str, function: Callable, *args) -> Future:
        """Queue `function(*args)`; `what` names it in a failure. Raises the failure of an
        earlier job first, if one failed."""
        self.raise_failures()
        future = self._executor.submit(function, *args)
        self._pending.append((what, future))
        return future

    def raise_failures(self) -> None:
        """Raise the failure of a finished job (jobs finish in order: the first one)."""
        while self._pending and self._pending[0][1].done():
            what, future = self._pending.popleft()
            _raise_failure(what, future)

    def wait(self, future: Future):
        """The result of one job, waiting for it (a signal still interrupts the wait); a
        failure of it or of an earlier job is raised as StorageJobError. Only this job is
        waited for: jobs run in order, so the ones before it are done when it is, and the
        ones queued after it (a prefetched group is waited for after the finishes of the
        trials before it were queued) run on."""
        future.exception()  # waits
        self.raise_failures()
        return future.result()

    def drain(self) -> None:
        """Wait for every job submitted so far; raise the first failure."""
        while self._pending:
            what, future = self._pending[0]
            future.exception()  # waits
            self._pending.popleft()
            _raise_failure(what, future)

    def settle(self, log: Callable[[str], None]) -> None:
        """Wait for every job, logging failures instead of raising them (on the way out
        of a worker that is already stopping)."""
        while self._pending:
            what, future = self._pending.popleft()
            exc = future.exception()
            if exc is not None:
                log(f"storage job failed while stopping: {what}: {_one_line(exc)}")

    @property
    def idle(self) -> bool:
        return not self._pending or all(f.done() for _, f in self._pending)

    def close(self) -> None:
        """Stop the thread once its queued jobs are done (their failures are not raised)."""
        self._executor.shutdown(wait=True)


def _raise_failure(what: str, future: Future) -> None:
    exc = future.exception()
    if exc is not None:
        raise StorageJobError(f"storage job failed: {what}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:500]


class MeasurementBuffer:
    """Measurement rows waiting to be written, in the order they were measured. Only the
    worker's main thread touches it."""

    def __init__(self, flush_seconds: float = 1.0, max_rows: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self.flush_seconds, self.max_rows, self._clock = flush_seconds, max_rows, clock
        self._rows: list[dict] = []
        self._flushed_at = float("-inf")

    def add(self, row: dict) -> list[dict] | None:
        """Queue a row; returns the batch to write now (this row included) when the last
        batch is `flush_seconds` old or `max_rows` are waiting, else None. So the first
        evaluation after a quiet spell is written at once and fast ones are batched."""
        self._rows.append(row)
        if len(self._rows) >= self.max_rows or self._clock() - self._flushed_at >= self.flush_seconds:
            return self.take()
        return None

    def take(self) -> list[dict]:
        """Every waiting row (possibly none), removed from the buffer."""
        rows, self._rows = self._rows, []
        if rows:
            self._flushed_at = self._clock()
        return rows

    def __len__(self) -> int:
        return len(self._rows)


class CellBest:
    """The best (fewest) steps-to-result of each cell, as pruning reads it after every
    evaluation: min(last value read from storage, this worker's own reached results that
    are recorded)."""

    def __init__(self, refresh_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.refresh_seconds, self._clock = refresh_seconds, clock
        self._lock = threading.Lock()
        self._stored: dict[int, tuple[int | None, float]] = {}  # cell -> (value, read at)
        self._own: dict[int, int] = {}
        # cell -> this worker's reached results whose finish job has not said yet whether
        # they were recorded: (steps to result, that job's future)
        self._unrecorded: dict[int, list[tuple[int, Future]]] = {}
        self._refreshing: set[int] = set()

    def value(self, cell_id: int, *, unrecorded: bool = False) -> int | None:
        """The cell's best as far as it is recorded; with `unrecorded`, also counting this
        worker's reached results whose finish job has not run yet (see `unrecorded`)."""
        with self._lock:
            self._settle(cell_id)
            candidates = [v for v in (self._stored.get(cell_id, (None, 0.0))[0], self._own.get(cell_id))
                          if v is not None]
            if unrecorded:
                candidates += [steps for steps, _ in self._unrecorded.get(cell_id, ())]
        return min(candidates) if candidates else None

    def unrecorded(self, cell_id: int) -> list[Future]:
        """The finish jobs, still running or queued, of this worker's reached results in the
        cell that would lower its value: wait for them before a pruning decision."""
        with self._lock:
            self._settle(cell_id)
            stored = [v for v in (self._stored.get(cell_id, (None, 0.0))[0], self._own.get(cell_id))
                      if v is not None]
            current = min(stored) if stored else None
            return [future for steps, future in self._unrecorded.get(cell_id, ())
                    if current is None or steps < current]

    def _settle(self, cell_id: int) -> None:
        # An own result counts once its finish job returned True (its row was finished);
        # False (a reaper had taken the row) or a failure: it never counts.
        waiting = []
        for steps, future in self._unrecorded.get(cell_id, ()):
            if not future.done():
                waiting.append((steps, future))
            elif future.exception() is None and future.result():
                own = self._own.get(cell_id)
                self._own[cell_id] = steps if own is None else min(own, steps)
        if waiting:
            self._unrecorded[cell_id] = waiting
        else:
            self._unrecorded.pop(cell_id, None)

    def claim_refresh(self, cell_id: int) -> bool:
        """True (and a refresh is then in flight) if the stored value is missing or older
        than `refresh_seconds` and no refresh is already on its way."""
        with self._lock:
            if cell_id in self._refreshing:
                return False
            stored = self._stored.get(cell_id)
            if stored is not None and self._clock() - stored[1] < self.refresh_seconds:
                return False
            self._refreshing.add(cell_id)
            return True

    def store(self, cell_id: int, value: int | None) -> None:
        """A value just read from storage (called from the background thread)."""
        with self._lock:
            self._stored[cell_id] = (value, self._clock())
            self._refreshing.discard(cell_id)

    def refresh_failed(self, cell_id: int) -> None:
        with self._lock:
            self._refreshing.discard(cell_id)

    def reached(self, cell_id: int, steps_to_result: int, recorded: Future) -> None:
        """One of this worker's trials reached the target; `recorded`, its finish job, says
        whether its row was finished (True: it counts from then on, without a read) or
        had been taken by a reaper (False: its result is discarded and never counts)."""
        with self._lock:
            self._unrecorded.setdefault(cell_id, []).append((steps_to_result, recorded))
