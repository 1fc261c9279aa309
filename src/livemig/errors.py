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


# dirty tracking
class TrackerStateError(LivemigError):
    """A dirty tracker was used out of order: collect before start, start while
    armed, or any use after close."""

# network namespaces and link shaping (netns.py)
class CommandError(LivemigError):
    """An external command (``ip``, ``tc``, a helper script) failed; the message
    names the command, its exit code (None when it timed out) and its stderr."""

    def __init__(self, argv, returncode: int | None, stderr: str):
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.stderr = stderr
        shown = " ".join(self.argv)
        if len(shown) > 300:
            shown = shown[:300] + " ..."
        code = "no exit code" if returncode is None else f"exit code {returncode}"
        detail = stderr.strip() or "(empty stderr)"
        super().__init__(f"command `{shown}` failed with {code}: {detail}")


class LinkUnavailable(LivemigError):
    """The requested link shaping (e.g. a delay, which needs sch_netem) cannot be
    built on this host; the message says what is missing."""

# -- page codec ---------------------------------------------------------------
class CodecError(LivemigError):
    """A received page batch is malformed (bad header or run table, page index
    out of range, wrong lengths, unknown encoding, DUP hash mismatch, LZ4
    error). Nothing of the offending run was applied."""

# Wire protocol and channels (livemig.protocol, livemig.aio)
class ProtocolError(LivemigError):
    """The migration protocol was broken; ``side`` says by whom, ``phase`` when
    (handshake, precopy, switchover, postcopy, complete)."""

    def __init__(self, message: str, *, phase: str | None = None, channel: str | None = None):
        if channel:
            # Which end and channel is technical detail: after what happened.
            message = f"{message} (seen by the {channel.replace('/', ' on its ')} channel)"
        super().__init__(message, phase=phase)
        self.channel = channel


class LocalProtocolError(ProtocolError):
    """We misused the protocol API: sent a message the state forbids, an
    oversized frame, or used a connection after it failed."""

    side = "local"


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol: bad magic, version, type, length, checksum,
    sequence, payload, a message its state forbids, or a truncated stream."""

    side = "remote"


class CodecUsageError(LivemigError, ValueError):
    """The page codec was called wrongly (page index out of range, repeated
    pages in one encode call, a batch size too small for one page)."""

class HandshakeRefused(RemoteProtocolError):
    """The peer answered our Hello or MigrationOffer with Refuse."""

    def __init__(self, code: int, reason: str, *, phase: str | None = None,
                 channel: str | None = None):
        super().__init__(f"peer refused (code {code}): {reason}", phase=phase, channel=channel)
        self.code = code
        self.reason = reason


class ConnectionLost(RemoteProtocolError, ConnectionError):
    """The peer vanished (reset, closed early, or stopped answering) while the
    channel still expected traffic."""

# migration orchestration (source.py, destination.py)
class MigrationError(LivemigError):
    """A migration did not complete. ``stats`` holds what was measured up to
    the failure; ``source_resumed`` says whether the VM runs on at the source."""

    def __init__(self, message: str, *, phase: str | None = None, stats=None,
                 source_resumed: bool = True):
        super().__init__(message, phase=phase)
        self.stats = stats
        self.source_resumed = source_resumed
        self.what = message     # the bare cause, without phase, place and advice


# -- failure messages users read ----------------------------------------------
# Each says what happened, in which phase (once, the phase the migration was
# in), where the VM is now and what to do, in that order.
PHASE_WORDS = {"handshake": "during the handshake", "precopy": "during pre-copy",
               "switchover": "during the switchover", "postcopy": "during post-copy",
               "complete": "while completing"}
RESUMED_AT_SOURCE = "The VM was resumed on the source and runs on there"
MIGRATE_AGAIN = "migrate again once the cause is fixed"


def in_phase(phase: str | None) -> str:
    """``"during pre-copy"`` for ``"precopy"``; an unknown phase is named as is."""
    if phase is None:
        return "before it started"
    return PHASE_WORDS.get(phase, f"in phase {phase}")


def failure_text(what: str, *, phase: str | None, where: str = RESUMED_AT_SOURCE,
                 todo: str = MIGRATE_AGAIN) -> str:
    """A failed migration as users read it: what happened, at which phase,
    where the VM is now, what to do."""
    return f"migration failed {in_phase(phase)}: {what}. {where}; {todo}"


def in_doubt_text(what: str, *, phase: str | None, vm: str) -> str:
    """A handover broken after Commit, the outcome not learned."""
    return (f"handover in doubt {in_phase(phase)}, after Commit: {what}. The VM is kept paused "
            "on the source and may be running at the destination; once the destination is "
            f"reachable, `livemig vm resolve {vm}` learns the outcome and applies it. If the "
            "destination daemon died, the VM died with it there: restarted with its state dir "
            f"it says so to `livemig vm resolve {vm}`, or `livemig vm resolve {vm} --resume` "
            "resumes this copy")


def stopped_after_commit_text(why: str, *, phase: str | None, vm: str) -> str:
    """The destination stopped the VM after Commit: the source's paused copy is the only one."""
    return (f"post-copy could not complete {in_phase(phase)}: the destination stopped the VM "
            f"({why}). The only copy is paused on the source at the state of the switchover; "
            f"resume it (`livemig vm resolve {vm} --resume`) or stop it")


def reword_as_failure(exc: "MigrationError", *, phase: str | None,
                      todo: str = MIGRATE_AGAIN) -> "MigrationError":
    """Give a failure after which the source resumed the VM its full text, in
    place (its class stays); ``exc.what`` keeps the bare cause."""
    exc.what = str(exc)
    exc.phase = phase
    exc.args = (failure_text(exc.what, phase=phase, todo=todo),)
    return exc


class MigrationCancelled(MigrationError):
    """The migration was cancelled on request before the switchover; the VM
    runs on at the source."""


class HandoverInDoubt(MigrationError):
    """The connection broke after the source committed the handover but before
    the destination confirmed it resumed: the VM may run at the destination, so
    the source keeps its copy paused and intact instead of resuming it."""

# daemon control socket (service/control.py)
class ControlError(LivemigError):
    """The daemon answered a control request with an error, or cannot be
    reached. ``error_type`` names the daemon-side error ("NoDaemon",
    "NoSuchVM", "ConfigError", ...), so a client can tell them apart."""

    def __init__(self, message: str, *, error_type: str = "ControlError"):
        super().__init__(message)
        self.error_type = error_type


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
