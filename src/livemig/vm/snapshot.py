"""Snapshots: a paused VM to a file and back.

File layout (little-endian)::

    header   8s magic "LMVMSNAP" | u16 version | u16 reserved | u32 reserved |
             u64 memory_bytes | u64 state_length | u64 npages_present |
             16s xxh3-128 of all guest memory | u64 xxh64 of the bytes above
    state    the VM state blob (state.py; has its own checksum)
    bitmap   ceil(npages / 8) bytes, bit i (LSB first) set = page i present
    pages    the present pages, in index order, 4096 bytes each
    trailer  8s "LMVMEND."

Zero pages are elided (a fresh guest is mostly zero). The file is written to
a temporary name in the target directory, fsync'ed, then renamed over the
destination (rename(2) is atomic within a file system), so a crash or a full
disk never leaves a half-written snapshot under the real name. Reading
checks every length against the file size before allocating, then the memory
digest after filling memory, so a truncated or corrupted file raises
StateFormatError, never a partial VM.
"""
from __future__ import annotations

import errno
import os
import struct

import numpy as np
import xxhash

from ..errors import SnapshotError, StateFormatError
from . import isa
from .machine import VM
from .state import unpack

MAGIC = b"LMVMSNAP"
TRAILER = b"LMVMEND."
VERSION = 1
_HEAD = struct.Struct("<8sHHIQQQ16s")
_HEAD_SUM = struct.Struct("<Q")
HEADER_BYTES = _HEAD.size + _HEAD_SUM.size


def save(vm: VM, path: str | os.PathLike) -> int:
    """Write the paused ``vm`` to ``path`` atomically; returns the file size."""
    state = vm.export_state()  # refuses a running VM
    mem = vm.memory
    present = mem.words.any(axis=1)
    idx = np.flatnonzero(present)
    bitmap = np.packbits(present, bitorder="little").tobytes()
    head = _HEAD.pack(MAGIC, VERSION, 0, 0, mem.length_bytes, len(state), len(idx), vm.digest())
    head += _HEAD_SUM.pack(xxhash.xxh64_intdigest(head))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    total = len(head) + len(state) + len(bitmap) + len(idx) * isa.PAGE_SIZE + len(TRAILER)
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(state)
            f.write(bitmap)
            chunk = 4096  # pages per write: bounded temporary copies
            for start in range(0, len(idx), chunk):
                f.write(mem.pages[idx[start:start + chunk]].tobytes())
            f.write(TRAILER)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno == errno.ENOSPC:
            raise SnapshotError(
                f"no space left on the device holding {directory!r}: the snapshot needs "
                f"{total} bytes; nothing was written to {path!r}") from exc
        raise SnapshotError(f"cannot write snapshot {path!r}: {exc.strerror or exc}") from exc
    return total


def load(path: str | os.PathLike, *, hugepages: bool = True) -> VM:
    """A paused VM rebuilt from a snapshot file."""
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise SnapshotError(f"cannot open snapshot {path!r}: {exc.strerror or exc}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise StateFormatError(f"{path!r} is truncated: {size} bytes, shorter than the header")
        (magic, version, r1, r2, memory_bytes, state_len, npresent,
         digest) = _HEAD.unpack_from(head)
        if magic != MAGIC:
            raise StateFormatError(f"{path!r} is not a livemig snapshot (bad magic)")
        if version != VERSION:
            raise StateFormatError(f"{path!r} is snapshot version {version}; this livemig "
                                   f"reads version {VERSION}")
        (head_sum,) = _HEAD_SUM.unpack_from(head, _HEAD.size)
        if xxhash.xxh64_intdigest(head[:_HEAD.size]) != head_sum or r1 or r2:
            raise StateFormatError(f"{path!r} has a corrupted header")
        if memory_bytes == 0 or memory_bytes % isa.PAGE_SIZE:
            raise StateFormatError(f"{path!r} records an impossible memory size {memory_bytes}")
        npages = memory_bytes // isa.PAGE_SIZE
        bitmap_len = (npages + 7) // 8
        if npresent > npages:
            raise StateFormatError(f"{path!r} claims {npresent} pages of {npages}")
        expected = (HEADER_BYTES + state_len + bitmap_len + npresent * isa.PAGE_SIZE
                    + len(TRAILER))
        if size != expected:
            raise StateFormatError(f"{path!r} is {size} bytes, its header implies {expected} "
                                   "(truncated or damaged)")
        state_blob = f.read(state_len)
        state = unpack(state_blob)
        if state.memory_bytes != memory_bytes:
            raise StateFormatError(f"{path!r}: state and memory sizes disagree")
        bits = np.frombuffer(f.read(bitmap_len), dtype=np.uint8)
        present = np.unpackbits(bits, bitorder="little", count=npages).astype(bool)
        if bits.size and np.unpackbits(bits, bitorder="little")[npages:].any():
            raise StateFormatError(f"{path!r} marks pages beyond the end of memory")
        idx = np.flatnonzero(present)
        if len(idx) != npresent:
            raise StateFormatError(f"{path!r}: page bitmap disagrees with the page count")
        vm = VM.blank(memory_bytes, state.nvcpus, hugepages=hugepages)
        try:
            chunk = 4096
            for start in range(0, len(idx), chunk):
                part = idx[start:start + chunk]
                data = f.read(len(part) * isa.PAGE_SIZE)
                vm.memory.pages[part] = np.frombuffer(data, dtype=np.uint8).reshape(
                    len(part), isa.PAGE_SIZE)
            if f.read(len(TRAILER)) != TRAILER:
                raise StateFormatError(f"{path!r} lacks its end marker (damaged)")
            if vm.digest() != digest:
                raise StateFormatError(f"{path!r}: guest memory does not match the recorded "
                                       "digest (corrupted pages)")
            vm.import_state(state_blob)
        except BaseException:
            vm.close()
            raise
    return vm

