"""`bootenv agent` at the CLI edge: the command line file as the kernel gives it, and
what bootenv.debug shows when the agent fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootenv import agent, agent_report, bootloader, cli, handoff, target
from bootenv.cmdline import AgentConfig, Handoff
from bootenv.errors import CommandError, FatalError
from bootenv.machines import State
from bootenv.partition import plan_partitions
from bootenv.serve import ServeConfig, running
from tests.serveimage import make_image

IMG = b"bootenv.image=http://10.0.2.2:8080/img"


def no_provisioning(monkeypatch: pytest.MonkeyPatch) -> list[tuple[AgentConfig, str]]:
    """run_agent records what it was given, and fails as a provisioning would."""
    seen: list[tuple[AgentConfig, str]] = []

    def fail(cfg: AgentConfig, *, ramdisk_cmdline: str = "") -> agent.AgentResult:
        seen.append((cfg, ramdisk_cmdline))
        raise FatalError("the disk fell over")

    monkeypatch.setattr(agent, "run_agent", fail)
    return seen


def agent_with(tmp_path: Path, cmdline: bytes) -> list[str]:
    (tmp_path / "cmdline").write_bytes(cmdline)
    return ["agent", "--cmdline", str(tmp_path / "cmdline")]


def test_a_cmdline_that_is_not_utf8_still_configures_the_agent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/proc/cmdline is bytes: one parameter the agent does not use (here latin-1)
    ended the agent in a UnicodeDecodeError traceback before it read its own."""
    seen = no_provisioning(monkeypatch)
    assert cli.main(agent_with(tmp_path, IMG + b" console=ttyS0 caf\xe9 bootenv.hostname=web1\n")) == 1
    cfg, text = seen[0]
    assert (cfg.image, cfg.hostname) == ("http://10.0.2.2:8080/img", "web1")
    assert text.encode("utf-8", "surrogateescape").endswith(b" caf\xe9 bootenv.hostname=web1\n")
    err = capsys.readouterr().err
    assert "bootenv: error: the disk fell over" in err and "Traceback" not in err


def test_a_value_that_is_not_utf8_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen = no_provisioning(monkeypatch)
    assert cli.main(agent_with(tmp_path, IMG + b" bootenv.hostname=caf\xe9\n")) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("bootenv: error:")]
    assert lines == [r"bootenv: error: bootenv.hostname=caf\xe9 is not printable ASCII"], err
    assert "Traceback" not in err and seen == []


def test_bootenv_debug_shows_the_traceback_of_a_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/AGENT.md: bootenv.debug is a "verbose log with tracebacks", as --debug is;
    it only raised the log level."""
    no_provisioning(monkeypatch)
    runs = ((b" bootenv.debug", [], True), (b" bootenv.debug=0", [], False), (b"", ["--debug"], True))
    for flag, before, traceback in runs:  # (`bootenv --debug agent` as before)
        assert cli.main([*before, *agent_with(tmp_path, IMG + flag + b"\n")]) == 1
        err = capsys.readouterr().err
        assert ("Traceback" in err) is traceback, err
        assert ('raise FatalError("the disk fell over")' in err) is traceback  # where it failed
        assert err.splitlines()[-1] == "bootenv: error: the disk fell over"


def test_bad_settings_are_posted_to_a_callback_that_parsed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, events: tuple[str, list[dict[str, object]]]
) -> None:
    """docs/AGENT.md: the error of a failure before the first write, bad settings
    included, goes to the callback; the command line was parsed before the agent made
    its callback, so nobody heard of a typo."""
    from bootenv.event_schema import parse_event

    url, got = events
    seen = no_provisioning(monkeypatch)
    callback = f" bootenv.callback={url}".encode()
    assert cli.main(agent_with(tmp_path, IMG + callback + b" bootenv.colour=blue\n")) == 2
    assert seen == [] and len(got) == 1
    assert got[0]["event"] == "error" and got[0]["fatal"] is True
    assert str(got[0]["message"]).startswith("unknown kernel parameter bootenv.colour")
    assert parse_event(got[0]).source == "agent"
    # A callback that is itself what is wrong, or is given twice, is not posted to.
    for words in (b" bootenv.callback=ftp://x/cb", callback + callback, callback + b" bootenv.callback=nope"):
        assert cli.main(agent_with(tmp_path, IMG + words + b"\n")) == 2
    assert len(got) == 1


def provisioned(cfg: AgentConfig, *, ramdisk_cmdline: str = "") -> agent.AgentResult:
    """run_agent that wrote the disk: it posts what a real run posts up to the hand-off,
    and closes its callback, as a real run does before `finish`."""
    report = agent_report.Report(cfg.callback)
    report.post("start", data={"hostname": "web1", "image": cfg.image})
    with report.step("write-os", "Streaming the OS sub-image to /dev/sdz3"):
        pass
    report.post("step", step="handoff", status="start", data={"disk": "/dev/sdz", "mode": cfg.handoff.value})
    report.close()
    kexec = (
        handoff.KexecSpec(Path("/vmlinuz"), None, "root=UUID=x ro") if cfg.handoff is Handoff.KEXEC else None
    )
    plan = plan_partitions(8 << 30, 512, 1 << 30)
    boot = bootloader.BootPlan(bios=True, efi=True)
    return agent.AgentResult("/dev/sdz", plan, target.new_identity("web1"), (), kexec, boot, report.timings)


@pytest.mark.parametrize(
    ("mode", "answer", "code", "why"),
    [
        (
            "kexec",
            "kexec_core: Starting new kernel failed: Device or resource busy",
            5,
            "Starting new kernel",
        ),
        ("kexec", None, 1, "kexec -e returned"),
        ("reboot", "Failed to talk to init daemon", 5, "reboot exited with 1"),
    ],
)
def test_a_failed_hand_off_reaches_serve(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mode: str,
    answer: str | None,
    code: int,
    why: str,
) -> None:
    """`kexec -e` that failed ended the agent on the console (exit 5), but run_agent had
    closed its callback before the hand-off, so nothing was posted: serve kept the
    machine at os_written, with no error, while it sat in the ramdisk's shell."""
    ran: list[list[str]] = []

    def run(argv: list[str], **kw: object) -> None:
        ran.append(argv)
        if answer is not None:
            raise CommandError(argv, 1, answer)

    monkeypatch.setattr(agent, "run_agent", provisioned)
    monkeypatch.setattr(handoff, "run", run)
    monkeypatch.setattr(handoff, "which", lambda tool: tool)
    make_image(tmp_path / "images")
    mac = "52:54:00:00:00:60"
    with running(ServeConfig(images=tmp_path / "images", state=tmp_path / "state", port=0)) as srv:
        url = f"http://127.0.0.1:{srv.port}/callback/{mac}"
        words = IMG + f" bootenv.callback={url} bootenv.handoff={mode}\n".encode()
        assert cli.main(agent_with(tmp_path, words)) == code
        machine, events = srv.store.get(mac), srv.store.events(mac)
    assert ran == [["kexec", "-e"] if mode == "kexec" else ["reboot", "-f"]]
    assert machine is not None and machine.state is State.FAILED, machine
    assert machine.error is not None and why in machine.error
    assert machine.error.startswith(f"hand-off ({mode}) failed, /dev/sdz is provisioned: ")
    assert [(e["event"], e.get("step"), e.get("status")) for e in events][-2:] == [
        ("step", "handoff", "start"),
        ("error", None, None),
    ]
    assert events[-1]["fatal"] is True and set(events[-1]["data"]["timings"]) == {"write-os"}
    assert why in capsys.readouterr().err.splitlines()[-1]
