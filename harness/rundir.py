"""The run folder: where every stage leaves what the report reads.

A rehearsal writes one folder under ``reports/`` (``reports/<run id>/``, with
``reports/latest`` pointing at the newest). Each stage writes its own file,
always atomically (a temporary file renamed into place), so a crash or Ctrl-C
never leaves a half-written file behind: a file is either complete or absent.

Layout (file names are the contract between the stages and the report)::

    run.json                 run id, start/end, status, stages, settings, target
    manifest.json            snapshot manifest from provision (seed, scale, dirt)
    lint.json                squawk findings, accepted and new
    ledger.json              migration ledger rows after migrate
    validation.json          validate result after the migrations
    load-<phase>.json        load settings and totals of a phase (pre, post, online)
    samples-<phase>.parquet  one row per request of a phase
    invariants-<phase>.json  double bookings / orphans counted after a phase
    rollback.json            rollback drill: catalog diff, re-apply, re-validate
    online.json              lock waits sampled while migrating under load
    report.html, summary.json, junit.xml, error_mapping.json   written by report
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.errors import SamplesError

# Bumped when a file's shape changes incompatibly; the report refuses other versions.
RUN_FORMAT_VERSION = 1

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
LINT_FILE = "lint.json"
LEDGER_FILE = "ledger.json"
VALIDATION_FILE = "validation.json"
ROLLBACK_FILE = "rollback.json"
ONLINE_FILE = "online.json"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
JUNIT_FILE = "junit.xml"
ERROR_MAPPING_FILE = "error_mapping.json"
LATEST_LINK = "latest"


def samples_file(phase: str) -> str:
    return f"samples-{phase}.parquet"


def load_file(phase: str) -> str:
    return f"load-{phase}.json"


def invariants_file(phase: str) -> str:
    return f"invariants-{phase}.json"


def new_run_id(now: datetime | None = None) -> str:
    """Time-stamped, sortable run id (UTC), unique to the microsecond."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%S_%fZ")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_with(path: Path, writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file 0600; run files are for whoever reviews the run
        # (CI artifacts, a shared reports folder) and never hold a password.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Atomically write ``payload`` as pretty JSON (datetimes and paths as strings)."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=_json_default)
    atomic_write_bytes(Path(path), (text + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON file of a run; a corrupt one is a :class:`SamplesError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise SamplesError(
            f"{path} is not readable JSON: {exc}",
            hint="the run that wrote it may have been killed; rerun that stage",
        ) from None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def point_latest(reports_dir: Path, run_dir: Path) -> None:
    """Make ``reports/latest`` point at ``run_dir`` (replaced atomically)."""
    link = reports_dir / LATEST_LINK
    tmp = reports_dir / f".{LATEST_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def check_writable(folder: Path, *, flag: str = "--reports-dir") -> None:
    """Fail early (before any long work) when ``folder`` cannot take files.

    Tried for real (a file is created and removed): permissions say nothing
    to root, and a path under a regular file or on a read-only mount fails
    only when written to.
    """
    from harness.errors import ConfigError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check."):
            pass
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {folder}: {exc.strerror or exc}",
            hint=f"choose another folder with {flag} or fix its permissions",
        ) from None
