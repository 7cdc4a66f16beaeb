"""Bad input: each is one `harness: error: ...` line, exit 2, and nothing changed.

Issue 7's "Bad input" rows, against a real PostgreSQL: the database (and the
files) are checked to be as they were before each refused command.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import SQL_DIR, PgServer, create_database, drop_database, target_for
from psycopg import sql
from report_fixtures import standard_run

from harness.cli import main
from harness.errors import ConfigError, TargetError
from harness.migrate import MigrateSettings, migrate, read_ledger
from harness.provision import BYTES_PER_ROW, ProvisionSettings, estimate_bytes, provision
from harness.rundir import RUN_FILE, read_json, samples_file
from harness.target import TargetSettings, open_target, stop_embedded, with_database


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``harness argv...`` in-process: (status, stdout, stderr)."""
    capsys.readouterr()
    status = main(list(argv), environ={})
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("harness: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def database_state(url: str) -> dict[str, object]:
    """What a refused command must leave alone: schemas, tables and their row counts."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
        state: dict[str, object] = {}
        for schema, name in tables:
            query = sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
            state[f"{schema}.{name}"] = conn.execute(query).fetchone()[0]
        state["constraints"] = conn.execute(
            "SELECT count(*) FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
        ).fetchone()[0]
        return state


@pytest.fixture
def seeded_db(baseline_db: str) -> str:
    """A baseline database with a row of its own that a refused command must keep."""
    with psycopg.connect(baseline_db) as conn:
        conn.execute(
            "INSERT INTO restaurants (id, name, timezone) VALUES (424242, 'Keep Me', 'UTC')"
        )
    return baseline_db


def run_folders(reports: Path) -> list[Path]:
    return [p for p in reports.iterdir() if p.is_dir()] if reports.exists() else []


# --------------------------------------------------------------------------
# The target: malformed URL, unknown host, wrong password, no btree_gist


@pytest.mark.parametrize(
    "url, needle",
    [
        ("postgresql://bob:hunter2@db.example:notaport/app", "port 'notaport' is not a number"),
        ("mysql://bob:hunter2@db.example/app", "scheme must be postgresql://"),
        ("postgresql://bob:hunter2@[::1/app", "malformed database URL"),
    ],
)
def test_malformed_url(url, needle, capsys):
    status, out, err = run_cli(capsys, "migrate", "--db-url", url)
    assert status == 2 and out == ""
    assert_one_error_line(err, "malformed database URL", needle, "bob:***@")
    assert "hunter2" not in err


def test_unknown_host(capsys, tmp_path):
    url = "postgresql://bob:hunter2@no-such-host.invalid:5432/app"
    status, _, err = run_cli(
        capsys, "rehearse", "--db-url", url, "--yes-destroy-target-data",
        "--reports-dir", str(tmp_path / "reports"), "--connect-timeout", "3",
    )  # fmt: skip
    assert status == 2
    assert_one_error_line(err, "cannot connect to postgresql://bob:***@no-such-host.invalid")
    assert "no-such-host.invalid" in err and "hunter2" not in err
    assert run_folders(tmp_path / "reports") == []


@pytest.fixture
def password_server(pg_server: PgServer) -> Iterator[tuple[str, str]]:
    """The embedded server asking one role for its password (scram), everyone else trusted.

    Yields (admin URL, URL of that role with a wrong password).
    """
    if pg_server.embedded_dir is None:
        pytest.skip("needs the embedded server: it edits pg_hba.conf")
    role = f"harness_pw_{uuid.uuid4().hex[:8]}"
    hba = pg_server.embedded_dir / "pg_hba.conf"
    original = hba.read_text()
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal("right-password")
            )
        )
        rules = (
            f"local all {role} scram-sha-256\nhost all {role} 127.0.0.1/32 scram-sha-256\n"
            f"host all {role} ::1/128 scram-sha-256\n"
        )
        hba.write_text(rules + original)
        conn.execute("SELECT pg_reload_conf()")
    url = pg_server.admin_url.replace("postgresql://postgres:@", f"postgresql://{role}:wrong-pw@")
    url = url.replace("postgresql://postgres@", f"postgresql://{role}:wrong-pw@")
    assert role in url, url
    try:
        yield pg_server.admin_url, url
    finally:
        hba.write_text(original)
        with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.mark.embedded_only
def test_wrong_password(password_server, capsys, tmp_path):
    _, url = password_server
    status, _, err = run_cli(
        capsys, "rehearse", "--db-url", url, "--yes-destroy-target-data",
        "--reports-dir", str(tmp_path / "reports"),
    )  # fmt: skip
    assert status == 2
    assert_one_error_line(err, "cannot connect to", ":***@", "check the user name and password")
    assert "wrong-pw" not in err
    assert run_folders(tmp_path / "reports") == []
    # No password at all: the server asked for one.
    status, _, err = run_cli(capsys, "target", "--db-url", url.replace(":wrong-pw@", "@"))
    assert status == 2
    assert_one_error_line(err, "cannot connect to", "the server asks for a password")


def test_missing_extension_is_refused_before_anything(seeded_db):
    """btree_gist itself cannot be hidden from a real server's contrib folder; the
    check is the same for every name in ``required_extensions`` (a --sql-dir that
    needs more than btree_gist), so an extension no server has exercises it."""
    before = database_state(seeded_db)
    open_target(TargetSettings(db_url=seeded_db), environ={})  # btree_gist is there
    with pytest.raises(TargetError) as err:
        open_target(
            TargetSettings(
                db_url=seeded_db, required_extensions=("btree_gist", "harness_no_such_ext")
            ),
            environ={},
        )
    message = str(err.value)
    assert "has no harness_no_such_ext extension available" in message
    assert "\n" not in message
    assert database_state(seeded_db) == before


# --------------------------------------------------------------------------
# The sql/ folder


def _broken_sql(tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / f"sql-{damage}"
    shutil.copytree(SQL_DIR, folder)
    if damage == "missing":
        (folder / "002_integrity.sql").unlink()
    elif damage == "gap":
        (folder / "006_extra.sql").write_text("SELECT 1;\n")
    elif damage == "duplicate":
        (folder / "002_again.sql").write_text("SELECT 1;\n")
    elif damage == "no_rollback":
        (folder / "rollback_001_003.sql").unlink()
    return folder


SQL_DAMAGE = {
    "missing": "migration 002 is missing",
    "gap": "migration 005 is missing",
    "duplicate": "two migration files share the number 002",
}


@pytest.mark.parametrize("damage", sorted(SQL_DAMAGE))
def test_bad_sql_folder_is_refused_by_migrate_lint_and_rehearse(
    damage, seeded_db, tmp_path, capsys
):
    folder = _broken_sql(tmp_path, damage)
    before = database_state(seeded_db)
    reports = tmp_path / "reports"
    commands = {
        "migrate": ["migrate", "--db-url", seeded_db, "--sql-dir", str(folder)],
        "lint": ["lint", "--sql-dir", str(folder)],
        "rehearse": [
            "rehearse", "--db-url", seeded_db, "--yes-destroy-target-data",
            "--sql-dir", str(folder), "--reports-dir", str(reports),
        ],
    }  # fmt: skip
    for name, argv in commands.items():
        status, _, err = run_cli(capsys, *argv)
        assert status == 2, (name, err)
        assert_one_error_line(err, SQL_DAMAGE[damage])
    assert database_state(seeded_db) == before
    assert run_folders(reports) == []


def test_rehearse_refuses_a_missing_rollback_file_before_anything(seeded_db, tmp_path, capsys):
    folder = _broken_sql(tmp_path, "no_rollback")
    before = database_state(seeded_db)
    reports = tmp_path / "reports"
    argv = [
        "rehearse", "--db-url", seeded_db, "--yes-destroy-target-data",
        "--sql-dir", str(folder), "--reports-dir", str(reports),
    ]  # fmt: skip
    status, _, err = run_cli(capsys, *argv)
    assert status == 2
    assert_one_error_line(err, "rollback_001_003.sql does not exist")
    assert database_state(seeded_db) == before and run_folders(reports) == []


def test_migration_edited_after_it_was_applied(seeded_db, tmp_path, capsys):
    folder = tmp_path / "sql"
    shutil.copytree(SQL_DIR, folder)
    target = target_for(seeded_db)
    migrate(target, MigrateSettings(sql_dir=folder, to="001"))
    with open(folder / "001_blockers.sql", "a") as fh:
        fh.write("\n-- edited after it was applied\n")
    before, ledger = database_state(seeded_db), read_ledger(target)
    reports = tmp_path / "reports"

    status, _, err = run_cli(capsys, "migrate", "--db-url", seeded_db, "--sql-dir", str(folder))
    assert status == 2
    assert_one_error_line(err, "001_blockers.sql changed after it was applied", "--force")
    # The rehearsal on that database (no fresh snapshot) refuses too, before its load.
    status, _, err = run_cli(
        capsys, "rehearse", "--db-url", seeded_db, "--yes-destroy-target-data",
        "--sql-dir", str(folder), "--reports-dir", str(reports), "--skip", "provision,lint",
    )  # fmt: skip
    assert status == 2
    assert_one_error_line(err, "001_blockers.sql changed after it was applied")
    assert database_state(seeded_db) == before and read_ledger(target) == ledger
    assert run_folders(reports) == []

    status, out, _ = run_cli(
        capsys, "migrate", "--db-url", seeded_db, "--sql-dir", str(folder), "--to", "001",
        "--force",
    )  # fmt: skip
    assert status == 0 and "applied 001_blockers.sql" in out


# --------------------------------------------------------------------------
# TOML files: an unknown key or a wrong type names the file and the key


def _toml_cases(tmp_path: Path, source_url: str, target_url: str) -> list[tuple]:
    reports = tmp_path / "reports"
    run_dir = standard_run(tmp_path / "run", n=200)
    gates = ["report", str(run_dir), "--no-charts", "--gates"]
    rehearse = [
        "rehearse", "--db-url", target_url, "--yes-destroy-target-data",
        "--reports-dir", str(reports), "--gates",
    ]  # fmt: skip
    nightly = [
        "nightly", "--db-url", target_url, "--yes-destroy-target-data",
        "--reports-dir", str(reports), "--profile",
    ]  # fmt: skip
    provision_ = [
        "provision", "--db-url", target_url, "--yes-destroy-target-data",
        "--from", source_url, "--rules",
    ]  # fmt: skip
    lint = ["lint", "--accepted"]
    rule = '[[rule]]\ntable = "customers"\ncolumn = "email"\nstrategy = "fake_email"\n'
    accept = '[[accept]]\nfile = "002_integrity.sql"\nrule = "x"\nreason = "y"\n'
    return [
        (gates, "[double_booking]\nmax_overlapz = 0\n", "double_booking.max_overlapz"),
        (gates, "[double_booking]\nmax_overlaps = true\n", "double_booking.max_overlaps"),
        (rehearse, "[unexpected_errors]\nmax_share_pct = 'lots'\n", "max_share_pct"),
        (rehearse, "colour = 'red'\n", "colour"),
        (nightly, "[rehearsal]\nusers = 4\nspeed = 3\n", "speed"),
        (nightly, '[rehearsal]\nusers = "ten"\n', "users"),
        (nightly, "rehearsal = 3\n", "rehearsal"),
        (nightly, "[compare]\nlast_runs = 7.5\n", "last_runs"),
        (provision_, 'salt = "x"\n' + rule, "salt"),
        (provision_, rule.replace('"email"', "3"), "column"),
        (provision_, rule + "strength = 2\n", "strength"),
        (lint, accept + "lines = 'all'\n", "lines"),
        (lint, accept + "owner = 'me'\n", "owner"),
        (lint, "[accepted]\n", "accepted"),
    ]


def test_toml_with_unknown_key_or_wrong_type(seeded_db, fresh_db, tmp_path, capsys):
    before = database_state(seeded_db), database_state(fresh_db)
    for number, (argv, text, key) in enumerate(_toml_cases(tmp_path, fresh_db, seeded_db)):
        path = tmp_path / f"bad-{number}.toml"
        path.write_text(text)
        status, _, err = run_cli(capsys, *argv, str(path))
        assert status == 2, (argv[0], text, err)
        assert_one_error_line(err, str(path), key)
    assert (database_state(seeded_db), database_state(fresh_db)) == before
    assert run_folders(tmp_path / "reports") == []


# --------------------------------------------------------------------------
# Sizes and durations


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["rehearse", "--users", "0"], "--users: must be at least 1, got 0"),
        (["rehearse", "--duration=-5s"], "--duration: must be longer than 0"),
        (["rehearse", "--pre-duration=0"], "--pre-duration: must be longer than 0"),
        (["load", "--users", "-3"], "--users: must be at least 1, got -3"),
        (["load", "--duration=-1m"], "--duration: must be longer than 0"),
        (["provision", "--scale", "0"], "--scale: must be at least 1, got 0"),
    ],
)
def test_bad_numbers_on_the_command_line(argv, needle, seeded_db, tmp_path, capsys):
    before = database_state(seeded_db)
    status, out, err = (
        run_cli(capsys, *argv, "--db-url", seeded_db, "--yes-destroy-target-data")
        if argv[0] != "load"
        else run_cli(capsys, *argv, "--db-url", seeded_db)
    )
    assert status == 2 and out == ""
    assert_one_error_line(err, needle, f"see harness {argv[0]} --help")
    assert database_state(seeded_db) == before


@pytest.mark.parametrize(
    "profile, needle",
    [
        ("[rehearsal]\nusers = 0\n", "must be at least 1"),
        ('[rehearsal]\npre_duration = "-5s"\n', "pre_duration must be a duration"),
        ("[rehearsal]\npost_duration = 0\n", "post_duration must be a duration"),
    ],
)
def test_bad_numbers_in_the_nightly_profile(profile, needle, seeded_db, tmp_path, capsys):
    path = tmp_path / "profile.toml"
    path.write_text(profile)
    before = database_state(seeded_db)
    status, _, err = run_cli(
        capsys, "nightly", "--db-url", seeded_db, "--yes-destroy-target-data",
        "--profile", str(path), "--reports-dir", str(tmp_path / "reports"),
    )  # fmt: skip
    assert status == 2
    assert_one_error_line(err, str(path), needle)
    assert database_state(seeded_db) == before
    assert not (tmp_path / "reports").exists()


def test_scale_estimate_grows_with_the_scale():
    rows1, bytes1 = estimate_bytes(ProvisionSettings(scale=1))
    rows10, bytes10 = estimate_bytes(ProvisionSettings(scale=10))
    assert 40_000 < rows1 < 80_000  # the README's "scale 1 is about 57k rows"
    assert bytes1 == rows1 * BYTES_PER_ROW
    assert 9 * rows1 < rows10 < 11 * rows1 and bytes10 > bytes1


@pytest.fixture
def embedded_target_dir(pg_server: PgServer) -> Iterator[Path]:
    """The data directory of an embedded server this test may create databases on."""
    if pg_server.embedded_dir is not None:
        yield pg_server.embedded_dir
        return
    base = Path(tempfile.mkdtemp(prefix="harness-test-disk-"))
    base.chmod(0o755)
    try:
        yield base / "pg"
    finally:
        stop_embedded(base / "pg")
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.embedded_only
def test_scale_beyond_the_disk_is_refused_before_loading(embedded_target_dir, tmp_path, capsys):
    database = f"harness_disk_{uuid.uuid4().hex[:8]}"
    target = open_target(
        TargetSettings(data_dir=embedded_target_dir, database=database), environ={}
    )
    free = shutil.disk_usage(embedded_target_dir).free
    scale = 1
    while estimate_bytes(ProvisionSettings(scale=scale))[1] <= free:
        scale *= 10
    admin = PgServer(admin_url=with_database(target.url, "postgres"), embedded_dir=None)
    with psycopg.connect(admin.admin_url) as conn:
        had_rehearsal = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = 'rehearsal'"
        ).fetchone()
    try:
        before = database_state(target.url)
        with pytest.raises(ConfigError) as err:
            provision(target, ProvisionSettings(scale=scale))
        assert f"--scale {scale} needs about" in str(err.value)
        assert str(embedded_target_dir) in str(err.value)
        assert database_state(target.url) == before  # not even the baseline was applied
        # The rehearsal refuses it before its run folder exists.
        reports = tmp_path / "reports"
        status, _, err_text = run_cli(
            capsys, "rehearse", "--data-dir", str(embedded_target_dir), "--scale", str(scale),
            "--reports-dir", str(reports),
        )  # fmt: skip
        assert status == 2
        assert_one_error_line(err_text, f"--scale {scale} needs about", "free under")
        assert run_folders(reports) == []
    finally:
        drop_database(admin, database)
        if not had_rehearsal:  # the CLI's embedded target made it
            drop_database(admin, "rehearsal")


# --------------------------------------------------------------------------
# Run folders: corrupt samples, an older format


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_samples_file_is_one_line_and_no_report(damage, tmp_path, capsys):
    run_dir = standard_run(tmp_path / "run", n=300)
    path = run_dir / samples_file("pre")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3] if damage == "truncated" else b"\x00" * 64)
    status, out, err = run_cli(capsys, "report", str(run_dir), "--no-charts")
    assert status == 2
    assert_one_error_line(err, str(path))
    assert not (run_dir / "report.html").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize("version", [0, None, "1"])
def test_run_folder_of_another_format_version(version, tmp_path, capsys):
    run_dir = standard_run(tmp_path / "run", n=300)
    run = read_json(run_dir / RUN_FILE)
    if version is None:
        run.pop("format_version", None)
    else:
        run["format_version"] = version
    (run_dir / RUN_FILE).write_text(json.dumps(run))
    status, _, err = run_cli(capsys, "report", str(run_dir), "--no-charts")
    assert status == 2
    assert_one_error_line(err, str(run_dir / RUN_FILE), "format_version")
    assert not (run_dir / "report.html").exists()


def test_create_database_helper_is_real(pg_server):
    """The helpers above compare real databases: a change is seen."""
    name = f"harness_t_state_{uuid.uuid4().hex[:8]}"
    url = create_database(pg_server, name)
    try:
        before = database_state(url)
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE t (x int)")
        assert database_state(url) != before
    finally:
        drop_database(pg_server, name)


def test_toml_that_is_not_text_or_not_a_file(seeded_db, fresh_db, tmp_path, capsys):
    commands = {tuple(argv) for argv, _, _ in _toml_cases(tmp_path, fresh_db, seeded_db)}
    assert len(commands) == 5  # report, rehearse, nightly, provision --rules, lint
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"key = '\xff\xfe'\n")
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    before = database_state(seeded_db)
    for argv in sorted(commands):
        for path in (binary, folder):
            status, _, err = run_cli(capsys, *argv, str(path))
            assert status == 2, (argv[0], path, err)
            assert_one_error_line(err, str(path))
    assert database_state(seeded_db) == before
