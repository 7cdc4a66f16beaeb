"""Run folders for the report tests and benchmark, built from synthetic samples.

Every file is written in the shape the other stages write (see harness.rundir);
samples go through the samples module's own Arrow schema, so the report reads
them with the real ``read_samples``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harness.rundir import (
    LEDGER_FILE,
    MANIFEST_FILE,
    ROLLBACK_FILE,
    RUN_FILE,
    RUN_FORMAT_VERSION,
    VALIDATION_FILE,
    atomic_write_with,
    invariants_file,
    load_file,
    samples_file,
    write_json,
)
from harness.samples import SCHEMA

OPERATION_MIX: dict[str, float] = {
    "create_booking": 0.30,
    "update_booking": 0.10,
    "cancel_booking": 0.05,
    "place_hold": 0.20,
    "confirm_hold": 0.10,
    "release_hold": 0.05,
    "check_availability": 0.20,
}
# outcome -> (share, sqlstate, constraint) of the non-ok requests of a phase
POST_ERRORS: dict[str, tuple[float, str | None, str | None]] = {
    "exclusion_violation": (0.02, "23P01", "allocations_no_overlap"),
    "unique_violation": (0.005, "23505", "bookings_idempotency_key_key"),
    "deadlock_detected": (0.001, "40P01", None),
}
START_TS = 1_780_000_000.0


def synthetic_samples(
    n: int,
    *,
    phase: str,
    seed: int,
    duration_s: float = 60.0,
    latency_scale: float = 1.0,
    errors: Mapping[str, tuple[float, str | None, str | None]] | None = None,
    start_ts: float = START_TS,
) -> pd.DataFrame:
    """``n`` samples of one phase: lognormal latencies, the usual operation mix."""
    rng = np.random.default_rng(seed)
    ops = np.array(list(OPERATION_MIX))
    op_idx = rng.choice(len(ops), size=n, p=np.array(list(OPERATION_MIX.values())))
    outcome = np.full(n, "ok", dtype=object)
    sqlstate = np.full(n, None, dtype=object)
    constraint = np.full(n, None, dtype=object)
    draw = rng.random(n)
    edge = 0.0
    for name, (share, state, cons) in (errors or {}).items():
        hit = (draw >= edge) & (draw < edge + share)
        outcome[hit], sqlstate[hit], constraint[hit] = name, state, cons
        edge += share
    frame = pd.DataFrame(
        {
            "ts": start_ts + np.sort(rng.random(n)) * duration_s,
            "phase": pd.Categorical(np.full(n, phase, dtype=object)),
            "operation": pd.Categorical(ops[op_idx]),
            "outcome": pd.Categorical(outcome),
            "sqlstate": pd.array(sqlstate, dtype="string"),
            "constraint": pd.Categorical(constraint),
            "latency_ms": rng.lognormal(mean=1.0, sigma=0.5, size=n) * latency_scale,
            "user": rng.integers(0, 50, size=n).astype(np.int32),
            "worker": pd.Categorical(np.full(n, "local", dtype=object)),
        }
    )
    return frame


def write_samples_frame(path: Path, frame: pd.DataFrame) -> Path:
    """Write a DataFrame of the samples columns as the load stage does."""
    table = pa.Table.from_pandas(frame, schema=SCHEMA, preserve_index=False)
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


EXPECTED_CHECKS: tuple[tuple[str, str, str, bool | None], ...] = (
    ("allocations_no_overlap", "exclusion", "allocations", True),
    ("table_hold_windows_no_overlap", "exclusion", "table_hold_windows", True),
    ("table_inventory_table_restaurant_fkey", "foreign_key", "table_inventory", False),
    ("bookings_idempotency_key_key", "unique", "bookings", True),
    ("booking_slots_available_idx", "index", "booking_slots", None),
)
DIRT = {"null_party_size": 3, "duplicate_idempotency_key": 2, "overlapping_allocation": 4}


def write_run(
    run_dir: Path,
    *,
    samples: Mapping[str, pd.DataFrame],
    invariants: Mapping[str, Mapping[str, int]] | None = None,
    validation_ok: bool = True,
    quarantine: Mapping[str, int] | None = None,
    with_run: bool = True,
    target_display: str = "postgresql://rehearsal:***@db.example:6543/postgres",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A complete run folder: run.json, manifest, ledger, validation, phases."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if with_run:
        write_json(
            run_dir / RUN_FILE,
            {
                "run_id": run_dir.name,
                "format_version": RUN_FORMAT_VERSION,
                "started_at": "2026-06-01T10:00:00+00:00",
                "finished_at": "2026-06-01T10:05:00+00:00",
                "status": "completed",
                "failed_stage": None,
                "error": None,
                "target": {"display": target_display, "server_version": "18.1"},
                "settings": {"users": 20, "scale": 1.0},
                "stages": [
                    {
                        "name": "provision",
                        "started_at": "x",
                        "duration_s": 3.2,
                        "status": "completed",
                        "error": None,
                    },
                    {
                        "name": "migrate",
                        "started_at": "x",
                        "duration_s": 1.5,
                        "status": "completed",
                        "error": None,
                    },
                ],
            },
        )
    write_json(
        run_dir / MANIFEST_FILE,
        {"seed": 42, "scale": 1.0, "rows": {"bookings": 1000, "allocations": 900}, "dirt": DIRT},
    )
    write_json(
        run_dir / LEDGER_FILE,
        [
            {
                "file": f"00{i}_x.sql",
                "sha256": f"{i}" * 64,
                "started_at": "2026-06-01T10:01:00",
                "finished_at": "2026-06-01T10:01:01",
                "duration_s": 0.5 * i,
                "outcome": "applied",
                "error": None,
            }
            for i in range(1, 5)
        ],
    )
    checks = [
        {
            "name": name,
            "kind": kind,
            "table": table,
            "present": True,
            "validated": validated,
            "ok": True,
            "detail": "",
        }
        for name, kind, table, validated in EXPECTED_CHECKS
    ]
    if not validation_ok:
        checks[0].update(present=False, ok=False, detail="missing <b>allocations_no_overlap</b>")
    write_json(
        run_dir / VALIDATION_FILE,
        {
            "ok": validation_ok,
            "checks": checks,
            "integrity": {"orphan_allocations": 0},
            "invariants": {
                "overlapping_allocations": 0,
                "overlapping_holds": 0,
                "orphan_allocations": 0,
                "inventory_other_restaurant": 0,
            },
            "quarantine": dict(DIRT if quarantine is None else quarantine),
        },
    )
    write_json(
        run_dir / ROLLBACK_FILE,
        {"catalog_equal": True, "differences": [], "reapplied": True, "validation_ok": True},
    )
    for phase, frame in samples.items():
        write_samples_frame(run_dir / samples_file(phase), frame)
        ts = frame["ts"].to_numpy()
        write_json(
            run_dir / load_file(phase),
            {
                "phase": phase,
                "mode": "lax" if phase == "pre" else "strict",
                "users": 20,
                "spawn_rate": 10,
                "duration_s": float(ts.max() - ts.min()) if len(ts) else 0.0,
                "started_at": "2026-06-01T10:02:00+00:00",
                "ended_at": "2026-06-01T10:03:00+00:00",
                "requests": len(frame),
                "target": target_display,
            },
        )
    counts = {
        "overlapping_allocations": 0,
        "overlapping_holds": 0,
        "orphan_allocations": 0,
        "inventory_other_restaurant": 0,
    }
    for phase in samples:
        given = dict((invariants or {}).get(phase, {}))
        write_json(
            run_dir / invariants_file(phase),
            {"phase": phase, "counts": {**counts, **given}, "checked_at": "2026-06-01T10:04"},
        )
    for name, payload in (extra or {}).items():
        write_json(run_dir / name, payload)
    return run_dir


def standard_run(run_dir: Path, *, n: int = 4000, post_scale: float = 1.0, **kwargs: Any) -> Path:
    """A healthy pre/post run: same latency unless ``post_scale`` says otherwise."""
    samples = {
        "pre": synthetic_samples(n, phase="pre", seed=1),
        "post": synthetic_samples(
            n, phase="post", seed=2, latency_scale=post_scale, errors=POST_ERRORS
        ),
    }
    return write_run(run_dir, samples=samples, **kwargs)
