"""``livemig plan``: a migration's dry run — bandwidth probe, dirty rate, prediction.

Theory of operation
-------------------
Pre-copy converges when the dirty rate stays well below the bandwidth
(policy.py). A plan measures both where the migration would measure them:

1. **Bandwidth** to the destination daemon, over the migration protocol
   itself: a control channel is opened exactly as a migration opens it (same
   TLS, same in-process rate limiter when ``max_bandwidth_bps`` is set), a
   few Ping/Pong exchanges give the round-trip time, then incompressible
   ProbeData frames stream for ``probe_time_s`` or ``probe_bytes``, and the
   destination answers ProbeEnd with the bytes it received and the time it
   took on its own clock, counted from the first frame's arrival (so
   connection set-up and the first TCP window do not count). The channel is
   then closed before any MigrationOffer: the destination allocates nothing.
   Probing through the protocol rather than a side socket measures what a
   migration gets: the same port, TLS record overhead, framing and flow
   control, and whatever shaping the path has.
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
from ..aio.deadline import within
from ..aio.ratelimit import TokenBucket
from ..config import MigrationConfig
from ..errors import RemoteProtocolError
from ..policy import Prediction, predict
from ..protocol import Abort, ChannelKind, Ping, ProbeData, ProbeEnd
from ..units import MIB, finite_or_none, format_mib_per_s

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
    limiter = TokenBucket.for_rate(rate_limit_bps, max_frame_bytes=frame_bytes) \
        if rate_limit_bps else None
    ch = await open_channel(host, port, kind=ChannelKind.CONTROL, session_id=os.urandom(16),
                            ssl=ssl, server_hostname=server_hostname or host,
                            rate_limiter=limiter, timeout_s=timeout_s)
    try:
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
    finally:
        await ch.close()
    duration_s = result.duration_ns / 1e9
    rate = result.bytes / duration_s if duration_s > 0 and result.bytes else math.inf
    return BandwidthProbe(rate, result.bytes, result.frames, duration_s,
                          float(np.median(rtts_ms)), sent, rate_limit_bps)


async def _recv(ch, timeout_s: float):
    try:
        event = await within(ch.recv(), timeout_s)
    except asyncio.TimeoutError:
        raise RemoteProtocolError(f"the destination did not answer the probe within "
                                  f"{timeout_s:g} s", phase="handshake") from None
    if event is None:
        raise RemoteProtocolError("the destination closed the connection during the probe "
                                  "(an older livemig without the bandwidth probe?)",
                                  phase="handshake")
    if isinstance(event, Abort):
        raise RemoteProtocolError(f"the destination aborted the probe: {event.reason}",
                                  phase="handshake")
    return event


@dataclass(frozen=True)
class Plan:
    memory_bytes: int
    max_downtime_ms: float
    """The configured limit (``downtime_ms`` in the dict form, as users set it)."""
    bandwidth_bps: float
    """What the prediction used: min(measured, configured cap)."""
    probe: BandwidthProbe
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
    probe = await probe_bandwidth(host, port, ssl=ssl, server_hostname=server_hostname,
                                  max_bytes=probe_bytes, max_time_s=probe_time_s,
                                  rate_limit_bps=config.max_bandwidth_bps,
                                  timeout_s=config.handshake_timeout_s)
    dirty = await asyncio.get_running_loop().run_in_executor(
        None, lambda: measure_dirty_rate(vm, window_s, tracker=tracker))
    bw, prediction = predict_for(probe.bytes_per_s, dirty.bytes_per_s,
                                 vm.memory.length_bytes, config)
    return Plan(vm.memory.length_bytes, config.max_downtime_ms, bw, probe, dirty, prediction)


def format_plan(p: dict) -> str:
    pr, probe, dr = p["prediction"], p["probe"], p["dirty_rate"]
    lines = [
        f"link: {format_mib_per_s(probe['bytes_per_s'])} measured "
        f"({probe['bytes'] / MIB:.0f} MiB in {probe['duration_s']:.2f} s), "
        f"RTT {probe['rtt_ms']:.2f} ms"
        + (f", capped at {format_mib_per_s(probe['rate_limit_bps'])} in-process"
           if probe.get("rate_limit_bps") else ""),
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


__all__ = ["BandwidthProbe", "Plan", "probe_bandwidth", "plan_migration", "predict_for",
           "format_plan"]
