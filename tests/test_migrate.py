"""The migration runner on a real server: plan, ledger, failures, locks, rollback, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from pathlib import Path

import pytest
from conftest import SQL_DIR, target_for

from harness.cli import main
from harness.errors import ConfigError, MigrationError
from harness.migrate import (
    MigrateSettings,
    RollbackSettings,
    discover,
    migrate,
    read_ledger,
    rollback,
    split_statements,
)
from harness.validate import catalog_snapshot, diff_catalogs

REAL_FILES = sorted(p.name for p in SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))


def write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def snapshot(target) -> dict[str, list[str]]:
    with target.connect() as conn:
        return catalog_snapshot(conn)


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


# --------------------------------------------------------------------------
# Statement splitter (pure)


def test_splitter_respects_dollar_quotes_strings_and_comments():
    text = (
        "-- harness: no-transaction\n"
        "CREATE TABLE a (x text DEFAULT 'semi;colon', \"we;ird\" int);\n"
        "/* block ; /* nested ; */ still comment ; */\n"
        "DO $body$\n"
        "BEGIN\n"
        "  PERFORM $$ ; $$;\n"
        "END $body$;\n"
        "SELECT E'it\\'s; fine', 'it''s; fine', a$b FROM t;\n"
        "SELECT 1 -- trailing; comment\n"
        "  + 2;\n"
        "SELECT 'no semicolon at the end'"
    )
    statements = split_statements(text)
    assert [s.line for s in statements] == [2, 4, 8, 9, 11]
    assert statements[0].text.startswith("CREATE TABLE a") and statements[0].text.endswith(");")
    assert statements[1].text.endswith("END $body$;") and "PERFORM $$ ; $$;" in statements[1].text
    # PL/pgSQL counts lines from the opening dollar quote: it is on the DO line.
    assert statements[1].text[: statements[1].body_offset] == "DO $body$"
    assert statements[2].text == "SELECT E'it\\'s; fine', 'it''s; fine', a$b FROM t;"
    assert statements[3].text == "SELECT 1 -- trailing; comment\n  + 2;"
    assert statements[4].text == "SELECT 'no semicolon at the end'"
    assert split_statements("-- only a comment\n/* and another */\n") == []


def test_splitter_names_the_line_of_an_unterminated_quote():
    from harness.migrate import SplitError

    with pytest.raises(SplitError) as err:
        split_statements("SELECT 1;\n\nDO $$ BEGIN\nEND;\n")
    assert err.value.line == 3


# --------------------------------------------------------------------------
# The real files


def test_baseline_and_001_004_apply_and_a_second_run_is_a_noop(fresh_db):
    target = target_for(fresh_db)
    events = []
    result = migrate(target, MigrateSettings(sql_dir=SQL_DIR), on_event=events.append)

    assert [e.file for e in result.applied] == REAL_FILES
    assert [(e.kind, e.file) for e in events if e.kind != "start"] == [
        ("applied", name) for name in REAL_FILES
    ]
    ledger = read_ledger(target)
    assert [(e.file, e.outcome) for e in ledger] == [(name, "applied") for name in REAL_FILES]
    for entry in ledger:
        digest = hashlib.sha256((SQL_DIR / entry.file).read_bytes()).hexdigest()
        assert entry.sha256 == digest
        assert entry.error is None and entry.sqlstate is None
        assert entry.finished_at >= entry.started_at
        elapsed = (entry.finished_at - entry.started_at).total_seconds()
        assert 0 < entry.duration_s == pytest.approx(elapsed, abs=1e-5)
    modes = {e.file: e.mode for e in ledger}
    assert modes["002_integrity.sql"] == "transaction"
    assert modes["003_index_triggers.sql"] == modes["004_backfill_staging.sql"] == "no-transaction"

    catalog = snapshot(target)
    again = migrate(target, MigrateSettings(sql_dir=SQL_DIR))
    assert again.applied == [] and again.skipped == REAL_FILES
    assert len(read_ledger(target)) == len(REAL_FILES)
    assert diff_catalogs(catalog, snapshot(target)) == []


def test_to_stops_at_the_named_file_and_dry_run_touches_nothing(fresh_db):
    target = target_for(fresh_db)
    plan = migrate(target, MigrateSettings(sql_dir=SQL_DIR, dry_run=True))
    assert plan.dry_run and [(s.file, s.action) for s in plan.planned] == [
        (name, "apply") for name in REAL_FILES
    ]
    with target.connect() as conn:
        # Not even the ledger or its schema were created.
        assert conn.execute("SELECT to_regnamespace('harness')").fetchone() == (None,)
        assert conn.execute("SELECT to_regclass('public.allocations')").fetchone() == (None,)

    result = migrate(target, MigrateSettings(sql_dir=SQL_DIR, to="002"))
    assert [e.file for e in result.applied] == REAL_FILES[:3]
    with target.connect() as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE conname = 'allocations_no_overlap'"
        ).fetchone() == (1,)
        assert conn.execute(
            "SELECT to_regclass('public.booking_slots_available_idx')"
        ).fetchone() == (None,)

    before = (snapshot(target), read_ledger(target))
    plan = migrate(target, MigrateSettings(sql_dir=SQL_DIR, dry_run=True))
    assert [s.action for s in plan.planned] == ["skip"] * 3 + ["apply"] * 2
    assert (snapshot(target), read_ledger(target)) == before

    result = migrate(target, MigrateSettings(sql_dir=SQL_DIR, to="003_index_triggers.sql"))
    assert [e.file for e in result.applied] == ["003_index_triggers.sql"]
    with pytest.raises(ConfigError, match="--to 009"):
        migrate(target, MigrateSettings(sql_dir=SQL_DIR, to="009"))


def test_rollback_marks_001_to_004_rolled_back_and_migrate_applies_them_again(baseline_target):
    migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR))
    migrated = snapshot(baseline_target)

    dry = rollback(baseline_target, RollbackSettings(sql_dir=SQL_DIR, dry_run=True))
    assert dry.rolled_back == REAL_FILES[1:] and dry.entry is None
    assert diff_catalogs(migrated, snapshot(baseline_target)) == []

    result = rollback(baseline_target, RollbackSettings(sql_dir=SQL_DIR))
    assert result.rolled_back == REAL_FILES[1:]
    assert result.entry is not None and result.entry.file == "rollback_001_003.sql"
    state = {e.file: e.outcome for e in read_ledger(baseline_target)}
    assert state["000_baseline.sql"] == "applied"
    assert state["rollback_001_003.sql"] == "applied"
    assert all(state[name] == "rolled_back" for name in REAL_FILES[1:])
    assert diff_catalogs(migrated, snapshot(baseline_target))  # the objects are gone

    again = migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR))
    assert [e.file for e in again.applied] == REAL_FILES[1:]
    assert diff_catalogs(migrated, snapshot(baseline_target)) == []
    # A second rollback right after marks the re-applied files again.
    assert (
        rollback(baseline_target, RollbackSettings(sql_dir=SQL_DIR)).rolled_back == (REAL_FILES[1:])
    )


# --------------------------------------------------------------------------
# Failures


GOOD_001 = "CREATE TABLE widgets (id int PRIMARY KEY, name text);\n"
BROKEN_002 = (
    "-- 002: adds a column, then fails\n"
    "ALTER TABLE widgets ADD COLUMN colour text;\n"
    "CREATE INDEX widgets_name_idx ON widgets (name);\n"
    "\n"
    "SELECT id,\n"
    "       no_such_column\n"
    "  FROM widgets;\n"
)


def test_a_broken_file_fails_cleanly_naming_file_and_line(fresh_db, tmp_path):
    folder = write(tmp_path / "sql", {"001_widgets.sql": GOOD_001, "002_broken.sql": BROKEN_002})
    target = target_for(fresh_db)
    migrate(target, MigrateSettings(sql_dir=folder, to="001"))
    before = snapshot(target)

    with pytest.raises(MigrationError) as err:
        migrate(target, MigrateSettings(sql_dir=folder))
    error = err.value
    assert (error.file, error.line, error.sqlstate) == ("002_broken.sql", 6, "42703")
    assert str(error).startswith("002_broken.sql line 6: other (SQLSTATE 42703)")
    assert error.result.failed.outcome == "failed"
    assert [e.file for e in error.result.applied] == []

    # The database is as it was before the file: no column, no index.
    assert diff_catalogs(before, snapshot(target)) == []
    last = read_ledger(target)[-1]
    assert (last.file, last.outcome, last.sqlstate, last.error_line) == (
        "002_broken.sql",
        "failed",
        "42703",
        6,
    )
    assert "no_such_column" in last.error and last.duration_s >= 0

    # Fixed, it applies on the next run; the failure row stays as history.
    (folder / "002_broken.sql").write_text(BROKEN_002.replace("no_such_column", "name"))
    result = migrate(target, MigrateSettings(sql_dir=folder))
    assert [e.file for e in result.applied] == ["002_broken.sql"]
    assert [e.outcome for e in read_ledger(target)] == ["applied", "failed", "applied"]


def test_an_error_inside_a_do_block_names_the_line_in_the_file(fresh_db, tmp_path):
    folder = write(
        tmp_path / "sql",
        {
            "001_widgets.sql": GOOD_001,
            "002_do.sql": (
                "INSERT INTO widgets VALUES (1, 'a');\n"
                "DO $$\n"
                "BEGIN\n"
                "    PERFORM 1;\n"
                "    RAISE EXCEPTION 'no' USING ERRCODE = 'check_violation';\n"
                "END $$;\n"
            ),
        },
    )
    target = target_for(fresh_db)
    with pytest.raises(MigrationError) as err:
        migrate(target, MigrateSettings(sql_dir=folder))
    assert (err.value.file, err.value.line, err.value.sqlstate) == ("002_do.sql", 5, "23514")
    assert "check_violation" in str(err.value)
    with target.connect() as conn:
        assert conn.execute("SELECT count(*) FROM widgets").fetchone() == (0,)


def test_a_failed_concurrent_index_leaves_no_invalid_index_and_the_rerun_builds_it(
    fresh_db, tmp_path
):
    folder = write(
        tmp_path / "sql",
        {
            "001_widgets.sql": GOOD_001 + "INSERT INTO widgets VALUES (1, 'dup'), (2, 'dup');\n",
            "002_unique.sql": (
                "-- harness: no-transaction\n"
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS widgets_id_idx ON widgets (id);\n"
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS widgets_name_key\n"
                "    ON widgets (name);\n"
            ),
        },
    )
    target = target_for(fresh_db)
    with pytest.raises(MigrationError) as err:
        migrate(target, MigrateSettings(sql_dir=folder))
    assert (err.value.line, err.value.sqlstate) == (3, "23505")
    assert "rerun finishes it" in str(err.value)
    with target.connect() as conn:
        # The statement before it stays; the INVALID index is gone.
        assert conn.execute("SELECT to_regclass('widgets_id_idx')").fetchone()[0] is not None
        assert conn.execute("SELECT to_regclass('widgets_name_key')").fetchone() == (None,)
        conn.execute("DELETE FROM widgets WHERE id = 2")
        conn.commit()
    assert read_ledger(target)[-1].outcome == "failed"

    migrate(target, MigrateSettings(sql_dir=folder))
    with target.connect() as conn:
        assert conn.execute(
            "SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = 'widgets_name_key'::regclass"
        ).fetchone() == (True,)


def test_an_invalid_index_from_an_interrupted_build_is_dropped_before_the_rerun(fresh_db, tmp_path):
    folder = write(
        tmp_path / "sql",
        {
            "001_widgets.sql": GOOD_001,
            "002_index.sql": (
                "-- harness: no-transaction\n"
                'CREATE INDEX CONCURRENTLY IF NOT EXISTS "Widgets_Name" ON widgets (name);\n'
            ),
        },
    )
    target = target_for(fresh_db)
    migrate(target, MigrateSettings(sql_dir=folder, to="001"))
    with target.connect(autocommit=True) as conn:
        # What a killed CREATE INDEX CONCURRENTLY leaves behind.
        conn.execute('CREATE INDEX "Widgets_Name" ON widgets (name)')
        conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = '\"Widgets_Name\"'::regclass"
        )
    migrate(target, MigrateSettings(sql_dir=folder))
    with target.connect() as conn:
        assert conn.execute(
            "SELECT x.indisvalid FROM pg_index x WHERE x.indexrelid = '\"Widgets_Name\"'::regclass"
        ).fetchone() == (True,)


def test_a_file_changed_after_it_was_applied_is_refused_unless_forced(fresh_db, tmp_path):
    folder = write(tmp_path / "sql", {"001_widgets.sql": GOOD_001})
    target = target_for(fresh_db)
    migrate(target, MigrateSettings(sql_dir=folder))
    (folder / "001_widgets.sql").write_text(
        GOOD_001.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")
    )
    with pytest.raises(MigrationError, match="001_widgets.sql changed after it was applied"):
        migrate(target, MigrateSettings(sql_dir=folder))
    with pytest.raises(MigrationError, match="changed"):
        migrate(target, MigrateSettings(sql_dir=folder, dry_run=True))
    assert len(read_ledger(target)) == 1

    plan = migrate(target, MigrateSettings(sql_dir=folder, force=True, dry_run=True))
    assert [s.action for s in plan.planned] == ["reapply"]
    result = migrate(target, MigrateSettings(sql_dir=folder, force=True))
    new_sha = hashlib.sha256((folder / "001_widgets.sql").read_bytes()).hexdigest()
    assert [e.sha256 for e in result.applied] == [new_sha]
    assert migrate(target, MigrateSettings(sql_dir=folder)).skipped == ["001_widgets.sql"]


@pytest.mark.parametrize(
    ("names", "problem"),
    [
        (["001_a.sql", "003_c.sql"], "migration 002 is missing"),
        (["001_a.sql", "001_b.sql"], "share the number 001"),
        (["002_b.sql", "003_c.sql"], "start at 002"),
        (["001_a.sql", "2_b.sql"], "2_b.sql in .* is neither"),
        (["rollback_001_003.sql"], "no NNN_name.sql migration files"),
    ],
)
def test_bad_folder_layouts_are_refused(tmp_path, names, problem):
    folder = write(tmp_path / "sql", dict.fromkeys(names, "SELECT 1;\n"))
    with pytest.raises(ConfigError, match=problem):
        discover(folder)


def test_bad_layout_and_bad_timeout_are_refused_before_touching_the_database(fresh_db, tmp_path):
    target = target_for(fresh_db)
    gap = write(tmp_path / "gap", {"000_a.sql": GOOD_001, "002_c.sql": GOOD_001})
    with pytest.raises(ConfigError, match="001 is missing"):
        migrate(target, MigrateSettings(sql_dir=gap))
    good = write(tmp_path / "good", {"001_widgets.sql": GOOD_001})
    with pytest.raises(ConfigError, match="bad timeout"):
        migrate(target, MigrateSettings(sql_dir=good, lock_timeout="5 parsecs"))
    with target.connect() as conn:
        assert conn.execute("SELECT to_regnamespace('harness')").fetchone() == (None,)


def test_transaction_control_in_a_transactional_file_is_refused_before_anything_runs(
    fresh_db, tmp_path
):
    folder = write(
        tmp_path / "sql",
        {"001_widgets.sql": GOOD_001, "002_commit.sql": "SELECT 1;\n\ncommit;\n"},
    )
    target = target_for(fresh_db)
    with pytest.raises(ConfigError, match="002_commit.sql line 3: COMMIT"):
        migrate(target, MigrateSettings(sql_dir=folder))
    with target.connect() as conn:
        assert conn.execute("SELECT to_regclass('widgets')").fetchone() == (None,)


def test_concurrent_index_in_a_transactional_file_fails_with_a_hint(fresh_db, tmp_path):
    folder = write(
        tmp_path / "sql",
        {
            "001_widgets.sql": GOOD_001,
            "002_cic.sql": "CREATE INDEX CONCURRENTLY widgets_name_idx ON widgets (name);\n",
        },
    )
    target = target_for(fresh_db)
    with pytest.raises(MigrationError, match="harness: no-transaction") as err:
        migrate(target, MigrateSettings(sql_dir=folder))
    assert (err.value.file, err.value.line, err.value.sqlstate) == ("002_cic.sql", 1, "25001")


def test_a_transaction_pooler_target_runs_the_migrations(fresh_db):
    """Behind a pooler: no prepared statements, no session advisory lock."""
    target = dataclasses.replace(target_for(fresh_db), pooled=True)
    assert target.connect_kwargs()["prepare_threshold"] is None
    result = migrate(target, MigrateSettings(sql_dir=SQL_DIR))
    assert [e.file for e in result.applied] == REAL_FILES
    assert rollback(target, RollbackSettings(sql_dir=SQL_DIR)).rolled_back == REAL_FILES[1:]


# --------------------------------------------------------------------------
# Locks


def test_lock_timeout_fails_002_with_lock_not_available_and_the_rerun_succeeds(baseline_target):
    migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR, to="001"))
    before = snapshot(baseline_target)
    # 002 takes its locks first, in one statement.
    blocked_line = line_of(SQL_DIR / "002_integrity.sql", "LOCK TABLE")

    blocker = baseline_target.connect()
    try:
        blocker.execute("LOCK TABLE allocations IN ACCESS SHARE MODE")  # an open reader
        with pytest.raises(MigrationError) as err:
            migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR, lock_timeout="200ms"))
    finally:
        blocker.rollback()
        blocker.close()
    error = err.value
    assert (error.file, error.line, error.sqlstate) == ("002_integrity.sql", blocked_line, "55P03")
    assert "lock_not_available" in str(error) and "--lock-timeout" in str(error)
    assert diff_catalogs(before, snapshot(baseline_target)) == []  # 002's NOT NULLs undone too
    last = read_ledger(baseline_target)[-1]
    assert (last.file, last.outcome, last.sqlstate) == ("002_integrity.sql", "failed", "55P03")

    result = migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR, lock_timeout="200ms"))
    assert [e.file for e in result.applied] == REAL_FILES[2:]


def test_retries_try_a_file_again_after_a_lock_timeout(baseline_target):
    migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR, to="001"))
    blocker = baseline_target.connect()
    blocker.execute("LOCK TABLE allocations IN ACCESS SHARE MODE")  # an open reader
    # The reader ends while the runner waits between attempts.
    release = threading.Timer(0.4, blocker.rollback)
    release.start()
    try:
        result = migrate(
            baseline_target,
            MigrateSettings(
                sql_dir=SQL_DIR, to="002", lock_timeout="200ms", retries=3, retry_delay_s=0.3
            ),
        )
    finally:
        release.join()
        blocker.close()
    assert [e.file for e in result.applied] == ["002_integrity.sql"]
    assert result.retried and all(e.sqlstate == "55P03" for e in result.retried)
    rows = [(e.file, e.outcome) for e in read_ledger(baseline_target) if e.file.startswith("002")]
    assert rows == [("002_integrity.sql", "failed")] * len(result.retried) + [
        ("002_integrity.sql", "applied")
    ]
    assert [e.outcome for e in result.entries][-1] == "applied"


def test_a_second_runner_is_refused_while_one_works(baseline_target):
    with baseline_target.connect(autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('harness.migration_ledger'))")
        with pytest.raises(MigrationError, match="another migration runner"):
            migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR))
    assert migrate(baseline_target, MigrateSettings(sql_dir=SQL_DIR)).applied


# --------------------------------------------------------------------------
# CLI


def test_cli_migrate_dry_run_migrate_rollback(fresh_db, capsys):
    base = ["--db-url", fresh_db]
    assert main(["migrate", "--dry-run", *base], environ={}) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"apply\s+{name} \(", out) for name in REAL_FILES)
    assert "nothing was changed" in out

    assert main(["migrate", "--to", "002", *base], environ={}) == 0
    out = capsys.readouterr().out
    assert "applied 002_integrity.sql" in out and "003_index_triggers" not in out

    assert main(["migrate", *base], environ={}) == 0
    out = capsys.readouterr().out
    assert "skipped 001_blockers.sql" in out and "applied 004_backfill_staging.sql" in out

    assert main(["rollback", *base], environ={}) == 0
    out = capsys.readouterr().out
    assert "rolled back: 001_blockers.sql, 002_integrity.sql" in out

    assert main(["migrate", "--json", *base], environ={}) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [e["file"] for e in payload["applied"]] == REAL_FILES[1:]
    assert payload["ok"] is True


def test_cli_broken_file_exits_2_with_file_and_line(fresh_db, tmp_path, capsys):
    folder = write(tmp_path / "sql", {"001_widgets.sql": GOOD_001, "002_broken.sql": BROKEN_002})
    status = main(["migrate", "--db-url", fresh_db, "--sql-dir", str(folder)], environ={})
    assert status == 2
    captured = capsys.readouterr()
    assert "harness: error: 002_broken.sql line 6:" in captured.err
    assert "FAILED 002_broken.sql" in captured.out


def test_cli_bad_folder_exits_2(fresh_db, tmp_path, capsys):
    folder = write(tmp_path / "sql", {"001_a.sql": GOOD_001, "003_c.sql": GOOD_001})
    assert main(["migrate", "--db-url", fresh_db, "--sql-dir", str(folder)], environ={}) == 2
    assert "migration 002 is missing" in capsys.readouterr().err


def test_cli_no_baseline_leaves_000_out(baseline_db, capsys):
    assert main(["migrate", "--db-url", baseline_db, "--no-baseline"], environ={}) == 0
    out = capsys.readouterr().out
    assert "000_baseline.sql" not in out and "applied 001_blockers.sql" in out
    assert "000_baseline.sql" not in {e.file for e in read_ledger(target_for(baseline_db))}


def test_a_failing_rollback_changes_nothing_and_is_recorded(fresh_db, tmp_path):
    folder = write(
        tmp_path / "sql",
        {
            "001_widgets.sql": GOOD_001,
            "rollback_001_001.sql": "DROP TABLE widgets;\nDROP TABLE no_such_table;\n",
        },
    )
    target = target_for(fresh_db)
    migrate(target, MigrateSettings(sql_dir=folder))
    with pytest.raises(MigrationError) as err:
        rollback(target, RollbackSettings(sql_dir=folder, file="rollback_001_001.sql"))
    assert (err.value.file, err.value.line, err.value.sqlstate) == (
        "rollback_001_001.sql",
        2,
        "42P01",
    )
    with target.connect() as conn:
        assert conn.execute("SELECT to_regclass('widgets')").fetchone()[0] is not None
    state = {e.file: e.outcome for e in read_ledger(target)}
    assert state == {"001_widgets.sql": "applied", "rollback_001_001.sql": "failed"}
    with pytest.raises(ConfigError, match="rollback_NNN_NNN"):
        rollback(target, RollbackSettings(sql_dir=folder, file="undo.sql"))
