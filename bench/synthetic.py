"""A large synthetic gold tree (~3 GB, ~40 000 files) with a fake but valid dpkg database.

Issue #6 asks for every benchmark figure on the LAMP gold image *and* on a larger one.
This builds that larger one deterministically (seeded PRNG) and captures it with three
components of different shapes:

  os   ~0.8 GB, ~16k files  required/important/standard packages (kernel modules, firmware,
                            locales, docs) plus an optional package no component claims
  db   ~1.2 GB, ~5k files   a server binary, plugins, many small files, and a data directory
                            of large files its postinst names (split rule 4)
  web  ~0.5 GB, ~12k files  many small files (htdocs), owned by www-data
  app  ~0.4 GB, ~4k files   a few large archives and many small static files

web and app both depend on `libsynthshared` and both own `/etc/synth/common.conf`: the
shared library and the doubly owned config go to the OS (split rules 3 and 5), while each
component carries `/etc/synth` (mode 0750, group adm) for its own config file, so two
streams meet on the same directory. Content is partly compressible (zstd -3 gets about
2.6x): slices of a pool that mixes random blocks with word text.

Plan, then apply: `plan()` is pure and cheap at full size; `build()` writes a plan;
`synthetic_tree()` and `synthetic_image()` cache both under cache_root()/bench/.
`synthetic_os()` is the memory benchmark's input: an OS sub-image of a given size.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import string
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from bootenv.blockmap import pack_image
from bootenv.cache import cache_root, input_key, locked, prune
from bootenv.frames import compress_tar
from bootenv.manifest import Component, Manifest, OsImage, RootFs, Source
from bootenv.store import BlobWriter, write_blob

VERSION = 2  # bump whenever the generator's output changes
MTIME = 1_700_000_000  # every file's mtime: a fixed date, so the tree is reproducible
POOL = 16 << 20
PIECE = 16 << 10
RANDOM_SHARE = 0.28  # of the pool's pieces: the rest is word text, so zstd -3 gets ~2.6x
MB = 1 << 20


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 6
    scale: float = 1.0  # 1.0: ~3 GB and ~40 000 files; tests use ~0.001


@dataclass(frozen=True)
class Node:
    """One entry of the tree; parents come before children in a plan."""

    path: str  # absolute: "/usr/bin/dpkg"
    kind: str  # "dir", "file", "symlink" or "hardlink"
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""  # a symlink's target, or the path a hard link shares its inode with
    offset: int = 0  # where the content starts in the pool
    text: str | None = None  # literal content (config files)


@dataclass(frozen=True)
class Package:
    name: str
    priority: str
    image: str  # the sub-image the split should put it in: "os" or a component
    depends: str = ""
    arch: str = "all"
    multi_arch: str = ""
    owns: tuple[str, ...] = ()  # what its .list names: directories, files, links
    postinst: str = ""


@dataclass(frozen=True)
class Plan:
    packages: tuple[Package, ...]
    nodes: tuple[Node, ...]
    components: tuple[str, ...]  # `--component` arguments for capture

    @property
    def files(self) -> int:
        return sum(1 for n in self.nodes if n.kind != "dir")

    @property
    def bytes(self) -> int:
        return sum(n.size for n in self.nodes if n.kind == "file")


COMPONENTS = ("db=synthdb-server", "web=synthweb", "app=synthapp")


@dataclass
class _Builder:
    """Accumulates nodes and package ownership while planning."""

    rng: random.Random
    scale: float
    nodes: dict[str, Node] = field(default_factory=dict)
    owns: dict[str, list[str]] = field(default_factory=dict)

    def dir(self, path: str, pkg: str | None = None, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        parent = path.rsplit("/", 1)[0]
        if parent and parent not in self.nodes:
            self.dir(parent)
        if path not in self.nodes or (mode, uid, gid) != (0o755, 0, 0):
            self.nodes[path] = Node(path, "dir", mode=mode, uid=uid, gid=gid)
        if pkg is not None:
            self.owns.setdefault(pkg, []).append(path)

    def add(self, node: Node, pkg: str | None) -> None:
        parent = node.path.rsplit("/", 1)[0]
        if parent and parent not in self.nodes:
            self.dir(parent)
        self.nodes[node.path] = node
        if pkg is not None:
            self.owns.setdefault(pkg, []).append(node.path)

    def text(self, path: str, pkg: str | None, lines: int = 40) -> None:
        words = [f"{self._word()} = {self._word()}" for _ in range(lines)]
        self.add(Node(path, "file", text=f"# {path}\n" + "\n".join(words) + "\n"), pkg)

    def link(self, path: str, target: str, pkg: str | None) -> None:
        self.add(Node(path, "symlink", target=target), pkg)

    def group(
        self,
        pkg: str | None,
        where: str,
        count: int,
        total: int,
        *,
        ext: str = ".dat",
        sigma: float = 1.2,
        subdirs: int = 1,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        """`count` files of lognormal sizes summing to about `total` bytes, in `subdirs` dirs."""
        count = max(1, round(count * self.scale))
        subdirs = max(1, min(subdirs, count // 4 or 1))
        weights = [self.rng.lognormvariate(0, sigma) for _ in range(count)]
        unit = total * self.scale / sum(weights)
        dirs = [where] if subdirs == 1 else [f"{where}/{self._word()}{i}" for i in range(subdirs)]
        for d in dirs:
            self.dir(d, pkg, uid=uid, gid=gid)
        for i, w in enumerate(weights):
            path = f"{dirs[i % subdirs]}/{self._word()}-{i}{ext}"
            size = 0 if self.rng.random() < 0.01 else int(w * unit)
            self.add(Node(path, "file", size, mode, uid, gid, offset=self.rng.randrange(POOL)), pkg)
            if self.rng.random() < 0.03:  # an alias, as libraries and alternatives have
                self.link(f"{path}.1", path.rsplit("/", 1)[1], pkg)

    def big(
        self, pkg: str | None, path: str, size: int, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> None:
        node = Node(path, "file", int(size * self.scale), mode, uid, gid, offset=self.rng.randrange(POOL))
        self.add(node, pkg)

    def _word(self) -> str:
        return "".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(3, 9)))


def plan(spec: SyntheticSpec) -> Plan:
    """The whole tree and its dpkg database, without touching the disk."""
    b = _Builder(random.Random(spec.seed), spec.scale)
    for top in ("bin", "lib", "lib64", "sbin"):
        b.link(f"/{top}", f"usr/{top}", None)  # merged /usr, as on Debian 12
    for d in ("/etc", "/usr/bin", "/usr/sbin", "/usr/lib", "/usr/lib64", "/usr/share", "/var/lib", "/opt"):
        b.dir(d, "base-files")
    b.dir("/var/log", "base-files")
    b.dir("/var/lib/dpkg/info", "dpkg")
    b.dir("/tmp", None, mode=0o1777)
    b.add(
        Node("/etc/os-release", "file", text='PRETTY_NAME="Synthetic gold (bench)"\nID=synthetic\n'),
        "base-files",
    )
    b.add(Node("/etc/hostname", "file", text="synthgold\n"), None)
    b.add(Node("/etc/machine-id", "file", text="0" * 32 + "\n"), None)  # excluded by capture
    b.add(Node("/etc/passwd", "file", text=_PASSWD), None)
    b.add(Node("/etc/group", "file", text=_GROUP), None)
    for part in (_os, _db, _web, _app):
        part(b)
    b.text("/etc/synth/common.conf", "synthweb")  # owned by web and app: goes to the OS
    b.owns.setdefault("synthapp", []).append("/etc/synth/common.conf")
    return Plan(tuple(_packages(b.owns)), tuple(b.nodes.values()), COMPONENTS)


def _os(b: _Builder) -> None:
    """~0.8 GB, ~16k files: required/important/standard packages and one no component needs."""
    b.group("libc6", "/usr/lib/x86_64-linux-gnu/gconv", 300, 30 * MB, ext=".gconv")
    b.big("dpkg", "/usr/bin/dpkg", 300_000, mode=0o755)
    b.group("coreutils", "/usr/bin", 300, 20 * MB, mode=0o755, ext="")
    b.big("coreutils", "/usr/bin/su", 70_000, mode=0o4755)
    b.group("synth-kernel", "/usr/lib/modules/6.1.0-synth/kernel", 4000, 300 * MB, ext=".ko", subdirs=40)
    b.big("synth-kernel", "/boot/vmlinuz-6.1.0-synth", 8 * MB)
    b.group("synth-firmware", "/usr/lib/firmware", 500, 240 * MB, sigma=1.8, subdirs=20, ext=".fw")
    b.group("synth-locales", "/usr/share/locale", 6000, 60 * MB, ext=".mo", subdirs=120)
    b.group("synth-docs", "/usr/share/doc", 4000, 40 * MB, ext=".gz", subdirs=300)
    b.group("synth-python", "/usr/lib/python3/dist-packages", 900, 90 * MB, ext=".py", subdirs=60)
    b.group("synth-tools", "/usr/lib/synth-tools", 200, 20 * MB)
    b.big("synth-tools", "/usr/bin/synth-tool", 2 * MB, mode=0o755)
    b.add(Node("/usr/bin/synth-tool-alias", "hardlink", target="/usr/bin/synth-tool"), "synth-tools")
    b.group("libsynthshared", "/usr/lib/synthshared", 20, 4 * MB)
    b.dir("/etc/synth", "libsynthshared", mode=0o750, gid=4)


def _db(b: _Builder) -> None:
    """~1.2 GB, ~5k files: a data directory of large files, unowned but named by postinst."""
    b.big("synthdb-server", "/usr/sbin/synthdbd", 60 * MB, mode=0o755)
    b.group("synthdb-server", "/usr/lib/synthdb/plugin", 150, 80 * MB, ext=".plugin")
    b.group("synthdb-common", "/usr/share/synthdb", 2000, 30 * MB, subdirs=40, ext=".txt")
    b.group("libsynthdb", "/usr/lib/synthdb/private", 10, 10 * MB, ext=".lib")
    b.big("synthdb-client", "/usr/bin/synthdb", 12 * MB, mode=0o755)
    b.add(Node("/usr/bin/synthdb-admin", "hardlink", target="/usr/bin/synthdb"), "synthdb-client")
    b.dir("/etc/synthdb", "synthdb-common")
    b.text("/etc/synthdb/synthdb.cnf", "synthdb-common", 200)
    b.text("/usr/lib/systemd/system/synthdb.service", "synthdb-server", 8)
    b.link(
        "/etc/systemd/system/multi-user.target.wants/synthdb.service",
        "/lib/systemd/system/synthdb.service",
        None,
    )
    b.dir("/var/lib/synthdb", None, mode=0o700, uid=999, gid=998)
    for i, size in enumerate((400 * MB, 200 * MB, 100 * MB)):
        b.big(
            None, f"/var/lib/synthdb/ib{'data' if i == 0 else 'log'}{i}", size, mode=0o660, uid=999, gid=998
        )
    b.group(None, "/var/lib/synthdb/shop", 3000, 300 * MB, ext=".ibd", mode=0o660, uid=999, gid=998)
    b.dir("/var/log/synthdb", "synthdb-server", mode=0o2750, uid=999, gid=4)
    b.add(Node("/var/log/synthdb/error.log", "file", text="started\n"), None)  # excluded: a log


def _web(b: _Builder) -> None:
    """~0.5 GB, ~12k small files; /var/www/html is unowned, named by postinst, www-data's."""
    b.big("synthweb-bin", "/usr/sbin/synthwebd", 4 * MB, mode=0o755)
    b.group("synthweb-bin", "/usr/lib/synthweb/modules", 120, 30 * MB, ext=".mod")
    b.group(
        "synthweb-data", "/usr/share/synthweb/htdocs", 11000, 420 * MB, sigma=1.0, subdirs=200, ext=".html"
    )
    b.group(None, "/var/www/html", 800, 40 * MB, ext=".php", uid=33, gid=33)
    b.dir("/etc/synthweb/sites-available", "synthweb")
    b.dir("/etc/synthweb/sites-enabled", "synthweb")
    b.text("/etc/synthweb/synthweb.conf", "synthweb", 100)
    for site in ("default", "shop", "blog"):
        b.text(f"/etc/synthweb/sites-available/{site}.conf", "synthweb", 20)
        b.link(f"/etc/synthweb/sites-enabled/{site}.conf", f"../sites-available/{site}.conf", None)
    b.text("/etc/synth/web.conf", "synthweb")
    b.text("/usr/lib/systemd/system/synthweb.service", "synthweb", 8)
    b.link(
        "/etc/systemd/system/multi-user.target.wants/synthweb.service",
        "/lib/systemd/system/synthweb.service",
        None,
    )


def _app(b: _Builder) -> None:
    """~0.4 GB: a few large archives and ~4k small static files."""
    b.group("synthapp-lib", "/opt/synthapp/lib", 150, 300 * MB, sigma=1.5, ext=".jar")
    b.group("synthapp", "/opt/synthapp/static", 4000, 100 * MB, subdirs=80, ext=".js")
    b.text("/etc/synth/app.conf", "synthapp")
    b.dir("/opt/synthapp/var", "synthapp", mode=0o770, uid=1001, gid=1001)


_PASSWD = (
    "root:x:0:0:root:/root:/bin/bash\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"
    "synthdb:x:999:998::/var/lib/synthdb:/usr/sbin/nologin\nsynthapp:x:1001:1001::/opt/synthapp:/bin/false\n"
)
_GROUP = "root:x:0:\nadm:x:4:\nwww-data:x:33:\nsynthdb:x:998:\nsynthapp:x:1001:\n"

# name: (priority, image, Depends, postinst)
_PACKAGES: dict[str, tuple[str, str, str, str]] = {
    "base-files": ("required", "os", "", ""),
    "libc6": ("required", "os", "", ""),
    "dpkg": ("required", "os", "libc6 (>= 2.36)", ""),
    "coreutils": ("required", "os", "libc6", ""),
    "synth-kernel": ("important", "os", "", ""),
    "synth-python": ("important", "os", "libc6", ""),
    "synth-firmware": ("standard", "os", "", ""),
    "synth-locales": ("standard", "os", "", ""),
    "synth-docs": ("standard", "os", "", ""),
    "synth-tools": ("optional", "os", "libc6", ""),  # no component needs it: stays in the OS
    "libsynthshared": ("optional", "os", "libc6", ""),  # needed by web and app: goes to the OS
    "libsynthdb": ("optional", "db", "libc6", ""),
    "synthdb-common": ("optional", "db", "", ""),
    "synthdb-client": ("optional", "db", "libsynthdb, libc6", ""),
    "synthdb-server": (
        "optional",
        "db",
        "synthdb-client (= 1.0), synthdb-common, libsynthdb",
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/synthdb\nchown synthdb /var/lib/synthdb\n",
    ),
    "synthweb-bin": ("optional", "web", "libsynthshared", ""),
    "synthweb-data": ("optional", "web", "", ""),
    "synthweb": (
        "optional",
        "web",
        "synthweb-bin, synthweb-data, libsynthshared",
        "#!/bin/sh\nset -e\nmkdir -p /var/www/html\nchown www-data /var/www/html\n",
    ),
    "synthapp-lib": ("optional", "app", "", ""),
    "synthapp": ("optional", "app", "synthapp-lib, libsynthshared | libsynthshared-legacy", ""),
}


def _packages(owns: dict[str, list[str]]) -> list[Package]:
    out = []
    for name, (priority, image, depends, postinst) in _PACKAGES.items():
        multi = "same" if name == "libc6" else ""
        arch = "amd64" if name in ("libc6", "dpkg", "coreutils") else "all"
        out.append(Package(name, priority, image, depends, arch, multi, tuple(owns.get(name, ())), postinst))
    return out


def status_text(packages: tuple[Package, ...]) -> str:
    """dpkg's status file for the plan's packages."""
    stanzas = []
    for p in packages:
        lines = [f"Package: {p.name}", "Status: install ok installed", f"Priority: {p.priority}"]
        lines += [f"Multi-Arch: {p.multi_arch}"] if p.multi_arch else []
        lines += [f"Architecture: {p.arch}", "Version: 1.0"]
        lines += [f"Depends: {p.depends}"] if p.depends else []
        lines.append(f"Description: synthetic package {p.name}\n generated by bench/synthetic.py")
        stanzas.append("\n".join(lines) + "\n")
    return "\n".join(stanzas)


def make_pool(seed: int) -> bytes:
    """POOL bytes: pieces of random bytes and of word text, in a seeded order."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(600)]
    words = rng.choices(vocab, k=250_000)
    text = "\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)).encode()
    pieces = []
    for _ in range(POOL // PIECE):
        if rng.random() < RANDOM_SHARE:
            pieces.append(rng.randbytes(PIECE))
        else:
            at = rng.randrange(len(text) - PIECE)
            pieces.append(text[at : at + PIECE])
    return b"".join(pieces)


def build(p: Plan, dest: Path, seed: int) -> None:
    """Write the plan's tree and dpkg database at `dest` (which must not exist)."""
    pool = memoryview(make_pool(seed) * 2)  # doubled: a slice may start anywhere in the first copy
    dest.mkdir(parents=True)
    root = str(dest)
    for n in p.nodes:
        path = root + n.path
        if n.kind == "dir":
            os.makedirs(path, exist_ok=True)
        elif n.kind == "symlink":
            os.symlink(n.target, path)
        elif n.kind == "hardlink":
            os.link(root + n.target, path)
            continue
        else:
            with open(path, "wb") as f:
                if n.text is not None:
                    f.write(n.text.encode())
                else:
                    _fill(f.write, pool, n.offset, n.size)
        if n.kind != "symlink":
            os.chown(path, n.uid, n.gid)
            os.chmod(path, n.mode)
    info = dest / "var/lib/dpkg/info"
    for pkg in p.packages:
        prefix = f"{pkg.name}:{pkg.arch}" if pkg.multi_arch == "same" else pkg.name
        (info / f"{prefix}.list").write_text("/.\n" + "".join(f"{o}\n" for o in pkg.owns))
        if pkg.postinst:
            (info / f"{prefix}.postinst").write_text(pkg.postinst)
            os.chmod(info / f"{prefix}.postinst", 0o755)
    (dest / "var/lib/dpkg/status").write_text(status_text(p.packages))
    # mtimes last, deepest first, so creating children does not bump their parents'.
    for n in reversed(p.nodes):
        if n.kind != "hardlink":
            os.utime(root + n.path, (MTIME, MTIME), follow_symlinks=False)


def _fill(write: object, pool: memoryview, offset: int, size: int) -> None:
    done = piece = 0
    while done < size:
        n = min(4 << 20, size - done)
        at = (offset + piece * 0x9E3779B1) % POOL  # each 4 MiB piece starts elsewhere in the pool
        write(pool[at : at + n])  # type: ignore[operator]
        done += n
        piece += 1


def tree_key(spec: SyntheticSpec) -> str:
    return input_key({"v": VERSION, "seed": spec.seed, "scale": spec.scale})


def synthetic_tree(spec: SyntheticSpec | None = None, base: Path | None = None) -> Path:
    """The generated tree, built once per generator version and parameters (cached)."""
    spec = spec or SyntheticSpec()
    base = base or cache_root() / "bench"
    tree = base / f"synthetic-gold-{tree_key(spec)}"
    done = tree.with_name(tree.name + ".complete")
    with locked(f"bench-{tree.name}"):
        if done.exists() and tree.is_dir():
            return tree
        shutil.rmtree(tree, ignore_errors=True)
        for marker in base.glob("synthetic-gold-*.complete"):  # an older generator's tree: GBs
            if marker.read_text().strip() != str(VERSION):
                shutil.rmtree(marker.with_suffix(""), ignore_errors=True)
                marker.unlink()
        build(plan(spec), tree, spec.seed)
        done.write_text(f"{VERSION}\n")
    return tree


def synthetic_image(images: Path, spec: SyntheticSpec | None = None) -> str:
    """The synthetic tree captured (with --single) once per code version; the name under `images`."""
    from bootenv.capture import CaptureConfig, capture
    from bootenv.split import parse_component_arg
    from tests.conftest import code_key

    tree = synthetic_tree(spec)
    name = f"{tree.name}-{code_key()}"
    out = images / name
    with locked(f"bench-{name}"):
        if not (out / "manifest.json").exists():
            # Older captures are GBs each: keep the last one besides the new one.
            prune(images, f"{tree.name}-{'?' * len(code_key())}", keep=1)
            specs = tuple(parse_component_arg(c) for c in COMPONENTS)
            capture(CaptureConfig(root=tree, output=out, components=specs, single=True, force=True))
    return name


SYNTHETIC_OS_VERSION = 2  # bump whenever synthetic_os's output changes: its cache key


def synthetic_os(work: Path, data_bytes: int) -> Path:
    """For the memory benchmark: an image whose OS sub-image maps `data_bytes` (cached).

    Data and holes alternate, 1 MiB each, so half the image is mapped. The data is slices
    of the synthetic tree's pool (random pieces and word text, zstd -3 about 2.6x), so
    the compressed blob is a real fraction of what it maps and write-os's receive, hash
    and decompress path does the work a real OS image makes it do.
    """
    base = cache_root() / "bench"
    d = base / f"synthetic-os-{data_bytes >> 20}M-v{SYNTHETIC_OS_VERSION}"
    with locked(f"bench-synthetic-{data_bytes}"):
        if not (d / "manifest.json").exists():
            for old in base.glob(f"synthetic-os-{data_bytes >> 20}M*"):  # an older generator's
                if old != d:
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            img = work / "synthetic.img"
            size = data_bytes * 2
            pool = memoryview(make_pool(SyntheticSpec().seed) * 2)  # a slice may start anywhere in the first
            try:
                with open(img, "wb") as f:
                    f.truncate(size)
                    for i, off in enumerate(range(0, data_bytes, 1 << 20)):
                        f.seek(off * 2)  # data and holes alternate, 1 MiB each
                        at = (i * 0x9E3779B1) % POOL  # each block starts elsewhere in the pool
                        f.write(pool[at : at + min(1 << 20, data_bytes - off)])
                with BlobWriter(d, "img.zst") as out:
                    bmap = pack_image(img, out, block_size=4096)
                    data = out.finish(bmap.mapped)
            finally:
                img.unlink(missing_ok=True)
            bm = write_blob(d, "bmap.json", bmap.to_json().encode())
            m = Manifest(
                Source("synthetic", "none", "amd64", "", "now"),
                RootFs("ext4", size, size, 4096),
                OsImage(data, bm, (), 0),
                (),
            )
            (d / "manifest.json").write_text(m.to_json())
    return d


def synthetic_component(data_bytes: int) -> Path:
    """For the memory benchmark: an image with one component "big" whose archive holds
    `data_bytes` of file data in 16 MiB files, chunked as capture chunks it (cached)."""
    d = cache_root() / "bench" / f"synthetic-component-{data_bytes >> 20}M-v{SYNTHETIC_COMPONENT_VERSION}"
    with locked(f"bench-synthetic-component-{data_bytes}"):
        if (d / "manifest.json").exists():
            return d
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        size = 16 << 20
        r, w = os.pipe()
        writer = threading.Thread(target=_tar_of_files, args=(w, data_bytes // size, size))
        writer.start()
        with os.fdopen(r, "rb") as src, BlobWriter(d, "tar.zst") as out:
            raw, chunks = compress_tar(src, out, level=3)
            data = out.finish(raw)
        writer.join()
        files = data_bytes // size
        m = Manifest(
            Source("synthetic", "none", "amd64", "", "now"),
            RootFs("ext4", 1 << 20, 1 << 20, 4096),
            OsImage(write_blob(d, "img.zst", b""), write_blob(d, "bmap.json", b"{}"), (), 0),
            (Component("big", data, (), (), files + 2, (), chunks),),
        )
        (d / "manifest.json").write_text(m.to_json())
    return d


SYNTHETIC_COMPONENT_VERSION = 2


def _tar_of_files(fd: int, count: int, size: int) -> None:
    """Write a pax tar of ./big/fNNNN (`count` files of `size` bytes) to the pipe `fd`."""
    with os.fdopen(fd, "wb") as pipe, tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for name, kind in (("./", tarfile.DIRTYPE), ("./big", tarfile.DIRTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = kind, 0o755
            tf.addfile(ti)
        for i in range(count):
            ti = tarfile.TarInfo(f"./big/f{i:04d}")
            ti.size, ti.mode = size, 0o644
            # Incompressible: each chunk is as large on the wire as on disk, the worst
            # case for a stream that holds a chunk to verify it before placing its files.
            tf.addfile(ti, io.BytesIO(os.urandom(size)))
