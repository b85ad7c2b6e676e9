"""`bootenv agent`: provision this machine's disk from a composite image, then hand off.

read config → manifest → plan (which image, which components) → choose the disk →
preflight (nothing written yet) → partition → stream the OS onto the root partition →
configure the target, install its boot loaders, sync → `os_written` → hand off. Only
`os_written`, once the disk can boot, makes `bootenv serve` answer the machine's next
network boot with its local disk: a run cut short before it (a power cut, a reset) is
provisioned again. What is written is planned in bootenv/agent_plan.py;
the disk is chosen, checked, reached and wiped in bootenv/agent_disk.py; the steps are
told in bootenv/agent_report.py.

Every step is timed and posted to the callback. If anything fails after the disk was
touched, it is wiped so the machine can never boot a half-written OS; the error goes
to the callback and the console, and the agent exits non-zero (the ramdisk then drops
to a shell; it never reboots, so a failure cannot become a reboot loop).

A run whose assignment was replaced (the admin assigned the machine again while it
ran: `bootenv serve` answers its events 409 with `"replaced": true`) fails so too, at the start of the step
after the answer came, or before the hand-off, once the last events' answers are in:
the new assignment is carried out by the next network boot, never the old image booted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from bootenv import agent_disk, bootloader, handoff, ramdisk_plan, target
from bootenv.agent_plan import Image, Layout, check_passed_on, layout_handoff, plan_install, root_needs
from bootenv.agent_report import Report, SupersededError, describe_error, post_error
from bootenv.blockdev import open_destination
from bootenv.cmdline import AgentConfig, Handoff
from bootenv.disks import log_choice
from bootenv.errors import FatalError
from bootenv.log import human_bytes
from bootenv.oswrite import load_checked, write_os
from bootenv.partition import PartitionPlan, Role, apply_plan, describe_need, required_size
from bootenv.run import run, which
from bootenv.signing import Trust, read_public_key
from bootenv.trusted import open_signed

log = logging.getLogger(__name__)

TRUSTED_DIR = Path("/", ramdisk_plan.TRUSTED_DIR)  # keys built in with build-ramdisk --trust


@dataclass(frozen=True)
class AgentResult:
    disk: str
    plan: PartitionPlan
    identity: target.Identity
    components: tuple[str, ...]
    kexec: handoff.KexecSpec | None
    boot: bootloader.BootPlan  # which loaders were installed, and why one was left out
    timings: Mapping[str, float] = field(default_factory=dict)  # of the steps, for `finish`


def run_agent(cfg: AgentConfig, *, ramdisk_cmdline: str = "") -> AgentResult:
    """Provision the disk; the caller hands off (see `finish`)."""
    ident = target.new_identity(cfg.hostname)
    report = Report(cfg.callback, ident.hostname)
    report.post("start", data={"hostname": ident.hostname, "image": cfg.image})
    try:
        result = _provision(cfg, ident, report, ramdisk_cmdline)
        before_handoff(report, result)
        return replace(result, timings=report.timings)
    except Exception as exc:
        message = describe_error(exc)
        log.error("provisioning failed: %s", message)
        report.post("error", message=message, fatal=True, data={"timings": report.timings})
        raise
    finally:
        report.close()


def _provision(cfg: AgentConfig, ident: target.Identity, report: Report, cmdline: str) -> AgentResult:
    with report.step("manifest", f"Reading and verifying the image manifest and block map from {cfg.image}"):
        source, manifest, signer = open_signed(cfg.image, trust(cfg))
        install = plan_install(cfg, manifest)
        # Now, not once the disk is wiped: a block map that is missing or does not
        # verify, or a data blob out of reach, must leave the old system as it was.
        bmap = load_checked(source, manifest, install.which)
    needs = root_needs(manifest, install, bmap)
    log.info("the root needs %s: %s", human_bytes(needs.total), needs.describe())
    with report.step("disk", "Choosing the disk"):
        need = describe_need(needs.total, 4096, needs.describe())
        choice = agent_disk.choose(cfg, required_size(needs.total, 4096), need)
        log_choice(choice)
        disk = choice.disk.devnode
    with report.step("preflight", f"Checking {disk} before writing"):
        plan = agent_disk.preflight(disk, needs.total, needs.describe())
        bootloader.check_available()
        boot = bootloader.plan_boot(disk, plan.sector_size, bootloader.running_firmware())
        check_passed_on(cmdline)
    # Asked here too, outside the wipe below: a run stopped before it writes anything
    # leaves the disk as it was (the partition step's own check would be inside it).
    report.check_assignment("the partition step")
    with ExitStack() as stack:
        try:
            kexec = _write_disk(
                cfg,
                disk,
                Layout(plan, boot),
                Image(manifest, source, install, bmap, signer),
                ident,
                report,
                cmdline,
                stack,
            )
        except BaseException:
            stack.close()  # detach offset loop devices before wiping the whole disk
            agent_disk.wipe_disk(disk, plan)
            raise
    # The disk boots now: the boot loaders are in and all is synced (_write_disk's last).
    # Only this tells serve to answer the machine's next network boot with its disk:
    # a power cut or a reset before it leaves the machine provisioning, provisioned again.
    report.post("os_written", data={"disk": disk})
    # Not "done": that is the layout service's, once the components are in place.
    report.post(
        "step",
        step="handoff",
        status="start",
        data={
            "disk": disk,
            "mode": cfg.handoff.value,
            "image": install.which,
            "components": list(install.installed),
            "bootloaders": list(boot.loaders),
            **({"warnings": [boot.note]} if boot.note else {}),
            "timings": report.timings,
        },
    )
    return AgentResult(disk, plan, ident, install.installed, kexec, boot)


def before_handoff(report: Report, result: AgentResult) -> None:
    """The last chance not to boot the image of a replaced assignment: once the events
    are all posted (the hand-off's start last), serve's answers to them are known. The
    disk is written then: it is wiped, as after any failure."""
    report.close()
    try:
        report.check_assignment("the hand-off")
    except SupersededError:
        agent_disk.wipe_disk(result.disk, result.plan)
        raise


def trust(cfg: AgentConfig, trusted_dir: Path = TRUSTED_DIR) -> Trust:
    """Keys built into the ramdisk, plus a fingerprint pinned on the command line."""
    keys = tuple(read_public_key(p) for p in sorted(trusted_dir.glob("*.pub")))
    return Trust(keys=keys, fingerprints=(cfg.trust,) if cfg.trust else (), insecure=cfg.insecure)


def _write_disk(
    cfg: AgentConfig,
    disk: str,
    layout: Layout,
    image: Image,
    ident: target.Identity,
    report: Report,
    cmdline: str,
    stack: ExitStack,
) -> handoff.KexecSpec | None:
    plan = layout.plan
    with report.step("partition", f"Partitioning {disk} (GPT: BIOS boot, ESP, root)"):
        run([which("wipefs"), "-a", disk])
        agent_disk.clear_loaders(disk, plan)
        apply_plan(disk, plan)
        parts = agent_disk.partition_devices(disk, plan, stack)
    root_dev, esp_dev = parts[Role.ROOT], parts[Role.ESP]
    install = image.install
    # Named write-os for both images. Its end is not serve's os_written: nothing can
    # boot the disk before the steps below (grown filesystem, ESP, grub) are done.
    with report.step("write-os", f"Streaming the {install.describe()} to {root_dev}"):
        with open_destination(root_dev, image.bmap.image_size) as dest:
            result = write_os(
                image.source, image.manifest, dest.fd, which=install.which, name=root_dev, bmap=image.bmap
            )
        log.info("%s", result.summary())
    with report.step("filesystems", "Growing the root filesystem, making the ESP"):
        target.prepare_root_fs(root_dev, ident)
        target.make_esp(esp_dev, ident)
    handoff_file = layout_handoff(cfg, image, ident.hostname)
    kexec = None
    with target.mounted(root_dev) as root:
        with report.step("configure", "Configuring the target (identity, first boot, layout)"):
            target.configure(root, ident, handoff_file, cfg.ssh_key)
        with report.step("runtime", "Bringing bootenv's runtime into the target"):
            from bootenv.runtime import install_runtime

            install_runtime(root)
        with report.step("bootloader", f"Installing grub for {layout.boot.describe()}"):
            _install_bootloader(disk, layout, root, esp_dev, ident, cmdline)
        if cfg.handoff is Handoff.KEXEC:
            kexec = handoff.kexec_spec(root, ident.root_uuid, cmdline)
            handoff.load(kexec)
        run([which("sync")])  # before os_written (the caller's): what it says is on the disk
    return kexec


def _install_bootloader(
    disk: str, layout: Layout, root: Path, esp_dev: str, ident: target.Identity, cmdline: str
) -> None:
    files = handoff.find_kernel(root)
    # The /vmlinuz symlinks follow kernel upgrades (Debian keeps them current).
    kernel = "/vmlinuz" if (root / "vmlinuz").is_symlink() else files.kernel
    initrd = "/initrd.img" if files.initrd and (root / "initrd.img").is_symlink() else files.initrd
    args = handoff.kernel_args(ident.root_uuid, cmdline)
    cfg_text = bootloader.grub_cfg_text(ident.root_uuid, kernel, initrd, args, f"{ident.hostname} (bootenv)")
    bootloader.copy_modules(root)
    bootloader.write_config(root, cfg_text)
    if layout.boot.bios:
        bootloader.install_bios(disk, root, ident.root_uuid, layout.plan.bios.offset, layout.plan.bios.size)
    if layout.boot.note:
        log.warning("%s", layout.boot.note)
    if layout.boot.efi:
        bootloader.install_efi(esp_dev, ident.root_uuid)


def finish(cfg: AgentConfig, result: AgentResult) -> None:
    """Hand off to the installed system (does not return for kexec/reboot).

    A hand-off that fails (`kexec -e` refused, `reboot` missing) is posted as a fatal
    error: `run_agent` has closed its callback by then, so that its last events were
    posted before the kexec, and serve would otherwise keep the machine at os_written,
    with no error, while it waits in the ramdisk's shell."""
    if cfg.handoff is Handoff.NONE:
        log.info("bootenv.handoff=none: staying in the ramdisk")
        return
    try:
        if cfg.handoff is Handoff.KEXEC and result.kexec is None:
            raise FatalError("no kernel was loaded for kexec")
        handoff.execute(cfg.handoff)
    except Exception as exc:
        message = (
            f"hand-off ({cfg.handoff.value}) failed, {result.disk} is provisioned: {describe_error(exc)}"
        )
        log.error("%s", message)
        post_error(cfg.callback, message, result.timings)
        raise
