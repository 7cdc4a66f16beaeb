"""Synthetic snapshot provisioning, against a real PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import _new_db_name, create_database, drop_database, target_for
from psycopg import sql

from harness.cli import main
from harness.errors import ConfigError, SafetyError, TargetError
from harness.migrate import MigrateSettings, migrate
from harness.provision import (
    APP_TABLES,
    DIRT_KINDS,
    ProvisionSettings,
    dirt_rates_from,
    expected_quarantine,
    provision,
    read_manifest,
)

ANCHOR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)


def _settings(**kw) -> ProvisionSettings:
    kw.setdefault("yes_destroy_target_data", True)
    kw.setdefault("anchor", ANCHOR)
    return ProvisionSettings(**kw)


def _checksums(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return {
            table: conn.execute(
                sql.SQL("SELECT md5(string_agg(t::text, '|' ORDER BY t.id)) FROM {} AS t").format(
                    sql.Identifier(table)
                )
            ).fetchone()[0]
            for table in APP_TABLES
        }


def test_same_seed_same_rows_other_seed_other_rows(baseline_db, tmp_path):
    target = target_for(baseline_db)
    first = provision(target, _settings(seed=7, manifest_path=tmp_path / "m.json"))
    sums_a = _checksums(baseline_db)
    # Another number of loading sessions cuts the work differently: same rows.
    second = provision(target, _settings(seed=7, workers=1))
    assert _checksums(baseline_db) == sums_a
    assert first.rows == second.rows
    provision(target, _settings(seed=8))
    sums_c = _checksums(baseline_db)
    # Every table but the fixed-size ones differs with the seed.
    for table in ("dining_tables", "customers", "bookings", "allocations", "table_hold_windows"):
        assert sums_c[table] != sums_a[table], table


def test_dirt_is_quarantined_exactly_by_001_and_002_applies(baseline_db, tmp_path):
    target = target_for(baseline_db)
    manifest_file = tmp_path / "manifest.json"
    result = provision(target, _settings(seed=3, scale=2, manifest_path=manifest_file))
    manifest = read_manifest(target)
    assert manifest == json.loads(manifest_file.read_text()) == result.manifest
    assert manifest["seed"] == 3 and manifest["scale"] == 2
    assert set(manifest["dirt"]) == set(DIRT_KINDS)
    assert all(n > 0 for n in manifest["dirt"].values()), manifest["dirt"]
    assert manifest["rows"] == result.rows
    assert result.rows_per_second > 0

    # The load skips FK triggers where it may: every FK must hold all the same.
    assert _fk_violations(baseline_db) == {}

    migrate(target, MigrateSettings(to="001", include_baseline=False))
    with psycopg.connect(baseline_db) as conn:
        quarantined = dict(
            conn.execute("SELECT reason, count(*) FROM harness.quarantine GROUP BY reason")
        )
    assert quarantined == expected_quarantine(manifest) == manifest["dirt"]

    # 002 applies; the FKs it adds NOT VALID validate too: nothing clean was moved.
    migrate(target, MigrateSettings(to="002", include_baseline=False))
    with psycopg.connect(baseline_db) as conn:
        for table, fk in (
            ("allocations", "allocations_booking_id_fkey"),
            ("table_inventory", "table_inventory_table_restaurant_fkey"),
        ):
            conn.execute(
                sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
                    sql.Identifier(table), sql.Identifier(fk)
                )
            )
        # Nothing below the planted ids was quarantined.
        remaining = dict(conn.execute("SELECT 'x', count(*) FROM harness.quarantine"))
        assert remaining["x"] == sum(manifest["dirt"].values())


def _fk_violations(url: str) -> dict[str, int]:
    """Rows breaking each FK of the public schema, checked by hand (not by the catalog)."""
    found = {}
    with psycopg.connect(url) as conn:
        fks = conn.execute(
            "SELECT conname, conrelid::regclass::text, confrelid::regclass::text,"
            " (SELECT array_agg(attname ORDER BY attnum) FROM pg_attribute"
            "   WHERE attrelid = conrelid AND attnum = ANY(conkey)),"
            " (SELECT array_agg(attname ORDER BY attnum) FROM pg_attribute"
            "   WHERE attrelid = confrelid AND attnum = ANY(confkey))"
            " FROM pg_constraint WHERE contype = 'f' AND connamespace = 'public'::regnamespace"
        ).fetchall()
        assert fks
        for name, child, parent, cols, pcols in fks:
            assert len(cols) == 1, name
            query = sql.SQL(
                "SELECT count(*) FROM {c} AS c WHERE c.{col} IS NOT NULL AND NOT EXISTS"
                " (SELECT 1 FROM {p} AS p WHERE p.{pcol} = c.{col})"
            ).format(
                c=sql.Identifier(child),
                p=sql.Identifier(parent),
                col=sql.Identifier(cols[0]),
                pcol=sql.Identifier(pcols[0]),
            )
            n = conn.execute(query).fetchone()[0]
            if n:
                found[name] = n
    return found


def test_snapshot_looks_like_a_booking_app(baseline_db):
    target = target_for(baseline_db)
    provision(target, _settings(seed=5, dirt_rates=dirt_rates_from({}, all_rate=0)))
    with psycopg.connect(baseline_db) as conn:

        def one(query: str):
            return conn.execute(query).fetchone()

        assert one("SELECT count(DISTINCT timezone) FROM restaurants")[0] >= 5
        assert one("SELECT min(capacity), max(capacity) FROM dining_tables") == (2, 10)
        # Every allocation is its booking's time on a table of its restaurant.
        assert one(
            "SELECT count(*) FROM allocations a JOIN bookings b ON b.id = a.booking_id"
            " JOIN dining_tables t ON t.id = a.table_id"
            " WHERE a.during <> tstzrange(b.starts_at, b.ends_at)"
            " OR t.restaurant_id <> b.restaurant_id OR b.party_size > t.capacity"
        ) == (0,)
        assert one(
            "SELECT count(*) FROM bookings b JOIN allocations a ON a.booking_id = b.id"
            " WHERE b.status = 'cancelled'"
        ) == (0,)
        assert one(
            "SELECT count(*) FROM bookings b WHERE b.status <> 'cancelled'"
            " AND NOT EXISTS (SELECT 1 FROM allocations a WHERE a.booking_id = b.id)"
        ) == (0,)
        # Each booking starts at its slot; slots are unique and every 15 minutes.
        assert one(
            "SELECT count(*) FROM bookings b JOIN booking_slots s ON s.id = b.slot_id"
            " WHERE s.starts_at <> b.starts_at OR s.restaurant_id <> b.restaurant_id"
        ) == (0,)
        assert one(
            "SELECT count(*) - count(DISTINCT (restaurant_id, starts_at)),"
            " count(*) FILTER (WHERE extract(minute FROM starts_at)::int % 15 <> 0"
            "   AND extract(minute FROM starts_at)::int % 15 <> 0)"
            " FROM booking_slots"
        ) == (0, 0)
        assert one("SELECT bool_and(covers_booked <= covers_total) FROM booking_slots") == (True,)
        # No two allocations (or holds) of one table overlap; keys are unique.
        assert one(
            "SELECT count(*) FROM allocations a JOIN allocations b ON a.table_id = b.table_id"
            " AND a.id < b.id AND a.during && b.during"
        ) == (0,)
        assert one(
            "SELECT count(*) - count(DISTINCT idempotency_key) FROM bookings"
            " WHERE idempotency_key IS NOT NULL"
        ) == (0,)
        # Statuses follow the clock: nothing completed in the future.
        anchor = ANCHOR
        assert one(
            f"SELECT count(*) FROM bookings WHERE status IN ('completed', 'no_show')"
            f" AND ends_at > '{anchor.isoformat()}'"
        ) == (0,)
        assert one(
            f"SELECT count(*) FROM bookings WHERE status IN ('confirmed', 'pending')"
            f" AND starts_at <= '{anchor.isoformat()}'"
        ) == (0,)
        # Bookings in the past and the future; the future is sparse enough for
        # new bookings to find free tables.
        past, future = one(
            f"SELECT count(*) FILTER (WHERE lower(during) < '{anchor.isoformat()}'),"
            f" count(*) FILTER (WHERE lower(during) >= '{anchor.isoformat()}') FROM allocations"
        )
        assert past > 0 and future > 0
        (tables,) = one("SELECT count(*) FROM dining_tables")
        seatings_ahead = tables * 30 * 3
        assert future / seatings_ahead < 0.3
        # Live holds are unexpired for at least a day; nothing expired without dirt.
        assert one(
            "SELECT count(*) FROM table_hold_windows WHERE expires_at IS NULL"
            " OR expires_at < now() + interval '1 day'"
        ) == (0,)
        # Service hours only, with a lunch and a dinner peak: 12:15 and 17:45
        # (mid-service) are booked far more than 11:30 and 17:00.
        local = (
            "SELECT (b.starts_at AT TIME ZONE r.timezone)::time AS t FROM bookings b"
            " JOIN restaurants r ON r.id = b.restaurant_id"
        )
        assert one(
            f"SELECT count(*) FILTER (WHERE NOT (t BETWEEN '11:30' AND '13:00'"
            f" OR t BETWEEN '17:00' AND '21:45')) FROM ({local}) x"
        ) == (0,)
        peaks = one(
            f"SELECT count(*) FILTER (WHERE t = '12:15'), count(*) FILTER (WHERE t = '11:30'),"
            f" count(*) FILTER (WHERE t = '17:45'), count(*) FILTER (WHERE t = '17:00')"
            f" FROM ({local}) x"
        )
        assert peaks[0] > 2 * peaks[1] and peaks[2] > 2 * peaks[3], peaks
        # The identity sequences moved past the loaded ids.
        new_id = one("INSERT INTO customers (full_name) VALUES ('New Guest') RETURNING id")[0]
        assert new_id > one("SELECT max(id) FROM customers WHERE full_name <> 'New Guest'")[0]


def test_url_target_without_confirmation_is_refused_and_untouched(baseline_db):
    target = target_for(baseline_db)
    with psycopg.connect(baseline_db, autocommit=True) as conn:
        conn.execute("INSERT INTO restaurants (name) VALUES ('Keep Me')")
        conn.execute("ANALYZE restaurants")
    with pytest.raises(SafetyError) as err:
        provision(target, _settings(yes_destroy_target_data=False))
    message = str(err.value)
    assert "refusing" in message and "public.restaurants 1 rows" in message
    assert baseline_db.rsplit("/", 1)[-1].split("?")[0] in message
    with psycopg.connect(baseline_db) as conn:
        assert conn.execute("SELECT name FROM restaurants").fetchall() == [("Keep Me",)]
    assert read_manifest(target) is None


def test_production_looking_target_needs_a_second_flag(pg_server):
    name = _new_db_name("harness_prod")
    url = create_database(pg_server, name)
    try:
        target = target_for(url)
        with pytest.raises(SafetyError, match="looks like production"):
            provision(target, _settings())
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('public.bookings')").fetchone() == (None,)
        result = provision(target, _settings(allow_production=True))
        assert result.rows["bookings"] > 0
    finally:
        drop_database(pg_server, name)


def test_migrated_schema_is_refused_unless_reset(baseline_db):
    target = target_for(baseline_db)
    provision(target, _settings(seed=2))
    migrate(target, MigrateSettings(to="002", include_baseline=False))
    with pytest.raises(ConfigError, match="not the baseline"):
        provision(target, _settings(seed=2))
    result = provision(target, _settings(seed=2, reset_schema=True))
    with psycopg.connect(baseline_db) as conn:
        assert conn.execute("SELECT to_regclass('harness.quarantine')").fetchone() == (None,)
        assert (
            conn.execute("SELECT count(*) FROM bookings").fetchone()[0] == (result.rows["bookings"])
        )


def test_fresh_database_gets_the_baseline(fresh_db):
    result = provision(target_for(fresh_db), _settings(seed=4))
    assert result.rows["allocations"] > 5000


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="unknown dirt kind"):
        dirt_rates_from({"spilled_coffee": 0.1})
    with pytest.raises(ConfigError, match="in the future"):
        provision(
            target=None,  # type: ignore[arg-type]  # refused before any connection
            settings=_settings(anchor=datetime.now(UTC) + timedelta(days=1)),
        )


def test_cli_provision_prints_rows_and_writes_the_manifest(baseline_db, tmp_path, capsys):
    manifest = tmp_path / "run" / "manifest.json"
    status = main(
        [
            "provision",
            "--db-url",
            baseline_db,
            "--seed",
            "11",
            "--dirt",
            "orphan_allocation=0.01",
            "--workers",
            "1",
            "--yes-destroy-target-data",
            "--manifest",
            str(manifest),
        ],
        environ={},
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "rows/s" in out and "orphan_allocation=" in out
    data = json.loads(manifest.read_text())
    assert data["seed"] == 11 and data["workers"] == 1
    dirt = data["dirt"]
    clean = data["rows"]["allocations"] - dirt["orphan_allocation"] - dirt["overlapping_allocation"]
    assert dirt["orphan_allocation"] == round(0.01 * clean)


def test_cli_provision_refuses_url_target_without_flag(baseline_db, capsys):
    status = main(["provision", "--db-url", baseline_db], environ={})
    err = capsys.readouterr().err
    assert status == 2
    assert "refusing provisioning" in err and "--yes-destroy-target-data" in err


def _secondary_objects(url: str) -> set[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        return set(
            conn.execute(
                "SELECT conrelid::regclass::text, conname FROM pg_constraint"
                " WHERE connamespace = 'public'::regnamespace"
                " UNION SELECT indrelid::regclass::text, indexrelid::regclass::text"
                " FROM pg_index WHERE indrelid IN"
                " (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)"
            )
        )


def test_a_failed_load_leaves_empty_tables_with_their_indexes(baseline_db):
    before = _secondary_objects(baseline_db)
    assert any(name == "customers_email_key" for _, name in before)

    def explode(step: str, done: int, total: int) -> None:
        if step == "customers":
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError, match="power cut"):
        provision(target_for(baseline_db), _settings(scale=2), progress=explode)
    assert _secondary_objects(baseline_db) == before
    with psycopg.connect(baseline_db) as conn:
        assert conn.execute("SELECT count(*) FROM bookings").fetchone() == (0,)
    assert read_manifest(target_for(baseline_db)) is None


def test_an_interrupted_load_is_repaired_by_the_next_run(baseline_db):
    from harness.provision import _drop_secondary

    before = _secondary_objects(baseline_db)
    with psycopg.connect(baseline_db) as conn:  # what a killed run leaves behind
        _drop_secondary(conn)
        conn.commit()
    assert _secondary_objects(baseline_db) < before
    provision(target_for(baseline_db), _settings())
    assert _secondary_objects(baseline_db) == before
    with psycopg.connect(baseline_db) as conn:
        assert conn.execute("SELECT to_regclass('harness.provision_deferred')").fetchone() == (
            None,
        )


def test_without_superuser_rights_fks_are_dropped_and_validated_again(pg_server, fresh_db):
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    role = "harness_" + fresh_db.rsplit("/", 1)[-1].split("?")[0][-12:]
    dbname = conninfo_to_dict(fresh_db)["dbname"]
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(dbname), sql.Identifier(role)
            )
        )
    with psycopg.connect(fresh_db, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(role)))
    try:
        params = conninfo_to_dict(fresh_db)
        params.update(user=role, password="")
        url = make_conninfo("", **params)
        with psycopg.connect(url) as conn:
            from harness.provision import can_skip_fk_checks

            assert not can_skip_fk_checks(conn)
        provision(target_for(url), _settings(seed=9))
        assert _fk_violations(fresh_db) == {}
        with psycopg.connect(fresh_db) as conn:
            fks = conn.execute(
                "SELECT count(*) FILTER (WHERE convalidated), count(*) FROM pg_constraint"
                " WHERE contype = 'f' AND connamespace = 'public'::regnamespace"
            ).fetchone()
        assert fks[0] == fks[1] == 10
    finally:
        with psycopg.connect(fresh_db, autocommit=True) as conn:
            conn.execute(
                sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(role))
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(sql.Identifier(dbname))
            )
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_behind_a_transaction_pooler_no_session_settings_are_used(baseline_db):
    import dataclasses

    pooled = dataclasses.replace(target_for(baseline_db), pooled=True)
    result = provision(pooled, _settings(seed=10))
    assert result.rows["allocations"] > 0
    assert _fk_violations(baseline_db) == {}


def test_tables_in_use_are_a_clear_error_and_stay_untouched(baseline_db):
    target = target_for(baseline_db)
    provision(target, _settings(seed=12))
    before = _checksums(baseline_db)
    with psycopg.connect(baseline_db) as other:  # a load test that never stops
        other.execute("SELECT count(*) FROM bookings")
        with pytest.raises(TargetError, match="in use by other sessions"):
            provision(target, _settings(seed=13, lock_timeout="200ms"))
        other.rollback()
    assert _checksums(baseline_db) == before
    assert read_manifest(target)["seed"] == 12
