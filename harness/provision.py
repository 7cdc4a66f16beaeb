"""Provision stage: fill the target with a production-like snapshot.

Two ways, one entry point (:func:`provision`):

- **Synthetic.** A seeded snapshot of the baseline schema at a scale factor,
  generated inside the server (``INSERT ... SELECT generate_series``) from
  deterministic hashes of (seed, row number): ``hashint8extended`` with a key
  derived from the seed and the column. No ``random()``: the same seed, scale
  and anchor give the same rows, id for id, whatever the plan or the number of
  workers. Dirt (double bookings, orphans, NULLs, duplicate keys...) is planted
  on top, with ids above every clean row, and counted exactly in a manifest.
- **Clone.** ``pg_dump``/``pg_restore`` of a source database (or a dump file),
  anonymized before anyone else can read it (see :mod:`harness.anonymize`).

Both replace the data of the target, so both go through
:func:`harness.target.check_destructive_allowed` first.

Scale: scale 1 is about 57k rows (10k allocations); allocations grow linearly,
so scale 100 gives about 1M allocations (about 5M rows in all).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from harness import __version__
from harness.errors import ConfigError, TargetError
from harness.rundir import MANIFEST_FILE, write_json
from harness.target import DEFAULT_PRODUCTION_PATTERN, Target, check_destructive_allowed

log = logging.getLogger(__name__)

BASELINE_SQL = Path(__file__).resolve().parent.parent / "sql" / "000_baseline.sql"

# The app's tables in foreign-key order (parents first).
APP_TABLES: tuple[str, ...] = (
    "restaurants",
    "dining_tables",
    "table_inventory",
    "booking_slots",
    "customers",
    "bookings",
    "allocations",
    "table_hold_windows",
)

# Dirt kinds provision plants, named by the quarantine reason 001 gives them
# (docs/schema.md). Each rate is a fraction of the clean rows of the table the
# dirt goes into (for the hold kinds: of the live holds); a rate above 0
# plants at least one row.
DIRT_KINDS: tuple[str, ...] = (
    "null_party_size",
    "duplicate_idempotency_key",
    "orphan_allocation",
    "overlapping_allocation",
    "expired_hold",
    "null_hold_expiry",
    "overlapping_hold",
    "inventory_table_other_restaurant",
)
DEFAULT_DIRT_RATES: Mapping[str, float] = MappingProxyType(
    {
        "null_party_size": 0.0005,
        "duplicate_idempotency_key": 0.001,
        "orphan_allocation": 0.0005,
        "overlapping_allocation": 0.001,
        # Stale holds nobody purged: as many as there are live ones.
        "expired_hold": 1.0,
        "null_hold_expiry": 0.05,
        "overlapping_hold": 0.1,
        "inventory_table_other_restaurant": 0.0002,
    }
)

RESTAURANTS_PER_SCALE = 5
CUSTOMERS_PER_SCALE = 5000
LIVE_HOLDS_PER_TABLE = 0.05
SLOTS_PER_DAY = 32  # 11:30..14:00 and 17:00..22:00, every 15 minutes
SEATINGS = 3  # lunch, early dinner, late dinner: never overlapping on one table
# Live holds expire at least this long after the anchor, so that none turns
# into an expired_hold while the rehearsal runs (docs/schema.md).
LIVE_HOLD_MIN_LIFETIME = timedelta(days=2)
# Rows per INSERT: small enough for a live progress bar, big enough that the
# per-statement cost does not show.
CHUNK_ROWS = 200_000

ProgressFn = Callable[[str, int, int], None]
"""``progress(step, rows_done, rows_total_estimate)``, called as rows land."""


@dataclass(frozen=True, kw_only=True)
class ProvisionSettings:
    """What to provision. Synthetic unless ``source_url`` or ``from_dump`` is set."""

    scale: int = 1
    seed: int = 1
    # "Now" of the snapshot: bookings are laid out around it. Default: the
    # current hour (UTC). Passing the same anchor reproduces the same rows.
    anchor: datetime | None = None
    past_days: int = 60
    future_days: int = 30
    dirt_rates: Mapping[str, float] = field(default_factory=lambda: DEFAULT_DIRT_RATES)
    source_url: str | None = None
    from_dump: Path | None = None
    rules_path: Path | None = None
    yes_destroy_target_data: bool = False
    allow_production: bool = False
    production_pattern: str = DEFAULT_PRODUCTION_PATTERN
    # Drop the app's tables and the harness schema first (a migrated target).
    reset_schema: bool = False
    manifest_path: Path | None = None
    run_dir: Path | None = None
    # Sessions that load chunks side by side (the server runs one INSERT on
    # one core; two sessions use the two cores of a small staging box).
    workers: int = 2
    # How long to wait for the app's tables when other sessions hold them.
    lock_timeout: str = "30s"
    baseline_sql: Path = BASELINE_SQL


@dataclass(frozen=True, kw_only=True)
class ProvisionResult:
    kind: str
    rows: dict[str, int]
    seconds: float
    rows_per_second: float
    manifest: dict[str, Any]
    manifest_path: Path | None = None
    anonymization: dict[str, Any] | None = None

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


# --------------------------------------------------------------------------
# Entry point


def provision(
    target: Target, settings: ProvisionSettings, *, progress: ProgressFn | None = None
) -> ProvisionResult:
    """Replace the target's data with a synthetic snapshot or an anonymized clone.

    Raises :class:`SafetyError` when the target may not be destroyed,
    :class:`ConfigError` for bad settings, :class:`TargetError` when a
    database cannot be reached.
    """
    if settings.source_url and settings.from_dump:
        raise ConfigError("give either a source URL or a dump file, not both")
    if settings.source_url or settings.from_dump:
        from harness.clone import clone

        return clone(target, settings, progress=progress)
    return _synthetic(target, settings, progress=progress)


def read_manifest(conn_or_target: psycopg.Connection | Target) -> dict[str, Any] | None:
    """The manifest of the snapshot in the database, or None if it has none."""
    if isinstance(conn_or_target, Target):
        with conn_or_target.connect(autocommit=True) as conn:
            return read_manifest(conn)
    conn = conn_or_target
    exists = conn.execute("SELECT to_regclass('harness.snapshot_manifest') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute(
        "SELECT manifest FROM harness.snapshot_manifest ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return dict(row[0]) if row else None


def expected_quarantine(manifest: Mapping[str, Any]) -> dict[str, int]:
    """What 001 should put in harness.quarantine for this snapshot: {reason: count > 0}."""
    return {reason: int(n) for reason, n in (manifest.get("dirt") or {}).items() if n}


# --------------------------------------------------------------------------
# Settings checks


def dirt_rates_from(
    overrides: Mapping[str, float] | None, *, all_rate: float | None = None
) -> Mapping[str, float]:
    """Defaults, or every kind at ``all_rate``, with ``overrides`` on top (checked)."""
    rates = dict(DEFAULT_DIRT_RATES)
    if all_rate is not None:
        rates = dict.fromkeys(DIRT_KINDS, all_rate)
    for kind, rate in (overrides or {}).items():
        if kind not in DIRT_KINDS:
            raise ConfigError(
                f"unknown dirt kind {kind!r}", hint="one of: " + ", ".join(DIRT_KINDS)
            )
        rates[kind] = rate
    for kind, rate in rates.items():
        if not (0 <= rate <= 10):
            raise ConfigError(f"dirt rate of {kind} must be between 0 and 10, got {rate}")
    return MappingProxyType(rates)


def _check_settings(settings: ProvisionSettings) -> datetime:
    if settings.scale < 1:
        raise ConfigError(f"scale must be at least 1, got {settings.scale}")
    if not (0 <= settings.seed < 2**62):
        raise ConfigError(f"seed must be between 0 and 2**62, got {settings.seed}")
    if settings.past_days < 1 or settings.future_days < 15:
        raise ConfigError("past_days must be at least 1 and future_days at least 15")
    dirt_rates_from(settings.dirt_rates)
    now = datetime.now(UTC)
    anchor = settings.anchor or now.replace(minute=0, second=0, microsecond=0)
    if anchor.tzinfo is None:
        raise ConfigError("the anchor time needs a time zone")
    anchor = anchor.astimezone(UTC)
    # Stale holds must already be expired when 001 runs, live ones must not be.
    if anchor > now + timedelta(minutes=5):
        raise ConfigError(f"the anchor {anchor.isoformat()} is in the future")
    if anchor + LIVE_HOLD_MIN_LIFETIME < now + timedelta(hours=1):
        raise ConfigError(
            f"the anchor {anchor.isoformat()} is too old: its live holds would already"
            " have expired",
            hint="use an anchor within the last day",
        )
    return anchor


# --------------------------------------------------------------------------
# Schema: baseline present, dropped indexes while loading


def ensure_baseline(
    conn: psycopg.Connection, *, baseline_sql: Path = BASELINE_SQL, reset: bool = False
) -> None:
    """Make the app's tables exist at the baseline; refuse a migrated schema."""
    if reset:
        for table in reversed(APP_TABLES):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(table)))
        conn.execute("DROP SCHEMA IF EXISTS harness CASCADE")
    present = {
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname = ANY(%s)",
            (list(APP_TABLES),),
        )
    }
    if len(present) < len(APP_TABLES):
        log.info("applying %s (missing: %s)", baseline_sql.name, set(APP_TABLES) - present)
        conn.execute(baseline_sql.read_text())
    problems = _not_baseline(conn)
    if problems:
        raise ConfigError(
            "the target's schema is not the baseline: " + "; ".join(problems[:3]),
            hint="roll the migrations back (harness rollback), or pass --reset-schema to drop"
            " the app's tables and the harness schema and start from sql/000_baseline.sql",
        )


def _not_baseline(conn: psycopg.Connection) -> list[str]:
    """What makes the app's tables differ from the baseline (migrations applied...)."""
    problems = [
        f"{table} has {kind} constraint {name}"
        for table, name, kind in conn.execute(
            "SELECT conrelid::regclass::text, conname, contype::text FROM pg_constraint"
            " WHERE conrelid = ANY(%s::regclass[]) AND contype IN ('c', 'x', 'u')"
            " AND conname <> 'customers_email_key'",
            ([f"public.{t}" for t in APP_TABLES],),
        )
    ]
    problems += [
        f"{table} has trigger {name}"
        for table, name in conn.execute(
            "SELECT tgrelid::regclass::text, tgname FROM pg_trigger"
            " WHERE tgrelid = ANY(%s::regclass[]) AND NOT tgisinternal",
            ([f"public.{t}" for t in APP_TABLES],),
        )
    ]
    for table, column in (("bookings", "party_size"), ("table_hold_windows", "expires_at")):
        row = conn.execute(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s",
            (f"public.{table}", column),
        ).fetchone()
        if row and row[0]:
            problems.append(f"{table}.{column} is NOT NULL")
    row = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = 'public.allocations'::regclass"
        " AND attname = 'restaurant_id' AND NOT attisdropped"
    ).fetchone()
    if row:
        problems.append("allocations has the restaurant_id column of 002")
    return problems


@dataclass(frozen=True)
class _Deferred:
    """Indexes and FK/unique constraints dropped for the load, re-created after.

    Rows are (table, kind, name, definition): kind "index" with the text of
    pg_get_indexdef, or "constraint" with that of pg_get_constraintdef.
    """

    rows: list[tuple[str, str, str, str]]


_DEFERRED_DDL = """
CREATE SCHEMA IF NOT EXISTS harness;
CREATE TABLE IF NOT EXISTS harness.provision_deferred (
    ord         int PRIMARY KEY,
    table_name  text NOT NULL,
    kind        text NOT NULL,
    name        text NOT NULL,
    definition  text NOT NULL
);
"""


def can_skip_fk_checks(conn: psycopg.Connection) -> bool:
    """True when this session may set session_replication_role (superusers, PG15+ grants)."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
        return True
    except psycopg.errors.InsufficientPrivilege:
        return False


def _drop_secondary(conn: psycopg.Connection, *, keep_fks: bool = False) -> _Deferred:
    # A bulk load into tables without secondary indexes or FK triggers is about
    # 4x faster; building each index once and checking each FK with one join
    # afterwards costs a fraction of that. With ``keep_fks`` the FKs stay and
    # the loading sessions skip their triggers instead (session_replication_role
    # = replica, as pg_restore --disable-triggers does): the generator writes
    # only ids that exist, which the tests check for every FK. The definitions are kept in
    # harness.provision_deferred, committed with the drop: a load that dies
    # (kill -9, lost connection) leaves them there for the next run to restore.
    _recover_deferred(conn)
    tables = [f"public.{t}" for t in APP_TABLES]
    constraints = conn.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), contype::text"
        " FROM pg_constraint WHERE conrelid = ANY(%s::regclass[]) AND contype IN ('f', 'u')"
        " ORDER BY contype DESC, 1, 2",
        (tables,),
    ).fetchall()
    indexes = conn.execute(
        "SELECT i.indrelid::regclass::text, i.indexrelid::regclass::text,"
        " pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " WHERE i.indrelid = ANY(%s::regclass[]) AND NOT i.indisprimary"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
        " ORDER BY 1, 2",
        (tables,),
    ).fetchall()
    # Re-created in this order: indexes, unique keys, then the FKs.
    rows = [(t, "index", n, d) for t, n, d in indexes]
    rows += [(t, "constraint", n, d) for t, n, d, kind in constraints if kind == "u"]
    if not keep_fks:
        rows += [(t, "constraint", n, d) for t, n, d, kind in constraints if kind == "f"]
    conn.execute(_DEFERRED_DDL)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO harness.provision_deferred VALUES (%s, %s, %s, %s, %s)",
            [(i, *row) for i, row in enumerate(rows)],
        )
    for table, kind, name, _ in reversed(rows):  # FKs first
        if kind == "constraint":
            conn.execute(
                sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                    sql.SQL(table), sql.Identifier(name)
                )
            )
        else:
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.SQL(name)))
    return _Deferred(rows=rows)


def _recreate(conn: psycopg.Connection, table: str, kind: str, name: str, definition: str) -> None:
    # Names and definitions come from the server's own catalog (regclass text
    # is quoted as needed), not from user input.
    if kind == "index":
        conn.execute(sql.SQL(definition))
    else:
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                sql.SQL(table), sql.Identifier(name), sql.SQL(definition)
            )
        )


def _recover_deferred(conn: psycopg.Connection) -> None:
    """Put back what an interrupted load dropped (tables must be empty or consistent)."""
    if not conn.execute("SELECT to_regclass('harness.provision_deferred')").fetchone()[0]:
        return
    rows = conn.execute(
        "SELECT table_name, kind, name, definition FROM harness.provision_deferred ORDER BY ord"
    ).fetchall()
    if rows:
        log.warning("restoring %s indexes/constraints an interrupted provision dropped", len(rows))
    for table, kind, name, definition in rows:
        exists = conn.execute(
            "SELECT 1 FROM pg_class WHERE oid = to_regclass(%s)"
            " UNION ALL SELECT 1 FROM pg_constraint WHERE conname = %s"
            " AND conrelid = to_regclass(%s)",
            (name, name, table),
        ).fetchone()
        if not exists:
            _recreate(conn, table, kind, name, definition)
    conn.execute("DROP TABLE harness.provision_deferred")


def _restore_secondary(loader: _Loader, deferred: _Deferred) -> None:
    """Re-create each index and constraint, and ANALYZE each table, as parallel jobs.

    One job per object rather than per table: the two text indexes of a big
    table would otherwise be one long pole. Jobs on one table do not block
    each other for long (CREATE INDEX and ANALYZE share their locks) and
    cannot deadlock (each statement locks its table, then its FK's parent).
    """

    def recreate(row: tuple[str, str, str, str]) -> Job:
        def run(conn: psycopg.Connection) -> int:
            _recreate(conn, *row)
            return 0

        return run

    def analyze(table: str) -> Job:
        def run(conn: psycopg.Connection) -> int:
            # Statistics for the migrations' integrity queries and the load test.
            conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
            return 0

        return run

    def size(table: str) -> int:
        return loader.rows.get(table.removeprefix("public."), 0)

    jobs = [(size(row[0]), recreate(row)) for row in deferred.rows]
    jobs += [(size(table), analyze(table)) for table in APP_TABLES]
    # Biggest first: they are the long poles; small ones fill the gaps.
    jobs.sort(key=lambda weighted: -weighted[0])
    loader.parallel([job for _, job in jobs])


# --------------------------------------------------------------------------
# Deterministic pseudo-random values inside SQL
#
# The generation SQL below is static text with two macros that expand to
# hashes of a row number under a key derived from the seed and the macro's
# name:
#   U(name, expr)     a float in [0, 1)
#   I(name, expr, m)  an integer in [0, m)
# Keys are passed as literals through psycopg.sql, never formatted in.

_MACRO = re.compile(r"\b([UI])\((\w+),\s*([^(),]+?)(?:,\s*([^(),]+?))?\)")
_MASK53 = 9007199254740991
_MASK63 = 9223372036854775807


def _key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _expand(template: str, seed: int, **values: Any) -> sql.Composed:
    """Expand the U/I macros; fill ``{name}`` placeholders with literals."""
    keys: dict[str, int] = {}

    def repl(m: re.Match[str]) -> str:
        kind, name, expr, modulus = m.groups()
        placeholder = f"k_{name}"
        keys[placeholder] = _key(seed, name)
        hashed = f"hashint8extended(({expr})::int8, {{{placeholder}}})"
        if kind == "U":
            return f"(({hashed} & {_MASK53})::float8 / {_MASK53 + 1}.0)"
        return f"(({hashed} & {_MASK63}) % ({modulus}))"

    text = _MACRO.sub(repl, template)
    params = {k: sql.Literal(v) for k, v in keys.items()}
    params.update({k: sql.Literal(v) for k, v in values.items()})
    return sql.SQL(text).format(**params)


# Lists for names; the data is synthetic, nothing here is a real person.
_FIRST = (
    "(ARRAY['Anna','Ben','Chloe','David','Emma','Felix','Grace','Hugo','Isla','Jack','Kai',"
    "'Lena','Mateo','Nina','Oscar','Priya','Quinn','Rosa','Sam','Tara','Umar','Vera','Wei',"
    "'Xena','Yusuf','Zoe','Aiko','Bruno','Carmen','Dmitri','Elif','Farah','Goran','Hana',"
    "'Ivan','Julia','Kenji','Lucia','Marek','Noor'])"
)
_LAST = (
    "(ARRAY['Smith','Jones','Garcia','Muller','Rossi','Dubois','Tanaka','Kim','Nowak','Silva',"
    "'Haddad','Okafor','Larsen','Novak','Ibrahim','Cohen','Khan','Lopez','Sato','Meyer',"
    "'Costa','Ward','Fischer','Moreau','Singh','Ito','Berg','Popov','Chen','Walsh','Diaz',"
    "'Petrov','Ahmed','Kowalski','Murphy','Yilmaz','Lindqvist','Mendes','Park','Vogel'])"
)
_DOMAINS = (
    "(ARRAY['example.com','example.net','example.org','mail.example','inbox.example',"
    "'post.example'])"
)
_TIMEZONES = (
    "(ARRAY['Europe/London','Europe/Paris','America/New_York','America/Los_Angeles',"
    "'Asia/Tokyo','Australia/Sydney','America/Sao_Paulo','Asia/Kolkata','Europe/Berlin'])"
)
_NOTES = (
    "(ARRAY['Birthday','Anniversary dinner','Window seat please','Allergy: peanuts',"
    "'High chair needed','Gluten free','Celebrating a promotion','Quiet table please',"
    "'Running 15 minutes late','Wheelchair access'])"
)

# Local start minute and duration of a candidate booking c at seating s.
# Lunch starts 11:30..13:00 and ends by 14:30, the early dinner 17:00..18:30
# and ends by 20:00, the late dinner 20:00..21:45: seatings never overlap, so
# one booking per (table, day, seating) can never double-book a table. The
# sum of two hashes makes the start times peak mid-service.
_J = "(I(j1, {c}, 4) + CASE WHEN {s} = 2 THEN I(j3, {c}, 5) ELSE I(j2, {c}, 4) END)"
_START_MIN = "((ARRAY[690, 1020, 1200])[{s} + 1] + 15 * " + _J + ")"
_DURATION = (
    "(CASE {s} WHEN 0 THEN 60 + 15 * I(dur0, {c}, 3) WHEN 1 THEN 75 + 15 * I(dur1, {c}, 2)"
    " ELSE 90 + 15 * I(dur2, {c}, 3) END)"
)


def _fill(fragment: str, **names: str) -> str:
    for key, value in names.items():
        fragment = fragment.replace("{" + key + "}", value)
    return fragment


@dataclass
class _Plan:
    """Sizes of one synthetic snapshot (everything else derives from the seed)."""

    seed: int
    scale: int
    anchor: datetime
    past_days: int
    future_days: int
    restaurants: int = 0
    customers: int = 0
    tables: int = 0
    bookings_grid: int = 0  # candidate ids 1..grid; planted bookings above it

    @property
    def days(self) -> int:
        return self.past_days + 1 + self.future_days

    @property
    def first_date(self) -> date:
        return self.anchor.date() - timedelta(days=self.past_days)

    def values(self) -> dict[str, Any]:
        return {
            "anchor": self.anchor,
            "first_date": self.first_date,
            "past": self.past_days,
            "ndays": self.days,
            "nrest": self.restaurants,
            "ncust": self.customers,
            "ntables": self.tables,
            "grid": self.bookings_grid,
            "keysalt": f"{self.seed}:",
        }


Job = Callable[[psycopg.Connection], int]


class _Loader:
    """Runs generation statements on a few connections of the target.

    The server cannot run one INSERT ... SELECT in parallel, so the load is
    cut into independent chunks (ranges of ids) that ``workers`` sessions run
    side by side; each chunk commits on its own. Every row is a function of
    (seed, id) only, so the chunking and the order of the workers change
    nothing in the data.
    """

    def __init__(
        self,
        target: Target,
        plan: _Plan,
        progress: ProgressFn | None,
        estimate: int,
        workers: int,
        skip_fk_checks: bool = False,
    ) -> None:
        self.plan = plan
        self.progress = progress
        self.done = 0
        self.estimate = estimate
        self.rows: dict[str, int] = dict.fromkeys(APP_TABLES, 0)
        self._lock = threading.Lock()
        self._all: list[psycopg.Connection] = []
        self._idle: queue.SimpleQueue[psycopg.Connection] = queue.SimpleQueue()
        for _ in range(max(1, workers)):
            conn = target.connect(autocommit=True)
            self._all.append(conn)
            self._idle.put(conn)
            if target.pooled:
                continue  # session settings would not stick behind the pooler
            # A crash mid-load throws the snapshot away anyway: no need to
            # wait for each chunk's commit to reach the disk.
            conn.execute("SET synchronous_commit = off")
            # Index builds sort in memory up to this (the default is 64MB).
            conn.execute("SET maintenance_work_mem = '256MB'")
            # Each statement runs once: compiling it would cost more than it saves.
            conn.execute("SET jit = off")
            if skip_fk_checks:
                conn.execute("SET session_replication_role = replica")
        self.main = self._all[0]
        self.workers = len(self._all)

    def close(self) -> None:
        for conn in self._all:
            conn.close()

    def run(
        self,
        step: str,
        template: str,
        *,
        table: str | None = None,
        conn: psycopg.Connection | None = None,
        **values: Any,
    ) -> int:
        query = _expand(template, self.plan.seed, **{**self.plan.values(), **values})
        started = time.perf_counter()
        cur = (conn or self.main).execute(query)
        n = max(cur.rowcount, 0)
        log.debug("%s: %s rows in %.3f s", step, n, time.perf_counter() - started)
        with self._lock:
            self.rows[table or step] += n
            self.done += n
            self.estimate = max(self.estimate, self.done)
            if self.progress:
                self.progress(step, self.done, self.estimate)
        return n

    def chunks(self, step: str, template: str, upper: int, rows_per_unit: float) -> list[Job]:
        """Jobs running ``template`` over ``{lo}..{hi}`` ranges of about CHUNK_ROWS rows."""
        size = max(1, int(CHUNK_ROWS / max(rows_per_unit, 1e-9)))
        # At least two chunks per worker, so that both stay busy to the end.
        size = min(size, max(1, math.ceil(upper / (2 * len(self._all)))))
        return [
            functools.partial(self._run_job, step, template, lo=lo, hi=min(upper, lo + size - 1))
            for lo in range(1, upper + 1, size)
        ]

    def _run_job(self, step: str, template: str, conn: psycopg.Connection, **values: Any) -> int:
        return self.run(step, template, conn=conn, **values)

    def parallel(self, jobs: list[Job]) -> int:
        """Run the jobs on the worker sessions; return the sum of their results."""

        def call(job: Job) -> int:
            conn = self._idle.get()
            try:
                return job(conn)
            finally:
                self._idle.put(conn)

        with ThreadPoolExecutor(max_workers=len(self._all)) as pool:
            futures = [pool.submit(call, job) for job in jobs]
            try:
                return sum(f.result() for f in futures)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


# --------------------------------------------------------------------------
# Synthetic snapshot


# Bytes on disk per snapshot row once the rehearsal has run over it: about 190
# after provision, 270 after 001..004 (quarantine, new indexes), measured at
# scales 1 and 3; the rest is room for WAL and the rows the load writes.
BYTES_PER_ROW = 400


def estimate_bytes(settings: ProvisionSettings) -> tuple[int, int]:
    """(rows, bytes on disk) a synthetic snapshot of ``settings.scale`` needs, roughly."""
    plan = _Plan(
        seed=settings.seed,
        scale=settings.scale,
        anchor=datetime.now(UTC),
        past_days=settings.past_days,
        future_days=settings.future_days,
        restaurants=RESTAURANTS_PER_SCALE * settings.scale,
        customers=CUSTOMERS_PER_SCALE * settings.scale,
    )
    rows = _estimate_rows(plan, settings)
    return rows, rows * BYTES_PER_ROW


def check_disk_space(target: Target, settings: ProvisionSettings) -> None:
    """Refuse a scale whose snapshot cannot fit, before anything is loaded.

    Only the embedded server's disk can be seen from here (its data directory
    is local); a URL target's server keeps its free space to itself.
    """
    if target.data_dir is None:
        return
    import shutil

    rows, needed = estimate_bytes(settings)
    folder = Path(target.data_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ConfigError(
            f"--scale {settings.scale} needs about {_size(needed)} on disk (~{rows:,} rows"
            f" at ~{BYTES_PER_ROW} bytes each) but only {_size(free)} is free under"
            f" {target.data_dir}; nothing was loaded",
            hint="use a smaller --scale, free some space, or put the server elsewhere"
            " with --data-dir",
        )


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PB"  # pragma: no cover - the loop always returns


def _synthetic(
    target: Target, settings: ProvisionSettings, *, progress: ProgressFn | None
) -> ProvisionResult:
    anchor = _check_settings(settings)
    rates = dirt_rates_from(settings.dirt_rates)
    check_disk_space(target, settings)
    started = time.perf_counter()
    plan = _Plan(
        seed=settings.seed,
        scale=settings.scale,
        anchor=anchor,
        past_days=settings.past_days,
        future_days=settings.future_days,
        restaurants=RESTAURANTS_PER_SCALE * settings.scale,
        customers=CUSTOMERS_PER_SCALE * settings.scale,
    )
    with target.connect() as conn:
        check_destructive_allowed(
            target,
            confirmed=settings.yes_destroy_target_data,
            allow_production=settings.allow_production,
            pattern=settings.production_pattern,
            conn=conn,
        )
        # Sessions still using the tables (a load test left running) would
        # make TRUNCATE wait forever: give up instead, with nothing changed.
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (settings.lock_timeout,))
        try:
            ensure_baseline(conn, baseline_sql=settings.baseline_sql, reset=settings.reset_schema)
            _empty_app_tables(conn)
            # Behind a transaction pooler a session setting does not stick to the
            # next statement (and would leak to other clients): no replica mode.
            skip_fk_checks = not target.pooled and can_skip_fk_checks(conn)
            deferred = _drop_secondary(conn, keep_fks=skip_fk_checks)
            conn.commit()
        except psycopg.errors.LockNotAvailable:
            raise TargetError(
                f"the app's tables of {target.display} are in use by other sessions;"
                " nothing was changed",
                hint="stop what uses them (a load test, the app) and run provision again",
            ) from None
    log.debug("tables emptied in %.3f s", time.perf_counter() - started)
    # From here the load runs on several sessions, each chunk committing on
    # its own (one transaction cannot span sessions). Until the manifest row
    # is written at the very end, the database has no manifest: other stages
    # can tell a half-loaded snapshot from a finished one. If the load fails,
    # the tables are emptied and their indexes and constraints put back.
    loader = _Loader(
        target,
        plan,
        progress,
        _estimate_rows(plan, settings),
        settings.workers,
        skip_fk_checks=skip_fk_checks,
    )
    try:
        _load_clean(loader)
        clean = dict(loader.rows)
        with loader.main.transaction():
            # The dirt draws a few hundred rows by primary key out of tables
            # loaded seconds ago and not analyzed yet: without statistics the
            # planner would hash whole tables to find them.
            loader.main.execute("SET LOCAL enable_hashjoin = off")
            loader.main.execute("SET LOCAL enable_mergejoin = off")
            dirt = _plant_dirt(loader, rates, clean)
        _finish_tables(loader.main)
        if progress:
            progress("indexes", loader.done, loader.done)
        log.debug("rows loaded after %.3f s", time.perf_counter() - started)
        _restore_secondary(loader, deferred)
        log.debug("indexes and statistics after %.3f s", time.perf_counter() - started)
        counts = dict(loader.rows)
        seconds = time.perf_counter() - started
        total = sum(counts.values())
        manifest = {
            "kind": "synthetic",
            "harness_version": __version__,
            "created_at": datetime.now(UTC).isoformat(),
            "seed": settings.seed,
            "scale": settings.scale,
            "anchor": anchor.isoformat(),
            "past_days": settings.past_days,
            "future_days": settings.future_days,
            "live_holds_expire_after": (anchor + LIVE_HOLD_MIN_LIFETIME).isoformat(),
            "rows": counts,
            "dirt": dirt,
            "dirt_rates": dict(rates),
            "seconds": round(seconds, 3),
            "rows_per_second": round(total / seconds) if seconds else None,
            "workers": settings.workers,
            "target": target.display,
        }
        with loader.main.transaction():
            write_manifest_row(loader.main, manifest)
            loader.main.execute("DROP TABLE IF EXISTS harness.provision_deferred")
    except BaseException:
        _undo_partial_load(target)
        raise
    finally:
        loader.close()
    path = _write_manifest_file(manifest, settings)
    log.info(
        "provisioned %s rows in %.1f s (%s rows/s)", total, seconds, manifest["rows_per_second"]
    )
    return ProvisionResult(
        kind="synthetic",
        rows=counts,
        seconds=seconds,
        rows_per_second=total / seconds if seconds else 0.0,
        manifest=manifest,
        manifest_path=path,
    )


def _empty_app_tables(conn: psycopg.Connection) -> None:
    """Empty the app's tables and what describes their old data (quarantine, manifest)."""
    conn.execute(
        sql.SQL("TRUNCATE {} RESTART IDENTITY CASCADE").format(
            sql.SQL(", ").join(sql.Identifier(t) for t in APP_TABLES)
        )
    )
    # The quarantine holds rows of the data being replaced (personal data
    # too): it describes a snapshot that no longer exists. So does the manifest.
    for table in ("harness.quarantine", "harness.snapshot_manifest"):
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]:
            conn.execute(sql.SQL("TRUNCATE {}").format(sql.SQL(table)))


def _undo_partial_load(target: Target) -> None:
    """After a failed load: empty the tables and put their indexes and keys back."""
    try:
        with target.connect() as conn:
            _empty_app_tables(conn)
            _recover_deferred(conn)
            conn.commit()
    except Exception as exc:  # the original error matters more; say what is left
        log.warning("could not clean up after the failed load (%s); the next provision will", exc)


def _expected_bookings_per_table(plan: _Plan) -> float:
    """Expected bookings per table over the window (same formula as the SQL)."""
    total = 0.0
    for d in range(plan.days):
        weekday = (plan.first_date + timedelta(days=d)).isoweekday()
        for seat in range(SEATINGS):
            total += min(_p_alloc_py(plan, d, seat, weekday), 0.92) + 0.06
    return total


_SEAT_P = (0.40, 0.70, 0.50)
_WEEKDAY_P = (0.75, 0.80, 0.90, 1.00, 1.20, 1.25, 0.95)


def _p_alloc_py(plan: _Plan, d: int, seat: int, weekday: int) -> float:
    if d < plan.past_days:
        fut = 1.0
    elif d == plan.past_days:
        fut = 0.8
    else:
        fut = 0.45 * math.exp(-(d - plan.past_days - 1) / 8.0)
    return _SEAT_P[seat] * _WEEKDAY_P[weekday - 1] * fut


def _estimate_rows(plan: _Plan, settings: ProvisionSettings) -> int:
    tables = 20 * plan.restaurants
    bookings = tables * _expected_bookings_per_table(plan)
    return int(
        plan.restaurants
        + tables
        + tables * plan.days
        + plan.restaurants * plan.days * SLOTS_PER_DAY
        + plan.customers
        + bookings * 1.9
        + tables * LIVE_HOLDS_PER_TABLE * 2
    )


# The probability that candidate (table, day d, seating s) is booked and
# keeps its table; another 6% are cancelled bookings without allocation.
_P_ALLOC = (
    "least(0.92, (ARRAY[0.40, 0.70, 0.50])[s + 1]"
    " * (ARRAY[0.75, 0.80, 0.90, 1.00, 1.20, 1.25, 0.95])[extract(isodow FROM sd)::int]"
    " * CASE WHEN d < {past} THEN 1.0 WHEN d = {past} THEN 0.8"
    " ELSE 0.45 * exp(-(d - {past} - 1) / 8.0) END)"
)

_SQL_RESTAURANTS = (
    """
INSERT INTO restaurants (id, name, timezone, created_at, updated_at)
SELECT g,
       (ARRAY['Olive','Copper','Juniper','Saffron','Harbour','Linden','Ember','Fig','Marlow',
              'Quince','Basil','Cedar','Alder','Sorrel','Thyme','Rowan'])[1 + I(rname1, g, 16)]
       || ' ' ||
       (ARRAY['Kitchen','Bistro','Table','Brasserie','House','Trattoria','Grill','Canteen',
              'Dining Room','Izakaya','Taverna','Cafe'])[1 + I(rname2, g, 12)],
       """
    + _TIMEZONES
    + """[1 + (g - 1) % 9],
       {anchor}::timestamptz - (365 + I(rcreated, g, 1500)) * interval '1 day',
       {anchor}::timestamptz - I(rupdated, g, 90) * interval '1 day'
FROM generate_series(1, {nrest}) AS g
"""
)

_SQL_TABLES = """
INSERT INTO dining_tables (id, restaurant_id, label, capacity, created_at, updated_at)
SELECT row_number() OVER (ORDER BY r.id, g), r.id, 'T' || g,
       CASE WHEN U(cap, r.id * 100 + g) < 0.35 THEN 2 WHEN U(cap, r.id * 100 + g) < 0.70 THEN 4
            WHEN U(cap, r.id * 100 + g) < 0.85 THEN 6 WHEN U(cap, r.id * 100 + g) < 0.95 THEN 8
            ELSE 10 END,
       r.created_at, r.created_at
FROM restaurants AS r CROSS JOIN LATERAL generate_series(1, 12 + I(ntables, r.id, 17)) AS g
"""

# Opening hours and the creation time are the same for every table of a
# restaurant on a day: three time zone conversions per restaurant-day instead
# of three per row (2.5x faster).
_SQL_INVENTORY = """
INSERT INTO table_inventory (id, restaurant_id, table_id, service_date, opens_at, closes_at,
                             is_bookable, created_at, updated_at)
SELECT (t.id - 1) * {ndays} + rd.d + 1, t.restaurant_id, t.id, rd.sd, rd.opens, rd.closes,
       true, rd.ca, rd.ca
FROM dining_tables AS t
JOIN (
    SELECT r.id AS restaurant_id, d, x.sd,
           (x.sd + time '11:00') AT TIME ZONE r.timezone AS opens,
           (x.sd + time '23:45') AT TIME ZONE r.timezone AS closes,
           least({anchor}::timestamptz,
                 ((x.sd - 28) + time '09:00') AT TIME ZONE r.timezone) AS ca
    FROM restaurants AS r
    CROSS JOIN generate_series(0, {ndays} - 1) AS d
    CROSS JOIN LATERAL (SELECT {first_date}::date + d AS sd) AS x
    WHERE r.id BETWEEN (SELECT min(restaurant_id) FROM dining_tables WHERE id BETWEEN {lo} AND {hi})
                   AND (SELECT max(restaurant_id) FROM dining_tables WHERE id BETWEEN {lo} AND {hi})
    OFFSET 0
) AS rd ON rd.restaurant_id = t.restaurant_id
WHERE t.id BETWEEN {lo} AND {hi}
"""

_SQL_CUSTOMERS = (
    """
INSERT INTO customers (id, full_name, email, phone, marketing_opt_in, created_at, updated_at)
SELECT g, fn || ' ' || ln,
       CASE WHEN U(noemail, g) < 0.08 THEN NULL
            ELSE lower(fn) || '.' || lower(ln) || g || '@' || """
    + _DOMAINS
    + """[1 + I(domain, g, 6)] END,
       CASE WHEN U(nophone, g) < 0.15 THEN NULL
            ELSE '+' || (ARRAY['1','44','33','49','81','61','55','91','39'])[1 + I(cc, g, 9)]
                 || ' ' || (100000000 + I(phone, g, 899999999)) END,
       U(optin, g) < 0.3, ca, ca
FROM generate_series({lo}, {hi}) AS g
CROSS JOIN LATERAL (SELECT """
    + _FIRST
    + """[1 + I(first, g, 40)] AS fn, """
    + _LAST
    + """[1 + I(last, g, 40)] AS ln,
       {anchor}::timestamptz - I(ccreated, g, 2000000) * interval '1 minute' AS ca) AS n
"""
)

# Bookings: one candidate per (table, day, seating), candidate c -> id c + 1.
# The OFFSET 0 fences keep each derived value computed once per row.
_SQL_BOOKINGS = (
    """
INSERT INTO bookings (id, restaurant_id, customer_id, slot_id, party_size, status,
                      idempotency_key, starts_at, ends_at, notes, created_at, updated_at)
SELECT c + 1, restaurant_id,
       CASE WHEN U(walkin, c) < 0.05 THEN NULL ELSE 1 + I(cust, c, {ncust}) END,
       ((restaurant_id - 1) * {ndays} + d) * 32 + slot_k + 1,
       1 + I(party, c, capacity),
       CASE WHEN cancelled THEN 'cancelled'
            WHEN ends_at <= {anchor}::timestamptz
                 THEN CASE WHEN U(st, c) < 0.04 THEN 'no_show' ELSE 'completed' END
            WHEN starts_at <= {anchor}::timestamptz THEN 'seated'
            WHEN U(st, c) < 0.12 THEN 'pending' ELSE 'confirmed' END,
       CASE WHEN U(nokey, c) < 0.1 THEN NULL ELSE md5({keysalt} || c)::uuid::text END,
       starts_at, ends_at,
       CASE WHEN U(note, c) < 0.08 THEN """
    + _NOTES
    + """[1 + I(notetext, c, 10)] END,
       created_at,
       CASE WHEN NOT cancelled AND ends_at <= {anchor}::timestamptz THEN ends_at
            ELSE created_at END
FROM (
    SELECT *, least({anchor}::timestamptz - I(lag, c, 30) * interval '1 minute',
                    starts_at - (1 + I(lead, c, 720)) * interval '1 hour') AS created_at
    FROM (
        SELECT *, starts_at + dur * interval '1 minute' AS ends_at
        FROM (
            SELECT c, d, restaurant_id, capacity, u >= p AS cancelled,
                   (sd + start_min * interval '1 minute') AT TIME ZONE tz AS starts_at,
                   dur, slot_k
            FROM (
                SELECT c, d, s, sd, restaurant_id, capacity, tz, u, p,
                       (ARRAY[690, 1020, 1200])[s + 1] + 15 * j AS start_min,
                       (ARRAY[0, 11, 23])[s + 1] + j AS slot_k,
                       """
    + _fill(_DURATION, c="c", s="s")
    + """ AS dur
                FROM (
                SELECT *, """
    + _fill(_J, c="c", s="s")
    + """ AS j
                FROM (
                    SELECT *, U(book, c) AS u FROM (
                    SELECT ((t.id - 1) * {ndays} + ds.d) * 3 + ds.s AS c, ds.d, ds.s, ds.sd,
                           t.restaurant_id, t.capacity, t.tz, ds.p
                    FROM (SELECT dt.id, dt.restaurant_id, dt.capacity, r.timezone AS tz
                          FROM dining_tables AS dt JOIN restaurants AS r ON r.id = dt.restaurant_id
                          WHERE dt.id BETWEEN {lo} AND {hi}) AS t
                    -- The probability depends on the day and seating only: 273
                    -- rows computed once, not once per candidate.
                    CROSS JOIN (SELECT d, s, sd, """
    + _P_ALLOC
    + """ AS p
                                FROM generate_series(0, {ndays} - 1) AS d
                                CROSS JOIN generate_series(0, 2) AS s
                                CROSS JOIN LATERAL (SELECT {first_date}::date + d AS sd) AS x
                                OFFSET 0) AS ds
                    OFFSET 0) AS cand
                ) AS scored
                WHERE u < p + 0.06 OFFSET 0
                ) AS jittered OFFSET 0
            ) AS timed OFFSET 0
        ) AS ended OFFSET 0
    ) AS created OFFSET 0
) AS b
"""
)

# One allocation per booking that is not cancelled: same id, the candidate's
# table, the booking's own time range.
_SQL_ALLOCATIONS = """
INSERT INTO allocations (id, booking_id, table_id, during, created_at, updated_at)
SELECT b.id, b.id, (b.id - 1) / (3 * {ndays}) + 1, tstzrange(b.starts_at, b.ends_at, '[)'),
       b.created_at, b.created_at
FROM bookings AS b
WHERE b.status <> 'cancelled' AND b.id BETWEEN {lo} AND {hi}
"""

# Slots every 15 minutes in lunch and dinner service; the cover counter is
# what the app counted for the clean bookings (the planted double bookings
# are ones it never saw), the cap is the restaurant's seats. Run per range of
# restaurants, right after the bookings of their tables ({id_lo}..{id_hi}).
_SQL_SLOTS = """
INSERT INTO booking_slots (id, restaurant_id, starts_at, covers_total, covers_booked,
                           created_at, updated_at)
SELECT sl.id, sl.restaurant_id, sl.starts_at, sl.total, coalesce(bk.covers, 0), sl.ca, sl.ca
FROM (
    SELECT ((r.id - 1) * {ndays} + d) * 32 + k + 1 AS id, r.id AS restaurant_id, seats.total,
           day.opens + (CASE WHEN k < 11 THEN 30 + 15 * k ELSE 360 + 15 * (k - 11) END)
                       * interval '1 minute' AS starts_at,
           day.ca
    FROM restaurants AS r
    JOIN (SELECT restaurant_id, sum(capacity)::int AS total FROM dining_tables GROUP BY 1)
         AS seats ON seats.restaurant_id = r.id
    CROSS JOIN generate_series(0, {ndays} - 1) AS d
    CROSS JOIN LATERAL (
        -- One time zone conversion per restaurant and day: service hours
        -- (11:00..22:00) never contain a daylight-saving switch.
        SELECT ({first_date}::date + d + time '11:00') AT TIME ZONE r.timezone AS opens,
               least({anchor}::timestamptz,
                     (({first_date}::date + d - 28) + time '09:00') AT TIME ZONE r.timezone) AS ca
    ) AS day
    CROSS JOIN generate_series(0, 31) AS k
    WHERE r.id BETWEEN {lo} AND {hi}
) AS sl
LEFT JOIN (SELECT slot_id, sum(party_size)::int AS covers FROM bookings
           WHERE id BETWEEN {id_lo} AND {id_hi} AND status <> 'cancelled'
           GROUP BY slot_id) AS bk
  ON bk.slot_id = sl.id
"""

# Live holds: one per table at most (on a random sample of tables), a future
# dinner, expiring at least LIVE_HOLD_MIN_LIFETIME after the anchor.
_SQL_LIVE_HOLDS = """
INSERT INTO table_hold_windows (id, table_id, customer_id, hold_token, during, expires_at,
                                created_at, updated_at)
SELECT t.rn, t.id, 1 + I(hcust, t.rn, {ncust}), md5({keysalt} || 'hold' || t.rn)::uuid,
       tstzrange(x.s, x.s + interval '90 minutes', '[)'),
       {anchor}::timestamptz + {min_life}::interval + I(hexp, t.rn, 1440) * interval '1 minute',
       {anchor}::timestamptz - I(hcreated, t.rn, 15) * interval '1 minute',
       {anchor}::timestamptz - I(hcreated, t.rn, 15) * interval '1 minute'
FROM (SELECT dt.*, row_number() OVER (ORDER BY U(holdpick, dt.id), dt.id) AS rn
      FROM dining_tables AS dt) AS t
JOIN restaurants AS r ON r.id = t.restaurant_id
CROSS JOIN LATERAL (
    SELECT (({first_date}::date + {past} + 1 + I(hday, t.rn, 14)::int)
            + (1140 + 15 * I(hmin, t.rn, 6)) * interval '1 minute') AT TIME ZONE r.timezone AS s
) AS x
WHERE t.rn <= {n}
"""

# Stale holds: expired, never purged; lunch windows (live holds are at
# dinner), one per (table, day), so they overlap nothing at all.
_SQL_STALE_HOLDS = """
INSERT INTO table_hold_windows (id, table_id, customer_id, hold_token, during, expires_at,
                                created_at, updated_at)
SELECT {base} + j, t.id, 1 + I(scust, j, {ncust}), md5({keysalt} || 'stale' || j)::uuid,
       tstzrange(x.s, x.s + interval '90 minutes', '[)'), x.e,
       x.e - interval '10 minutes', x.e - interval '10 minutes'
FROM generate_series(1, {n}) AS j
JOIN (SELECT dt.*, row_number() OVER (ORDER BY U(stalepick, dt.id), dt.id) AS rn
      FROM dining_tables AS dt) AS t ON t.rn = (j - 1) % {ntables} + 1
JOIN restaurants AS r ON r.id = t.restaurant_id
CROSS JOIN LATERAL (
    SELECT (({first_date}::date + {past} - 20 + ((j - 1) / {ntables})::int)
            + (720 + 15 * I(smin, j, 4)) * interval '1 minute') AT TIME ZONE r.timezone AS s,
           {anchor}::timestamptz - (5 + I(sexp, j, 43200)) * interval '1 minute' AS e
) AS x
"""


def _load_clean(loader: _Loader) -> dict[str, int]:
    plan = loader.plan
    loader.run("restaurants", _SQL_RESTAURANTS)
    plan.tables = loader.run("dining_tables", _SQL_TABLES)
    # Every big INSERT joins these two: without statistics the planner picks
    # plans that run twice as long.
    loader.main.execute("ANALYZE restaurants, dining_tables")
    plan.bookings_grid = plan.tables * plan.days * SEATINGS
    per_table = _expected_bookings_per_table(plan)
    ids_per_table = plan.days * SEATINGS

    # Tables are numbered restaurant by restaurant, so a range of restaurants
    # is a range of tables, and their bookings a range of booking ids: one job
    # loads the bookings, allocations and slots of a range of restaurants.
    ranges = loader.main.execute(
        "SELECT restaurant_id, min(id), max(id) FROM dining_tables GROUP BY 1 ORDER BY 1"
    ).fetchall()
    target_tables = max(1, min(CHUNK_ROWS / per_table, plan.tables / (2 * loader.workers)))
    groups: list[list[tuple[int, int, int]]] = [[]]
    for row in ranges:
        if groups[-1] and groups[-1][-1][2] - groups[-1][0][1] + 1 >= target_tables:
            groups.append([])
        groups[-1].append(row)

    def service(group: list[tuple[int, int, int]]) -> Job:
        r_lo, r_hi = group[0][0], group[-1][0]
        t_lo, t_hi = group[0][1], group[-1][2]
        id_lo, id_hi = (t_lo - 1) * ids_per_table + 1, t_hi * ids_per_table

        def run(conn: psycopg.Connection) -> int:
            # One transaction: reading back rows this transaction wrote sets
            # no hint bits, so the bookings pages are not dirtied (and, on a
            # server with checksums, not written to the WAL) a second time.
            with conn.transaction():
                n = loader.run("bookings", _SQL_BOOKINGS, conn=conn, lo=t_lo, hi=t_hi)
                n += loader.run("allocations", _SQL_ALLOCATIONS, conn=conn, lo=id_lo, hi=id_hi)
                return n + loader.run(
                    "booking_slots",
                    _SQL_SLOTS,
                    conn=conn,
                    lo=r_lo,
                    hi=r_hi,
                    id_lo=id_lo,
                    id_hi=id_hi,
                )

        return run

    # Heaviest first, so that the light ones fill the gaps at the end.
    loader.parallel(
        [service(group) for group in groups]
        + loader.chunks("table_inventory", _SQL_INVENTORY, plan.tables, plan.days)
        + loader.chunks("customers", _SQL_CUSTOMERS, plan.customers, 1)
    )
    loader.run(
        "table_hold_windows",
        _SQL_LIVE_HOLDS,
        n=math.ceil(LIVE_HOLDS_PER_TABLE * plan.tables),
        min_life=LIVE_HOLD_MIN_LIFETIME,
    )
    return dict(loader.rows)


def _count(rate: float, base: int) -> int:
    return 0 if rate <= 0 or base <= 0 else max(1, round(rate * base))


def _plant_dirt(loader: _Loader, rates: Mapping[str, float], clean: dict[str, int]) -> dict:
    plan = loader.plan
    dirt: dict[str, int] = {}
    live_holds = clean["table_hold_windows"]
    grid = plan.bookings_grid
    inv_base = plan.tables * plan.days

    # Holds first: ids above the live ones. Stale (expired) holds, then the
    # NULL-expiry and overlapping ones.
    n = _count(rates["expired_hold"], live_holds)
    dirt["expired_hold"] = (
        loader.run("table_hold_windows", _SQL_STALE_HOLDS, n=n, base=live_holds) if n else 0
    )
    hold_base = live_holds + dirt["expired_hold"]
    n = _count(rates["null_hold_expiry"], live_holds)
    dirt["null_hold_expiry"] = (
        loader.run("table_hold_windows", _SQL_NULL_EXPIRY, n=n, base=hold_base) if n else 0
    )
    hold_base += dirt["null_hold_expiry"]
    n = _count(rates["overlapping_hold"], live_holds)
    dirt["overlapping_hold"] = (
        loader.run(
            "table_hold_windows",
            _SQL_OVERLAPPING_HOLDS,
            n=n,
            base=hold_base,
            live=live_holds,
            min_life=LIVE_HOLD_MIN_LIFETIME,
        )
        if n
        else 0
    )

    # Double bookings: a second, valid booking with the same table and time
    # as a clean allocation. The booking is clean, its allocation is the dirt.
    n = _count(rates["overlapping_allocation"], clean["allocations"])
    doubles = 0
    if n:
        # One transaction: the victims' temporary table lives until its end.
        with loader.main.transaction():
            loader.main.execute(
                _expand(
                    "CREATE TEMP TABLE harness_victims ON COMMIT DROP AS"
                    " SELECT p.k, a.* FROM "
                    + _pick("victim", "allocations")
                    + " AS p JOIN allocations AS a ON a.id = p.id",
                    plan.seed,
                    n=n,
                    grid=grid,
                )
            )
            loader.run("bookings", _SQL_DOUBLE_BOOKINGS, base=grid)
            doubles = loader.run("allocations", _SQL_DOUBLE_ALLOCATIONS, base=grid)
    dirt["overlapping_allocation"] = doubles
    booking_base = grid + doubles
    alloc_base = grid + doubles

    n = _count(rates["null_party_size"], clean["bookings"])
    dirt["null_party_size"] = (
        loader.run("bookings", _SQL_NULL_PARTY, n=n, base=booking_base) if n else 0
    )
    booking_base += dirt["null_party_size"]
    n = _count(rates["duplicate_idempotency_key"], clean["bookings"])
    dirt["duplicate_idempotency_key"] = (
        loader.run("bookings", _SQL_DUPLICATE_KEYS, n=n, base=booking_base) if n else 0
    )

    n = _count(rates["orphan_allocation"], clean["allocations"])
    dirt["orphan_allocation"] = (
        loader.run("allocations", _SQL_ORPHANS, n=n, base=alloc_base, tries=20 * n + 100)
        if n
        else 0
    )

    n = _count(rates["inventory_table_other_restaurant"], clean["table_inventory"])
    dirt["inventory_table_other_restaurant"] = (
        loader.run("table_inventory", _SQL_OTHER_RESTAURANT_INVENTORY, n=n, base=inv_base)
        if n
        else 0
    )
    return {kind: dirt.get(kind, 0) for kind in DIRT_KINDS}


def _pick(name: str, table: str, condition: str = "true") -> str:
    """Up to {n} rows of ``table`` with ids below {grid}, chosen by the seed: (id, k).

    Random ids are probed through the primary key (a sort of the whole table
    by a hash would cost more than the planting itself); ids that are gaps
    are skipped, duplicates kept once, in the order they were first drawn.
    """
    return f"""
    (SELECT id, row_number() OVER (ORDER BY first_try) AS k
     FROM (SELECT x.id, min(t.j) AS first_try
           FROM (SELECT j, I({name}, j, {{grid}}) + 1 AS id
                 FROM generate_series(1, 8 * {{n}} + 100) AS j) AS t
           JOIN {table} AS x ON x.id = t.id
           WHERE {condition}
           GROUP BY x.id ORDER BY min(t.j) LIMIT {{n}}) AS drawn)"""


# NULL expiry: breakfast windows (no clean row is there), one per (table, day).
_SQL_NULL_EXPIRY = """
INSERT INTO table_hold_windows (id, table_id, customer_id, hold_token, during, expires_at,
                                created_at, updated_at)
SELECT {base} + j, t.id, 1 + I(ncust_h, j, {ncust}), md5({keysalt} || 'nullexp' || j)::uuid,
       tstzrange(x.s, x.s + interval '60 minutes', '[)'), NULL,
       {anchor}::timestamptz - I(ncreated, j, 600) * interval '1 minute',
       {anchor}::timestamptz - I(ncreated, j, 600) * interval '1 minute'
FROM generate_series(1, {n}) AS j
JOIN (SELECT dt.*, row_number() OVER (ORDER BY U(nullpick, dt.id), dt.id) AS rn
      FROM dining_tables AS dt) AS t ON t.rn = (j - 1) % {ntables} + 1
JOIN restaurants AS r ON r.id = t.restaurant_id
CROSS JOIN LATERAL (
    SELECT (({first_date}::date + {past} + 1 + ((j - 1) / {ntables})::int) + time '08:00')
           AT TIME ZONE r.timezone AS s
) AS x
"""

# Overlapping holds: the same table and window as a live hold (a race two
# requests both won), unexpired, with a non-NULL expiry.
_SQL_OVERLAPPING_HOLDS = """
INSERT INTO table_hold_windows (id, table_id, customer_id, hold_token, during, expires_at,
                                created_at, updated_at)
SELECT {base} + j, h.table_id, 1 + I(ocust, j, {ncust}), md5({keysalt} || 'overhold' || j)::uuid,
       h.during,
       {anchor}::timestamptz + {min_life}::interval + I(oexp, j, 1440) * interval '1 minute',
       h.created_at + interval '1 second', h.created_at + interval '1 second'
FROM generate_series(1, {n}) AS j
JOIN table_hold_windows AS h ON h.id = (j - 1) % {live} + 1
"""

_SQL_DOUBLE_BOOKINGS = """
INSERT INTO bookings (id, restaurant_id, customer_id, slot_id, party_size, status,
                      idempotency_key, starts_at, ends_at, notes, created_at, updated_at)
SELECT {base} + v.k, b.restaurant_id, 1 + I(dcust, v.k, {ncust}), b.slot_id,
       1 + I(dparty, v.k, 2), b.status, md5({keysalt} || 'double' || v.k)::uuid::text,
       b.starts_at, b.ends_at, NULL, b.created_at + interval '1 second',
       b.updated_at + interval '1 second'
FROM harness_victims AS v JOIN bookings AS b ON b.id = v.booking_id
"""

_SQL_DOUBLE_ALLOCATIONS = """
INSERT INTO allocations (id, booking_id, table_id, during, created_at, updated_at)
SELECT {base} + v.k, {base} + v.k, v.table_id, v.during,
       v.created_at + interval '1 second', v.updated_at + interval '1 second'
FROM harness_victims AS v
"""

# NULL party size: a pending booking copied from a clean one, own key, no table.
_SQL_NULL_PARTY = (
    """
INSERT INTO bookings (id, restaurant_id, customer_id, slot_id, party_size, status,
                      idempotency_key, starts_at, ends_at, notes, created_at, updated_at)
SELECT {base} + k, b.restaurant_id, b.customer_id, b.slot_id, NULL, 'pending',
       md5({keysalt} || 'nullparty' || k)::uuid::text, b.starts_at, b.ends_at, NULL,
       b.created_at, b.created_at
FROM """
    + _pick("nppick", "bookings")
    + """ AS pick
JOIN bookings AS b ON b.id = pick.id
"""
)

# A client retry that created the booking twice: same key, a second later.
_SQL_DUPLICATE_KEYS = (
    """
INSERT INTO bookings (id, restaurant_id, customer_id, slot_id, party_size, status,
                      idempotency_key, starts_at, ends_at, notes, created_at, updated_at)
SELECT {base} + k, b.restaurant_id, b.customer_id, b.slot_id, b.party_size, b.status,
       b.idempotency_key, b.starts_at, b.ends_at, b.notes,
       b.created_at + interval '2 seconds', b.updated_at + interval '2 seconds'
FROM """
    + _pick("duppick", "bookings", "x.idempotency_key IS NOT NULL")
    + """ AS pick
JOIN bookings AS b ON b.id = pick.id
"""
)

# Orphans: the allocation of a booking that was deleted without it. The
# booking id is a candidate that was never booked (a gap below the clean
# ids, so no new booking can ever take it), and the allocation keeps that
# candidate's own table and time, where no clean allocation is.
_SQL_ORPHANS = (
    """
INSERT INTO allocations (id, booking_id, table_id, during, created_at, updated_at)
SELECT {base} + row_number() OVER (ORDER BY first_try), c + 1, c / (3 * {ndays}) + 1,
       tstzrange(x.s, x.s + """
    + _fill(_DURATION, c="c", s="(c % 3)")
    + """ * interval '1 minute', '[)'),
       least({anchor}::timestamptz, x.s) - interval '3 days',
       least({anchor}::timestamptz, x.s) - interval '3 days'
FROM (
    SELECT c, min(j) AS first_try
    FROM (SELECT j, I(orphan, j, {grid}) AS c FROM generate_series(1, {tries}) AS j) AS t
    WHERE NOT EXISTS (SELECT 1 FROM bookings AS b WHERE b.id = t.c + 1)
    GROUP BY c ORDER BY min(j) LIMIT {n}
) AS gap
JOIN dining_tables AS dt ON dt.id = gap.c / (3 * {ndays}) + 1
JOIN restaurants AS r ON r.id = dt.restaurant_id
CROSS JOIN LATERAL (
    SELECT (({first_date}::date + ((gap.c / 3) % {ndays})::int) + """
    + _fill(_START_MIN, c="gap.c", s="(gap.c % 3)")
    + """ * interval '1 minute') AT TIME ZONE r.timezone AS s
) AS x
"""
)

# Inventory naming a table of another restaurant (the next restaurant's id).
_SQL_OTHER_RESTAURANT_INVENTORY = """
INSERT INTO table_inventory (id, restaurant_id, table_id, service_date, opens_at, closes_at,
                             is_bookable, created_at, updated_at)
SELECT {base} + j, t.restaurant_id % {nrest} + 1, t.id, x.sd,
       (x.sd + time '11:00') AT TIME ZONE r.timezone,
       (x.sd + time '23:45') AT TIME ZONE r.timezone,
       true, {anchor}::timestamptz - interval '1 day', {anchor}::timestamptz - interval '1 day'
FROM generate_series(1, {n}) AS j
JOIN (SELECT dt.*, row_number() OVER (ORDER BY U(invpick, dt.id), dt.id) AS rn
      FROM dining_tables AS dt) AS t ON t.rn = (j - 1) % {ntables} + 1
JOIN restaurants AS r ON r.id = t.restaurant_id
CROSS JOIN LATERAL (SELECT {first_date}::date + I(invday, j, {ndays})::int AS sd) AS x
"""


def _finish_tables(conn: psycopg.Connection) -> None:
    # Explicit ids bypass the identity sequences: move each one past the
    # highest id so that the app's (and the load test's) inserts do not collide.
    for table in APP_TABLES:
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({name}, 'id'),"
                " coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
            ).format(name=sql.Literal(f"public.{table}"), table=sql.Identifier(table))
        )


# --------------------------------------------------------------------------
# Manifest


_MANIFEST_DDL = """
CREATE SCHEMA IF NOT EXISTS harness;
CREATE TABLE IF NOT EXISTS harness.snapshot_manifest (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    manifest    jsonb NOT NULL
);
"""


def write_manifest_row(conn: psycopg.Connection, manifest: Mapping[str, Any]) -> None:
    """Replace the manifest row (in the caller's transaction: it commits with the data)."""
    conn.execute(_MANIFEST_DDL)
    # One row: the manifest describes the data now in the database, and the
    # data of an earlier snapshot is gone.
    conn.execute("DELETE FROM harness.snapshot_manifest")
    conn.execute(
        "INSERT INTO harness.snapshot_manifest (kind, manifest) VALUES (%s, %s)",
        (manifest["kind"], Jsonb(dict(manifest))),
    )


def _write_manifest_file(manifest: Mapping[str, Any], settings: ProvisionSettings) -> Path | None:
    path = settings.manifest_path
    if path is None and settings.run_dir is not None:
        path = Path(settings.run_dir) / MANIFEST_FILE
    if path is None:
        return None
    write_json(path, dict(manifest))
    return path


@contextmanager
def rich_progress() -> Iterator[ProgressFn]:
    """A rich progress bar (rows, rows/s, step) as a :data:`ProgressFn` (on stderr)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    class RowsPerSecond(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # type: ignore[no-untyped-def]
            from rich.text import Text

            rate = task.completed / task.elapsed if task.elapsed else 0
            return Text(f"{rate:,.0f} rows/s")

    bar = Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        RowsPerSecond(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    lock = threading.Lock()
    with bar:
        task = bar.add_task("starting", total=None)

        def update(step: str, done: int, total: int) -> None:
            with lock:
                bar.update(task, description=step, completed=done, total=max(total, done))

        yield update


def result_summary(result: ProvisionResult) -> dict[str, Any]:
    """A JSON-ready view of a result (for the report and ``--json``)."""
    data = asdict(result)
    data["manifest_path"] = str(result.manifest_path) if result.manifest_path else None
    return data


__all__ = [
    "APP_TABLES",
    "DEFAULT_DIRT_RATES",
    "DIRT_KINDS",
    "ProvisionResult",
    "ProvisionSettings",
    "dirt_rates_from",
    "ensure_baseline",
    "expected_quarantine",
    "provision",
    "read_manifest",
    "write_manifest_row",
]
