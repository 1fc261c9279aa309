"""``livemig plan``: a migration's dry run — bandwidth probe, dirty rate, prediction.

Theory of operation
-------------------
Pre-copy converges when the dirty rate stays well below the bandwidth
(policy.py). A plan measures both where the migration would measure them:

1. **Bandwidth** to the destination daemon, on the data path the migration
   would use (linkrate.py chooses and says why). A control channel is opened
   exactly as a migration opens it (same TLS, same capabilities, same
   in-process rate limiter when ``max_bandwidth_bps`` is set) and a few
   Ping/Pong exchanges give the round-trip time. Then:

   * **stream probe**, when the native bulk streams would carry the pages
     and the destination grants "stream-probe": StreamProbe, N bulk streams
     on the migration's own native threads carrying rounds of incompressible
     pages for ``probe_time_s`` or ``probe_bytes`` (engine/source/streamprobe.py),
     StreamProbeEnd; both sides report bytes, time and CPU.
   * **control probe** otherwise: incompressible ProbeData frames stream
     for ``probe_time_s`` or ``probe_bytes``, and the destination answers
     ProbeEnd with the bytes it received and the time it took on its own
     clock, counted from the first frame's arrival (so connection set-up
     and the first TCP window do not count).

   The channel is then closed before any MigrationOffer: the destination
   keeps nothing (a stream probe's scratch memory is unmapped at its end).
2. **Dirty rate** of the VM over ``window_s`` (dirtyrate.py), after the
   probe so the two do not compete for the CPU.
3. :func:`policy.predict` with the smaller of the measured and configured
   bandwidths: converges or not, rounds, expected downtime, total time,
   recommended mode.
"""
from __future__ import annotations

import asyncio
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..aio.channel import open_channel
from ..aio.ratelimit import TokenBucket
from ..aio.tlsstream import open_tls_stream
from ..config import MigrationConfig
from ..engine.source import streamprobe
from ..engine.source.streams import STREAMS, TLS_STREAMS, StreamTls, refusal
from ..errors import RemoteProtocolError
from ..native.streams import SEND_FRAME_BYTES
from ..policy import Prediction, predict
from ..protocol import ChannelKind, Ping, ProbeData, ProbeEnd
from ..units import MIB, finite_or_none, format_mib_per_s
from . import linkrate
from .linkrate import LinkEstimate

PROBE_FRAME_BYTES = 1 << 20
PING_COUNT = 5


@dataclass(frozen=True)
class BandwidthProbe:
    bytes_per_s: float
    """Payload bytes per second the destination received (its clock)."""
    bytes: int
    frames: int
    duration_s: float
    rtt_ms: float
    """Median Ping/Pong round trip before the stream."""
    sent_bytes: int
    rate_limit_bps: float | None
    """The in-process limiter the probe ran under, if any."""

    def to_dict(self) -> dict:
        return asdict(self)


async def probe_bandwidth(host: str, port: int, *, ssl=None, server_hostname: str | None = None,
                          max_bytes: int = 64 << 20, max_time_s: float = 1.0,
                          rate_limit_bps: float | None = None, timeout_s: float = 10.0,
                          frame_bytes: int = PROBE_FRAME_BYTES) -> BandwidthProbe:
    """Measure bandwidth and RTT to the livemig destination at ``host:port``."""
    ch = await _open_control(host, port, ssl=ssl, server_hostname=server_hostname,
                             rate_limit_bps=rate_limit_bps, frame_bytes=frame_bytes,
                             capabilities=frozenset(), timeout_s=timeout_s)
    try:
        rtt_ms = await _round_trip_ms(ch, timeout_s)
        return await _control_probe(ch, rtt_ms, max_bytes=max_bytes, max_time_s=max_time_s,
                                    rate_limit_bps=rate_limit_bps, timeout_s=timeout_s,
                                    frame_bytes=frame_bytes)
    finally:
        await ch.close()


async def probe_link(host: str, port: int, *, config: MigrationConfig | None = None, ssl=None,
                     server_hostname: str | None = None, max_bytes: int = 64 << 20,
                     max_time_s: float = 1.0) -> LinkEstimate:
    """Measure the link to ``host:port`` on the path a migration under
    ``config`` would take: the native streams' probe where it can run, else
    the control channel's (and why)."""
    config = config or MigrationConfig()
    refused = refusal(config, tls=ssl)
    caps = frozenset() if refused is not None else frozenset(
        {STREAMS, linkrate.STREAM_PROBE} | ({TLS_STREAMS} if ssl is not None else set()))
    session_id = os.urandom(16)
    common = dict(ssl=ssl, server_hostname=server_hostname, timeout_s=config.handshake_timeout_s)
    ch = await _open_control(host, port, session_id=session_id,
                             rate_limit_bps=config.max_bandwidth_bps,
                             frame_bytes=PROBE_FRAME_BYTES, capabilities=caps, **common)
    stream_tls = None
    try:
        rtt_ms = await _round_trip_ms(ch, config.handshake_timeout_s)
        conn = ch.conn
        why_not = linkrate.stream_probe_refusal(
            refused, version=conn.version, capabilities=conn.capabilities,
            peer_max_payload_bytes=conn.peer_max_payload_bytes,
            send_frame_bytes=SEND_FRAME_BYTES, tls=ssl is not None)
        if why_not is None:
            grant = await streamprobe.ask(ch, config.streams, max_time_s, max_bytes,
                                          config.handshake_timeout_s)
            if grant.nstreams == 0:
                why_not = f"the destination refused the stream probe: {grant.reason}"
            else:
                if ssl is not None:   # the probe's streams speak TLS as a migration's do
                    stream_tls = StreamTls(ssl, ch)

                def opener():
                    if stream_tls is not None:
                        return open_tls_stream(host, port, tls=stream_tls.context,
                                               peer_cert=stream_tls.peer_cert,
                                               kind=ChannelKind.BULK, session_id=session_id,
                                               capabilities=frozenset({STREAMS}),
                                               timeout_s=config.handshake_timeout_s,
                                               what="probe stream (TLS)")
                    return _open_control(host, port, session_id=session_id, kind=ChannelKind.BULK,
                                         capabilities=frozenset({STREAMS}), **common)
                run = await streamprobe.run(ch, grant, opener, config=config,
                                            max_bytes=max_bytes,
                                            timeout_s=config.handshake_timeout_s + max_time_s)
                return linkrate.from_stream_run(run, rtt_ms, config.max_bandwidth_bps)
        probe = await _control_probe(ch, rtt_ms, max_bytes=max_bytes, max_time_s=max_time_s,
                                     rate_limit_bps=config.max_bandwidth_bps,
                                     timeout_s=config.handshake_timeout_s,
                                     frame_bytes=PROBE_FRAME_BYTES)
        return linkrate.from_control_probe(probe, why_not)
    finally:
        await ch.close()
        if stream_tls is not None:
            stream_tls.close()


async def _open_control(host: str, port: int, *, ssl, server_hostname: str | None,
                        capabilities: frozenset, timeout_s: float,
                        rate_limit_bps: float | None = None, frame_bytes: int = PROBE_FRAME_BYTES,
                        session_id: bytes | None = None, kind: ChannelKind = ChannelKind.CONTROL):
    limiter = TokenBucket.for_rate(rate_limit_bps, max_frame_bytes=frame_bytes) \
        if rate_limit_bps else None
    return await open_channel(host, port, kind=kind, session_id=session_id or os.urandom(16),
                              ssl=ssl, server_hostname=server_hostname or host,
                              rate_limiter=limiter, capabilities=capabilities,
                              timeout_s=timeout_s)


async def _round_trip_ms(ch, timeout_s: float) -> float:
    """The median of PING_COUNT Ping/Pong round trips."""
    rtts_ms = []
    for nonce in range(PING_COUNT):
        t0 = time.perf_counter()
        await ch.send(Ping(nonce))
        # The protocol's state allows the destination only a Pong (or
        # Abort) after a Ping; whether it echoes the nonce is content.
        pong = await _recv(ch, timeout_s)
        if pong.nonce != nonce:
            raise RemoteProtocolError(f"Pong({pong.nonce}) does not answer Ping({nonce})",
                                      phase="handshake")
        rtts_ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(rtts_ms))


async def _control_probe(ch, rtt_ms: float, *, max_bytes: int, max_time_s: float,
                         rate_limit_bps: float | None, timeout_s: float,
                         frame_bytes: int) -> BandwidthProbe:
    """ProbeData frames on the control channel ``ch``, ProbeEnd, ProbeResult."""
    filler = np.random.default_rng().integers(0, 256, frame_bytes, dtype=np.uint8)
    view = memoryview(filler)
    # One frame more than the budget: the first only starts the receiver's clock.
    frames = sent = 0
    deadline = time.monotonic() + max_time_s
    while frames == 0 or (sent < max_bytes + frame_bytes and time.monotonic() < deadline):
        await ch.send(ProbeData(frames, view))
        frames += 1
        sent += frame_bytes
    await ch.send(ProbeEnd(frames, sent))
    # A ProbeResult, the one answer to ProbeEnd the protocol's state allows.
    result = await _recv(ch, timeout_s + max_time_s)
    duration_s = result.duration_ns / 1e9
    rate = result.bytes / duration_s if duration_s > 0 and result.bytes else math.inf
    return BandwidthProbe(rate, result.bytes, result.frames, duration_s, rtt_ms, sent,
                          rate_limit_bps)


async def _recv(ch, timeout_s: float):
    return await streamprobe.recv_answer(ch, timeout_s, "the probe", " (an older livemig "
                                         "without the bandwidth probe?)")


@dataclass(frozen=True)
class Plan:
    memory_bytes: int
    max_downtime_ms: float
    """The configured limit (``downtime_ms`` in the dict form, as users set it)."""
    bandwidth_bps: float
    """What the prediction used: min(measured, configured cap)."""
    probe: LinkEstimate
    """The probe the rate came from ("streams" or "control") and why."""
    dirty: object           # dirtyrate.DirtyRateReport
    prediction: Prediction

    def to_dict(self) -> dict:
        return {"memory_bytes": self.memory_bytes, "downtime_ms": self.max_downtime_ms,
                "bandwidth_bps": finite_or_none(self.bandwidth_bps),
                "probe": self.probe.to_dict(),
                "dirty_rate": self.dirty.to_dict(), "prediction": self.prediction.to_dict()}


def predict_for(bandwidth_bps: float, dirty_rate_bps: float, memory_bytes: int,
                config: MigrationConfig) -> tuple[float, Prediction]:
    """(bandwidth used, prediction) for measured numbers under ``config``."""
    bw = bandwidth_bps
    if config.max_bandwidth_bps:
        bw = min(bw, config.max_bandwidth_bps)
    return bw, predict(bw, dirty_rate_bps, memory_bytes, config.max_downtime_ms,
                       max_rounds=config.max_rounds)


async def plan_migration(vm, host: str, port: int, *, config: MigrationConfig | None = None,
                         ssl=None, server_hostname: str | None = None, window_s: float = 1.0,
                         probe_bytes: int = 64 << 20, probe_time_s: float = 1.0,
                         tracker: str = "auto") -> Plan:
    """Probe the link to ``host:port``, measure ``vm``'s dirty rate, predict."""
    from .dirtyrate import measure_dirty_rate

    config = config or MigrationConfig()
    probe = await probe_link(host, port, config=config, ssl=ssl,
                             server_hostname=server_hostname, max_bytes=probe_bytes,
                             max_time_s=probe_time_s)
    dirty = await asyncio.get_running_loop().run_in_executor(
        None, lambda: measure_dirty_rate(vm, window_s, tracker=tracker))
    bw, prediction = predict_for(probe.bytes_per_s, dirty.bytes_per_s,
                                 vm.memory.length_bytes, config)
    return Plan(vm.memory.length_bytes, config.max_downtime_ms, bw, probe, dirty, prediction)


def _probe_words(probe: dict) -> str:
    if probe.get("kind") == "streams":
        st = probe["streams"]
        return (f"native streams ×{st['nstreams']} ({len(st['rounds'])} rounds; CPU "
                f"{st['source_cpu_s']:.2f} s here, {st['dest_cpu_s']:.2f} s there)")
    return f"control channel ({probe.get('fallback_reason') or 'no reason given'})"


def format_plan(p: dict) -> str:
    pr, probe, dr = p["prediction"], p["probe"], p["dirty_rate"]
    lines = [
        f"link: {format_mib_per_s(probe['bytes_per_s'])} measured "
        f"({probe['bytes'] / MIB:.0f} MiB in {probe['duration_s']:.2f} s), "
        f"RTT {probe['rtt_ms']:.2f} ms"
        + (f", capped at {format_mib_per_s(probe['rate_limit_bps'])} in-process"
           if probe.get("rate_limit_bps") else ""),
        "probe: " + _probe_words(probe),
        f"dirty rate: {format_mib_per_s(dr['bytes_per_s'])} ({dr['method']}, "
        f"{dr['window_s']:.1f} s)",
        f"memory {p['memory_bytes'] / MIB:,.0f} MiB, downtime limit {p['downtime_ms']:g} ms",
        f"prediction: {'converges' if pr['converges'] else 'does NOT converge'} — {pr['reason']}",
        f"  rounds {pr['rounds']}, expected downtime "
        + ("-" if pr["expected_downtime_ms"] is None else f"{pr['expected_downtime_ms']:.1f} ms")
        + ", total " + ("-" if pr["total_time_s"] is None else f"{pr['total_time_s']:.2f} s")
        + f", {pr['total_bytes'] / MIB:,.1f} MiB sent",
        f"  recommended mode: {pr['recommended_mode']}",
    ]
    return "\n".join(lines)


__all__ = ["BandwidthProbe", "Plan", "probe_bandwidth", "probe_link", "plan_migration",
           "predict_for", "format_plan"]
