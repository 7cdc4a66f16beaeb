"""The dress rehearsal: every stage in the runbook's order, in one run folder.

    provision -> lint -> load pre (lax) -> migrate 001..004 -> validate
              -> load post (strict) -> rollback drill -> report

Each stage is called through its own entry function; this module only
sequences them, times them, records them in ``run.json`` after every stage
and always ends with the report, also when a stage failed or Ctrl-C was
pressed (the report then names the failed stage, its error and the state of
the database). ``reports/latest`` points at the newest run.

With ``online``, migrations 001..004 run while the load keeps going (phase
``online``), and :class:`harness.locks.LockSampler` records which writers
waited on which lock behind which migration statement (``online.json``).

Exit status (:attr:`RehearsalResult.exit_status`): 0 every gate passed, 1 a
gate failed, 2 a stage failed, 130 interrupted.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness import __version__
from harness.errors import ConfigError, ExitStatus, HarnessError, MigrationError
from harness.migrate import DEFAULT_SQL_DIR, MigrateSettings, RollbackSettings
from harness.rundir import (
    LEDGER_FILE,
    LINT_FILE,
    MANIFEST_FILE,
    ONLINE_FILE,
    ROLLBACK_FILE,
    RUN_FILE,
    RUN_FORMAT_VERSION,
    VALIDATION_FILE,
    check_writable,
    new_run_id,
    point_latest,
    write_json,
)
from harness.target import DEFAULT_PRODUCTION_PATTERN, Target, check_destructive_allowed, scrub

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = (
    "provision",
    "lint",
    "load_pre",
    "migrate",
    "validate",
    "load_post",
    "rollback",
    "report",
)
# Stages a user may skip (the report is always written).
SKIPPABLE: frozenset[str] = frozenset(STAGES) - {"report"}

Printer = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class RehearseSettings:
    """One rehearsal. The defaults finish in a few minutes on a 2-core machine."""

    reports_dir: Path = Path("reports")
    run_id: str | None = None
    sql_dir: Path = DEFAULT_SQL_DIR
    scale: int = 1
    seed: int = 1
    users: int = 20
    spawn_rate: float | None = None
    pre_duration_s: float = 30.0
    post_duration_s: float = 30.0
    # Load knobs (harness.load.Contention); None: the load stage's defaults.
    contention: Any = None
    skip: frozenset[str] = frozenset()
    online: bool = False
    # With online: seconds of load before the migrations start and after they end.
    online_lead_s: float = 3.0
    online_tail_s: float = 2.0
    lock_timeout: str = "5s"
    statement_timeout: str = "15min"
    gates_file: Path | None = None
    lint_accepted_file: Path | None = None
    yes_destroy_target_data: bool = False
    allow_production: bool = False
    # Regex (case-insensitive) on the target's host and database name; "" turns it off.
    production_pattern: str = DEFAULT_PRODUCTION_PATTERN
    charts: bool = True
    # Extra facts for run.json (the nightly job records its profile here).
    labels: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skip) - SKIPPABLE)
        if unknown:
            raise ConfigError(
                f"cannot skip {', '.join(unknown)}",
                hint="skippable stages: " + ", ".join(s for s in STAGES if s in SKIPPABLE),
            )
        if self.users < 1:
            raise ConfigError(f"--users must be at least 1, got {self.users}")
        for name in ("pre_duration_s", "post_duration_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.removesuffix('_s').replace('_', ' ')} must be > 0")
        if self.scale < 1:
            raise ConfigError(f"--scale must be at least 1, got {self.scale}")


@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # pending | running | ok | failed | skipped | interrupted
    started_at: datetime | None = None
    duration_s: float | None = None
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RehearsalResult:
    run_id: str
    run_dir: Path
    status: str  # completed | failed | interrupted
    verdict: str | None  # PASS | FAIL | None when no report could be built
    failed_stage: str | None
    error: str | None
    stages: list[StageRecord]
    report_html: Path | None

    @property
    def exit_status(self) -> ExitStatus:
        if self.status == "interrupted":
            return ExitStatus.ERROR_CTRL_C
        if self.status == "failed" or self.verdict is None:
            return ExitStatus.ERROR
        return ExitStatus.SUCCESS if self.verdict == "PASS" else ExitStatus.CHECK_FAILED


class _StageFailed(Exception):
    pass


class _Run:
    """The mutable state of one rehearsal and its run.json."""

    def __init__(self, target: Target, settings: RehearseSettings, out: Printer) -> None:
        self.target = target
        self.settings = settings
        self.out = out
        self.run_id = settings.run_id or new_run_id()
        self.run_dir = Path(settings.reports_dir) / self.run_id
        self.started_at = datetime.now(UTC)
        self.clock = time.perf_counter()
        self.stages = {name: StageRecord(name) for name in STAGES}
        self.status = "running"
        self.failed_stage: str | None = None
        self.error: str | None = None
        self.baseline_catalog: dict[str, list[str]] | None = None
        self.database_state: dict[str, Any] | None = None

    def say(self, message: str) -> None:
        elapsed = time.perf_counter() - self.clock
        self.out(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {message}")

    def write_run(self) -> None:
        s = self.settings
        write_json(
            self.run_dir / RUN_FILE,
            {
                "run_id": self.run_id,
                "format_version": RUN_FORMAT_VERSION,
                "harness_version": __version__,
                "started_at": self.started_at,
                "finished_at": None if self.status == "running" else datetime.now(UTC),
                "status": self.status,
                "failed_stage": self.failed_stage,
                "error": self.error,
                "target": self.target.describe(),
                "database_state": self.database_state,
                "settings": {
                    "scale": s.scale,
                    "seed": s.seed,
                    "users": s.users,
                    "spawn_rate": s.spawn_rate,
                    "pre_duration_s": s.pre_duration_s,
                    "post_duration_s": s.post_duration_s,
                    "online": s.online,
                    "skip": sorted(s.skip),
                    "sql_dir": str(s.sql_dir),
                    "lock_timeout": s.lock_timeout,
                    "statement_timeout": s.statement_timeout,
                    "contention": s.contention.as_dict() if s.contention else None,
                    **s.labels,
                },
                "stages": [
                    {
                        "name": r.name,
                        "status": r.status,
                        "started_at": r.started_at,
                        "duration_s": None if r.duration_s is None else round(r.duration_s, 3),
                        "error": r.error,
                        **({"detail": r.detail} if r.detail else {}),
                    }
                    for r in self.stages.values()
                ],
            },
        )

    def mark_interrupted(self) -> None:
        """Ctrl-C outside a stage's own handler (e.g. as it announced itself)."""
        if self.status == "interrupted":
            return
        running = [r for r in self.stages.values() if r.status == "running"]
        for record in running:
            record.status = "interrupted"
        self.status, self.error = "interrupted", "interrupted (Ctrl-C)"
        self.failed_stage = running[0].name if running else None

    def stage(self, name: str, work: Callable[[StageRecord], Any]) -> Any:
        record = self.stages[name]
        if name in self.settings.skip:
            record.status = "skipped"
            self.say(f"{name}: skipped")
            self.write_run()
            return None
        record.status, record.started_at = "running", datetime.now(UTC)
        self.write_run()
        self.say(f"{name} ...")
        t0 = time.perf_counter()
        try:
            value = work(record)
        except HarnessError as exc:
            record.status, record.error = "failed", scrub(str(exc), self.target.url)
            self.status, self.failed_stage, self.error = "failed", name, record.error
            self.say(f"{name}: FAILED: {record.error}")
            raise _StageFailed from None
        except KeyboardInterrupt:
            record.status = "interrupted"
            self.status, self.failed_stage, self.error = "interrupted", name, "interrupted (Ctrl-C)"
            self.say(f"{name}: interrupted")
            raise
        except Exception as exc:  # a bug: still recorded, still reported
            record.status = "failed"
            record.error = scrub(f"internal error: {type(exc).__name__}: {exc}", self.target.url)
            self.status, self.failed_stage, self.error = "failed", name, record.error
            log.debug("stage %s crashed:\n%s", name, traceback.format_exc())
            self.say(f"{name}: FAILED: {record.error}")
            raise _StageFailed from None
        finally:
            record.duration_s = time.perf_counter() - t0
            self.write_run()
        record.status = "ok"
        self.say(f"{name}: done in {record.duration_s:.1f}s")
        self.write_run()
        return value


# --------------------------------------------------------------------------
# The stages, each a thin call into its module


def _provision(run: _Run, record: StageRecord) -> None:
    from harness.provision import ProvisionSettings, provision

    s = run.settings
    result = provision(
        run.target,
        ProvisionSettings(
            scale=s.scale,
            seed=s.seed,
            yes_destroy_target_data=s.yes_destroy_target_data,
            allow_production=s.allow_production,
            production_pattern=s.production_pattern,
            reset_schema=True,
            manifest_path=run.run_dir / MANIFEST_FILE,
        ),
    )
    record.detail = {"rows": result.total_rows, "rows_per_second": round(result.rows_per_second)}
    run.say(f"provision: {result.total_rows} rows at {result.rows_per_second:,.0f} rows/s")


def _lint(run: _Run, record: StageRecord) -> None:
    from harness.lint import LintSettings, lint

    result = lint(
        LintSettings(sql_dir=run.settings.sql_dir, accepted_file=run.settings.lint_accepted_file)
    )
    write_json(run.run_dir / LINT_FILE, result.as_dict())
    record.detail = {"new": len(result.new), "accepted": len(result.accepted)}
    if result.new:
        first = result.new[0]
        raise HarnessError(
            f"squawk found {len(result.new)} new warning(s), first: {first.file}:{first.line}"
            f" {first.rule}",
            hint="fix the migration or accept the warning with a reason in"
            " sql/squawk-accepted.toml (see `harness lint`)",
        )


def _load(run: _Run, record: StageRecord, phase: str, mode: str, duration_s: float) -> Any:
    from harness.load import Contention, LoadSettings, Mode, run_load

    s = run.settings
    result = run_load(
        run.target,
        LoadSettings(
            phase=phase,
            users=s.users,
            spawn_rate=s.spawn_rate,
            duration_s=duration_s,
            mode=Mode(mode),
            contention=s.contention or Contention(),
            run_dir=run.run_dir,
        ),
        on_progress=lambda p: run.say(
            f"load {phase}: {p.requests} requests, {p.rps:,.0f}/s, "
            + ", ".join(f"{k} {v:.1%}" for k, v in sorted(p.outcome_rates.items()) if v)
        ),
    )
    record.detail = {
        "requests": result.requests,
        "rps": round(result.rps, 1),
        "outcomes": result.outcomes,
        "invariants": result.invariants,
    }
    inv = result.invariants or {}
    run.say(
        f"load {phase}: {result.requests} requests ({result.rps:,.0f}/s), double bookings"
        f" {inv.get('overlapping_allocations', 0) + inv.get('overlapping_holds', 0)},"
        f" 23P01 {result.outcomes.get('exclusion_violation', 0)},"
        f" 23505 {result.outcomes.get('unique_violation', 0)}"
    )
    return result


def _migrate_settings(run: _Run) -> MigrateSettings:
    # When the schema is there already (provision made it), 000_baseline.sql is
    # left out: its IF NOT EXISTS statements change nothing but still take
    # locks, and under live load (--online) those deadlock with the writers.
    return MigrateSettings(
        sql_dir=run.settings.sql_dir,
        lock_timeout=run.settings.lock_timeout,
        statement_timeout=run.settings.statement_timeout,
        include_baseline=run.baseline_catalog is None,
        # Under --online the writers keep going: a deadlock with them is
        # recorded in the ledger and the file is tried again.
        retries=3,
    )


def _snapshot_baseline(run: _Run) -> None:
    """The catalog before 001: what the rollback drill must return to."""
    from harness.validate import catalog_snapshot

    with run.target.connect() as conn:
        if conn.execute("SELECT to_regclass('public.allocations') IS NOT NULL").fetchone()[0]:
            run.baseline_catalog = catalog_snapshot(conn)


def _migrate(run: _Run, record: StageRecord) -> Any:
    from harness.migrate import migrate

    def announce(event: Any) -> None:
        if event.kind in ("applied", "failed"):
            run.say(f"migrate: {event.file} {event.kind} in {event.duration_s or 0:.2f}s")

    try:
        result = migrate(run.target, _migrate_settings(run), on_event=announce)
    except MigrationError as exc:
        partial = getattr(exc, "result", None)
        if partial is not None:
            _write_ledger(run, partial)
        raise
    _write_ledger(run, result)
    record.detail = {"applied": [e.file for e in result.applied], "skipped": result.skipped}
    return result


def _write_ledger(run: _Run, result: Any) -> None:
    write_json(run.run_dir / LEDGER_FILE, [e.as_dict() for e in result.entries])


def _migrate_online(run: _Run, record: StageRecord) -> Any:
    """Migrations while the load keeps going; lock waits sampled every 100 ms."""
    from harness.load import Contention, LoadSettings, Mode, run_load
    from harness.locks import LockSampler, LockSamplerSettings, summarize_by_file
    from harness.migrate import migrate
    from harness.samples import read_samples

    s = run.settings
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def migrate_under_load() -> None:
        sampler = LockSampler(run.target, LockSamplerSettings()).start()
        try:
            time.sleep(s.online_lead_s)
            outcome["result"] = migrate(run.target, _migrate_settings(run))
        except BaseException as exc:  # handed to the main greenlet below
            outcome["error"] = exc
        finally:
            time.sleep(s.online_tail_s)
            outcome["waits"] = sampler.stop()
            outcome["sampler_error"] = sampler.error
            outcome["samples_taken"] = sampler.samples_taken
            stop.set()

    migrator = threading.Thread(target=migrate_under_load, name="online-migrate", daemon=True)
    migrator.start()
    load = run_load(
        run.target,
        LoadSettings(
            phase="online",
            users=s.users,
            spawn_rate=s.spawn_rate,
            duration_s=None,
            mode=Mode.LAX,
            contention=s.contention or Contention(),
            run_dir=run.run_dir,
        ),
        stop=stop,
    )
    migrator.join()
    error = outcome.get("error")
    result = outcome.get("result") or getattr(error, "result", None)
    if result is not None:
        _write_ledger(run, result)
    entries = [e.as_dict() for e in result.entries] if result is not None else []
    frame = read_samples(load.samples_path)
    failed = frame[frame["outcome"].isin(["lock_not_available", "query_canceled"])]
    by_file = summarize_by_file(
        outcome.get("waits", []),
        entries,
        [{"ts": ts, "outcome": o} for ts, o in zip(failed["ts"], failed["outcome"], strict=True)],
    )
    waits = outcome.get("waits", [])
    write_json(
        run.run_dir / ONLINE_FILE,
        {
            "interval_s": LockSamplerSettings().interval_s,
            "samples_taken": outcome.get("samples_taken", 0),
            "sampler_error": outcome.get("sampler_error"),
            "files": by_file,
            "waits": [w.as_dict() for w in waits],
            "load_phase": "online",
        },
    )
    blocked = sum(row["writers_blocked"] for row in by_file)
    longest = max((row["longest_wait_s"] for row in by_file), default=0.0)
    record.detail = {"writers_blocked": blocked, "longest_wait_s": longest}
    run.say(f"online: {blocked} writer(s) blocked, longest wait {longest:.2f}s")
    if isinstance(error, BaseException):
        raise error
    return result


def _validate(run: _Run, record: StageRecord) -> Any:
    from harness.validate import ValidateSettings, validate

    result = validate(run.target, ValidateSettings())
    write_json(run.run_dir / VALIDATION_FILE, result.as_dict())
    record.detail = {"ok": result.ok, "failed": [c.name for c in result.failed_checks]}
    run.say(f"validate: {'ok' if result.ok else 'FAILED: ' + ', '.join(record.detail['failed'])}")
    return result


def _rollback_drill(run: _Run, record: StageRecord) -> None:
    from harness.migrate import migrate, rollback
    from harness.validate import ValidateSettings, catalog_snapshot, diff_catalogs, validate

    s = run.settings
    drill: dict[str, Any] = {"catalog_equal": None, "differences": [], "reapplied": False}
    t0 = time.perf_counter()
    try:
        undone = rollback(
            run.target,
            RollbackSettings(
                sql_dir=s.sql_dir,
                lock_timeout=s.lock_timeout,
                statement_timeout=s.statement_timeout,
            ),
        )
        drill["rolled_back"] = undone.rolled_back
        drill["rollback_duration_s"] = round(undone.duration_s, 3)
        with run.target.connect() as conn:
            after = catalog_snapshot(conn)
        if run.baseline_catalog is None:
            drill["differences"] = ["no baseline catalog was taken (provision skipped?)"]
        else:
            drill["differences"] = diff_catalogs(run.baseline_catalog, after)
            drill["catalog_equal"] = not drill["differences"]
        run.say(
            "rollback: catalog "
            + ("equals the baseline's" if drill["catalog_equal"] else "DIFFERS from the baseline's")
        )
        again = migrate(run.target, _migrate_settings(run))
        drill["reapplied"] = True
        drill["reapplied_files"] = [e.file for e in again.applied]
        drill["reapply_duration_s"] = round(again.duration_s, 3)
        checked = validate(run.target, ValidateSettings())
        drill["validation_ok"] = checked.ok
        drill["validation_failed"] = [c.name for c in checked.failed_checks]
        run.say(f"rollback: re-applied {len(again.applied)} files, validation ok={checked.ok}")
    finally:
        drill["duration_s"] = round(time.perf_counter() - t0, 3)
        write_json(run.run_dir / ROLLBACK_FILE, drill)
        record.detail = {"catalog_equal": drill["catalog_equal"]}


def _record_database_state(run: _Run) -> None:
    """After a failure: where each migration file stands and what the catalog holds.

    Written so that the report (and the person reading it) knows what state the
    run left the database in, and whether `harness migrate` / `rollback` can
    continue from there. Best effort: the database may be what failed.
    """
    from harness.migrate import current_state, read_ledger
    from harness.validate import ValidateSettings, validate

    state: dict[str, Any] = {}
    try:
        entries = current_state(read_ledger(run.target))
        state["ledger"] = {name: entry.outcome for name, entry in sorted(entries.items())}
        if not (run.run_dir / VALIDATION_FILE).exists():
            checked = validate(run.target, ValidateSettings())
            write_json(run.run_dir / VALIDATION_FILE, checked.as_dict())
        state["validation_file"] = VALIDATION_FILE
    except (HarnessError, OSError) as exc:
        state["error"] = scrub(str(exc), run.target.url)
    except Exception as exc:  # psycopg errors and the like: the server may be gone
        state["error"] = scrub(f"{type(exc).__name__}: {exc}", run.target.url)
    run.database_state = state


def _report(run: _Run, record: StageRecord) -> Any:
    from harness.report import ReportSettings, build_report

    # The page lists the stages from run.json: the report stage is the page
    # itself, so it is shown as done (a failure to build it is recorded after).
    record.status = "ok"
    run.write_run()
    result = build_report(
        ReportSettings(
            run_dir=run.run_dir, gates_file=run.settings.gates_file, charts=run.settings.charts
        )
    )
    record.detail = {"verdict": str(result.verdict)}
    return result


# --------------------------------------------------------------------------
# The entry point


def preflight(target: Target, settings: RehearseSettings) -> None:
    """Everything that can be refused before the run starts, refused now.

    A bad reports folder, gates file or sql folder, a target that may not be
    destroyed, a scale that cannot fit, a migration edited after it was
    applied: each is one error, raised before the run folder exists and
    before the database is touched, not minutes into the rehearsal.
    """
    from harness.migrate import (
        DEFAULT_ROLLBACK_FILE,
        check_files,
        current_state,
        plan,
        read_ledger,
    )
    from harness.provision import ProvisionSettings, check_disk_space

    check_writable(Path(settings.reports_dir))
    if settings.gates_file is not None:
        from harness.report import load_gates

        load_gates(settings.gates_file)  # a bad gates file fails now, not after the load
    skip = settings.skip
    rollback_file = None if "rollback" in skip else DEFAULT_ROLLBACK_FILE
    files = check_files(settings.sql_dir, rollback_file=rollback_file)
    # Every rehearsal writes into the target (load, migrations), not only provision.
    check_destructive_allowed(
        target,
        confirmed=settings.yes_destroy_target_data,
        allow_production=settings.allow_production,
        pattern=settings.production_pattern,
        action="rehearsing on it",
    )
    if "provision" not in skip:
        check_disk_space(target, ProvisionSettings(scale=settings.scale, seed=settings.seed))
    elif "migrate" not in skip:
        # No fresh snapshot: the target's ledger stays, and a file edited
        # since it was applied there would fail the migrate stage after the
        # pre load had already written into the database.
        try:
            plan(files, current_state(read_ledger(target)), force=False)
        except MigrationError as exc:
            raise MigrationError(
                exc.message,
                hint="restore the applied version, or let the rehearsal provision a fresh"
                " snapshot (do not skip provision); nothing was changed",
                file=exc.file,
            ) from None


def rehearse(
    target: Target, settings: RehearseSettings, *, out: Printer = print
) -> RehearsalResult:
    """Run the whole rehearsal; always write run.json and, if at all possible, the report."""
    preflight(target, settings)
    run = _Run(target, settings, out)
    run.run_dir.mkdir(parents=True, exist_ok=False)
    point_latest(Path(settings.reports_dir), run.run_dir)
    run.say(f"rehearsal {run.run_id} on {target.display} (PostgreSQL {target.server_version})")
    run.write_run()
    interrupted: KeyboardInterrupt | None = None
    try:
        run.stage("provision", lambda r: _provision(run, r))
        _snapshot_baseline(run)
        run.stage("lint", lambda r: _lint(run, r))
        run.stage("load_pre", lambda r: _load(run, r, "pre", "lax", settings.pre_duration_s))
        if settings.online:
            run.stage("migrate", lambda r: _migrate_online(run, r))
        else:
            run.stage("migrate", lambda r: _migrate(run, r))
        run.stage("validate", lambda r: _validate(run, r))
        run.stage("load_post", lambda r: _load(run, r, "post", "strict", settings.post_duration_s))
        run.stage("rollback", lambda r: _rollback_drill(run, r))
        run.status = "completed"
    except _StageFailed:
        pass
    except KeyboardInterrupt as exc:
        interrupted = exc
        run.mark_interrupted()
    if run.status != "completed":
        _record_database_state(run)
    run.write_run()

    report = None
    try:
        report = run.stage("report", lambda r: _report(run, r))
    except _StageFailed:
        if run.status == "completed":
            run.status = "failed"
    except KeyboardInterrupt as exc:
        interrupted = interrupted or exc
        run.mark_interrupted()
    run.write_run()
    if report is not None:
        run.say(f"report: {report.report_html} verdict {report.verdict}")
        for gate in report.gates:
            run.say(f"  gate {gate.name}: {gate.status} (measured {gate.measured})")
    result = RehearsalResult(
        run_id=run.run_id,
        run_dir=run.run_dir,
        status=run.status,
        verdict=str(report.verdict) if report is not None else None,
        failed_stage=run.failed_stage,
        error=run.error,
        stages=list(run.stages.values()),
        report_html=report.report_html if report is not None else None,
    )
    if interrupted is not None:
        log.info("rehearsal %s interrupted; partial report written", run.run_id)
    return result
