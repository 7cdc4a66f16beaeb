"""Target resolution, URL masking and connection errors, against a real server."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import TargetError
from harness.target import (
    TargetKind,
    TargetSettings,
    mask_url,
    open_target,
    resolve_url,
    scrub,
)


def test_resolution_order_flag_then_supabase_then_database_url():
    env = {"SUPABASE_DB_URL": "postgresql://a@h/s", "DATABASE_URL": "postgresql://a@h/d"}
    assert resolve_url("postgresql://x@h/f", env) == ("postgresql://x@h/f", "--db-url")
    assert resolve_url(None, env) == ("postgresql://a@h/s", "SUPABASE_DB_URL")
    assert resolve_url(None, {"DATABASE_URL": "postgresql://a@h/d"}) == (
        "postgresql://a@h/d",
        "DATABASE_URL",
    )
    assert resolve_url(None, {}) == (None, "embedded")


@pytest.mark.parametrize(
    "url, expected",
    [
        (
            "postgresql://bob:s3cr%3Et@db.example:5432/app",
            "postgresql://bob:***@db.example:5432/app",
        ),
        ("postgresql://bob@db.example/app", "postgresql://bob@db.example/app"),
        (
            "postgresql://h/app?password=hunter2&sslmode=require",
            "postgresql://h/app?password=***&sslmode=require",
        ),
        ("host=h user=bob password='a b' dbname=app", "host=h user=bob password=*** dbname=app"),
    ],
)
def test_mask_url_hides_the_password(url, expected):
    assert mask_url(url) == expected


def test_scrub_removes_password_in_any_form():
    url = "postgresql://bob:p%40ss@h/app"
    text = f"failed for {url}; password was p@ss or p%40ss"
    cleaned = scrub(text, url)
    assert "p@ss" not in cleaned and "p%40ss" not in cleaned


def test_open_target_on_a_real_server(baseline_db):
    target = open_target(TargetSettings(db_url=baseline_db), environ={})
    assert target.kind is TargetKind.URL
    assert target.server_version_num >= 150000
    with target.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pooler_port_and_flag_turn_prepared_statements_off(baseline_db):
    flagged = baseline_db + ("&" if "?" in baseline_db else "?") + "pgbouncer=true"
    target = open_target(TargetSettings(db_url=flagged), environ={})
    assert target.pooled
    assert target.connect_kwargs()["prepare_threshold"] is None
    assert "pgbouncer" not in target.url
    with target.connect() as conn:
        assert conn.prepare_threshold is None


def test_malformed_url_is_one_clear_error():
    with pytest.raises(TargetError, match="malformed database URL"):
        open_target(TargetSettings(db_url="postgresql://u:pw@h:notaport/db"), environ={})
    with pytest.raises(TargetError, match="scheme"):
        open_target(TargetSettings(db_url="mysql://u:pw@h/db"), environ={})


def test_dead_server_fails_fast_without_the_password(capsys):
    status = main(
        [
            "target",
            "--db-url",
            "postgresql://bob:topsecret@127.0.0.1:1/app",
            "--connect-timeout",
            "2",
        ],
        environ={},
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("harness: error: cannot connect to postgresql://bob:***@127.0.0.1:1/app")
    assert "topsecret" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_target_prints_the_server(baseline_db, capsys):
    assert main(["target", "--db-url", baseline_db], environ={}) == 0
    out = capsys.readouterr().out
    assert "PostgreSQL" in out and "--db-url" in out


@pytest.mark.embedded_only
def test_embedded_default_starts_and_is_reused():
    # A folder of our own: pytest's tmp_path is private to root (the server runs
    # as another user) and other pytest sessions prune it.
    tmp_path = Path(tempfile.mkdtemp(prefix="harness-test-embedded-"))
    tmp_path.chmod(0o755)
    settings = TargetSettings(data_dir=tmp_path / "pg")
    first = open_target(settings, environ={})
    assert first.kind is TargetKind.EMBEDDED and first.is_throwaway
    assert first.server_version_num >= 180000
    with first.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
    again = open_target(settings, environ={})
    with again.connect() as conn:
        assert conn.execute("SELECT to_regclass('kept') IS NOT NULL").fetchone() == (True,)
    fresh = open_target(TargetSettings(data_dir=tmp_path / "pg", fresh=True), environ={})
    with fresh.connect() as conn:
        assert conn.execute("SELECT to_regclass('kept') IS NULL").fetchone() == (True,)
    from harness.target import stop_embedded

    stop_embedded(tmp_path / "pg")
    shutil.rmtree(tmp_path, ignore_errors=True)
