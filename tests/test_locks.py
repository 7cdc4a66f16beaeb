"""Which lock waits a migration is blamed for (pure: no database needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from harness.locks import LockWait, caused_by_others, summarize_by_file

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def wait(pid: int, start: float, end: float, blockers: list[tuple[int, str]]) -> LockWait:
    return LockWait(
        pid=pid,
        application_name="harness-load-abc",
        started_at=T0 + timedelta(seconds=start),
        last_seen_at=T0 + timedelta(seconds=end),
        relation="allocations",
        mode="RowExclusiveLock",
        query="INSERT INTO allocations ...",
        blocked_by_pids=[p for p, _ in blockers],
        blocked_by_queries=[
            "ALTER TABLE allocations ..." if a == "" else "INSERT ..." for _, a in blockers
        ],
        blocked_by_apps=[a for _, a in blockers],
    )


def test_waits_behind_the_migration_count_directly_and_down_the_queue():
    direct = wait(11, 1.0, 2.0, [(99, "")])  # 99: the runner (no load tag)
    queued = wait(12, 1.2, 2.0, [(11, "harness-load-abc")])  # behind 11 while 11 waited
    rivals = wait(13, 1.5, 1.6, [(14, "harness-load-abc")])  # two users racing: not ours
    later = wait(15, 5.0, 5.1, [(11, "harness-load-abc")])  # 11 no longer waited then
    blamed = caused_by_others([direct, queued, rivals, later])
    assert [w.pid for w in blamed] == [11, 12]


def test_summary_per_file_counts_only_blamed_waits_inside_its_window():
    waits = [
        wait(11, 1.0, 2.5, [(99, "")]),
        wait(12, 1.2, 2.0, [(11, "harness-load-abc")]),
        wait(13, 1.5, 1.6, [(14, "harness-load-abc")]),
    ]
    ledger = [
        {"file": "001_blockers.sql", "started_at": T0, "finished_at": T0 + timedelta(seconds=0.5)},
        {
            "file": "002_integrity.sql",
            "outcome": "applied",
            "started_at": (T0 + timedelta(seconds=0.9)).isoformat(),
            "finished_at": (T0 + timedelta(seconds=3)).isoformat(),
        },
    ]
    failures = [{"ts": (T0 + timedelta(seconds=2)).timestamp(), "outcome": "lock_not_available"}]
    rows = {r["file"]: r for r in summarize_by_file(waits, ledger, failures)}
    assert rows["001_blockers.sql"]["writers_blocked"] == 0
    during = rows["002_integrity.sql"]
    assert during["writers_blocked"] == 2 and during["waits"] == 2
    assert during["longest_wait_s"] == 1.5
    assert during["lock_not_available"] == 1 and during["query_canceled"] == 0
    assert during["blocking_statements"] == ["ALTER TABLE allocations ...", "INSERT ..."]
