"""The source's pre-copy data plane: N bulk streams on native threads.

Theory of operation
-------------------
::

    control Hello offers "streams" ─ Welcome: version 2 and "streams" granted?
        yes: MigrationOffer(config.streams = N) ─ Accept ─ open N bulk channels
             (Hello offers "streams", same session id), each handed to a thread
        no:  every page goes through the Python encoder, and the stats say why
    under TLS the Hello also offers "tls-streams", and each bulk channel is a
    native TLS stream (aio/tlsstream.py): TLS 1.3 in the threads, its peer's
    certificate the control channel's; a destination without it means the
    Python path, and the stats say so
    per round: RoundStart ─ each stream gets its stripe of the pages
               (native.streams.partition) ─ wait on the threads' eventfds until
               every StreamAck is in ─ RoundEnd(total) ─ ◀ RoundAck

The control channel keeps the order of rounds: RoundEnd leaves only after
every stream acknowledged its part, so the destination's RoundAck still means
"every page of the round is in place". A page always travels on the same
stream (one ordered connection), so its versions land in order across
rounds. The threads write each sent page's hash into the encoder's
``sent_hashes``, so the Switchover digest covers exactly what was sent.

A thread that fails (the peer vanished, broke the protocol, a checksum did
not match) ends the round with the error it reported; the session treats it
as any other failure before Commit and resumes the VM here. Threads are
stopped and joined (:meth:`SourceStreams.close`) before memory is released.
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from ...aio.channel import Channel
from ...aio.deadline import within
from ...aio.ratelimit import burst_bytes_for
from ...aio.tls import material_of, peer_cert_of
from ...config import CodecConfig, MigrationConfig
from ...errors import MigrationError
from ...native import streams as native_streams
from ...native import tls as native_tls
from ...native.pace import Pace
from ...protocol import wire
from ...protocol import spec
from ...stats import MigrationStats

STREAMS = spec.STREAMS_CAPABILITY
PUSH = spec.PUSH_CAPABILITY
TLS_STREAMS = spec.TLS_STREAMS_CAPABILITY


@dataclass(frozen=True)
class DataPath:
    """Which path carries the pre-copy pages, and why (``stats.data_path``)."""

    nstreams: int      # 0: the Python path
    reason: str
    tls: bool = False  # the streams speak mutual TLS (in their threads)

    @property
    def native(self) -> bool:
        return self.nstreams > 0

    @property
    def label(self) -> str:
        if not self.native:
            return f"python: {self.reason}"
        return native_streams.path_label(self.nstreams, tls=self.tls)


def tls_refusal(tls: ssl.SSLContext | None) -> str | None:
    """Why the native streams cannot speak the migration's TLS here (None:
    no TLS, or they can: mutual TLS 1.3 in the stream threads, loaded from
    the files ``tls`` was made from)."""
    if tls is None:
        return None
    ok, reason = native_tls.probe()
    if not ok:
        return f"the migration uses TLS, which the native streams cannot speak here: {reason}"
    if material_of(tls) is None:
        return ("the migration uses a TLS context not made by livemig.aio.tls, whose "
                "certificate files the native streams cannot load")
    return None


def _host_refusal(config: MigrationConfig, *, tls: ssl.SSLContext | None) -> str | None:
    """Why this source cannot run native streams at all, or None."""
    if config.streams == 0:
        return "native streams disabled by configuration (streams=0)"
    if native_streams.disabled_by_environment():
        return f"native streams disabled by {native_streams.ENV_SWITCH}=0"
    ok, reason = native_streams.probe()
    if not ok:
        return f"native streams unavailable here: {reason}"
    return tls_refusal(tls)


def refusal(config: MigrationConfig, *, tls: ssl.SSLContext | None) -> str | None:
    """Why this source will not offer native streams for pre-copy rounds, or
    None when it will (under ``tls``, the migration's context, if any)."""
    if config.mode == "postcopy":
        return "post-copy sends its pages on the Python path"
    return _host_refusal(config, tls=tls)


def push_refusal(config: MigrationConfig, *, tls: ssl.SSLContext | None) -> str | None:
    """Why this source will not push post-copy pages on native streams, or
    None when it will offer to."""
    if not config.postcopy_push_streams:
        return "post-copy push on native streams disabled by configuration " \
               "(postcopy_push_streams=False)"
    return _host_refusal(config, tls=tls)


def capabilities(refused: str | None, push_refused: str | None, *, tls: bool) -> set[str]:
    """What the control channel's Hello offers for the native streams."""
    caps = ({STREAMS} if refused is None else set()) | ({PUSH} if push_refused is None else set())
    if tls and caps:
        caps.add(TLS_STREAMS)
    return caps


def choose(config: MigrationConfig, control: Channel, refused: str | None, *,
           capability: str = STREAMS, tls: bool = False) -> DataPath:
    """Decide once the control channel's handshake is done (``capability``:
    STREAMS for the pre-copy rounds, PUSH for the post-copy push; ``tls``:
    the control channel is TLS, so the streams must be too)."""
    conn = control.conn
    if refused is not None:
        return DataPath(0, refused)
    if conn.version < spec.STREAMS_VERSION:
        return DataPath(0, f"wire version {conn.version} was negotiated, which has no streams")
    if tls and TLS_STREAMS not in conn.capabilities:
        return DataPath(0, "the destination does not run native streams under TLS (an older "
                           "livemig, or it cannot here)")
    if capability not in conn.capabilities:
        return DataPath(0, "the destination does not offer native streams"
                        + (" for the post-copy push" if capability == PUSH else ""))
    if conn.peer_max_payload_bytes < native_streams.SEND_FRAME_BYTES:
        return DataPath(0, f"the destination accepts frames of at most "
                           f"{conn.peer_max_payload_bytes} bytes")
    return DataPath(config.streams, "", tls=tls)


class StreamTls:
    """What the source's streams need to speak TLS: the client side of the
    streams' OpenSSL, loaded from the control channel's files, and the
    certificate the destination presented on the control channel (each
    stream's peer must present the same)."""

    def __init__(self, tls: ssl.SSLContext, control: Channel):
        m = material_of(tls)
        self.context = native_tls.TlsContext(m.cert, m.key, m.ca, server=False)
        self.peer_cert = peer_cert_of(control.get_extra_info)

    def close(self) -> None:
        self.context.close()


@dataclass
class RoundSent:
    """What the streams sent of one round, summed over them."""

    pages: int
    bytes: int
    zero_pages: int


PACE_BURST_BYTES = burst_bytes_for(wire.HEADER_BYTES + native_streams.SEND_FRAME_BYTES)
"""The native streams' bucket: the Python path's burst rule over their largest frame."""


class SourceStreams:
    """The bulk streams of one migration, source side, and their shared
    bandwidth cap (:attr:`pace`, changed with :meth:`set_max_bandwidth`)."""

    def __init__(self, streams: list[native_streams.SourceStream], pace: Pace | None = None,
                 *, phase: str = "precopy"):
        self.streams = streams
        self.pace = pace if pace is not None else Pace()   # unlimited unless set
        self.phase = phase        # of the errors they raise

    @classmethod
    def push(cls, memory, hashes: np.ndarray, channels: list[Channel]) -> "SourceStreams":
        """The post-copy push on these bulk channels (handshake done with
        PUSH): each handed to a thread that flags its batches POSTCOPY and
        sends ZERO and RAW runs only. ``hashes``: the encoder's ``sent_hashes``, the final digest's input."""
        streams = cls([], Pace(), phase="postcopy")
        try:
            for ch in channels:
                stream = native_streams.SourceStream(memory, hashes, None, pace=streams.pace)
                streams.streams.append(stream)
                stream.use_postcopy()
                stream.attach(ch)
        except BaseException:
            streams.close()
            raise
        return streams

    @classmethod
    async def open(cls, memory, hashes: np.ndarray, fingerprints, nstreams: int,
                   opener: Callable[[], Awaitable[Channel]],
                   codec: CodecConfig | None = None) -> tuple["SourceStreams", list[Channel]]:
        """Open and hand off ``nstreams`` bulk channels; returns the streams
        and the channels (closed by the caller after :meth:`close`).
        ``hashes`` and ``fingerprints`` are the encoder's (see SourceStream);
        all streams share one cap (:meth:`set_max_bandwidth`), none at first;
        with ``codec`` allowing "lz4", the threads compress where it pays."""
        streams = cls([], Pace())
        channels: list[Channel] = []
        try:
            for _ in range(nstreams):
                ch = await opener()
                channels.append(ch)
                stream = native_streams.SourceStream(memory, hashes, fingerprints,
                                                     pace=streams.pace)
                streams.streams.append(stream)
                if codec is not None and codec.enabled("lz4"):
                    # Without liblz4 the stream sends no LZ4 (docs/codec.md);
                    # stats.pages_by_encoding shows which encodings went.
                    stream.use_lz4(codec.lz4_chunk_pages, codec.lz4_min_saving_pct)
                stream.attach(ch)
        except BaseException:
            streams.close()
            for ch in channels:
                ch.abort()
            raise
        return streams, channels

    def set_max_bandwidth(self, bandwidth_bps: float | None) -> None:
        """Cap every stream together at ``bandwidth_bps`` bytes/s (None lifts
        it); the threads follow within 20 ms, also in the middle of a round."""
        self.pace.set(bandwidth_bps, PACE_BURST_BYTES)

    async def send_round(self, index: int, pages: np.ndarray, stall_timeout_s: float,
                         link_bytes_per_s: float | None = None, *,
                         on_progress: Callable[[int], None] | None = None,
                         progress_interval_s: float = 0.25) -> RoundSent:
        """Send ``pages`` (ascending) as round ``index``; returns once every
        stream's part is acknowledged. Raises what a failed thread reported,
        or MigrationError when the streams stall for ``stall_timeout_s`` (plus
        what the cap makes them wait). ``link_bytes_per_s`` (measured) is what
        LZ4 must beat to be used. While the round runs,
        ``on_progress(pages sent so far)`` is called every
        ``progress_interval_s`` (a capped round can take long)."""
        before = [s.stats() for s in self.streams]
        for s in self.streams:
            s.set_link_bytes_per_s(link_bytes_per_s)
        parts = native_streams.partition(pages, len(self.streams))
        for stream, part in zip(self.streams, parts):
            stream.send_round(index, part)

        def closed() -> bool:
            return all((c := s.round_counts()) is not None and c.round == index
                       and s.stats()["rounds"] > b["rounds"]
                       for s, b in zip(self.streams, before))

        def progress() -> None:
            if on_progress is not None:
                on_progress(sum(s.stats()["pages"] - b["pages"]
                                for s, b in zip(self.streams, before)))

        await self._wait(closed, stall_timeout_s, f"the StreamAcks of round {index}",
                         progress, progress_interval_s if on_progress else stall_timeout_s)
        sent = RoundSent(0, 0, 0)
        for stream, b in zip(self.streams, before):
            counts = stream.round_counts()
            sent.pages += counts.pages
            sent.bytes += counts.bytes
            sent.zero_pages += stream.stats()["zero_pages"] - b["zero_pages"]
        if sent.pages != len(pages):
            raise MigrationError(f"round {index}: the streams sent {sent.pages} of "
                                 f"{len(pages)} pages", phase=self.phase)
        return sent

    # -- pipelined rounds (the post-copy push) ----------------------------------------------
    def set_window(self, rounds: int) -> None:
        """Let each stream have up to ``rounds`` rounds queued or in flight."""
        for s in self.streams:
            s.set_window(rounds)

    def queue_round(self, index: int, pages: np.ndarray) -> None:
        """Queue ``pages`` (ascending) as round ``index`` on every stream (its
        stripe, maybe empty) without waiting; round indices ascend. The
        caller keeps fewer than the window's rounds open (:meth:`rounds_acked`)."""
        for stream, part in zip(self.streams, native_streams.partition(pages, len(self.streams))):
            stream.send_round(index, part)

    def rounds_acked(self) -> int:
        """Rounds every stream has closed (each stream closes them in order)."""
        return min(s.stats()["rounds"] for s in self.streams)

    def in_flight_max(self) -> int:
        """The most rounds any stream had sent and not yet seen acked at once."""
        return max((s.stats()["in_flight_max"] for s in self.streams), default=0)

    async def wait_acked(self, count: int, stall_timeout_s: float) -> None:
        """Until every stream has closed ``count`` rounds; raises what a failed
        thread reported, or MigrationError after ``stall_timeout_s`` without
        progress on any stream."""
        await self._wait(lambda: self.rounds_acked() >= count, stall_timeout_s,
                         f"the StreamAcks of {count} rounds", lambda: None, stall_timeout_s)

    async def _wait(self, done: Callable[[], bool], stall_timeout_s: float, what: str,
                    tick: Callable[[], None], tick_s: float) -> None:
        """Until ``done()``, woken by the threads' eventfds, calling ``tick()``
        every ``tick_s`` meanwhile. A round may take long on a slow link, so
        the timeout is on progress: it fails only when no stream moved a byte
        for ``stall_timeout_s`` plus the longest wait the cap can impose."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        for s in self.streams:
            loop.add_reader(s.fileno(), wake.set)
        moved, moved_at = self._bytes_moved(), loop.time()
        try:
            while True:
                # Clear before looking: news arriving after the look sets the
                # event again, so none is missed.
                wake.clear()
                for s in self.streams:
                    s.clear_notify()
                for s in self.streams:
                    failure = s.failure()
                    if failure is not None:
                        raise failure
                if done():
                    return
                try:
                    await within(wake.wait(), tick_s)
                except asyncio.TimeoutError:
                    tick()
                    now_moved = self._bytes_moved()
                    if now_moved != moved:
                        moved, moved_at = now_moved, loop.time()
                    elif loop.time() - moved_at >= stall_timeout_s + self._cap_wait_s():
                        raise MigrationError(f"timed out waiting for {what} from the "
                                             "destination: no progress on any stream for "
                                             f"{stall_timeout_s:g} s",
                                             phase=self.phase) from None
        finally:
            for s in self.streams:
                loop.remove_reader(s.fileno())

    def _cap_wait_s(self) -> float:
        """The longest a thread may wait for tokens: every stream's frame in debt."""
        bps = self.pace.bandwidth_bps
        return len(self.streams) * PACE_BURST_BYTES / bps if bps else 0.0

    def _bytes_moved(self) -> int:
        return sum(st["bytes_sent"] + st["bytes_received"]
                   for st in (s.stats() for s in self.streams))

    def fold_into(self, stats: MigrationStats) -> int:
        """Add what the threads sent since the last fold to ``stats``;
        returns the pages among it."""
        return sum(s.fold_into(stats)["pages"] for s in self.streams)

    def detach(self) -> None:
        """Stop and join every thread; the counters stay readable until close."""
        for s in self.streams:
            s.detach()

    def close(self) -> None:
        """Stop and join every thread (their sockets are shut down)."""
        for s in self.streams:
            s.close()


__all__ = ["DataPath", "SourceStreams", "RoundSent", "StreamTls", "refusal", "push_refusal",
           "tls_refusal", "capabilities", "choose", "STREAMS", "PUSH", "TLS_STREAMS"]
