"""The migration files themselves, on a real server: quarantine, constraints, rollback."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from psycopg import errors as pg_errors

from harness.migrate import MigrateSettings, RollbackSettings, migrate, rollback, split_statements
from harness.validate import (
    EXPECTED_OBJECTS,
    ValidateSettings,
    catalog_snapshot,
    count_invariants,
    diff_catalogs,
    quarantine_counts,
    validate,
)

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"

# Dirt planted by hand below, one row per kind unless said otherwise.
PLANTED = {
    "null_party_size": 2,
    "duplicate_idempotency_key": 1,
    "booking_quarantined": 1,  # the allocation of the duplicate-key booking
    "orphan_allocation": 1,
    "overlapping_allocation": 2,
    "expired_hold": 1,
    "null_hold_expiry": 1,
    "overlapping_hold": 1,
    "inventory_table_other_restaurant": 1,
    "duplicate_slot": 1,
}


def plant_dirty_snapshot(conn: psycopg.Connection) -> None:
    """A tiny snapshot with every kind of dirt 001 must quarantine."""
    conn.execute(
        """
        INSERT INTO restaurants (id, name, timezone) VALUES
            (1, 'North', 'Europe/Paris'), (2, 'South', 'America/New_York');
        INSERT INTO dining_tables (id, restaurant_id, label, capacity) VALUES
            (10, 1, 'T1', 4), (11, 1, 'T2', 2), (20, 2, 'S1', 6);
        INSERT INTO table_inventory (restaurant_id, table_id, service_date, opens_at, closes_at)
        VALUES (1, 10, '2030-01-01', '2030-01-01 11:00Z', '2030-01-01 23:00Z'),
               (2, 10, '2030-01-01', '2030-01-01 11:00Z', '2030-01-01 23:00Z');
        INSERT INTO booking_slots (id, restaurant_id, starts_at, covers_total) VALUES
            (100, 1, '2030-01-01 19:00Z', 40), (101, 1, '2030-01-01 19:00Z', 40);
        INSERT INTO customers (id, full_name, email) VALUES (1, 'Ada', 'ada@example.test');
        INSERT INTO bookings (id, restaurant_id, customer_id, slot_id, party_size, status,
                              idempotency_key, starts_at, ends_at) VALUES
            (1, 1, 1, 101, 2, 'confirmed', 'k1', '2030-01-01 19:00Z', '2030-01-01 21:00Z'),
            (2, 1, 1, 100, 2, 'confirmed', 'k2', '2030-01-01 19:00Z', '2030-01-01 21:00Z'),
            (3, 1, 1, 100, NULL, 'pending', 'k3', '2030-01-01 19:00Z', '2030-01-01 21:00Z'),
            (4, 1, 1, 100, NULL, 'pending', NULL, '2030-01-01 19:00Z', '2030-01-01 21:00Z'),
            (5, 1, 1, 100, 3, 'confirmed', 'k1', '2030-01-01 19:00Z', '2030-01-01 21:00Z');
        INSERT INTO allocations (id, booking_id, table_id, during) VALUES
            (1, 1, 10, '[2030-01-01 19:00Z, 2030-01-01 21:00Z)'),
            (2, 2, 10, '[2030-01-01 20:00Z, 2030-01-01 22:00Z)'),
            (3, 2, 10, '[2030-01-01 19:30Z, 2030-01-01 20:30Z)'),
            (4, 5, 11, '[2030-01-01 19:00Z, 2030-01-01 21:00Z)'),
            (5, 999, 11, '[2030-01-02 19:00Z, 2030-01-02 21:00Z)'),
            (6, 1, 11, '[2030-01-01 21:00Z, 2030-01-01 23:00Z)');
        INSERT INTO table_hold_windows (id, table_id, during, expires_at) VALUES
            (1, 20, '[2030-01-01 19:00Z, 2030-01-01 21:00Z)', now() + interval '1 day'),
            (2, 20, '[2030-01-01 20:00Z, 2030-01-01 22:00Z)', now() + interval '1 day'),
            (3, 20, '[2030-01-01 18:00Z, 2030-01-01 23:00Z)', now() - interval '1 minute'),
            (4, 11, '[2030-01-03 19:00Z, 2030-01-03 21:00Z)', NULL);
        """
    )
    for table in (
        "restaurants",
        "dining_tables",
        "table_inventory",
        "booking_slots",
        "customers",
        "bookings",
        "allocations",
        "table_hold_windows",
    ):
        conn.execute("SELECT setval(pg_get_serial_sequence(%s, 'id'), 1000)", (table,))


def apply_all(target, sql_dir: Path = SQL_DIR, to: str | None = None):
    return migrate(target, MigrateSettings(sql_dir=sql_dir, to=to))


def test_dirt_is_quarantined_exactly_and_then_002_applies(baseline_target):
    with baseline_target.connect(autocommit=True) as conn:
        plant_dirty_snapshot(conn)
        before = count_invariants(conn)
    assert before.overlapping_allocations == 2  # 2 and 3 overlap 1
    assert before.overlapping_holds == 2  # 1 and 2 overlap 3 (sorted by start)

    apply_all(baseline_target)

    with baseline_target.connect() as conn:
        assert quarantine_counts(conn) == dict(sorted(PLANTED.items()))
        rows = conn.execute(
            "SELECT source_table, source_id, reason FROM harness.quarantine ORDER BY id"
        ).fetchall()
        after = count_invariants(conn)
        # The first booking made keeps its table; the copy keeps its row data.
        assert ("allocations", 2, "overlapping_allocation") in rows
        assert ("allocations", 3, "overlapping_allocation") in rows
        assert ("bookings", 5, "duplicate_idempotency_key") in rows
        data = conn.execute(
            "SELECT row_data->>'email' IS NULL, row_data->>'idempotency_key'"
            " FROM harness.quarantine WHERE source_table = 'bookings' AND source_id = 5"
        ).fetchone()
        assert data == (True, "k1")
        # Bookings of the duplicate slot were moved to the slot that stayed.
        assert conn.execute("SELECT slot_id FROM bookings WHERE id = 1").fetchone() == (100,)
    assert after.double_bookings == 0 and after.orphan_allocations == 0

    result = validate(baseline_target, ValidateSettings())
    assert result.ok, [c for c in result.checks if not c.ok]
    assert {c.name for c in result.checks} == {o.name for o in EXPECTED_OBJECTS}


def test_every_file_is_idempotent_when_run_again_by_hand(baseline_target):
    with baseline_target.connect(autocommit=True) as conn:
        plant_dirty_snapshot(conn)
    apply_all(baseline_target)
    with baseline_target.connect(autocommit=True) as conn:
        first = catalog_snapshot(conn)
        quarantined = quarantine_counts(conn)
        for name in ("000_baseline.sql", "001_blockers.sql", "002_integrity.sql"):
            with conn.transaction():
                conn.execute((SQL_DIR / name).read_text())
        for name in ("003_index_triggers.sql", "004_backfill_staging.sql"):
            for statement in split_statements((SQL_DIR / name).read_text()):
                conn.execute(statement.text)
        assert diff_catalogs(first, catalog_snapshot(conn)) == []
        assert quarantine_counts(conn) == quarantined
        rollback_sql = (SQL_DIR / "rollback_001_003.sql").read_text()
        for _ in range(2):  # the rollback too: a second run raises nothing
            with conn.transaction():
                conn.execute(rollback_sql)


def test_overlapping_allocations_from_two_connections_one_gets_23p01(baseline_target):
    """The second writer waits for the first, then gets 23P01 when it commits.

    (If both insert at the very same instant each may wait for the other and
    one gets 40P01 instead: the load test shows that; here the order is fixed.)
    """
    with baseline_target.connect(autocommit=True) as conn:
        plant_dirty_snapshot(conn)
    apply_all(baseline_target)
    insert_booking = (
        "INSERT INTO bookings (id, restaurant_id, party_size, idempotency_key,"
        " starts_at, ends_at) VALUES (%s, 1, 2, %s, '2031-05-01 19:00Z', '2031-05-01 21:00Z')"
    )
    insert_allocation = (
        "INSERT INTO allocations (booking_id, table_id, during)"
        " VALUES (%s, 10, '[2031-05-01 19:00Z, 2031-05-01 21:00Z)')"
    )
    second_error: list[BaseException] = []

    with baseline_target.connect() as first, baseline_target.connect() as second:
        first.execute(insert_booking, (700, "race-700"))
        first.execute(insert_allocation, (700,))
        second.execute(insert_booking, (701, "race-701"))

        def second_writer() -> None:
            try:
                second.execute(insert_allocation, (701,))
            except psycopg.Error as exc:
                second_error.append(exc)

        waiter = threading.Thread(target=second_writer)
        waiter.start()
        # The second insert must be waiting on the first transaction.
        with baseline_target.connect(autocommit=True) as watcher:
            for _ in range(100):
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                ).fetchone()[0]
                if waiting:
                    break
                threading.Event().wait(0.05)
        assert waiting == 1
        first.commit()
        waiter.join(timeout=30)

    assert len(second_error) == 1
    exc = second_error[0]
    assert isinstance(exc, pg_errors.ExclusionViolation)
    assert exc.sqlstate == "23P01"
    assert exc.diag.constraint_name == "allocations_no_overlap"


def test_expired_hold_never_blocks_a_new_one(baseline_target):
    with baseline_target.connect(autocommit=True) as conn:
        plant_dirty_snapshot(conn)
    apply_all(baseline_target)
    with baseline_target.connect(autocommit=True) as conn:
        conn.execute(
            "INSERT INTO table_hold_windows (table_id, during, expires_at) VALUES"
            " (11, '[2031-01-01 19:00Z, 2031-01-01 21:00Z)', now() - interval '1 second')"
        )
        # Overlaps only the expired hold: the trigger deletes it, the insert succeeds.
        conn.execute(
            "INSERT INTO table_hold_windows (table_id, during, expires_at) VALUES"
            " (11, '[2031-01-01 20:00Z, 2031-01-01 22:00Z)', now() + interval '10 minutes')"
        )
        with pytest.raises(pg_errors.ExclusionViolation):
            conn.execute(
                "INSERT INTO table_hold_windows (table_id, during, expires_at) VALUES"
                " (11, '[2031-01-01 21:00Z, 2031-01-01 23:00Z)', now() + interval '10 minutes')"
            )
        assert conn.execute(
            "SELECT count(*) FROM table_hold_windows WHERE table_id = 11"
            " AND during && '[2031-01-01 00:00Z, 2031-01-02 00:00Z)'"
        ).fetchone() == (1,)


def test_rollback_returns_the_catalog_to_the_baseline_object_by_object(baseline_target):
    with baseline_target.connect() as conn:
        baseline_catalog = catalog_snapshot(conn)
    apply_all(baseline_target)
    with baseline_target.connect() as conn:
        migrated = catalog_snapshot(conn)
    assert diff_catalogs(baseline_catalog, migrated)  # 001-004 did change it

    rollback(baseline_target, RollbackSettings(sql_dir=SQL_DIR))
    with baseline_target.connect() as conn:
        assert diff_catalogs(baseline_catalog, catalog_snapshot(conn)) == []

    apply_all(baseline_target)
    with baseline_target.connect() as conn:
        assert diff_catalogs(migrated, catalog_snapshot(conn)) == []
    assert validate(baseline_target, ValidateSettings()).ok


def test_validate_reports_missing_objects_on_the_baseline_and_validates_fks(baseline_target):
    with baseline_target.connect(autocommit=True) as conn:
        plant_dirty_snapshot(conn)
    result = validate(baseline_target, ValidateSettings())
    assert not result.ok
    missing = {c.name for c in result.checks if not c.present}
    assert "allocations_no_overlap" in missing and "booking_slots_available_idx" in missing
    assert result.integrity["null_party_size"] == 2
    assert result.invariants.orphan_allocations == 1
    assert result.quarantine == {}

    apply_all(baseline_target)
    fk = next(
        c
        for c in validate(baseline_target, ValidateSettings()).checks
        if c.name == "table_inventory_table_restaurant_fkey"
    )
    assert fk.ok and fk.validated is False
    result = validate(baseline_target, ValidateSettings(validate_fks=True))
    assert result.validated_fks == ["table_inventory_table_restaurant_fkey"]
    fk = next(c for c in result.checks if c.name == "table_inventory_table_restaurant_fkey")
    assert fk.validated is True
