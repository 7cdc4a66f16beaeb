"""The booking load against a real PostgreSQL: contention, refusals, files, failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import psycopg
import pytest

from harness.cli import main
from harness.errors import ConfigError
from harness.load import (
    Contention,
    LoadError,
    LoadSettings,
    Mode,
    Operation,
    failure_label,
    parse_weights,
    run_load,
)
from harness.migrate import MigrateSettings, migrate
from harness.outcomes import Classified, Outcome
from harness.samples import read_samples
from harness.target import Target

# The runbook's test: parallel creates at one table and time. All users start
# at once (spawn_rate below), so their first creates race each other.
HOT = Contention(
    hot_tables=1,
    hot_windows=1,
    hot_fraction=1.0,
    retry_fraction=0.0,
    weights={Operation.CREATE_BOOKING: 1},
)
# Every endpoint, everything aimed at one table and time: holds, moves and
# confirmations collide too, so several outcomes and constraints show up.
HOT_ALL = Contention(hot_tables=1, hot_windows=1, hot_fraction=1.0, retry_fraction=0.0)
SLOT_ZERO = "2030-01-01 12:00+00"


def seed(url: str, *, restaurants: int = 3, tables: int = 6, slots: int = 48) -> None:
    """A small bookable inventory: restaurants, tables, 15-minute slots, customers."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO restaurants (name) SELECT 'r' || g FROM generate_series(1, %s) g",
            (restaurants,),
        )
        conn.execute(
            "INSERT INTO dining_tables (restaurant_id, label, capacity)"
            " SELECT r.id, 't' || g, 4 FROM restaurants r, generate_series(1, %s) g",
            (tables,),
        )
        conn.execute(
            "INSERT INTO booking_slots (restaurant_id, starts_at, covers_total)"
            " SELECT r.id, %s::timestamptz + g * interval '15 min', 40"
            " FROM restaurants r, generate_series(0, %s) g",
            (SLOT_ZERO, slots - 1),
        )
        conn.execute(
            "INSERT INTO customers (full_name, email)"
            " SELECT 'c' || g, 'c' || g || '@example.com' FROM generate_series(1, 50) g"
        )


def double_bookings(url: str) -> int:
    """Allocations overlapping an older one of the same table (the rows 001 quarantines)."""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) FROM allocations b WHERE EXISTS (SELECT 1 FROM allocations a"
            " WHERE a.table_id = b.table_id AND a.id < b.id AND a.during && b.during)"
        ).fetchone()[0]


def settings(tmp_path: Path, **over: object) -> LoadSettings:
    values: dict[str, object] = {
        "phase": "pre",
        "users": 10,
        "duration_s": 2.0,
        "spawn_rate": 100.0,  # at most 100 users: all start at once
        "mode": Mode.LAX,
        "contention": HOT,
        "run_dir": tmp_path / "run",
        "progress_interval_s": 0,
    }
    values.update(over)
    return LoadSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def seeded(baseline_db: str, baseline_target: Target) -> tuple[str, Target]:
    seed(baseline_db)
    return baseline_db, baseline_target


def test_lax_hot_contention_leaves_double_bookings(
    seeded: tuple[str, Target], tmp_path: Path
) -> None:
    url, target = seeded
    # Twenty users connect at once: several first creates are always in flight together.
    result = run_load(target, settings(tmp_path, users=20))

    assert result.mode == "lax"
    assert double_bookings(url) >= 1
    assert result.invariants is not None
    assert result.invariants["overlapping_allocations"] >= 1
    # Every request is one sample, and the file holds them all.
    df = read_samples(result.samples_path)
    assert len(df) == result.samples == result.requests > 0
    assert set(df["phase"].astype(str)) == {"pre"}
    assert set(df["operation"].astype(str)) == {"create_booking"}
    # The run folder has what the report reads.
    run_dir = tmp_path / "run"
    load = json.loads((run_dir / "load-pre.json").read_text())
    assert load["requests"] == result.requests
    assert load["mode"] == "lax"
    assert load["samples_file"] == "samples-pre.parquet"
    assert "@" not in load["target"] or ":***@" in load["target"] or "://" in load["target"]
    invariants = json.loads((run_dir / "invariants-pre.json").read_text())
    assert invariants["phase"] == "pre"
    assert invariants["counts"]["overlapping_allocations"] == double_bookings(url)
    for name in [*load["csv_files"], load["html_file"]]:
        assert (run_dir / name).is_file(), name


def test_strict_after_migrations_refuses_and_never_double_books(
    seeded: tuple[str, Target], tmp_path: Path
) -> None:
    url, target = seeded
    migrate(target, MigrateSettings())
    # At full heat two conflicting inserts can each wait on the other's
    # exclusion-index entry: a deadlock, and every user stalls for the server's
    # deadlock_timeout (1 s). A 3 s phase made 29 to 94 requests and once no
    # allocation refusal at all; 6 s leaves room for several.
    result = run_load(
        target, settings(tmp_path, phase="post", mode=Mode.AUTO, contention=HOT_ALL, duration_s=6.0)
    )

    assert result.mode == "strict"  # auto read the catalog
    assert double_bookings(url) == 0
    assert result.invariants is not None
    assert result.invariants["overlapping_allocations"] == 0
    assert result.outcomes.get("exclusion_violation", 0) >= 1, result.outcomes
    df = read_samples(result.samples_path)
    refused = df[df["outcome"] == "exclusion_violation"]
    assert set(refused["sqlstate"]) == {"23P01"}
    constraints = set(refused["constraint"].astype(str))
    assert "allocations_no_overlap" in constraints, result.outcomes
    assert constraints <= {"allocations_no_overlap", "table_hold_windows_no_overlap"}
    assert result.invariants["overlapping_holds"] == 0

    # Locust's failure table: one row per operation and outcome + constraint,
    # never one per message (messages carry row values).
    with open(tmp_path / "run" / "locust-post_failures.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    failed = df[df["outcome"] != "ok"]
    expected = set()
    for op, outcome, sqlstate, constraint in zip(
        failed["operation"].astype(str),
        failed["outcome"].astype(str),
        failed["sqlstate"],
        failed["constraint"].astype(object),
        strict=True,
    ):
        constraint = constraint if isinstance(constraint, str) else None  # NaN: none
        label = failure_label(Classified(Outcome(outcome), sqlstate, constraint))
        refused = outcome in ("exclusion_violation", "unique_violation")
        expected.add((op, f"{'Refused' if refused else 'Failed'}({label!r})"))
    assert {(r["Name"], r["Error"]) for r in rows} == expected
    assert len(rows) == len(expected)
    assert sum(int(r["Occurrences"]) for r in rows) == len(failed)


def test_retried_create_reusing_a_key_ends_in_23505_after_002(
    seeded: tuple[str, Target], tmp_path: Path
) -> None:
    url, target = seeded
    migrate(target, MigrateSettings(to="002"))
    retries = Contention(
        hot_fraction=0.0,
        retry_fraction=0.5,
        weights={Operation.CREATE_BOOKING: 1},
    )
    result = run_load(
        target, settings(tmp_path, users=4, duration_s=1.5, mode=Mode.STRICT, contention=retries)
    )
    df = read_samples(result.samples_path)
    dupes = df[df["outcome"] == "unique_violation"]
    assert len(dupes) >= 1
    assert set(dupes["sqlstate"]) == {"23505"}
    assert set(dupes["constraint"].astype(str)) == {"bookings_idempotency_key_key"}
    with psycopg.connect(url) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM (SELECT idempotency_key FROM bookings"
                " GROUP BY idempotency_key HAVING count(*) > 1) d"
            ).fetchone()[0]
            == 0
        )


def test_an_empty_target_is_a_clear_error(baseline_target: Target, tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no restaurant with tables and booking slots"):
        run_load(baseline_target, settings(tmp_path))


def test_failure_label_names_outcome_and_constraint_only() -> None:
    assert (
        failure_label(Classified(Outcome.EXCLUSION_VIOLATION, "23P01", "allocations_no_overlap"))
        == "exclusion_violation allocations_no_overlap"
    )
    assert failure_label(Classified(Outcome.DEADLOCK_DETECTED, "40P01")) == "deadlock_detected"
    assert failure_label(Classified(Outcome.OTHER, "42P01")) == "other 42P01"


def test_knobs_are_checked() -> None:
    assert parse_weights("create_booking=3, place_hold=0")["create_booking"] == 3
    with pytest.raises(ConfigError, match="bad task weight"):
        parse_weights("book=3")
    with pytest.raises(ConfigError, match="hot fraction"):
        Contention(hot_fraction=1.5)
    with pytest.raises(ConfigError, match="at least one > 0"):
        Contention(weights={Operation.CREATE_BOOKING: 0})


def test_harness_load_command_writes_the_phase_files(
    seeded: tuple[str, Target], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = seeded
    run_dir = tmp_path / "cli-run"
    status = main(
        [
            "load",
            "--db-url",
            url,
            "--phase",
            "post",
            "--users",
            "4",
            "--duration",
            "1s",
            "--mode",
            "lax",
            "--hot-fraction",
            "0.2",
            "--run-dir",
            str(run_dir),
        ],
        environ={},
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "mode lax:" in out and "invariants: overlapping_allocations" in out
    load = json.loads((run_dir / "load-post.json").read_text())
    assert load["phase"] == "post" and load["users"] == 4
    assert load["contention"]["hot_fraction"] == 0.2
    assert len(read_samples(run_dir / "samples-post.parquet")) == load["requests"] > 0
    assert (run_dir / "invariants-post.json").is_file()


def test_harness_load_rejects_bad_weights(seeded: tuple[str, Target], tmp_path: Path) -> None:
    url, _ = seeded
    status = main(
        ["load", "--db-url", url, "--weights", "book=1", "--run-dir", str(tmp_path)], environ={}
    )
    assert status == 2


def test_locustfile_options_are_in_the_web_ui_with_env_vars_but_not_the_url() -> None:
    from locust.argument_parser import get_empty_argument_parser, setup_parser_arguments

    from harness.load import add_options

    parser = get_empty_argument_parser(add_help=False, default_config_files=[])
    setup_parser_arguments(parser)
    add_options(parser)
    shown = set(parser.args_included_in_web_ui)
    knobs = {"hot_tables", "hot_windows", "hot_fraction", "retry_fraction", "think_time"}
    assert knobs | {"weights", "mode", "phase"} <= shown
    # Locust writes option values into the page source: the URL holds a password.
    assert "db_url" not in shown and "harness_target" not in shown
    env_vars = {a.dest: getattr(a, "env_var", None) for a in parser._actions}
    for dest in [*knobs, "db_url", "weights", "mode", "phase", "run_dir"]:
        assert (env_vars[dest] or "").startswith("HARNESS_"), dest


def test_ctrl_c_still_raises_keyboardinterrupt_after_a_phase(
    seeded: tuple[str, Target], tmp_path: Path
) -> None:
    import os
    import signal

    import gevent

    _, target = seeded
    run_load(target, settings(tmp_path, users=2, duration_s=0.5, check_invariants=False))
    # run_load handled SIGINT itself while it ran; afterwards Ctrl-C must
    # interrupt the caller again (e.g. the migrations that follow the phase).
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        gevent.sleep(0.5)
