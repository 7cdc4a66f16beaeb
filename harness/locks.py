"""Lock-wait sampling while migrations run under live load (``rehearse --online``).

Every ``interval`` seconds one extra connection reads ``pg_locks`` and
``pg_stat_activity``: which sessions wait for a lock, since when
(``pg_locks.waitstart``), on which relation, and behind which sessions and
statements (``pg_blocking_pids``). Consecutive sightings of the same wait
(same pid, same ``waitstart``) are one :class:`LockWait`, so a writer that
waited 3 s behind ``ALTER TABLE ... ADD CONSTRAINT ... EXCLUDE`` is one row
with its start, its end as last seen, and the blocking statement.

The sampler runs in a thread; under Locust's gevent monkey-patching that
thread is a greenlet and psycopg waits cooperatively, so it does not stall the
load users it is watching.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from harness.target import Target

log = logging.getLogger(__name__)

# The load users tag their sessions with application names starting with this.
LOAD_APP_PREFIX = "harness-load"

# pg_locks.waitstart exists from PostgreSQL 14 on; older servers fall back to
# the first sighting, which is at most one interval late.
_SAMPLE = """
SELECT w.pid,
       coalesce(w.application_name, ''),
       coalesce(l.waitstart, clock_timestamp()),
       clock_timestamp(),
       coalesce(l.relation::regclass::text, l.locktype),
       l.mode,
       left(coalesce(w.query, ''), 300),
       pg_blocking_pids(w.pid),
       (SELECT array_agg(left(coalesce(b.query, ''), 300) ORDER BY b.pid)
          FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(w.pid))),
       (SELECT array_agg(coalesce(b.application_name, '') ORDER BY b.pid)
          FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(w.pid)))
  FROM pg_locks l
  JOIN pg_stat_activity w ON w.pid = l.pid
 WHERE NOT l.granted
   AND w.datname = current_database()
   AND w.pid <> pg_backend_pid()
"""
_SAMPLE_PG13 = _SAMPLE.replace("coalesce(l.waitstart, clock_timestamp())", "clock_timestamp()")


@dataclass
class LockWait:
    """One wait of one session for one lock, as sampled."""

    pid: int
    application_name: str
    started_at: datetime
    last_seen_at: datetime
    relation: str
    mode: str
    query: str
    blocked_by_pids: list[int] = field(default_factory=list)
    blocked_by_queries: list[str] = field(default_factory=list)
    blocked_by_apps: list[str] = field(default_factory=list)
    sightings: int = 1

    @property
    def wait_s(self) -> float:
        return max(0.0, (self.last_seen_at - self.started_at).total_seconds())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["started_at"] = self.started_at.isoformat()
        data["last_seen_at"] = self.last_seen_at.isoformat()
        data["wait_s"] = round(self.wait_s, 4)
        return data


@dataclass(frozen=True, kw_only=True)
class LockSamplerSettings:
    interval_s: float = 0.1
    # Sessions whose application_name starts with this are the migration
    # runner's own; their waits are reported too, but flagged.
    ignore_pids: frozenset[int] = frozenset()


class LockSampler:
    """Samples lock waits in the background between :meth:`start` and :meth:`stop`."""

    def __init__(self, target: Target, settings: LockSamplerSettings) -> None:
        self._target = target
        self._settings = settings
        self._waits: dict[tuple[int, datetime], LockWait] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples_taken = 0
        self.error: str | None = None

    def start(self) -> LockSampler:
        self._thread = threading.Thread(target=self._run, name="lock-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[LockWait]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return sorted(self._waits.values(), key=lambda w: (w.started_at, w.pid))

    def _run(self) -> None:
        try:
            with self._target.connect(
                autocommit=True, application_name="harness-lock-sampler"
            ) as conn:
                query = _SAMPLE if self._target.server_version_num >= 140000 else _SAMPLE_PG13
                while not self._stop.is_set():
                    began = time.perf_counter()
                    self._record(conn.execute(query).fetchall())
                    self.samples_taken += 1
                    left = self._settings.interval_s - (time.perf_counter() - began)
                    if left > 0:
                        self._stop.wait(left)
        except psycopg.Error as exc:
            # The sampler must never take the rehearsal down: keep what it saw.
            self.error = f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
            log.warning("lock sampler stopped: %s", self.error)

    def _record(self, rows: list[tuple[Any, ...]]) -> None:
        for row in rows:
            pid, app, waitstart, now, relation, mode, query = row[:7]
            blockers, blocker_queries, blocker_apps = row[7] or [], row[8] or [], row[9] or []
            if pid in self._settings.ignore_pids:
                continue
            key = (pid, waitstart)
            wait = self._waits.get(key)
            if wait is None:
                self._waits[key] = LockWait(
                    pid=pid,
                    application_name=app,
                    started_at=waitstart,
                    last_seen_at=now,
                    relation=relation,
                    mode=mode,
                    query=query,
                    blocked_by_pids=list(blockers),
                    blocked_by_queries=list(blocker_queries),
                    blocked_by_apps=list(blocker_apps),
                )
            else:
                wait.last_seen_at = now
                wait.sightings += 1
                for pid_b, query_b, app_b in zip(
                    blockers, blocker_queries, blocker_apps, strict=False
                ):
                    if pid_b not in wait.blocked_by_pids:
                        wait.blocked_by_pids.append(pid_b)
                        wait.blocked_by_queries.append(query_b)
                        wait.blocked_by_apps.append(app_b)


def caused_by_others(waits: list[LockWait], load_prefix: str = LOAD_APP_PREFIX) -> list[LockWait]:
    """The waits the load's own sessions did not cause.

    The load users wait on each other all the time (a rival's uncommitted
    booking, a hot slot row). A wait counts against the migration when one of
    its blockers is not a load session (the runner), or is a load session that
    was itself waiting behind such a wait at the time: writers queued behind a
    writer queued behind the ALTER TABLE were blocked by it too.
    """
    by_pid: dict[int, list[int]] = {}
    for i, wait in enumerate(waits):
        by_pid.setdefault(wait.pid, []).append(i)
    caused: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i, wait in enumerate(waits):
            if i in caused:
                continue
            for pid_b, app_b in zip(wait.blocked_by_pids, wait.blocked_by_apps, strict=False):
                if not app_b.startswith(load_prefix) or any(
                    j in caused
                    and waits[j].started_at <= wait.last_seen_at
                    and wait.started_at <= waits[j].last_seen_at
                    for j in by_pid.get(pid_b, ())
                ):
                    caused.add(i)
                    changed = True
                    break
    return [w for i, w in enumerate(waits) if i in caused]


def summarize_by_file(
    waits: list[LockWait], ledger: list[dict[str, Any]], failures: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per migration file: writers it blocked, longest wait, failed requests in its window.

    ``ledger`` rows need ``file``, ``started_at``, ``finished_at`` (ISO strings or
    datetimes); ``failures`` rows need ``ts`` (epoch seconds) and ``outcome``.
    A wait belongs to the file that was running when the wait began; only the
    waits the migration caused (:func:`caused_by_others`) count as blocked.
    """
    rows = []
    blamed = caused_by_others(waits)
    for entry in ledger:
        start, end = _as_dt(entry.get("started_at")), _as_dt(entry.get("finished_at"))
        if start is None or end is None:
            continue
        inside = [w for w in blamed if start <= w.started_at <= end]
        t0, t1 = start.timestamp(), end.timestamp()
        failed = [f for f in failures if t0 <= f["ts"] <= t1]
        rows.append(
            {
                "file": entry["file"],
                "outcome": entry.get("outcome"),
                "started_at": start.isoformat(),
                "finished_at": end.isoformat(),
                "duration_s": round(t1 - t0, 4),
                "writers_blocked": len({w.pid for w in inside}),
                "waits": len(inside),
                "longest_wait_s": round(max((w.wait_s for w in inside), default=0.0), 4),
                "total_wait_s": round(sum(w.wait_s for w in inside), 4),
                "lock_not_available": sum(f["outcome"] == "lock_not_available" for f in failed),
                "query_canceled": sum(f["outcome"] == "query_canceled" for f in failed),
                "blocking_statements": sorted(
                    {q.strip()[:120] for w in inside for q in w.blocked_by_queries if q}
                ),
            }
        )
    return rows


def _as_dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))
