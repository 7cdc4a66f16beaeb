"""Shared fixtures: a real PostgreSQL for every test, never a mock of one.

``HARNESS_TEST_DB_URL`` names a server to test against (CI also runs the suite
against the machine's PostgreSQL 15 this way); otherwise the session starts a
throwaway embedded PostgreSQL 18 in a temporary folder.

Each test that asks for ``fresh_db`` or ``baseline_db`` gets a database of its
own, created for it and dropped after it, so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from harness.target import Target, TargetSettings, open_target, start_embedded, stop_embedded
from harness.target import with_database as _with_database

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"
BASELINE_SQL = SQL_DIR / "000_baseline.sql"


@dataclass(frozen=True)
class PgServer:
    admin_url: str  # a URL to the server's maintenance database
    embedded_dir: Path | None  # data directory when the suite started the server

    def url_for(self, database: str) -> str:
        return _with_database(self.admin_url, database)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    url = os.environ.get("HARNESS_TEST_DB_URL")
    if url:
        yield PgServer(admin_url=url, embedded_dir=None)
        return
    # Not pytest's tmp_path: its folders are private to root (the server runs as
    # another user) and are pruned by other pytest sessions running meanwhile.
    base = Path(tempfile.mkdtemp(prefix="harness-test-pg-"))
    base.chmod(0o755)
    data_dir = base / "data"
    admin_url = start_embedded(data_dir)
    try:
        yield PgServer(admin_url=admin_url, embedded_dir=data_dir)
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(base, ignore_errors=True)


_counter = itertools.count()


def _new_db_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"


def create_database(server: PgServer, name: str, template: str | None = None) -> str:
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        conn.execute(query)
    return server.url_for(name)


def drop_database(server: PgServer, name: str) -> None:
    with psycopg.connect(server.admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def baseline_template(pg_server: PgServer) -> Iterator[str]:
    """A template database holding only the baseline schema (copied per test: fast)."""
    name = _new_db_name("harness_tpl")
    url = create_database(pg_server, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(BASELINE_SQL.read_text())
    try:
        yield name
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def fresh_db(pg_server: PgServer) -> Iterator[str]:
    """URL of a new, empty database, dropped after the test."""
    name = _new_db_name("harness_t")
    url = create_database(pg_server, name)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


@pytest.fixture
def baseline_db(pg_server: PgServer, baseline_template: str) -> Iterator[str]:
    """URL of a new database with the baseline schema applied, dropped after the test."""
    name = _new_db_name("harness_t")
    url = create_database(pg_server, name, template=baseline_template)
    try:
        yield url
    finally:
        drop_database(pg_server, name)


def target_for(url: str) -> Target:
    """A harness Target for a test database URL."""
    return open_target(TargetSettings(db_url=url), environ={})


@pytest.fixture
def baseline_target(baseline_db: str) -> Target:
    return target_for(baseline_db)
