"""This machine's addresses and free ports."""

from __future__ import annotations

import socket

import psutil


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (for children that cannot take port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def local_addresses() -> list[str]:
    """IPv4 addresses a peer might reach us on, most useful first."""
    addrs: list[str] = []
    for _name, snics in psutil.net_if_addrs().items():
        for snic in snics:
            if snic.family == socket.AF_INET and not snic.address.startswith("127."):
                addrs.append(snic.address)
    return addrs or ["127.0.0.1"]
