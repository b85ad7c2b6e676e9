"""The exception hierarchy. Every failure a user can see is a BootenvError.

The class encodes policy: a RetryableError may succeed when tried again (a dropped
connection), a FatalError never will (a bad hash), and a UserError is bad input that
the user must fix. `cli.main` catches BootenvError once and prints one line.
"""

from __future__ import annotations


class BootenvError(Exception):
    """Base of every error bootenv reports to the user."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class UserError(BootenvError):
    """Bad input: a wrong argument, a missing file, an unknown package."""

    exit_code = 2


class FatalError(BootenvError):
    """Something went wrong that trying again will not fix."""

    exit_code = 1


class RetryableError(BootenvError):
    """A transient failure: a dropped connection, a 5xx answer, a timeout."""

    exit_code = 3


class VerificationError(FatalError):
    """Data did not match its recorded hash or size."""

    exit_code = 4


class CommandError(FatalError):
    """An external command failed."""

    exit_code = 5

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        # GNU tools end with a generic summary line; the cause is the line before it.
        useful = [ln for ln in lines if "Exiting with failure status" not in ln]
        last = (useful or lines or ["no output"])[-1]
        super().__init__(f"{argv[0]} exited with {returncode}: {last}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
