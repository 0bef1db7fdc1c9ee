"""The one exception type users see: what went wrong and how to fix it.

Every module raises `ClusterctlError` for a problem the user can act on; the CLI prints it as one line
and exits non-zero. Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class ClusterctlError(Exception):
    """A problem the user can fix: `message` names it, `fix` says what to do."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message


class CommandError(ClusterctlError):
    """An external command (systemctl, journalctl, nsenter, ...) failed."""

    exit_code = 1
