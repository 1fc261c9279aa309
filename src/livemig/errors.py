"""Every exception livemig raises, in one place.

Errors carry a *side* — ``local`` (this process misused an API, or its host
lacks something) or ``remote`` (the peer broke the protocol or went away) —
and, for migrations, the *phase* they happened in. Callers catch
``LivemigError`` to catch everything of ours.
"""
from __future__ import annotations

import errno as _errno
import os


class LivemigError(Exception):
    """Base of every livemig error."""

    side = "local"

    def __init__(self, message: str, *, phase: str | None = None):
        super().__init__(message)
        self.phase = phase


class ConfigError(LivemigError, ValueError):
    """A user-supplied value (size, rate, backend name, option) is invalid."""


class NativeError(LivemigError, OSError):
    """A native call failed; ``errno`` holds the positive errno value."""

    def __init__(self, err: int, what: str, hint: str | None = None):
        msg = f"{what}: {os.strerror(err)} (errno {_errno.errorcode.get(err, err)})"
        if hint:
            msg += f" — {hint}"
        LivemigError.__init__(self, msg)
        self.errno = err
        self.what = what
        self.hint = hint


class OutOfMemory(NativeError, MemoryError):
    """The kernel refused memory (mmap, mprotect past vm.max_map_count, ...)."""


class PermissionDenied(NativeError, PermissionError):
    """The kernel refused on permission grounds (sysctl, capability, seccomp)."""


class Unsupported(NativeError):
    """The running kernel lacks a feature livemig asked for."""


class BackendUnavailable(LivemigError):
    """A dirty tracker (or other pluggable backend) cannot run on this host."""

    def __init__(self, name: str, reason: str, hint: str | None = None):
        msg = f"backend {name!r} is unavailable: {reason}"
        if hint:
            msg += f" (hint: {hint})"
        super().__init__(msg)
        self.name = name
        self.reason = reason
        self.hint = hint


class GuestError(LivemigError):
    """The guest itself stopped with a fault (bad address, bad opcode, or a
    self-check such as memtest detecting corrupted memory)."""

    def __init__(self, message: str, *, vcpu: int, code: int, address: int = 0):
        super().__init__(message)
        self.vcpu = vcpu
        self.code = code
        self.address = address


class StateFormatError(LivemigError):
    """Saved VM state (a snapshot file or state blob) is malformed or from an
    incompatible version."""


_ERRNO_CLASSES = {
    _errno.ENOMEM: OutOfMemory,
    _errno.EPERM: PermissionDenied,
    _errno.EACCES: PermissionDenied,
    _errno.ENOSYS: Unsupported,
    _errno.EOPNOTSUPP: Unsupported,
    _errno.ENOTTY: Unsupported,
}


def native_error(err: int, what: str, hint: str | None = None) -> NativeError:
    """Map a positive errno from a native call to the most specific class."""
    return _ERRNO_CLASSES.get(err, NativeError)(err, what, hint)


# toy VM (vm/)
class AsmError(LivemigError, ValueError):
    """A guest program's assembly text is invalid; the message names the line."""

    def __init__(self, message: str, *, line: int | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


class SnapshotError(LivemigError, OSError):
    """A snapshot could not be written or read for a reason of the host (full
    disk, permissions, missing file), as opposed to a malformed file."""


class VMBusy(LivemigError):
    """The operation needs a paused VM (or parked vCPU) and it is running."""


class GuestTimeout(LivemigError, TimeoutError):
    """The guest did not reach the requested point (step, park) in time."""
