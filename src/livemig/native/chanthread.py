"""A native channel thread's Python face, shared by the urgent channel
(:mod:`.urgent`) and the bulk streams (:mod:`.streams`).

Theory of operation
-------------------
Both families run one native thread per connection (csrc/channels/lm_chan.h):
Python does the handshake, then :meth:`ChannelThread.attach` hands a dup of
the socket and the next sequence numbers to the thread. The thread tells its
owner of news through an eventfd (:meth:`fileno`) the owner's event loop
watches, and ends with a status and, on failure, a reason, which
:meth:`failure` turns into the exception the Python path would have raised
for the same fault. A subclass names its family's C functions as class
attributes and adds what only it does.

Ownership: each thread's handle is a :class:`NativeHandle` child of the
memory object it works on, and its destructor holds the arrays the thread
writes into, so they outlive the native destroy (which stops and joins the
thread) however the wrapper goes; ``close()`` is the contract.
"""
from __future__ import annotations

import errno
import os

from ..errors import ConnectionLost, RemoteProtocolError
from . import ffi
from .handles import NativeHandle

REASON_BYTES = 256
# Errnos with which a thread reports that the peer broke the protocol.
PROTOCOL_ERRNOS = {errno.EPROTO, errno.EBADMSG, errno.ERANGE}


def with_reason(fn, *args) -> tuple[int, str]:
    """Call a native ``fn(*args, reason, reason_cap)``: (its result, the reason)."""
    buf = ffi.new("char[]", REASON_BYTES)
    rc = fn(*args, buf, REASON_BYTES)
    return rc, ffi.string(buf).decode(errors="replace")


class ChannelThread:
    """What both families share: the handle, attach, status, failure,
    counters and the notify fd. Subclasses set the class attributes below
    (the native functions as staticmethods) and define ``attach_fd``."""

    _destroy = None      # lm_*_destroy
    _notify_fd = None    # lm_*_notify_fd
    _status = None       # lm_*_status
    _stats_get = None    # lm_*_stats_get
    _stats_type = ""     # "lm_*_stats"
    _running_status = 0  # LM_*_RUNNING
    _label = ""          # in failures: "bulk stream", "urgent channel"
    _channel = ""        # ConnectionLost.channel
    _phase = ""          # the phase a failure is reported in by default

    def __init__(self, handle, owner, keepalive: tuple):
        destroy = self._destroy
        self._native = NativeHandle(handle, lambda h, _arrays=keepalive: destroy(h),
                                    parent=owner.native_handle)
        self._owner = owner         # refuses to close while this thread uses it
        self._folded: dict[str, int] = {}   # counters already added by a fold
        self._fields = tuple(name for name, _ in ffi.typeof(self._stats_type).fields)
        owner.attach(self)

    def attach(self, channel, **options) -> None:
        """Take over ``channel`` (handshake done, no traffic yet)."""
        fd, version, send_seq, recv_seq, max_payload = channel.hand_off()
        self.attach_fd(fd, version=version, send_seq=send_seq, recv_seq=recv_seq,
                       max_payload_bytes=max_payload, **options)

    def fileno(self) -> int:
        """The eventfd that becomes readable when the thread has news."""
        return self._notify_fd(self._h)

    def clear_notify(self) -> None:
        try:
            os.read(self.fileno(), 8)
        except BlockingIOError:
            pass

    def status(self) -> tuple[int, str]:
        return with_reason(self._status, self._h)

    def failure(self, *, phase: str | None = None) -> Exception | None:
        """The error the thread ended with, as the exception the Python path
        would raise (RemoteProtocolError for a protocol violation,
        ConnectionLost for a lost peer), or None while it runs or if it
        stopped without error."""
        st, reason = self.status()
        if st >= 0:
            return None
        phase = phase or self._phase
        if -st in PROTOCOL_ERRNOS:
            return RemoteProtocolError(f"{self._label}: {reason}", phase=phase)
        return ConnectionLost(f"{self._label}: {reason}", phase=phase, channel=self._channel)

    @property
    def running(self) -> bool:
        return self.status()[0] == self._running_status

    def stats(self) -> dict[str, int]:
        out = ffi.new(f"{self._stats_type} *")
        self._stats_get(self._h, out)
        return {name: int(getattr(out, name)) for name in self._fields}

    def _unfolded(self) -> dict[str, int]:
        """The counters' increments since the previous call."""
        ns = self.stats()
        d = {k: v - self._folded.get(k, 0) for k, v in ns.items()}
        self._folded = ns
        return d

    @property
    def _h(self):
        return self._native.ptr

    def close(self) -> None:
        """Stop and join the thread, close its socket, free the handle."""
        if not self._native.released:
            self._native.release()
            self._owner.detach(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
