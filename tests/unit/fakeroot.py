"""A small synthetic gold machine: a tree plus a hand-written dpkg database.

Packages (priority in brackets):
  libc6, base-files, dpkg [required]   the base OS
  curl [optional] -> libcurl           not claimed by a component: stays in the OS
  httpd -> httpd-bin -> libapr, libcurl, libxml     component "web"
  dbserver -> libdb, libxml            component "db"; its postinst names /var/lib/dbdata
  modphp -> httpd-bin, recommends httpd   component "php" (depends on web)
/lib is a symlink to usr/lib (merged /usr), as on Debian 12.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PACKAGES: dict[str, dict[str, str]] = {
    "libc6": {"Priority": "required", "Multi-Arch": "same", "Architecture": "amd64"},
    "base-files": {"Priority": "required"},
    "dpkg": {"Priority": "required", "Depends": "libc6 (>= 2.36)"},
    "curl": {"Priority": "optional", "Depends": "libcurl (>= 7)"},
    "libcurl": {"Priority": "optional", "Depends": "libc6"},
    "libapr": {"Priority": "optional"},
    "libxml": {"Priority": "optional"},
    "libdb": {"Priority": "optional"},
    "httpd-bin": {"Priority": "optional", "Depends": "libapr, libcurl, libxml"},
    "httpd": {"Priority": "optional", "Depends": "httpd-bin (= 1.0), init-system-helpers | sysvinit"},
    "dbserver": {"Priority": "optional", "Depends": "libdb, libxml | libxml-legacy"},
    "modphp": {"Priority": "optional", "Depends": "httpd-api-2", "Recommends": "httpd"},
    "phpcli": {"Priority": "optional", "Depends": "libxml"},
    "cyc-a": {"Priority": "optional", "Depends": "cyc-b"},
    "cyc-b": {"Priority": "optional", "Depends": "cyc-a"},
    "gone": {"Priority": "optional", "Status": "deinstall ok config-files"},
}
PROVIDES = {"httpd-bin": "httpd-api-2"}

FILES: dict[str, list[str]] = {
    "base-files": ["/etc", "/usr", "/usr/bin", "/usr/lib", "/usr/sbin", "/var", "/var/lib", "/var/log"],
    "libc6": ["/usr/lib/libc.so.6"],
    "dpkg": ["/var/lib/dpkg", "/usr/bin/dpkg"],
    "curl": ["/usr/bin/curl"],
    "libcurl": ["/usr/lib/libcurl.so"],
    "libapr": ["/usr/lib/libapr.so"],
    "libxml": ["/usr/lib/libxml.so"],
    "libdb": ["/usr/lib/libdb.so"],
    "httpd-bin": ["/usr/sbin/httpd"],
    "httpd": [
        "/etc/httpd",
        "/etc/httpd/httpd.conf",
        "/lib/systemd/system/httpd.service",
        "/var/log/httpd",
    ],
    "dbserver": ["/usr/sbin/dbd", "/lib/systemd/system/dbd.service", "/etc/shared.conf"],
    "modphp": ["/usr/lib/httpd/mod_php.so", "/etc/httpd/mods/php.load", "/usr/bin/php8"],
    "phpcli": [],
    "cyc-a": [],
    "cyc-b": [],
}

DIRS = {p for p in FILES["base-files"]} | {"/var/lib/dpkg", "/etc/httpd", "/var/log/httpd"}

CONTENT: dict[str, bytes] = {
    "/etc/httpd/httpd.conf": b"Listen 80\n",
    "/etc/shared.conf": b"shared=1\n",
}


def stanza(name: str, fields: dict[str, str]) -> str:
    lines = [f"Package: {name}"]
    lines.append(f"Status: {fields.get('Status', 'install ok installed')}")
    for key in ("Priority", "Multi-Arch", "Depends", "Recommends"):
        if key in fields:
            lines.append(f"{key}: {fields[key]}")
    if name in PROVIDES:
        lines.append(f"Provides: {PROVIDES[name]}")
    lines.append(f"Architecture: {fields.get('Architecture', 'all')}")
    lines.append("Version: 1.0")
    lines.append("Description: test package\n a multi-line description")
    return "\n".join(lines)


def info_prefix(name: str) -> str:
    fields = PACKAGES[name]
    return f"{name}:{fields['Architecture']}" if fields.get("Multi-Arch") == "same" else name


def make_tree(root: Path, *, with_socket: bool = False) -> Path:
    """Create the synthetic gold tree at `root` and return it."""
    for d in (
        "etc",
        "usr/bin",
        "usr/sbin",
        "usr/lib/systemd/system",
        "usr/lib/httpd",
        "var/lib/dpkg/info",
        "var/lib/dpkg/alternatives",
        "var/log/httpd",
        "etc/httpd/mods",
        "etc/httpd/sites",
        "etc/systemd/system/multi-user.target.wants",
        "etc/alternatives",
        "proc/1",
        "tmp",
        "var/lib/dbdata",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.symlink("usr/lib", root / "lib")
    status = [stanza(n, f) for n, f in PACKAGES.items()]
    (root / "var/lib/dpkg/status").write_text("\n\n".join(status) + "\n")
    for name, paths in FILES.items():
        prefix = info_prefix(name)
        (root / f"var/lib/dpkg/info/{prefix}.list").write_text("/.\n" + "".join(p + "\n" for p in paths))
        (root / f"var/lib/dpkg/info/{prefix}.md5sums").write_text("")
        for p in paths:
            real = root / p.lstrip("/")
            if p in DIRS:
                real.mkdir(parents=True, exist_ok=True)
            else:
                real.parent.mkdir(parents=True, exist_ok=True)
                real.write_bytes(CONTENT.get(p, f"{name}:{p}\n".encode()))
    (root / "var/lib/dpkg/info/dbserver.postinst").write_text(
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/dbdata\nchown 999 /var/lib/dbdata\ntouch /etc/passwd\n"
    )
    (root / "var/lib/dbdata/ibdata1").write_bytes(b"\0" * 4096 + b"data")
    (root / "etc/httpd/sites/local.conf").write_text("# added by the admin\n")
    (root / "etc/admin-notes.txt").write_text("unowned, not under any component\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/log/httpd/access.log").write_text("GET /\n")
    (root / "var/log/syslog").write_text("log\n")
    (root / "proc/1/status").write_text("runtime\n")
    (root / "etc/hostname").write_text("fakegold\n")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nmysql:x:999:998::/nonexistent:/bin/false\n"
    )
    os.symlink(
        "/lib/systemd/system/httpd.service", root / "etc/systemd/system/multi-user.target.wants/httpd.service"
    )
    os.symlink(
        "/lib/systemd/system/dbd.service", root / "etc/systemd/system/multi-user.target.wants/dbd.service"
    )
    os.symlink("/usr/bin/php8", root / "etc/alternatives/php")
    os.symlink("/etc/alternatives/php", root / "usr/bin/php")
    (root / "var/lib/dpkg/alternatives/php").write_text("auto\n/usr/bin/php\n\n/usr/bin/php8\n50\n\n")
    os.symlink("../mods/php.load", root / "etc/httpd/sites/php.load")
    os.mkfifo(root / "etc/control.fifo")
    odd = os.fsencode(str(root / "etc")) + b"/odd \xff name\nx"
    with open(odd, "wb") as f:
        f.write(b"odd bytes\n")
    os.link(root / "usr/bin/curl", root / "usr/bin/curl-hardlink")
    if with_socket:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(root / "tmp/../etc/agent.sock"))
        s.close()
    return root
