"""The VM's devices: a console and a clock per vCPU, and their saved form.

Console: OUT appends one byte. The native vCPU keeps the byte count, a
64-bit FNV-1a hash of every byte ever written (so two runs can be compared
exactly without keeping all output) and the last LM_VCPU_CONSOLE_TAIL bytes.
Clock: CLOCK reads ``clock_base + steps`` virtual nanoseconds — a pure
function of retired instructions, never wall time, so it moves with the VM.

The console and clock values live in the native ``lm_vcpu_state``; this
module gives them a Python shape and a fixed little-endian encoding used in
the state blob (see state.py).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import StateFormatError

CONSOLE_TAIL_BYTES = 4096
FNV_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def console_hash(data: bytes, start: int = FNV_BASIS) -> int:
    """The running hash the console keeps, continued over ``data``."""
    h = start
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & _MASK64
    return h


@dataclass(frozen=True)
class ConsoleState:
    tail: bytes          # the last bytes written, oldest first
    count: int           # bytes ever written
    hash: int            # FNV-1a 64 of all of them

    _HEAD = struct.Struct("<QQI")

    def pack(self) -> bytes:
        return self._HEAD.pack(self.count, self.hash, len(self.tail)) + self.tail

    @classmethod
    def unpack_from(cls, buf: bytes, offset: int) -> tuple["ConsoleState", int]:
        end = offset + cls._HEAD.size
        if end > len(buf):
            raise StateFormatError("console state is truncated")
        count, h, tail_len = cls._HEAD.unpack_from(buf, offset)
        if tail_len > CONSOLE_TAIL_BYTES or tail_len > count:
            raise StateFormatError(
                f"console tail of {tail_len} bytes is impossible (count {count}, "
                f"at most {CONSOLE_TAIL_BYTES} kept)")
        if end + tail_len > len(buf):
            raise StateFormatError("console tail is truncated")
        return cls(bytes(buf[end:end + tail_len]), count, h), end + tail_len


@dataclass(frozen=True)
class ClockState:
    base_ns: int         # CLOCK = base_ns + retired steps

    _FMT = struct.Struct("<Q")

    def pack(self) -> bytes:
        return self._FMT.pack(self.base_ns)

    @classmethod
    def unpack_from(cls, buf: bytes, offset: int) -> tuple["ClockState", int]:
        if offset + cls._FMT.size > len(buf):
            raise StateFormatError("clock state is truncated")
        (base,) = cls._FMT.unpack_from(buf, offset)
        return cls(base), offset + cls._FMT.size
