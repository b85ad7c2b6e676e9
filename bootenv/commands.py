"""The verbs' handlers: each turns parsed arguments into a call and prints the result.

Heavy modules are imported inside the handlers, so `bootenv --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from bootenv.errors import UserError
from bootenv.log import human_bytes, printable, setup_logging
from bootenv.render import json_text, summary_rows, table
from bootenv.smallfile import read_small

if TYPE_CHECKING:
    from bootenv.layout import LayoutResult
    from bootenv.signing import Trust

log = logging.getLogger(__name__)


def add_trust_options(p: argparse.ArgumentParser) -> None:
    """--trust / --fingerprint / --insecure, shared by every verb that reads an image."""
    p.add_argument("--trust", action="append", default=[], type=Path, metavar="KEY.pub")
    p.add_argument("--fingerprint", action="append", default=[], metavar="sha256:HEX")
    p.add_argument("--insecure", action="store_true", help="accept unsigned images (loudly)")


def trust_from_args(args: argparse.Namespace) -> Trust:
    from bootenv.signing import Trust, parse_fingerprint, read_public_key

    return Trust(
        keys=tuple(read_public_key(p) for p in args.trust),
        fingerprints=tuple(parse_fingerprint(f) for f in args.fingerprint),
        insecure=args.insecure,
    )


def cmd_capture(args: argparse.Namespace) -> int:
    from bootenv.capture import CaptureConfig, capture
    from bootenv.split import parse_component_arg

    cfg = CaptureConfig(
        root=args.root,
        output=args.output,
        components=tuple(parse_component_arg(a) for a in args.component),
        auto=args.auto,
        excludes=tuple(args.exclude),
        force=args.force,
        single=args.single,
        stop_services=tuple(args.stop),
        level=args.level,
        scratch=args.scratch,
    )
    result = capture(cfg)
    if args.json:
        print(result.manifest.to_json(), end="")
    else:
        print(table(summary_rows(result.manifest)))
        print(f"{result.excluded} paths excluded on purpose; image written to {args.output}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from bootenv.signing import keygen

    fp = keygen(args.output)
    print(f"wrote {args.output} and {args.output}.pub; fingerprint {fp}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from bootenv.manifest import MANIFEST, parse_manifest
    from bootenv.signing import write_signature
    from bootenv.source import read_manifest_file

    manifest = args.image / MANIFEST
    try:
        raw = read_manifest_file(manifest)
    except OSError as exc:
        raise UserError(f"cannot read {manifest}: {exc.strerror}") from exc
    parse_manifest(raw)
    write_signature(args.image, raw, args.key)
    print(f"signed {manifest}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bootenv.trusted import open_signed, verify_blob

    source, manifest, signer = open_signed(args.image, trust_from_args(args))
    if not args.manifest_only:
        for blob in manifest.blobs():
            verify_blob(source, blob)
    blobs = f"{len(manifest.blobs())} blobs match the manifest"
    if signer is None:  # --insecure let it through: say what was not checked
        done = "" if args.manifest_only else f"; {blobs}"
        print(f"{args.image}: manifest NOT verified (--insecure){done}")
    else:
        what = "manifest" if args.manifest_only else f"manifest and {len(manifest.blobs())} blobs"
        print(f"{args.image}: {what} verified (key {signer})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from bootenv.source import load_manifest

    manifest = load_manifest(args.image)
    if args.json:
        print(manifest.to_json(), end="")
        return 0
    # The source's fields are the captured machine's free text: shown escaped, as are
    # package and unit names, so no newline or terminal escape reaches the screen (the
    # parser has checked the names, and that rootfs.type is ext4).
    s = manifest.source
    host, os_name, arch, kernel = (
        printable(t) for t in (s.hostname or "?", s.os_release, s.architecture, s.kernel)
    )
    print(f"image of {host}: {os_name}, {arch}, kernel {kernel}")
    print(f"captured {printable(s.captured_at)}")
    print(f"root filesystem: {manifest.rootfs.type}, at least {human_bytes(manifest.rootfs.min_size)}")
    print(table(summary_rows(manifest)))
    for c in manifest.components:
        print(f"{c.name}: {printable(' '.join(c.packages))}")
        if c.units:
            print(f"{' ' * len(c.name)}  units: {printable(' '.join(c.units))}")
    return 0


def cmd_write_os(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from bootenv.oswrite import write_os_path

    result = write_os_path(
        args.image, args.device, which="single" if args.single else "os", trust=trust_from_args(args)
    )
    if args.json:
        print(json_text({**asdict(result), "throughput": round(result.throughput)}))
    else:
        print(result.summary())
    return 0


def cmd_layout(args: argparse.Namespace) -> int:
    from bootenv.layout import LayoutConfig, layout, parse_components
    from bootenv.urls import split_http_url

    if args.callback and split_http_url(args.callback) is None:
        raise UserError(f"--callback {args.callback} is not an http(s) URL")
    cfg = LayoutConfig(
        image=args.image,
        components=parse_components(args.components),
        root=args.root,
        streams=args.streams,
        callback=args.callback,
        trust=trust_from_args(args),
        force=args.force,
        retries=args.retries,
        deadline=args.deadline,
    )
    result = layout(cfg)
    if args.json:
        print(json_text(result.to_dict()))
        return _layout_outcome(result)
    if result.added:
        print(f"added as dependencies: {', '.join(result.added)}")
    rows = [["component", "status", "files", "bytes", "identical", "merged", "conflicts", "seconds"]]
    for c in result.components:
        rows.append(
            [
                c.name,
                c.status,
                str(c.files),
                human_bytes(c.bytes),
                str(c.identical),
                str(len(c.merged)),
                str(len(c.conflicts)),
                f"{c.seconds:.1f}",
            ]
        )
    print(table(rows) if result.components else "no components to lay out")
    for c in result.components:
        if c.error:
            print(f"{c.name}: FAILED: {c.error}")
        for w in c.warnings:
            print(f"{c.name}: warning: {w}")
    if any(c.conflicts for c in result.components):
        print(f"conflicts kept both versions: see `bootenv conflicts list --root {args.root}`")
    for note in result.notes:
        print(f"activation: {note}")
    return _layout_outcome(result)


def _layout_outcome(result: LayoutResult) -> int:
    """0, or the failure as the CLI's one-line error (its exit code says what kind)."""
    failure = result.failure()
    if failure is not None:
        raise failure
    return 0


def cmd_conflicts(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from bootenv import conflicts, resolution

    root = args.root.absolute()
    if not root.is_dir():
        raise UserError(f"{args.root} is not a directory")
    if args.action == "list":
        found = conflicts.load_all(root)
        stopped = conflicts.stopped(root, found)
        if args.json:
            print(json_text([{**asdict(c), "stopped": stopped.get(c.id)} for c in found]))
        elif not found:
            print("no conflicts")
        else:
            rows = [["id", "component", "path", "reason", "resolution"]]
            for c in found:
                res = (c.resolution or {}).get("keep", _open(stopped.get(c.id)))
                # A path is an archive member's name: any byte but NUL and "/" may be in it.
                rows.append([c.id, c.component, printable("/" + c.path), printable(c.reason), str(res)])
            print(table(rows))
        return 0
    if not args.id:
        raise UserError(f"conflicts {args.action} needs an ID", hint="see `bootenv conflicts list`")
    if args.action == "show":
        c = conflicts.load(root, args.id)
        asked = conflicts.stopped(root, [c]).get(c.id)
        if args.json:
            print(json_text({**asdict(c), "stopped": asked, "diff": conflicts.diff(root, c)}))
            return 0
        path, reason = printable("/" + c.path), printable(c.reason)
        print(f"conflict {c.id}: {path} from component {c.component} ({reason})")
        if asked:
            print(f"a resolve {printable(asked)} was stopped before it ended: run it again to finish it")
        print(f"existing: {json_text(c.existing)}")
        print(f"incoming (kept in {printable('/' + c.stored)}): {json_text(c.incoming)}")
        print(conflicts.diff(root, c) or "(no text diff)", end="")
        if c.resolution:
            print(f"\nresolved: {_resolution(c.resolution)}")
        return 0
    if args.keep is None and args.file is None:
        raise UserError("resolve needs --keep existing|incoming|merged or --file F")
    if args.file is not None and not args.file.is_file():
        raise UserError(f"--file {args.file}: no such file")
    done = resolution.resolve(root, args.id, args.keep, args.file)
    res = done.resolution or {}
    print(json_text(asdict(done)) if args.json else f"conflict {done.id} resolved: {_resolution(res)}")
    return 0


def _open(stopped: str | None) -> str:
    """An open conflict's state: `open`, or `open (resolve --keep merged stopped: run it again)`."""
    return "open" if stopped is None else f"open (resolve {printable(stopped)} stopped: run it again)"


def _resolution(res: dict[str, object]) -> str:
    """`kept incoming at 2026-11-27T03:20:00Z`, or `kept the content of F at ...`."""
    if res.get("keep") == "superseded":  # conflicts.retire's
        return f"superseded at {res.get('at', '?')}: a later layout of the component found no conflict there"
    what = f"the content of {res['file']}" if res.get("file") else str(res.get("keep"))
    return f"kept {what} at {res.get('at', '?')}"


# The kernel's command line is at most a few KiB (COMMAND_LINE_SIZE), bootconfig's
# additions at most 32 KiB: --cmdline /dev/zero, or a disk image given by mistake, is refused.
CMDLINE_MAX = 64 << 10


def cmd_agent(args: argparse.Namespace) -> int:
    from bootenv.agent import finish, run_agent
    from bootenv.agent_report import report_bad_settings
    from bootenv.cmdline import FLAGS, KEYS, CmdlineError, callback_of, parse_cmdline

    # The kernel passes its command line on as bytes, UTF-8 or not: a byte that does not
    # decode survives as a surrogate, which the parser refuses in any value the agent
    # uses, and other parameters are none of its business.
    text = read_small(args.cmdline, CMDLINE_MAX, "the kernel command line").decode("utf-8", "surrogateescape")
    overrides: dict[str, str | None] = {
        k: getattr(args, k) for k in KEYS if k not in FLAGS and getattr(args, k, None)
    }
    if args.insecure:
        overrides["insecure"] = "1"
    if args.single:
        overrides["single"] = "1"
    try:
        cfg = parse_cmdline(text, overrides)
    except CmdlineError as exc:
        report_bad_settings(callback_of(text, overrides), exc)
        raise
    if cfg.debug and not args.debug:
        setup_logging(debug=True)
        args.debug = True  # and cli.main shows the traceback of a failure, as --debug does
    result = run_agent(cfg, ramdisk_cmdline=text)
    print(f"provisioned {result.disk} as {result.identity.hostname} (root UUID {result.identity.root_uuid})")
    finish(cfg, result)
    return 0


def cmd_build_ramdisk(args: argparse.Namespace) -> int:
    from bootenv.ramdisk import SIZE_LIMIT, build_ramdisk

    check_output_dir(args.output, "-o")  # before the build, which takes minutes
    rd = build_ramdisk(output=args.output, trusted=args.trust)
    note = "cached" if rd.cached else "built"
    print(f"{rd.vmlinuz}  kernel {rd.kernel_version} ({human_bytes(rd.vmlinuz.stat().st_size)})")
    build = f", build {rd.build}" if rd.build else ""  # its dir in -o, which serve's scripts name
    print(f"{rd.initramfs}  {human_bytes(rd.size)} zstd cpio ({note}, key {rd.key}{build})")
    if rd.size > SIZE_LIMIT:
        print(f"warning: the initramfs is over the {human_bytes(SIZE_LIMIT)} target", file=sys.stderr)
    return 0


def check_output_dir(path: Path, option: str) -> None:
    """An output directory that is one, or can be made: its nearest existing ancestor
    (itself, if it exists) is a directory this user may write in. Refused up front, not
    once the work is done."""
    for where in (path, *path.absolute().parents):
        if where.exists() or where.is_symlink():
            if not where.is_dir():
                raise UserError(f"{option} {path}: {where} is not a directory")
            if not os.access(where, os.W_OK | os.X_OK):
                raise UserError(f"{option} {path}: cannot write in {where}")
            return


def cmd_serve(args: argparse.Namespace) -> int:
    from bootenv.serve import ServeConfig, check_public_url, make_server, parse_listen
    from bootenv.state import default_state_dir

    host, port = parse_listen(args.listen)
    config = ServeConfig(
        images=args.images,
        state=args.state or default_state_dir(),
        host=host,
        port=port,
        boot=args.boot,
        catalog=args.catalog,
        public_url=check_public_url(args.public_url) if args.public_url else None,
    )
    server = make_server(config)
    print(f"serving {args.images} on http://{host}:{server.port}/", flush=True)
    print(f"iPXE clients: chain {server.base_url}/ipxe/boot.ipxe; state in {config.state}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    import time

    from bootenv.machines import assign
    from bootenv.state import Store, default_state_dir

    machine = assign(
        args.mac,
        args.image,
        args.components,
        now=time.time(),
        hostname=args.hostname,
        kernel_args=args.kernel_args,
    )
    store = Store(args.state or default_state_dir())
    previous = store.get(machine.mac)
    note = {"received": time.time(), "event": "assigned", "image": machine.image}
    if previous is not None:
        note["previous_state"] = previous.state.value
    store.put(machine, note=note)
    print(f"{machine.mac}: {machine.image} ({machine.components}) installs on its next network boot")
    return 0


def cmd_machines(args: argparse.Namespace) -> int:
    from bootenv.machine_record import to_dict
    from bootenv.state import Damaged, Store, default_state_dir, timeline_rows

    state = args.state or default_state_dir()
    store = Store(state, readonly=True)  # a read: nothing is made, not even a lock file
    if not store.is_state_dir():  # serve and assign make machines/ in it
        why = "it has no machines/" if state.is_dir() else "no such directory"
        raise UserError(
            f"{state} is not a state directory ({why})",
            hint="see --state, and `bootenv assign`",
        )
    entries = store.scan()
    machines = [e for e in entries if not isinstance(e, Damaged)]
    damaged = [e for e in entries if isinstance(e, Damaged)]
    for d in damaged:  # each one line, naming the machine and its file; the others listed
        log.warning("%s", d.error)
    if args.json:
        listed = [{**to_dict(m), "log": store.events(m.mac)} for m in machines]
        print(json_text(listed + [{"mac": d.name, "damaged": d.error.message} for d in damaged]))
    elif machines:
        print(table(timeline_rows(machines)))
        for m in machines:
            if m.error or m.invalid:
                print(f"{m.mac}: {m.error or ''}{f' ({m.invalid} invalid transitions)' if m.invalid else ''}")
    elif not damaged:
        print("no machines yet (bootenv assign MAC IMAGE --components ...)")
    # A record that does not read is the admin's to restore or remove: a script that
    # checks the exit code must not take the listing for the whole fleet.
    return UserError.exit_code if damaged else 0
