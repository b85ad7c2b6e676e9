"""A layout's writes of conflict records (a conflict stored and recorded, one retired)
take the lock a `bootenv conflicts resolve` holds for its whole run, so neither takes
the other's stored version or record from under it (bootenv/resolvetemps.py). A real
resolve is paused in a process of its own after a step; a real layout runs meanwhile.
A resolve stopped before a layout retired its conflict says so when it is run again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import bootenv
from bootenv import conflicts
from bootenv.cli import main
from bootenv.conflicts import RECORDS
from bootenv.journal import STATE_DIR
from bootenv.layout import LayoutConfig, LayoutResult, layout
from bootenv.resolvetemps import LOCK
from tests.hostile.kit import ActivatedUnits, Comp, d, f, make_image
from tests.unit.resolvekit import stop_at

V1, V3 = b"\x7fELF\x02\x01\x01\0version 1", b"\x7fELF\x02\x01\x01\0version 3"


def _run(image: Path, root: Path) -> LayoutResult:
    return layout(LayoutConfig(str(image), ("x",), root), activator=ActivatedUnits())


def _image(tmp_path: Path, name: str, tool: bytes) -> Path:
    return make_image(tmp_path / name, [Comp("x", [d("usr"), f("usr/tool", tool)])])


def _conflict(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    (root / "usr/tool").write_bytes(b"os tool")
    (cid,) = _run(_image(tmp_path, "v1", V1), root).components[0].conflicts
    (root / STATE_DIR / "x.json").unlink()  # laid out again by the next layout
    return root, cid


def _paused_resolve(tmp_path: Path, root: Path, cid: str, after: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A real `resolve --keep incoming`, in a process of its own, paused right after its
    step `after` until the fifo it returns is written."""
    go, paused = tmp_path / "go", tmp_path / "paused"
    os.mkfifo(go)
    code = f"""
import sys
from bootenv import resolution
real = resolution.{after}
def paused(*args, **kwargs):
    real(*args, **kwargs)
    open({str(paused)!r}, "w").close()
    open({str(go)!r}).read()
resolution.{after} = paused
from bootenv.cli import main
sys.exit(main(["conflicts", "resolve", {cid!r}, "--keep", "incoming", "--root", {str(root)!r}]))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(bootenv.__file__).resolve().parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not paused.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the resolve did not pause"
        time.sleep(0.02)
    return child, go


def _waiting_on(lock: Path) -> bool:
    """Whether a process waits for the flock of `lock` (/proc/locks: `->` before it)."""
    ino = f":{lock.stat().st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and any(x.endswith(ino) for x in fields):
            return True
    return False


def _layout_beside(root: Path, image: Path, go: Path) -> LayoutResult:
    """Lay out `image` while the paused resolve holds on: it goes on once the layout has
    ended, or waits for the resolve's lock, whichever comes first."""
    ended = threading.Event()

    def release() -> None:
        while not ended.is_set() and not _waiting_on(root / RECORDS / LOCK):
            time.sleep(0.01)
        with open(go, "w") as fifo:
            fifo.write("go")

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        return _run(image, root)
    finally:
        ended.set()
        releaser.join()


def _state(root: Path, cid: str) -> tuple[bytes, bytes | None, str | None, dict[str, Any]]:
    """The file in place, the stored version, the resolution, the recorded incoming one."""
    rec = conflicts.load(root, cid)
    stored = root / rec.stored
    return (
        (root / "usr/tool").read_bytes(),
        stored.read_bytes() if stored.exists() else None,
        (rec.resolution or {}).get("keep"),
        rec.incoming,
    )


@pytest.mark.usefixtures("allow_run")
def test_a_layout_does_not_retire_a_conflict_while_it_is_resolved(tmp_path: Path) -> None:
    """The layout of v2, which ships what is in place, retires the conflict: it waits for
    the resolve that has written its intent, whose choice is then the one applied, and
    the record, resolved, is not retired."""
    root, cid = _conflict(tmp_path)
    v2 = _image(tmp_path, "v2", b"os tool")
    child, go = _paused_resolve(tmp_path, root, cid, "write_intent")
    (x,) = _layout_beside(root, v2, go).components
    _, err = child.communicate(timeout=60)
    assert (child.returncode, err.decode()) == (0, "")
    assert (x.status, x.conflicts) == ("done", ())
    assert _state(root, cid)[:3] == (V1, None, "incoming")
    assert not (root / RECORDS / f"{cid}.intent").exists()


@pytest.mark.usefixtures("allow_run")
def test_a_layout_does_not_store_a_version_while_a_conflict_is_resolved(tmp_path: Path) -> None:
    """The layout of v3 stores its version of the path and records it while a resolve
    has put v1's in place and not yet recorded it: it waits, and the conflict is open
    again for v3, its version stored; not recorded resolved for v1 with v3's unseen."""
    root, cid = _conflict(tmp_path)
    v3 = _image(tmp_path, "v3", V3)
    child, go = _paused_resolve(tmp_path, root, cid, "_put_incoming")
    (x,) = _layout_beside(root, v3, go).components
    _, err = child.communicate(timeout=60)
    assert (child.returncode, err.decode()) == (0, "")
    assert (x.status, x.conflicts) == ("done", (cid,))
    tool, stored, keep, incoming = _state(root, cid)
    assert (tool, stored, keep) == (V1, V3, None)
    assert incoming["size"] == len(V3)


def test_a_stopped_resolve_whose_conflict_a_layout_retired_since_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resolve --keep incoming stopped after its intent; then the layout of v2, which
    ships what is in place, retires the conflict. Its re-run does not report success."""
    root, cid = _conflict(tmp_path)

    stop_at(monkeypatch, "_put_incoming", root, cid, "incoming", None)
    assert _run(_image(tmp_path, "v2", b"os tool"), root).components[0].conflicts == ()
    capsys.readouterr()
    again = ["conflicts", "resolve", cid, "--keep", "incoming", "--root", str(root)]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert (
        f"conflict {cid}: the resolve --keep incoming that was stopped was not finished: the"
        " conflict was resolved since (superseded: a later layout of x found no conflict there);"
        " /usr/tool is left as it is" in err
    )
    assert err.count("\n") == 1
    assert _state(root, cid)[:3] == (b"os tool", None, "superseded")
    assert not (root / RECORDS / f"{cid}.intent").exists()
    assert main(again) == 2
    assert f"conflict {cid} is already resolved (superseded)" in capsys.readouterr().err


def test_a_stopped_resolve_whose_conflict_holds_another_version_since_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resolve --keep existing stopped after its intent; then the layout of v3 stores
    its version and records it. Run again, the resolve would remove v3's version, which
    the admin has not seen, and record it resolved: it says so instead."""
    root, cid = _conflict(tmp_path)

    stop_at(monkeypatch, "remove_at", root, cid, "existing", None)
    assert _run(_image(tmp_path, "v3", V3), root).components[0].conflicts == (cid,)
    capsys.readouterr()
    again = ["conflicts", "resolve", cid, "--keep", "existing", "--root", str(root)]
    assert main(again) == 2
    err = capsys.readouterr().err
    assert (
        f"conflict {cid}: the resolve --keep existing that was stopped was not finished: a layout"
        " has found another version of /usr/tool since, which it was not asked for" in err
    )
    assert err.count("\n") == 1
    assert _state(root, cid)[:3] == (b"os tool", V3, None)
    assert not (root / RECORDS / f"{cid}.intent").exists()
    assert main(again) == 0  # asked for v3 now
    assert _state(root, cid)[:3] == (b"os tool", None, "existing")
