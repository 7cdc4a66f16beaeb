"""The harness's error types and exit statuses.

Every expected failure is a :class:`HarnessError`: the CLI catches it once and
prints it as one line (``harness: error: ...``) with the exit status it
carries. Anything else is a bug and shows a traceback only with
``--traceback``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """Process exit codes, the same for every command."""

    SUCCESS = 0
    # A check, gate or invariant failed: the run completed and said "no".
    CHECK_FAILED = 1
    # The run could not complete: bad input, unreachable server, failed stage.
    ERROR = 2
    ERROR_CTRL_C = 130


class HarnessError(Exception):
    """An expected failure with a message a user can act on.

    ``hint`` says what to do about it; it is printed after the message.
    """

    exit_status: ExitStatus = ExitStatus.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class ConfigError(HarnessError):
    """Bad flags, a bad TOML file, a bad folder layout."""


class TargetError(HarnessError):
    """The database cannot be reached or lacks something the harness needs."""


class SafetyError(HarnessError):
    """A destructive action was refused (URL target without confirmation...)."""


class MigrationError(HarnessError):
    """A migration file failed or was refused; carries where and why."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        file: str | None = None,
        line: int | None = None,
        sqlstate: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.file = file
        self.line = line
        self.sqlstate = sqlstate


class SamplesError(HarnessError):
    """A samples file or run folder is missing, corrupt or of another version."""
