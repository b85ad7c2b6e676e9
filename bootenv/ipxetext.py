"""What text may go into a line of an iPXE script.

iPXE expands `${...}` anywhere in a line, and its command splitter ends a command at a
word that is `;`, `||` or `&&`, and at a word that starts with `#` (the rest of the line
is a comment). A value that carries any of them changes what the script does: an
error message `disk gone ; chain http://elsewhere/x.ipxe` echoed into a failed
machine's script would chain that script on the machine's next boot. Any `$`, quotes
and backslashes are refused too, so that no expansion or quoting rule of any iPXE
version matters.

Values the admin gives (catalog titles, kernel arguments) are refused at the edge with
`problem`'s reason; free text from elsewhere (an agent's error message) is `scrub`bed.

Where a text stands in its line matters too, and `problem` cannot see that: iPXE's
option parser (src/core/getopt.c) reads the words after a command as options until the
first word that does not start with `-`, or a word `--` (taken as the end of options).
A text that may start with `-` and is a command's first argument (`menu`'s title) is
read as options (`menu --- rack 4 ---` fails, ending the script; `menu -d x` makes no
menu at all): put `--` before it. After the first argument (an `item`'s text follows
its label, kernel arguments the kernel's URL) a leading `-` is plain text.
"""

from __future__ import annotations

import re

from bootenv.urls import split_http_url

_TERMINATORS = frozenset({";", "||", "&&"})
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\"'\\]")
_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:/_+=@()\[\]<>%!?*~^'\"-]")


def problem(text: str) -> str | None:
    """Why `text` cannot go into an iPXE line as it is, or None if it can."""
    if "$" in text:  # `${` is what iPXE expands; no value bootenv writes needs a `$`
        return "holds $, which iPXE would expand as ${...}"
    if _BAD_CHARS.search(text):
        return "holds a control character, a quote or a backslash"
    for word in text.split():
        if word in _TERMINATORS:
            return f"holds the word {word!r}, which ends an iPXE command"
        if word.startswith("#"):
            return f"holds a word starting with '#' ({word!r}), which starts an iPXE comment"
    return None


def url_problem(url: str) -> str | None:
    """Why `url` cannot be an http(s) URL in an iPXE line and a kernel argument: what
    `problem` refuses, and anything but printable ASCII without spaces (the kernel
    splits arguments at spaces, and the agent takes ASCII only); None if it can."""
    why = problem(url)
    if why is None and not (url.isascii() and url.isprintable() and not any(c.isspace() for c in url)):
        why = "holds a space or a character that is not printable ASCII"
    if why is None and split_http_url(url) is None:
        why = "is not an http(s) URL with a host (and a valid port)"
    return why


def scrub(text: str, limit: int = 200) -> str:
    """Free text made safe for an `echo` line: one line, at most `limit` characters, every
    character outside a plain set replaced by '?' (so no `$`, `;`, `|`, `&`, `#` or
    backslash: quotes are kept, as they cannot start a command, only keep one from
    being split)."""
    return _UNSAFE.sub("?", " ".join(text.split()))[:limit]
