"""The VM state blob: configuration, per-vCPU registers and devices, as bytes.

Layout (all little-endian)::

    header  8s magic "LMVMSTAT" | u16 version | u16 reserved (0) |
            u32 body_length | u64 xxh64(body)
    body    u32 config_length | config (UTF-8 JSON object) |
            nvcpus x ( vCPU record | console state | clock state )

The JSON config makes the blob self-describing (memory size, vCPU count,
workload, seed, dirty rate, workload parameters). Version policy: a reader
accepts exactly the versions it knows and refuses others by name; any change
of layout bumps VERSION. The checksum covers the whole body, so truncation,
extension or any flipped byte is reported as StateFormatError before a field
is interpreted; the field checks after it still guard against a well-formed
blob that describes an impossible VM.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import xxhash

from ..errors import StateFormatError
from . import isa
from .devices import ClockState, ConsoleState
from .programs import MAX_VCPUS

MAGIC = b"LMVMSTAT"
VERSION = 1
_HEADER = struct.Struct("<8sHHIQ")
_VCPU = struct.Struct("<16QQQQIIQ")   # regs, pc, steps, rng, status, fault_code, fault_addr
_U32 = struct.Struct("<I")
_STORED_STATUSES = (isa.STATUS_PARKED, isa.STATUS_HALTED, isa.STATUS_FAULTED)


@dataclass(frozen=True)
class VCpuRecord:
    regs: tuple[int, ...]
    pc: int
    steps: int
    rng: int
    status: int
    fault_code: int
    fault_addr: int
    console: ConsoleState
    clock: ClockState


@dataclass(frozen=True)
class VMState:
    memory_bytes: int
    nvcpus: int
    workload: str | None
    seed: int
    dirty_rate_bps: float | None
    params: dict = field(default_factory=dict)
    vcpus: tuple[VCpuRecord, ...] = ()

    def pack(self) -> bytes:
        config = json.dumps({
            "memory_bytes": self.memory_bytes, "nvcpus": self.nvcpus,
            "workload": self.workload, "seed": self.seed,
            "dirty_rate_bps": self.dirty_rate_bps, "params": self.params,
        }, sort_keys=True).encode()
        parts = [_U32.pack(len(config)), config]
        for v in self.vcpus:
            parts.append(_VCPU.pack(*v.regs, v.pc, v.steps, v.rng, v.status,
                                    v.fault_code, v.fault_addr))
            parts.append(v.console.pack())
            parts.append(v.clock.pack())
        body = b"".join(parts)
        return _HEADER.pack(MAGIC, VERSION, 0, len(body), xxhash.xxh64_intdigest(body)) + body


def _config_field(config: dict, key: str, types, *, optional: bool = False):
    if key not in config:
        raise StateFormatError(f"VM state lacks the config field {key!r}")
    value = config[key]
    if value is None and optional:
        return None
    if not isinstance(value, types) or isinstance(value, bool):
        raise StateFormatError(f"VM state config field {key!r} has the wrong type")
    return value


def unpack(blob: bytes) -> VMState:
    """Parse and validate a state blob; StateFormatError on anything wrong."""
    blob = bytes(blob)
    if len(blob) < _HEADER.size:
        raise StateFormatError(f"VM state is truncated: {len(blob)} bytes, the header alone "
                               f"is {_HEADER.size}")
    magic, version, reserved, body_len, checksum = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise StateFormatError("not a livemig VM state (bad magic)")
    if version != VERSION:
        raise StateFormatError(f"VM state version {version} is not supported (this livemig "
                               f"reads version {VERSION})")
    if reserved != 0:
        raise StateFormatError("VM state header has non-zero reserved bits")
    body = blob[_HEADER.size:]
    if len(body) != body_len:
        raise StateFormatError(f"VM state body is {len(body)} bytes, the header says {body_len}"
                               " (truncated or extended)")
    if xxhash.xxh64_intdigest(body) != checksum:
        raise StateFormatError("VM state checksum mismatch (corrupted)")

    if len(body) < _U32.size:
        raise StateFormatError("VM state body is truncated")
    (config_len,) = _U32.unpack_from(body)
    off = _U32.size + config_len
    if off > len(body):
        raise StateFormatError("VM state config is truncated")
    try:
        config = json.loads(body[_U32.size:off].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateFormatError(f"VM state config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise StateFormatError("VM state config is not a JSON object")
    memory_bytes = _config_field(config, "memory_bytes", int)
    nvcpus = _config_field(config, "nvcpus", int)
    workload = _config_field(config, "workload", str, optional=True)
    seed = _config_field(config, "seed", int)
    rate = _config_field(config, "dirty_rate_bps", (int, float), optional=True)
    params = _config_field(config, "params", dict)
    if memory_bytes <= 0 or memory_bytes % isa.PAGE_SIZE:
        raise StateFormatError(f"VM state memory size {memory_bytes} is not a whole "
                               "number of pages")
    if rate is not None and not (0 <= rate < float("inf")):
        raise StateFormatError(f"VM state has an impossible dirty rate {rate!r}")
    if not 0 <= seed <= isa.MASK64:
        raise StateFormatError(f"VM state seed {seed} is not a 64-bit unsigned value")
    if not 1 <= nvcpus <= MAX_VCPUS:
        raise StateFormatError(f"VM state has {nvcpus} vCPUs (1..{MAX_VCPUS} allowed)")

    vcpus = []
    for i in range(nvcpus):
        if off + _VCPU.size > len(body):
            raise StateFormatError(f"VM state is truncated in vCPU {i}")
        f = _VCPU.unpack_from(body, off)
        off += _VCPU.size
        regs, (pc, steps, rng, status, fault_code, fault_addr) = f[:16], f[16:]
        if status not in _STORED_STATUSES:
            raise StateFormatError(f"vCPU {i} has an invalid status {status}")
        console, off = ConsoleState.unpack_from(body, off)
        clock, off = ClockState.unpack_from(body, off)
        vcpus.append(VCpuRecord(tuple(regs), pc, steps, rng, status, fault_code, fault_addr,
                                console, clock))
    if off != len(body):
        raise StateFormatError(f"VM state has {len(body) - off} unexpected trailing bytes")
    return VMState(memory_bytes, nvcpus, workload, seed,
                   None if rate is None else float(rate), params, tuple(vcpus))
