"""`bootenv agent`: provision this machine's disk from a composite image, then hand off.

read config → manifest → plan (which image, which components) → choose the disk →
preflight (nothing written yet) → partition → stream the OS onto the root partition →
configure the target → hand off. With `bootenv.single` the agent writes the classic
one-piece image instead, and the first-boot layout lays out nothing (see `plan_install`).

Every step is timed and posted to the callback (best effort, in the schema of
`bootenv serve`'s /callback: see bootenv/callback.py). If anything fails after
the disk was touched, its partition table and filesystem signatures are wiped so the
machine can never boot a half-written OS; the error goes to the callback and the
console, and the agent exits non-zero (the ramdisk then drops to a shell; it never
reboots, so a failure cannot become a reboot loop).

A run whose assignment was replaced (the admin assigned the machine again while it
ran: `bootenv serve` answers its events 409) fails so too, at the start of the step
after the answer came, or before the hand-off, once the last events' answers are in:
the new assignment is carried out by the next network boot, never the old image booted.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from bootenv import bootloader, handoff, ramdisk_plan, target
from bootenv.blockdev import (
    check_file_not_attached,
    check_not_in_use,
    device_size,
    open_destination,
    sector_size,
)
from bootenv.blockmap import BlockMap
from bootenv.callback import Callback
from bootenv.cmdline import AgentConfig, DiskKind, Handoff
from bootenv.disks import DiskChoice, choose_disk, log_choice, read_disks, resolve_selector
from bootenv.errors import BootenvError, FatalError, UserError
from bootenv.log import step
from bootenv.manifest import Manifest, OsImage, resolve_components
from bootenv.oswrite import Which, load_checked, write_os
from bootenv.partition import (
    MiB,
    PartitionPlan,
    Role,
    apply_plan,
    partition_node,
    plan_partitions,
    required_size,
    wait_for_node,
)
from bootenv.run import run, which
from bootenv.signing import Trust, read_public_key
from bootenv.source import Source
from bootenv.trusted import open_signed

log = logging.getLogger(__name__)

CALLBACK_TIMEOUT = 5.0
TRUSTED_DIR = Path("/", ramdisk_plan.TRUSTED_DIR)  # keys built in with build-ramdisk --trust


class SupersededError(FatalError):
    """`bootenv serve` refused this run's events with a 409: the machine was assigned
    again since the run started, and only a network boot provisions it as assigned."""

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
        """Raise SupersededError if serve answered an event of this run 409 (`before`:
        what the run stops before)."""
        reason = self.callback.superseded
        if reason is not None:
            raise SupersededError(reason, before)

    def close(self) -> None:
        self.callback.close()


@dataclass(frozen=True)
class InstallPlan:
    """What the agent writes, and what the first-boot layout lays out afterwards."""

    which: Which  # "os": the OS sub-image; "single": the classic one-piece image
    image: OsImage
    layout: tuple[str, ...]  # components the layout service lays out on first boot
    installed: tuple[str, ...]  # components the machine has once done

    def describe(self) -> str:
        return "single image" if self.which == "single" else "OS sub-image"


def plan_install(cfg: AgentConfig, manifest: Manifest) -> InstallPlan:
    """The split image's OS plus the chosen components, or the single image as it is.

    The single image already holds every component, so the layout service gets none:
    it still runs once on first boot, to report `os_booted` and `done`, which keeps the
    server's timeline the same shape for both kinds of image.
    """
    if cfg.single:
        if manifest.single is None:
            raise UserError("bootenv.single: this image has no single image", hint="capture it with --single")
        return InstallPlan("single", manifest.single, (), tuple(c.name for c in manifest.components))
    components = tuple(resolve_components(manifest, cfg.wanted_components)[0])
    if components and cfg.local_image:
        # The first-boot layout fetches the components from the image, and the
        # installed system has no such directory: they would never be laid out.
        raise UserError(
            f"bootenv.image={cfg.image} is a directory on the ramdisk, which the installed system "
            f"cannot reach to lay out {', '.join(components)}",
            hint="serve the image over http(s), or set bootenv.components=none",
        )
    return InstallPlan("os", manifest.os, components, components)


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
    min_root = root_needs(manifest, install.which, bmap)
    with report.step("disk", "Choosing the disk"):
        choice = _choose(cfg, required_size(min_root, 4096))
        log_choice(choice)
        disk = choice.disk.devnode
    with report.step("preflight", f"Checking {disk} before writing"):
        plan = preflight(disk, min_root)
        bootloader.check_available()
        boot = bootloader.plan_boot(disk, plan.sector_size, bootloader.running_firmware())
        check_passed_on(cmdline)
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
            wipe_disk(disk, plan)
            raise
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
        wipe_disk(result.disk, result.plan)
        raise


def trust(cfg: AgentConfig, trusted_dir: Path = TRUSTED_DIR) -> Trust:
    """Keys built into the ramdisk, plus a fingerprint pinned on the command line."""
    keys = tuple(read_public_key(p) for p in sorted(trusted_dir.glob("*.pub")))
    return Trust(keys=keys, fingerprints=(cfg.trust,) if cfg.trust else (), insecure=cfg.insecure)


def root_needs(manifest: Manifest, which: Which, bmap: BlockMap) -> int:
    """The bytes the root partition must hold: the image is written whole, so this is
    its size, which a manifest may give above `min_size` (docs/FORMAT.md). The
    manifest's rootfs sizes are the OS sub-image's; the single image's own size is in
    its block map."""
    if which == "single":
        return bmap.image_size
    return max(manifest.rootfs.min_size, bmap.image_size)  # image_size: checked equal


def check_passed_on(ramdisk_cmdline: str) -> None:
    """Refuse the ramdisk's `console=`-like arguments that grub.cfg and kexec cannot take.

    They are passed on to the installed system as they are; the command line was read
    with surrogateescape, so a byte that is not UTF-8 would only fail once grub.cfg is
    written, on a disk already partitioned."""
    why = handoff.passed_on_problem(ramdisk_cmdline)
    if why is not None:
        raise UserError(why)


def _choose(cfg: AgentConfig, min_size: int) -> DiskChoice:
    disks = read_disks()
    sel = resolve_selector(cfg.disk)
    if sel.kind is DiskKind.DEVICE and not any(d.devnode == sel.value for d in disks):
        raise UserError(f"bootenv.disk={cfg.disk.value}: no such disk")
    return choose_disk(disks, sel, min_size)


def preflight(disk: str, min_root: int) -> PartitionPlan:
    """Every check that must pass before the first write; returns the partition plan."""
    try:
        st = os.stat(disk)
    except FileNotFoundError as exc:
        raise UserError(f"{disk} does not exist") from exc
    if stat.S_ISBLK(st.st_mode):
        check_not_in_use(disk, st.st_rdev)
        flags = os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC
    elif stat.S_ISREG(st.st_mode):
        check_file_not_attached(disk)
        flags = os.O_RDONLY | os.O_CLOEXEC
    else:
        raise UserError(f"{disk} is neither a disk nor a disk image file")
    try:
        fd = os.open(disk, flags)
    except OSError as exc:
        raise UserError(f"{disk} is in use (mounted or claimed): {exc.strerror}") from exc
    try:
        size, sector = device_size(fd), sector_size(fd)
    finally:
        os.close(fd)
    if size % sector:
        # parted sees only whole sectors: the plan would end past the device's end.
        raise UserError(
            f"{disk} is {size} bytes, not a whole number of its {sector}-byte sectors",
            hint="truncate or grow the disk image to a multiple of its sector size",
        )
    return plan_partitions(size, sector, min_root)


@dataclass(frozen=True)
class Layout:
    """What goes on the disk around the OS: its partitions and its boot loaders."""

    plan: PartitionPlan
    boot: bootloader.BootPlan


@dataclass(frozen=True)
class Image:
    """The opened image and what to write from it."""

    manifest: Manifest
    source: Source
    install: InstallPlan
    bmap: BlockMap  # loaded and checked before the disk was touched (load_checked)
    signer: str | None = None  # the fingerprint of the key that signed it, if checked


def layout_handoff(cfg: AgentConfig, image: Image, hostname: str) -> target.LayoutHandoff:
    """What the first-boot layout is told: where the image is, what to lay out, whom to
    tell, and which key to check the image with: the one the agent checked it with,
    whichever way the agent trusted it (the command line's fingerprint, or a key built
    into the ramdisk, which the target does not have)."""
    return target.LayoutHandoff(
        image=cfg.image,
        components=image.install.layout,
        callback=cfg.callback,
        hostname=hostname,
        insecure=cfg.insecure,
        trust=image.signer or cfg.trust,
    )


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
        apply_plan(disk, plan)
        parts = partition_devices(disk, plan, stack)
    root_dev, esp_dev = parts[Role.ROOT], parts[Role.ESP]
    install = image.install
    # Named write-os for both images: serve marks the machine os_written when it is done.
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
        run([which("sync")])
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
    (root / "boot/grub/grub.cfg").write_text(cfg_text)
    if layout.boot.bios:
        bootloader.install_bios(disk, root, ident.root_uuid, layout.plan.bios.offset, layout.plan.bios.size)
    if layout.boot.note:
        log.warning("%s", layout.boot.note)
    if layout.boot.efi:
        bootloader.install_efi(esp_dev, ident.root_uuid)


def partition_devices(disk: str, plan: PartitionPlan, stack: ExitStack) -> dict[Role, str]:
    """The partitions' device nodes; offset loop devices where the kernel shows none.

    A disk image file, or a loop device attached without partition scanning, has no
    partition nodes: there we attach each partition with losetup --offset/--sizelimit,
    with the disk's sector size (a 4Kn disk's ESP is formatted with 4 KiB sectors, as
    firmware reading it through the disk expects).
    """
    out: dict[Role, str] = {}
    is_blk = stat.S_ISBLK(os.stat(disk).st_mode)
    for p in plan.partitions:
        node = partition_node(disk, p.number)
        if is_blk and wait_for_node(node, timeout=0 if _no_partscan(disk) else 10.0):
            out[p.role] = node
            continue
        # 512 is losetup's own default: only another size needs the option (util-linux 2.30).
        sectors = ["--sector-size", str(plan.sector_size)] if plan.sector_size != 512 else []
        loop = run(
            [
                which("losetup"),
                "--find",
                "--show",
                "--offset",
                str(p.offset),
                "--sizelimit",
                str(p.size),
                *sectors,
                disk,
            ]
        )
        dev = loop.stdout.decode().strip()
        stack.callback(run, [which("losetup"), "--detach", dev], check=False)
        out[p.role] = dev
    return out


def _no_partscan(disk: str) -> bool:
    name = Path(disk).name
    flag = Path(f"/sys/block/{name}/loop/partscan")
    return flag.exists() and flag.read_text().strip() == "0"


def wipe_disk(disk: str, plan: PartitionPlan) -> None:
    """Leave the disk unbootable: no partition table, no filesystem signatures."""
    log.error("wiping %s so that it cannot boot a half-written system", disk)
    try:
        fd = os.open(disk, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.error("cannot open %s to wipe it: %s", disk, exc)
        return
    try:
        zero = bytes(MiB)
        size = plan.disk_size
        # The primary and backup GPT, the MBR, and every partition's superblocks.
        for offset in (0, max(0, size - MiB), *(p.offset for p in plan.partitions)):
            os.pwrite(fd, zero, offset)
        os.fsync(fd)
    except OSError as exc:
        log.error("could not wipe %s: %s", disk, exc)
    finally:
        os.close(fd)
    try:
        run([which("wipefs"), "-a", disk], check=False)
    except BootenvError as exc:
        log.error("wipefs: %s", exc)


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
