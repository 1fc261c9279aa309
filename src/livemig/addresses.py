"""Network addresses as people type them: ``HOST:PORT``, accepted the same way everywhere.

The daemon's ``--listen`` and ``--to``, the library's ``migrate(vm, to)`` and
``Destination(listen)``, and the lab's daemons all name a peer as one string.
An IPv6 literal is written in brackets (``[::1]:7400``); an empty host means
loopback. :func:`format_hostport` writes what :func:`parse_hostport` reads.
"""
from __future__ import annotations

import ipaddress

from .errors import ConfigError

DEFAULT_HOST = "127.0.0.1"


def parse_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    """``(host, port)`` from ``"HOST:PORT"``; raises ConfigError naming ``what``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what} must look like HOST:PORT, got {text!r}")
    host = host.strip("[]") or DEFAULT_HOST
    port_num = int(port)
    if not 0 <= port_num <= 65535:
        raise ConfigError(f"{what}: port {port_num} out of range")
    return host, port_num


def format_hostport(host: str, port: int) -> str:
    """``"HOST:PORT"``, with an IPv6 literal in brackets so the port stays apart."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or a literal) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


__all__ = ["parse_hostport", "format_hostport", "is_loopback", "DEFAULT_HOST"]
