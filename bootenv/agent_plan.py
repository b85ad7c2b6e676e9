"""What `bootenv agent` writes, decided before the disk is touched: pure functions of
the agent's config, the manifest and the ramdisk's command line, and the records that
carry the plan to the writer (`Layout`, `Image`).

With `bootenv.single` the agent writes the classic one-piece image instead of the OS
sub-image, and the first-boot layout lays out nothing (see `plan_install`). The root
partition holds the image whole, the components the first-boot layout lays out, and
what the agent adds itself (`root_needs`); the first-boot layout is told where the
image is and which key to check it with (`layout_handoff`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bootenv import bootloader, handoff, target
from bootenv.blockmap import BlockMap
from bootenv.cmdline import AgentConfig
from bootenv.errors import UserError
from bootenv.fsimage import INODE_RATIO
from bootenv.log import human_bytes
from bootenv.manifest import Manifest, OsImage, resolve_components
from bootenv.oswrite import Which
from bootenv.partition import MiB, PartitionPlan
from bootenv.source import Source

# What the agent adds to the root itself: bootenv's runtime (/opt/bootenv: the ramdisk's
# Python, its standard library, bootenv and what it imports, the shared libraries they
# link; the first-boot layout removes it once done) and grub's modules for both
# platforms (/boot/grub). Measured with this project's ramdisk (Debian 12, Python 3.11):
# its initramfs unpacked, `runtime.install_runtime` and `bootloader.copy_modules` run
# chrooted in it into an empty directory on ext4, then `du --block-size=1`: 62.4 MB and
# 5.7 MB (59.5 + 5.4 MiB; the host's venv gives the same). The rest is room for a
# ramdisk whose Python or libraries are bigger; tests/unit/test_agent_needs.py holds
# what this machine installs to it.
AGENT_ADDS = 80 * MiB
INODE_SIZE = 256  # bytes of an inode table entry (fsimage: the image's inodes)


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


@dataclass(frozen=True)
class RootNeeds:
    """What the root partition must hold, and what for."""

    image: int  # the image, written whole
    describe_image: str  # "the OS sub-image", "the single image"
    components: tuple[str, ...]  # those the first-boot layout lays out
    laid_out: int  # at most what they take on the disk (`component_bytes`)
    agent: int  # what the agent adds itself (AGENT_ADDS)

    @property
    def total(self) -> int:
        """The image, then room for the rest in the filesystem grown around it: each of
        its new block groups gives 1/64 to its inode table (an inode of 256 bytes per
        16 KiB, kept by resize2fs as the image has it)."""
        added = self.laid_out + self.agent
        return self.image + -(-added * INODE_RATIO // (INODE_RATIO - INODE_SIZE))

    def describe(self) -> str:
        """One line: how much for what."""
        parts = [f"{self.describe_image} ({human_bytes(self.image)})"]
        if self.components:
            names = ", ".join(self.components)
            parts.append(f"the components {names} (up to {human_bytes(self.laid_out)} laid out)")
        parts.append(f"bootenv's runtime and grub ({human_bytes(self.agent)})")
        grown = self.total - self.image - self.laid_out - self.agent
        return f"{', '.join(parts)} and the grown filesystem's inode tables ({human_bytes(grown)})"


def component_bytes(manifest: Manifest, names: tuple[str, ...]) -> int:
    """At most what laying out these components takes on an ext4 of 4 KiB blocks: the
    bytes of each one's tar (`raw_size`: every entry a 512-byte header and its data padded
    to 512 bytes), and a block per file, for the rest of its last block, which the tar
    pads only to 512 bytes (a directory's block fits in what that leaves over). LAMP's
    three: 388.2 MB of tar, 396.9 MB by this; `df` saw the layout take 392.2 MB."""
    chosen = [c for c in manifest.components if c.name in names]
    return sum(c.data.raw_size + c.files * manifest.rootfs.block_size for c in chosen)


def root_needs(manifest: Manifest, install: InstallPlan, bmap: BlockMap) -> RootNeeds:
    """What the root partition must hold: the image is written whole, so its size, which
    a manifest may give above `min_size` (docs/FORMAT.md); then, in the filesystem grown
    around it, the components the first-boot layout lays out and what the agent adds.
    The manifest's rootfs sizes are the OS sub-image's; the single image's own size is
    in its block map, and it holds the components already."""
    if install.which == "single":
        return RootNeeds(bmap.image_size, "the single image", (), 0, AGENT_ADDS)
    image = max(manifest.rootfs.min_size, bmap.image_size)  # image_size: checked equal
    laid_out = component_bytes(manifest, install.layout)
    return RootNeeds(image, "the OS sub-image", install.layout, laid_out, AGENT_ADDS)


def check_passed_on(ramdisk_cmdline: str) -> None:
    """Refuse the ramdisk's `console=`-like arguments that grub.cfg and kexec cannot take.

    They are passed on to the installed system as they are; the command line was read
    with surrogateescape, so a byte that is not UTF-8 would only fail once grub.cfg is
    written, on a disk already partitioned."""
    why = handoff.passed_on_problem(ramdisk_cmdline)
    if why is not None:
        raise UserError(why)


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
