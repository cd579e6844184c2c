"""Choosing a loopback port for a chat server: the preferred one, or the next free one.

We never share a port: a port counts as taken when anything at all can be bound there or is
listening there, so a second server is never started on a port we do not own.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


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
