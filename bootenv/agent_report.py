"""How a run of `bootenv agent` is told: its timed steps in the log and posted to the
callback, and its fatal errors.

Every step is timed and posted to the callback (best effort, in the schema of
`bootenv serve`'s /callback: see bootenv/callback.py). A run whose assignment was
replaced (the admin assigned the machine again while it ran: `bootenv serve` answers
its events 409 with `"replaced": true`) is told so by `Report.check_assignment` (`SupersededError`), at the
start of the step after the answer came.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from bootenv.callback import Callback
from bootenv.errors import BootenvError, FatalError
from bootenv.log import step


class SupersededError(FatalError):
    """`bootenv serve` refused this run's events with a 409 saying `"replaced": true`:
    the machine was assigned again since the run started, and only a network boot
    provisions it as assigned."""

    def __init__(self, reason: str, before: str) -> None:
        super().__init__(
            f"this machine was assigned again since this run started (bootenv serve: {reason}): "
            f"stopped before {before}",
            hint="reboot it by network boot to provision it with its new assignment",
        )


class Report:
    """Timed steps, in the log and posted to the callback in `bootenv serve`'s schema.
    Each step starts only while serve has not said that the run's assignment was replaced.
    """

    def __init__(self, callback: str | None, hostname: str = "") -> None:
        self.callback = Callback(callback, "agent")
        self.hostname = hostname

    def post(self, event: str, **fields: object) -> None:
        self.callback.post(event, **fields)

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.callback.timings)

    @contextmanager
    def step(self, name: str, title: str) -> Iterator[None]:
        self.check_assignment(f"the {name} step")
        with step(title), self.callback.step(name):
            yield

    def check_assignment(self, before: str) -> None:
        """Raise SupersededError if serve answered an event of this run 409, replaced (`before`:
        what the run stops before)."""
        reason = self.callback.superseded
        if reason is not None:
            raise SupersededError(reason, before)

    def close(self) -> None:
        self.callback.close()


def report_bad_settings(callback: str | None, error: BootenvError) -> None:
    """Post settings the agent refuses to their callback, when that URL is sound itself
    (`cmdline.callback_of`): the machine would otherwise wait in the ramdisk's shell
    with nobody told. Best effort, as every event."""
    post_error(callback, str(error))


def post_error(callback: str | None, message: str, timings: Mapping[str, float] | None = None) -> None:
    """Post a fatal error outside `run_agent` (whose callback is closed then), on a
    callback of its own, waiting for it as `run_agent` waits for its last events."""
    if callback is None:
        return
    report = Report(callback)
    try:
        report.post("error", message=message, fatal=True, data={"timings": dict(timings or {})})
    finally:
        report.close()


def describe_error(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, BootenvError) else f"{type(exc).__name__}: {exc}"
