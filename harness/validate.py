"""Validate stage: the runbook's checks, as code.

Three kinds of check, all read-only unless ``validate_fks`` is set:

- **Objects**: every constraint, index, trigger, NOT NULL and column that
  001..004 promise (docs/schema.md) is in the catalog, on the right table, of
  the right kind, and whether it is validated (``pg_constraint.convalidated``).
  A NOT VALID foreign key is present and passes, with a note; ``validate_fks``
  runs ``VALIDATE CONSTRAINT`` on those.
- **Integrity** queries that rewrite no table: NOT NULL candidates, orphans,
  duplicate keys, invalid values.
- **Invariants**: no two allocations, and no two holds, of one table overlap.
  :func:`count_invariants` is shared with the load stage, which records the
  same counts after each load phase.

The catalog snapshot (:func:`catalog_snapshot`, :func:`diff_catalogs`) is what
the rollback drill compares object by object.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from harness.errors import HarnessError
from harness.outcomes import Outcome, classify
from harness.target import Target

log = logging.getLogger(__name__)

APP_SCHEMA = "public"


@dataclass(frozen=True)
class ExpectedObject:
    name: str
    kind: str  # exclusion | foreign_key | unique | check | not_null | index | trigger | column
    table: str
    column: str | None = None


# What 001..004 promise; docs/schema.md is the prose version of this list.
EXPECTED_OBJECTS: tuple[ExpectedObject, ...] = (
    ExpectedObject("allocations_no_overlap", "exclusion", "allocations"),
    ExpectedObject("table_hold_windows_no_overlap", "exclusion", "table_hold_windows"),
    ExpectedObject("table_inventory_table_restaurant_fkey", "foreign_key", "table_inventory"),
    ExpectedObject("allocations_booking_id_fkey", "foreign_key", "allocations"),
    ExpectedObject("dining_tables_id_restaurant_key", "unique", "dining_tables"),
    ExpectedObject("bookings_idempotency_key_key", "unique", "bookings"),
    ExpectedObject("booking_slots_restaurant_starts_key", "unique", "booking_slots"),
    ExpectedObject("bookings_party_size_check", "check", "bookings"),
    ExpectedObject("bookings_status_check", "check", "bookings"),
    ExpectedObject("allocations_during_check", "check", "allocations"),
    ExpectedObject("table_hold_windows_during_check", "check", "table_hold_windows"),
    ExpectedObject("bookings.party_size NOT NULL", "not_null", "bookings", "party_size"),
    ExpectedObject(
        "table_hold_windows.expires_at NOT NULL", "not_null", "table_hold_windows", "expires_at"
    ),
    ExpectedObject("allocations.restaurant_id", "column", "allocations", "restaurant_id"),
    ExpectedObject("booking_slots_available_idx", "index", "booking_slots"),
    ExpectedObject("bookings_customer_idx", "index", "bookings"),
    ExpectedObject("table_hold_windows_expires_idx", "index", "table_hold_windows"),
    ExpectedObject("allocations_restaurant_idx", "index", "allocations"),
    ExpectedObject("bookings_set_updated_at", "trigger", "bookings"),
    ExpectedObject("allocations_set_updated_at", "trigger", "allocations"),
    ExpectedObject("booking_slots_set_updated_at", "trigger", "booking_slots"),
    ExpectedObject("table_hold_windows_set_updated_at", "trigger", "table_hold_windows"),
    ExpectedObject("table_hold_windows_purge_expired", "trigger", "table_hold_windows"),
    ExpectedObject("allocations_set_restaurant_id", "trigger", "allocations"),
)

_CONTYPE = {"exclusion": "x", "foreign_key": "f", "unique": "u", "check": "c"}


@dataclass(frozen=True, kw_only=True)
class ValidateSettings:
    validate_fks: bool = False
    lock_timeout: str = "5s"


@dataclass(frozen=True)
class CheckResult:
    name: str
    kind: str
    table: str
    present: bool
    validated: bool | None
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class InvariantCounts:
    """Rows breaking the no-double-booking invariants (all zero when it holds).

    ``overlapping_allocations``: allocations that overlap an allocation of the
    same table that starts no later (so k mutually overlapping rows count k-1).
    """

    overlapping_allocations: int
    overlapping_holds: int
    orphan_allocations: int
    inventory_other_restaurant: int

    @property
    def double_bookings(self) -> int:
        return self.overlapping_allocations + self.overlapping_holds

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ValidationResult:
    checks: list[CheckResult]
    integrity: dict[str, int]
    invariants: InvariantCounts
    quarantine: dict[str, int]
    validated_fks: list[str] = field(default_factory=list)

    @property
    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]

    @property
    def ok(self) -> bool:
        return not self.failed_checks and self.invariants.double_bookings == 0

    def as_dict(self) -> dict[str, Any]:
        """The shape written to validation.json."""
        return {
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "integrity": self.integrity,
            "invariants": self.invariants.as_dict(),
            "quarantine": self.quarantine,
            "validated_fks": self.validated_fks,
        }


# --------------------------------------------------------------------------
# Invariants and integrity queries (read-only)

# A row overlaps an earlier-starting row of the same table exactly when the
# largest upper bound among the rows sorted before it lies beyond its own
# lower bound ([) ranges, as the app writes them). One sort per table instead
# of a self-join: this runs on the lax baseline too, where no GiST index exists.
_OVERLAPS = """
SELECT count(*) FROM (
    SELECT lower(during) AS lo,
           max(upper(during)) OVER (
               PARTITION BY table_id ORDER BY lower(during), id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS prev_hi
      FROM {table}
     WHERE NOT isempty(during)
) AS ordered
WHERE prev_hi > lo
"""

_ORPHAN_ALLOCATIONS = """
SELECT count(*) FROM allocations AS a
 WHERE NOT EXISTS (SELECT 1 FROM bookings AS b WHERE b.id = a.booking_id)
"""

_INVENTORY_OTHER_RESTAURANT = """
SELECT count(*) FROM table_inventory AS ti
  JOIN dining_tables AS dt ON dt.id = ti.table_id
 WHERE dt.restaurant_id <> ti.restaurant_id
"""

_INTEGRITY_QUERIES: dict[str, str] = {
    "null_party_size": "SELECT count(*) FROM bookings WHERE party_size IS NULL",
    "invalid_party_size": ("SELECT count(*) FROM bookings WHERE party_size NOT BETWEEN 1 AND 100"),
    "invalid_status": (
        "SELECT count(*) FROM bookings WHERE status NOT IN"
        " ('pending', 'confirmed', 'seated', 'completed', 'cancelled', 'no_show')"
    ),
    "duplicate_idempotency_keys": (
        "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM bookings"
        " WHERE idempotency_key IS NOT NULL GROUP BY idempotency_key HAVING count(*) > 1) d"
    ),
    "null_hold_expiry": "SELECT count(*) FROM table_hold_windows WHERE expires_at IS NULL",
    "expired_holds": "SELECT count(*) FROM table_hold_windows WHERE expires_at <= now()",
}


def count_invariants(conn: psycopg.Connection) -> InvariantCounts:
    """Count double bookings and orphans; reads only (safe during load)."""

    def scalar(query: str | sql.Composed) -> int:
        return int(conn.execute(query).fetchone()[0])

    def overlaps(table: str) -> int:
        return scalar(sql.SQL(_OVERLAPS).format(table=sql.Identifier(table)))

    return InvariantCounts(
        overlapping_allocations=overlaps("allocations"),
        overlapping_holds=overlaps("table_hold_windows"),
        orphan_allocations=scalar(_ORPHAN_ALLOCATIONS),
        inventory_other_restaurant=scalar(_INVENTORY_OTHER_RESTAURANT),
    )


def count_integrity(conn: psycopg.Connection) -> dict[str, int]:
    """NOT NULL candidates, bad values, duplicate keys: rows that would block 002."""
    return {
        name: int(conn.execute(query).fetchone()[0]) for name, query in _INTEGRITY_QUERIES.items()
    }


def quarantine_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Rows 001 quarantined, by reason ({} when 001 never ran)."""
    exists = conn.execute("SELECT to_regclass('harness.quarantine') IS NOT NULL").fetchone()[0]
    if not exists:
        return {}
    rows = conn.execute(
        "SELECT reason, count(*) FROM harness.quarantine GROUP BY reason ORDER BY reason"
    ).fetchall()
    return {reason: int(n) for reason, n in rows}


# --------------------------------------------------------------------------
# Catalog: expected objects, snapshots for the rollback drill


def check_objects(conn: psycopg.Connection) -> list[CheckResult]:
    """Look up every expected object in the catalog."""
    constraints = {
        name: (contype, table, validated)
        for name, contype, table, validated in conn.execute(
            """
            SELECT c.conname, c.contype::text, t.relname, c.convalidated
              FROM pg_constraint c
              JOIN pg_class t ON t.oid = c.conrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = %s
            """,
            (APP_SCHEMA,),
        )
    }
    indexes = {
        name: (table, valid)
        for name, table, valid in conn.execute(
            """
            SELECT i.relname, t.relname, x.indisvalid
              FROM pg_index x
              JOIN pg_class i ON i.oid = x.indexrelid
              JOIN pg_class t ON t.oid = x.indrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = %s
            """,
            (APP_SCHEMA,),
        )
    }
    triggers = {
        (name, table): enabled
        for name, table, enabled in conn.execute(
            """
            SELECT g.tgname, t.relname, g.tgenabled <> 'D'
              FROM pg_trigger g
              JOIN pg_class t ON t.oid = g.tgrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = %s AND NOT g.tgisinternal
            """,
            (APP_SCHEMA,),
        )
    }
    columns = {
        (table, column): notnull
        for table, column, notnull in conn.execute(
            """
            SELECT t.relname, a.attname, a.attnotnull
              FROM pg_attribute a
              JOIN pg_class t ON t.oid = a.attrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = %s AND t.relkind = 'r' AND a.attnum > 0
               AND NOT a.attisdropped
            """,
            (APP_SCHEMA,),
        )
    }
    return [_check_one(obj, constraints, indexes, triggers, columns) for obj in EXPECTED_OBJECTS]


def _check_one(
    obj: ExpectedObject,
    constraints: dict[str, tuple[str, str, bool]],
    indexes: dict[str, tuple[str, bool]],
    triggers: dict[tuple[str, str], bool],
    columns: dict[tuple[str, str], bool],
) -> CheckResult:
    def result(present: bool, validated: bool | None, ok: bool, detail: str) -> CheckResult:
        return CheckResult(obj.name, obj.kind, obj.table, present, validated, ok, detail)

    if obj.kind in _CONTYPE:
        found = constraints.get(obj.name)
        if found is None:
            return result(False, None, False, "missing")
        contype, table, validated = found
        if contype != _CONTYPE[obj.kind] or table != obj.table:
            return result(True, validated, False, f"found as type {contype} on {table}")
        if not validated:
            return result(True, False, True, "NOT VALID: new rows are checked, old rows not yet")
        return result(True, True, True, "validated")
    if obj.kind == "index":
        found_index = indexes.get(obj.name)
        if found_index is None:
            return result(False, None, False, "missing")
        table, valid = found_index
        if table != obj.table:
            return result(True, valid, False, f"on {table}")
        if not valid:
            return result(True, False, False, "INVALID (a failed concurrent build): rerun 003")
        return result(True, True, True, "valid")
    if obj.kind == "trigger":
        enabled = triggers.get((obj.name, obj.table))
        if enabled is None:
            return result(False, None, False, "missing")
        return result(True, None, enabled, "enabled" if enabled else "disabled")
    assert obj.column is not None
    notnull = columns.get((obj.table, obj.column))
    if notnull is None:
        return result(False, None, False, "column missing")
    if obj.kind == "not_null":
        return result(notnull, None, notnull, "NOT NULL" if notnull else "nullable")
    return result(True, None, True, "present")


def catalog_snapshot(conn: psycopg.Connection, schema: str = APP_SCHEMA) -> dict[str, list[str]]:
    """Every constraint, index, trigger, column and function of ``schema``, as text.

    Two snapshots are equal exactly when those objects and their definitions
    are; the rollback drill compares the baseline's with the rolled-back one.
    Functions that belong to an extension (btree_gist's) are left out.
    """
    queries = {
        "constraints": """
            SELECT t.relname || '.' || c.conname || ' ' || pg_get_constraintdef(c.oid)
                   || CASE WHEN c.convalidated THEN '' ELSE ' [not valid]' END
              FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s
        """,
        "indexes": """
            SELECT pg_get_indexdef(x.indexrelid)
              FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s
        """,
        "triggers": """
            SELECT pg_get_triggerdef(g.oid)
              FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
             WHERE n.nspname = %s AND NOT g.tgisinternal
        """,
        "columns": """
            SELECT t.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                   || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                   || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
              FROM pg_attribute a JOIN pg_class t ON t.oid = a.attrelid
              JOIN pg_namespace n ON n.oid = t.relnamespace
              LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE n.nspname = %s AND t.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
        """,
        "functions": """
            SELECT p.oid::regprocedure::text
              FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = %s
               AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                WHERE d.classid = 'pg_proc'::regclass
                                  AND d.objid = p.oid AND d.deptype = 'e')
        """,
    }
    return {
        kind: sorted(str(row[0]) for row in conn.execute(query, (schema,)))
        for kind, query in queries.items()
    }


def diff_catalogs(before: dict[str, list[str]], after: dict[str, list[str]]) -> list[str]:
    """Object-by-object differences, as lines: ``+ indexes: ...`` / ``- triggers: ...``."""
    lines: list[str] = []
    for kind in sorted(set(before) | set(after)):
        old, new = set(before.get(kind, [])), set(after.get(kind, []))
        lines += [f"- {kind}: {item}" for item in sorted(old - new)]
        lines += [f"+ {kind}: {item}" for item in sorted(new - old)]
    return lines


# --------------------------------------------------------------------------
# The stage


def validate(target: Target, settings: ValidateSettings) -> ValidationResult:
    """Run every check; with ``validate_fks``, first VALIDATE the NOT VALID FKs."""
    validated_fks: list[str] = []
    with target.connect(autocommit=True) as conn:
        _require_app_schema(conn, target)
        if settings.validate_fks:
            validated_fks = _validate_foreign_keys(conn, settings.lock_timeout)
        checks = check_objects(conn)
        integrity = count_integrity(conn)
        invariants = count_invariants(conn)
        quarantine = quarantine_counts(conn)
    return ValidationResult(
        checks=checks,
        integrity=integrity,
        invariants=invariants,
        quarantine=quarantine,
        validated_fks=validated_fks,
    )


def _require_app_schema(conn: psycopg.Connection, target: Target) -> None:
    if conn.execute("SELECT to_regclass('public.allocations') IS NULL").fetchone()[0]:
        raise HarnessError(
            f"{target.display} has no booking schema (table allocations is missing)",
            hint="run `harness migrate` (it applies 000_baseline.sql first) or `harness provision`",
        )


def _validate_foreign_keys(conn: psycopg.Connection, lock_timeout: str) -> list[str]:
    """VALIDATE every NOT VALID expected FK; return the names validated."""
    names = [o.name for o in EXPECTED_OBJECTS if o.kind == "foreign_key"]
    rows = conn.execute(
        """
        SELECT t.relname, c.conname
          FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
          JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE n.nspname = %s AND c.contype = 'f' AND NOT c.convalidated
           AND c.conname = ANY(%s)
        """,
        (APP_SCHEMA, names),
    ).fetchall()
    done: list[str] = []
    for table, name in rows:
        log.info("validating %s on %s", name, table)
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
                conn.execute(
                    sql.SQL("ALTER TABLE {}.{} VALIDATE CONSTRAINT {}").format(
                        sql.Identifier(APP_SCHEMA), sql.Identifier(table), sql.Identifier(name)
                    )
                )
        except psycopg.Error as exc:
            outcome = classify(exc)
            raise HarnessError(
                f"VALIDATE CONSTRAINT {name} on {table} failed with {outcome.outcome}"
                f" (SQLSTATE {outcome.sqlstate})",
                hint="rows violate it: see `harness validate` integrity counts"
                if outcome.outcome is Outcome.FOREIGN_KEY_VIOLATION
                else "retry when the table is less busy, or raise --lock-timeout",
            ) from None
        done.append(name)
    return done
