"""Report stage: the sign-off page of a rehearsal, built from its run folder.

Reporting is pure: the files the other stages left in the run folder (see
:mod:`harness.rundir`) go in; DataFrames, one self-contained HTML page, a JSON
summary, JUnit XML and the app's error mapping come out. No database is
touched, so every part is testable on files a test writes itself.

Entry point: :func:`build_report` (settings in, :class:`ReportResult` out). The
nightly job reuses :func:`bootstrap_quantile_delta` to compare runs, and
:func:`load_gates` to read the same gates file.

Written into the run folder, each atomically:

- ``report.html``: one page, charts embedded as base64 PNG, no network.
- ``junit.xml``: one ``<testcase>`` per gate (a ``<failure>`` when it failed).
- ``error_mapping.json``: the ``error_mapping`` list below, on its own.
- ``summary.json``: every figure on the page. Its shape (``format_version`` 1)::

    {
      "format_version": 1,
      "run_id": str | null, "generated_at": ISO time, "harness_version": str,
      "verdict": "PASS" | "FAIL", "gates_source": "defaults" | path,
      "gates": [{"name", "title", "status": "pass"|"fail"|"not_measured",
                 "passed": bool, "threshold": str, "measured": str,
                 "value": number | null, "detail": str}],
      "missing": [str],                       # inputs absent, one line each
      "run": {"run_id", "status", "failed_stage", "error", "started_at",
              "finished_at", "duration_s", "target", "server_version",
              "seed", "scale", "rows": {table: n}, "dirt": {reason: n},
              "settings": {...},                # run.json's, passwords masked
              "stages": [{"name", "status", "duration_s", "error"}]},
      "phases": {phase: {"present": bool, "missing_reason": str | null,
                         "mode", "users", "spawn_rate", "duration_s",
                         "started_at", "ended_at", "requests",
                         "throughput_rps", "counted_requests", "interrupted",
                         "contention": {...} | null,
                         "longest_no_ok_s", "longest_no_ok_from",
                         "connection_errors"}},  # null without samples
      "latency": {phase: {operation | "all": {"requests", "throughput_rps",
                  "p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"}}},
      "outcome_rates": {phase: {operation | "all": {outcome:
                        {"count", "share", "per_s"}}}},     # share is 0..1
      "comparison": {
        "p95": {operation: {"pre_ms", "post_ms", "delta_ms", "delta_pct",
                            "ci_low_ms", "ci_high_ms", "confidence",
                            "noise": bool, "n_pre", "n_post"}},
        "rates": {operation: {outcome: {"pre_share", "post_share",
                  "delta_share", "pre_per_s", "post_per_s"}}}},
      "integrity": {"invariants": {phase: {check: n} | null},
                    "quarantine": [{"reason", "planted", "quarantined",
                                    "match"}],
                    "validation": {"ok", "checks": [...], "integrity": {...},
                                   "invariants": {check: n} | null} | null,
                    "rollback": {...} | null},
      "error_mapping": [{"sqlstate", "outcome", "constraint", "operation",
                         "count", "counts": {phase: n}, "http_status",
                         "response", "retry"}],
      "migrations": {file: {"sha256", "outcome", "duration_s", "mode",
                            "started_at", "finished_at", "sqlstate",
                            "error"}},
      "lint": {"ok", "squawk_version", "new": n, "accepted": n,
               "findings": [{"file", "line", "rule", "level", "message",
                             "accepted", "reason"}]} | null,
      "online": {"writers_blocked": n, "longest_wait_s",
                 "samples_taken", "interval_s", "sampler_error",
                 "files": [{"file", "duration_s", "writers_blocked", "waits",
                            "longest_wait_s", "total_wait_s",
                            "lock_not_available", "query_canceled",
                            "blocking_statements"}],
                 "waits": n, "longest_waits": [{"relation", "mode",
                 "wait_s", "query", "blocked_by_queries", "started_at"}]}
                | null,                       # only after `rehearse --online`
      "nightly": {"compared_with", "compared_runs", "regressions": n,
                  "comparisons": [{"kind", "name", "current", "baseline",
                                   "limit", "regression", "detail"}],
                  "history": [{...}]} | null,  # only under `harness nightly`
      "monitoring": {"baseline_phase", "spike_factor", "min_share_pct",
                     "min_per_minute",
                     "thresholds": [{"operation", "outcome", "sqlstate",
                                     "baseline_share", "baseline_per_minute",
                                     "alert_share", "alert_per_minute"}]}
    }

  The nightly comparison reads ``latency[phase][operation]["p95_ms"]``,
  ``outcome_rates[phase][operation][outcome]["share"]`` and
  ``migrations[file]["duration_s"]``. Numbers that could not be measured are
  ``null``, never NaN.

Percentiles are exact (numpy's linear interpolation over every sample), not
Locust's rounded histogram buckets.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import io
import json
import logging
import math
import re
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import __version__
from harness.errors import ConfigError, ExitStatus, SamplesError
from harness.outcomes import OUTCOMES, Outcome, Phase
from harness.rundir import (
    ERROR_MAPPING_FILE,
    JUNIT_FILE,
    LEDGER_FILE,
    LINT_FILE,
    MANIFEST_FILE,
    ONLINE_FILE,
    REPORT_FILE,
    ROLLBACK_FILE,
    RUN_FILE,
    RUN_FORMAT_VERSION,
    SUMMARY_FILE,
    VALIDATION_FILE,
    atomic_write_bytes,
    invariants_file,
    load_file,
    read_json,
    samples_file,
    write_json,
)
from harness.samples import read_samples
from harness.target import mask_url

log = logging.getLogger(__name__)

SUMMARY_FORMAT_VERSION = 1
# Written by harness.nightly (its NIGHTLY_FILE); named here so the report does
# not import the nightly stage and, through it, the load users.
NIGHTLY_FILE = "nightly.json"

# The load users' operation names (harness.load's Operation), repeated here so
# that building a report never imports Locust and its gevent monkey-patching.
OPERATIONS: tuple[str, ...] = (
    "create_booking",
    "update_booking",
    "cancel_booking",
    "place_hold",
    "confirm_hold",
    "release_hold",
    "check_availability",
)
ALL = "all"
PHASES: tuple[str, ...] = tuple(str(p) for p in Phase)
INVARIANT_CHECKS: tuple[str, ...] = (
    "overlapping_allocations",
    "overlapping_holds",
    "orphan_allocations",
    "inventory_other_restaurant",
)
# The refusals the runbook watches: their rates are compared and monitored.
WATCHED: tuple[tuple[Outcome, str], ...] = (
    (Outcome.EXCLUSION_VIOLATION, "23P01"),
    (Outcome.UNIQUE_VIOLATION, "23505"),
)
_OUTCOME_SQLSTATE: dict[str, str] = {
    "ok": "",
    "exclusion_violation": "23P01",
    "unique_violation": "23505",
    "foreign_key_violation": "23503",
    "not_null_violation": "23502",
    "check_violation": "23514",
    "deadlock_detected": "40P01",
    "serialization_failure": "40001",
    "lock_not_available": "55P03",
    "query_canceled": "57014",
    "connection_error": "08xxx",
}
# Charts: roughly this many time buckets per phase.
_TIME_BUCKETS = 60
_CDF_POINTS = 400


# --------------------------------------------------------------------------
# Gates: the TOML file and its typed form


@dataclass(frozen=True, kw_only=True)
class DoubleBookingGate:
    enabled: bool
    max_overlaps: int


@dataclass(frozen=True, kw_only=True)
class ExpectedObjectsGate:
    enabled: bool


@dataclass(frozen=True, kw_only=True)
class P95RegressionGate:
    enabled: bool
    operations: tuple[str, ...]
    max_increase_pct: float
    max_increase_ms: float
    min_requests: int
    confidence: float
    bootstrap_resamples: int
    bootstrap_max_samples: int
    bootstrap_seed: int


@dataclass(frozen=True, kw_only=True)
class UnexpectedErrorsGate:
    enabled: bool
    max_share_pct: float
    expected: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class RollbackDrillGate:
    enabled: bool


@dataclass(frozen=True, kw_only=True)
class RunCompletedGate:
    enabled: bool


@dataclass(frozen=True, kw_only=True)
class MonitoringSettings:
    baseline_phase: str
    spike_factor: float
    min_share_pct: float
    min_per_minute: float


@dataclass(frozen=True, kw_only=True)
class Gates:
    """The gates file, read over the packaged defaults (``harness/gates.toml``)."""

    source: str
    fail_when_not_measured: bool
    double_booking: DoubleBookingGate
    expected_objects: ExpectedObjectsGate
    p95_regression: P95RegressionGate
    unexpected_errors: UnexpectedErrorsGate
    rollback_drill: RollbackDrillGate
    run_completed: RunCompletedGate
    monitoring: MonitoringSettings


_SECTIONS: dict[str, type] = {
    "double_booking": DoubleBookingGate,
    "expected_objects": ExpectedObjectsGate,
    "p95_regression": P95RegressionGate,
    "unexpected_errors": UnexpectedErrorsGate,
    "rollback_drill": RollbackDrillGate,
    "run_completed": RunCompletedGate,
    "monitoring": MonitoringSettings,
}
DEFAULT_GATES_NAME = "gates.toml"


def default_gates_text() -> str:
    """The packaged defaults, comments and all (``harness/gates.toml``)."""
    return importlib.resources.files("harness").joinpath(DEFAULT_GATES_NAME).read_text()


def load_gates(path: Path | None = None) -> Gates:
    """Read ``path`` over the packaged defaults; ``None`` gives the defaults.

    Unknown keys, wrong types and out-of-range values are a :class:`ConfigError`
    naming the key and the file.
    """
    defaults = tomllib.loads(default_gates_text())
    if path is None:
        return _gates_from(defaults, source="defaults")
    path = Path(path)
    try:
        override = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"gates file {path} not found", hint="give an existing file to --gates"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read gates file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"gates file {path} is not valid TOML: {exc}",
            hint="see harness/gates.toml for the format",
        ) from None
    merged = _merge(defaults, override, source=str(path))
    return _gates_from(merged, source=str(path))


def _merge(
    defaults: Mapping[str, Any], override: Mapping[str, Any], *, source: str, prefix: str = ""
) -> dict[str, Any]:
    merged = dict(defaults)
    for key, value in override.items():
        name = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(f"{prefix}{k}" for k in defaults)
            raise ConfigError(
                f"unknown gate setting {name!r} in {source}", hint=f"known settings: {known}"
            )
        default = defaults[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name!r} in {source} must be a table ([{name}])")
            merged[key] = _merge(default, value, source=source, prefix=f"{name}.")
        else:
            _check_type(name, value, default, source)
            merged[key] = value
    return merged


def _check_type(name: str, value: Any, default: Any, source: str) -> None:
    # bool is an int in Python: check it first so `max_overlaps = true` is refused.
    if isinstance(default, bool):
        ok, wanted = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        wanted = "a number"
    elif isinstance(default, str):
        ok, wanted = isinstance(value, str), "a string"
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        wanted = "a list of strings"
    else:  # pragma: no cover - the packaged defaults only hold the types above
        ok, wanted = True, ""
    if not ok:
        raise ConfigError(
            f"gate setting {name!r} in {source} must be {wanted}, got {value!r}",
            hint="see harness/gates.toml for the defaults",
        )


def _gates_from(data: Mapping[str, Any], *, source: str) -> Gates:
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        values = dict(data[section])
        for f in fields(cls):
            if isinstance(values[f.name], list):
                values[f.name] = tuple(values[f.name])
        sections[section] = cls(**values)
    gates = Gates(source=source, fail_when_not_measured=data["fail_when_not_measured"], **sections)
    _check_ranges(gates)
    return gates


def _check_ranges(g: Gates) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"gate setting {name!r} in {g.source} {why}")

    p = g.p95_regression
    if g.double_booking.max_overlaps < 0:
        raise bad("double_booking.max_overlaps", "must be 0 or more")
    for op in p.operations:
        if op not in OPERATIONS:
            raise bad("p95_regression.operations", f"names unknown operation {op!r}")
    for name in ("max_increase_pct", "max_increase_ms"):
        if getattr(p, name) < 0:
            raise bad(f"p95_regression.{name}", "must be 0 or more")
    if p.min_requests < 2:
        raise bad("p95_regression.min_requests", "must be at least 2")
    if not 0 < p.confidence < 1:
        raise bad("p95_regression.confidence", "must be between 0 and 1, e.g. 0.95")
    if p.bootstrap_resamples < 100:
        raise bad("p95_regression.bootstrap_resamples", "must be at least 100")
    if p.bootstrap_max_samples < 100:
        raise bad("p95_regression.bootstrap_max_samples", "must be at least 100")
    u = g.unexpected_errors
    if not 0 <= u.max_share_pct <= 100:
        raise bad("unexpected_errors.max_share_pct", "must be between 0 and 100")
    known = {str(o) for o in OUTCOMES}
    for name in u.expected:
        if name not in known:
            raise bad("unexpected_errors.expected", f"names unknown outcome {name!r}")
    m = g.monitoring
    if m.baseline_phase not in PHASES:
        raise bad("monitoring.baseline_phase", f"must be one of {', '.join(PHASES)}")
    for name in ("spike_factor", "min_share_pct", "min_per_minute"):
        if getattr(m, name) < 0:
            raise bad(f"monitoring.{name}", "must be 0 or more")


# --------------------------------------------------------------------------
# Settings and results


@dataclass(frozen=True, kw_only=True)
class ReportSettings:
    """What to report on; every field but ``run_dir`` has a default."""

    run_dir: Path
    # None: the packaged defaults (harness/gates.toml)
    gates_file: Path | None = None
    # charts cost most of the time; off only where nobody looks at the page
    charts: bool = True


class Verdict(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"


class GateStatus(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    NOT_MEASURED = "not_measured"


@dataclass(frozen=True, kw_only=True)
class GateResult:
    name: str
    title: str
    status: GateStatus
    threshold: str
    measured: str
    # the measured figure the threshold applies to, when there is one
    value: float | None = None
    detail: str = ""
    # whether this gate's status counts against the verdict
    passed: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "status": str(self.status),
            "passed": self.passed,
            "threshold": self.threshold,
            "measured": self.measured,
            "value": _clean(self.value),
            "detail": self.detail,
        }


@dataclass(frozen=True, kw_only=True)
class ReportResult:
    verdict: Verdict
    gates: tuple[GateResult, ...]
    run_dir: Path
    report_html: Path
    summary_json: Path
    junit_xml: Path
    error_mapping_json: Path
    missing: tuple[str, ...] = ()
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def exit_status(self) -> ExitStatus:
        return ExitStatus.SUCCESS if self.verdict is Verdict.PASS else ExitStatus.CHECK_FAILED


# --------------------------------------------------------------------------
# Bootstrap confidence interval of a change in a quantile


@dataclass(frozen=True, kw_only=True)
class DeltaCI:
    """Change of a quantile from ``baseline`` to ``candidate`` with its CI."""

    quantile: float
    baseline: float
    candidate: float
    delta: float
    low: float
    high: float
    confidence: float
    n_baseline: int
    n_candidate: int
    resamples: int

    @property
    def delta_pct(self) -> float | None:
        return None if self.baseline == 0 else 100.0 * self.delta / self.baseline

    @property
    def noise(self) -> bool:
        """True when the interval contains zero: the data cannot tell a change."""
        return self.low <= 0.0 <= self.high


def bootstrap_quantile_delta(
    baseline: Sequence[float] | np.ndarray,
    candidate: Sequence[float] | np.ndarray,
    *,
    quantile: float = 0.95,
    confidence: float = 0.95,
    resamples: int = 1000,
    max_samples: int = 10_000,
    seed: int = 0,
) -> DeltaCI:
    """Bootstrap CI of ``quantile(candidate) - quantile(baseline)``.

    The point estimate uses every value. For the interval each side is
    resampled independently; a side larger than ``max_samples`` is first
    subsampled without replacement and its bootstrap deviations are rescaled
    by sqrt(m/n) (the m-out-of-n bootstrap: a sample quantile's spread shrinks
    as 1/sqrt(n)), so a million samples cost as much as ``max_samples`` and
    the interval keeps the width the full data would give. Deterministic for
    a given ``seed``.
    """
    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("both samples need at least one value")
    rng = np.random.default_rng(seed)
    est_a, dev_a = _bootstrap_deviations(a, quantile, resamples, max_samples, rng)
    est_b, dev_b = _bootstrap_deviations(b, quantile, resamples, max_samples, rng)
    delta = est_b - est_a
    alpha = 1.0 - confidence
    lo, hi = np.quantile(dev_b - dev_a, [alpha / 2.0, 1.0 - alpha / 2.0])
    return DeltaCI(
        quantile=quantile,
        baseline=float(est_a),
        candidate=float(est_b),
        delta=float(delta),
        low=float(delta + lo),
        high=float(delta + hi),
        confidence=confidence,
        n_baseline=int(a.size),
        n_candidate=int(b.size),
        resamples=resamples,
    )


def _bootstrap_deviations(
    values: np.ndarray, q: float, resamples: int, max_samples: int, rng: np.random.Generator
) -> tuple[float, np.ndarray]:
    """(quantile of ``values``, bootstrap deviations of it around its estimate)."""
    n = values.size
    estimate = float(np.quantile(values, q))
    if n > max_samples:
        sub = rng.choice(values, size=max_samples, replace=False)
        scale = math.sqrt(max_samples / n)
    else:
        sub, scale = values, 1.0
    m = sub.size
    center = float(np.quantile(sub, q))
    out = np.empty(resamples, dtype=np.float64)
    # Resample in chunks of ~4M values so memory stays flat whatever the size.
    chunk = max(1, 4_000_000 // m)
    for start in range(0, resamples, chunk):
        k = min(chunk, resamples - start)
        idx = rng.integers(0, m, size=(k, m))
        out[start : start + k] = np.quantile(sub[idx], q, axis=1)
    return estimate, (out - center) * scale


# --------------------------------------------------------------------------
# Reading the run folder


@dataclass(kw_only=True)
class _PhaseInput:
    phase: str
    samples: pd.DataFrame | None
    load: dict[str, Any] | None
    invariants: dict[str, Any] | None
    missing_reason: str | None
    duration_s: float | None


@dataclass(kw_only=True)
class _RunInput:
    run_dir: Path
    run: dict[str, Any] | None
    manifest: dict[str, Any] | None
    ledger: list[dict[str, Any]] | None
    validation: dict[str, Any] | None
    rollback: dict[str, Any] | None
    lint: dict[str, Any] | None
    online: dict[str, Any] | None
    nightly: dict[str, Any] | None
    phases: dict[str, _PhaseInput]
    missing: list[str]

    def present(self, phase: str) -> bool:
        return self.phases[phase].samples is not None


# What the report reads of each JSON file, checked once when the file is read
# so that a damaged or foreign file is one error naming it, never a traceback
# deep inside the page. Every field may be absent or null unless it is listed
# in _REQUIRED; ("list", {...}) is a list of objects checked field by field.
_NUMBER_LIST_ITEM = {"duration_s": "num"}
_SHAPES: dict[str, dict[str, Any]] = {
    RUN_FILE: {
        "status": "str",
        "failed_stage": "str",
        "started_at": "str",
        "finished_at": "str",
        "target": "dict",
        "settings": "dict",
        "stages": ("list", _NUMBER_LIST_ITEM),
    },
    MANIFEST_FILE: {"rows": "dict[num]", "dirt": "dict[num]"},
    LEDGER_FILE: {"entries": ("list", {"file": "str", "duration_s": "num"})},
    VALIDATION_FILE: {
        "checks": ("list", {}),
        "integrity": "dict[num]",
        "quarantine": "dict[num]",
        "invariants": "dict[num]",
    },
    ROLLBACK_FILE: {"differences": "list", "duration_s": "num"},
    LINT_FILE: {"new": ("list", {"line": "num"}), "accepted": ("list", {"line": "num"})},
    ONLINE_FILE: {
        "samples_taken": "num",
        "interval_s": "num",
        "files": (
            "list",
            {
                k: "num"
                for k in (
                    "duration_s",
                    "writers_blocked",
                    "waits",
                    "longest_wait_s",
                    "total_wait_s",
                    "lock_not_available",
                    "query_canceled",
                )
            }
            | {"blocking_statements": "list"},
        ),
        "waits": ("list", {"wait_s": "num", "blocked_by_queries": "list"}),
    },
    NIGHTLY_FILE: {
        "compared_with": "num",
        "compared_runs": "list",
        "comparisons": (
            "list",
            {"current": "num", "baseline": "num", "limit": "num", "regression": "bool"},
        ),
        "history": ("list", {}),
    },
    "load": {"duration_s": "num", "contention": "dict"},
    "invariants": {"counts": "dict[num]"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    LEDGER_FILE: ("file",),
    "invariants": ("counts",),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_KINDS: dict[str, tuple[str, Any]] = {
    "num": ("a number", _is_number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "dict[num]": (
        "an object of numbers",
        lambda v: isinstance(v, dict) and all(x is None or _is_number(x) for x in v.values()),
    ),
}


def _check_shape(
    path: Path, data: Mapping[str, Any], spec: Mapping[str, Any], required: Sequence[str] = ()
) -> None:
    def bad(name: str, wanted: str, value: Any) -> SamplesError:
        return SamplesError(
            f"{path}: {name!r} must be {wanted}, found {type(value).__name__}",
            hint="the file was damaged or written by something else; rerun that stage",
        )

    for key in required:
        if data.get(key) is None:
            raise SamplesError(f"{path}: {key!r} is missing", hint="rerun that stage")
    for key, want in spec.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(want, tuple):
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise bad(key, "a list of objects", value)
            for i, item in enumerate(value):
                for sub, sub_want in want[1].items():
                    wanted, ok = _KINDS[sub_want]
                    if item.get(sub) is not None and not ok(item[sub]):
                        raise bad(f"{key}[{i}].{sub}", wanted, item[sub])
            continue
        wanted, ok = _KINDS[want]
        if not ok(value):
            raise bad(key, wanted, value)


def _optional_json(
    path: Path, kind: type, missing: list[str], why: str, shape: str | None = None
) -> Any:
    """The file's JSON, checked against ``_SHAPES[shape or path.name]``; None if absent."""
    if not path.exists():
        missing.append(f"{path.name}: not found ({why})")
        return None
    data = read_json(path)
    if not isinstance(data, kind):
        raise SamplesError(
            f"{path} does not have the expected shape: expected a JSON "
            f"{'object' if kind is dict else 'list'}, found {type(data).__name__}",
            hint="the file was not written by this harness's stages; rerun that stage",
        )
    key = shape or path.name
    if kind is list:
        # a list file (the ledger): check it as the entries of an object
        _check_shape(path, {"entries": data}, _SHAPES[key])
        for entry in data:
            _check_shape(path, entry, {}, _REQUIRED.get(key, ()))
    else:
        _check_shape(path, data, _SHAPES.get(key, {}), _REQUIRED.get(key, ()))
    return data


def _read_run(run_dir: Path) -> _RunInput:
    if not run_dir.is_dir():
        raise ConfigError(
            f"run folder {run_dir} does not exist",
            hint="give a folder written by `harness rehearse`, e.g. reports/latest",
        )
    known = [RUN_FILE, MANIFEST_FILE, LEDGER_FILE, VALIDATION_FILE, ROLLBACK_FILE]
    known += [f(p) for p in PHASES for f in (samples_file, load_file, invariants_file)]
    if not any((run_dir / name).exists() for name in known):
        raise ConfigError(
            f"{run_dir} holds none of the files a rehearsal writes ({RUN_FILE},"
            f" {samples_file('pre')}, ...)",
            hint="give a run folder under reports/, e.g. reports/latest",
        )
    missing: list[str] = []
    run = _optional_json(run_dir / RUN_FILE, dict, missing, "no run record")
    if run is not None:
        version = run.get("format_version")
        if version != RUN_FORMAT_VERSION:
            raise SamplesError(
                f"{run_dir / RUN_FILE} has format_version {version!r}; this harness reads"
                f" version {RUN_FORMAT_VERSION}",
                hint="build the report with the harness version that wrote the run",
            )
    manifest = _optional_json(run_dir / MANIFEST_FILE, dict, missing, "provision did not run")
    ledger = _optional_json(run_dir / LEDGER_FILE, list, missing, "migrate did not run")
    validation = _optional_json(run_dir / VALIDATION_FILE, dict, missing, "validate did not run")
    rollback = _optional_json(
        run_dir / ROLLBACK_FILE, dict, missing, "the rollback drill did not run"
    )
    lint = _optional_json(run_dir / LINT_FILE, dict, missing, "lint did not run")
    # online.json exists only for `rehearse --online`: its absence is no news
    online = _optional_json(run_dir / ONLINE_FILE, dict, [], "")
    # nightly.json: written by `harness nightly` before it rebuilds this report
    nightly = _optional_json(run_dir / NIGHTLY_FILE, dict, [], "")
    phases = {p: _read_phase(run_dir, p, missing) for p in PHASES}
    return _RunInput(
        run_dir=run_dir,
        run=run,
        manifest=manifest,
        ledger=ledger,
        validation=validation,
        rollback=rollback,
        lint=lint,
        online=online,
        nightly=nightly,
        phases=phases,
        missing=missing,
    )


def _read_phase(run_dir: Path, phase: str, missing: list[str]) -> _PhaseInput:
    # The online phase is optional: its absence is not worth a line.
    quiet: list[str] = []
    sink = quiet if phase == Phase.ONLINE else missing
    load = _optional_json(
        run_dir / load_file(phase), dict, sink, f"the {phase} load did not run", "load"
    )
    invariants = _optional_json(
        run_dir / invariants_file(phase),
        dict,
        sink,
        f"invariants after {phase} not checked",
        "invariants",
    )
    path = run_dir / samples_file(phase)
    if not path.exists():
        reason = f"{path.name} not found: the {phase} load did not run or did not finish"
        sink.append(reason)
        return _PhaseInput(
            phase=phase,
            samples=None,
            load=load,
            invariants=invariants,
            missing_reason=reason,
            duration_s=None,
        )
    frame = _prepare_samples(read_samples(path), path)
    return _PhaseInput(
        phase=phase,
        samples=frame,
        load=load,
        invariants=invariants,
        missing_reason=None,
        duration_s=_phase_duration(frame, load),
    )


_SAMPLE_COLUMNS = ("ts", "operation", "outcome", "sqlstate", "constraint", "latency_ms")


def _prepare_samples(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    absent = [c for c in _SAMPLE_COLUMNS if c not in frame.columns]
    if absent:
        raise SamplesError(
            f"{path} lacks the column(s) {', '.join(absent)}",
            hint="rerun the load stage with this harness version",
        )
    # Categories make every group-by below cheap; the rest of the columns are
    # not needed by the report and are dropped to keep memory down.
    try:
        return pd.DataFrame(
            {
                "ts": frame["ts"].to_numpy(dtype=np.float64, copy=False),
                "operation": frame["operation"].astype("category"),
                "outcome": frame["outcome"].astype("category"),
                "sqlstate": frame["sqlstate"],
                "constraint": frame["constraint"],
                "latency_ms": frame["latency_ms"].to_numpy(dtype=np.float64, copy=False),
            }
        )
    except (TypeError, ValueError) as exc:
        raise SamplesError(
            f"{path} has a column of the wrong type: {exc}",
            hint="rerun the load stage with this harness version",
        ) from None


def _phase_duration(frame: pd.DataFrame, load: Mapping[str, Any] | None) -> float | None:
    """The phase's wall time: the load's own figure, else the span of its samples."""
    if load is not None:
        value = load.get("duration_s")
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return float(value)
    if frame.empty:
        return None
    ts = frame["ts"].to_numpy()
    span = float(ts.max() - ts.min())
    return span if span > 0 else None


# --------------------------------------------------------------------------
# Figures: latency, outcomes, comparison


def latency_table(frame: pd.DataFrame, duration_s: float | None) -> pd.DataFrame:
    """Per operation (and ``all``): requests, throughput and exact percentiles."""
    columns = ["requests", "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"]
    if frame.empty:
        return pd.DataFrame(columns=columns, index=pd.Index([], name="operation"))
    grouped = frame.groupby("operation", observed=True, sort=True)["latency_ms"]
    quantiles = grouped.quantile([0.5, 0.95, 0.99]).unstack()
    table = pd.DataFrame(
        {
            "requests": grouped.size(),
            "p50_ms": quantiles[0.5],
            "p95_ms": quantiles[0.95],
            "p99_ms": quantiles[0.99],
            "max_ms": grouped.max(),
            "mean_ms": grouped.mean(),
        }
    )
    table.index = table.index.astype(str)
    values = frame["latency_ms"].to_numpy()
    p50, p95, p99 = np.quantile(values, [0.5, 0.95, 0.99])
    table.loc[ALL] = [len(values), p50, p95, p99, values.max(), values.mean()]
    table["requests"] = table["requests"].astype("int64")
    table["throughput_rps"] = table["requests"] / duration_s if duration_s else np.nan
    table = table.reindex(_operation_order(table.index))
    table.index.name = "operation"
    return table[columns]


def _operation_order(names: Any) -> list[str]:
    """The load users' order (create first), unknown names after, ``all`` last."""
    present = {str(n) for n in names}
    known = [op for op in OPERATIONS if op in present]
    others = sorted(present - set(OPERATIONS) - {ALL})
    return known + others + ([ALL] if ALL in present else [])


def outcome_table(frame: pd.DataFrame, duration_s: float | None) -> pd.DataFrame:
    """Long table: operation (and ``all``), outcome, count, share (0..1), per_s."""
    columns = ["operation", "outcome", "count", "share", "per_s"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    counts = frame.groupby(["operation", "outcome"], observed=True).size()
    counts = counts[counts > 0].rename("count").reset_index()
    totals = frame.groupby("operation", observed=True).size()
    all_counts = frame.groupby("outcome", observed=True).size()
    all_counts = all_counts[all_counts > 0].rename("count").reset_index()
    all_counts.insert(0, "operation", ALL)
    table = pd.concat(
        [counts.astype({"operation": str, "outcome": str}), all_counts.astype({"outcome": str})],
        ignore_index=True,
    )
    totals_map = {str(k): int(v) for k, v in totals.items()}
    totals_map[ALL] = len(frame)
    table["count"] = table["count"].astype("int64")
    table["share"] = table["count"] / table["operation"].map(totals_map)
    table["per_s"] = table["count"] / duration_s if duration_s else np.nan
    op_rank = {op: i for i, op in enumerate(_operation_order(table["operation"]))}
    outcome_rank = {str(o): i for i, o in enumerate(OUTCOMES)}
    table = table.assign(
        _op=table["operation"].map(op_rank),
        _outcome=table["outcome"].map(outcome_rank).fillna(len(outcome_rank)),
    )
    table = table.sort_values(["_op", "_outcome", "outcome"], kind="stable")
    return table[columns].reset_index(drop=True)


def _p95_comparison(run: _RunInput, gate: P95RegressionGate) -> dict[str, DeltaCI | None]:
    out: dict[str, DeltaCI | None] = {}
    pre, post = run.phases[Phase.PRE].samples, run.phases[Phase.POST].samples
    for op in gate.operations:
        if pre is None or post is None:
            out[op] = None
            continue
        a = pre.loc[pre["operation"] == op, "latency_ms"].to_numpy()
        b = post.loc[post["operation"] == op, "latency_ms"].to_numpy()
        if a.size < gate.min_requests or b.size < gate.min_requests:
            out[op] = None
            continue
        out[op] = bootstrap_quantile_delta(
            a,
            b,
            quantile=0.95,
            confidence=gate.confidence,
            resamples=gate.bootstrap_resamples,
            max_samples=gate.bootstrap_max_samples,
            seed=gate.bootstrap_seed,
        )
    return out


def _rate_comparison(
    outcomes: Mapping[str, pd.DataFrame], operations: Sequence[str]
) -> dict[str, dict[str, dict[str, float | None]]]:
    pre, post = outcomes.get(Phase.PRE), outcomes.get(Phase.POST)
    result: dict[str, dict[str, dict[str, float | None]]] = {}
    for op in [*operations, ALL]:
        per_outcome: dict[str, dict[str, float | None]] = {}
        for outcome, _state in WATCHED:
            pre_share, pre_rate = _lookup_rate(pre, op, outcome)
            post_share, post_rate = _lookup_rate(post, op, outcome)
            delta = None if pre_share is None or post_share is None else post_share - pre_share
            per_outcome[str(outcome)] = {
                "pre_share": pre_share,
                "post_share": post_share,
                "delta_share": delta,
                "pre_per_s": pre_rate,
                "post_per_s": post_rate,
            }
        result[op] = per_outcome
    return result


def _lookup_rate(
    table: pd.DataFrame | None, op: str, outcome: str
) -> tuple[float | None, float | None]:
    """(share, per second) of ``outcome`` for ``op``; zero when the op ran without it."""
    if table is None:
        return None, None
    rows = table[table["operation"] == op]
    if rows.empty:
        return None, None
    hit = rows[rows["outcome"] == outcome]
    if hit.empty:
        return 0.0, 0.0
    return float(hit["share"].iloc[0]), _clean(float(hit["per_s"].iloc[0]))


# --------------------------------------------------------------------------
# What the app will see


@dataclass(frozen=True)
class AppResponse:
    http_status: int
    response: str
    retry: bool


def app_response(
    outcome: str, sqlstate: str | None, constraint: str | None, operation: str
) -> AppResponse:
    """The response the app should map a database error to."""
    if outcome == Outcome.EXCLUSION_VIOLATION:
        # The constraint says which table refused: another guest's hold, or a booking.
        held = (constraint or "").startswith("table_hold_windows") or (
            constraint is None and operation == "place_hold"
        )
        what = "the table is held" if held else "the table is taken"
        return AppResponse(409, f"409 Conflict: {what} for that time; offer another slot", False)
    if outcome == Outcome.UNIQUE_VIOLATION:
        if constraint and "idempotency" in constraint:
            return AppResponse(
                409,
                "replay the original response for this idempotency key"
                " (409 Conflict if the payload differs)",
                False,
            )
        return AppResponse(409, "409 Conflict: the record already exists", False)
    if outcome in (Outcome.DEADLOCK_DETECTED, Outcome.SERIALIZATION_FAILURE):
        return AppResponse(
            503,
            "retry the whole transaction with jittered backoff; 503 after the last try",
            True,
        )
    if outcome in (Outcome.LOCK_NOT_AVAILABLE, Outcome.QUERY_CANCELED):
        return AppResponse(503, "503 Service Unavailable with Retry-After: retry later", True)
    if outcome in (
        Outcome.FOREIGN_KEY_VIOLATION,
        Outcome.NOT_NULL_VIOLATION,
        Outcome.CHECK_VIOLATION,
    ):
        return AppResponse(422, "422 Unprocessable Entity: reject the request as invalid", False)
    if outcome == Outcome.CONNECTION_ERROR:
        return AppResponse(503, "503 Service Unavailable: retry later (reconnect first)", True)
    state = f"SQLSTATE {sqlstate}" if sqlstate else "an error without SQLSTATE"
    return AppResponse(500, f"500: {state} is unmapped; investigate before go-live", False)


def error_mapping(phases: Mapping[str, pd.DataFrame]) -> list[dict[str, Any]]:
    """One row per (SQLSTATE, outcome, constraint, operation) seen in any phase."""
    counted: list[pd.DataFrame] = []
    for phase, frame in phases.items():
        errors = frame[frame["outcome"] != Outcome.OK]
        if errors.empty:
            continue
        keys = pd.DataFrame(
            {
                "sqlstate": errors["sqlstate"].astype(object).where(errors["sqlstate"].notna(), ""),
                "outcome": errors["outcome"].astype(str),
                "constraint": errors["constraint"]
                .astype(object)
                .where(errors["constraint"].notna(), ""),
                "operation": errors["operation"].astype(str),
            }
        )
        counts = keys.value_counts().rename("count").reset_index()
        counts["phase"] = phase
        counted.append(counts)
    if not counted:
        return []
    long = pd.concat(counted, ignore_index=True)
    wide = long.pivot_table(
        index=["sqlstate", "outcome", "constraint", "operation"],
        columns="phase",
        values="count",
        aggfunc="sum",
        fill_value=0,
    )
    wide["_total"] = wide.sum(axis=1)
    wide = wide.sort_values("_total", ascending=False, kind="stable")
    rows: list[dict[str, Any]] = []
    for (sqlstate, outcome, constraint, operation), row in wide.iterrows():
        answer = app_response(outcome, sqlstate or None, constraint or None, operation)
        rows.append(
            {
                "sqlstate": sqlstate or None,
                "outcome": outcome,
                "constraint": constraint or None,
                "operation": operation,
                "count": int(row["_total"]),
                # every phase that ran, zero included: "0 before, 20 after" is the point
                "counts": {p: int(row[p]) if p in row.index else 0 for p in phases},
                "http_status": answer.http_status,
                "response": answer.response,
                "retry": answer.retry,
            }
        )
    return rows


# --------------------------------------------------------------------------
# Gates


def _finish(gate: GateResult, gates: Gates) -> GateResult:
    counts = gate.status is GateStatus.FAIL or (
        gate.status is GateStatus.NOT_MEASURED and gates.fail_when_not_measured
    )
    return replace(gate, passed=not counts)


def _not_measured(name: str, title: str, threshold: str, detail: str) -> GateResult:
    return GateResult(
        name=name,
        title=title,
        status=GateStatus.NOT_MEASURED,
        threshold=threshold,
        measured="not measured",
        detail=detail,
    )


def _gate_double_booking(run: _RunInput, gates: Gates) -> GateResult:
    cfg = gates.double_booking
    threshold = f"overlaps <= {cfg.max_overlaps}"
    title = "No double booking after migration"
    seen: dict[str, int] = {}
    for phase in (Phase.POST, Phase.ONLINE):
        inv = run.phases[phase].invariants
        if inv is None:
            continue
        counts = inv["counts"]
        seen[phase] = int(counts.get("overlapping_allocations", 0) or 0) + int(
            counts.get("overlapping_holds", 0) or 0
        )
    if Phase.POST not in seen:
        return _not_measured(
            "no_double_booking",
            title,
            threshold,
            f"{invariants_file('post')} not found: invariants after the"
            " post-migration load were not checked",
        )
    total = sum(seen.values())
    detail = ", ".join(f"{n} after {p}" for p, n in seen.items())
    return GateResult(
        name="no_double_booking",
        title=title,
        status=GateStatus.PASS if total <= cfg.max_overlaps else GateStatus.FAIL,
        threshold=threshold,
        measured=f"{total} overlapping allocations/holds",
        value=float(total),
        detail=detail,
    )


def _gate_expected_objects(run: _RunInput) -> GateResult:
    title = "Every expected object present"
    if run.validation is None:
        return _not_measured(
            "expected_objects",
            title,
            "all checks ok",
            f"{VALIDATION_FILE} not found: validate did not run",
        )
    checks = _checks(run)
    # Only the object checks: validation.json's own "ok" also counts double
    # bookings, which the no_double_booking gate judges after the post load.
    failing = [c for c in checks if not c.get("ok")]
    ok = bool(checks) and not failing
    names = ", ".join(str(c.get("name")) for c in failing[:10])
    if not checks:
        names = "none: validation.json records no checks"
    return GateResult(
        name="expected_objects",
        title=title,
        status=GateStatus.PASS if ok else GateStatus.FAIL,
        threshold="all checks ok",
        measured=f"{len(checks) - len(failing)} of {len(checks)} checks ok",
        value=float(len(failing)),
        detail=f"failing: {names}" if not ok else "",
    )


def _checks(run: _RunInput) -> list[dict[str, Any]]:
    # shape checked on reading: a list of objects, or absent
    return list((run.validation or {}).get("checks") or [])


def _gate_p95(op: str, ci: DeltaCI | None, run: _RunInput, gates: Gates) -> GateResult:
    cfg = gates.p95_regression
    name = f"p95_regression[{op}]"
    title = f"p95 of {op} within limit"
    threshold = (
        f"+{cfg.max_increase_pct:g}% or +{cfg.max_increase_ms:g} ms, whichever is larger,"
        f" unless the {cfg.confidence:.0%} CI contains 0"
    )
    if ci is None:
        absent = [p for p in (Phase.PRE, Phase.POST) if not run.present(p)]
        why = (
            f"no {' or '.join(absent)} samples"
            if absent
            else f"fewer than {cfg.min_requests} {op} requests in a phase"
        )
        return _not_measured(name, title, threshold, why)
    allowed = max(ci.baseline * cfg.max_increase_pct / 100.0, cfg.max_increase_ms)
    regressed = ci.delta > allowed and ci.low > 0.0
    pct = ci.delta_pct
    measured = (
        f"{ci.baseline:.2f} -> {ci.candidate:.2f} ms ({ci.delta:+.2f} ms"
        + (f", {pct:+.1f}%" if pct is not None else "")
        + f"), CI [{ci.low:+.2f}, {ci.high:+.2f}] ms"
    )
    if regressed:
        detail = f"grew by more than the allowed +{allowed:.2f} ms and the CI excludes 0"
    elif ci.delta > allowed:
        detail = f"above the allowed +{allowed:.2f} ms, but the CI contains 0: noise"
    else:
        detail = f"within the allowed +{allowed:.2f} ms"
    return GateResult(
        name=name,
        title=title,
        status=GateStatus.FAIL if regressed else GateStatus.PASS,
        threshold=threshold,
        measured=measured,
        value=ci.delta,
        detail=detail,
    )


def _gate_unexpected(run: _RunInput, gates: Gates) -> GateResult:
    cfg = gates.unexpected_errors
    title = "Unexpected errors after migration below limit"
    threshold = f"<= {cfg.max_share_pct:g}% of post-migration requests"
    post = run.phases[Phase.POST].samples
    if post is None or post.empty:
        return _not_measured(
            "unexpected_errors",
            title,
            threshold,
            run.phases[Phase.POST].missing_reason or "the post phase has no requests",
        )
    unexpected = ~post["outcome"].astype(str).isin(cfg.expected)
    count = int(unexpected.sum())
    share = 100.0 * count / len(post)
    by_outcome = post.loc[unexpected, "outcome"].astype(str).value_counts()
    detail = ", ".join(f"{k}: {int(v)}" for k, v in by_outcome.items())
    return GateResult(
        name="unexpected_errors",
        title=title,
        status=GateStatus.PASS if share <= cfg.max_share_pct else GateStatus.FAIL,
        threshold=threshold,
        measured=f"{share:.3f}% ({count} of {len(post)})",
        value=share,
        detail=detail,
    )


def _gate_run_completed(run: _RunInput) -> GateResult:
    title = "Every stage of the rehearsal completed"
    threshold = "run status completed"
    if run.run is None:
        return _not_measured(
            "run_completed", title, threshold, f"{RUN_FILE} not found: no record of the run"
        )
    status = run.run.get("status")
    detail = ""
    if status != "completed":
        stage, error = run.run.get("failed_stage"), run.run.get("error")
        detail = f"stage {stage}" if stage else ""
        if error:
            detail += f"{': ' if detail else ''}{_mask(str(error))}"
    return GateResult(
        name="run_completed",
        title=title,
        status=GateStatus.PASS if status == "completed" else GateStatus.FAIL,
        threshold=threshold,
        measured=f"status {status}",
        detail=detail,
    )


def _gate_rollback(run: _RunInput) -> GateResult:
    title = "Rollback drill restores the baseline and re-applies"
    threshold = "catalog equal, re-applied, re-validated"
    rb = run.rollback
    if rb is None:
        return _not_measured(
            "rollback_drill",
            title,
            threshold,
            f"{ROLLBACK_FILE} not found",
        )
    ok = (
        bool(rb.get("catalog_equal"))
        and bool(rb.get("reapplied"))
        and bool(rb.get("validation_ok"))
    )
    diffs = rb.get("differences") or []
    return GateResult(
        name="rollback_drill",
        title=title,
        status=GateStatus.PASS if ok else GateStatus.FAIL,
        threshold=threshold,
        measured=f"catalog_equal={rb.get('catalog_equal')}, reapplied={rb.get('reapplied')},"
        f" validation_ok={rb.get('validation_ok')}",
        value=float(len(diffs)),
        detail="; ".join(str(d) for d in diffs[:10]),
    )


def _evaluate_gates(
    run: _RunInput, gates: Gates, p95: Mapping[str, DeltaCI | None]
) -> list[GateResult]:
    results: list[GateResult] = []
    if gates.double_booking.enabled:
        results.append(_gate_double_booking(run, gates))
    if gates.expected_objects.enabled:
        results.append(_gate_expected_objects(run))
    if gates.p95_regression.enabled:
        results.extend(_gate_p95(op, p95.get(op), run, gates) for op in p95)
    if gates.unexpected_errors.enabled:
        results.append(_gate_unexpected(run, gates))
    if gates.rollback_drill.enabled:
        results.append(_gate_rollback(run))
    if gates.run_completed.enabled:
        results.append(_gate_run_completed(run))
    return [_finish(g, gates) for g in results]


# --------------------------------------------------------------------------
# Monitoring hand-off


def monitoring_thresholds(
    outcomes: pd.DataFrame | None, settings: MonitoringSettings
) -> list[dict[str, Any]]:
    """Baseline rate of 23P01 and 23505 per operation and the alert levels it gives."""
    if outcomes is None or outcomes.empty:
        return []
    rows: list[dict[str, Any]] = []
    for op in _operation_order([*outcomes["operation"], ALL]):
        for outcome, state in WATCHED:
            share, per_s = _lookup_rate(outcomes, op, outcome)
            share = share or 0.0
            per_min = (per_s or 0.0) * 60.0
            rows.append(
                {
                    "operation": op,
                    "outcome": str(outcome),
                    "sqlstate": state,
                    "baseline_share": share,
                    "baseline_per_minute": per_min if per_s is not None else None,
                    "alert_share": max(
                        share * settings.spike_factor, share + settings.min_share_pct / 100.0
                    ),
                    "alert_per_minute": max(
                        per_min * settings.spike_factor, per_min + settings.min_per_minute
                    )
                    if per_s is not None
                    else None,
                }
            )
    return rows


# --------------------------------------------------------------------------
# Charts (matplotlib, Agg, no pyplot global state)

_PHASE_COLORS = {"pre": "#1f77b4", "post": "#d62728", "online": "#2ca02c"}


def _outcome_colors() -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {str(o): cmap(i) for i, o in enumerate(OUTCOMES)}


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _bucket(frame: pd.DataFrame) -> tuple[np.ndarray, float]:
    ts = frame["ts"].to_numpy()
    t0 = ts.min()
    span = max(float(ts.max() - t0), 1e-9)
    width = max(1.0, math.ceil(span / _TIME_BUCKETS))
    return np.floor((ts - t0) / width).astype(np.int64), width


Chart = tuple[str, str, str]  # (title, alt text, base64 PNG)


def _charts(phases: Mapping[str, pd.DataFrame]) -> list[Chart]:
    """The page's four charts; none without samples."""
    phases = {p: f for p, f in phases.items() if not f.empty}
    if not phases:
        return []
    ops = _operation_order({str(o) for f in phases.values() for o in f["operation"].unique()})
    buckets = {p: _bucket(f) for p, f in phases.items()}
    return [
        _chart_p95_over_time(phases, ops, buckets),
        _chart_outcomes_over_time(phases, buckets),
        _chart_cdf(phases, ops),
        _chart_outcomes_per_operation(phases, ops),
    ]


def _chart_p95_over_time(
    phases: Mapping[str, pd.DataFrame],
    ops: Sequence[str],
    buckets: Mapping[str, tuple[np.ndarray, float]],
) -> Chart:
    """p95 over time per operation, every phase on the same axes."""
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(len(ops) / 2))
    fig = Figure(figsize=(11, 2.6 * rows))
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, op in zip(axes, ops, strict=False):
        for phase, frame in phases.items():
            mask = (frame["operation"] == op).to_numpy()
            if not mask.any():
                continue
            b, width = buckets[phase]
            series = pd.Series(frame["latency_ms"].to_numpy()[mask]).groupby(b[mask]).quantile(0.95)
            ax.plot(
                series.index * width, series.to_numpy(), label=phase, color=_PHASE_COLORS.get(phase)
            )
        ax.set_title(op, fontsize=9)
        ax.set_ylabel("p95 ms", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(ops) :]:
        ax.set_visible(False)
    fig.supxlabel("seconds since phase start", fontsize=8)
    fig.tight_layout()
    return (
        "p95 latency over time",
        "p95 latency per operation over time, one line per phase",
        _png(fig),
    )


def _chart_outcomes_over_time(
    phases: Mapping[str, pd.DataFrame], buckets: Mapping[str, tuple[np.ndarray, float]]
) -> Chart:
    """Requests per second by outcome over time, stacked, one panel per phase."""
    from matplotlib.figure import Figure

    colors = _outcome_colors()
    fig = Figure(figsize=(11, 2.8 * len(phases)))
    axes = fig.subplots(len(phases), 1, squeeze=False).ravel()
    for ax, (phase, frame) in zip(axes, phases.items(), strict=True):
        b, width = buckets[phase]
        counts = (
            pd.DataFrame({"b": b, "o": frame["outcome"].astype(str).to_numpy()})
            .value_counts()
            .unstack(fill_value=0)
            .sort_index()
        )
        order = [str(o) for o in OUTCOMES if str(o) in counts.columns]
        order += [c for c in counts.columns if c not in order]
        rates = counts[order] / width
        ax.stackplot(
            rates.index * width,
            rates.to_numpy().T,
            labels=order,
            colors=[colors.get(o, "#999999") for o in order],
        )
        ax.set_title(f"{phase}: requests per second by outcome", fontsize=9)
        ax.set_ylabel("req/s", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[-1].set_xlabel("seconds since phase start", fontsize=8)
    fig.tight_layout()
    return (
        "Outcome rates over time",
        "stacked requests per second by outcome over time, one panel per phase",
        _png(fig),
    )


def _chart_cdf(phases: Mapping[str, pd.DataFrame], ops: Sequence[str]) -> Chart:
    """Latency CDF of each phase, for each booking path and for all requests."""
    from matplotlib.figure import Figure

    panels = [op for op in ("create_booking", "update_booking", "place_hold") if op in ops]
    panels.append(ALL)
    rows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(11, 3.0 * rows))
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    # A few hundred quantiles draw the curve as well as a million points would.
    levels = np.linspace(0.0, 1.0, _CDF_POINTS)
    for ax, op in zip(axes, panels, strict=False):
        for phase, frame in phases.items():
            values = frame["latency_ms"].to_numpy()
            if op != ALL:
                values = values[(frame["operation"] == op).to_numpy()]
            if values.size == 0:
                continue
            ax.plot(
                np.quantile(values, levels), levels, label=phase, color=_PHASE_COLORS.get(phase)
            )
        ax.set_xscale("log")
        ax.set_title(f"{op}: latency CDF", fontsize=9)
        ax.set_xlabel("ms (log)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return ("Latency CDF, pre versus post", "cumulative latency distribution per phase", _png(fig))


def _chart_outcomes_per_operation(phases: Mapping[str, pd.DataFrame], ops: Sequence[str]) -> Chart:
    """Share of each non-ok outcome, one bar per operation and phase."""
    from matplotlib.figure import Figure

    colors = _outcome_colors()
    labels: list[str] = []
    shares: list[dict[str, float]] = []
    for op in ops:
        for phase, frame in phases.items():
            sub = frame.loc[frame["operation"] == op, "outcome"].astype(str)
            if sub.empty:
                continue
            labels.append(f"{op} ({phase})")
            shares.append((sub.value_counts(normalize=True) * 100.0).to_dict())
    # ok is left out: at 97% it would squeeze every refusal into a sliver
    present = [str(o) for o in OUTCOMES if o != Outcome.OK and any(str(o) in s for s in shares)]
    fig = Figure(figsize=(11, 0.32 * len(labels) + 1.5))
    ax = fig.subplots()
    left = np.zeros(len(labels))
    for outcome in present:
        widths = np.array([s.get(outcome, 0.0) for s in shares])
        ax.barh(labels, widths, left=left, label=outcome, color=colors.get(outcome))
        left += widths
    ax.invert_yaxis()
    ax.set_xlabel("% of the operation's requests that were not ok", fontsize=8)
    ax.set_title("Outcomes other than ok, per operation and phase", fontsize=9)
    ax.tick_params(labelsize=7)
    if present:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "every request was ok", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    return (
        "Outcomes per operation",
        "share of non-ok outcomes for each operation and phase",
        _png(fig),
    )


# --------------------------------------------------------------------------
# The build


def build_report(settings: ReportSettings) -> ReportResult:
    """Read the run folder, judge the gates, write the page, summary, JUnit and mapping."""
    started = time.perf_counter()
    gates = load_gates(settings.gates_file)
    run_dir = Path(settings.run_dir)
    run = _read_run(run_dir)
    log.info("report: read %s (%s missing inputs)", run_dir, len(run.missing))

    present = {p: run.phases[p].samples for p in PHASES if run.present(p)}
    latency = {p: latency_table(f, run.phases[p].duration_s) for p, f in present.items()}
    outcomes = {p: outcome_table(f, run.phases[p].duration_s) for p, f in present.items()}
    p95 = _p95_comparison(run, gates.p95_regression)
    ops_seen = [op for op in OPERATIONS if any(op in t.index for t in latency.values())]
    rates = _rate_comparison(outcomes, ops_seen)
    mapping = error_mapping(present)
    monitoring = monitoring_thresholds(
        outcomes.get(gates.monitoring.baseline_phase), gates.monitoring
    )
    gate_results = _evaluate_gates(run, gates, p95)
    verdict = Verdict.PASS if all(g.passed for g in gate_results) else Verdict.FAIL
    log.info("report: figures done in %.2fs", time.perf_counter() - started)

    charts = _charts(present) if settings.charts else []
    if settings.charts and run.online is not None:
        timeline = _chart_online_timeline(present.get("online"), run.online, run.ledger)
        if timeline is not None:
            charts.append(timeline)
    log.info("report: charts done in %.2fs", time.perf_counter() - started)

    summary = _summary(
        run, gates, verdict, gate_results, latency, outcomes, p95, rates, mapping, monitoring
    )
    paths = {
        "html": run_dir / REPORT_FILE,
        "summary": run_dir / SUMMARY_FILE,
        "junit": run_dir / JUNIT_FILE,
        "mapping": run_dir / ERROR_MAPPING_FILE,
    }
    trend = None
    if settings.charts and summary["nightly"] is not None:
        trend = _trend_chart(summary["nightly"]["history"])
    page = _render_html(summary, latency, outcomes, charts, trend)
    try:
        atomic_write_bytes(paths["html"], page.encode("utf-8"))
        write_json(paths["summary"], summary)
        write_json(paths["mapping"], mapping)
        junit = _junit(gate_results, summary, time.perf_counter() - started)
        atomic_write_bytes(paths["junit"], junit)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the report into {run_dir}: {exc.strerror or exc}",
            hint="fix the folder's permissions or free some disk space",
        ) from None
    seconds = time.perf_counter() - started
    log.info("report: %s written in %.2fs, verdict %s", paths["html"], seconds, verdict)
    return ReportResult(
        verdict=verdict,
        gates=tuple(gate_results),
        run_dir=run_dir,
        report_html=paths["html"],
        summary_json=paths["summary"],
        junit_xml=paths["junit"],
        error_mapping_json=paths["mapping"],
        missing=tuple(run.missing),
        seconds=seconds,
        summary=summary,
    )


# --------------------------------------------------------------------------
# summary.json


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _mask(value: Any) -> Any:
    """Mask anything that looks like a URL or a password, at any depth."""
    if isinstance(value, dict):
        return {k: ("***" if "password" in str(k).lower() else _mask(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str) and ("://" in value or "password" in value.lower()):
        # URLs inside longer text (error messages) too, not only whole URLs
        value = _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), value)
        return _PASSWORD_IN_TEXT.sub(lambda m: m.group(1) + "***", value)
    return value


_URL_IN_TEXT = re.compile(r"postgres(?:ql)?://[^\s'\"<>]+", re.IGNORECASE)
_PASSWORD_IN_TEXT = re.compile(r"(password\s*[=:]\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def _run_facts(run: _RunInput) -> dict[str, Any]:
    info = run.run or {}
    target = info.get("target") or {}
    manifest = run.manifest or {}
    started, finished = _parse_time(info.get("started_at")), _parse_time(info.get("finished_at"))
    stages = [
        {
            "name": s.get("name"),
            "status": s.get("status"),
            "duration_s": s.get("duration_s"),
            "error": s.get("error"),
        }
        for s in info.get("stages") or []
        if isinstance(s, dict)
    ]
    return _mask(
        {
            "run_id": info.get("run_id") or run.run_dir.resolve().name,
            "status": info.get("status"),
            "failed_stage": info.get("failed_stage"),
            "error": info.get("error"),
            "started_at": info.get("started_at"),
            "finished_at": info.get("finished_at"),
            "duration_s": (finished - started).total_seconds() if started and finished else None,
            "target": target.get("display"),
            "server_version": target.get("server_version"),
            "seed": manifest.get("seed"),
            "scale": manifest.get("scale"),
            "rows": manifest.get("rows") or {},
            "dirt": manifest.get("dirt") or {},
            "settings": info.get("settings") or {},
            "stages": stages,
        }
    )


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _phase_facts(run: _RunInput, latency: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase, data in run.phases.items():
        load = data.load or {}
        if data.samples is None and not load and phase == Phase.ONLINE:
            continue
        table = latency.get(phase)
        total = table.loc[ALL] if table is not None and ALL in table.index else None
        out[phase] = {
            "present": data.samples is not None,
            "missing_reason": data.missing_reason,
            "mode": load.get("mode"),
            "users": load.get("users"),
            "spawn_rate": load.get("spawn_rate"),
            "duration_s": data.duration_s,
            "started_at": load.get("started_at"),
            "ended_at": load.get("ended_at"),
            "requests": int(total["requests"]) if total is not None else None,
            # Locust's own count: a gap to "requests" means samples were lost
            "counted_requests": load.get("requests"),
            "throughput_rps": float(total["throughput_rps"]) if total is not None else None,
            "contention": load.get("contention"),
            "interrupted": bool(load.get("interrupted")),
            **_outage(data),
        }
    return out


def _outage(data: _PhaseInput) -> dict[str, Any]:
    """The longest stretch of a phase without an ok request, and its connection errors.

    A server restart or a network cut shows as a hole in time that the
    percentiles and per-second rates average away; this names it.
    """
    frame = data.samples
    if frame is None or frame.empty:
        return {"longest_no_ok_s": None, "longest_no_ok_from": None, "connection_errors": None}
    ts = frame["ts"].to_numpy(dtype=np.float64)
    ok = np.sort(ts[(frame["outcome"] == str(Outcome.OK)).to_numpy()])
    start, end = float(ts.min()), float(ts.max())
    edges = np.concatenate(([start], ok, [end]))
    gaps = np.diff(edges)
    i = int(np.argmax(gaps))
    return {
        "longest_no_ok_s": round(float(gaps[i]), 3),
        "longest_no_ok_from": datetime.fromtimestamp(float(edges[i]), UTC).isoformat(),
        "connection_errors": int((frame["outcome"] == str(Outcome.CONNECTION_ERROR)).sum()),
    }


def _quarantine_rows(run: _RunInput) -> list[dict[str, Any]]:
    planted = (run.manifest or {}).get("dirt") or {}
    quarantined = (run.validation or {}).get("quarantine") or {}
    if not isinstance(planted, dict) or not isinstance(quarantined, dict):
        return []
    rows = []
    for reason in sorted(set(planted) | set(quarantined)):
        p = planted.get(reason) if run.manifest is not None else None
        q = quarantined.get(reason) if run.validation is not None else None
        rows.append(
            {
                "reason": reason,
                "planted": p,
                "quarantined": q,
                "match": None if p is None or q is None else int(p) == int(q),
            }
        )
    return rows


def _migrations(run: _RunInput) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for row in run.ledger or []:  # entries checked on reading: objects with a 'file'
        out[str(row["file"])] = {
            "sha256": row.get("sha256"),
            "outcome": row.get("outcome"),
            "duration_s": row.get("duration_s"),
            "started_at": row.get("started_at"),
            "finished_at": row.get("finished_at"),
            "mode": row.get("mode"),
            "sqlstate": row.get("sqlstate"),
            "error": row.get("error"),
        }
    return _mask(out)


def _lint(run: _RunInput) -> dict[str, Any] | None:
    """squawk's findings on the migration files, accepted (with reason) or new."""
    if run.lint is None:
        return None
    findings = []
    for key, accepted in (("new", False), ("accepted", True)):
        for f in run.lint.get(key) or []:
            if isinstance(f, dict):
                findings.append(
                    {
                        "file": f.get("file"),
                        "line": f.get("line"),
                        "rule": f.get("rule"),
                        "level": f.get("level"),
                        "message": f.get("message"),
                        "accepted": accepted,
                        "reason": f.get("accepted_reason"),
                    }
                )
    return {
        "ok": run.lint.get("ok"),
        "squawk_version": run.lint.get("squawk_version"),
        "new": sum(1 for f in findings if not f["accepted"]),
        "accepted": sum(1 for f in findings if f["accepted"]),
        "findings": findings,
    }


_ONLINE_FILE_KEYS = (
    "file",
    "duration_s",
    "writers_blocked",
    "waits",
    "longest_wait_s",
    "total_wait_s",
    "lock_not_available",
    "query_canceled",
    "blocking_statements",
)
_ONLINE_WAIT_KEYS = ("relation", "mode", "wait_s", "query", "blocked_by_queries", "started_at")


def _online(run: _RunInput) -> dict[str, Any] | None:
    """Writers the migrations blocked while the online load ran (``online.json``)."""
    data = run.online
    if data is None:
        return None
    files = [f for f in data.get("files") or [] if isinstance(f, dict)]
    waits = [w for w in data.get("waits") or [] if isinstance(w, dict)]
    longest = sorted(waits, key=lambda w: -float(w.get("wait_s") or 0.0))[:20]
    return _mask(
        {
            # the two figures a reviewer asks first: how many writers, how long at worst
            "writers_blocked": sum(int(f.get("writers_blocked") or 0) for f in files),
            "longest_wait_s": max(
                (float(f.get("longest_wait_s") or 0.0) for f in files), default=0.0
            ),
            "samples_taken": data.get("samples_taken"),
            "interval_s": data.get("interval_s"),
            "sampler_error": data.get("sampler_error"),
            "files": [{k: f.get(k) for k in _ONLINE_FILE_KEYS} for f in files],
            "waits": len(waits),
            "longest_waits": [{k: w.get(k) for k in _ONLINE_WAIT_KEYS} for w in longest],
        }
    )


_COMPARISON_KEYS = ("kind", "name", "current", "baseline", "limit", "regression", "detail")


def _nightly(run: _RunInput) -> dict[str, Any] | None:
    """The nightly comparison with earlier nights, when ``harness nightly`` ran."""
    data = run.nightly
    if data is None:
        return None
    comparisons = [
        {k: c.get(k) for k in _COMPARISON_KEYS}
        for c in data.get("comparisons") or []
        if isinstance(c, dict)
    ]
    history = [h for h in data.get("history") or [] if isinstance(h, dict)]
    return {
        "compared_with": data.get("compared_with"),
        "compared_runs": list(data.get("compared_runs") or []),
        "regressions": sum(1 for c in comparisons if c["regression"]),
        "comparisons": comparisons,
        "history": history,
    }


def _summary(
    run: _RunInput,
    gates: Gates,
    verdict: Verdict,
    gate_results: Sequence[GateResult],
    latency: Mapping[str, pd.DataFrame],
    outcomes: Mapping[str, pd.DataFrame],
    p95: Mapping[str, DeltaCI | None],
    rates: Mapping[str, Any],
    mapping: list[dict[str, Any]],
    monitoring: list[dict[str, Any]],
) -> dict[str, Any]:
    latency_json = {
        phase: {op: row.to_dict() for op, row in table.iterrows()}
        for phase, table in latency.items()
    }
    for table in latency_json.values():
        for row in table.values():
            row["requests"] = int(row["requests"])
    outcome_json: dict[str, dict[str, dict[str, Any]]] = {}
    for phase, table in outcomes.items():
        per_op: dict[str, dict[str, Any]] = {}
        for op, outcome, count, share, per_s in table.itertuples(index=False):
            per_op.setdefault(op, {})[outcome] = {
                "count": int(count),
                "share": float(share),
                "per_s": per_s,
            }
        outcome_json[phase] = per_op
    p95_json = {
        op: None
        if ci is None
        else {
            "pre_ms": ci.baseline,
            "post_ms": ci.candidate,
            "delta_ms": ci.delta,
            "delta_pct": ci.delta_pct,
            "ci_low_ms": ci.low,
            "ci_high_ms": ci.high,
            "confidence": ci.confidence,
            "noise": ci.noise,
            "n_pre": ci.n_baseline,
            "n_post": ci.n_candidate,
        }
        for op, ci in p95.items()
    }
    validation = None
    if run.validation is not None:
        validation = _mask(
            {
                "ok": run.validation.get("ok"),
                "checks": _checks(run),
                "integrity": run.validation.get("integrity") or {},
                # counted by validate right after the migrations, before the post load
                "invariants": run.validation.get("invariants"),
            }
        )
    summary = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "run_id": (run.run or {}).get("run_id") or run.run_dir.resolve().name,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "harness_version": __version__,
        "verdict": str(verdict),
        "gates_source": gates.source,
        "gates": [g.as_dict() for g in gate_results],
        "missing": list(run.missing),
        "run": _run_facts(run),
        "phases": _phase_facts(run, latency),
        "latency": latency_json,
        "outcome_rates": outcome_json,
        "comparison": {"p95": p95_json, "rates": rates},
        "integrity": {
            "invariants": {
                p: (d.invariants or {}).get("counts") if d.invariants is not None else None
                for p, d in run.phases.items()
            },
            "quarantine": _quarantine_rows(run),
            "validation": validation,
            "rollback": _mask(run.rollback) if run.rollback is not None else None,
        },
        "error_mapping": mapping,
        "migrations": _migrations(run),
        "lint": _lint(run),
        "online": _online(run),
        "nightly": _nightly(run),
        "monitoring": {
            "baseline_phase": gates.monitoring.baseline_phase,
            "spike_factor": gates.monitoring.spike_factor,
            "min_share_pct": gates.monitoring.min_share_pct,
            "min_per_minute": gates.monitoring.min_per_minute,
            "thresholds": monitoring,
        },
    }
    return _clean(summary)


# --------------------------------------------------------------------------
# junit.xml


def _junit(gates: Sequence[GateResult], summary: Mapping[str, Any], seconds: float) -> bytes:
    failures = sum(1 for g in gates if not g.passed)
    skipped = sum(1 for g in gates if g.passed and g.status is GateStatus.NOT_MEASURED)
    suites = ET.Element("testsuites", name="harness report", tests=str(len(gates)))
    suites.set("failures", str(failures))
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"sign-off gates ({summary.get('run_id')})",
        tests=str(len(gates)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{seconds:.3f}",
        timestamp=str(summary.get("generated_at")),
    )
    props = ET.SubElement(suite, "properties")
    for key in ("run_id", "verdict", "gates_source"):
        ET.SubElement(props, "property", name=key, value=str(summary.get(key)))
    for gate in gates:
        case = ET.SubElement(suite, "testcase", classname="harness.gates", name=gate.name, time="0")
        text = f"{gate.title}\nthreshold: {gate.threshold}\nmeasured: {gate.measured}"
        if gate.detail:
            text += f"\n{gate.detail}"
        if not gate.passed:
            message = f"{gate.title}: {gate.measured} (threshold {gate.threshold})"
            if gate.status is GateStatus.NOT_MEASURED:
                message = f"{gate.title}: not measured ({gate.detail})"
            ET.SubElement(case, "failure", message=message, type=str(gate.status)).text = text
        elif gate.status is GateStatus.NOT_MEASURED:
            ET.SubElement(case, "skipped", message=gate.detail or "not measured")
        else:
            ET.SubElement(case, "system-out").text = text
    nightly = summary.get("nightly")
    if nightly is not None:
        _junit_nightly(suites, nightly)
    ET.indent(suites)
    return ET.tostring(suites, encoding="utf-8", xml_declaration=True) + b"\n"


def _junit_nightly(suites: ET.Element, nightly: Mapping[str, Any]) -> None:
    """One test case per comparison with earlier nights (a failure per regression)."""
    comparisons = nightly["comparisons"]
    failures = nightly["regressions"]
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"nightly comparisons (median of {nightly['compared_with']} earlier runs)",
        tests=str(len(comparisons)),
        failures=str(failures),
        errors="0",
        skipped="0",
    )
    for c in comparisons:
        case = ET.SubElement(
            suite, "testcase", classname=f"harness.nightly.{c['kind']}", name=str(c["name"])
        )
        text = f"current {c['current']}, baseline {c['baseline']}, limit {c['limit']}"
        if c["regression"]:
            ET.SubElement(case, "failure", message=str(c["detail"]), type="regression").text = text
        else:
            ET.SubElement(case, "system-out").text = f"{text}\n{c['detail']}"
    total = int(suites.get("tests", "0")) + len(comparisons)
    suites.set("tests", str(total))
    suites.set("failures", str(int(suites.get("failures", "0")) + failures))


# --------------------------------------------------------------------------
# report.html

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d5d9e0;
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
.verdict{font-size:30px;font-weight:700;padding:10px 18px;border-radius:6px;display:inline-block;
color:#fff}.verdict.PASS{background:#1a7f37}.verdict.FAIL{background:#cf222e}
table{border-collapse:collapse;margin:6px 0 12px;background:#fff;font-size:13px}
th,td{border:1px solid #d5d9e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}
.not_measured,.missing{color:#9a6700;font-weight:600}
.note{color:#57606a}.chart{margin:8px 0 20px}.chart img{max-width:100%;border:1px solid #d5d9e0;
background:#fff}nav a{margin-right:12px}code{font-size:12px}
"""


def _esc(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return html.escape(str(value))


def _esc_json(value: Any) -> str:
    """A settings value as text (escaped later by to_html)."""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return "—" if value is None else str(value)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return f"{float(value):,.{digits}f}"
    return str(value)


def _pct(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{100.0 * float(value):.{digits}f}%"


def _frame_html(frame: pd.DataFrame, empty: str = "nothing to show") -> str:
    if frame.empty:
        return f'<p class="note">{_esc(empty)}</p>'
    # None in an object column would print as "None": show a dash like NaN.
    frame = frame.astype(object).where(frame.notna(), "—")
    # escape=True: constraint names, error texts and table names come from the database.
    return frame.to_html(index=False, escape=True, border=0, na_rep="—")


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_esc(title)}</h2>{body}</section>'


def _render_html(
    summary: Mapping[str, Any],
    latency: Mapping[str, pd.DataFrame],
    outcomes: Mapping[str, pd.DataFrame],
    charts: Sequence[Chart],
    trend: Chart | None = None,
) -> str:
    verdict = summary["verdict"]
    parts = [
        _html_verdict(summary),
        _html_run(summary),
        _html_phases(summary, latency, outcomes),
        _html_comparison(summary),
        _html_integrity(summary),
        _html_app(summary),
        _html_migrations(summary),
        _html_charts(charts, present=bool(latency)),
        _html_monitoring(summary),
        _html_nightly(summary["nightly"], trend),
    ]
    nav = " ".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [
            ("verdict", "Verdict"),
            ("run", "Run"),
            ("phases", "Latency & outcomes"),
            ("comparison", "Pre vs post"),
            ("integrity", "Integrity"),
            ("app", "What the app sees"),
            ("migrations", "Migrations"),
            ("charts", "Charts"),
            ("monitoring", "Monitoring"),
            *([("nightly", "Nightly trend")] if summary["nightly"] is not None else []),
        ]
    )
    title = f"Rehearsal {summary['run_id']}: {verdict}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>Strict-constraints rehearsal — {_esc(summary['run_id'])}</h1>"
        f"<nav>{nav}</nav>"
        + "".join(parts)
        + f'<p class="note">Generated {_esc(summary["generated_at"])} by harness'
        f" {_esc(summary['harness_version'])}; gates from {_esc(summary['gates_source'])}.</p>"
        "</main></body></html>\n"
    )


def _html_verdict(summary: Mapping[str, Any]) -> str:
    verdict = summary["verdict"]
    body = f'<div class="verdict {verdict}" id="verdict-text">{verdict}</div>'
    failed = [g for g in summary["gates"] if not g["passed"]]
    body += f"<p>{len(summary['gates']) - len(failed)} of {len(summary['gates'])} gates passed.</p>"
    run = summary["run"]
    if run["status"] not in (None, "completed"):
        # A run that stopped early can still pass the gates it reached: say so up front.
        where = f" in stage {run['failed_stage']}" if run["failed_stage"] else ""
        error = f": {run['error']}" if run["error"] else ""
        state = {
            "failed": "failed",
            "interrupted": "was interrupted",
            "running": "is still running",
        }
        said = state.get(run["status"], f"ended as {run['status']}")
        body += f'<p class="fail">The run {_esc(said)}{_esc(where)}{_esc(error)}.</p>'
    # Built by hand (not to_html) to colour the status cell; every value is escaped.
    head = "".join(f"<th>{h}</th>" for h in ("gate", "status", "threshold", "measured", "detail"))
    rows = "".join(
        f'<tr data-gate="{_esc(g["name"])}"><td>{_esc(g["title"])}</td>'
        f'<td class="{_esc(g["status"])}">{_esc(g["status"].replace("_", " ").upper())}</td>'
        f"<td>{_esc(g['threshold'])}</td><td>{_esc(g['measured'])}</td>"
        f"<td>{_esc(g['detail'] or '')}</td></tr>"
        for g in summary["gates"]
    )
    nightly = summary["nightly"]
    if nightly is not None and nightly["regressions"]:
        body += (
            f'<p class="fail">Nightly: {nightly["regressions"]} regression(s) against the median'
            f" of {_esc(nightly['compared_with'])} earlier runs"
            ' (see <a href="#nightly">Nightly trend</a>).</p>'
        )
    if summary["gates"]:
        body += f'<table class="gates"><tr>{head}</tr>{rows}</table>'
    else:
        body += '<p class="note">no gate is enabled</p>'
    if summary["missing"]:
        items = "".join(f"<li>{_esc(m)}</li>" for m in summary["missing"])
        body += f'<h3 class="missing">Missing inputs</h3><ul>{items}</ul>'
    return _section("verdict", "Verdict", body)


def _html_run(summary: Mapping[str, Any]) -> str:
    r = summary["run"]
    rows = [
        ("run id", r["run_id"]),
        ("status", r["status"] or "unknown (no run.json)"),
        ("failed stage", r["failed_stage"]),
        ("error", r["error"]),
        ("target", r["target"]),
        ("PostgreSQL", r["server_version"]),
        ("started", r["started_at"]),
        ("finished", r["finished_at"]),
        ("duration", f"{r['duration_s']:.1f} s" if r["duration_s"] is not None else None),
        ("seed", r["seed"]),
        ("scale", r["scale"]),
    ]
    body = _kv([(k, v) for k, v in rows if v is not None or k in ("target", "PostgreSQL")])
    phases = pd.DataFrame(
        [
            {
                "phase": p,
                "samples": ("present" if f["present"] else f"MISSING — {f['missing_reason']}")
                + (" (load interrupted)" if f["interrupted"] else ""),
                "mode": f["mode"],
                "users": f["users"],
                "spawn rate": f["spawn_rate"],
                "duration s": _fmt(f["duration_s"], 1),
                "requests": _fmt(f["requests"])
                + (
                    f" (Locust counted {_fmt(f['counted_requests'])})"
                    if _is_number(f["counted_requests"])
                    and f["requests"] is not None
                    and f["counted_requests"] != f["requests"]
                    else ""
                ),
                "req/s": _fmt(f["throughput_rps"], 1),
                "started": f["started_at"],
                "ended": f["ended_at"],
                "contention": _contention(f["contention"]),
            }
            for p, f in summary["phases"].items()
        ]
    )
    body += "<h3>Phases</h3>" + _frame_html(phases)
    migrations = pd.DataFrame(
        [{"file": f, "sha256": m["sha256"]} for f, m in summary["migrations"].items()]
    )
    body += "<h3>Migration files</h3>" + _frame_html(migrations, "no ledger: migrate did not run")
    if r["rows"]:
        rows_df = pd.DataFrame([{"table": t, "rows": _fmt(n)} for t, n in r["rows"].items()])
        body += "<h3>Snapshot rows</h3>" + _frame_html(rows_df)
    if r["settings"]:
        settings = pd.DataFrame(
            [{"setting": k, "value": _esc_json(v)} for k, v in r["settings"].items()]
        )
        body += "<h3>Settings</h3>" + _frame_html(settings)
    if r["stages"]:
        stages = pd.DataFrame(
            [
                {
                    "stage": s["name"],
                    "status": s["status"],
                    "duration s": _fmt(s["duration_s"], 2),
                    "error": s["error"],
                }
                for s in r["stages"]
            ]
        )
        body += "<h3>Stages</h3>" + _frame_html(stages)
    return _section("run", "The run", body)


def _html_phases(
    summary: Mapping[str, Any],
    latency: Mapping[str, pd.DataFrame],
    outcomes: Mapping[str, pd.DataFrame],
) -> str:
    if not latency:
        return _section(
            "phases", "Latency and outcomes", '<p class="missing">No samples in any phase.</p>'
        )
    body = '<p class="note">Percentiles are exact over every sample (linear interpolation).</p>'
    rows = []
    for phase, table in latency.items():
        for op, r in table.iterrows():
            rows.append(
                {
                    "phase": phase,
                    "operation": op,
                    "requests": _fmt(int(r["requests"])),
                    "req/s": _fmt(r["throughput_rps"], 1),
                    "p50 ms": _fmt(r["p50_ms"]),
                    "p95 ms": _fmt(r["p95_ms"]),
                    "p99 ms": _fmt(r["p99_ms"]),
                    "max ms": _fmt(r["max_ms"]),
                }
            )
    body += "<h3>Latency and throughput</h3>" + _frame_html(pd.DataFrame(rows))
    for phase, data in summary["phases"].items():
        if not data["present"]:
            body += (
                f'<p class="missing">{_esc(phase)}: not run — {_esc(data["missing_reason"])}</p>'
            )
    outages = [
        (phase, data)
        for phase, data in summary["phases"].items()
        if data.get("connection_errors") or (data.get("longest_no_ok_s") or 0) >= 1.0
    ]
    if outages:
        rows = [
            {
                "phase": phase,
                "longest stretch without an ok request s": _fmt(data["longest_no_ok_s"], 2),
                "from (UTC)": str(data["longest_no_ok_from"])[11:23],
                "connection_error": _fmt(data["connection_errors"]),
            }
            for phase, data in outages
        ]
        body += "<h3>Gaps: the server unreachable or nothing succeeding</h3>" + _frame_html(
            pd.DataFrame(rows)
        )
    cells = []
    for phase, table in outcomes.items():
        for op, outcome, count, share, per_s in table.itertuples(index=False):
            cells.append(
                {
                    "phase": phase,
                    "operation": op,
                    "outcome": outcome,
                    "cell": f"{count:,} · {_pct(share)} · {_fmt(per_s)}/s",
                }
            )
    if cells:
        long = pd.DataFrame(cells)
        order = [str(o) for o in OUTCOMES if str(o) in set(long["outcome"])]
        order += sorted(set(long["outcome"]) - set(order))
        wide = long.pivot(index=["phase", "operation"], columns="outcome", values="cell")
        wide = wide.reindex(columns=order)
        wide.columns.name = None
        wide = wide.reset_index()
        # pivot sorts alphabetically; keep the pipeline's order (pre, post, online)
        rank = {p: i for i, p in enumerate(PHASES)}
        wide = wide.sort_values("phase", key=lambda s: s.map(rank), kind="stable")
        body += (
            "<h3>Outcomes (count · share of the operation's requests · per second)</h3>"
            + _frame_html(wide.fillna("—"))
        )
    return _section("phases", "Latency and outcomes per phase and operation", body)


def _html_comparison(summary: Mapping[str, Any]) -> str:
    comp = summary["comparison"]
    rows = []
    for op, c in comp["p95"].items():
        if c is None:
            rows.append(
                {
                    "operation": op,
                    "pre p95 ms": "—",
                    "post p95 ms": "—",
                    "change": "not measured",
                    "CI": "—",
                    "reading": "not measured",
                }
            )
            continue
        reading = (
            "noise (CI contains 0)" if c["noise"] else ("slower" if c["delta_ms"] > 0 else "faster")
        )
        pct = f" ({c['delta_pct']:+.1f}%)" if c["delta_pct"] is not None else ""
        rows.append(
            {
                "operation": op,
                "pre p95 ms": _fmt(c["pre_ms"]),
                "post p95 ms": _fmt(c["post_ms"]),
                "change": f"{c['delta_ms']:+.2f} ms{pct}",
                f"{c['confidence']:.0%} CI": f"[{c['ci_low_ms']:+.2f}, {c['ci_high_ms']:+.2f}] ms",
                "reading": reading,
            }
        )
    body = "<h3>p95 latency of the booking paths</h3>" + _frame_html(
        pd.DataFrame(rows), "p95 comparison disabled"
    )
    rate_rows = []
    for op, per in comp["rates"].items():
        for outcome, v in per.items():
            rate_rows.append(
                {
                    "operation": op,
                    "outcome": f"{outcome} ({_OUTCOME_SQLSTATE.get(outcome, '')})",
                    "pre share": _pct(v["pre_share"], 3),
                    "post share": _pct(v["post_share"], 3),
                    "change": "—"
                    if v["delta_share"] is None
                    else f"{100 * v['delta_share']:+.3f} pp",
                    "pre /s": _fmt(v["pre_per_s"], 3),
                    "post /s": _fmt(v["post_per_s"], 3),
                }
            )
    body += "<h3>23P01 and 23505 rates</h3>" + _frame_html(
        pd.DataFrame(rate_rows), "no phase has samples"
    )
    return _section("comparison", "Pre versus post migration", body)


def _html_integrity(summary: Mapping[str, Any]) -> str:
    integ = summary["integrity"]
    val = integ["validation"]
    validated = val.get("invariants") if val is not None else None
    columns: list[tuple[str, Any]] = [
        ("after pre load", integ["invariants"].get(Phase.PRE)),
        ("after migrate (validate)", validated if isinstance(validated, dict) else None),
        ("after post load", integ["invariants"].get(Phase.POST)),
    ]
    if integ["invariants"].get(Phase.ONLINE) is not None:
        columns.append(("after online", integ["invariants"][Phase.ONLINE]))
    checks = list(INVARIANT_CHECKS)
    for _, counts in columns:
        checks += [k for k in counts or {} if k not in checks and k != "double_bookings"]
    inv_rows = []
    for check in checks:
        row = {"invariant": check}
        for label, counts in columns:
            row[label] = "not checked" if counts is None else _fmt(counts.get(check))
        inv_rows.append(row)
    body = "<h3>Double bookings and orphans after each phase</h3>" + _frame_html(
        pd.DataFrame(inv_rows)
    )
    q = pd.DataFrame(
        [
            {
                "reason": r["reason"],
                "planted (manifest)": _fmt(r["planted"]),
                "quarantined by 001": _fmt(r["quarantined"]),
                "match": "—" if r["match"] is None else ("yes" if r["match"] else "NO"),
            }
            for r in integ["quarantine"]
        ]
    )
    body += (
        "<h3>Quarantine against the snapshot's dirt</h3>"
        '<p class="note">Rows 001 moved to harness.quarantine, by reason, against the dirt'
        " provision planted. The pre-migration load writes to the lax schema too, so a"
        " reason it can produce (duplicate idempotency keys, overlaps) may count more.</p>"
        + _frame_html(q, "no manifest dirt and no quarantine counts")
    )
    if val is None:
        body += f'<p class="missing">{VALIDATION_FILE} not found: validate did not run.</p>'
    else:
        checks_df = pd.DataFrame(
            [
                {
                    "object": c.get("name"),
                    "kind": c.get("kind"),
                    "table": c.get("table"),
                    "present": _fmt(c.get("present")),
                    "validated": "NOT VALID"
                    if c.get("validated") is False
                    else _fmt(c.get("validated")),
                    "ok": "ok" if c.get("ok") else "FAIL",
                    "detail": c.get("detail"),
                }
                for c in val["checks"]
            ]
        )
        body += f"<h3>Validation ({'ok' if val['ok'] else 'FAILED'})</h3>" + _frame_html(
            checks_df, "no checks recorded"
        )
        if val["integrity"]:
            body += "<h3>Integrity queries</h3>" + _frame_html(
                pd.DataFrame([{"query": k, "count": _fmt(v)} for k, v in val["integrity"].items()])
            )
    rb = integ["rollback"]
    if rb is None:
        body += '<h3>Rollback drill</h3><p class="missing">not run (no rollback.json)</p>'
    else:
        body += "<h3>Rollback drill</h3>" + _kv(
            [
                ("catalog equal to baseline", _fmt(rb.get("catalog_equal"))),
                ("migrations re-applied", _fmt(rb.get("reapplied"))),
                ("re-validated", _fmt(rb.get("validation_ok"))),
                ("duration s", _fmt(rb.get("duration_s"), 2)),
            ]
        )
        diffs = rb.get("differences") or []
        if diffs:
            body += "<ul>" + "".join(f"<li>{_esc(d)}</li>" for d in diffs) + "</ul>"
    return _section("integrity", "Integrity", body)


def _html_app(summary: Mapping[str, Any]) -> str:
    rows = []
    for r in summary["error_mapping"]:
        row = {
            "SQLSTATE": r["sqlstate"],
            "outcome": r["outcome"],
            "constraint": r["constraint"],
            "operation": r["operation"],
        }
        for phase in PHASES:
            if phase in r["counts"]:
                row[f"count {phase}"] = _fmt(r["counts"][phase])
        row["app response"] = r["response"]
        row["retry"] = "yes" if r["retry"] else "no"
        rows.append(row)
    body = f'<p class="note">Also in <code>{ERROR_MAPPING_FILE}</code>.</p>' + _frame_html(
        pd.DataFrame(rows), "no request failed in any phase"
    )
    return _section("app", "What the app will see", body)


def _contention(settings: Any) -> str:
    """The contention knob in a few words (the full settings are in summary.json)."""
    if not isinstance(settings, dict):
        return "—"
    keys = ("hot_tables", "hot_windows", "hot_fraction")
    return ", ".join(f"{k}={settings[k]}" for k in keys if k in settings) or "—"


def _html_migrations(summary: Mapping[str, Any]) -> str:
    rows = [
        {
            "file": f,
            "mode": m["mode"],
            "outcome": m["outcome"],
            "duration s": _fmt(m["duration_s"], 3),
            "started": m["started_at"],
            "finished": m["finished_at"],
            "SQLSTATE": m["sqlstate"],
            "error": m["error"],
        }
        for f, m in summary["migrations"].items()
    ]
    body = _frame_html(pd.DataFrame(rows), f"{LEDGER_FILE} not found: migrate did not run")
    lint = summary["lint"]
    if lint is None:
        body += f'<h3>squawk lint</h3><p class="note">{LINT_FILE} not found: lint did not run</p>'
    else:
        body += f"<h3>squawk lint: {lint['new']} new, {lint['accepted']} accepted</h3>"
        if lint["new"]:
            body += _frame_html(_lint_table(lint["findings"], accepted=False))
        if lint["accepted"]:
            # written down once with their reasons; folded so they do not bury the rest
            body += (
                f"<details><summary>{lint['accepted']} accepted warnings and why</summary>"
                + _frame_html(_lint_table(lint["findings"], accepted=True))
                + "</details>"
            )
    body += _html_online(summary["online"])
    return _section("migrations", "Migrations", body)


def _lint_table(findings: Sequence[Mapping[str, Any]], *, accepted: bool) -> pd.DataFrame:
    label, key = ("reason accepted", "reason") if accepted else ("message", "message")
    return pd.DataFrame(
        [
            {
                "file": f["file"],
                "line": f["line"],
                "rule": f["rule"],
                "level": f["level"],
                label: f[key],
            }
            for f in findings
            if f["accepted"] is accepted
        ]
    )


def _html_online(online: Mapping[str, Any] | None) -> str:
    if online is None:
        return ""
    body = (
        f"<h3>Migrating under load: {_fmt(online['writers_blocked'])} writer(s) blocked,"
        f" longest wait {_fmt(online['longest_wait_s'], 3)} s</h3>"
        f'<p class="note">pg_locks sampled every {_fmt(online["interval_s"])} s'
        f" ({_fmt(online['samples_taken'])} samples, {_fmt(online['waits'])} waits seen).</p>"
    )
    if online["sampler_error"]:
        body += f'<p class="fail">The lock sampler failed: {_esc(online["sampler_error"])}</p>'
    files = pd.DataFrame(
        [
            {
                "file": f["file"],
                "duration s": _fmt(f["duration_s"], 3),
                "writers blocked": _fmt(f["writers_blocked"]),
                "waits": _fmt(f["waits"]),
                "longest wait s": _fmt(f["longest_wait_s"], 3),
                "total wait s": _fmt(f["total_wait_s"], 3),
                "55P03": _fmt(f["lock_not_available"]),
                "57014": _fmt(f["query_canceled"]),
                "blocking statements": "; ".join(map(str, f["blocking_statements"] or [])),
            }
            for f in online["files"]
        ]
    )
    body += _frame_html(files, "no migration file recorded")
    waits = pd.DataFrame(
        [
            {
                "wait s": _fmt(w["wait_s"], 3),
                "relation": w["relation"],
                "mode": w["mode"],
                "waiting statement": w["query"],
                "blocked by": "; ".join(map(str, w["blocked_by_queries"] or [])),
                "since": w["started_at"],
            }
            for w in online["longest_waits"]
        ]
    )
    if not waits.empty:
        body += "<h3>Longest lock waits</h3>" + _frame_html(waits)
    return body


def _chart_online_timeline(
    frame: pd.DataFrame | None,
    online: Mapping[str, Any],
    ledger: Sequence[Mapping[str, Any]] | None,
) -> Chart | None:
    """Migrating under load: each file a band; load latency and errors above,
    writers waiting on a lock below, per second of the online phase."""
    from matplotlib.figure import Figure

    if frame is None or frame.empty:
        return None
    t0 = float(frame["ts"].min())
    second = np.floor(frame["ts"].to_numpy() - t0).astype(np.int64)
    latency = pd.Series(frame["latency_ms"].to_numpy()).groupby(second)
    errors = pd.Series((frame["outcome"] != "ok").to_numpy()).groupby(second).sum()
    span = int(second.max()) + 1
    blocked = np.zeros(span, dtype=np.int64)
    for wait in online.get("waits") or []:
        start, end = _parse_time(wait.get("started_at")), _parse_time(wait.get("last_seen_at"))
        if start is None or end is None:
            continue
        first = max(0, int(start.timestamp() - t0))
        last = min(span - 1, int(end.timestamp() - t0))
        if first <= last:
            blocked[first : last + 1] += 1

    fig = Figure(figsize=(11, 6.2))
    top, middle, bottom = fig.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.6, 1.6]}
    )
    p95 = latency.quantile(0.95)
    top.plot(p95.index, p95.to_numpy(), color=_PHASE_COLORS["online"], label="p95")
    p50 = latency.quantile(0.5)
    top.plot(p50.index, p50.to_numpy(), color="#888888", label="p50", linewidth=0.8)
    top.set_ylabel("latency ms", fontsize=8)
    top.legend(fontsize=7, loc="upper left")
    middle.bar(errors.index, errors.to_numpy(), width=1.0, color="#d62728")
    middle.set_ylabel("non-ok / s", fontsize=8)
    bottom.step(np.arange(span), blocked, where="post", color="#9467bd")
    bottom.set_ylabel("writers waiting", fontsize=8)
    bottom.set_xlabel("seconds since the online load started", fontsize=8)
    colors = ["#ffbb78", "#98df8a", "#aec7e8", "#c5b0d5", "#f7b6d2", "#c7c7c7"]
    for i, entry in enumerate(ledger or []):
        start, end = _parse_time(entry.get("started_at")), _parse_time(entry.get("finished_at"))
        if start is None or end is None:
            continue
        x0, x1 = start.timestamp() - t0, end.timestamp() - t0
        for ax in (top, middle, bottom):
            ax.axvspan(x0, max(x1, x0 + 0.05), color=colors[i % len(colors)], alpha=0.5)
        label = str(entry.get("file", "")).removesuffix(".sql")
        if entry.get("outcome") == "failed":
            label += " (failed)"
        top.annotate(
            label,
            (x0, 1.0),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
        )
    for ax in (top, middle, bottom):
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return (
        "Migrating under load: timeline",
        "each migration file as a band; load latency and errors above, writers waiting on a"
        " lock below",
        _png(fig),
    )


def _trend_chart(history: Sequence[Mapping[str, Any]]) -> Chart | None:
    """p95, refusal/error shares and migration durations over the nights."""
    from matplotlib.figure import Figure

    if len(history) < 2:
        return None
    frame = pd.DataFrame(list(history))
    x = np.arange(len(frame))
    panels = [
        ("post p95 per operation (ms)", "p95_ms|", lambda c: c.split("|", 1)[1]),
        ("post share of each outcome, all operations (%)", "share|all|", lambda c: c.split("|")[2]),
        ("migration duration (s)", "migration_s|", lambda c: c.split("|", 1)[1]),
    ]
    fig = Figure(figsize=(11, 8.4))
    axes = fig.subplots(len(panels), 1, squeeze=False).ravel()
    for ax, (title, prefix, label) in zip(axes, panels, strict=True):
        cols = [c for c in frame.columns if str(c).startswith(prefix)]
        for col in cols:
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
            if prefix.startswith("share"):
                values = values * 100.0
            ax.plot(x, values, marker="o", markersize=3, label=label(col))
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        if cols:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        else:
            ax.text(0.5, 0.5, "no figures recorded", transform=ax.transAxes, ha="center")
    labels = [str(r) for r in frame.get("run_id", pd.Series(x)).tolist()]
    step = max(1, len(labels) // 12)
    axes[-1].set_xticks(x[::step], labels[::step], rotation=30, ha="right", fontsize=7)
    for ax in axes[:-1]:
        ax.set_xticks(x[::step], [""] * len(x[::step]))
    fig.tight_layout()
    return (
        "Over the recorded nights",
        "post-migration p95, outcome shares and migration durations over the recorded nights",
        _png(fig),
    )


def _html_nightly(nightly: Mapping[str, Any] | None, trend: Chart | None) -> str:
    if nightly is None:
        return ""
    body = (
        f"<p>{nightly['regressions']} regression(s) in {len(nightly['comparisons'])}"
        f" comparisons with the median of {_esc(nightly['compared_with'])} earlier"
        " completed runs.</p>"
    )
    rows = pd.DataFrame(
        [
            {
                "kind": c["kind"],
                "figure": c["name"],
                "tonight": _fmt(c["current"], 4),
                "baseline (median)": _fmt(c["baseline"], 4),
                "limit": _fmt(c["limit"], 4),
                "result": "REGRESSION" if c["regression"] else "ok",
                "detail": c["detail"],
            }
            for c in sorted(nightly["comparisons"], key=lambda c: not c["regression"])
        ]
    )
    body += _frame_html(rows, "nothing to compare with yet: the first night of this history")
    if trend is not None:
        body += _figure_html(trend)
    return _section("nightly", "Nightly trend", body)


def _html_charts(charts: Sequence[Chart], *, present: bool) -> str:
    if not charts:
        note = "charts were turned off" if present else "no samples to chart"
        return _section("charts", "Charts", f'<p class="note">{note}</p>')
    return _section("charts", "Charts", "".join(_figure_html(c) for c in charts))


def _figure_html(chart: Chart) -> str:
    title, alt, png = chart
    return (
        f'<figure class="chart"><figcaption><h3>{_esc(title)}</h3></figcaption>'
        f'<img class="chart-img" alt="{_esc(alt)}" src="data:image/png;base64,{png}"></figure>'
    )


def _html_monitoring(summary: Mapping[str, Any]) -> str:
    mon = summary["monitoring"]
    rows = [
        {
            "operation": r["operation"],
            "SQLSTATE": f"{r['sqlstate']} ({r['outcome']})",
            "baseline share": _pct(r["baseline_share"], 3),
            "baseline /min": _fmt(r["baseline_per_minute"]),
            "alert when share >": _pct(r["alert_share"], 3),
            "alert when /min >": _fmt(r["alert_per_minute"]),
        }
        for r in mon["thresholds"]
    ]
    body = (
        f'<p class="note">Baseline: the {_esc(mon["baseline_phase"])} phase'
        f"{' (with the constraints on)' if mon['baseline_phase'] == Phase.POST else ''}."
        f" Alert when the share of requests refused exceeds max(baseline ×"
        f" {mon['spike_factor']:g}, baseline + {mon['min_share_pct']:g} pp), or refusals per"
        f" minute exceed max(baseline × {mon['spike_factor']:g}, baseline +"
        f" {mon['min_per_minute']:g}); set in the gates file, [monitoring].</p>"
        + _frame_html(pd.DataFrame(rows), "no baseline: the baseline phase has no samples")
    )
    return _section("monitoring", "Monitoring hand-off", body)
