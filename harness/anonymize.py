"""Anonymization rules for a cloned snapshot, and the SQL that applies them.

Rules come from a TOML file (``sql/anonymize-defaults.toml`` by default): a
list of ``[[rule]]`` tables with ``table``, ``column`` and ``strategy`` (and
``schema``, when a table name holds a dot and cannot be written ``schema.table``).
:func:`load_rules` reads and checks the file; :func:`check_rules` checks the
rules against a database's catalog (the source, before anything is copied);
:func:`anonymize_sql` returns the statements the clone runs inside its single
restore transaction: a catalog check, a copy of the source values, the
UPDATEs, and a check that no source value survives anywhere in an anonymized
column (the transaction fails, and nothing is committed, if one does).

Every replacement is derived from a keyed hash of the value (md5 of a random
per-clone key and the value): equal values stay equal (joins and duplicates
keep their shape), different values stay different (unique keys keep
holding), and without the key nobody can hash a guessed e-mail address to
find its row.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from harness.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_RULES = Path(__file__).resolve().parent.parent / "sql" / "anonymize-defaults.toml"

STRATEGIES: tuple[str, ...] = ("hash", "fake_name", "fake_email", "fake_phone", "null", "keep")
# Strategies that write text: the column must hold text.
TEXT_STRATEGIES = frozenset({"hash", "fake_name", "fake_email", "fake_phone"})

SOURCE_VALUES_TABLE = "harness_source_values"
CHECK_TABLE = "harness_anonymization_check"


@dataclass(frozen=True, kw_only=True)
class Rule:
    schema: str = "public"
    table: str
    column: str
    strategy: str

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"

    @property
    def changes_data(self) -> bool:
        return self.strategy != "keep"


def load_rules(path: Path | None = None) -> tuple[Rule, ...]:
    """Read and check a rules file; :class:`ConfigError` names the file and the problem."""
    path = Path(path) if path else DEFAULT_RULES
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"rules file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"rules file {path} is not readable TOML: {exc}") from None
    unknown_top = sorted(set(data) - {"rule"})
    if unknown_top:
        raise ConfigError(
            f"rules file {path}: unknown key {unknown_top[0]!r}",
            hint="list the rules as [[rule]] tables with table, column and strategy",
        )
    entries = data.get("rule")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"rules file {path} has no [[rule]] entries",
            hint="each rule needs table, column and strategy",
        )
    rules: list[Rule] = []
    seen: set[tuple[str, str, str]] = set()
    for i, entry in enumerate(entries, 1):
        where = f"rules file {path}, rule {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not a table")
        unknown = set(entry) - {"schema", "table", "column", "strategy"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        values = {k: entry.get(k) for k in ("table", "column", "strategy")}
        schema_key = entry.get("schema")
        if schema_key is not None and (not isinstance(schema_key, str) or not schema_key):
            raise ConfigError(f"{where}: 'schema' must be a non-empty string, got {schema_key!r}")
        for key, value in values.items():
            if value is not None and not isinstance(value, str):
                raise ConfigError(
                    f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r}"
                )
        missing = [k for k, v in values.items() if not isinstance(v, str) or not v.strip()]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        # "schema.table", or a separate schema key (then the table name may hold dots).
        if schema_key is not None:
            schema, table = schema_key, values["table"]
        else:
            schema, _, table = values["table"].rpartition(".")
        rule = Rule(
            schema=schema or "public",
            table=table,
            column=values["column"],
            strategy=values["strategy"],
        )
        if rule.strategy not in STRATEGIES:
            raise ConfigError(
                f"{where}: unknown strategy {rule.strategy!r}",
                hint="one of: " + ", ".join(STRATEGIES),
            )
        # Names end up inside a dollar-quoted DO block.
        if any("$" in part for part in (rule.schema, rule.table, rule.column)):
            raise ConfigError(f"{where}: names with '$' are not supported")
        key = (rule.schema, rule.table, rule.column)
        if key in seen:
            raise ConfigError(f"{where}: {rule.name} has two rules")
        seen.add(key)
        rules.append(rule)
    return tuple(rules)


def check_rules(conn: psycopg.Connection, rules: tuple[Rule, ...], *, where: str) -> None:
    """Every rule names an existing column of a fitting type, or :class:`ConfigError`."""
    problems = []
    for rule in rules:
        row = conn.execute(
            "SELECT t.typcategory = 'S', a.attnotnull FROM pg_attribute a"
            " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE n.nspname = %s AND c.relname = %s AND a.attname = %s"
            " AND a.attnum > 0 AND NOT a.attisdropped",
            (rule.schema, rule.table, rule.column),
        ).fetchone()
        if row is None:
            table = conn.execute(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = %s",
                (rule.schema, rule.table),
            ).fetchone()
            what = "column" if table else "table"
            problems.append(f"{rule.name}: no such {what} in {where}")
            continue
        is_text, not_null = row
        if rule.strategy in TEXT_STRATEGIES and not is_text:
            problems.append(f"{rule.name}: strategy {rule.strategy} needs a text column")
        if rule.strategy == "null" and not_null:
            problems.append(f"{rule.name}: strategy null on a NOT NULL column")
    if problems:
        raise ConfigError(
            "anonymization rules do not fit: " + "; ".join(problems),
            hint="fix the rules file (--rules); nothing was changed",
        )


# --------------------------------------------------------------------------
# SQL

_FIRST = (
    "(ARRAY['Alex','Blair','Casey','Dana','Eli','Frankie','Gale','Harper','Indy','Jordan',"
    "'Kit','Lee','Morgan','Noa','Oakley','Parker','Quinn','Reese','Sage','Tatum','Uma','Val',"
    "'Wren','Yael','Zuri','Ari','Bo','Cam','Dell','Ever','Finn','Gray'])"
)
# Surnames from three made-up syllables: they read as names but are not
# common real ones, so a fake name almost never equals a real source name.
_SYLLABLES = (
    "(ARRAY['vor','lan','qui','mes','tor','bel','ran','osk','dal','fen','gri','hul','jas',"
    "'kem','lor','nym'])"
)


def _hex_int(h: sql.Composable, start: int) -> sql.Composable:
    """A non-negative int from 8 hex digits of ``h`` starting at ``start`` (1-based)."""
    return sql.SQL("(('x' || substr({h}, {s}, 8))::bit(32)::int & 2147483647)").format(
        h=h, s=sql.Literal(start)
    )


def _expression(rule: Rule, salt: str) -> sql.Composable:
    column = sql.Identifier(rule.column)
    if rule.strategy == "null":
        return sql.SQL("NULL")
    h = sql.SQL("md5({salt} || {col}::text)").format(salt=sql.Literal(salt), col=column)
    first = sql.SQL(_FIRST + "[1 + {} % 32]").format(_hex_int(h, 1))
    last = sql.SQL(
        "initcap("
        + _SYLLABLES
        + "[1 + {a} % 16] || "
        + _SYLLABLES
        + "[1 + {b} % 16] || "
        + _SYLLABLES
        + "[1 + {c} % 16])"
    ).format(a=_hex_int(h, 9), b=_hex_int(h, 17), c=_hex_int(h, 25))
    if rule.strategy == "hash":
        expr = sql.SQL("'anon_' || {}").format(h)
    elif rule.strategy == "fake_name":
        expr = sql.SQL("{} || ' ' || {}").format(first, last)
    elif rule.strategy == "fake_email":
        expr = sql.SQL(
            "lower({first}) || '.' || lower({last}) || '.' || substr({h}, 1, 16)"
            " || '@example.invalid'"
        ).format(first=first, last=last, h=h)
    elif rule.strategy == "fake_phone":
        # 555-0100..0199 are the numbers reserved for fiction in North America.
        n = _hex_int(h, 1)
        expr = sql.SQL(
            "'+1 555-01' || lpad(({n} % 100)::text, 2, '0')"
            " || '-' || lpad((({n} / 100) % 10000)::text, 4, '0')"
        ).format(n=n)
    else:  # pragma: no cover - load_rules refuses other strategies
        raise ConfigError(f"unknown strategy {rule.strategy}")
    # NULL stays NULL (md5(NULL) is NULL, but the fakes add text around it).
    return sql.SQL("CASE WHEN {col} IS NULL THEN NULL ELSE {expr} END").format(
        col=column, expr=expr
    )


def check_rules_sql(rules: tuple[Rule, ...]) -> sql.Composed:
    """A DO block that fails the transaction when a rule does not fit the restored schema."""
    rows = sql.SQL(", ").join(
        sql.SQL("({}, {}, {}, {})").format(
            sql.Literal(r.schema),
            sql.Literal(r.table),
            sql.Literal(r.column),
            sql.Literal(r.strategy),
        )
        for r in rules
    )
    return sql.SQL(
        """
DO $check$
DECLARE
    r record;
    a record;
BEGIN
    FOR r IN SELECT * FROM (VALUES {rows}) AS v (s, t, c, strategy) LOOP
        SELECT ty.typcategory = 'S' AS is_text, att.attnotnull AS not_null INTO a
          FROM pg_catalog.pg_attribute att
          JOIN pg_catalog.pg_class cl ON cl.oid = att.attrelid
          JOIN pg_catalog.pg_namespace ns ON ns.oid = cl.relnamespace
          JOIN pg_catalog.pg_type ty ON ty.oid = att.atttypid
         WHERE ns.nspname = r.s AND cl.relname = r.t AND att.attname = r.c
           AND att.attnum > 0 AND NOT att.attisdropped;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'anonymization rule %.%.%: no such column in the dump', r.s, r.t, r.c;
        END IF;
        IF r.strategy IN ('hash', 'fake_name', 'fake_email', 'fake_phone') AND NOT a.is_text THEN
            RAISE EXCEPTION 'anonymization rule %.%.%: strategy % needs a text column',
                r.s, r.t, r.c, r.strategy;
        END IF;
        IF r.strategy = 'null' AND a.not_null THEN
            RAISE EXCEPTION 'anonymization rule %.%.%: strategy null on a NOT NULL column',
                r.s, r.t, r.c;
        END IF;
    END LOOP;
END
$check$;
"""
    ).format(rows=rows)


def anonymize_sql(rules: tuple[Rule, ...], *, salt: str) -> sql.Composed:
    """Copy the source values aside, then UPDATE each table once with every rule of it."""
    active = [r for r in rules if r.changes_data]
    parts: list[sql.Composable] = [
        sql.SQL("CREATE TEMP TABLE {} (v text) ON COMMIT DROP;\n").format(
            sql.Identifier(SOURCE_VALUES_TABLE)
        )
    ]
    if active:
        values = sql.SQL(" UNION ").join(
            sql.SQL("SELECT {c}::text FROM {s}.{t} WHERE {c} IS NOT NULL").format(
                c=sql.Identifier(r.column), s=sql.Identifier(r.schema), t=sql.Identifier(r.table)
            )
            for r in active
        )
        parts.append(
            sql.SQL("INSERT INTO {} {};\n").format(sql.Identifier(SOURCE_VALUES_TABLE), values)
        )
    by_table: dict[tuple[str, str], list[Rule]] = {}
    for rule in active:
        by_table.setdefault((rule.schema, rule.table), []).append(rule)
    for (schema, table), table_rules in by_table.items():
        sets = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(r.column), _expression(r, salt))
            for r in table_rules
        )
        parts.append(
            sql.SQL("UPDATE {}.{} SET {};\n").format(
                sql.Identifier(schema), sql.Identifier(table), sets
            )
        )
    return sql.Composed(parts)


def survivors_sql(rules: tuple[Rule, ...]) -> sql.Composed:
    """Count source values found in any anonymized column; fail the transaction on any."""
    active = [r for r in rules if r.changes_data]
    if active:
        now = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {c}::text AS v FROM {s}.{t} WHERE {c} IS NOT NULL").format(
                c=sql.Identifier(r.column), s=sql.Identifier(r.schema), t=sql.Identifier(r.table)
            )
            for r in active
        )
    else:
        now = sql.SQL("SELECT NULL::text AS v WHERE false")
    return sql.SQL(
        """
CREATE TEMP TABLE {check} ON COMMIT DROP AS
SELECT (SELECT count(*) FROM {src}) AS values_checked,
       (SELECT count(*) FROM ({now}) AS n JOIN {src} AS s ON s.v = n.v) AS survivors;
DO $survivors$
BEGIN
    IF (SELECT survivors FROM {check}) > 0 THEN
        RAISE EXCEPTION 'anonymization left % source values in the target: nothing committed',
            (SELECT survivors FROM {check});
    END IF;
END
$survivors$;
"""
    ).format(check=sql.Identifier(CHECK_TABLE), src=sql.Identifier(SOURCE_VALUES_TABLE), now=now)
