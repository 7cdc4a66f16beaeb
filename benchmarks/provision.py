"""Provision speed: synthetic snapshot rows/s against the server's own insert limit.

    python benchmarks/provision.py [--scale 100] [--workers 2] [--db-url URL]

Without --db-url it starts a throwaway embedded PostgreSQL 18 in a temporary
folder (the DESIGN bar is "at least 300k rows/s on the embedded server").
It provisions the snapshot, then measures the server's limit for the same
rows: for every app table, a bare copy of it (same columns, defaults and
primary key, which provision keeps while loading; no other index or
constraint) filled with the same number of rows by
``INSERT ... SELECT generate_series`` of constant-cost values, split over the
same number of sessions. It prints both rates and their ratio. The load
average is printed too: other work on the machine skews every figure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.provision import APP_TABLES, ProvisionSettings, provision  # noqa: E402
from harness.target import (  # noqa: E402
    TargetSettings,
    open_target,
    start_embedded,
    stop_embedded,
    with_database,
)

BAR_ROWS_PER_S = 300_000

# Cheap values of each column type: the limit measures inserting, not generating.
_VALUE_BY_TYPE = {
    "bigint": "g",
    "integer": "mod(g, 1000)::int",
    "text": "'restaurant-booking'",
    "boolean": "true",
    "date": "current_date",
    "timestamp with time zone": "now()",
    "tstzrange": "tstzrange(now(), now() + interval '90 minutes')",
    "uuid": "'8a7b8f52-1f0e-4c51-9a43-5b0a7b1c2d3e'::uuid",
}


def server_limit(url: str, rows: dict[str, int], workers: int) -> tuple[float, int]:
    """Seconds to insert ``rows`` into bare copies of the app tables, over ``workers`` sessions."""
    jobs: list[tuple[str, str, int, int]] = []
    with psycopg.connect(url, autocommit=True) as conn:
        for table in APP_TABLES:
            bare = f"bench_{table}"
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(bare)))
            conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                    sql.Identifier(bare), sql.Identifier(table)
                )
            )
            # The primary key stays on while provision loads, so it is part of the limit.
            conn.execute(
                sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier(bare))
            )
            columns = conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped"
                " ORDER BY attnum",
                (bare,),
            ).fetchall()
            select = sql.SQL(", ").join(
                sql.SQL(_VALUE_BY_TYPE.get(kind, "NULL")) for _, kind in columns
            )
            insert = sql.SQL(
                "INSERT INTO {} ({}) SELECT {} FROM generate_series(%s::bigint, %s::bigint) AS g"
            ).format(
                sql.Identifier(bare),
                sql.SQL(", ").join(sql.Identifier(name) for name, _ in columns),
                select,
            )
            n = rows.get(table, 0)
            step = max(1, -(-n // (2 * workers)))
            for lo in range(1, n + 1, step):
                jobs.append((insert.as_string(conn), table, lo, min(n, lo + step - 1)))

    conns = [psycopg.connect(url, autocommit=True) for _ in range(workers)]
    for c in conns:
        c.execute("SET synchronous_commit = off")

    def run(i: int) -> int:
        conn = conns[i % workers]
        done = 0
        for query, _, lo, hi in jobs[i::workers]:
            done += conn.execute(query, (lo, hi)).rowcount
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        inserted = sum(pool.map(run, range(workers)))
    seconds = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        for table in APP_TABLES:
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(f"bench_{table}"))
            )
    for c in conns:
        c.close()
    return seconds, inserted


def server_cpu_seconds(url: str) -> float | None:
    """CPU time used so far by the server's processes (the postmaster and its children).

    Exited backends are counted through the postmaster's children times. Other
    work on the machine slows the wall clock but not this: rows per CPU-second
    is the figure to compare between runs on a busy machine.
    """
    try:
        import psutil

        with psycopg.connect(url) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        postmaster = psutil.Process(pid).parent()
        t = postmaster.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in postmaster.children():
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.NoSuchProcess:
                pass
        return total
    except Exception:  # a remote server: no such figure
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=int, default=100, help="100 gives about 1M allocations")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--db-url", help="benchmark this database instead of an embedded one")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every statement")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(relativeCreated)7.0f ms %(message)s")
        logging.getLogger("psycopg").setLevel(logging.WARNING)

    tmp = None
    if args.db_url:
        url = args.db_url
    else:
        tmp = tempfile.TemporaryDirectory(prefix="harness-bench-")
        admin = start_embedded(Path(tmp.name) / "data")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench")
        url = with_database(admin, "bench")
    try:
        target = open_target(TargetSettings(db_url=url), environ={})
        print(f"server: PostgreSQL {target.server_version}, {os.cpu_count()} CPUs", flush=True)
        print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
        cpu_before = server_cpu_seconds(url)
        result = provision(
            target,
            ProvisionSettings(
                scale=args.scale,
                seed=args.seed,
                anchor=datetime.now(UTC).replace(minute=0, second=0, microsecond=0),
                yes_destroy_target_data=True,
                workers=args.workers,
            ),
        )
        for table, n in result.rows.items():
            print(f"  {table:<20} {n:>10,}")
        ours = result.total_rows / result.seconds
        print(
            f"provision: {result.total_rows:,} rows in {result.seconds:.2f} s"
            f" = {ours:,.0f} rows/s (scale {args.scale}, {args.workers} sessions,"
            f" indexes, constraints and ANALYZE included)",
            flush=True,
        )
        cpu_provision = _delta(server_cpu_seconds(url), cpu_before)
        cpu_before = server_cpu_seconds(url)
        seconds, inserted = server_limit(url, result.rows, args.workers)
        cpu_limit = _delta(server_cpu_seconds(url), cpu_before)
        limit = inserted / seconds
        print(
            f"server limit: {inserted:,} rows in {seconds:.2f} s = {limit:,.0f} rows/s"
            f" (INSERT ... SELECT generate_series into bare copies with their primary keys,"
            f" {args.workers} sessions)"
        )
        print(f"ratio provision / server limit: {ours / limit:.2f}")
        if cpu_provision and cpu_limit:
            per_cpu, per_cpu_limit = result.total_rows / cpu_provision, inserted / cpu_limit
            cores = os.cpu_count() or 1
            print(
                f"server CPU: provision {cpu_provision:.1f} s = {per_cpu:,.0f} rows per CPU-second"
                f" ({per_cpu * min(cores, args.workers):,.0f} rows/s if the {cores} cores were"
                f" ours alone); limit {cpu_limit:.1f} s = {per_cpu_limit:,.0f} rows per"
                f" CPU-second; ratio {per_cpu / per_cpu_limit:.2f}"
            )
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        verdict = "meets" if ours >= BAR_ROWS_PER_S else "MISSES"
        print(f"{verdict} the bar of {BAR_ROWS_PER_S:,} rows/s")
        return 0 if ours >= BAR_ROWS_PER_S else 1
    finally:
        if tmp is not None:
            stop_embedded(Path(tmp.name) / "data")
            tmp.cleanup()


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


if __name__ == "__main__":
    sys.exit(main())
