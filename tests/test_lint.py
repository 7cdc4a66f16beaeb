"""The lint stage: real squawk runs over small SQL files and over the real sql/ folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SQL_DIR

from harness.cli import main
from harness.errors import ConfigError
from harness.lint import ACCEPTED_FILE_NAME, LintSettings, lint

# ban-drop-column on line 3 (squawk counts from 0; we report 1-based lines).
DROP_COLUMN = "-- 001: drops a column\n\nALTER TABLE widgets DROP COLUMN name;\n"
TIMEOUTS_ACCEPTED = """
[[accept]]
file = "*"
rule = "require-lock-timeout"
reason = "the runner sets it"

[[accept]]
file = "*"
rule = "require-statement-timeout"
reason = "the runner sets it"
"""
DROP_ACCEPTED = """
[[accept]]
file = "001_drop.sql"
rule = "ban-drop-column"
reason = "nothing reads widgets.name any more"
"""


def folder_with(tmp_path: Path, files: dict[str, str], accepted: str | None = None) -> Path:
    folder = tmp_path / "sql"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    if accepted is not None:
        (folder / ACCEPTED_FILE_NAME).write_text(accepted)
    return folder


def rules(findings) -> set[tuple[str, int, str]]:
    return {(f.file, f.line, f.rule) for f in findings}


def test_a_warning_nobody_accepted_is_new(tmp_path):
    folder = folder_with(tmp_path, {"001_drop.sql": DROP_COLUMN}, TIMEOUTS_ACCEPTED)
    result = lint(LintSettings(sql_dir=folder))
    assert not result.ok
    assert rules(result.new) == {("001_drop.sql", 3, "ban-drop-column")}
    assert {f.accepted_reason for f in result.accepted} == {"the runner sets it"}
    assert result.new[0].display().startswith("001_drop.sql:3 ban-drop-column Dropping a column")
    assert result.stale == []


def test_an_accepted_warning_with_its_reason_is_clean(tmp_path):
    folder = folder_with(tmp_path, {"001_drop.sql": DROP_COLUMN}, TIMEOUTS_ACCEPTED + DROP_ACCEPTED)
    result = lint(LintSettings(sql_dir=folder))
    assert result.ok and result.new == []
    reasons = {f.rule: f.accepted_reason for f in result.accepted}
    assert reasons["ban-drop-column"] == "nothing reads widgets.name any more"
    payload = result.as_dict()
    assert payload["ok"] is True and len(payload["accepted"]) == 3


def test_entries_that_match_nothing_are_stale_not_failures(tmp_path):
    accepted = TIMEOUTS_ACCEPTED + DROP_ACCEPTED.replace(
        'rule = "ban-drop-column"', 'rule = "ban-drop-column"\nlines = [3]'
    )
    accepted += '\n[[accept]]\nfile = "001_drop.sql"\nrule = "ban-drop-table"\nreason = "old"\n'
    folder = folder_with(tmp_path, {"001_drop.sql": DROP_COLUMN}, accepted)
    result = lint(LintSettings(sql_dir=folder))
    assert result.ok
    assert [(a.file, a.rule) for a in result.stale] == [("001_drop.sql", "ban-drop-table")]


def test_lines_narrow_an_entry(tmp_path):
    accepted = TIMEOUTS_ACCEPTED + DROP_ACCEPTED.replace(
        'rule = "ban-drop-column"', 'rule = "ban-drop-column"\nlines = [7]'
    )
    folder = folder_with(tmp_path, {"001_drop.sql": DROP_COLUMN}, accepted)
    result = lint(LintSettings(sql_dir=folder))
    assert rules(result.new) == {("001_drop.sql", 3, "ban-drop-column")}
    assert [a.rule for a in result.stale] == ["ban-drop-column"]


def test_no_transaction_files_are_linted_as_running_outside_a_transaction(tmp_path):
    statement = "ALTER TABLE widgets ALTER COLUMN name SET NOT NULL;\n"
    folder = folder_with(
        tmp_path,
        {
            "001_in_tx.sql": statement,
            "002_no_tx.sql": "-- harness: no-transaction\n" + statement,
        },
        TIMEOUTS_ACCEPTED,
    )
    result = lint(LintSettings(sql_dir=folder))
    robust = {f.file for f in result.new if f.rule == "prefer-robust-stmts"}
    assert robust == {"002_no_tx.sql"}  # the runner wraps 001 in a transaction
    assert {f.file for f in result.new if f.rule == "adding-not-nullable-field"} == {
        "001_in_tx.sql",
        "002_no_tx.sql",
    }


def test_baseline_is_out_of_scope_and_rollback_files_are_in(tmp_path):
    folder = folder_with(
        tmp_path,
        {
            "000_baseline.sql": DROP_COLUMN,
            "001_ok.sql": "SELECT 1;\n",
            "rollback_001_001.sql": DROP_COLUMN,
        },
        TIMEOUTS_ACCEPTED,
    )
    result = lint(LintSettings(sql_dir=folder))
    assert result.files == ["001_ok.sql", "rollback_001_001.sql"]
    assert rules(result.new) == {("rollback_001_001.sql", 3, "ban-drop-column")}


@pytest.mark.parametrize(
    ("accepted", "problem"),
    [
        ('[[accept]]\nfile = "*"\nrule = "ban-drop-column"\n', "'reason' must be"),
        ('[[accept]]\nfile = "*"\nrule = "x"\nreason = " "\n', "'reason' must be"),
        ('[[accept]]\nfile = "*"\nrule = "x"\nreason = "r"\nline = 3\n', "unknown key"),
        ('[[accept]]\nfile = "*"\nrule = "x"\nreason = "r"\nlines = [0]\n', "'lines' must"),
        ("[accepted]\n", "unknown top-level"),
        ("[[accept]\n", "not valid TOML"),
    ],
)
def test_bad_accepted_files_are_refused(tmp_path, accepted, problem):
    folder = folder_with(tmp_path, {"001_drop.sql": DROP_COLUMN}, accepted)
    with pytest.raises(ConfigError, match=problem):
        lint(LintSettings(sql_dir=folder))


def test_a_named_accepted_file_must_exist(tmp_path):
    folder = folder_with(tmp_path, {"001_drop.sql": DROP_COLUMN})
    with pytest.raises(ConfigError, match="does not exist"):
        lint(LintSettings(sql_dir=folder, accepted_file=tmp_path / "nope.toml"))
    # Without one, every warning is new.
    assert len(lint(LintSettings(sql_dir=folder)).new) == 3


def test_the_real_sql_folder_lints_clean_with_the_committed_config():
    result = lint(LintSettings(sql_dir=SQL_DIR))
    assert result.new == [], [f.display() for f in result.new]
    assert result.stale == [], result.stale
    assert "002_integrity.sql" in result.files and "rollback_001_003.sql" in result.files
    assert "000_baseline.sql" not in result.files
    assert all(f.accepted_reason for f in result.accepted)


def test_cli_lint_exit_codes_and_output(tmp_path, capsys):
    folder = folder_with(tmp_path, {"001_drop.sql": DROP_COLUMN}, TIMEOUTS_ACCEPTED)
    assert main(["lint", "--sql-dir", str(folder)], environ={}) == 1
    out = capsys.readouterr().out
    assert "001_drop.sql:3 ban-drop-column Dropping a column" in out
    assert "lint: 1 new, 2 accepted, 0 stale -> FAIL" in out

    assert main(["lint", "--sql-dir", str(folder), "--json"], environ={}) == 1
    payload = json.loads(capsys.readouterr().out)
    assert [(f["file"], f["line"], f["rule"]) for f in payload["new"]] == [
        ("001_drop.sql", 3, "ban-drop-column")
    ]

    (folder / ACCEPTED_FILE_NAME).write_text(TIMEOUTS_ACCEPTED + DROP_ACCEPTED)
    assert main(["lint", "--sql-dir", str(folder), "-v"], environ={}) == 0
    out = capsys.readouterr().out
    assert "accepted: 001_drop.sql:3 ban-drop-column" in out
    assert "-- nothing reads widgets.name any more" in out

    assert main(["lint"], environ={}) == 0
    assert "-> PASS" in capsys.readouterr().out

    bad = folder_with(tmp_path / "bad", {"001_a.sql": "SELECT 1;\n", "003_c.sql": "SELECT 1;\n"})
    assert main(["lint", "--sql-dir", str(bad)], environ={}) == 2
    assert "migration 002 is missing" in capsys.readouterr().err
