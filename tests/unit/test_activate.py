"""Activation after a layout: ldconfig, enabling only units without a link, starting
them (sockets first), and one `is-active` for all; every command recorded, none run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv import activate as activate_mod
from bootenv.activate import FAILED_UNIT, activate


class _Systemctl:
    """Records the commands activation runs; `is-active` answers from `states`."""

    def __init__(self, states: dict[str, str]) -> None:
        self.states = states
        self.calls: list[list[str]] = []
        self.answered: int | None = None  # states printed by is-active: all, or the first N

    def __call__(self, argv: list[str], **_: object) -> object:
        self.calls.append(argv)
        out = ""
        if argv[1:2] == ["is-active"]:
            out = "".join(f"{self.states.get(u, 'inactive')}\n" for u in argv[2:][: self.answered])

        class Done:
            returncode = 0
            stdout = out.encode()
            stderr = b""

        return Done()


def _enabled_tree(root: Path) -> None:
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "web.service").symlink_to("/lib/systemd/system/web.service")  # as the gold had it
    (root / "etc/systemd/system/sockets.target.wants").mkdir()


@pytest.fixture
def systemctl(monkeypatch: pytest.MonkeyPatch) -> _Systemctl:
    from bootenv import run as run_mod

    rec = _Systemctl({"web.service": "active", "db.socket": "active", "db.service": "failed"})
    monkeypatch.setattr(run_mod, "_spawn", rec)
    monkeypatch.setattr(activate_mod, "which", lambda tool: tool)
    monkeypatch.setattr(activate_mod.os, "geteuid", lambda: 0)
    return rec


def test_live_activation_enables_only_units_without_links_and_asks_all_states_at_once(
    tmp_path: Path, systemctl: _Systemctl
) -> None:
    _enabled_tree(tmp_path)
    notes = activate(tmp_path, ["web.service", "db.socket", "db.service"], live=True)
    verbs = [c[1] if c[0] == "systemctl" else c[0] for c in systemctl.calls]
    # web.service came with its link: only the others are enabled, once, before the one reload.
    assert systemctl.calls[1] == ["systemctl", "enable", "--no-reload", "db.socket", "db.service"]
    assert verbs.count("enable") == 1 and verbs.index("enable") < verbs.index("daemon-reload")
    assert ["systemctl", "start", "db.socket"] in systemctl.calls
    assert ["systemctl", "start", "web.service", "db.service"] in systemctl.calls
    assert [c for c in systemctl.calls if c[1:2] == ["is-active"]] == [
        ["systemctl", "is-active", "web.service", "db.socket", "db.service"]
    ]
    assert ["journalctl", "-u", "db.service", "-n", "25", "--no-pager", "-o", "cat"] in systemctl.calls
    assert "enabled db.socket db.service" in notes
    assert "started web.service" in notes and "started db.socket" in notes
    assert f"{FAILED_UNIT}db.service" in notes


def test_live_activation_with_every_link_in_place_enables_nothing(
    tmp_path: Path, systemctl: _Systemctl
) -> None:
    _enabled_tree(tmp_path)
    notes = activate(tmp_path, ["web.service"], live=True)
    assert not [c for c in systemctl.calls if "enable" in c]
    assert notes == ["ldconfig done", "started web.service"]


def test_a_sysv_service_with_its_start_link_is_not_enabled_again(
    tmp_path: Path, systemctl: _Systemctl
) -> None:
    """An init script's start link is its service's enablement, as the gold had it:
    `systemctl enable` would only run update-rc.d over it again."""
    _enabled_tree(tmp_path)
    (tmp_path / "etc/rc2.d").mkdir()
    (tmp_path / "etc/rc2.d/S01legacyd").symlink_to("../init.d/legacyd")
    notes = activate(tmp_path, ["web.service", "legacyd.service"], live=True)
    assert not [c for c in systemctl.calls if "enable" in c]
    assert ["systemctl", "start", "web.service", "legacyd.service"] in systemctl.calls
    assert notes[0] == "ldconfig done"


def test_offline_activation_enables_only_units_without_links(tmp_path: Path, systemctl: _Systemctl) -> None:
    _enabled_tree(tmp_path)
    notes = activate(tmp_path, ["web.service", "db.socket"], live=False)
    assert systemctl.calls == [
        ["ldconfig", "-r", str(tmp_path)],
        ["systemctl", f"--root={tmp_path}", "enable", "db.socket"],
    ]
    assert notes == [
        "ldconfig done",
        "enabled db.socket offline",
        "not the running system: units start at next boot",
    ]


def test_units_a_short_is_active_answer_leaves_out_are_asked_one_by_one(
    tmp_path: Path, systemctl: _Systemctl
) -> None:
    _enabled_tree(tmp_path)
    systemctl.answered = 1  # systemctl stopped after the first unit (one it could not look up)
    systemctl.states = {"web.service": "reloading", "db.socket": "active", "db.service": "failed"}
    notes = activate(tmp_path, ["web.service", "db.socket", "db.service"], live=True)
    asked = [c[2:] for c in systemctl.calls if c[1:2] == ["is-active"]]
    assert asked == [["web.service", "db.socket", "db.service"], ["db.socket"], ["db.service"]]
    assert "started web.service" in notes and "started db.socket" in notes  # reloading is active
    assert f"{FAILED_UNIT}db.service" in notes


def test_a_start_that_waits_on_the_boot_is_left_queued_not_called_failed(
    tmp_path: Path, systemctl: _Systemctl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit ordered after multi-user.target waits for the boot, which waits for the
    layout: `systemctl start` would wait until the layout's deadline. It is given
    START_WAIT, then the unit whose job is still queued is noted, not failed."""
    from bootenv.errors import CommandError

    real = systemctl.__call__

    def slow(argv: list[str], **kw: object) -> object:
        if argv[1:2] == ["start"]:
            assert kw["timeout"] == activate_mod.START_WAIT
            raise CommandError(argv, -1, "timed out")
        if argv[1:2] == ["show"]:
            systemctl.calls.append(argv)

            class Shown:
                returncode = 0
                stdout = b"Id=web.service\n\nId=final.service\nJob=42\n"
                stderr = b""

            return Shown()
        return real(argv, **kw)

    from bootenv import run as run_mod

    monkeypatch.setattr(run_mod, "_spawn", slow)
    _enabled_tree(tmp_path)
    notes = activate(tmp_path, ["web.service", "final.service"], live=True)
    assert f"{activate_mod.QUEUED_UNIT}final.service" in notes
    assert "started web.service" in notes
    assert not any(n.startswith(FAILED_UNIT) for n in notes)
    asked = [c for c in systemctl.calls if c[1:2] == ["is-active"]]
    assert asked == [["systemctl", "is-active", "web.service"]]  # the queued one is not asked
