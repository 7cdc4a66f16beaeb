"""Lint stage: squawk over the migration files, every accepted warning explained.

Scope: the numbered migrations from 001 on and the ``rollback_*.sql`` files,
i.e. what runs against the production-like database during the rollout.
``000_baseline.sql`` is left out: it is the schema production already has,
only ever applied to empty databases (tests, the embedded server), where
squawk's lock and rewrite warnings describe nothing that can happen.

squawk runs with ``--assume-in-transaction`` on the files the runner wraps in
one transaction, and without it on ``-- harness: no-transaction`` files, so
its transaction advice matches how each file really runs.

Every finding must either be fixed or be listed in the accepted-warnings file
(``sql/squawk-accepted.toml``), one ``[[accept]]`` table per (file, rule) with
the reason it is acceptable::

    [[accept]]
    file = "002_integrity.sql"      # a file name, or a glob such as "*"
    rule = "adding-not-nullable-field"
    reason = "..."                  # required: why this is fine here
    lines = [15, 16]                # optional: only these lines (1-based)

A finding no entry covers is new: the stage's result is not ok (the CLI exits
1). An entry that matches nothing is stale: reported, not a failure.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import subprocess
import sys
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.migrate import DEFAULT_SQL_DIR, FileMode, discover, file_mode

log = logging.getLogger(__name__)

ACCEPTED_FILE_NAME = "squawk-accepted.toml"
# The oldest server the rollout targets (Supabase and CI run 15): squawk's
# version-dependent advice must hold there.
DEFAULT_PG_VERSION = "15"
SQUAWK_TIMEOUT_S = 120


@dataclass(frozen=True, kw_only=True)
class LintSettings:
    sql_dir: Path = DEFAULT_SQL_DIR
    # Default: squawk-accepted.toml in sql_dir.
    accepted_file: Path | None = None
    pg_version: str = DEFAULT_PG_VERSION
    # Default: the squawk next to the running Python, else the one on PATH.
    squawk: Path | None = None


@dataclass(frozen=True, kw_only=True)
class AcceptedWarning:
    file: str
    rule: str
    reason: str
    lines: tuple[int, ...] | None = None

    def covers(self, finding: Finding) -> bool:
        return (
            self.rule == finding.rule
            and fnmatch.fnmatchcase(finding.file, self.file)
            and (self.lines is None or finding.line in self.lines)
        )


@dataclass(frozen=True, kw_only=True)
class Finding:
    file: str
    line: int  # 1-based (squawk's JSON counts from 0)
    column: int
    rule: str
    level: str
    message: str
    help: str | None = None
    accepted_reason: str | None = None

    @property
    def accepted(self) -> bool:
        return self.accepted_reason is not None

    def display(self) -> str:
        return f"{self.file}:{self.line} {self.rule} {self.message}"


@dataclass(frozen=True, kw_only=True)
class LintResult:
    files: list[str]
    findings: list[Finding]
    stale: list[AcceptedWarning] = field(default_factory=list)
    squawk_version: str = ""
    accepted_file: Path | None = None
    pg_version: str = DEFAULT_PG_VERSION

    @property
    def new(self) -> list[Finding]:
        return [f for f in self.findings if not f.accepted]

    @property
    def accepted(self) -> list[Finding]:
        return [f for f in self.findings if f.accepted]

    @property
    def ok(self) -> bool:
        return not self.new

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "squawk_version": self.squawk_version,
            "pg_version": self.pg_version,
            "accepted_file": str(self.accepted_file) if self.accepted_file else None,
            "files": list(self.files),
            "new": [asdict(f) for f in self.new],
            "accepted": [asdict(f) for f in self.accepted],
            "stale": [asdict(a) for a in self.stale],
        }


# --------------------------------------------------------------------------
# The accepted-warnings file


def load_accepted(path: Path, *, required: bool) -> list[AcceptedWarning]:
    """Read and check the accepted-warnings TOML; a missing optional file is empty."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"accepted-warnings file {path} does not exist") from None
        log.info("no accepted-warnings file at %s: every warning is new", path)
        return []
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot read accepted-warnings file {path}: {exc.strerror or exc}"
        ) from None
    unknown = set(data) - {"accept"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}",
            hint="list accepted warnings as [[accept]] tables",
        )
    entries = data.get("accept", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'accept' must be an array of tables ([[accept]])")
    accepted = []
    for number, entry in enumerate(entries, 1):
        where = f"{path}: [[accept]] #{number}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not a table")
        extra = set(entry) - {"file", "rule", "reason", "lines"}
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        for key in ("file", "rule", "reason"):
            value = entry.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(
                    f"{where}: '{key}' must be a non-empty string",
                    hint="every accepted warning names its file, its rule and why it is fine",
                )
        lines = entry.get("lines")
        if lines is not None and not (
            isinstance(lines, list)
            and lines
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lines)
        ):
            raise ConfigError(f"{where}: 'lines' must be a list of line numbers (1-based)")
        accepted.append(
            AcceptedWarning(
                file=entry["file"].strip(),
                rule=entry["rule"].strip(),
                reason=" ".join(entry["reason"].split()),
                lines=tuple(lines) if lines is not None else None,
            )
        )
    return accepted


# --------------------------------------------------------------------------
# squawk


def find_squawk(explicit: Path | None = None) -> Path:
    """The squawk binary: explicit, else beside the running Python, else on PATH."""
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise ConfigError(f"squawk binary {explicit} is missing or not executable")
        return explicit
    # The squawk-cli wheel installs its binary into the venv's bin/, which is
    # not on PATH when the venv is used without being activated.
    beside = Path(sys.executable).parent / ("squawk.exe" if os.name == "nt" else "squawk")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("squawk")
    if found:
        return Path(found)
    raise ConfigError(
        "squawk is not installed", hint="pip install squawk-cli (a dependency of this package)"
    )


def _run_squawk(
    squawk: Path, sql_dir: Path, files: list[str], *, in_transaction: bool, pg_version: str
) -> list[dict[str, Any]]:
    if not files:
        return []
    command = [str(squawk), "--reporter", "json", "--pg-version", pg_version]
    if in_transaction:
        command.append("--assume-in-transaction")
    command += files
    log.info("running %s in %s", " ".join(command), sql_dir)
    try:
        # Relative names from inside the folder: squawk reports them as given.
        done = subprocess.run(
            command,
            cwd=sql_dir,
            capture_output=True,
            text=True,
            timeout=SQUAWK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"could not run squawk ({squawk}): {exc}") from None
    # squawk exits 1 when it found something; its JSON is on stdout either way.
    try:
        findings = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        findings = None
    if done.returncode not in (0, 1) or not isinstance(findings, list):
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ConfigError(
            f"squawk failed (exit {done.returncode}): {detail[0] if detail else 'no output'}",
            hint="run it by hand: " + " ".join(command),
        )
    return findings


def squawk_version(squawk: Path) -> str:
    try:
        done = subprocess.run(
            [str(squawk), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip().removeprefix("squawk ").strip() or "unknown"


def lint_scope(sql_dir: Path) -> list[Path]:
    """001..NNN and the rollback files (000, the existing schema, is out of scope)."""
    numbered = [f.path for f in discover(sql_dir) if f.number != 0]
    return numbered + sorted(Path(sql_dir).glob("rollback_*.sql"))


# --------------------------------------------------------------------------
# The stage


def lint(settings: LintSettings) -> LintResult:
    """Run squawk over the migration files and sort its findings into new and accepted."""
    sql_dir = Path(settings.sql_dir)
    accepted_file = settings.accepted_file or sql_dir / ACCEPTED_FILE_NAME
    accepted = load_accepted(accepted_file, required=settings.accepted_file is not None)
    squawk = find_squawk(settings.squawk)
    paths = lint_scope(sql_dir)
    by_mode: dict[FileMode, list[str]] = {FileMode.TRANSACTION: [], FileMode.NO_TRANSACTION: []}
    for path in paths:
        by_mode[file_mode(path.read_text(encoding="utf-8"))].append(path.name)

    raw: list[dict[str, Any]] = []
    for mode, names in by_mode.items():
        raw += _run_squawk(
            squawk,
            sql_dir,
            names,
            in_transaction=mode is FileMode.TRANSACTION,
            pg_version=settings.pg_version,
        )

    order = {path.name: index for index, path in enumerate(paths)}
    findings = []
    used: set[int] = set()
    for item in raw:
        finding = Finding(
            file=Path(str(item.get("file", "?"))).name,
            line=int(item.get("line", 0)) + 1,
            column=int(item.get("column", 0)) + 1,
            rule=str(item.get("rule_name", "?")),
            level=str(item.get("level", "")),
            message=str(item.get("message", "")),
            help=item.get("help"),
        )
        for index, entry in enumerate(accepted):
            if entry.covers(finding):
                used.add(index)
                finding = Finding(**{**asdict(finding), "accepted_reason": entry.reason})
                break
        findings.append(finding)
    findings.sort(key=lambda f: (order.get(f.file, len(order)), f.line, f.column, f.rule))
    stale = [entry for index, entry in enumerate(accepted) if index not in used]
    for entry in stale:
        log.warning("accepted warning %s %s matches nothing (stale)", entry.file, entry.rule)
    return LintResult(
        files=[path.name for path in paths],
        findings=findings,
        stale=stale,
        squawk_version=squawk_version(squawk),
        accepted_file=accepted_file if accepted_file.exists() else None,
        pg_version=settings.pg_version,
    )
