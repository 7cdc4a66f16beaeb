"""Load stage: Locust users that run the booking app's transactions.

Every request is one app transaction on the user's own psycopg connection,
timed with ``time.perf_counter``, classified by :func:`harness.outcomes.classify`
and recorded twice: once for Locust (``events.request.fire``, so its stats, web
UI, CSV and HTML work as usual) and once as a sample in a
:class:`~harness.samples.SampleStore` (exact latency, SQLSTATE, constraint).

The same :class:`BookingUser` runs three ways:

- ``locust -f loadtests/bookings.py`` (web UI, ``--headless``, ``--master`` /
  ``--worker``, ``--processes``): the locustfile calls :func:`add_options` and
  :func:`attach`; workers send their samples to the master in batches
  (message ``harness_samples``) and the master writes one file when the test
  stops, and again when Locust quits (so late batches and Ctrl-C are kept).
- ``harness load`` / :func:`run_load`: headless through Locust's library API
  (``Environment`` + ``LocalRunner``), then the invariant check.
- ``benchmarks/load_vs_pgbench.py``, whose insert user shares the request
  path (:meth:`DbUser.request`) with the booking users.

App modes, as the app's ``db_strict_constraints`` feature flag switches them:
``lax`` checks for overlaps with a SELECT and then inserts (a race: double
bookings), ``strict`` inserts and lets ``allocations_no_overlap`` /
``table_hold_windows_no_overlap`` (23P01) and ``bookings_idempotency_key_key``
(23505) refuse. Such a refusal is counted under its own outcome and still
reported to Locust as a failure of that request, so the web UI shows its rate.

Running alongside other work: :func:`run_load` runs Locust's greenlets in the
calling thread and returns after ``duration_s`` or as soon as the ``stop``
event it is given is set. Importing this module imports Locust, which
monkey-patches the process for gevent: threads started afterwards are
greenlets, and psycopg's waits are made cooperative here, so a migration run
in a ``threading.Thread`` (or ``gevent.spawn``) proceeds while the users run.
"""

from __future__ import annotations

# isort: off
# Locust first: its gevent monkey-patching must precede every socket and thread.
import locust  # noqa: F401
# isort: on

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import selectors
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import gevent
import gevent.event
import psycopg
from locust import User, task
from locust.env import Environment
from locust.event import Events
from locust.exception import RescheduleTaskImmediately
from locust.runners import MasterRunner, Runner, WorkerRunner

from harness.errors import ConfigError, HarnessError
from harness.outcomes import EXPECTED_REFUSALS, Classified, Outcome, classify
from harness.rundir import (
    atomic_write_bytes,
    atomic_write_with,
    invariants_file,
    load_file,
    samples_file,
    write_json,
)
from harness.samples import SampleStore, write_samples
from harness.target import Target, TargetKind, TargetSettings, open_target

log = logging.getLogger(__name__)

REQUEST_TYPE = "db"
SAMPLES_MESSAGE = "harness_samples"
# Workers ship their samples this often (and once more when they stop).
SAMPLES_BATCH_INTERVAL_S = 1.0
# Users load ids of at most this many restaurants (those with tables and slots):
# enough spread for the cold traffic, small enough to load in a moment.
MAX_RESTAURANTS = 50
MAX_SLOTS_PER_RESTAURANT = 2000
MAX_CUSTOMERS = 5000
# A process keeps the idempotency keys of its last creates; a client retry
# reuses one of them, often while the first request is still in flight.
RECENT_KEYS = 64
# Bookings / holds a user remembers to update, cancel, confirm or release.
USER_MEMORY = 32
SLOT_MINUTES = 15


class Operation(StrEnum):
    """Locust request names: the app's booking endpoints."""

    CREATE_BOOKING = "create_booking"
    UPDATE_BOOKING = "update_booking"
    CANCEL_BOOKING = "cancel_booking"
    PLACE_HOLD = "place_hold"
    CONFIRM_HOLD = "confirm_hold"
    RELEASE_HOLD = "release_hold"
    CHECK_AVAILABILITY = "check_availability"


class Mode(StrEnum):
    LAX = "lax"
    STRICT = "strict"
    AUTO = "auto"


DEFAULT_WEIGHTS: Mapping[str, int] = {
    Operation.CREATE_BOOKING: 10,
    Operation.UPDATE_BOOKING: 3,
    Operation.CANCEL_BOOKING: 4,
    Operation.PLACE_HOLD: 5,
    Operation.CONFIRM_HOLD: 2,
    Operation.RELEASE_HOLD: 2,
    Operation.CHECK_AVAILABILITY: 5,
}


class LoadError(HarnessError):
    """The load cannot run: no inventory to book, bad knobs, no target on a worker."""


# --------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, kw_only=True)
class Contention:
    """Where the users aim: the knobs that make creates and holds collide."""

    hot_tables: int = 2
    hot_windows: int = 2
    # Fraction of creates, holds, moves and reads aimed at the hot tables/windows.
    # 0.1 keeps both pictures clear with 20 users and no think time (30 s on a
    # scale-1 snapshot: a handful of new double bookings in lax mode; 23P01 by
    # the thousand and some 40P01 in strict mode). From about 0.3 the strict
    # inserts deadlock so often (each found only after deadlock_timeout, then
    # the queued inserts rush the freed window together) that users spend
    # most of the phase waiting: a real finding, but not a useful default.
    hot_fraction: float = 0.1
    # Fraction of creates that are client retries reusing a recent idempotency key.
    retry_fraction: float = 0.05
    # Mean pause between a user's requests, seconds (uniform in [0, 2 * mean]).
    think_time: float = 0.0
    weights: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    booking_minutes: int = 90
    hold_ttl_s: float = 600.0

    def __post_init__(self) -> None:
        if self.hot_tables < 1 or self.hot_windows < 1:
            raise ConfigError("hot tables and hot windows must be at least 1")
        for name in ("hot_fraction", "retry_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name.replace('_', ' ')} must be between 0 and 1, got {value}")
        if self.think_time < 0:
            raise ConfigError(f"think time must not be negative, got {self.think_time}")
        unknown = sorted(set(self.weights) - set(Operation))
        if unknown:
            raise ConfigError(
                f"unknown operation(s) in weights: {', '.join(unknown)}",
                hint="use " + ", ".join(Operation),
            )
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ConfigError("task weights must be >= 0 and at least one > 0")
        if self.booking_minutes < SLOT_MINUTES or self.hold_ttl_s <= 0:
            raise ConfigError("booking minutes must be >= 15 and the hold TTL > 0")

    def as_dict(self) -> dict[str, Any]:
        return {
            "hot_tables": self.hot_tables,
            "hot_windows": self.hot_windows,
            "hot_fraction": self.hot_fraction,
            "retry_fraction": self.retry_fraction,
            "think_time": self.think_time,
            "weights": {str(k): v for k, v in self.weights.items()},
            "booking_minutes": self.booking_minutes,
            "hold_ttl_s": self.hold_ttl_s,
        }


def parse_weights(text: str) -> dict[str, int]:
    """``create_booking=10,cancel_booking=3``: unnamed operations keep their defaults."""
    weights = dict(DEFAULT_WEIGHTS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in set(Operation):
            raise ConfigError(
                f"bad task weight {part!r}",
                hint="write operation=weight pairs, operations: " + ", ".join(Operation),
            )
        try:
            weights[name.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"bad task weight {part!r}: not a whole number") from None
    return weights


@dataclass(frozen=True, kw_only=True)
class LoadSettings:
    """One headless load phase (``harness load``)."""

    phase: str = "pre"
    users: int = 20
    # Users started per second; None starts them all within the first second.
    spawn_rate: float | None = None
    # None runs until the ``stop`` event passed to run_load is set.
    duration_s: float | None = 60.0
    mode: Mode = Mode.AUTO
    contention: Contention = field(default_factory=Contention)
    run_dir: Path = Path("reports/load")
    # Seconds between progress callbacks (0: none).
    progress_interval_s: float = 2.0
    check_invariants: bool = True


@dataclass(frozen=True, kw_only=True)
class LoadProgress:
    elapsed_s: float
    users: int
    requests: int
    rps: float
    # Share of each outcome among the requests since the previous tick.
    outcome_rates: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    phase: str
    mode: str
    users: int
    spawn_rate: float
    duration_s: float
    started_at: datetime
    ended_at: datetime
    requests: int  # as Locust counted them
    failures: int  # as Locust counted them (expected refusals included)
    samples: int  # samples written: one per request
    outcomes: dict[str, int]
    operations: dict[str, int]
    contention: dict[str, Any]
    target: str
    samples_path: Path
    load_path: Path
    csv_files: list[str]
    html_file: str
    invariants: dict[str, int] | None
    invariants_path: Path | None
    interrupted: bool = False

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """What ``load-<phase>.json`` holds (file names relative to the run folder)."""
        return {
            "phase": self.phase,
            "mode": self.mode,
            "users": self.users,
            "spawn_rate": self.spawn_rate,
            "duration_s": round(self.duration_s, 3),
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "requests": self.requests,
            "failures": self.failures,
            "samples": self.samples,
            "rps": round(self.rps, 1),
            "outcomes": self.outcomes,
            "operations": self.operations,
            "contention": self.contention,
            "target": self.target,
            "samples_file": self.samples_path.name,
            "csv_files": self.csv_files,
            "html_file": self.html_file,
            "invariants_file": self.invariants_path.name if self.invariants_path else None,
            "interrupted": self.interrupted,
        }


# --------------------------------------------------------------------------
# psycopg under gevent


def _wait_gevent(gen: Any, fileno: int, interval: float = 0.0, timeout: float | None = None) -> Any:
    """psycopg's ``wait`` on gevent's own I/O watchers.

    psycopg's generic waits build a poll or selector object for every wait;
    under gevent that costs more than the query on a fast server. Waiting on
    a libev I/O watcher directly makes the users about twice as fast (see
    benchmarks/load_vs_pgbench.py). When asked for read-or-write we answer
    "both ready": libpq is non-blocking, so a read with nothing to read or a
    flush that cannot proceed just returns and psycopg asks again.
    """
    from psycopg import errors as pg_errors
    from psycopg.waiting import Ready, Wait

    hub = gevent.get_hub()
    io = hub.loop.io
    events = {Wait.R: (1, Ready.R), Wait.W: (2, Ready.W), Wait.RW: (3, Ready.R | Ready.W)}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        state = next(gen)
        while True:
            mask, ready = events[state]
            watcher = io(fileno, mask)
            timer = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise pg_errors._WaitTimeout("wait timeout expired")
                timer = gevent.Timeout.start_new(
                    remaining, pg_errors._WaitTimeout("wait timeout expired")
                )
            try:
                hub.wait(watcher)
            finally:
                watcher.close()
                if timer is not None:
                    timer.cancel()
            state = gen.send(ready)
    except StopIteration as done:
        return done.value


def make_psycopg_cooperative() -> None:
    """Make psycopg's waits yield to gevent even if psycopg was imported first.

    psycopg picks its wait function when it is imported: the C one blocks the
    whole process. The harness CLI imports psycopg before Locust, so once
    gevent has patched ``select`` switch to a wait on gevent's watchers.
    """
    from gevent import monkey
    from psycopg import waiting

    if not monkey.is_module_patched("select"):
        return
    waiting.wait = _wait_gevent
    # wait_conn (connecting) bound the unpatched selector class at import time.
    waiting.DefaultSelector = selectors.DefaultSelector


make_psycopg_cooperative()


# --------------------------------------------------------------------------
# What the users book: ids loaded once per process


@dataclass(frozen=True, slots=True)
class Restaurant:
    id: int
    tables: tuple[tuple[int, int], ...]  # (table id, capacity)
    slots: tuple[tuple[int, datetime], ...]  # (slot id, starts_at), in time order


@dataclass(frozen=True, slots=True)
class Spot:
    """A table and a time: what a create, move or hold asks for."""

    restaurant_id: int
    table_id: int
    capacity: int
    slot_id: int
    starts_at: datetime


@dataclass(frozen=True)
class Inventory:
    restaurants: tuple[Restaurant, ...]
    customers: tuple[int, ...]
    hot_spots_tables: tuple[tuple[int, int], ...]
    hot_slots: tuple[tuple[int, datetime], ...]

    @property
    def hot_restaurant(self) -> Restaurant:
        return self.restaurants[0]


def load_inventory(conn: psycopg.Connection, contention: Contention) -> Inventory:
    """Read the restaurants, tables, slots and customers the users will book."""
    rows = conn.execute(
        """
        SELECT r.id FROM restaurants r
         WHERE EXISTS (SELECT 1 FROM dining_tables t WHERE t.restaurant_id = r.id)
           AND EXISTS (SELECT 1 FROM booking_slots s WHERE s.restaurant_id = r.id)
         ORDER BY r.id LIMIT %s
        """,
        (MAX_RESTAURANTS,),
    ).fetchall()
    ids = [r[0] for r in rows]
    if not ids:
        raise LoadError(
            "the target has no restaurant with tables and booking slots to book",
            hint="provision it first: harness provision",
        )
    tables: dict[int, list[tuple[int, int]]] = {i: [] for i in ids}
    for rid, tid, capacity in conn.execute(
        "SELECT restaurant_id, id, capacity FROM dining_tables"
        " WHERE restaurant_id = ANY(%s) ORDER BY restaurant_id, id",
        (ids,),
    ):
        tables[rid].append((tid, capacity))
    slots: dict[int, list[tuple[int, datetime]]] = {i: [] for i in ids}
    seen: set[tuple[int, datetime]] = set()
    for rid, sid, starts_at in conn.execute(
        """
        SELECT restaurant_id, id, starts_at FROM (
            SELECT restaurant_id, id, starts_at,
                   -- Upcoming slots first: the ones a guest can still book.
                   row_number() OVER (PARTITION BY restaurant_id
                                      ORDER BY starts_at < now(), starts_at, id) AS n
              FROM booking_slots WHERE restaurant_id = ANY(%s)) s
         WHERE n <= %s ORDER BY restaurant_id, starts_at, id
        """,
        (ids, MAX_SLOTS_PER_RESTAURANT),
    ):
        if (rid, starts_at) not in seen:  # a duplicate slot row: book the first
            seen.add((rid, starts_at))
            slots[rid].append((sid, starts_at))
    customers = tuple(
        r[0]
        for r in conn.execute("SELECT id FROM customers ORDER BY id LIMIT %s", (MAX_CUSTOMERS,))
    )
    restaurants = tuple(
        Restaurant(id=i, tables=tuple(tables[i]), slots=tuple(slots[i])) for i in ids
    )
    hot = restaurants[0]
    hot_tables = hot.tables[: contention.hot_tables]
    hot_slots = _free_windows(conn, hot, hot_tables, contention)
    conn.rollback()
    return Inventory(
        restaurants=restaurants,
        customers=customers,
        hot_spots_tables=hot_tables,
        hot_slots=hot_slots,
    )


def _free_windows(
    conn: psycopg.Connection,
    restaurant: Restaurant,
    tables: tuple[tuple[int, int], ...],
    contention: Contention,
) -> tuple[tuple[int, datetime], ...]:
    """Pick the hot windows: slots where no hot table is allocated or held yet.

    A window a snapshot booking already occupies would never change hands
    (the lax app sees it taken, the strict one gets 23P01 forever), so there
    would be nothing to race for. Windows are a longest booking apart, so each
    is its own contest, and start from the middle of the loaded slots.
    """
    longest = timedelta(minutes=contention.booking_minutes + 2 * SLOT_MINUTES)
    slots = restaurant.slots
    busy: list[tuple[datetime, datetime]] = []
    if slots:
        for lower, upper in conn.execute(
            """
            SELECT lower(during), upper(during) FROM allocations
             WHERE table_id = ANY(%(tables)s) AND during && tstzrange(%(lo)s, %(hi)s)
            UNION ALL
            SELECT lower(during), upper(during) FROM table_hold_windows
             WHERE table_id = ANY(%(tables)s) AND during && tstzrange(%(lo)s, %(hi)s)
            """,
            {
                "tables": [t for t, _ in tables],
                "lo": slots[0][1],
                "hi": slots[-1][1] + longest,
            },
        ):
            busy.append(
                (
                    lower or datetime.min.replace(tzinfo=UTC),
                    upper or datetime.max.replace(tzinfo=UTC),
                )
            )
    middle = len(slots) // 2
    order = sorted(range(len(slots)), key=lambda i: (i < middle, i))
    chosen: list[tuple[int, datetime]] = []
    for i in order:
        start = slots[i][1]
        end = start + longest
        clash = any(lo < end and start < hi for lo, hi in busy)
        near = any(start < c + longest and c < end for _, c in chosen)
        if not clash and not near:
            chosen.append(slots[i])
            if len(chosen) == contention.hot_windows:
                break
    if not chosen:  # every slot taken: contend for the middle one anyway
        chosen = [slots[middle]] if slots else []
    return tuple(chosen)


def resolve_mode(conn: psycopg.Connection, mode: Mode | str) -> Mode:
    """``auto``: strict once ``allocations_no_overlap`` exists, else lax."""
    mode = Mode(mode)
    if mode is not Mode.AUTO:
        return mode
    row = conn.execute(
        "SELECT 1 FROM pg_constraint WHERE conname = %s AND contype = 'x'",
        ("allocations_no_overlap",),
    ).fetchone()
    conn.rollback()
    return Mode.STRICT if row else Mode.LAX


# --------------------------------------------------------------------------
# Per-environment state shared by the users of one process


class Failed(Exception):
    """Reported to Locust for a failed request; str is "<outcome> <constraint>"."""


class Refused(Failed):
    """An expected refusal of the strict app (23P01 on a contested slot, 23505 on a retry)."""


def failure_label(result: Classified) -> str:
    """What Locust's failure table groups by: outcome and constraint, never the message.

    ``other`` keeps its SQLSTATE instead (there is no constraint to name).
    """
    detail = result.constraint or (result.sqlstate if result.outcome is Outcome.OTHER else None)
    return f"{result.outcome} {detail}" if detail else str(result.outcome)


@dataclass(eq=False)
class LoadContext:
    """What the users of one Locust environment share."""

    environment: Environment
    phase: str = "adhoc"
    mode: Mode = Mode.AUTO
    contention: Contention = field(default_factory=Contention)
    target: Target | None = None
    inventory: Inventory | None = None
    store: SampleStore = field(default_factory=SampleStore)
    worker: str = "local"
    user_ids: Any = field(default_factory=itertools.count)
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_KEYS))
    # Where the locustfile path writes (run_load writes itself).
    run_dir: Path | None = None
    started_at: datetime | None = None
    # Tags the users' sessions, so that run_load can end the ones it leaves behind.
    application_name: str = field(default_factory=lambda: f"harness-load-{uuid.uuid4().hex[:12]}")
    _flusher: Any = None

    def record(
        self, operation: str, ts: float, latency_ms: float, result: Classified, user: int
    ) -> None:
        """One request: a sample, and Locust's request event (nothing yields in between)."""
        self.store.add(
            ts=ts,
            phase=self.phase,
            operation=operation,
            outcome=result.outcome,
            sqlstate=result.sqlstate,
            constraint=result.constraint,
            latency_ms=latency_ms,
            user=user,
            worker=self.worker,
        )
        exception: Exception | None = None
        if result.outcome is not Outcome.OK:
            label = failure_label(result)
            strict_refusal = self.mode is Mode.STRICT and result.outcome in EXPECTED_REFUSALS
            exception = Refused(label) if strict_refusal else Failed(label)
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE,
            name=operation,
            response_time=latency_ms,
            response_length=0,
            exception=exception,
            context={},
        )


_CONTEXTS: WeakKeyDictionary[Environment, LoadContext] = WeakKeyDictionary()


def register_context(ctx: LoadContext) -> LoadContext:
    """Make ``ctx`` the one the users of ``ctx.environment`` share (run_load, benchmarks)."""
    _CONTEXTS[ctx.environment] = ctx
    return ctx


def context_of(environment: Environment) -> LoadContext:
    try:
        return _CONTEXTS[environment]
    except KeyError:
        raise LoadError(
            "this Locust environment was not prepared for the booking users",
            hint="call harness.load.attach(environment) in an init listener",
        ) from None


# --------------------------------------------------------------------------
# The app's transactions

_RANGE = "tstzrange(%s, %s, '[)')"


@dataclass(slots=True)
class _Booking:
    id: int
    table_id: int
    slot_id: int
    starts_at: datetime
    minutes: int
    party: int
    restaurant_id: int


@dataclass(slots=True)
class _Hold:
    id: int
    spot: Spot
    minutes: int


class DbUser(User):
    """A Locust user with one psycopg connection whose every request is one transaction.

    Subclasses add tasks that call :meth:`request`; the booking users and the
    benchmark's insert user share this code path.
    """

    abstract = True
    # A user whose requests are single statements may run them in autocommit
    # (as pgbench does); the booking transactions need BEGIN ... COMMIT.
    autocommit = False

    def wait_time(self) -> float:
        mean = self.ctx.contention.think_time
        return self.rng.uniform(0.0, 2.0 * mean) if mean > 0 else 0.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.ctx = context_of(environment)
        self.user_id = next(self.ctx.user_ids)
        self.rng = random.Random()
        self.conn: psycopg.Connection | None = None
        # One cursor for the connection's life: a new one per statement costs.
        self.cur: psycopg.Cursor | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        # What the user remembers of a request (its booking, its hold) changes
        # only once the transaction has committed: a booking whose COMMIT never
        # happened must not be cancelled (and its slot's counter decremented) later.
        self._on_commit: list[Callable[[], object]] = []

    # -- Locust hooks -------------------------------------------------------

    def on_start(self) -> None:
        # Connect now so the first request is not slowed by it; a failure here
        # is retried (and counted) by the first request.
        try:
            self._connect()
        except psycopg.Error as exc:
            log.warning("user %s cannot connect yet: %s", self.user_id, type(exc).__name__)

    def on_stop(self) -> None:
        self._close()

    def next_task_now(self) -> None:
        """End the current task; without think time, skip Locust's zero-second sleep.

        ``gevent.sleep(0)`` costs a whole pass of the event loop per request
        (a third of the throughput against a fast server). Every request has
        already yielded on its I/O, so the other users still get their turns.
        """
        if self.ctx.contention.think_time <= 0:
            raise RescheduleTaskImmediately

    # -- one request ----------------------------------------------------------

    def request(self, operation: str, action: Callable[[psycopg.Cursor], None]) -> None:
        """Run ``action`` as one transaction, time it, classify it, record it."""
        if self.conn is None:
            # Back off after a connection error rather than hammer a server
            # that is restarting; the wait is not part of the request.
            delay = self._retry_at - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
        ts = time.time()
        t0 = time.perf_counter()
        error: BaseException | None = None
        on_commit = self._on_commit
        try:
            if self.conn is None:
                self._connect()
            action(self.cur)
            if not self.autocommit:
                self.conn.commit()
        except psycopg.Error as exc:
            error = exc
        except BaseException:
            # Killed mid-request (the test stopped) or a bug: no sample, and a
            # connection in an unknown state is not reused.
            on_commit.clear()
            self._close()
            raise
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if on_commit:
            if error is None:
                for effect in on_commit:
                    effect()
            on_commit.clear()
        result = classify(error)
        if error is not None:
            self._after_error(result)
        self.ctx.record(operation, ts, latency_ms, result, self.user_id)

    def _connect(self) -> psycopg.Connection:
        target = self.ctx.target
        if target is None:
            raise LoadError("no target database for the booking users")
        try:
            self.conn = psycopg.connect(
                target.url,
                autocommit=self.autocommit,
                application_name=self.ctx.application_name,
                **target.connect_kwargs(),
            )
        except psycopg.Error:
            self._schedule_reconnect()
            raise
        self.cur = self.conn.cursor()
        self._backoff = 0.0
        return self.conn

    def _schedule_reconnect(self) -> None:
        self._backoff = min(2.0, max(0.05, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff * self.rng.uniform(0.5, 1.0)

    def _after_error(self, result: Classified) -> None:
        conn = self.conn
        if conn is None:
            return
        if result.outcome is Outcome.CONNECTION_ERROR or conn.broken or conn.closed:
            self._close()
            self._schedule_reconnect()
            return
        try:
            conn.rollback()
        except psycopg.Error:
            self._close()
            self._schedule_reconnect()

    def _close(self) -> None:
        conn, self.conn, self.cur = self.conn, None, None
        if conn is not None:
            # Closing a broken socket may fail: there is nothing left to do then.
            with contextlib.suppress(Exception):
                conn.close()


class BookingUser(DbUser):
    """A guest (or a retrying client) using the booking endpoints."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        # Not bounded by the deque: step() keeps them near USER_MEMORY, and a
        # booking silently forgotten would hold its table for good.
        self.bookings: deque[_Booking] = deque()
        self.holds: deque[_Hold] = deque()
        weights = self.ctx.contention.weights
        self._ops = [Operation(k) for k, w in weights.items() if w > 0]
        self._cum = list(itertools.accumulate(weights[k] for k in self._ops))
        self._actions: dict[Operation, Callable[[psycopg.Cursor], None]] = {
            Operation.CREATE_BOOKING: self._create_booking,
            Operation.UPDATE_BOOKING: self._update_booking,
            Operation.CANCEL_BOOKING: self._cancel_booking,
            Operation.PLACE_HOLD: self._place_hold,
            Operation.CONFIRM_HOLD: self._confirm_hold,
            Operation.RELEASE_HOLD: self._release_hold,
            Operation.CHECK_AVAILABILITY: self._check_availability,
        }

    @task
    def step(self) -> None:
        operation = self.rng.choices(self._ops, cum_weights=self._cum)[0]
        # Nothing of our own to change: the guest books (or holds) first.
        if operation in (Operation.UPDATE_BOOKING, Operation.CANCEL_BOOKING) and not self.bookings:
            operation = Operation.CREATE_BOOKING
        elif operation in (Operation.CONFIRM_HOLD, Operation.RELEASE_HOLD) and not self.holds:
            operation = Operation.PLACE_HOLD
        # A guest with many bookings (holds) gives one up before taking another:
        # every row a user made stays tracked and is freed again some day, so
        # the hot tables and windows keep changing hands in long runs.
        elif (
            operation in (Operation.CREATE_BOOKING, Operation.CONFIRM_HOLD)
            and len(self.bookings) >= USER_MEMORY
        ):
            operation = Operation.CANCEL_BOOKING
        elif operation is Operation.PLACE_HOLD and len(self.holds) >= USER_MEMORY:
            operation = Operation.RELEASE_HOLD
        self.request(operation, self._actions[operation])
        self.next_task_now()

    # -- choosing where to book -------------------------------------------------

    def _hot(self) -> bool:
        return self.rng.random() < self.ctx.contention.hot_fraction

    def _spot(self, restaurant: Restaurant | None = None) -> Spot:
        inv = self.ctx.inventory
        assert inv is not None
        if restaurant is None and self._hot():
            table_id, capacity = self.rng.choice(inv.hot_spots_tables)
            slot_id, starts_at = self.rng.choice(inv.hot_slots)
            return Spot(inv.hot_restaurant.id, table_id, capacity, slot_id, starts_at)
        r = restaurant or self.rng.choice(inv.restaurants)
        table_id, capacity = self.rng.choice(r.tables)
        slot_id, starts_at = self.rng.choice(r.slots)
        return Spot(r.id, table_id, capacity, slot_id, starts_at)

    def _customer(self) -> int | None:
        customers = self.ctx.inventory.customers if self.ctx.inventory else ()
        return self.rng.choice(customers) if customers else None

    def _party(self, capacity: int) -> int:
        return self.rng.randint(1, max(1, min(capacity, 8)))

    def _minutes(self) -> int:
        base = self.ctx.contention.booking_minutes
        return (
            self.rng.choice((base - SLOT_MINUTES, base, base + 2 * SLOT_MINUTES))
            if (base > SLOT_MINUTES)
            else base
        )

    @property
    def _strict(self) -> bool:
        return self.ctx.mode is Mode.STRICT

    # -- transactions -----------------------------------------------------------

    def _create_booking(self, cur: psycopg.Cursor) -> None:
        ctx = self.ctx
        if ctx.recent and self.rng.random() < ctx.contention.retry_fraction:
            # A client retry: the same request again, same key.
            key, spot, party, minutes = self.rng.choice(ctx.recent)
        else:
            key, spot, minutes = str(uuid.uuid4()), self._spot(), self._minutes()
            party = self._party(spot.capacity)
            ctx.recent.append((key, spot, party, minutes))
        ends_at = spot.starts_at + timedelta(minutes=minutes)
        if not self._strict:
            # The lax app's idempotency and availability checks: read, then
            # write, with nothing to stop a concurrent request in between.
            if cur.execute(
                "SELECT id FROM bookings WHERE idempotency_key = %s LIMIT 1", (key,)
            ).fetchone():
                return
            if self._allocated(cur, spot.table_id, spot.starts_at, ends_at, None):
                return
        booking_id = self._insert_booking(cur, spot, party, key, spot.starts_at, ends_at)
        self._insert_allocation(cur, booking_id, spot.table_id, spot.starts_at, ends_at)
        cur.execute(
            "UPDATE booking_slots SET covers_booked = covers_booked + %s WHERE id = %s",
            (party, spot.slot_id),
        )
        self._remember_booking(booking_id, spot, minutes, party)

    def _remember_booking(self, booking_id: int, spot: Spot, minutes: int, party: int) -> None:
        booking = _Booking(
            booking_id, spot.table_id, spot.slot_id, spot.starts_at, minutes, party,
            spot.restaurant_id,
        )  # fmt: skip
        self._on_commit.append(partial(self.bookings.append, booking))

    def _insert_booking(
        self,
        cur: psycopg.Cursor,
        spot: Spot,
        party: int,
        key: str,
        starts_at: datetime,
        ends_at: datetime,
    ) -> int:
        row = cur.execute(
            "INSERT INTO bookings (restaurant_id, customer_id, slot_id, party_size, status,"
            " idempotency_key, starts_at, ends_at)"
            " VALUES (%s, %s, %s, %s, 'confirmed', %s, %s, %s) RETURNING id",
            (spot.restaurant_id, self._customer(), spot.slot_id, party, key, starts_at, ends_at),
        ).fetchone()
        return int(row[0])

    def _insert_allocation(
        self,
        cur: psycopg.Cursor,
        booking_id: int,
        table_id: int,
        starts_at: datetime,
        ends_at: datetime,
    ) -> None:
        cur.execute(
            "INSERT INTO allocations (booking_id, table_id, during) VALUES (%s, %s, "
            + _RANGE
            + ")",
            (booking_id, table_id, starts_at, ends_at),
        )

    @staticmethod
    def _allocated(
        cur: psycopg.Cursor,
        table_id: int,
        starts_at: datetime,
        ends_at: datetime,
        booking_id: int | None,
    ) -> bool:
        return (
            cur.execute(
                "SELECT 1 FROM allocations WHERE table_id = %s AND during && "
                + _RANGE
                + " AND booking_id IS DISTINCT FROM %s LIMIT 1",
                (table_id, starts_at, ends_at, booking_id),
            ).fetchone()
            is not None
        )

    def _update_booking(self, cur: psycopg.Cursor) -> None:
        booking = self.rng.choice(self.bookings)
        if self.rng.random() < 0.5:
            # Move: another time (hot or not) at the same table.
            inv = self.ctx.inventory
            assert inv is not None
            if booking.restaurant_id == inv.hot_restaurant.id and self._hot():
                slot_id, starts_at = self.rng.choice(inv.hot_slots)
            else:
                restaurant = next(
                    (r for r in inv.restaurants if r.id == booking.restaurant_id),
                    inv.hot_restaurant,
                )
                slot_id, starts_at = self.rng.choice(restaurant.slots)
            minutes = booking.minutes
        else:
            # Resize: same start, longer or shorter stay.
            slot_id, starts_at, minutes = booking.slot_id, booking.starts_at, self._minutes()
        ends_at = starts_at + timedelta(minutes=minutes)
        if not self._strict and self._allocated(
            cur, booking.table_id, starts_at, ends_at, booking.id
        ):
            return
        cur.execute(
            "UPDATE bookings SET starts_at = %s, ends_at = %s, slot_id = %s WHERE id = %s",
            (starts_at, ends_at, slot_id, booking.id),
        )
        cur.execute(
            "UPDATE allocations SET during = " + _RANGE + " WHERE booking_id = %s",
            (starts_at, ends_at, booking.id),
        )
        if slot_id != booking.slot_id:
            # Both counters in one statement, rows locked in id order: two
            # opposite moves cannot deadlock on the slots. What deadlocks is left
            # comes from the constraints (concurrent exclusion checks), which
            # is what the rehearsal is there to show.
            cur.execute(
                "UPDATE booking_slots SET covers_booked = CASE WHEN id = %(old)s"
                " THEN greatest(covers_booked - %(party)s, 0)"
                " ELSE covers_booked + %(party)s END"
                " WHERE id IN (SELECT id FROM booking_slots WHERE id IN (%(old)s, %(new)s)"
                " ORDER BY id FOR NO KEY UPDATE)",
                {"old": booking.slot_id, "new": slot_id, "party": booking.party},
            )

        def moved() -> None:
            booking.slot_id, booking.starts_at, booking.minutes = slot_id, starts_at, minutes

        self._on_commit.append(moved)

    def _cancel_booking(self, cur: psycopg.Cursor) -> None:
        # Oldest first, so hot windows are freed again and contention goes on.
        booking = self.bookings[0]
        cur.execute("UPDATE bookings SET status = 'cancelled' WHERE id = %s", (booking.id,))
        cur.execute("DELETE FROM allocations WHERE booking_id = %s", (booking.id,))
        cur.execute(
            "UPDATE booking_slots SET covers_booked = greatest(covers_booked - %s, 0)"
            " WHERE id = %s",
            (booking.party, booking.slot_id),
        )
        self._on_commit.append(self.bookings.popleft)

    def _place_hold(self, cur: psycopg.Cursor) -> None:
        spot = self._spot()
        minutes = self._minutes()
        ends_at = spot.starts_at + timedelta(minutes=minutes)
        if (
            not self._strict
            and cur.execute(
                "SELECT 1 FROM table_hold_windows WHERE table_id = %s AND during && "
                + _RANGE
                + " AND (expires_at IS NULL OR expires_at > now()) LIMIT 1",
                (spot.table_id, spot.starts_at, ends_at),
            ).fetchone()
        ):
            return
        row = cur.execute(
            "INSERT INTO table_hold_windows (table_id, customer_id, during, expires_at)"
            " VALUES (%s, %s, " + _RANGE + ", now() + make_interval(secs => %s)) RETURNING id",
            (
                spot.table_id,
                self._customer(),
                spot.starts_at,
                ends_at,
                self.ctx.contention.hold_ttl_s,
            ),
        ).fetchone()
        self._on_commit.append(partial(self.holds.append, _Hold(int(row[0]), spot, minutes)))

    def _confirm_hold(self, cur: psycopg.Cursor) -> None:
        # To the back first: a hold whose confirmation fails (rolled back, so
        # the hold is still there) is not the next one tried again.
        self.holds.rotate(-1)
        hold = self.holds[-1]
        gone = (
            cur.execute(
                "DELETE FROM table_hold_windows WHERE id = %s"
                " AND (expires_at IS NULL OR expires_at > now()) RETURNING id",
                (hold.id,),
            ).fetchone()
            is None
        )
        if gone:  # expired or purged: the guest has to start over
            self._on_commit.append(self.holds.pop)
            return
        spot = hold.spot
        ends_at = spot.starts_at + timedelta(minutes=hold.minutes)
        if not self._strict and self._allocated(cur, spot.table_id, spot.starts_at, ends_at, None):
            cur.connection.rollback()  # keep the hold: the guest may pick another table
            return
        party = self._party(spot.capacity)
        booking_id = self._insert_booking(
            cur, spot, party, str(uuid.uuid4()), spot.starts_at, ends_at
        )
        self._insert_allocation(cur, booking_id, spot.table_id, spot.starts_at, ends_at)
        cur.execute(
            "UPDATE booking_slots SET covers_booked = covers_booked + %s WHERE id = %s",
            (party, spot.slot_id),
        )
        self._on_commit.append(self.holds.pop)
        self._remember_booking(booking_id, spot, hold.minutes, party)

    def _release_hold(self, cur: psycopg.Cursor) -> None:
        hold = self.holds[0]
        cur.execute("DELETE FROM table_hold_windows WHERE id = %s", (hold.id,))
        self._on_commit.append(self.holds.popleft)

    def _check_availability(self, cur: psycopg.Cursor) -> None:
        spot = self._spot()
        # The query booking_slots_available_idx is there for.
        cur.execute(
            "SELECT id, starts_at, covers_total - covers_booked FROM booking_slots"
            " WHERE restaurant_id = %s AND starts_at >= %s AND starts_at < %s"
            " AND covers_booked < covers_total ORDER BY starts_at LIMIT 50",
            (spot.restaurant_id, spot.starts_at, spot.starts_at + timedelta(hours=4)),
        ).fetchall()


# --------------------------------------------------------------------------
# Locust options (locustfile) and the wiring of one environment

# Options the master resolves and passes to its workers in the spawn message
# (Locust copies every custom option there): the target it chose, including
# an embedded server's URL, and the mode ``auto`` turned into.
_WIRE_TARGET = "harness_target"
_WIRE_MODE = "harness_mode"


def add_options(parser: Any, **_kwargs: Any) -> None:
    """Add the booking load's options to Locust's parser (each has an env var)."""
    parser.add_argument(
        "--db-url",
        env_var="HARNESS_DB_URL",
        default=None,
        # Not in the web UI: Locust writes an option's value into the page
        # source (is_secret only masks the input box), and this one holds the
        # password. The target is chosen when Locust starts.
        include_in_web_ui=False,
        help="PostgreSQL URL of the target (else $SUPABASE_DB_URL, else $DATABASE_URL,"
        " else the harness's embedded server)",
    )
    parser.add_argument(
        "--mode",
        env_var="HARNESS_MODE",
        choices=[str(m) for m in Mode],
        default=str(Mode.AUTO),
        help="app mode: lax (SELECT then INSERT), strict (rely on the constraints),"
        " auto (strict once allocations_no_overlap exists)",
    )
    parser.add_argument(
        "--phase", env_var="HARNESS_PHASE", default="adhoc", help="phase label of the samples"
    )
    defaults = Contention()
    parser.add_argument(
        "--hot-tables",
        env_var="HARNESS_HOT_TABLES",
        type=int,
        default=defaults.hot_tables,
        help="number of hot tables (all in the first restaurant)",
    )
    parser.add_argument(
        "--hot-windows",
        env_var="HARNESS_HOT_WINDOWS",
        type=int,
        default=defaults.hot_windows,
        help="number of hot time windows",
    )
    parser.add_argument(
        "--hot-fraction",
        env_var="HARNESS_HOT_FRACTION",
        type=float,
        default=defaults.hot_fraction,
        help="fraction of requests aimed at the hot tables/windows",
    )
    parser.add_argument(
        "--retry-fraction",
        env_var="HARNESS_RETRY_FRACTION",
        type=float,
        default=defaults.retry_fraction,
        help="fraction of creates that are client retries reusing an idempotency key",
    )
    parser.add_argument(
        "--think-time",
        env_var="HARNESS_THINK_TIME",
        type=float,
        default=defaults.think_time,
        help="mean seconds between a user's requests",
    )
    parser.add_argument(
        "--weights",
        env_var="HARNESS_WEIGHTS",
        default="",
        help="task weights, e.g. create_booking=10,cancel_booking=4 (defaults: "
        + ",".join(f"{k}={v}" for k, v in DEFAULT_WEIGHTS.items())
        + ")",
    )
    parser.add_argument(
        "--hold-ttl",
        env_var="HARNESS_HOLD_TTL",
        type=float,
        default=defaults.hold_ttl_s,
        help="seconds before a hold expires",
    )
    parser.add_argument(
        "--run-dir",
        env_var="HARNESS_RUN_DIR",
        default=".",
        help="folder for samples-<phase>.parquet and load-<phase>.json",
    )
    for name in (_WIRE_TARGET, _WIRE_MODE):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default="",
            include_in_web_ui=False,
            help=argparse.SUPPRESS,
        )


def contention_from_options(options: Any) -> Contention:
    return Contention(
        hot_tables=int(options.hot_tables),
        hot_windows=int(options.hot_windows),
        hot_fraction=float(options.hot_fraction),
        retry_fraction=float(options.retry_fraction),
        think_time=float(options.think_time),
        weights=parse_weights(options.weights or ""),
        hold_ttl_s=float(options.hold_ttl),
    )


def attach(environment: Environment) -> LoadContext:
    """Prepare a locustfile's environment (call from an ``init`` listener).

    On the master (or a single process) ``test_start`` resolves the target,
    the mode and, for local users, the inventory; workers take the target and
    mode the master resolved, load their own inventory and ship their samples
    every second. The master writes the samples when the test stops and again
    when Locust quits (late worker batches, Ctrl-C).
    """
    ctx = LoadContext(environment=environment)
    _CONTEXTS[environment] = ctx
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        ctx.worker = str(runner.client_id)
    elif isinstance(runner, MasterRunner):
        ctx.worker = "master"
        runner.register_message(SAMPLES_MESSAGE, _on_samples_message)
    if not isinstance(runner, WorkerRunner) and environment.parsed_options is not None:
        # Start (and provision) an embedded target now, not when the test
        # starts, so that a --run-time is spent on load, not on set-up.
        try:
            _resolve_target(environment.parsed_options, local=True)
        except HarnessError as exc:
            log.error("booking load target: %s", exc)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C raised in whichever greenlet happens to run could cut a
        # request's sample in half; through the hub it reaches Locust's main
        # greenlet between requests, which quits and writes the samples.
        gevent.signal_handler(signal.SIGINT, gevent.kill, gevent.getcurrent(), KeyboardInterrupt)
    events = environment.events
    events.test_start.add_listener(_on_test_start)
    events.test_stop.add_listener(_on_test_stop)
    events.quitting.add_listener(_on_quitting)
    return ctx


def _on_samples_message(environment: Environment, msg: Any, **_kwargs: Any) -> None:
    context_of(environment).store.add_batch(msg.data)


def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    ctx = context_of(environment)
    options = environment.parsed_options
    runner = environment.runner
    ctx.phase = str(options.phase)
    ctx.contention = contention_from_options(options)
    ctx.run_dir = Path(options.run_dir)
    ctx.started_at = datetime.now(UTC)
    ctx.store = SampleStore()
    if isinstance(runner, WorkerRunner):
        wired = getattr(options, _WIRE_TARGET, "")
        ctx.target = _target_from_wire(wired) if wired else _resolve_target(options, local=False)
        ctx.mode = Mode(getattr(options, _WIRE_MODE, "") or options.mode)
    else:
        ctx.target = _resolve_target(options, local=True)
        setattr(options, _WIRE_TARGET, _target_to_wire(ctx.target))
    with ctx.target.connect() as conn:
        if ctx.mode is Mode.AUTO or not isinstance(runner, WorkerRunner):
            ctx.mode = resolve_mode(conn, options.mode)
            setattr(options, _WIRE_MODE, str(ctx.mode))
        if not isinstance(runner, MasterRunner):
            ctx.inventory = load_inventory(conn, ctx.contention)
    log.info(
        "booking load on %s: mode %s, phase %s, %s",
        ctx.target.display,
        ctx.mode,
        ctx.phase,
        ctx.contention.as_dict(),
    )
    if isinstance(runner, WorkerRunner):
        if ctx._flusher is not None:
            ctx._flusher.kill(block=False)
        ctx._flusher = gevent.spawn(_flush_loop, ctx, runner)


def _flush_loop(ctx: LoadContext, runner: WorkerRunner) -> None:
    while True:
        gevent.sleep(SAMPLES_BATCH_INTERVAL_S)
        _send_batch(ctx, runner)


def _send_batch(ctx: LoadContext, runner: WorkerRunner) -> None:
    if len(ctx.store):
        runner.send_message(SAMPLES_MESSAGE, ctx.store.take_batch())


def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    ctx = context_of(environment)
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        if ctx._flusher is not None:
            ctx._flusher.kill(block=True)
            ctx._flusher = None
        # Sent before Locust's own final stats, on the same socket: the master
        # has every sample by the time it has every count.
        _send_batch(ctx, runner)
    else:
        _write_locustfile_files(ctx)


def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    ctx = context_of(environment)
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        try:
            _send_batch(ctx, runner)
        except Exception as exc:  # the master may be gone already
            log.warning("could not send the last samples to the master: %s", exc)
    elif ctx.started_at is not None:
        _write_locustfile_files(ctx)


def _write_locustfile_files(ctx: LoadContext) -> None:
    if ctx.run_dir is None or ctx.started_at is None:
        return
    runner = ctx.environment.runner
    assert runner is not None
    path = write_samples(ctx.run_dir / samples_file(ctx.phase), ctx.store)
    total = runner.stats.total
    options = ctx.environment.parsed_options
    csv_prefix = getattr(options, "csv_prefix", None)
    ended = datetime.now(UTC)
    write_json(
        ctx.run_dir / load_file(ctx.phase),
        {
            "phase": ctx.phase,
            "mode": str(ctx.mode),
            "users": runner.target_user_count,
            "spawn_rate": getattr(ctx.environment.parsed_options, "spawn_rate", None),
            "duration_s": round((ended - ctx.started_at).total_seconds(), 3),
            "started_at": ctx.started_at,
            "ended_at": ended,
            "requests": total.num_requests,
            "failures": total.num_failures,
            "samples": len(ctx.store),
            "outcomes": ctx.store.outcome_counts(),
            "operations": ctx.store.operation_counts(),
            "contention": ctx.contention.as_dict(),
            "target": ctx.target.display if ctx.target else None,
            "samples_file": path.name,
            # Locust's own --csv / --html files, as the user named them.
            "csv_files": [
                f"{csv_prefix}{suffix}"
                for suffix in ("_stats.csv", "_failures.csv", "_exceptions.csv")
                if csv_prefix
            ],
            "html_file": getattr(options, "html_file", None),
        },
    )


_TARGETS: dict[str, Target] = {}


def _resolve_target(options: Any, *, local: bool) -> Target:
    """The harness's resolution: --db-url, $SUPABASE_DB_URL, $DATABASE_URL, embedded."""
    explicit = getattr(options, "db_url", None) or None
    key = explicit or ""
    if key in _TARGETS:
        return _TARGETS[key]
    settings = TargetSettings(db_url=explicit)
    if not local and not explicit and not any(os.environ.get(v) for v in _URL_VARS):
        raise LoadError(
            "this worker got no target from its master and has no --db-url",
            hint="give the master --db-url (or SUPABASE_DB_URL / DATABASE_URL)",
        )
    target = open_target(settings, os.environ)
    if target.kind is TargetKind.EMBEDDED:
        _prepare_embedded(target)
    _TARGETS[key] = target
    return target


_URL_VARS = ("SUPABASE_DB_URL", "DATABASE_URL")
# The snapshot provisioned into an empty embedded server: the smallest scale.
EMBEDDED_SCALE = 1
EMBEDDED_SEED = 42


def _prepare_embedded(target: Target) -> None:
    """An empty embedded database gets the baseline schema and a small snapshot."""
    with target.connect(autocommit=True) as conn:
        empty = conn.execute("SELECT to_regclass('public.booking_slots') IS NULL").fetchone()[0]
        if not empty:
            empty = conn.execute("SELECT NOT EXISTS (SELECT 1 FROM booking_slots)").fetchone()[0]
    if empty:
        from harness.provision import ProvisionSettings, provision

        log.info("provisioning a small snapshot into %s", target.display)
        provision(target, ProvisionSettings(scale=EMBEDDED_SCALE, seed=EMBEDDED_SEED))


def _target_to_wire(target: Target) -> str:
    return json.dumps(
        {
            "url": target.url,
            "display": target.display,
            "kind": str(target.kind),
            "source": target.source,
            "pooled": target.pooled,
            "connect_timeout": target.connect_timeout,
            "server_version": target.server_version,
            "server_version_num": target.server_version_num,
        }
    )


def _target_from_wire(text: str) -> Target:
    data = json.loads(text)
    data["kind"] = TargetKind(data["kind"])
    return Target(**data)


# --------------------------------------------------------------------------
# The stage: one headless phase


def _locust_options(settings: LoadSettings) -> argparse.Namespace:
    """Locust's parsed options with ours set from ``settings`` (no config files, no env)."""
    from locust.argument_parser import get_empty_argument_parser, setup_parser_arguments

    parser = get_empty_argument_parser(add_help=False, default_config_files=[])
    setup_parser_arguments(parser)
    add_options(parser)
    options = parser.parse_args(args=[], env_vars={})
    options.headless = True
    options.num_users = settings.users
    options.phase = settings.phase
    options.mode = str(settings.mode)
    return options


def run_load(
    target: Target,
    settings: LoadSettings,
    *,
    stop: Any | None = None,
    on_progress: Callable[[LoadProgress], None] | None = None,
) -> LoadResult:
    """Run one headless load phase and write its files into ``settings.run_dir``.

    Writes ``samples-<phase>.parquet``, Locust's CSV files
    (``locust-<phase>_stats.csv``, ``_failures.csv``, ``_exceptions.csv``,
    ``_stats_history.csv``) and HTML report (``locust-<phase>.html``),
    ``load-<phase>.json`` and, after counting the invariants,
    ``invariants-<phase>.json``.

    ``stop``: anything with ``is_set()`` (a ``threading.Event``); the run ends
    early when it is set (another greenlet or thread decides). Ctrl-C ends it
    too: what was measured is written, then KeyboardInterrupt propagates.
    """
    from locust.html import get_html_report
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter, stats_history

    if settings.duration_s is None and stop is None:
        raise ConfigError("a load without a duration needs a stop event")
    if settings.users < 1:
        raise ConfigError(f"users must be at least 1, got {settings.users}")
    run_dir = Path(settings.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    phase = settings.phase
    with target.connect() as conn:
        mode = resolve_mode(conn, settings.mode)
        inventory = load_inventory(conn, settings.contention)

    env = Environment(
        user_classes=[BookingUser],
        events=Events(),
        parsed_options=_locust_options(settings),
        locustfile="loadtests/bookings.py",
    )
    ctx = LoadContext(
        environment=env,
        phase=phase,
        mode=mode,
        contention=settings.contention,
        target=target,
        inventory=inventory,
    )
    register_context(ctx)
    runner = env.create_local_runner()
    csv_base = run_dir / f"locust-{phase}"
    csv_writer = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, str(csv_base), full_history=False)
    helpers = [gevent.spawn(csv_writer), gevent.spawn(stats_history, runner)]
    spawn_rate = float(settings.spawn_rate or settings.users)
    started_at = datetime.now(UTC)
    ctx.started_at = started_at
    log.info(
        "load %s: %s users, mode %s, on %s for %ss",
        phase,
        settings.users,
        mode,
        target.display,
        settings.duration_s,
    )
    t0 = time.monotonic()
    interrupted = False
    # Ctrl-C ends the phase like a stop event would: the signal would
    # otherwise land in whichever user greenlet is running, with a traceback.
    ctrl_c = gevent.event.Event()
    on_sigint = None
    previous_sigint = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        on_sigint = gevent.signal_handler(signal.SIGINT, ctrl_c.set)
    try:
        runner.start(settings.users, spawn_rate=spawn_rate)
        _wait(ctx, runner, settings, t0, _AnyOf(stop, ctrl_c), on_progress)
        interrupted = ctrl_c.is_set()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if on_sigint is not None:
            on_sigint.cancel()
            # libev leaves SIGINT at its OS default when its watcher goes:
            # put Python's handler back, or the next Ctrl-C (say, during the
            # migrations after this phase) would kill the process outright.
            signal.signal(signal.SIGINT, previous_sigint)
        runner.quit()
        for greenlet in helpers:
            greenlet.kill(block=True)
        csv_writer.close_files()
        end_leftover_sessions(target, ctx.application_name)
    duration = time.monotonic() - t0
    ended_at = datetime.now(UTC)

    csv_files = _write_final_csv(env, csv_base, PERCENTILES_TO_REPORT)
    html_path = run_dir / f"locust-{phase}.html"
    atomic_write_bytes(html_path, get_html_report(env, show_download_link=False).encode())
    samples_path = write_samples(run_dir / samples_file(phase), ctx.store)

    invariants: dict[str, int] | None = None
    invariants_path: Path | None = None
    if settings.check_invariants and not interrupted:
        invariants, invariants_path = check_invariants(target, phase, run_dir)

    total = runner.stats.total
    result = LoadResult(
        phase=phase,
        mode=str(mode),
        users=settings.users,
        spawn_rate=spawn_rate,
        duration_s=duration,
        started_at=started_at,
        ended_at=ended_at,
        requests=total.num_requests,
        failures=total.num_failures,
        samples=len(ctx.store),
        outcomes=ctx.store.outcome_counts(),
        operations=ctx.store.operation_counts(),
        contention=settings.contention.as_dict(),
        target=target.display,
        samples_path=samples_path,
        load_path=run_dir / load_file(phase),
        csv_files=csv_files,
        html_file=html_path.name,
        invariants=invariants,
        invariants_path=invariants_path,
        interrupted=interrupted,
    )
    write_json(result.load_path, result.as_dict())
    if runner.exceptions:
        # Not a database outcome: a bug in the users. Say so loudly.
        for exc in runner.exceptions.values():
            log.error("load user raised %s times: %s", exc["count"], exc["msg"])
    if interrupted:
        raise KeyboardInterrupt
    return result


def end_leftover_sessions(target: Target, application_name: str) -> int:
    """End the backends of users that were stopped in the middle of a statement.

    A user killed while its statement waits for a lock closes its socket, but
    the server notices only when it next talks to that client, i.e. after the
    lock is granted; such backends, and the locks they hold, would outlive the
    phase and make the next stage (a migration, the rollback) time out.
    """
    with contextlib.suppress(psycopg.Error), target.connect(autocommit=True) as conn:
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = %s AND pid <> pg_backend_pid()",
            (application_name,),
        ).fetchone()[0]
        if ended:
            log.info("ended %s leftover load sessions", ended)
        return int(ended)
    return 0


class _AnyOf:
    """Set when any of the events given (``None`` ones skipped) is set."""

    def __init__(self, *events: Any) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _wait(
    ctx: LoadContext,
    runner: Runner,
    settings: LoadSettings,
    t0: float,
    stop: Any | None,
    on_progress: Callable[[LoadProgress], None] | None,
) -> None:
    interval = settings.progress_interval_s
    next_tick = interval if interval > 0 else float("inf")
    last_counts: dict[str, int] = {}
    last_n = 0
    while True:
        elapsed = time.monotonic() - t0
        if settings.duration_s is not None and elapsed >= settings.duration_s:
            return
        if stop is not None and stop.is_set():
            return
        if on_progress is not None and elapsed >= next_tick:
            counts = ctx.store.outcome_counts()
            n = len(ctx.store)
            delta = {k: v - last_counts.get(k, 0) for k, v in counts.items()}
            window = max(1, n - last_n)
            on_progress(
                LoadProgress(
                    elapsed_s=elapsed,
                    users=runner.user_count,
                    requests=n,
                    rps=(n - last_n) / interval,
                    outcome_rates={k: v / window for k, v in delta.items() if v},
                )
            )
            last_counts, last_n = counts, n
            next_tick += interval
        remaining = (
            settings.duration_s - elapsed if settings.duration_s is not None else float("inf")
        )
        gevent.sleep(max(0.0, min(0.1, remaining, next_tick - elapsed)))


def _write_final_csv(env: Environment, base: Path, percentiles: list[float]) -> list[str]:
    """Locust's CSV files as of the end (its writer loop lags up to a second)."""
    import csv

    from locust.stats import StatsCSV

    stats_csv = StatsCSV(env, percentiles)
    writers = {
        "_stats.csv": stats_csv.requests_csv,
        "_failures.csv": stats_csv.failures_csv,
        "_exceptions.csv": stats_csv.exceptions_csv,
    }
    names = []
    for suffix, write in writers.items():
        path = Path(str(base) + suffix)

        def _write(tmp: Path, write: Callable[[Any], None] = write) -> None:
            with open(tmp, "w", newline="") as fh:
                write(csv.writer(fh))

        atomic_write_with(path, _write)
        names.append(path.name)
    names.append(Path(str(base) + "_stats_history.csv").name)
    return names


def check_invariants(target: Target, phase: str, run_dir: Path) -> tuple[dict[str, int], Path]:
    """Count double bookings and orphans now; write ``invariants-<phase>.json``."""
    from harness.validate import count_invariants

    with target.connect() as conn:
        counts = count_invariants(conn).as_dict()
    path = run_dir / invariants_file(phase)
    write_json(path, {"phase": phase, "counts": counts, "checked_at": datetime.now(UTC)})
    return counts, path
