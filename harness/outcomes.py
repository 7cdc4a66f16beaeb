"""The outcome taxonomy: every request ends in exactly one :class:`Outcome`.

Outcomes are decided from psycopg's error classes (which follow PostgreSQL's
SQLSTATE hierarchy), never from message text: messages carry row values and
change with the server's language.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import psycopg
from psycopg import errors as pg_errors


class Outcome(StrEnum):
    OK = "ok"
    EXCLUSION_VIOLATION = "exclusion_violation"
    UNIQUE_VIOLATION = "unique_violation"
    FOREIGN_KEY_VIOLATION = "foreign_key_violation"
    NOT_NULL_VIOLATION = "not_null_violation"
    CHECK_VIOLATION = "check_violation"
    DEADLOCK_DETECTED = "deadlock_detected"
    SERIALIZATION_FAILURE = "serialization_failure"
    LOCK_NOT_AVAILABLE = "lock_not_available"
    QUERY_CANCELED = "query_canceled"
    CONNECTION_ERROR = "connection_error"
    OTHER = "other"


class Phase(StrEnum):
    """Which part of a rehearsal a sample or result belongs to."""

    PRE = "pre"
    POST = "post"
    ONLINE = "online"


# Outcomes in their fixed display order (the report and Locust use it).
OUTCOMES: tuple[Outcome, ...] = tuple(Outcome)

# Refusals a correct app expects once the strict constraints are on: it maps
# them to a response (409, replay of the idempotent request) instead of a 5xx.
EXPECTED_REFUSALS: frozenset[Outcome] = frozenset(
    {Outcome.EXCLUSION_VIOLATION, Outcome.UNIQUE_VIOLATION}
)

_BY_CLASS: tuple[tuple[type[BaseException], Outcome], ...] = (
    (pg_errors.ExclusionViolation, Outcome.EXCLUSION_VIOLATION),
    (pg_errors.UniqueViolation, Outcome.UNIQUE_VIOLATION),
    (pg_errors.ForeignKeyViolation, Outcome.FOREIGN_KEY_VIOLATION),
    (pg_errors.NotNullViolation, Outcome.NOT_NULL_VIOLATION),
    (pg_errors.CheckViolation, Outcome.CHECK_VIOLATION),
    (pg_errors.DeadlockDetected, Outcome.DEADLOCK_DETECTED),
    (pg_errors.SerializationFailure, Outcome.SERIALIZATION_FAILURE),
    (pg_errors.LockNotAvailable, Outcome.LOCK_NOT_AVAILABLE),
    (pg_errors.QueryCanceled, Outcome.QUERY_CANCELED),
    # The server going away: a terminated backend (57P01), a crash (57P02),
    # a server still starting up (57P03).
    (pg_errors.AdminShutdown, Outcome.CONNECTION_ERROR),
    (pg_errors.CrashShutdown, Outcome.CONNECTION_ERROR),
    (pg_errors.CannotConnectNow, Outcome.CONNECTION_ERROR),
)
# Exact-type lookup first: it is the hot path in the load users.
_EXACT: dict[type[BaseException], Outcome] = dict(_BY_CLASS)


@dataclass(frozen=True, slots=True)
class Classified:
    outcome: Outcome
    sqlstate: str | None = None
    constraint: str | None = None


CLASSIFIED_OK = Classified(Outcome.OK)


def classify(exc: BaseException | None) -> Classified:
    """Name the outcome of a request that raised ``exc`` (``None``: it succeeded)."""
    if exc is None:
        return CLASSIFIED_OK
    sqlstate = getattr(exc, "sqlstate", None)
    constraint = None
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        constraint = diag.constraint_name
    outcome = _EXACT.get(type(exc))
    if outcome is None:
        outcome = _classify_slow(exc, sqlstate)
    return Classified(outcome, sqlstate, constraint)


def _classify_slow(exc: BaseException, sqlstate: str | None) -> Outcome:
    for cls, outcome in _BY_CLASS:
        if isinstance(exc, cls):
            return outcome
    if sqlstate is not None and sqlstate.startswith("08"):
        return Outcome.CONNECTION_ERROR
    # No SQLSTATE at all from the driver means there was no server to answer:
    # a closed socket, a failed connect, a connection already marked broken.
    if sqlstate is None and isinstance(
        exc, psycopg.OperationalError | psycopg.InterfaceError | OSError
    ):
        return Outcome.CONNECTION_ERROR
    return Outcome.OTHER
