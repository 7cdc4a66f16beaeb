"""The ``harness`` command line: parse flags, call one stage, print its result.

No stage logic lives here. Each command is a pair: ``_add_<name>`` declares
its flags, ``cmd_<name>`` builds the stage's settings, calls the stage's entry
function and prints. Expected failures (:class:`HarnessError`) are caught once,
in :func:`main`, and printed as one line; ``--traceback`` shows the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from harness import __version__
from harness.errors import ExitStatus, HarnessError
from harness.target import (
    DEFAULT_PRODUCTION_PATTERN,
    Target,
    TargetSettings,
    open_target,
    resolve_url,
    scrub,
)

if TYPE_CHECKING:
    from harness.load import Contention
    from harness.migrate import MigrationEvent
    from harness.rehearse import RehearseSettings
    from harness.validate import ValidationResult

log = logging.getLogger(__name__)

DEFAULT_REPORTS_DIR = Path("reports")
DEFAULT_SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
DEFAULT_NIGHTLY_PROFILE = Path("nightly.toml")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error of the harness."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("harness").strip()
        where = f"{command}: " if command else ""
        self.exit(
            int(ExitStatus.ERROR),
            f"harness: error: {where}{message} (see {self.prog} --help)\n",
        )


def _common_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    parent.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    return parent


def _target_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("target database")
    group.add_argument(
        "--db-url",
        metavar="URL",
        help="PostgreSQL URL of the target (else $SUPABASE_DB_URL, else $DATABASE_URL,"
        " else an embedded PostgreSQL 18 in a per-user cache folder)",
    )
    group.add_argument(
        "--fresh",
        action="store_true",
        help="embedded target only: throw away its data directory and start a new one",
    )
    group.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="embedded target only: data directory (default: per-user cache, or $HARNESS_DATA_DIR)",
    )
    group.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting after this long (default: %(default)s)",
    )
    return parent


def target_settings_from(args: argparse.Namespace) -> TargetSettings:
    return TargetSettings(
        db_url=args.db_url,
        fresh=args.fresh,
        connect_timeout=args.connect_timeout,
        data_dir=args.data_dir,
    )


def _open(args: argparse.Namespace, environ: Mapping[str, str]) -> Target:
    return open_target(target_settings_from(args), environ)


# --------------------------------------------------------------------------
# harness target


def _add_target(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "target",
        parents=parents,
        help="show which database the harness would use, and check it",
        description="Resolve the target (--db-url, $SUPABASE_DB_URL, $DATABASE_URL, else the"
        " embedded server), connect once and check btree_gist is available.",
    )
    p.set_defaults(func=cmd_target)


def cmd_target(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    target = _open(args, environ)
    print(f"target:   {target.display}")
    print(f"source:   {target.source}")
    print(f"server:   PostgreSQL {target.server_version}")
    print(f"prepared: {'off (transaction pooler)' if target.pooled else 'on'}")
    return ExitStatus.SUCCESS


# --------------------------------------------------------------------------
# harness validate


def _add_validate(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate",
        parents=parents,
        help="check the constraints, indexes and triggers of 001-004, integrity and invariants",
        description="The runbook's validation as code: every object 001-004 promise is in the"
        " catalog (validated or NOT VALID), integrity queries that rewrite no table, and the"
        " invariants (no overlapping allocations or holds). Exit 1 when a check fails.",
    )
    p.add_argument(
        "--validate-fks",
        action="store_true",
        help="first run VALIDATE CONSTRAINT on the expected foreign keys still NOT VALID",
    )
    p.add_argument(
        "--lock-timeout",
        default="5s",
        metavar="DURATION",
        help="lock_timeout for --validate-fks (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.validate import ValidateSettings, validate

    target = _open(args, environ)
    result = validate(
        target, ValidateSettings(validate_fks=args.validate_fks, lock_timeout=args.lock_timeout)
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_validation(result))
    return ExitStatus.SUCCESS if result.ok else ExitStatus.CHECK_FAILED


def format_validation(result: ValidationResult) -> str:
    """The validation result as a plain-text table and summary lines."""
    rows = [("", "object", "kind", "table", "state")]
    for check in result.checks:
        rows.append(
            ("ok" if check.ok else "FAIL", check.name, check.kind, check.table, check.detail)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4]
        for row in rows
    ]
    inv = result.invariants
    lines.append("")
    lines.append(
        f"invariants: overlapping allocations {inv.overlapping_allocations},"
        f" overlapping holds {inv.overlapping_holds}, orphan allocations"
        f" {inv.orphan_allocations}, inventory of another restaurant"
        f" {inv.inventory_other_restaurant}"
    )
    lines.append(
        "integrity: " + ", ".join(f"{name} {count}" for name, count in result.integrity.items())
    )
    if result.quarantine:
        lines.append(
            "quarantined by 001: "
            + ", ".join(f"{reason} {n}" for reason, n in result.quarantine.items())
        )
    for name in result.validated_fks:
        lines.append(f"validated: {name}")
    failed = len(result.failed_checks)
    verdict = "PASS" if result.ok else f"FAIL ({failed} checks failed"
    if not result.ok:
        verdict += f", {inv.double_bookings} double bookings)"
    lines.append(f"validation: {verdict}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# harness report


def _add_report(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "report",
        # common options only: the report reads files and never touches a database
        parents=[_common_options()],
        help="build the sign-off report (HTML, summary.json, junit.xml) of a run folder",
        description="Read a run folder (samples, ledger, validation, invariants, manifest),"
        " judge the gates and write report.html, summary.json, junit.xml and"
        " error_mapping.json into it. Exit 0 when every gate passes, 1 when one fails,"
        " 2 when the report could not be built.",
    )
    p.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="the run folder, e.g. reports/latest"
    )
    p.add_argument(
        "--gates",
        type=Path,
        metavar="FILE",
        help="TOML file of gate thresholds read over the defaults (see harness/gates.toml)",
    )
    p.add_argument("--no-charts", action="store_true", help="skip the charts (faster)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.report import ReportSettings, build_report

    result = build_report(
        ReportSettings(run_dir=args.run_dir, gates_file=args.gates, charts=not args.no_charts)
    )
    for gate in result.gates:
        print(
            f"{gate.status.upper():<12} {gate.name}: {gate.measured} (threshold {gate.threshold})"
        )
        if not gate.passed and gate.detail:
            print(f"{'':13}{gate.detail}")
    for line in result.missing:
        print(f"missing:     {line}")
    print(f"verdict:     {result.verdict}")
    print(f"report:      {result.report_html}")
    print(f"summary:     {result.summary_json}")
    print(f"junit:       {result.junit_xml}")
    return result.exit_status


# --------------------------------------------------------------------------
# harness migrate / harness rollback


def _migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sql-dir",
        type=Path,
        default=DEFAULT_SQL_DIR,
        metavar="DIR",
        help="folder of NNN_name.sql files (default: the repository's sql/)",
    )
    p.add_argument(
        "--lock-timeout",
        default="5s",
        metavar="DURATION",
        help="lock_timeout set for each file: give up instead of queueing writers behind"
        " a lock (default: %(default)s)",
    )
    p.add_argument(
        "--statement-timeout",
        default="15min",
        metavar="DURATION",
        help="statement_timeout set for each file (default: %(default)s)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _add_migrate(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "migrate",
        parents=parents,
        help="apply 000_baseline.sql and 001..004 in order, with a ledger; safe to rerun",
        description="Apply the numbered files of the sql folder in order (000_baseline.sql"
        " first: on a database that has the schema it changes nothing), each in one"
        " transaction with its ledger row, or statement by statement for files marked"
        " '-- harness: no-transaction'. Applied files are skipped; a file changed since it"
        " was applied is refused unless --force. The ledger is harness.migration_ledger."
        " Exit 2 when a file fails (the ledger records it).",
    )
    _migration_options(p)
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="try a file up to N more times after a deadlock, serialization failure or lock"
        " timeout (it was rolled back whole; each attempt is in the ledger) (default: 0)",
    )
    p.add_argument(
        "--to",
        metavar="FILE",
        help="stop after this migration: a number (002) or a file name (default: all)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="apply again a file whose checksum changed since it was applied",
    )
    p.add_argument(
        "--no-baseline",
        action="store_true",
        help="leave 000_baseline.sql out of the plan (the target has the app's own schema)",
    )
    p.set_defaults(func=cmd_migrate)


def _print_migration_event(event: MigrationEvent) -> None:
    if event.kind == "start":
        print(f"  start   {event.file} ({event.mode})", flush=True)
    elif event.kind == "applied":
        print(f"  applied {event.file} in {event.duration_s:.3f} s", flush=True)
    elif event.kind == "skip":
        print(f"  skipped {event.file} (applied already)", flush=True)
    elif event.kind == "failed":
        print(f"  FAILED {event.file} after {event.duration_s:.3f} s", flush=True)


def cmd_migrate(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.migrate import MigrateSettings, migrate

    target = _open(args, environ)
    settings = MigrateSettings(
        sql_dir=args.sql_dir,
        to=args.to,
        lock_timeout=args.lock_timeout,
        statement_timeout=args.statement_timeout,
        dry_run=args.dry_run,
        force=args.force,
        include_baseline=not args.no_baseline,
        retries=max(0, args.retries),
    )
    if not args.json:
        verb = "plan for" if args.dry_run else "migrating"
        print(f"{verb} {target.display} from {args.sql_dir}", flush=True)
    result = migrate(target, settings, on_event=None if args.json else _print_migration_event)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
    elif args.dry_run:
        for step in result.planned:
            print(f"  {step.action:<8}{step.file} ({step.mode})")
        print("dry run: nothing was changed")
    else:
        print(
            f"migrate: {len(result.applied)} applied, {len(result.skipped)} skipped"
            f" in {result.duration_s:.2f} s"
        )
    return ExitStatus.SUCCESS


def _add_rollback(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rollback",
        parents=parents,
        help="apply rollback_001_003.sql in one transaction and mark 001..004 rolled back",
        description="Apply the rollback file in one transaction together with its ledger"
        " rows: the file's own, and 'rolled_back' for every applied migration from the"
        " first it undoes on (001..004), so that `harness migrate` applies them again."
        " Quarantined rows stay.",
    )
    _migration_options(p)
    p.add_argument(
        "--file",
        default="rollback_001_003.sql",
        metavar="NAME",
        help="rollback file in the sql folder (default: %(default)s)",
    )
    p.set_defaults(func=cmd_rollback)


def cmd_rollback(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.migrate import RollbackSettings, rollback

    target = _open(args, environ)
    result = rollback(
        target,
        RollbackSettings(
            sql_dir=args.sql_dir,
            file=args.file,
            lock_timeout=args.lock_timeout,
            statement_timeout=args.statement_timeout,
            dry_run=args.dry_run,
        ),
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
        return ExitStatus.SUCCESS
    undone = ", ".join(result.rolled_back) or "nothing (no applied migration it undoes)"
    if result.dry_run:
        print(f"would apply {result.file} on {target.display}")
        print(f"would mark rolled back: {undone}")
        print("dry run: nothing was changed")
    else:
        print(f"applied {result.file} on {target.display} in {result.duration_s:.3f} s")
        print(f"rolled back: {undone}")
    return ExitStatus.SUCCESS


# --------------------------------------------------------------------------
# harness provision


def _production_pattern_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--production-pattern",
        default=DEFAULT_PRODUCTION_PATTERN,
        metavar="REGEX",
        help="a URL target whose host or database name matches this (case-insensitive)"
        " is refused unless --allow-production-target; '' turns the check off"
        " (default: %(default)s)",
    )


def _dirt_pair(text: str) -> tuple[str, float]:
    kind, sep, rate = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KIND=RATE, got {text!r}")
    try:
        return kind.strip(), float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {rate!r}") from None


def _add_provision(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from harness.provision import DEFAULT_DIRT_RATES

    p = sub.add_parser(
        "provision",
        parents=parents,
        help="replace the target's data with a seeded synthetic snapshot, or an anonymized clone",
        description="Synthetic (default): fill the baseline schema with a production-like"
        " snapshot at --scale (1: ~57k rows; 100: ~1M allocations), reproducible from --seed,"
        " with planted dirt counted in a manifest (harness.snapshot_manifest and a JSON file)."
        " Clone: --from URL or --from-dump FILE copies schema and data with pg_dump/pg_restore"
        " and anonymizes personal data (--rules) before committing. A URL target is refused"
        " without --yes-destroy-target-data.",
    )
    p.add_argument("--scale", type=_positive_int, default=1, help="size factor (default: 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic data (default: 1)")
    p.add_argument(
        "--anchor",
        metavar="ISO_TIME",
        help="the snapshot's 'now' (default: this hour); the same seed, scale and anchor"
        " give the same rows",
    )
    p.add_argument(
        "--dirt",
        type=_dirt_pair,
        action="append",
        default=[],
        metavar="KIND=RATE",
        help="rate of one kind of dirt (repeatable); kinds and defaults: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULT_DIRT_RATES.items()),
    )
    p.add_argument("--dirt-rate", type=float, metavar="RATE", help="one rate for every kind")
    p.add_argument("--no-dirt", action="store_true", help="plant no dirt at all")
    p.add_argument("--from", dest="source_url", metavar="SOURCE_URL", help="clone this database")
    p.add_argument("--from-dump", type=Path, metavar="FILE", help="restore this pg_dump file")
    p.add_argument(
        "--rules",
        type=Path,
        metavar="TOML",
        help="anonymization rules for a clone (default: sql/anonymize-defaults.toml)",
    )
    p.add_argument(
        "--yes-destroy-target-data",
        action="store_true",
        help="confirm that the URL target's data may be replaced",
    )
    p.add_argument(
        "--allow-production-target",
        action="store_true",
        help="allow a target whose host or database name looks like production",
    )
    _production_pattern_option(p)
    p.add_argument(
        "--reset-schema",
        action="store_true",
        help="drop the app's tables and the harness schema first (a migrated target)",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=DEFAULT_REPORTS_DIR / "manifest.json",
        metavar="PATH",
        help="where to write the manifest JSON (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=2,
        metavar="N",
        help="sessions that load the synthetic snapshot side by side (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_provision)


def cmd_provision(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from datetime import datetime

    from harness.errors import ConfigError
    from harness.provision import ProvisionSettings, dirt_rates_from, provision, result_summary

    anchor = None
    if args.anchor:
        try:
            anchor = datetime.fromisoformat(args.anchor)
        except ValueError:
            raise ConfigError(f"--anchor {args.anchor!r} is not an ISO time") from None
    all_rate = 0.0 if args.no_dirt else args.dirt_rate
    settings = ProvisionSettings(
        scale=args.scale,
        seed=args.seed,
        anchor=anchor,
        dirt_rates=dirt_rates_from(dict(args.dirt), all_rate=all_rate),
        source_url=args.source_url,
        from_dump=args.from_dump,
        rules_path=args.rules,
        yes_destroy_target_data=args.yes_destroy_target_data,
        allow_production=args.allow_production_target,
        production_pattern=args.production_pattern,
        reset_schema=args.reset_schema,
        manifest_path=args.manifest,
        workers=args.workers,
    )
    target = _open(args, environ)
    if args.json:
        result = provision(target, settings)
        print(json.dumps(result_summary(result), indent=2, default=str))
        return ExitStatus.SUCCESS
    print(f"provisioning {target.display}", flush=True)
    if sys.stderr.isatty():
        from harness.provision import rich_progress

        with rich_progress() as progress:
            result = provision(target, settings, progress=progress)
    else:
        result = provision(target, settings)
    for table, n in result.rows.items():
        print(f"  {table:<20} {n:>10,}")
    print(
        f"{result.kind}: {result.total_rows:,} rows in {result.seconds:.2f} s"
        f" ({result.rows_per_second:,.0f} rows/s)"
    )
    dirt = result.manifest.get("dirt") or {}
    if dirt:
        print("dirt planted: " + ", ".join(f"{k}={v}" for k, v in dirt.items()))
    if result.anonymization:
        anon = result.anonymization
        print(
            f"anonymized {len(anon['columns'])} columns; checked {anon['values_checked']:,}"
            f" source values: {anon['survivors']} survive in the target"
        )
    if result.manifest_path:
        print(f"manifest: {result.manifest_path}")
    return ExitStatus.SUCCESS


# --------------------------------------------------------------------------
# harness lint


def _add_lint(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lint",
        # common options only: linting reads files and never touches a database
        parents=[_common_options()],
        help="run squawk over 001..004 and the rollback; fail on warnings not accepted",
        description="Run squawk over the migration files (001..NNN and rollback_*.sql) and"
        " compare with the accepted-warnings file, where each accepted warning has its"
        " reason. Exit 1 on a new warning (each printed as file:line rule message); stale"
        " accepted entries are reported but do not fail. --verbose lists the accepted ones.",
    )
    p.add_argument(
        "--sql-dir",
        type=Path,
        default=DEFAULT_SQL_DIR,
        metavar="DIR",
        help="folder of the migration files (default: the repository's sql/)",
    )
    p.add_argument(
        "--accepted",
        type=Path,
        metavar="FILE",
        help="accepted-warnings TOML (default: squawk-accepted.toml in the sql folder)",
    )
    p.add_argument(
        "--pg-version",
        default="15",
        metavar="VERSION",
        help="PostgreSQL version squawk's advice must hold for (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_lint)


def cmd_lint(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.lint import LintSettings, lint

    result = lint(
        LintSettings(sql_dir=args.sql_dir, accepted_file=args.accepted, pg_version=args.pg_version)
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, default=str))
        return ExitStatus.SUCCESS if result.ok else ExitStatus.CHECK_FAILED
    print(f"squawk {result.squawk_version} over {', '.join(result.files)}")
    for finding in result.new:
        print(finding.display())
    if args.verbose:
        for finding in result.accepted:
            print(f"accepted: {finding.display()} -- {finding.accepted_reason}")
    for entry in result.stale:
        print(f"warning: stale accepted entry ({entry.file} {entry.rule}) matches nothing")
    print(
        f"lint: {len(result.new)} new, {len(result.accepted)} accepted,"
        f" {len(result.stale)} stale -> {'PASS' if result.ok else 'FAIL'}"
    )
    return ExitStatus.SUCCESS if result.ok else ExitStatus.CHECK_FAILED


# --------------------------------------------------------------------------
# harness rehearse


def _duration(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``1h`` -> seconds (> 0)."""
    from harness.nightly import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        # parse_duration's own message for a number <= 0; float()'s is not for users.
        if str(exc).startswith("must be"):
            raise argparse.ArgumentTypeError(str(exc)) from None
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use 30s, 2m, 1h)") from None


def _add_contention_options(p: argparse.ArgumentParser) -> None:
    """The load's contention knobs (harness.load.Contention), for load and rehearse."""
    group = p.add_argument_group("contention (default: the load stage's own)")
    group.add_argument("--hot-tables", type=_positive_int, metavar="N", help="tables aimed at")
    group.add_argument(
        "--hot-windows", type=_positive_int, metavar="N", help="time windows aimed at"
    )
    group.add_argument(
        "--hot-fraction", type=float, metavar="F", help="share of requests aimed at them (0..1)"
    )
    group.add_argument(
        "--retry-fraction", type=float, metavar="F", help="share of creates that are retries"
    )
    group.add_argument(
        "--think-time", type=float, metavar="SECONDS", help="mean pause between requests"
    )
    group.add_argument(
        "--weights",
        metavar="OP=N,...",
        help="task weights, e.g. create_booking=10,place_hold=0 (others keep their defaults)",
    )


def contention_from(args: argparse.Namespace) -> Contention:
    """Contention from the flags that were given; the rest keep their defaults."""
    from harness.load import Contention, parse_weights

    knobs: dict[str, object] = {
        name: getattr(args, name)
        for name in ("hot_tables", "hot_windows", "hot_fraction", "retry_fraction", "think_time")
        if getattr(args, name, None) is not None
    }
    if getattr(args, "weights", None):
        knobs["weights"] = parse_weights(args.weights)
    return Contention(**knobs)  # type: ignore[arg-type]


def _add_rehearse_options(p: argparse.ArgumentParser) -> None:
    from harness.rehearse import SKIPPABLE

    p.add_argument(
        "--reports-dir",
        type=Path,
        default=DEFAULT_REPORTS_DIR,
        metavar="DIR",
        help="where run folders go; reports/latest points at the newest (default: %(default)s)",
    )
    p.add_argument(
        "--sql-dir",
        type=Path,
        default=DEFAULT_SQL_DIR,
        metavar="DIR",
        help="migration files to rehearse (default: the repository's sql/)",
    )
    p.add_argument("--scale", type=_positive_int, default=1, help="snapshot size (default: 1)")
    p.add_argument("--seed", type=int, default=1, help="snapshot seed (default: 1)")
    p.add_argument("--users", type=_positive_int, default=20, help="Locust users (default: 20)")
    p.add_argument(
        "--spawn-rate", type=_positive_float, metavar="N", help="users started per second"
    )
    p.add_argument(
        "--duration",
        type=_duration,
        metavar="DURATION",
        help="length of each load phase, e.g. 30s or 2m (default: 30s)",
    )
    p.add_argument("--pre-duration", type=_duration, metavar="DURATION", help="pre phase only")
    p.add_argument("--post-duration", type=_duration, metavar="DURATION", help="post phase only")
    _add_contention_options(p)
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="STAGE",
        help="skip a stage (repeatable, or comma-separated): " + ", ".join(sorted(SKIPPABLE)),
    )
    p.add_argument(
        "--online",
        action="store_true",
        help="run 001-004 while the load keeps going and record which writers they blocked",
    )
    p.add_argument("--gates", type=Path, metavar="FILE", help="gates TOML (default: built in)")
    p.add_argument("--lock-timeout", default="5s", metavar="DURATION", help="for migrations")
    p.add_argument(
        "--statement-timeout", default="15min", metavar="DURATION", help="for migrations"
    )
    p.add_argument(
        "--yes-destroy-target-data",
        action="store_true",
        help="allow replacing the data of a URL target (the embedded one needs no flag)",
    )
    p.add_argument(
        "--allow-production-target",
        action="store_true",
        help="allow a target whose host or name looks like production (with the flag above)",
    )
    _production_pattern_option(p)
    p.add_argument("--no-charts", action="store_true", help="leave charts out of the report")


def rehearse_settings_from(args: argparse.Namespace, **labels: object) -> RehearseSettings:
    from harness.rehearse import RehearseSettings

    skip = frozenset(part.strip() for item in args.skip for part in item.split(",") if part.strip())
    duration = args.duration or 30.0
    return RehearseSettings(
        reports_dir=args.reports_dir,
        sql_dir=args.sql_dir,
        scale=args.scale,
        seed=args.seed,
        users=args.users,
        spawn_rate=args.spawn_rate,
        pre_duration_s=args.pre_duration or duration,
        post_duration_s=args.post_duration or duration,
        contention=contention_from(args),
        skip=skip,
        online=args.online,
        lock_timeout=args.lock_timeout,
        statement_timeout=args.statement_timeout,
        gates_file=args.gates,
        yes_destroy_target_data=args.yes_destroy_target_data,
        allow_production=args.allow_production_target,
        production_pattern=args.production_pattern,
        charts=not args.no_charts,
        labels=dict(labels),
    )


def _add_rehearse(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rehearse",
        parents=parents,
        help="the whole dress rehearsal: provision, lint, load, migrate, validate, rollback,"
        " report",
        description="The runbook's staging dress rehearsal end to end: provision -> lint ->"
        " load pre (lax) -> migrate 001-004 -> validate -> load post (strict) -> rollback drill"
        " -> report. Each run gets its own folder under --reports-dir. Exit 0 pass, 1 a gate"
        " failed, 2 a stage failed (the report still names it), 130 interrupted.",
    )
    _add_rehearse_options(p)
    p.set_defaults(func=cmd_rehearse)


def cmd_rehearse(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.rehearse import rehearse

    settings = rehearse_settings_from(args)
    target = _open(args, environ)
    result = rehearse(target, settings, out=lambda line: print(line, flush=True))
    print(f"run folder: {result.run_dir}")
    if result.report_html:
        print(f"report:     {result.report_html}")
    else:
        # Everything the page is made from is in the run folder already.
        print(f"report:     not built; `harness report {result.run_dir}` builds it")
    if result.failed_stage:
        print(f"stage {result.failed_stage} {result.status}: {result.error}", file=sys.stderr)
    print(f"verdict:    {result.verdict or 'no report'} ({result.status})")
    return result.exit_status


# --------------------------------------------------------------------------
# harness nightly


def _add_nightly(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "nightly",
        parents=parents,
        help="the rehearsal with a fixed profile, compared with the median of earlier nights",
        description="Run the rehearsal with the profile of a TOML file, append its figures to"
        " the history under --reports-dir, and compare with the median of the last runs: p95"
        " per operation (bootstrap interval against noise), outcome rates, migration"
        " durations. Exit 0 pass, 1 a regression or failed gate, 2 could not run.",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=DEFAULT_NIGHTLY_PROFILE,
        metavar="FILE",
        help="profile TOML (default: %(default)s)",
    )
    p.add_argument(
        "--reports-dir",
        type=Path,
        default=DEFAULT_REPORTS_DIR,
        metavar="DIR",
        help="run folders and the history file go here (default: %(default)s)",
    )
    p.add_argument("--history", type=Path, metavar="FILE", help="history file (Parquet)")
    p.add_argument(
        "--sql-dir",
        type=Path,
        default=DEFAULT_SQL_DIR,
        metavar="DIR",
        help="migration files (default: the repository's sql/)",
    )
    p.add_argument("--gates", type=Path, metavar="FILE", help="gates TOML (default: built in)")
    p.add_argument(
        "--yes-destroy-target-data",
        action="store_true",
        help="allow replacing the data of a URL target (the embedded one needs no flag)",
    )
    p.add_argument(
        "--allow-production-target",
        action="store_true",
        help="allow a target whose host or name looks like production (with the flag above)",
    )
    _production_pattern_option(p)
    p.set_defaults(func=cmd_nightly)


def cmd_nightly(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.nightly import NightlySettings, load_profile, nightly

    profile = load_profile(args.profile)
    target = _open(args, environ)
    result = nightly(
        target,
        NightlySettings(
            profile=profile,
            reports_dir=args.reports_dir,
            history_file=args.history,
            sql_dir=args.sql_dir,
            gates_file=args.gates,
            yes_destroy_target_data=args.yes_destroy_target_data,
            allow_production=args.allow_production_target,
            production_pattern=args.production_pattern,
            profile_source=str(args.profile),
        ),
        out=lambda line: print(line, flush=True),
    )
    print(f"run folder: {result.rehearsal.run_dir}")
    verdict = "REGRESSION" if result.regressions else (result.rehearsal.verdict or "no report")
    print(f"nightly:    {verdict} ({result.rehearsal.status})")
    return result.exit_status


# --------------------------------------------------------------------------
# harness load


def _add_load(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from harness.outcomes import Phase

    p = sub.add_parser(
        "load",
        parents=parents,
        help="run the Locust booking users headless for one phase, then count the invariants",
        description="The booking endpoints' transactions under contention (loadtests/bookings.py"
        " users, headless): writes samples-<phase>.parquet, Locust's CSV and HTML,"
        " load-<phase>.json and invariants-<phase>.json into the run folder.",
    )
    p.add_argument(
        "--phase", choices=[str(x) for x in Phase], default="pre", help="phase label (pre)"
    )
    p.add_argument("--users", type=_positive_int, default=20, help="Locust users (default: 20)")
    p.add_argument(
        "--duration",
        type=_duration,
        default=60.0,
        metavar="DURATION",
        help="how long, e.g. 30s, 2m (default: 60s)",
    )
    p.add_argument(
        "--spawn-rate", type=_positive_float, metavar="N", help="users started per second"
    )
    p.add_argument(
        "--mode",
        choices=["lax", "strict", "auto"],
        default="auto",
        help="app mode: lax (SELECT then INSERT), strict (the constraints refuse), auto"
        " (strict once allocations_no_overlap exists; default)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        metavar="DIR",
        help="run folder to write into (default: a new reports/<run id>/)",
    )
    _add_contention_options(p)
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace, environ: Mapping[str, str]) -> ExitStatus:
    from harness.load import LoadSettings, Mode, run_load
    from harness.rundir import check_writable, new_run_id

    contention = contention_from(args)
    run_dir = args.run_dir or DEFAULT_REPORTS_DIR / new_run_id()
    # Before the target is touched: a load whose files cannot be written is lost.
    check_writable(run_dir, flag="--run-dir")
    target = _open(args, environ)
    print(f"load {args.phase}: {args.users} users for {args.duration:g}s on {target.display}")
    print(f"run folder: {run_dir}")
    result = run_load(
        target,
        LoadSettings(
            phase=args.phase,
            users=args.users,
            spawn_rate=args.spawn_rate,
            duration_s=args.duration,
            mode=Mode(args.mode),
            contention=contention,
            run_dir=run_dir,
        ),
        on_progress=lambda p: print(
            f"  {p.elapsed_s:5.0f}s  {p.users:3d} users  {p.rps:8,.0f} req/s  "
            + "  ".join(f"{k} {v:.1%}" for k, v in sorted(p.outcome_rates.items())),
            flush=True,
        ),
    )
    print(
        f"mode {result.mode}: {result.requests} requests in {result.duration_s:.1f}s"
        f" ({result.rps:,.0f}/s), {result.failures} failed"
    )
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items())))
    if result.invariants is not None:
        print("invariants: " + ", ".join(f"{k} {v}" for k, v in result.invariants.items()))
    print(f"samples:  {result.samples_path}")
    return ExitStatus.SUCCESS


# --------------------------------------------------------------------------
# Parser and entry point

# Each entry adds one sub-command; stages append theirs below.
_COMMANDS: list[Callable[[argparse._SubParsersAction, list[argparse.ArgumentParser]], None]] = [
    _add_target,
    _add_validate,
    _add_report,
    _add_migrate,
    _add_rollback,
    _add_lint,
    _add_provision,
    _add_rehearse,
    _add_nightly,
    _add_load,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="harness",
        description="Staging dress rehearsal for the booking database's strict-constraints"
        " rollout: provision, lint, migrate, load, validate, report.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parents = [_common_options(), _target_options()]
    for add in _COMMANDS:
        add(sub, parents)
    return parser


def _print_traceback(url: str | None) -> None:
    """The current traceback, with the URL and its password scrubbed like every message."""
    print(scrub(traceback.format_exc(), url), file=sys.stderr, end="")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one ``harness`` command; return its exit status (never raises)."""
    environ = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Whatever URL is in play is scrubbed from every error we print.
    url, _ = resolve_url(getattr(args, "db_url", None), environ)
    try:
        return int(args.func(args, environ))
    except HarnessError as exc:
        if getattr(args, "traceback", False):
            _print_traceback(url)
        print(f"harness: error: {scrub(str(exc), url)}", file=sys.stderr)
        return int(exc.exit_status)
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return int(ExitStatus.ERROR_CTRL_C)
    except Exception as exc:  # a bug: still one line unless asked for more
        if getattr(args, "traceback", False):
            _print_traceback(url)
        message = scrub(f"{type(exc).__name__}: {exc}", url)
        print(
            f"harness: internal error: {message} (rerun with --traceback and report it)",
            file=sys.stderr,
        )
        return int(ExitStatus.ERROR)
