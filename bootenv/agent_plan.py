"""What `bootenv agent` writes, decided before the disk is touched: pure functions of
the agent's config, the manifest and the ramdisk's command line, and the records that
carry the plan to the writer (`Layout`, `Image`).

With `bootenv.single` the agent writes the classic one-piece image instead of the OS
sub-image, and the first-boot layout lays out nothing (see `plan_install`). The root
partition holds the image whole (`root_needs`); the first-boot layout is told where
the image is and which key to check it with (`layout_handoff`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bootenv import bootloader, handoff, target
from bootenv.blockmap import BlockMap
from bootenv.cmdline import AgentConfig
from bootenv.errors import UserError
from bootenv.manifest import Manifest, OsImage, resolve_components
from bootenv.oswrite import Which
from bootenv.partition import PartitionPlan
from bootenv.source import Source


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
