"""Choosing a loopback port for a chat server: the preferred one, or the next free one.

We never share a port: a port counts as taken when anything at all can be bound there or is
listening there, so a second server is never started on a port we do not own.
"""

from __future__ import annotations

import os
import socket

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class NoFreePortError(RuntimeError):
    """Every port in the searched range was taken."""


def is_port_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on ``host:port`` and we could bind it ourselves right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((host, port)) == 0:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(preferred: int, host: str = LOOPBACK, tries: int = 50,
                   exclude: set[int] | frozenset[int] = frozenset()) -> int:
    """``preferred`` when free, else the next free port above it (skipping ``exclude``)."""
    for port in range(preferred, min(preferred + tries, 65536)):
        if port not in exclude and is_port_free(port, host):
            return port
    raise NoFreePortError(
        f"no free port in {preferred}..{preferred + tries - 1} on {host}; "
        f"set SAGE_FT_LLM_PORT to another port range")


def bypass_proxies_for_loopback() -> None:
    """Make every HTTP client of this process talk to loopback directly, never through a proxy.

    httpx (and so openai and Gradio) honour HTTP_PROXY/HTTPS_PROXY/ALL_PROXY for every host not in
    NO_PROXY. The chat server and the app itself live on loopback: through a proxy the health checks
    and chats fail (and Gradio refuses to start with "When localhost is not accessible, a shareable
    link must be created", a common report), and the chat server's API key would be sent to the
    proxy. NO_PROXY/no_proxy are extended, never replaced; child processes inherit them.
    """
    for var in ("NO_PROXY", "no_proxy"):
        present = [h.strip() for h in os.environ.get(var, "").split(",") if h.strip()]
        os.environ[var] = ",".join(present + [h for h in LOOPBACK_HOSTS if h not in present])
