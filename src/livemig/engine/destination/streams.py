"""The destination's pre-copy data plane: N bulk streams on native threads.

Theory of operation
-------------------
::

    control Hello offering "streams" ─ Welcome grants it (wire version 2, this
        host can run the threads; under TLS, the Hello also offers
        "tls-streams" and this listener accepts native TLS streams)
    MigrationOffer(config.streams = N) ─ Accept ─ N bulk channels arrive,
        each offering "streams": handed at once to a DestStream thread (under
        TLS: native TLS streams, aio/tlsstream.py, whose certificate must be
        the control channel's peer's)
    threads: check + place PageBatches, hashes[] and held[], ◀ StreamEnd ─ StreamAck ▶
    control RoundEnd(round, pages) ─ every stream closed that round and the
        counts add up? ─ RoundAck(round, pages)

A stream's thread answers StreamEnd only after its pages are placed and its
counters published, and the source sends RoundEnd only after every stream's
StreamAck, so when RoundEnd arrives the counters are final for the round: no
waiting here. Any thread failure (bad batch, checksum, lost peer) is raised
at the next RoundEnd or Switchover, and the thread has already shut its
socket down, so the source fails its round too (with resumable pre-copy, a
lost peer is a break the session may wait out: :meth:`DestStreams.restart`
joins the threads and takes the source's next set). Threads write guest memory:
they are stopped and joined (:meth:`DestStreams.close`) before memory is
registered for post-copy or freed.
"""
from __future__ import annotations

import ssl

from ...aio.channel import Channel
from ...aio.tls import material_of, peer_cert_of
from ...config import MAX_STREAMS, MigrationConfig
from ...errors import ConfigError, RemoteProtocolError
from ...native import streams as native_streams
from ...native import tls as native_tls
from ...protocol import spec
from ...stats import MigrationStats

STREAMS = spec.STREAMS_CAPABILITY
PUSH = spec.PUSH_CAPABILITY
TLS_STREAMS = spec.TLS_STREAMS_CAPABILITY


def offered(config: MigrationConfig, *, tls: bool, tls_streams: bool = False) -> bool:
    """Whether this destination grants the "streams" capability (under
    ``tls``, only when ``tls_streams``: its listener accepts native TLS
    streams, see :func:`tls_context`)."""
    return (config.streams > 0 and (not tls or tls_streams)
            and not native_streams.disabled_by_environment() and native_streams.probe()[0])


def tls_context(config: MigrationConfig, tls: ssl.SSLContext | None
                ) -> tuple[native_tls.TlsContext | None, str]:
    """The server side of the native streams' TLS for a listener under
    ``tls``: (context, "") or (None, why not)."""
    if tls is None:
        return None, "no TLS"
    if config.streams == 0:
        return None, "native streams disabled by configuration (streams=0)"
    ok, reason = native_tls.probe()
    if not ok:
        return None, reason
    m = material_of(tls)
    if m is None:
        return None, "the listener's TLS context was not made by livemig.aio.tls"
    try:
        return native_tls.TlsContext(m.cert, m.key, m.ca, server=True), ""
    except ConfigError as exc:
        return None, str(exc)


def stream_peer_problem(control: Channel, stream) -> str | None:
    """Why a native TLS stream may not join its session (None: it may). It
    must come from the peer of the session's control channel: the same
    certificate, not merely one the CA signed."""
    expected = peer_cert_of(control.get_extra_info)
    if expected is None or stream.peer_cert != expected:
        return ("the stream's certificate is not the one its session's control channel "
                "presented")
    return None


def check_offer(value, granted: bool) -> str | None:
    """What is wrong with a MigrationOffer's "streams" entry, or None."""
    if value is None:
        return None
    if not granted:
        return "the offer asks for native streams, which this channel did not negotiate"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_STREAMS:
        return f"bad stream count {value!r}"
    return None


class DestStreams:
    """The bulk streams of one incoming migration."""

    def __init__(self, memory, hashes, held, blocks, nstreams: int, fill=None):
        self.memory = memory
        self.fill = fill     # FirstTouchFill, or None: memory is pre-faulted
        self.hashes = hashes
        self.held = held
        self.blocks = blocks
        self.nstreams = nstreams
        self.streams: list[native_streams.DestStream] = []
        self.closed = False

    def adopt(self, ch: Channel) -> None:
        """Hand a bulk stream's channel to a thread. Called right after its
        Welcome was sent, with no await in between: the source sends pages as
        soon as its round starts, and hand_off refuses a channel whose
        transport already read some."""
        if self.closed:
            raise RemoteProtocolError("a bulk stream after the pre-copy rounds ended",
                                      phase="precopy")
        if len(self.streams) >= self.nstreams:
            raise RemoteProtocolError(f"more than the {self.nstreams} bulk streams offered",
                                      phase="precopy")
        stream = native_streams.DestStream(self.memory, self.hashes, self.held, self.blocks,
                                           self.fill)
        self.streams.append(stream)
        stream.attach(ch)

    def raise_failure(self) -> None:
        for s in self.streams:
            failure = s.failure()
            if failure is not None:
                raise failure

    def close_round(self, index: int) -> int:
        """At the control channel's RoundEnd: the pages the streams placed in
        round ``index`` (the RoundAck says it; the source compares)."""
        self.raise_failure()
        if len(self.streams) < self.nstreams:
            raise RemoteProtocolError(f"round {index} ended with {len(self.streams)} of "
                                      f"{self.nstreams} bulk streams open", phase="precopy")
        placed = 0
        for k, s in enumerate(self.streams):
            counts = s.round_counts()
            if counts is None or counts.round != index:
                raise RemoteProtocolError(f"round {index} ended before bulk stream {k} closed "
                                          "it", phase="precopy")
            placed += counts.pages
        return placed

    def fold_into(self, stats: MigrationStats) -> None:
        for s in self.streams:
            s.fold_into(stats)

    def restart(self, stats: MigrationStats) -> None:
        """After a link break the source may resume (engine/destination/resume.py):
        fold the threads' counters into ``stats``, stop and join every thread,
        and take a fresh set of streams from now on. Raises what a thread that
        refused a frame reported (a protocol violation is no break)."""
        self.fold_into(stats)
        failures = [s.failure() for s in self.streams]
        self._join()
        for failure in failures:
            if isinstance(failure, RemoteProtocolError) and not isinstance(failure,
                                                                           ConnectionError):
                raise failure
        self.streams = []
        self.closed = False

    def _join(self) -> None:
        self.closed = True
        for s in self.streams:
            s.close()

    def close(self) -> None:
        """Stop and join every thread (their sockets are shut down), then end
        the first-touch fill; no stream is adopted afterwards."""
        self._join()
        if self.fill is not None:
            self.fill.close()


__all__ = ["DestStreams", "offered", "tls_context", "stream_peer_problem", "check_offer",
           "STREAMS", "PUSH", "TLS_STREAMS"]
