"""Mutual TLS for the native bulk streams (csrc/channels/lm_tls.c).

Theory of operation
-------------------
The stream threads cannot use Python's ``ssl`` (their bytes never become
Python objects), and this kernel has no kTLS, so a stream under TLS runs
OpenSSL inside the module. This file is its Python face:

* :class:`TlsContext` loads one side's certificate, key and CA files (the
  control channel's), TLS 1.3 only, both sides verifying the peer;
* :class:`TlsSession` is one stream's TLS connection until a stream thread
  takes it (:meth:`TlsSession.take`, then ``lm_stream_attach_tls``): the
  handshake, and the exact writes and reads the stream's Hello and Welcome
  need. Each of those calls blocks (bounded by its timeout) and releases the
  GIL, so callers run them in an executor (aio/tlsstream.py). :meth:`close`
  may come from another thread while a call runs: it cancels the call and
  the session is freed when the call has returned.

:func:`probe` says whether this build can run TLS streams at all (it was
built with OpenSSL's headers).
"""
from __future__ import annotations

import errno
import os
import threading

from ..errors import ConfigError, ConnectionLost, RemoteProtocolError
from . import ffi, lib
from .chanthread import with_reason
from .handles import NativeHandle

_DER_CAP = 16 << 10   # a certificate's DER bytes: far below this in practice
_DESCRIBE_BYTES = 128


def probe() -> tuple[bool, str]:
    """(True, "") when the stream threads can speak TLS here, else (False, why)."""
    rc, reason = with_reason(lib.lm_tls_probe)
    return rc == 0, reason


class TlsContext:
    """One side's TLS material for its streams: ``server`` accepts (the
    destination), else connects (the source)."""

    def __init__(self, cert_path: str | os.PathLike, key_path: str | os.PathLike,
                 ca_path: str | os.PathLike, *, server: bool):
        out = ffi.new("lm_tls_ctx **")
        rc, reason = with_reason(lib.lm_tls_ctx_create, int(server),
                                 os.fsencode(cert_path), os.fsencode(key_path),
                                 os.fsencode(ca_path), out)
        if rc < 0:
            raise ConfigError(f"cannot load TLS material for the native streams: {reason}")
        self.server = server
        self._native = NativeHandle(out[0], lib.lm_tls_ctx_destroy)

    @property
    def ptr(self):
        return self._native.ptr

    def close(self) -> None:
        """Sessions made from it keep what they need."""
        self._native.release()


def _handshake_error(rc: int, reason: str, what: str) -> Exception:
    """A failed handshake or exchange as the error the channel code raises:
    a lost or silent peer is a break (ConnectionLost); a refused or non-TLS
    peer broke the protocol (RemoteProtocolError)."""
    text = f"{what}: {reason}"
    if -rc in (errno.ECONNRESET, errno.ETIMEDOUT, errno.ECANCELED, errno.EPIPE):
        return ConnectionLost(text, phase="handshake")
    return RemoteProtocolError(text, phase="handshake")


class TlsSession:
    """One stream's TLS connection, owned by Python until :meth:`take`."""

    def __init__(self, raw):
        self._native = NativeHandle(raw, lib.lm_tls_destroy)
        self._lock = threading.Lock()
        self._busy = 0
        self._closing = False

    @classmethod
    def handshake(cls, ctx: TlsContext, fd: int, timeout_s: float, what: str) -> "TlsSession":
        """Blocking: the handshake on the connected socket ``fd`` (ownership
        passes, even on failure). ``what`` names the stream in errors."""
        out = ffi.new("lm_tls **")
        rc, reason = with_reason(lib.lm_tls_handshake, ctx.ptr, fd, _ms(timeout_s), out)
        if rc < 0:
            raise _handshake_error(rc, reason, what)
        return cls(out[0])

    def _call(self, fn, *args):
        """fn(handle, *args, reason, cap), unless closed; frees the session
        afterwards when close() came meanwhile."""
        with self._lock:
            if self._closing or self._native.released:
                return -errno.ECANCELED, "the stream was closed"
            self._busy += 1
        try:
            return with_reason(fn, self._native.ptr, *args)
        finally:
            with self._lock:
                self._busy -= 1
                due = self._closing and self._busy == 0
            if due:
                self._native.release()

    def write(self, data: bytes, timeout_s: float, what: str) -> None:
        """Blocking: all of ``data`` within ``timeout_s``."""
        rc, reason = self._call(lib.lm_tls_write, ffi.from_buffer(data), len(data),
                                _ms(timeout_s))
        if rc < 0:
            raise _handshake_error(rc, reason, what)

    def read(self, nbytes: int, timeout_s: float, what: str) -> bytes:
        """Blocking: exactly ``nbytes`` within ``timeout_s``."""
        buf = bytearray(nbytes)
        rc, reason = self._call(lib.lm_tls_read, ffi.from_buffer(buf), nbytes, _ms(timeout_s))
        if rc < 0:
            raise _handshake_error(rc, reason, what)
        return bytes(buf)

    def peer_cert(self) -> bytes:
        """The peer's certificate (DER)."""
        buf = ffi.new("uint8_t[]", _DER_CAP)
        n = lib.lm_tls_peer_cert(self._native.ptr, buf, _DER_CAP)
        if n < 0 or n > _DER_CAP:
            return b""
        return bytes(ffi.buffer(buf, n))

    def describe(self) -> str:
        """The TLS version and suite agreed: "TLSv1.3 TLS_AES_128_GCM_SHA256"."""
        buf = ffi.new("char[]", _DESCRIBE_BYTES)
        if lib.lm_tls_describe(self._native.ptr, buf, _DESCRIBE_BYTES) < 0:
            return ""
        return ffi.string(buf).decode(errors="replace")

    def take(self):
        """The native handle, for ``lm_stream_attach_tls`` (which owns it
        from then on, even when it fails); this object is spent."""
        with self._lock:
            if self._busy or self._closing or self._native.released:
                raise ConfigError("a TLS stream handed to a thread while in use or closed")
            raw = self._native.ptr
            self._native.forget()
        return raw

    @property
    def closed(self) -> bool:
        return self._closing or self._native.released

    def close(self) -> None:
        """Cancel any call in flight and free the session (after that call)."""
        with self._lock:
            if self._closing or self._native.released:
                return
            self._closing = True
            busy = self._busy
            if busy:
                lib.lm_tls_cancel(self._native.ptr)
        if not busy:
            self._native.release()


def _ms(timeout_s: float) -> int:
    return max(1, int(timeout_s * 1e3))


__all__ = ["TlsContext", "TlsSession", "probe"]
