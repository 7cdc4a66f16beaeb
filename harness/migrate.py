"""Migrate stage: apply ``sql/NNN_*.sql`` in order, keep a ledger, roll back.

The plan is every numbered file of the folder, from ``000_baseline.sql`` (the
app's schema before the rollout; all ``IF NOT EXISTS``, so on a database that
already has it, applying it changes nothing) up to ``--to``. So ``harness
migrate`` on an empty database creates the booking schema and then applies
001..004; on a production-like snapshot step 000 is a no-op that is recorded.

Ledger: ``harness.migration_ledger`` (created by the runner if missing) gets
one row per attempt, append-only: file, sha256, mode, outcome (``applied``,
``failed``, ``rolled_back``), start, end, duration, SQLSTATE, error and line.
A file's state is its newest row; ``applied`` files are skipped, the others
(never run, failed, rolled back) are applied. Like alembic, a transactional
file runs in ONE transaction together with its ledger row, so the ledger can
never disagree with the schema; a failure rolls the file back and records the
failure in a transaction of its own.

A file whose first line is ``-- harness: no-transaction`` runs statement by
statement in autocommit (CREATE INDEX CONCURRENTLY; procedures that COMMIT
between batches). Such files must be idempotent: a failure leaves the
statements before it committed, the rerun finishes the job. An INVALID index
left behind by a failed CREATE INDEX CONCURRENTLY is dropped (after the
failure, and again before the statement runs) so that the rerun's
``IF NOT EXISTS`` does not mistake it for a finished one.

Failures raise :class:`MigrationError` naming the file and the line, after the
ledger has recorded them; the error's ``result`` attribute holds the
:class:`MigrateResult` up to and including the failed entry.

Every file is split into statements here (dollar quotes, quotes and comments
respected) and sent one at a time, without parameters, so psycopg uses the
simple query protocol (nothing is prepared: safe behind a transaction pooler)
and an error is pinned to its statement: ``statement_position`` gives the line
inside it, and for an error inside a ``DO`` block the PL/pgSQL context line is
counted from the block's opening dollar quote.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from harness.errors import ConfigError, MigrationError
from harness.outcomes import Outcome, classify
from harness.target import Target

log = logging.getLogger(__name__)

DEFAULT_SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
DEFAULT_ROLLBACK_FILE = "rollback_001_003.sql"
NO_TRANSACTION_MARKER = "-- harness: no-transaction"
# Failures after which a transactional file is safe to try again.
TRANSIENT_SQLSTATES = frozenset({"40P01", "40001", "55P03"})
LEDGER_SCHEMA = "harness"
LEDGER_TABLE = "migration_ledger"
# One runner at a time per database (session advisory lock, key derived from this).
LOCK_NAME = "harness.migration_ledger"

_NUMBERED = re.compile(r"^(?P<number>\d{3})_(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)\.sql$")
_ROLLBACK = re.compile(r"^rollback_(?P<first>\d{3})_(?P<last>\d{3})\.sql$")

LEDGER_DDL = """
CREATE SCHEMA IF NOT EXISTS harness;
CREATE TABLE IF NOT EXISTS harness.migration_ledger (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file         text NOT NULL,
    sha256       text NOT NULL,
    mode         text NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('applied', 'failed', 'rolled_back')),
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    duration_s   double precision NOT NULL,
    sqlstate     text,
    error        text,
    error_line   integer,
    applied_by   text NOT NULL DEFAULT current_user
);
"""


class FileMode(StrEnum):
    TRANSACTION = "transaction"
    NO_TRANSACTION = "no-transaction"


class LedgerOutcome(StrEnum):
    APPLIED = "applied"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class StepAction(StrEnum):
    APPLY = "apply"
    SKIP = "skip"  # applied already, same checksum
    REAPPLY = "reapply"  # applied, changed since, and --force


# --------------------------------------------------------------------------
# Settings and results


@dataclass(frozen=True, kw_only=True)
class MigrateSettings:
    """What to apply and how. ``to`` is a number ("002") or a file name."""

    sql_dir: Path = DEFAULT_SQL_DIR
    to: str | None = None
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    dry_run: bool = False
    force: bool = False
    # False: leave 000_baseline.sql out of the plan (the schema exists already).
    include_baseline: bool = True
    # Attempts more for a transactional file that failed with a deadlock, a
    # serialization failure or a lock timeout: it was rolled back whole, so
    # trying again is safe, and under live writers it is what a person would do.
    retries: int = 0
    retry_delay_s: float = 0.5


@dataclass(frozen=True, kw_only=True)
class RollbackSettings:
    sql_dir: Path = DEFAULT_SQL_DIR
    file: str = DEFAULT_ROLLBACK_FILE
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    dry_run: bool = False


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One row of ``harness.migration_ledger``."""

    id: int | None
    file: str
    sha256: str
    mode: str
    outcome: str
    started_at: datetime
    finished_at: datetime
    duration_s: float
    sqlstate: str | None = None
    error: str | None = None
    error_line: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class MigrationFile:
    path: Path
    number: int
    sha256: str
    mode: FileMode

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True, kw_only=True)
class PlannedStep:
    file: str
    sha256: str
    mode: str
    action: str


@dataclass(frozen=True, kw_only=True)
class MigrateResult:
    """What ``migrate`` planned and did; ``failed`` is set only on the raised error's copy."""

    sql_dir: Path
    planned: list[PlannedStep]
    applied: list[LedgerEntry] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: LedgerEntry | None = None
    # Failed attempts that were retried (deadlock, lock timeout...), in order.
    retried: list[LedgerEntry] = field(default_factory=list)
    duration_s: float = 0.0
    dry_run: bool = False

    @property
    def entries(self) -> list[LedgerEntry]:
        """Every ledger row this run wrote, in the order they were written."""
        rows = [*self.retried, *self.applied, *([self.failed] if self.failed else [])]
        return sorted(rows, key=lambda e: e.started_at)

    @property
    def ok(self) -> bool:
        return self.failed is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "sql_dir": str(self.sql_dir),
            "dry_run": self.dry_run,
            "ok": self.ok,
            "duration_s": self.duration_s,
            "planned": [asdict(step) for step in self.planned],
            "applied": [entry.as_dict() for entry in self.applied],
            "skipped": list(self.skipped),
            "retried": [entry.as_dict() for entry in self.retried],
            "failed": self.failed.as_dict() if self.failed else None,
        }


@dataclass(frozen=True, kw_only=True)
class RollbackResult:
    file: str
    sha256: str
    rolled_back: list[str]
    entry: LedgerEntry | None
    duration_s: float
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "rolled_back": list(self.rolled_back),
            "entry": self.entry.as_dict() if self.entry else None,
            "duration_s": self.duration_s,
            "dry_run": self.dry_run,
        }


@dataclass(frozen=True, kw_only=True)
class MigrationEvent:
    """Progress: ``start`` / ``applied`` / ``skip`` / ``failed`` of one file."""

    kind: str
    file: str
    mode: str
    duration_s: float | None = None
    detail: str | None = None


EventHandler = Callable[[MigrationEvent], None]


# --------------------------------------------------------------------------
# Statement splitting


@dataclass(frozen=True)
class Statement:
    text: str
    offset: int  # character offset of the statement in the file
    line: int  # 1-based line of its first character
    # Offset (in ``text``) just after its first dollar-quote opener: where the
    # body of a DO block or function starts, which PL/pgSQL counts lines from.
    body_offset: int | None = None


class SplitError(ValueError):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")


def _ident_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def split_statements(text: str) -> list[Statement]:
    """Split SQL text at top-level semicolons.

    Respects 'strings' (and E'...' backslash escapes), "identifiers",
    -- line comments, nested /* block comments */ and $tag$ dollar quotes.
    Not supported: SQL-standard ``BEGIN ATOMIC ... END`` function bodies
    (write them with dollar quotes) and psql meta-commands.
    """
    statements: list[Statement] = []
    n = len(text)
    i = 0
    start: int | None = None
    body: int | None = None

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def emit(end: int) -> None:
        assert start is not None
        statements.append(Statement(text[start:end], start, line_at(start), body))

    while i < n:
        ch = text[i]
        if ch == "-" and text.startswith("--", i):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline + 1
            continue
        if ch == "/" and text.startswith("/*", i):
            opened, depth, i = i, 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise SplitError("unterminated /* comment", line_at(opened))
            continue
        if ch.isspace():
            i += 1
            continue
        if start is None:
            start = i
        if ch == ";":
            emit(i + 1)
            start, body = None, None
            i += 1
            continue
        if ch == "'":
            backslashes = i > 0 and text[i - 1] in "eE" and (i < 2 or not _ident_char(text[i - 2]))
            i = _skip_quoted(text, i, "'", backslashes, line_at)
            continue
        if ch == '"':
            i = _skip_quoted(text, i, '"', False, line_at)
            continue
        if ch == "$" and not (i > 0 and (_ident_char(text[i - 1]) or text[i - 1] == "$")):
            match = _DOLLAR_TAG.match(text, i)
            if match:
                tag = match.group(0)
                close = text.find(tag, match.end())
                if close < 0:
                    raise SplitError(f"unterminated dollar quote {tag}", line_at(i))
                if body is None:
                    body = match.end() - start
                i = close + len(tag)
                continue
        if _ident_char(ch):
            # Whole words at once, so that the $ in an identifier like a$b
            # is never taken for a dollar quote.
            while i < n and (_ident_char(text[i]) or text[i] == "$"):
                i += 1
            continue
        i += 1
    if start is not None:
        emit(n)
    return statements


def _skip_quoted(
    text: str, i: int, quote: str, backslashes: bool, line_at: Callable[[int], int]
) -> int:
    n = len(text)
    j = i + 1
    while j < n:
        ch = text[j]
        if backslashes and ch == "\\":
            j += 2
            continue
        if ch == quote:
            if j + 1 < n and text[j + 1] == quote:  # '' or "" escapes the quote
                j += 2
                continue
            return j + 1
        j += 1
    kind = "string" if quote == "'" else "quoted identifier"
    raise SplitError(f"unterminated {kind}", line_at(i))


# --------------------------------------------------------------------------
# The sql/ folder


def file_mode(text: str) -> FileMode:
    first = text.lstrip("\ufeff").split("\n", 1)[0].strip().lower()
    return FileMode.NO_TRANSACTION if first == NO_TRANSACTION_MARKER else FileMode.TRANSACTION


def _read(path: Path) -> tuple[str, str]:
    """(text, sha256 of the bytes): the checksum is of what is on disk."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


def discover(sql_dir: Path) -> list[MigrationFile]:
    """The numbered migration files of ``sql_dir`` in order, the layout checked.

    Numbers are three digits, start at 000 or 001 and run without a gap or a
    duplicate; a ``.sql`` file that is neither ``NNN_name.sql`` nor
    ``rollback_NNN_NNN.sql`` is refused (it would silently never run).
    """
    sql_dir = Path(sql_dir)
    if not sql_dir.is_dir():
        raise ConfigError(f"migration folder {sql_dir} does not exist", hint="pass --sql-dir DIR")
    by_number: dict[int, list[Path]] = {}
    for path in sorted(sql_dir.glob("*.sql")):
        match = _NUMBERED.match(path.name)
        if match:
            by_number.setdefault(int(match["number"]), []).append(path)
        elif not _ROLLBACK.match(path.name):
            raise ConfigError(
                f"{path.name} in {sql_dir} is neither NNN_name.sql nor rollback_NNN_NNN.sql",
                hint="rename it (three-digit number, underscore, name) or move it out",
            )
    if not by_number:
        raise ConfigError(f"no NNN_name.sql migration files in {sql_dir}")
    for number, paths in by_number.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise ConfigError(f"two migration files share the number {number:03d}: {names}")
    numbers = sorted(by_number)
    if numbers[0] > 1:
        raise ConfigError(
            f"migrations in {sql_dir} start at {numbers[0]:03d}; they must start at 000 or 001"
        )
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if numbers != expected:
        missing = sorted(set(expected) - set(numbers))[0]
        raise ConfigError(
            f"migration {missing:03d} is missing in {sql_dir}"
            f" (found {', '.join(f'{n:03d}' for n in numbers)})",
            hint="numbers must run without gaps",
        )
    files = []
    for number in numbers:
        path = by_number[number][0]
        text, digest = _read(path)
        files.append(MigrationFile(path=path, number=number, sha256=digest, mode=file_mode(text)))
    return files


def check_files(sql_dir: Path, *, rollback_file: str | None = None) -> list[MigrationFile]:
    """:func:`discover` plus every file split as the runner would, nothing run.

    For stages that run the migrations late (the rehearsal): a bad folder is
    refused before anything else happens. With ``rollback_file``, that file
    must exist and split too.
    """
    files = discover(sql_dir)
    for f in files:
        _parse(f.path, _read(f.path)[0], f.mode)
    if rollback_file is not None:
        path = Path(sql_dir) / rollback_file
        if not path.is_file():
            raise ConfigError(
                f"rollback file {path} does not exist",
                hint="the rollback drill needs it; restore it or skip the drill",
            )
        _parse(path, _read(path)[0])
    return files


def _select_until(files: list[MigrationFile], to: str | None) -> list[MigrationFile]:
    if to is None:
        return files
    wanted = to.strip()
    for index, f in enumerate(files):
        if wanted in (f.name, f.path.stem, f"{f.number:03d}") or (
            wanted.isdigit() and int(wanted) == f.number
        ):
            return files[: index + 1]
    raise ConfigError(f"--to {to}: no such migration (have {', '.join(f.name for f in files)})")


# --------------------------------------------------------------------------
# The ledger


def ensure_ledger(conn: psycopg.Connection) -> None:
    """Create ``harness.migration_ledger`` if missing (autocommit connection)."""
    try:
        with conn.transaction():
            conn.execute(LEDGER_DDL)
    except psycopg.Error as exc:
        classified = classify(exc)
        raise MigrationError(
            f"cannot create the ledger harness.migration_ledger: {classified.outcome}"
            f" (SQLSTATE {classified.sqlstate}): {exc.diag.message_primary or exc}",
            hint="the runner's user needs CREATE on the database (schema harness)",
        ) from None


def _ledger_exists(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT to_regclass('harness.migration_ledger') IS NOT NULL").fetchone()
    return bool(row and row[0])


def read_ledger(target_or_conn: Target | psycopg.Connection) -> list[LedgerEntry]:
    """Every ledger row, oldest first; ``[]`` when the runner never ran here."""
    if isinstance(target_or_conn, Target):
        with target_or_conn.connect(autocommit=True) as conn:
            return _read_ledger(conn)
    return _read_ledger(target_or_conn)


def _read_ledger(conn: psycopg.Connection) -> list[LedgerEntry]:
    if not _ledger_exists(conn):
        return []
    rows = conn.execute(
        "SELECT id, file, sha256, mode, outcome, started_at, finished_at, duration_s,"
        " sqlstate, error, error_line FROM harness.migration_ledger ORDER BY id"
    ).fetchall()
    return [
        LedgerEntry(
            id=r[0],
            file=r[1],
            sha256=r[2],
            mode=r[3],
            outcome=r[4],
            started_at=r[5],
            finished_at=r[6],
            duration_s=r[7],
            sqlstate=r[8],
            error=r[9],
            error_line=r[10],
        )
        for r in rows
    ]


def current_state(entries: Iterable[LedgerEntry]) -> dict[str, LedgerEntry]:
    """Each file's newest ledger row (its state)."""
    state: dict[str, LedgerEntry] = {}
    for entry in entries:
        state[entry.file] = entry
    return state


def _insert(conn: psycopg.Connection, entry: LedgerEntry) -> LedgerEntry:
    row = conn.execute(
        "INSERT INTO harness.migration_ledger (file, sha256, mode, outcome, started_at,"
        " finished_at, duration_s, sqlstate, error, error_line)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            entry.file,
            entry.sha256,
            entry.mode,
            entry.outcome,
            entry.started_at,
            entry.finished_at,
            entry.duration_s,
            entry.sqlstate,
            entry.error,
            entry.error_line,
        ),
    ).fetchone()
    return replace(entry, id=row[0] if row else None)


# --------------------------------------------------------------------------
# Running one file


class _Failure(Exception):
    """A statement failed: the driver's error and the file line it points at."""

    def __init__(self, exc: psycopg.Error, line: int) -> None:
        super().__init__(str(exc))
        self.exc = exc
        self.line = line


def _error_line(statement: Statement, exc: psycopg.Error) -> int:
    """The file line an error points at (falls back to the statement's first line)."""
    diag = exc.diag
    position = diag.statement_position
    if position:
        index = max(0, int(position) - 1)
        return statement.line + statement.text.count("\n", 0, index)
    # An error raised inside a DO block: PL/pgSQL numbers lines from the
    # opening dollar quote. Errors inside functions defined elsewhere keep the
    # statement's line (the context, in the message, names the function).
    match = re.search(r"inline_code_block line (\d+)", diag.context or "")
    if match and statement.body_offset is not None:
        opener = statement.line + statement.text.count("\n", 0, statement.body_offset)
        return opener + int(match.group(1)) - 1
    return statement.line


# Statements slower than this are logged with their line: on a big snapshot
# they are the ones that hold locks long enough to matter.
SLOW_STATEMENT_S = 1.0


def _run_statements(conn: psycopg.Connection, statements: list[Statement], file: str) -> None:
    for statement in statements:
        started = time.perf_counter()
        try:
            # No parameters: psycopg sends it with the simple query protocol.
            conn.execute(statement.text)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise _Failure(exc, _error_line(statement, exc)) from exc
        elapsed = time.perf_counter() - started
        if elapsed >= SLOW_STATEMENT_S:
            log.info("%s line %d took %.2f s", file, statement.line, elapsed)


_TRANSACTION_CONTROL = re.compile(
    r"^(BEGIN|COMMIT|ROLLBACK|END|ABORT|START\s+TRANSACTION)\b", re.IGNORECASE
)


def _parse(path: Path, text: str, mode: FileMode = FileMode.TRANSACTION) -> list[Statement]:
    try:
        statements = split_statements(text)
    except SplitError as exc:
        raise MigrationError(
            f"{path.name} line {exc.line}: {exc}", file=path.name, line=exc.line
        ) from None
    if mode is FileMode.TRANSACTION:
        # The runner owns the transaction: a COMMIT in the file would commit
        # half of it without its ledger row.
        for statement in statements:
            match = _TRANSACTION_CONTROL.match(statement.text)
            if match:
                raise ConfigError(
                    f"{path.name} line {statement.line}: {match[1].upper()} in a file the"
                    " runner wraps in one transaction",
                    hint="remove it, or make the first line '-- harness: no-transaction'",
                )
    return statements


def _set_timeouts(conn: psycopg.Connection, lock: str, statement: str, *, local: bool) -> None:
    conn.execute(
        "SELECT set_config('lock_timeout', %s, %s), set_config('statement_timeout', %s, %s)",
        (lock, local, statement, local),
    )


def _check_timeouts(conn: psycopg.Connection, lock: str, statement: str) -> None:
    """Refuse a bad --lock-timeout / --statement-timeout before anything runs."""
    try:
        with conn.transaction(force_rollback=True):
            _set_timeouts(conn, lock, statement, local=True)
    except psycopg.errors.InvalidParameterValue as exc:
        raise ConfigError(
            f"bad timeout: {exc.diag.message_primary}",
            hint="use a PostgreSQL duration such as 5s, 500ms or 15min",
        ) from None


_CIC = re.compile(
    r"^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?"
    r"(?P<name>\"(?:[^\"]|\"\")+\"|[A-Za-z_][A-Za-z0-9_$]*)\s+ON\b",
    re.IGNORECASE,
)


def _concurrent_index_name(statement: Statement) -> str | None:
    text = "\n".join(
        line for line in statement.text.splitlines() if not line.lstrip().startswith("--")
    )
    match = _CIC.match(text)
    if not match:
        return None
    name = match["name"]
    return name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()


def _drop_invalid_index(conn: psycopg.Connection, name: str) -> bool:
    """Drop index ``name`` if a failed CREATE INDEX CONCURRENTLY left it INVALID."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = %s AND NOT x.indisvalid AND pg_table_is_visible(c.oid)",
        (name,),
    ).fetchone()
    if row is None:
        return False
    log.warning("dropping INVALID index %s.%s left by a failed concurrent build", row[0], name)
    conn.execute(
        sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}.{}").format(
            sql.Identifier(row[0]), sql.Identifier(name)
        )
    )
    return True


def _run_no_transaction(
    conn: psycopg.Connection, statements: list[Statement], settings: MigrateSettings, file: str
) -> None:
    _set_timeouts(conn, settings.lock_timeout, settings.statement_timeout, local=False)
    try:
        for statement in statements:
            index = _concurrent_index_name(statement)
            if index:
                _drop_invalid_index(conn, index)
            try:
                _run_statements(conn, [statement], file)
            except _Failure:
                if index:
                    try:
                        _drop_invalid_index(conn, index)
                    except psycopg.Error as cleanup:
                        log.warning("could not drop INVALID index %s: %s", index, cleanup)
                raise
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("RESET lock_timeout")
            conn.execute("RESET statement_timeout")


def _now() -> datetime:
    return datetime.now(UTC)


def _failure_hint(exc: psycopg.Error, mode: FileMode) -> str:
    outcome = classify(exc).outcome
    state = (
        "the file was rolled back: the database is as it was before it"
        if mode is FileMode.TRANSACTION
        else "statements before it stay applied; the file is idempotent, a rerun finishes it"
    )
    if isinstance(exc, psycopg.errors.ActiveSqlTransaction) and mode is FileMode.TRANSACTION:
        return (
            f"{state}; that statement cannot run in a transaction:"
            f" make the file's first line '{NO_TRANSACTION_MARKER}'"
        )
    if outcome is Outcome.LOCK_NOT_AVAILABLE:
        return (
            f"{state}; another session holds a lock it needs:"
            " rerun when it is gone, or raise --lock-timeout"
        )
    if outcome is Outcome.QUERY_CANCELED:
        return f"{state}; it ran longer than --statement-timeout"
    return f"{state}; the ledger records the failure, fix the file and rerun"


def _apply_file(
    conn: psycopg.Connection,
    f: MigrationFile,
    settings: MigrateSettings,
    on_event: EventHandler | None,
) -> LedgerEntry:
    text, digest = _read(f.path)
    if digest != f.sha256:
        raise MigrationError(f"{f.name} changed while the runner was planning; rerun")
    statements = _parse(f.path, text, f.mode)
    _emit(on_event, MigrationEvent(kind="start", file=f.name, mode=str(f.mode)))
    log.info("applying %s (%s, %d statements)", f.name, f.mode, len(statements))
    started, clock = _now(), time.perf_counter()
    try:
        if f.mode is FileMode.TRANSACTION:
            with conn.transaction():
                _set_timeouts(conn, settings.lock_timeout, settings.statement_timeout, local=True)
                _run_statements(conn, statements, f.name)
                entry = _insert(conn, _entry(f, LedgerOutcome.APPLIED, started, clock))
        else:
            _run_no_transaction(conn, statements, settings, f.name)
            with conn.transaction():
                entry = _insert(conn, _entry(f, LedgerOutcome.APPLIED, started, clock))
    except _Failure as failure:
        failed = _record_failure(conn, f, started, clock, failure)
        _emit(
            on_event,
            MigrationEvent(
                kind="failed",
                file=f.name,
                mode=str(f.mode),
                duration_s=failed.duration_s,
                detail=failed.error,
            ),
        )
        error = MigrationError(
            f"{f.name} line {failure.line}: {failed.error}",
            hint=_failure_hint(failure.exc, f.mode),
            file=f.name,
            line=failure.line,
            sqlstate=failure.exc.sqlstate,
        )
        error.entry = failed  # type: ignore[attr-defined]
        raise error from None
    log.info("applied %s in %.3f s", f.name, entry.duration_s)
    _emit(
        on_event,
        MigrationEvent(kind="applied", file=f.name, mode=str(f.mode), duration_s=entry.duration_s),
    )
    return entry


def _entry(
    f: MigrationFile,
    outcome: LedgerOutcome,
    started: datetime,
    clock: float,
    **extra: Any,
) -> LedgerEntry:
    # The duration comes from the monotonic clock; the end time is derived
    # from it so that the three columns always agree.
    duration = round(time.perf_counter() - clock, 6)
    return LedgerEntry(
        id=None,
        file=f.name,
        sha256=f.sha256,
        mode=str(f.mode),
        outcome=str(outcome),
        started_at=started,
        finished_at=started + timedelta(seconds=duration),
        duration_s=duration,
        **extra,
    )


def _describe(exc: psycopg.Error) -> str:
    classified = classify(exc)
    message = exc.diag.message_primary or str(exc).strip().splitlines()[0]
    text = f"{classified.outcome} (SQLSTATE {classified.sqlstate}): {message}"
    if exc.diag.context:
        context = " / ".join(line.strip() for line in exc.diag.context.splitlines() if line)
        text += f" [{context}]"
    return text


def _record_failure(
    conn: psycopg.Connection, f: MigrationFile, started: datetime, clock: float, failure: _Failure
) -> LedgerEntry:
    entry = _entry(
        f,
        LedgerOutcome.FAILED,
        started,
        clock,
        sqlstate=failure.exc.sqlstate,
        error=_describe(failure.exc),
        error_line=failure.line,
    )
    try:
        with conn.transaction():
            return _insert(conn, entry)
    except psycopg.Error as exc:  # the connection itself may be gone
        log.error("could not record the failure of %s in the ledger: %s", f.name, exc)
        return entry


def _emit(on_event: EventHandler | None, event: MigrationEvent) -> None:
    if on_event is not None:
        on_event(event)


# --------------------------------------------------------------------------
# One runner at a time


def _lock_runner(conn: psycopg.Connection, target: Target) -> None:
    if target.pooled:
        # A session advisory lock means nothing through a transaction pooler.
        log.info("transaction pooler: not taking the runner's advisory lock")
        return
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (LOCK_NAME,)).fetchone()
    if not (row and row[0]):
        raise MigrationError(
            f"another migration runner is working on {target.display}",
            hint="wait for it to finish, then rerun",
        )


# --------------------------------------------------------------------------
# The stage


def plan(
    files: list[MigrationFile], state: dict[str, LedgerEntry], *, force: bool
) -> list[PlannedStep]:
    """Decide apply / skip / reapply per file; a changed applied file is refused."""
    steps = []
    for f in files:
        last = state.get(f.name)
        if last is None or last.outcome != LedgerOutcome.APPLIED:
            action = StepAction.APPLY
        elif last.sha256 == f.sha256:
            action = StepAction.SKIP
        elif force:
            action = StepAction.REAPPLY
        else:
            raise MigrationError(
                f"{f.name} changed after it was applied (ledger sha256 {last.sha256[:12]},"
                f" file now {f.sha256[:12]})",
                hint="restore the applied version, or rerun with --force to apply it again",
                file=f.name,
            )
        steps.append(
            PlannedStep(file=f.name, sha256=f.sha256, mode=str(f.mode), action=str(action))
        )
    return steps


def migrate(
    target: Target, settings: MigrateSettings, *, on_event: EventHandler | None = None
) -> MigrateResult:
    """Apply the numbered files up to ``settings.to``; skip the applied ones.

    Raises :class:`MigrationError` when a file fails (after the ledger records
    it) or is refused, :class:`ConfigError` for a bad folder or setting.
    """
    clock = time.perf_counter()
    files = discover(settings.sql_dir)
    if not settings.include_baseline:
        files = [f for f in files if f.number != 0]
    files = _select_until(files, settings.to)
    for f in files:  # a file that cannot be split or run is refused before anything runs
        _parse(f.path, _read(f.path)[0], f.mode)
    with target.connect(autocommit=True) as conn:
        _check_timeouts(conn, settings.lock_timeout, settings.statement_timeout)
        if settings.dry_run:
            steps = plan(files, current_state(_read_ledger(conn)), force=settings.force)
            return MigrateResult(
                sql_dir=settings.sql_dir,
                planned=steps,
                skipped=[s.file for s in steps if s.action == StepAction.SKIP],
                duration_s=time.perf_counter() - clock,
                dry_run=True,
            )
        if any(f.mode is FileMode.NO_TRANSACTION for f in files) and target.pooled:
            log.warning(
                "no-transaction files through a transaction pooler: their lock and"
                " statement timeouts may not stick; prefer the session port (5432)"
            )
        ensure_ledger(conn)
        _lock_runner(conn, target)
        steps = plan(files, current_state(_read_ledger(conn)), force=settings.force)
        by_name = {f.name: f for f in files}
        applied: list[LedgerEntry] = []
        retried: list[LedgerEntry] = []
        skipped: list[str] = []
        for step in steps:
            f = by_name[step.file]
            if step.action == StepAction.SKIP:
                skipped.append(f.name)
                _emit(on_event, MigrationEvent(kind="skip", file=f.name, mode=str(f.mode)))
                continue
            for attempt in range(settings.retries + 1):
                try:
                    applied.append(_apply_file(conn, f, settings, on_event))
                    break
                except MigrationError as exc:
                    entry = getattr(exc, "entry", None)
                    transient = (
                        f.mode is FileMode.TRANSACTION and exc.sqlstate in TRANSIENT_SQLSTATES
                    )
                    if transient and entry is not None and attempt < settings.retries:
                        retried.append(entry)
                        log.warning("%s; retrying (%d of %d)", exc, attempt + 1, settings.retries)
                        _emit(
                            on_event,
                            MigrationEvent(
                                kind="retry", file=f.name, mode=str(f.mode), detail=exc.message
                            ),
                        )
                        time.sleep(settings.retry_delay_s * (attempt + 1))
                        continue
                    exc.result = MigrateResult(  # type: ignore[attr-defined]
                        sql_dir=settings.sql_dir,
                        planned=steps,
                        applied=applied,
                        skipped=skipped,
                        failed=entry,
                        retried=retried,
                        duration_s=time.perf_counter() - clock,
                    )
                    raise
    return MigrateResult(
        sql_dir=settings.sql_dir,
        planned=steps,
        applied=applied,
        skipped=skipped,
        retried=retried,
        duration_s=time.perf_counter() - clock,
    )


def rollback(target: Target, settings: RollbackSettings) -> RollbackResult:
    """Apply ``rollback_AAA_BBB.sql`` in one transaction with its ledger rows.

    In the same transaction, every numbered file from AAA on whose state is
    ``applied`` gets a ``rolled_back`` row: AAA..BBB because the file undoes
    them, later ones (004) because what they built on is gone and the rollback
    drops their objects too. A later ``migrate`` applies them all again.
    """
    clock = time.perf_counter()
    match = _ROLLBACK.match(settings.file)
    if not match:
        raise ConfigError(
            f"rollback file {settings.file!r} is not named rollback_NNN_NNN.sql",
            hint="name it after the first and last migration it undoes",
        )
    path = Path(settings.sql_dir) / settings.file
    if not path.is_file():
        raise ConfigError(f"rollback file {path} does not exist")
    first = int(match["first"])
    files = {f.name: f for f in discover(settings.sql_dir)}
    text, digest = _read(path)
    statements = _parse(path, text)
    rollback_file = MigrationFile(path=path, number=-1, sha256=digest, mode=FileMode.TRANSACTION)
    with target.connect(autocommit=True) as conn:
        _check_timeouts(conn, settings.lock_timeout, settings.statement_timeout)
        state = current_state(_read_ledger(conn))
        undone = [
            entry
            for name, entry in state.items()
            if name in files
            and files[name].number >= first
            and entry.outcome == LedgerOutcome.APPLIED
        ]
        undone.sort(key=lambda e: files[e.file].number)
        if settings.dry_run:
            return RollbackResult(
                file=settings.file,
                sha256=digest,
                rolled_back=[e.file for e in undone],
                entry=None,
                duration_s=time.perf_counter() - clock,
                dry_run=True,
            )
        ensure_ledger(conn)
        _lock_runner(conn, target)
        log.info("applying %s (%d statements)", settings.file, len(statements))
        started, t0 = _now(), time.perf_counter()
        try:
            with conn.transaction():
                _set_timeouts(conn, settings.lock_timeout, settings.statement_timeout, local=True)
                _run_statements(conn, statements, settings.file)
                entry = _insert(conn, _entry(rollback_file, LedgerOutcome.APPLIED, started, t0))
                finished = entry.finished_at
                for done in undone:
                    _insert(
                        conn,
                        replace(
                            done,
                            id=None,
                            outcome=str(LedgerOutcome.ROLLED_BACK),
                            started_at=started,
                            finished_at=finished,
                            duration_s=0.0,
                            sqlstate=None,
                            error=None,
                            error_line=None,
                        ),
                    )
        except _Failure as failure:
            failed = _record_failure(conn, rollback_file, started, t0, failure)
            raise MigrationError(
                f"{settings.file} line {failure.line}: {failed.error}",
                hint=_failure_hint(failure.exc, FileMode.TRANSACTION),
                file=settings.file,
                line=failure.line,
                sqlstate=failure.exc.sqlstate,
            ) from None
    log.info("rolled back %s with %s", ", ".join(e.file for e in undone) or "nothing", path.name)
    return RollbackResult(
        file=settings.file,
        sha256=digest,
        rolled_back=[e.file for e in undone],
        entry=entry,
        duration_s=time.perf_counter() - clock,
    )
