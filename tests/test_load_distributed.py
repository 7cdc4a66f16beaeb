"""The locustfile as Locust runs it (master and workers, Ctrl-C), and a database that goes away."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import psycopg

from harness.load import Contention, LoadSettings, Mode, run_load
from harness.samples import read_samples
from harness.target import Target
from tests.conftest import REPO_ROOT
from tests.test_load import seed

LOCUSTFILE = REPO_ROOT / "loadtests" / "bookings.py"


def _locust(*args: str) -> list[str]:
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]


def _env() -> dict[str, str]:
    # Nothing but what the test passes decides the target.
    env = {k: v for k, v in os.environ.items() if k not in ("SUPABASE_DB_URL", "DATABASE_URL")}
    env.pop("HARNESS_DB_URL", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _locust_count(stats_json: Path) -> int:
    entries = json.loads(stats_json.read_text())
    return sum(entry["num_requests"] for entry in entries)


def test_master_and_two_workers_write_one_sample_per_counted_request(
    baseline_db: str, tmp_path: Path
) -> None:
    seed(baseline_db)
    port = str(_free_port())
    run_dir = tmp_path / "run"
    master = subprocess.Popen(
        _locust(
            "--headless", "--master", "--expect-workers", "2",
            "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
            "-u", "6", "-r", "6", "-t", "3s", "--only-summary",
            "--db-url", baseline_db, "--phase", "pre", "--mode", "lax",
            "--run-dir", str(run_dir), "--json-file", str(tmp_path / "stats"),
        ),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    workers = [
        subprocess.Popen(
            _locust("--worker", "--master-host", "127.0.0.1", "--master-port", port),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(2)
    ]
    try:
        out, _ = master.communicate(timeout=60)
        for worker in workers:
            worker.wait(timeout=30)
    finally:
        for proc in (master, *workers):
            if proc.poll() is None:
                proc.kill()
    assert master.returncode == 0, out[-2000:]

    counted = _locust_count(tmp_path / "stats.json")
    df = read_samples(run_dir / "samples-pre.parquet")
    assert counted > 0
    assert len(df) == counted
    # Both workers' samples reached the master, each under its own name.
    assert df["worker"].nunique() == 2
    load = json.loads((run_dir / "load-pre.json").read_text())
    assert load["samples"] == counted and load["mode"] == "lax"


def _ctrl_c_once_running(args: list[str], *, group: bool) -> tuple[float, str]:
    """Start Locust, wait until its users run (the log says so), send SIGINT
    (to the whole process group, as a terminal's Ctrl-C does, when ``group``)
    and wait for it to end; return the seconds that took and its output."""
    proc = subprocess.Popen(
        _locust(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=group,
    )  # fmt: skip
    seen: list[str] = []
    stopped_in = float("inf")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "All users spawned" in line:
                break
        time.sleep(1.5)
        t0 = time.monotonic()
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        seen.append(rest)
        stopped_in = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.communicate()
    return stopped_in, "".join(seen)[-3000:]


def test_ctrl_c_still_writes_the_samples(baseline_db: str, tmp_path: Path) -> None:
    seed(baseline_db)
    run_dir = tmp_path / "run"
    _, output = _ctrl_c_once_running(
        [
            "--headless", "-u", "4", "-r", "4", "-t", "60s", "--only-summary",
            "--db-url", baseline_db, "--phase", "pre", "--run-dir", str(run_dir),
            "--json-file", str(tmp_path / "stats"),
        ],
        group=False,
    )  # fmt: skip
    assert (run_dir / "samples-pre.parquet").exists(), output
    df = read_samples(run_dir / "samples-pre.parquet")
    assert len(df) > 0
    assert len(df) == _locust_count(tmp_path / "stats.json")


def test_ctrl_c_in_the_terminal_stops_processes_and_keeps_every_workers_samples(
    baseline_db: str, tmp_path: Path
) -> None:
    # A terminal's Ctrl-C goes to the whole process group: the master and
    # each worker process get SIGINT at once.
    seed(baseline_db)
    run_dir = tmp_path / "run"
    stopped_in, output = _ctrl_c_once_running(
        [
            "--headless", "--processes", "2", "-u", "4", "-r", "4", "-t", "60s",
            "--only-summary", "--db-url", baseline_db, "--phase", "pre",
            "--run-dir", str(run_dir),
        ],
        group=True,
    )  # fmt: skip
    assert stopped_in < 15, output
    df = read_samples(run_dir / "samples-pre.parquet")
    assert df["worker"].nunique() == 2, output
    load = json.loads((run_dir / "load-pre.json").read_text())
    assert load["samples"] == len(df) > 0


def test_database_going_away_mid_run(
    baseline_db: str, baseline_target: Target, tmp_path: Path
) -> None:
    seed(baseline_db)
    kills: list[float] = []

    def terminate_backends() -> None:
        # Three times, so users that reconnect quickly are thrown out again.
        with psycopg.connect(baseline_db, autocommit=True) as conn:
            for _ in range(3):
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                kills.append(time.time())
                gevent.sleep(0.2)

    killer = gevent.spawn_later(0.8, terminate_backends)
    result = run_load(
        baseline_target,
        LoadSettings(
            users=6,
            duration_s=2.5,
            mode=Mode.LAX,
            contention=Contention(),
            run_dir=tmp_path / "run",
            progress_interval_s=0,
        ),
    )
    killer.get(timeout=5)  # re-raises if the killer itself failed
    assert len(kills) == 3

    df = read_samples(result.samples_path)
    assert len(df) == result.requests == result.samples
    lost = df[df["outcome"] == "connection_error"]
    assert len(lost) >= 1
    # Users reconnected: requests went through after the last termination.
    assert ((df["outcome"] == "ok") & (df["ts"] > kills[-1])).sum() > 0
    assert result.invariants is not None  # the run completed to the invariant check


def test_harness_load_ctrl_c_writes_what_it_has(baseline_db: str, tmp_path: Path) -> None:
    seed(baseline_db)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "harness", "load", "--db-url", baseline_db, "--users", "4",
            "--duration", "60s", "--mode", "lax", "--run-dir", str(run_dir),
        ],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:  # the first progress line: users are running
            if "req/s" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    load = json.loads((run_dir / "load-pre.json").read_text())
    assert load["interrupted"] is True
    assert len(read_samples(run_dir / "samples-pre.parquet")) == load["requests"] > 0
    # Interrupted: no invariant check was claimed.
    assert not (run_dir / "invariants-pre.json").exists()
