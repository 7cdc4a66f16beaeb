"""Security: secrets kept, names and values quoted, destructive commands gated, no leaks.

Issue 7's "Security" rows, against a real PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, PgServer, create_database, drop_database, target_for
from psycopg import sql

from harness.cli import main
from harness.migrate import MigrateSettings, migrate
from harness.provision import ProvisionSettings, provision


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(argv), environ={})
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` with ``user:password@`` as its user info (the password URL-quoted)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class SecretDb:
    url: str  # carries the password
    password: str
    token: str  # the unique part of the password: found in any spelling of it


@pytest.fixture
def secret_db(pg_server: PgServer) -> Iterator[SecretDb]:
    """A database reached as a role whose password is in the URL.

    Trust authentication does not check the password, which is fine here: the
    test is about where the harness writes it, not whether the server wants it.
    """
    token = uuid.uuid4().hex
    password = f"Pw{token}:@/%ü"
    role = f"harness_secret_{token[:8]}"
    name = f"harness_t_secret_{token[:8]}"
    with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    url = with_credentials(create_database(pg_server, name), role, password)
    try:
        yield SecretDb(url=url, password=password, token=token)
    finally:
        drop_database(pg_server, name)
        with psycopg.connect(pg_server.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def leaks(text: str, secret: SecretDb) -> list[str]:
    """Which forms of the secret ``text`` holds (empty: none)."""
    forms = {
        "token": secret.token,
        "password": secret.password,
        "quoted password": quote(secret.password, safe=""),
        "url": secret.url,
    }
    return [name for name, form in forms.items() if form in text]


def file_text(path: Path) -> str:
    """A file as text a leak would show in: Parquet decompressed, others as bytes."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        metadata = table.schema.metadata or {}
        raw += repr(metadata) + table.to_pandas().astype(str).to_csv()
    return raw


@pytest.mark.slow
def test_rehearsal_with_a_password_writes_it_nowhere(secret_db, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    reports = tmp_path / "reports"
    status, out, err = run_cli(
        capsys, "rehearse", "-v", "--db-url", secret_db.url, "--yes-destroy-target-data",
        "--reports-dir", str(reports), "--duration", "2s", "--users", "2", "--skip", "lint",
    )  # fmt: skip
    run_dir = (reports / "latest").resolve()
    run = json.loads((run_dir / "run.json").read_text())
    assert status in (0, 1) and run["status"] == "completed", (err, run["error"])
    files = [p for p in reports.rglob("*") if p.is_file() and not p.is_symlink()]
    names = {p.name for p in files}
    # The scan covers what a reviewer or CI would publish.
    expected = {"run.json", "summary.json", "report.html", "junit.xml", "manifest.json"}
    assert expected <= names, names
    assert {"samples-pre.parquet", "samples-post.parquet"} <= names
    assert any(n.endswith(".csv") for n in names) and any(
        n.endswith(".html") and n != "report.html" for n in names
    ), names  # Locust's own CSV and HTML
    for path in files:
        assert leaks(file_text(path), secret_db) == [], path
    assert leaks(out, secret_db) == [] and leaks(err, secret_db) == []
    assert caplog.records, "-v logged nothing"
    assert leaks(caplog.text, secret_db) == []
    # What the report shows of the target: the URL with its password masked.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert ":***@" in json.dumps(summary["run"]["target"])


def test_failures_with_a_password_never_print_it(secret_db, capsys):
    parts = urlsplit(secret_db.url)
    userinfo = parts.netloc.rsplit("@", 1)[0]
    dead = urlunsplit(parts._replace(netloc=f"{userinfo}@127.0.0.1:1", query=""))
    gone = urlunsplit(parts._replace(path="/harness_no_such_database"))
    malformed = secret_db.url.replace("@", "@[", 1) if "@" in secret_db.url else secret_db.url
    for url in (dead, gone, malformed):
        for extra in ([], ["--traceback"], ["-v"]):
            status, out, err = run_cli(
                capsys, "migrate", *extra, "--db-url", url, "--connect-timeout", "2"
            )
            assert status == 2, err
            assert "harness: error:" in err
            assert leaks(out + err, secret_db) == [], (url, extra, err)


# --------------------------------------------------------------------------
# Names and values with quotes, semicolons and unicode


WEIRD_TABLE = "gäste'; DROP TABLE sentinel.keep; --"
WEIRD_EMAIL = 'e"mail; drop'
WEIRD_NAME = "naïve 'name' \"x\""
WEIRD_VALUES = [
    ("o'brien@example.com'; DROP TABLE sentinel.keep; --", 'Zoë O\'Brien "the 2nd"; --'),
    ("ünïcødé@example.com", "Ærøskøbing; DELETE FROM sentinel.keep"),
    ('quote"inside@example.com', "Robert'); DROP TABLE students;--"),
]


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


@pytest.fixture
def second_db(pg_server: PgServer) -> Iterator[str]:
    name = f"harness_t_second_{uuid.uuid4().hex[:8]}"
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


def test_anonymization_rules_with_hostile_names_and_values(fresh_db, second_db, tmp_path, capsys):
    source, target = fresh_db, second_db
    with psycopg.connect(source) as conn:
        conn.execute(
            sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} text UNIQUE, {} text)").format(
                sql.Identifier(WEIRD_TABLE), sql.Identifier(WEIRD_EMAIL), sql.Identifier(WEIRD_NAME)
            )
        )
        for i, (email, name) in enumerate(WEIRD_VALUES, 1):
            conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s)").format(sql.Identifier(WEIRD_TABLE)),
                (i, email, name),
            )
    with psycopg.connect(target) as conn:  # outside what a clone replaces
        conn.execute("CREATE SCHEMA sentinel")
        conn.execute("CREATE TABLE sentinel.keep (x int)")
        conn.execute("INSERT INTO sentinel.keep VALUES (1)")
    rules = tmp_path / "rules.toml"
    # The table name holds a dot: a schema key keeps it from reading as schema.table.
    rules.write_text(
        f'[[rule]]\nschema = "public"\ntable = {_toml(WEIRD_TABLE)}\n'
        f'column = {_toml(WEIRD_EMAIL)}\nstrategy = "fake_email"\n\n'
        f'[[rule]]\nschema = "public"\ntable = {_toml(WEIRD_TABLE)}\n'
        f'column = {_toml(WEIRD_NAME)}\nstrategy = "fake_name"\n',
        encoding="utf-8",
    )
    status, out, err = run_cli(
        capsys, "provision", "--db-url", target, "--yes-destroy-target-data",
        "--from", source, "--rules", str(rules),
    )  # fmt: skip
    assert status == 0, err
    assert "0 survive in the target" in out
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM sentinel.keep").fetchone() == (1,)
        rows = conn.execute(
            sql.SQL("SELECT {}, {} FROM {} ORDER BY id").format(
                sql.Identifier(WEIRD_EMAIL), sql.Identifier(WEIRD_NAME), sql.Identifier(WEIRD_TABLE)
            )
        ).fetchall()
    assert len(rows) == len(WEIRD_VALUES)
    emails = [r[0] for r in rows]
    assert all(e.endswith("@example.invalid") for e in emails) and len(set(emails)) == len(emails)
    originals = {v for pair in WEIRD_VALUES for v in pair}
    assert not originals & {v for row in rows for v in row}


def test_database_name_with_quotes_and_unicode_in_the_url(pg_server, tmp_path, capsys):
    name = f"harness_t_q'\"; ü {uuid.uuid4().hex[:6]}"
    url = create_database(pg_server, name)
    try:
        # Refused without the flag: the message names the database as it is.
        status, _, err = run_cli(capsys, "provision", "--db-url", url)
        assert status == 2 and "refusing provisioning" in err and repr(name) in err
        status, _, err = run_cli(
            capsys, "provision", "--db-url", url, "--yes-destroy-target-data",
            "--manifest", str(tmp_path / "manifest.json"),
        )  # fmt: skip
        assert status == 0, err
        status, _, err = run_cli(capsys, "migrate", "--db-url", url)
        assert status == 0, err
        status, out, err = run_cli(capsys, "validate", "--db-url", url)
        assert status == 0, out + err
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        drop_database(pg_server, name)


@pytest.mark.parametrize("flag", ["--lock-timeout", "--statement-timeout"])
def test_option_values_with_quotes_and_semicolons_stay_values(baseline_db, flag, capsys):
    hostile = "1s'; DROP TABLE restaurants; -- ü"
    for command in ("migrate", "rollback"):
        status, _, err = run_cli(capsys, command, "--db-url", baseline_db, flag, hostile)
        assert status == 2 and err.startswith("harness: error: bad timeout"), err
        assert len(err.strip().splitlines()) == 1
    with psycopg.connect(baseline_db) as conn:
        assert conn.execute("SELECT to_regclass('public.restaurants') IS NOT NULL").fetchone()[0]
        assert conn.execute("SELECT to_regnamespace('harness')").fetchone()[0] is None


# --------------------------------------------------------------------------
# Destructive commands


def _destructive_commands(url: str, reports: Path) -> dict[str, list[str]]:
    return {
        "provision": ["provision", "--db-url", url, "--manifest", str(reports / "m.json")],
        "rehearse": ["rehearse", "--db-url", url, "--reports-dir", str(reports)],
        "nightly": [
            "nightly", "--db-url", url, "--reports-dir", str(reports),
            "--profile", str(REPO_ROOT / "nightly.toml"),
        ],
    }  # fmt: skip


def _marked(url: str) -> str:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS keep_me (note text)")
        conn.execute("INSERT INTO keep_me VALUES ('untouched')")
    return url


def _untouched(url: str) -> bool:
    with psycopg.connect(url) as conn:
        kept = conn.execute("SELECT note FROM keep_me").fetchall() == [("untouched",)]
        tables = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND relkind = 'r'"
        ).fetchone()[0]
        harness = conn.execute("SELECT to_regnamespace('harness')").fetchone()[0]
    return kept and tables == 1 and harness is None


def _no_run_folder(reports: Path) -> bool:
    return not reports.exists() or not [p for p in reports.iterdir() if p.is_dir()]


def test_url_target_needs_the_flag(fresh_db, tmp_path, capsys):
    url = _marked(fresh_db)
    reports = tmp_path / "reports"
    for name, argv in _destructive_commands(url, reports).items():
        status, _, err = run_cli(capsys, *argv)
        assert status == 2, (name, err)
        assert err.startswith("harness: error: refusing ") and len(err.strip().splitlines()) == 1
        assert "keep_me 1 rows" in err and "--yes-destroy-target-data" in err, (name, err)
        assert _untouched(url) and _no_run_folder(reports), name


@pytest.fixture
def prod_db(pg_server: PgServer) -> Iterator[str]:
    name = f"harness_t_Prod_copy_{uuid.uuid4().hex[:6]}"
    url = create_database(pg_server, name)
    try:
        yield _marked(url)
    finally:
        drop_database(pg_server, name)


def test_production_looking_target_is_refused_even_with_the_flag(prod_db, tmp_path, capsys):
    reports = tmp_path / "reports"
    for name, argv in _destructive_commands(prod_db, reports).items():
        status, _, err = run_cli(capsys, *argv, "--yes-destroy-target-data")
        assert status == 2, (name, err)
        assert "looks like production (matches 'prod')" in err, (name, err)
        assert "--allow-production-target" in err
        assert _untouched(prod_db) and _no_run_folder(reports), name
    # The rehearsal passes its gate with the second flag (every stage skipped:
    # only the gate is under test here)...
    everything = "provision,lint,load_pre,migrate,validate,load_post,rollback"
    status, _, err = run_cli(
        capsys, *_destructive_commands(prod_db, reports)["rehearse"],
        "--yes-destroy-target-data", "--allow-production-target", "--skip", everything,
    )  # fmt: skip
    assert "refusing" not in err and not _no_run_folder(reports)
    # ... and so does provisioning, which really replaces the data.
    status, _, err = run_cli(
        capsys, *_destructive_commands(prod_db, reports)["provision"],
        "--yes-destroy-target-data", "--allow-production-target",
    )  # fmt: skip
    assert status == 0, err
    with psycopg.connect(prod_db) as conn:
        assert conn.execute("SELECT count(*) FROM restaurants").fetchone()[0] > 0


def test_production_pattern_is_configurable(fresh_db, prod_db, tmp_path, capsys):
    url = _marked(fresh_db)
    reports = tmp_path / "reports"
    # A pattern of one's own: this test database's name now looks like production.
    for name, argv in _destructive_commands(url, reports).items():
        status, _, err = run_cli(
            capsys, *argv, "--yes-destroy-target-data", "--production-pattern", "harness_t_"
        )
        assert status == 2 and "matches 'harness_t_'" in err, (name, err)
        assert _untouched(url) and _no_run_folder(reports), name
    # A broken pattern is one line, before anything.
    for name, argv in _destructive_commands(url, reports).items():
        status, _, err = run_cli(
            capsys, *argv, "--yes-destroy-target-data", "--production-pattern", "(prod"
        )
        assert status == 2 and "is not a regular expression" in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and _untouched(url), name
    # '' turns the name check off: the 'prod' database is then an ordinary target.
    status, _, err = run_cli(
        capsys, *_destructive_commands(prod_db, reports)["provision"],
        "--yes-destroy-target-data", "--production-pattern", "",
    )  # fmt: skip
    assert status == 0, err


# --------------------------------------------------------------------------
# The anonymized clone leaks no personal value

KNOWN = {
    "full_name": "Zebulon Quarterfield",
    "email": "zebulon.quarterfield@realmail.test",
    "phone": "+44 20 7946 0958",
}
KNOWN_NOTE = "Zebulon is allergic to peanuts; call +44 20 7946 0958 or zq@realmail.test"
NEEDLES = ["Zebulon", "Quarterfield", "realmail.test", "7946 0958", "allergic to peanuts"]


def _hits(url: str, needles: list[str]) -> dict[str, int]:
    """Rows of every table of every schema whose text (all columns, jsonb too) holds a needle."""
    patterns = ["%" + n.replace("%", r"\%").replace("_", r"\_") + "%" for n in needles]
    found: dict[str, int] = {}
    with psycopg.connect(url) as conn:
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'm')"
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
            " AND n.nspname NOT LIKE 'pg\\_%'"
        ).fetchall()
        for schema, name in tables:
            query = sql.SQL("SELECT count(*) FROM {}.{} AS r WHERE r::text ILIKE ANY(%s)").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
            n = conn.execute(query, (patterns,)).fetchone()[0]
            if n:
                found[f"{schema}.{name}"] = n
    assert tables, "no tables searched"
    return found


@pytest.mark.slow
def test_anonymized_clone_leaks_no_personal_value(baseline_db, fresh_db):
    source, target = baseline_db, fresh_db
    anchor = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    provision(
        target_for(source), ProvisionSettings(seed=5, anchor=anchor, yes_destroy_target_data=True)
    )
    with psycopg.connect(source) as conn:
        customer = conn.execute(
            "UPDATE customers SET full_name = %s, email = %s, phone = %s"
            " WHERE id = (SELECT min(id) FROM customers) RETURNING id",
            (KNOWN["full_name"], KNOWN["email"], KNOWN["phone"]),
        ).fetchone()[0]
        # Notes on that customer's bookings, and on bookings 001 will quarantine
        # (their whole row goes to harness.quarantine.row_data).
        conn.execute(
            "UPDATE bookings SET notes = %s WHERE customer_id = %s OR party_size IS NULL",
            (KNOWN_NOTE, customer),
        )
        quarantined = conn.execute(
            "SELECT count(*) FROM bookings WHERE party_size IS NULL AND notes = %s", (KNOWN_NOTE,)
        ).fetchone()[0]
    assert quarantined > 0
    assert set(_hits(source, NEEDLES)) >= {"public.customers", "public.bookings"}  # the probe works

    clone = ProvisionSettings(source_url=source, yes_destroy_target_data=True)
    provision(target_for(target), clone)
    migrate(target_for(target), MigrateSettings())  # 001 copies rows into harness.quarantine
    with psycopg.connect(target) as conn:
        in_quarantine = conn.execute(
            "SELECT count(*) FROM harness.quarantine WHERE reason = 'null_party_size'"
        ).fetchone()[0]
    assert in_quarantine >= quarantined
    assert _hits(target, NEEDLES) == {}
