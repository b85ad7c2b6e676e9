"""A `bootenv conflicts resolve` stopped at a step, as a kill there would stop it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bootenv import resolution


def stop_at(
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    root: Path,
    cid: str,
    keep: str | None,
    file: Path | None = None,
) -> None:
    """Resolve `cid` (`keep`, or the admin's `file`), stopped where it calls `step`, a name
    in bootenv.resolution: KeyboardInterrupt is raised there, before the step does anything."""

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(resolution, step, killed)
        with pytest.raises(KeyboardInterrupt):
            resolution.resolve(root, cid, keep, file)
