"""The nginx config bootenv renders: what a sites-enabled/ server block must carry itself."""

from __future__ import annotations

from pathlib import Path

from bootenv.nginxconf import NginxSite, render


def test_a_server_block_alone_turns_gzip_off_and_sendfile_on() -> None:
    """Debian's nginx.conf has `gzip on` in its http block: the block must not rely on
    the http context for what makes byte ranges mean the stored bytes."""
    text = render(NginxSite(Path("/srv/images"), "0.0.0.0:80", "127.0.0.1:8080"))
    assert not text.lstrip().startswith(("user", "http"))  # a block for sites-enabled/
    server = text[text.index("server {") :]
    assert "    gzip off;" in server and "    sendfile on;" in server


def test_the_whole_config_says_it_once() -> None:
    text = render(NginxSite(Path("/srv/images"), "127.0.0.1:80", "127.0.0.1:8080", prefix=Path("/run/x")))
    assert text.count("gzip off;") == 1 and text.count("sendfile on;") == 1
    assert "daemon off;" in text
