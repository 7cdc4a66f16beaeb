"""Soak: steady booking load for minutes; memory, descriptors, connections, throughput.

    python benchmarks/soak.py [--minutes 10] [--users 20] [--scale 1] [--keep DIR]

One embedded PostgreSQL, a provisioned snapshot, and :func:`harness.load.run_load`
(the booking users of ``harness load``, lax mode, default contention) for
``--minutes`` in this process. Prints, with a bar each (exit 1 when one is
missed):

- memory (RSS) of the load process at the start and the end of the phase, and
  its growth per 10M samples (bar: < 1 GB per 10M samples), measured from the
  first progress tick after a warm-up (imports, connections, inventory) to the
  last one;
- open file descriptors of the load process and client connections on the
  server, before the phase and after it (bar: no more after than before);
- throughput in the last minute against the first (bar: within 10%); with
  ``--minutes`` under 2 the two halves of the phase are compared instead.

And, without a bar, what tells a real drift from a noisy minute: the rate of
every 30 s window, a Theil-Sen trend line through them, the CPU time the load
process spends per request in the first and last minute (flat: the load process
is not what slows down), the rows the users added to the tables they write,
and the machine's load average (the server and the load share its cores, so
other work on the machine moves either minute).

Not part of the test suite (it takes minutes); issue 7's "Long runs".
"""

from __future__ import annotations

# isort: off
import locust  # noqa: F401  (gevent's monkey-patching first)
# isort: on

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

from harness.load import LoadProgress, LoadSettings, Mode, run_load
from harness.provision import ProvisionSettings, provision
from harness.samples import read_samples
from harness.target import TargetSettings, open_target, stop_embedded

BAR_GB_PER_10M = 1.0
BAR_THROUGHPUT = 0.10
WARMUP_S = 10.0


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def client_connections(url: str) -> int:
    """Client backends on the server other than the one asking."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()[0]


def theil_sen_change(t: np.ndarray, rate: np.ndarray, span: float) -> float | None:
    """Relative change from the first minute to the last along a Theil-Sen line
    (median of pairwise slopes), which one slow or fast window cannot tilt."""
    if len(t) < 3:
        return None
    i, j = np.triu_indices(len(t), k=1)
    slope = float(np.median((rate[j] - rate[i]) / (t[j] - t[i])))
    intercept = float(np.median(rate - slope * t))
    first, last = intercept + slope * 30.0, intercept + slope * (span - 30.0)
    return (last - first) / first if first > 0 else None


GROWING_TABLES = ("bookings", "allocations", "table_hold_windows")


def table_rows(url: str) -> dict[str, int]:
    """Live rows of the tables the booking users write: a drift in throughput
    that follows their growth is the workload's, not a leak of the load process."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {
            name: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))
            ).fetchone()[0]
            for name in GROWING_TABLES
        }


def mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--scale", type=int, default=1, help="snapshot scale")
    parser.add_argument("--keep", type=Path, help="data directory to keep (default: temporary)")
    args = parser.parse_args()
    if args.minutes <= 0 or args.users < 1:
        parser.error("--minutes must be > 0 and --users at least 1")

    # Not a TemporaryDirectory: the server runs as another user when we are root.
    tmp = Path(tempfile.mkdtemp(prefix="harness-soak-"))
    tmp.chmod(0o755)
    data_dir = args.keep or tmp / "pg"
    try:
        target = open_target(TargetSettings(data_dir=data_dir, database="soak"), {})
        print(f"server: PostgreSQL {target.server_version} (embedded), cpus {os.cpu_count()}")
        prov = provision(target, ProvisionSettings(scale=args.scale, seed=1))
        print(f"snapshot: scale {args.scale}, {prov.total_rows:,} rows")

        fds_before = open_fds()
        conns_before = client_connections(target.url)
        rows_before = table_rows(target.url)
        rss_start = rss_bytes()
        ticks: list[tuple[float, int, int, float]] = []  # (elapsed s, samples, rss, cpu s)

        def on_progress(p: LoadProgress) -> None:
            ticks.append((p.elapsed_s, p.requests, rss_bytes(), time.process_time()))
            if len(ticks) % 6 == 0:
                print(
                    f"  {p.elapsed_s:6.0f}s  {p.requests:>10,} samples  {p.rps:8,.0f} req/s"
                    f"  rss {mb(ticks[-1][2])}",
                    flush=True,
                )

        duration = args.minutes * 60.0
        load_before = os.getloadavg()[0]
        print(f"load: {args.users} users, lax mode, {duration:.0f} s", flush=True)
        t0 = time.monotonic()
        result = run_load(
            target,
            LoadSettings(
                phase="pre",
                users=args.users,
                duration_s=duration,
                mode=Mode.LAX,
                run_dir=tmp / "run",
                progress_interval_s=5.0,
                check_invariants=False,
            ),
            on_progress=on_progress,
        )
        wall = time.monotonic() - t0
        rss_end = rss_bytes()
        fds_after = open_fds()
        conns_after = client_connections(target.url)
        rows_after = table_rows(target.url)

        ok = True
        print(
            f"requests: {result.requests:,} in {result.duration_s:.0f} s"
            f" ({result.rps:,.0f}/s), samples {result.samples:,}, wall {wall:.0f} s"
        )
        print(f"outcomes: {dict(sorted(result.outcomes.items()))}")
        print(
            "rows: "
            + ", ".join(f"{t} {rows_before[t]:,} -> {rows_after[t]:,}" for t in GROWING_TABLES)
        )

        # Memory: growth over the steady part of the phase, scaled to 10M samples.
        steady = [t for t in ticks if t[0] >= min(WARMUP_S, duration / 4)]
        print(f"rss of the load process: start {mb(rss_start)}, end {mb(rss_end)}")
        if len(steady) >= 2 and steady[-1][1] > steady[0][1]:
            (_, n0, r0, _), (_, n1, r1, _) = steady[0], steady[-1]
            per_10m = (r1 - r0) / (n1 - n0) * 10_000_000
            passed = per_10m < BAR_GB_PER_10M * 2**30
            ok &= passed
            print(
                f"rss growth: {mb(r1 - r0)} over {n1 - n0:,} samples"
                f" = {per_10m / 2**30:.3f} GB per 10M samples"
                f" (bar < {BAR_GB_PER_10M:g} GB): {'PASS' if passed else 'FAIL'}"
            )
        else:
            ok = False
            print("rss growth: not measured (too few progress ticks): FAIL")

        passed = fds_after <= fds_before
        ok &= passed
        print(
            f"file descriptors: before {fds_before}, after {fds_after}:"
            f" {'PASS' if passed else 'FAIL (leak)'}"
        )
        passed = conns_after <= conns_before
        ok &= passed
        print(
            f"server connections: before {conns_before}, after {conns_after}:"
            f" {'PASS' if passed else 'FAIL (leak)'}"
        )

        # Throughput: requests in the first and the last minute of the phase.
        ts = read_samples(result.samples_path)["ts"].to_numpy(dtype=np.float64)
        start, end = ts.min(), ts.max()
        window = 60.0 if end - start >= 120.0 else (end - start) / 2
        first = int(((ts >= start) & (ts < start + window)).sum()) / window
        last = int(((ts > end - window) & (ts <= end)).sum()) / window
        change = (last - first) / first if first else float("nan")
        # The whole curve, so a reader can tell a trend from a noisy minute.
        edges = np.arange(start, end + 30.0, 30.0)
        counts, _ = np.histogram(ts, bins=edges)
        rates = counts[:-1] / 30.0  # the last window is partial
        print("throughput per 30 s: " + " ".join(f"{r:,.0f}" for r in rates))
        trend = theil_sen_change(edges[:-2] + 15.0 - start, rates, end - start)
        if trend is not None:
            print(
                f"throughput trend (Theil-Sen line through the 30 s windows, first minute"
                f" to last): {trend:+.1%} (not a bar: tells a drift from a noisy minute)"
            )
        passed = abs(change) <= BAR_THROUGHPUT
        ok &= passed
        verdict = "PASS" if passed else "FAIL"
        print(
            f"throughput: first {window:.0f} s {first:,.0f}/s, last {window:.0f} s {last:,.0f}/s,"
            f" change {change:+.1%} (bar within {BAR_THROUGHPUT:.0%}): {verdict}"
        )
        # CPU the load process spends per request, first minute against last:
        # flat means the load process is not what slows down.
        cpu_window = min(60.0, duration / 2)
        head = [t for t in ticks if t[0] <= cpu_window + 1.0]
        tail = [t for t in ticks if t[0] >= ticks[-1][0] - cpu_window - 1.0] if ticks else []
        if len(head) >= 2 and len(tail) >= 2:
            per_request = [
                (b[3] - a[3]) / (b[1] - a[1]) * 1e6 if b[1] > a[1] else float("nan")
                for a, b in ((head[0], head[-1]), (tail[0], tail[-1]))
            ]
            print(
                f"load process cpu per request: first {per_request[0]:,.0f} us,"
                f" last {per_request[1]:,.0f} us (not a bar)"
            )
        # Other work on the machine moves the throughput of either minute: the
        # load averages let a reader tell (the soak itself keeps ~2-3 busy).
        print(
            f"load average (1 min): before {load_before:.2f}, end {os.getloadavg()[0]:.2f}"
            f" on {os.cpu_count()} cpus"
        )
        print(f"soak: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
