"""Retry with exponential backoff and full jitter around a worker's database work.

A database restart, a fail-over or a network blip shows up as an OperationalError (or a
DBAPIError whose connection was invalidated), directly from SQLAlchemy or wrapped by
Optuna in a StorageInternalError. Such errors are transient: the worker waits and tries
the same short transaction again, on a fresh connection (the engines use pool_pre_ping).
Anything else (a constraint violation, a bug) is raised at once.

Each wrapped operation is one short transaction, so a retry redoes it whole. The one
case a retry cannot tell apart is a commit that succeeded but whose acknowledgement was
lost with the connection; docs/distributed.md says what that costs.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import wraps
from typing import Callable, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

T = TypeVar("T")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Backoff:
    """Sleep uniform(0, min(cap_seconds, base_seconds * 2**attempt)) between tries
    ("full jitter": workers that failed together do not retry together), and give up
    once `deadline_seconds` have passed since the first failure."""

    base_seconds: float = 0.2
    cap_seconds: float = 10.0
    deadline_seconds: float = 300.0

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * min(self.cap_seconds, self.base_seconds * 2 ** attempt)


DEFAULT_BACKOFF = Backoff()


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection, a server shutting down, a lock timeout: worth
    retrying. Follows the cause chain, since Optuna re-raises as StorageInternalError."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OperationalError):
            return True
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def call_with_retry(operation: Callable[[], T], *, what: str, backoff: Backoff = DEFAULT_BACKOFF,
                    log: Log | None = None, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> T:
    """`operation()`, retried on transient database errors until the backoff's deadline;
    then the last error is raised. `what` names the operation in the log lines."""
    attempt, started = 0, None
    while True:
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            started = clock() if started is None else started
            if clock() - started >= backoff.deadline_seconds:
                raise
            pause = backoff.delay(attempt)
            if log is not None:
                log(f"database unavailable during {what} ({_first_line(exc)}); "
                    f"retry {attempt + 1} in {pause:.1f} s")
            sleep(pause)
            attempt += 1


def retrying(what: str, backoff: Backoff = DEFAULT_BACKOFF) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator form of call_with_retry for functions whose whole body is one transaction."""
    def decorate(function: Callable[..., T]) -> Callable[..., T]:
        @wraps(function)
        def wrapper(*args, **kwargs) -> T:
            return call_with_retry(lambda: function(*args, **kwargs), what=what, backoff=backoff)
        return wrapper
    return decorate


def _first_line(exc: BaseException) -> str:
    # SQLAlchemy's messages embed the statement and a link; the driver's first line says it.
    cause = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"[:300]
