"""Units: sizes and rates parsed and printed the same way everywhere.

Sizes: ``4096``, ``64KiB``, ``1GiB``, ``1.5G`` (binary multiples: K/M/G/T and
KiB/MiB/GiB/TiB are both powers of 1024; a trailing ``B`` is optional).
Rates in bytes per second: ``256MiB/s``, ``100M``; bits per second when the
unit says bits: ``1Gbit/s``, ``10Gbps`` (decimal, as links are sold).
Measured numbers go to JSON through :func:`finite_or_none` (JSON has no
infinity or NaN; "not measured" or "never" is null).
"""
from __future__ import annotations

import math
import re

from .errors import ConfigError

PAGE_SIZE = 4096
"""Bytes of a page: the unit of tracking, transfer and the guest's memory
(the native core checks it holds the same, livemig.native)."""
MIB = 1 << 20

_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)
# Longest unit first: "bps" must not match as "b" (bytes) followed by "ps".
_RATE_RE = re.compile(
    r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?bit|i?bps|i?b)?\s*(/s|ps)?\s*$", re.I
)


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Bytes from ``1GiB``-style text (or an int); raises ConfigError."""
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} must not be negative: {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: cannot parse {value!r} (expected e.g. 4096, 64MiB, 1GiB)")
    number, prefix, _ = m.groups()
    return int(float(number) * _BINARY[prefix.lower()])


def parse_rate(value: str | int | float, *, what: str = "rate") -> float:
    """Bytes per second from ``256MiB/s``, ``1Gbit/s`` or a plain number."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a rate, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{what} must not be negative: {value}")
        return float(value)
    m = _RATE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{what}: cannot parse {value!r} (expected e.g. 256MiB/s, 1Gbit/s)")
    number, prefix, unit, _ = m.groups()
    unit = (unit or "").lower()
    if "bit" in unit or unit in ("bps", "ibps"):
        table = _BINARY if unit.startswith("i") else _DECIMAL
        return float(number) * table[prefix.lower()] / 8.0
    return float(number) * _BINARY[prefix.lower()]


def parse_optional_rate(value: str | int | float | None, *, what: str = "rate") -> float | None:
    """Like :func:`parse_rate`, but nothing given (None or ``""``) is None:
    no cap, or an unpaced guest, as the caller's field defines it."""
    if value is None or value == "":
        return None
    return parse_rate(value, what=what)


def format_size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def format_rate(bytes_per_s: float) -> str:
    return format_size(bytes_per_s) + "/s"


def format_mib_per_s(bytes_per_s: float) -> str:
    """A rate always in MiB/s, for text that compares rates (plan, its reasons)."""
    return f"{bytes_per_s / MIB:,.1f} MiB/s"


def finite_or_none(x: float | None) -> float | None:
    """``x`` for JSON: None when it is None, infinite or NaN."""
    return x if x is not None and math.isfinite(x) else None
