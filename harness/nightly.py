"""Nightly stage: the rehearsal with a fixed profile, compared with earlier nights.

1. Run :func:`harness.rehearse.rehearse` with the profile of a TOML file
   (seed, scale, users, durations, contention: fixed, so nights compare).
2. Append the run's figures (from its ``summary.json``) to the history, one
   row per run, a Parquet file under ``reports/`` (pandas).
3. Compare with the median of the last N completed runs:

   - p95 latency of each operation of the post phase: a regression when the
     bootstrap 95% interval of tonight's p95 minus the median lies wholly above
     the tolerance, so noise is not read as a regression;
   - outcome rates: the share of each unexpected outcome (anything but ok,
     23P01, 23505) per operation may not grow by more than its tolerance, and
     the shares of 23P01 / 23505 may not move by more than theirs;
   - migration durations: each file's may not exceed the median by more than
     its tolerance.

4. Write ``nightly.json`` into the run folder and rebuild the report, which
   then shows the trend charts and has one JUnit test case per comparison.

Exit status: 0 pass, 1 a regression or a failed gate, 2 the run could not
complete (or the profile is bad).
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import ConfigError, ExitStatus
from harness.outcomes import EXPECTED_REFUSALS, Outcome
from harness.rehearse import Printer, RehearsalResult, RehearseSettings, rehearse
from harness.rundir import SUMMARY_FILE, atomic_write_with, read_json, samples_file, write_json
from harness.target import DEFAULT_PRODUCTION_PATTERN, Target

log = logging.getLogger(__name__)

NIGHTLY_FILE = "nightly.json"
HISTORY_FILE = "nightly-history.parquet"
COMPARED_PHASE = "post"
UNEXPECTED: tuple[str, ...] = tuple(
    str(o) for o in Outcome if o is not Outcome.OK and o not in EXPECTED_REFUSALS
)
REFUSALS: tuple[str, ...] = tuple(sorted(str(o) for o in EXPECTED_REFUSALS))


@dataclass(frozen=True, kw_only=True)
class NightlyProfile:
    """What every night runs ([rehearsal]) and how it is compared ([compare])."""

    seed: int = 7
    scale: int = 1
    users: int = 10
    pre_duration_s: float = 20.0
    post_duration_s: float = 20.0
    hot_tables: int = 2
    hot_windows: int = 2
    hot_fraction: float = 0.5
    retry_fraction: float = 0.05
    online: bool = False
    # [compare]
    last_runs: int = 7
    p95_tolerance_pct: float = 25.0
    p95_tolerance_ms: float = 2.0
    unexpected_rate_tolerance_pct: float = 1.0
    refusal_rate_tolerance_pct: float = 20.0
    migration_tolerance_pct: float = 100.0
    migration_tolerance_s: float = 1.0


_REHEARSAL_KEYS = {
    "seed",
    "scale",
    "users",
    "pre_duration",
    "post_duration",
    "hot_tables",
    "hot_windows",
    "hot_fraction",
    "retry_fraction",
    "online",
}
_COMPARE_KEYS = {
    "last_runs",
    "p95_tolerance_pct",
    "p95_tolerance_ms",
    "unexpected_rate_tolerance_pct",
    "refusal_rate_tolerance_pct",
    "migration_tolerance_pct",
    "migration_tolerance_s",
}


def load_profile(path: Path) -> NightlyProfile:
    """Read a profile TOML; an unknown key or a wrong type is a ConfigError naming it."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"nightly profile {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"nightly profile {path} is not valid TOML: {exc}") from None
    unknown_sections = sorted(set(data) - {"rehearsal", "compare"})
    if unknown_sections:
        raise ConfigError(
            f"{path}: unknown section [{unknown_sections[0]}]",
            hint="use [rehearsal] and [compare]",
        )
    values: dict[str, Any] = {}
    for section, allowed in (("rehearsal", _REHEARSAL_KEYS), ("compare", _COMPARE_KEYS)):
        table = data.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: {section!r} must be a table ([{section}]), got {type(table).__name__}"
            )
        for key, value in table.items():
            if key not in allowed:
                raise ConfigError(
                    f"{path}: unknown key {key!r} in [{section}]",
                    hint="known keys: " + ", ".join(sorted(allowed)),
                )
            name = f"{key}_s" if key in ("pre_duration", "post_duration") else key
            if key in ("pre_duration", "post_duration"):
                value = _seconds(value, f"{path}: [{section}] {key}")
            values[name] = value
    defaults = NightlyProfile()
    for f in fields(NightlyProfile):
        if f.name in values:
            expected = type(getattr(defaults, f.name))
            value = values[f.name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                values[f.name] = float(value)
            elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(
                    f"{path}: {f.name} must be {expected.__name__}, got {type(value).__name__}"
                )
    profile = NightlyProfile(**values)
    if profile.last_runs < 1 or profile.users < 1 or profile.scale < 1:
        raise ConfigError(f"{path}: last_runs, users and scale must be at least 1")
    return profile


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``1h`` -> seconds; ValueError unless it is > 0."""
    raw = text.strip().lower()
    factor = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(raw[-1:])
    seconds = float(raw[:-1] if factor else raw) * (factor or 1.0)
    if not seconds > 0:
        raise ValueError(f"must be longer than 0, got {text}")
    return seconds


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            pass
    raise ConfigError(f'{where} must be a duration such as 20 or "20s", got {value!r}')


@dataclass(frozen=True, kw_only=True)
class NightlySettings:
    profile: NightlyProfile
    reports_dir: Path = Path("reports")
    history_file: Path | None = None  # default: reports_dir / nightly-history.parquet
    sql_dir: Path | None = None
    gates_file: Path | None = None
    yes_destroy_target_data: bool = False
    allow_production: bool = False
    production_pattern: str = DEFAULT_PRODUCTION_PATTERN
    profile_source: str = "defaults"

    @property
    def history_path(self) -> Path:
        return self.history_file or Path(self.reports_dir) / HISTORY_FILE


@dataclass(frozen=True)
class Comparison:
    kind: str  # p95 | rate | migration
    name: str  # e.g. "p95 create_booking", "deadlock_detected share of create_booking"
    current: float | None
    baseline: float | None
    limit: float | None
    regression: bool
    detail: str


@dataclass(frozen=True, kw_only=True)
class NightlyResult:
    rehearsal: RehearsalResult
    comparisons: list[Comparison]
    history_path: Path
    history_runs: int
    compared_with: int

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.regression]

    @property
    def exit_status(self) -> ExitStatus:
        if self.rehearsal.status != "completed":
            return self.rehearsal.exit_status
        if self.regressions or self.rehearsal.verdict != "PASS":
            return ExitStatus.CHECK_FAILED
        return ExitStatus.SUCCESS


# --------------------------------------------------------------------------
# History


def history_row(summary: dict[str, Any], rehearsal: RehearsalResult) -> dict[str, Any]:
    """One flat row of figures from a run's summary.json."""
    row: dict[str, Any] = {
        "run_id": rehearsal.run_id,
        "recorded_at": datetime.now(UTC).isoformat(),
        "status": rehearsal.status,
        "verdict": rehearsal.verdict,
        "run_dir": str(rehearsal.run_dir),
    }
    for op, figures in (summary.get("latency", {}).get(COMPARED_PHASE) or {}).items():
        row[f"p95_ms|{op}"] = figures.get("p95_ms")
        row[f"requests|{op}"] = figures.get("requests")
    for op, outcomes in (summary.get("outcome_rates", {}).get(COMPARED_PHASE) or {}).items():
        for outcome, rate in outcomes.items():
            row[f"share|{op}|{outcome}"] = rate.get("share")
    for file, migration in (summary.get("migrations") or {}).items():
        row[f"migration_s|{file}"] = migration.get("duration_s")
    return row


def read_history(path: Path) -> pd.DataFrame:
    if not Path(path).exists():
        return pd.DataFrame()
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ConfigError(
            f"nightly history {path} is unreadable: {exc}",
            hint="move it aside; the next night starts a new history",
        ) from None


def append_history(path: Path, row: dict[str, Any]) -> pd.DataFrame:
    history = read_history(path)
    updated = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
    atomic_write_with(Path(path), lambda tmp: updated.to_parquet(tmp, index=False))
    return updated


# --------------------------------------------------------------------------
# Comparison


def compare(
    current: dict[str, Any],
    previous: pd.DataFrame,
    profile: NightlyProfile,
    latencies: dict[str, np.ndarray],
) -> list[Comparison]:
    """Tonight's row against the median of ``previous`` (completed runs only)."""
    from harness.report import bootstrap_quantile_delta

    out: list[Comparison] = []
    if previous.empty:
        return out

    def median(column: str) -> float | None:
        if column not in previous:
            return None
        values = pd.to_numeric(previous[column], errors="coerce").dropna()
        return float(values.median()) if len(values) else None

    for column in sorted(k for k in current if k.startswith("p95_ms|")):
        op = column.split("|", 1)[1]
        now, base = current[column], median(column)
        values = latencies.get(op)
        if now is None or base is None or values is None or values.size == 0:
            continue
        limit = max(base * profile.p95_tolerance_pct / 100.0, profile.p95_tolerance_ms)
        # The history is summarised by its median; the interval is tonight's noise.
        ci = bootstrap_quantile_delta(np.array([base]), values, quantile=0.95)
        regression = ci.low > limit
        out.append(
            Comparison(
                kind="p95",
                name=f"p95 {op}",
                current=now,
                baseline=base,
                limit=base + limit,
                regression=regression,
                detail=f"{op} p95 {now:.2f} ms vs median {base:.2f} ms of the last"
                f" {len(previous)} runs (change {ci.delta:+.2f} ms, 95% CI"
                f" [{ci.low:+.2f}, {ci.high:+.2f}] ms, allowed +{limit:.2f} ms)",
            )
        )
    for column in sorted(k for k in current if k.startswith("share|")):
        _, op, outcome = column.split("|", 2)
        if outcome in UNEXPECTED:
            tolerance = profile.unexpected_rate_tolerance_pct / 100.0
            two_sided = False
        elif outcome in REFUSALS:
            tolerance = profile.refusal_rate_tolerance_pct / 100.0
            two_sided = True
        else:
            continue
        now, base = current[column], median(column)
        if now is None:
            continue
        base = base or 0.0
        change = now - base
        regression = abs(change) > tolerance if two_sided else change > tolerance
        if not regression and now == 0 and base == 0:
            continue  # nothing to say about an outcome that never happens
        out.append(
            Comparison(
                kind="rate",
                name=f"{outcome} share of {op}",
                current=now,
                baseline=base,
                limit=tolerance,
                regression=regression,
                detail=f"{op} {outcome} {now:.2%} vs median {base:.2%}"
                f" (allowed {'±' if two_sided else '+'}{tolerance:.2%})",
            )
        )
    for column in sorted(k for k in current if k.startswith("migration_s|")):
        file = column.split("|", 1)[1]
        now, base = current[column], median(column)
        if now is None or base is None:
            continue
        limit = base + max(
            base * profile.migration_tolerance_pct / 100.0, profile.migration_tolerance_s
        )
        out.append(
            Comparison(
                kind="migration",
                name=f"duration of {file}",
                current=now,
                baseline=base,
                limit=limit,
                regression=now > limit,
                detail=f"{file} took {now:.2f} s vs median {base:.2f} s (allowed {limit:.2f} s)",
            )
        )
    return out


def _phase_latencies(run_dir: Path) -> dict[str, np.ndarray]:
    from harness.samples import read_samples

    path = Path(run_dir) / samples_file(COMPARED_PHASE)
    if not path.exists():
        return {}
    frame = read_samples(path)
    return {
        str(op): group["latency_ms"].to_numpy(dtype=np.float64)
        for op, group in frame.groupby("operation", observed=True)
    }


# --------------------------------------------------------------------------
# The stage


def nightly(target: Target, settings: NightlySettings, *, out: Printer = print) -> NightlyResult:
    """Rehearse with the profile, record the night, compare, rebuild the report."""
    from harness.load import Contention
    from harness.report import ReportSettings, build_report

    p = settings.profile
    rehearsal_settings = RehearseSettings(
        reports_dir=settings.reports_dir,
        scale=p.scale,
        seed=p.seed,
        users=p.users,
        pre_duration_s=p.pre_duration_s,
        post_duration_s=p.post_duration_s,
        contention=Contention(
            hot_tables=p.hot_tables,
            hot_windows=p.hot_windows,
            hot_fraction=p.hot_fraction,
            retry_fraction=p.retry_fraction,
        ),
        online=p.online,
        gates_file=settings.gates_file,
        yes_destroy_target_data=settings.yes_destroy_target_data,
        allow_production=settings.allow_production,
        production_pattern=settings.production_pattern,
        labels={"nightly_profile": settings.profile_source},
        **({"sql_dir": settings.sql_dir} if settings.sql_dir else {}),
    )
    history_path = settings.history_path
    previous_all = read_history(history_path)  # fail on a damaged history before the run
    result = rehearse(target, rehearsal_settings, out=out)

    summary_path = result.run_dir / SUMMARY_FILE
    summary = read_json(summary_path) if summary_path.exists() else {}
    row = history_row(summary, result)
    history = append_history(history_path, row)

    completed = previous_all
    if not completed.empty and "status" in completed:
        completed = completed[completed["status"] == "completed"]
    previous = completed.tail(p.last_runs)
    comparisons: list[Comparison] = []
    if result.status == "completed":
        comparisons = compare(row, previous, p, _phase_latencies(result.run_dir))
    regressions = [c for c in comparisons if c.regression]
    write_json(
        result.run_dir / NIGHTLY_FILE,
        {
            "profile": {f.name: getattr(p, f.name) for f in fields(NightlyProfile)},
            "profile_source": settings.profile_source,
            "history_file": str(history_path),
            "compared_with": len(previous),
            "compared_runs": list(previous["run_id"]) if "run_id" in previous else [],
            "regressions": [c.__dict__ for c in regressions],
            "comparisons": [c.__dict__ for c in comparisons],
            "history": _history_for_report(history),
        },
    )
    if result.status == "completed" or summary:
        build_report(ReportSettings(run_dir=result.run_dir, gates_file=settings.gates_file))
    if previous.empty:
        out("nightly: first completed night in this history: nothing to compare with yet")
    for c in regressions:
        out(f"nightly: REGRESSION {c.detail}")
    out(
        f"nightly: {len(comparisons)} comparisons with {len(previous)} earlier runs,"
        f" {len(regressions)} regression(s); history {history_path} ({len(history)} rows)"
    )
    return NightlyResult(
        rehearsal=result,
        comparisons=comparisons,
        history_path=history_path,
        history_runs=len(history),
        compared_with=len(previous),
    )


def _history_for_report(history: pd.DataFrame) -> list[dict[str, Any]]:
    """The history rows the report's trend charts need (NaN -> None)."""
    keep = [
        c
        for c in history.columns
        if c in ("run_id", "recorded_at", "status", "verdict")
        or c.startswith(("p95_ms|", "migration_s|"))
        or (c.startswith("share|") and c.rsplit("|", 1)[1] != "ok")
    ]
    rows = []
    for record in history[keep].to_dict(orient="records"):
        rows.append(
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        )
    return rows
