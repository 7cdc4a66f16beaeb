"""Clone provisioning: pg_dump/pg_restore of a real database, anonymized in one transaction."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime

import psycopg
import pytest
from conftest import target_for

from harness.anonymize import load_rules
from harness.cli import main
from harness.clone import CloneError, _libpq_args, client_binary
from harness.errors import ConfigError, SafetyError, TargetError
from harness.migrate import MigrateSettings, migrate
from harness.provision import ProvisionSettings, provision, read_manifest

ANCHOR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

CATALOG = """
SELECT 'column', c.relname || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
   AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'index', indexrelid::regclass::text, pg_get_indexdef(indexrelid)
  FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class
                                   WHERE relnamespace = 'public'::regnamespace)
"""

COUNTS = """
SELECT 'restaurants', count(*) FROM restaurants UNION ALL
SELECT 'dining_tables', count(*) FROM dining_tables UNION ALL
SELECT 'table_inventory', count(*) FROM table_inventory UNION ALL
SELECT 'booking_slots', count(*) FROM booking_slots UNION ALL
SELECT 'customers', count(*) FROM customers UNION ALL
SELECT 'bookings', count(*) FROM bookings UNION ALL
SELECT 'allocations', count(*) FROM allocations UNION ALL
SELECT 'table_hold_windows', count(*) FROM table_hold_windows
"""


def _catalog(url: str) -> set[tuple[str, str, str]]:
    with psycopg.connect(url) as conn:
        return set(conn.execute(CATALOG).fetchall())


def _counts(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute(COUNTS).fetchall())


@pytest.fixture
def source(baseline_db: str) -> str:
    """A database with a small synthetic snapshot to clone from."""
    provision(
        target_for(baseline_db),
        ProvisionSettings(seed=21, anchor=ANCHOR, yes_destroy_target_data=True),
    )
    return baseline_db


@pytest.fixture
def marked_target(fresh_db: str) -> str:
    """A target database holding one table and row that a refused clone must leave alone."""
    with psycopg.connect(fresh_db) as conn:
        conn.execute("CREATE TABLE keep_me (note text)")
        conn.execute("INSERT INTO keep_me VALUES ('untouched')")
    return fresh_db


def _untouched(url: str) -> bool:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT note FROM keep_me").fetchall()
        no_app = conn.execute("SELECT to_regclass('public.customers')").fetchone() == (None,)
    return rows == [("untouched",)] and no_app


def _settings(**kw) -> ProvisionSettings:
    kw.setdefault("yes_destroy_target_data", True)
    return ProvisionSettings(**kw)


def test_clone_copies_schema_and_rows_and_leaves_no_personal_data(source, marked_target):
    with psycopg.connect(source) as conn:
        names, emails, phones = (
            {r[0] for r in conn.execute(f"SELECT {col} FROM customers WHERE {col} IS NOT NULL")}
            for col in ("full_name", "email", "phone")
        )
        notes = {r[0] for r in conn.execute("SELECT notes FROM bookings WHERE notes IS NOT NULL")}
        bookings_sum = conn.execute(
            "SELECT md5(string_agg((b.*)::text, '|' ORDER BY id)) FROM"
            " (SELECT id, restaurant_id, customer_id, party_size, status, starts_at"
            "  FROM bookings) b"
        ).fetchone()
    assert emails and phones and notes

    result = provision(target_for(marked_target), _settings(source_url=source))

    assert _catalog(marked_target) == _catalog(source)
    assert _counts(marked_target) == _counts(source)
    assert result.kind == "clone"
    assert result.anonymization["survivors"] == 0
    assert result.anonymization["values_checked"] >= len(emails) + len(phones)
    with psycopg.connect(marked_target) as conn:
        left = conn.execute(
            "SELECT count(*) FROM customers WHERE full_name = ANY(%s) OR email = ANY(%s)"
            " OR phone = ANY(%s)",
            (list(names), list(emails), list(phones)),
        ).fetchone()[0]
        assert left == 0
        assert conn.execute("SELECT count(notes) FROM bookings").fetchone() == (0,)
        total, distinct, with_email = conn.execute(
            "SELECT count(*), count(DISTINCT email), count(email) FROM customers"
        ).fetchone()
        assert distinct == with_email == len(emails)
        # What is not personal is kept as it was.
        assert (
            conn.execute(
                "SELECT md5(string_agg((b.*)::text, '|' ORDER BY id)) FROM"
                " (SELECT id, restaurant_id, customer_id, party_size, status, starts_at"
                "  FROM bookings) b"
            ).fetchone()
            == bookings_sum
        )
        assert conn.execute("SELECT to_regclass('public.keep_me')").fetchone() == (None,)
    manifest = read_manifest(target_for(marked_target))
    assert manifest["kind"] == "clone" and manifest["anonymization"]["survivors"] == 0
    assert manifest["rows"]["customers"] == total

    # The clone carries the source's dirt: 001 quarantines what provision planted.
    source_dirt = read_manifest(target_for(source))["dirt"]
    migrate(target_for(marked_target), MigrateSettings(to="002", include_baseline=False))
    with psycopg.connect(marked_target) as conn:
        quarantined = dict(
            conn.execute("SELECT reason, count(*) FROM harness.quarantine GROUP BY reason")
        )
    assert quarantined == {k: v for k, v in source_dirt.items() if v}


def test_clone_from_a_dump_file(source, marked_target, tmp_path):
    dump = tmp_path / "source.dump"
    conninfo, env = _libpq_args(source, 10)
    with psycopg.connect(source) as conn:
        version = conn.info.server_version
    subprocess.run(
        [str(client_binary("pg_dump", version)), "-Fc", "-f", str(dump), "-d", conninfo],
        env=env,
        check=True,
    )
    result = provision(target_for(marked_target), _settings(from_dump=dump))
    assert _counts(marked_target) == _counts(source)
    assert result.anonymization["survivors"] == 0
    with psycopg.connect(marked_target) as conn:
        assert conn.execute(
            "SELECT count(*) FROM customers WHERE email NOT LIKE '%@example.invalid'"
        ).fetchone() == (0,)


def test_clone_into_the_source_itself_is_refused(source):
    before = _counts(source)
    with pytest.raises(SafetyError, match="into itself"):
        provision(target_for(source), _settings(source_url=source))
    assert _counts(source) == before


def test_clone_into_url_target_without_confirmation_is_refused(source, marked_target):
    with pytest.raises(SafetyError, match="keep_me 1 rows"):
        provision(
            target_for(marked_target),
            ProvisionSettings(source_url=source, yes_destroy_target_data=False),
        )
    assert _untouched(marked_target)


def test_unreachable_source_is_a_clear_error(marked_target):
    with pytest.raises(TargetError, match="cannot connect"):
        provision(
            target_for(marked_target),
            _settings(source_url="postgresql://nobody:secret@127.0.0.1:1/nowhere"),
        )
    assert _untouched(marked_target)
    with pytest.raises(ConfigError, match="malformed source URL"):
        provision(target_for(marked_target), _settings(source_url="postgresql://x@h/db?bogus=1"))
    assert _untouched(marked_target)


def test_rules_naming_a_missing_column_are_refused_before_any_change(
    source, marked_target, tmp_path
):
    rules = tmp_path / "rules.toml"
    rules.write_text(
        '[[rule]]\ntable = "customers"\ncolumn = "emial"\nstrategy = "fake_email"\n'
        '[[rule]]\ntable = "guests"\ncolumn = "name"\nstrategy = "null"\n'
    )
    with pytest.raises(ConfigError) as err:
        provision(target_for(marked_target), _settings(source_url=source, rules_path=rules))
    assert "public.customers.emial: no such column" in str(err.value)
    assert "public.guests.name: no such table" in str(err.value)
    assert _untouched(marked_target)


def test_rules_not_fitting_a_dump_roll_the_whole_restore_back(source, marked_target, tmp_path):
    dump = tmp_path / "source.dump"
    conninfo, env = _libpq_args(source, 10)
    with psycopg.connect(source) as conn:
        version = conn.info.server_version
    subprocess.run(
        [str(client_binary("pg_dump", version)), "-Fc", "-f", str(dump), "-d", conninfo],
        env=env,
        check=True,
    )
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\ntable = "customers"\ncolumn = "full_name"\nstrategy = "null"\n')
    with pytest.raises(CloneError, match="NOT NULL column"):
        provision(target_for(marked_target), _settings(from_dump=dump, rules_path=rules))
    assert _untouched(marked_target)


def test_rules_files_are_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\ntable = "customers"\ncolumn = "email"\nstrategy = "shred"\n')
    with pytest.raises(ConfigError, match="unknown strategy 'shred'"):
        load_rules(bad)
    bad.write_text("[[rule]]\ntable = 'customers'\n")
    with pytest.raises(ConfigError, match="missing column, strategy"):
        load_rules(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_rules(tmp_path / "nope.toml")
    defaults = {(r.table, r.column): r.strategy for r in load_rules()}
    assert defaults == {
        ("customers", "full_name"): "fake_name",
        ("customers", "email"): "fake_email",
        ("customers", "phone"): "fake_phone",
        ("bookings", "notes"): "null",
    }


def test_cli_clone_says_no_source_value_survives(source, marked_target, capsys, tmp_path):
    status = main(
        [
            "provision",
            "--db-url",
            marked_target,
            "--from",
            source,
            "--yes-destroy-target-data",
            "--manifest",
            str(tmp_path / "manifest.json"),
        ],
        environ={},
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "0 survive in the target" in out
    assert (tmp_path / "manifest.json").exists()
