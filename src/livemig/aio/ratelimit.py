"""Token bucket for bandwidth caps, with the clock injected.

The bucket holds up to ``burst_bytes`` tokens and refills at
``rate_bytes_per_s``. ``reserve(nbytes, now)`` is pure arithmetic: it takes the
tokens at once (the balance may go negative, so a frame larger than the burst
still passes, and the debt delays the frames after it) and returns how long
the caller must wait before sending. Keeping the debt rather than refusing
keeps the long-run rate exact whatever the frame sizes. ``consume(nbytes)``
is the async wrapper the channel awaits before writing a frame; its clock
(``now``) and ``sleep`` are parameters, so tests drive it with a fake clock.

The burst rule. A stream capped at a bandwidth gets its bucket from
:meth:`TokenBucket.for_rate`, whose burst is :func:`burst_bytes_for`, the one
place the burst is chosen (the native streams' cap, native/pace.py, is set
with it too):
``max(2 × the largest frame, MIN_BURST_BYTES)``. Two frames, so a frame can
leave while the next is being encoded without each one waiting for its own
tokens; at least ``MIN_BURST_BYTES``, so small frames do not each cost a
timer wake-up. The burst is not scaled with the rate: it is what passes
unshaped after an idle spell (and at the start), and the first round's
measured bandwidth, on which the convergence policy acts, must be the cap's
and not a burst's. The migration and ``livemig plan``'s probe use the same
rule, so the probe measures the limiter the migration would run under.
"""
from __future__ import annotations

import asyncio
import time

from ..errors import ConfigError


MIN_BURST_BYTES = 1 << 20
"""The smallest burst :meth:`TokenBucket.for_rate` gives, whatever the frames."""


def burst_bytes_for(max_frame_bytes: int) -> int:
    """The burst of a bucket whose frames are at most ``max_frame_bytes``."""
    return max(2 * int(max_frame_bytes), MIN_BURST_BYTES)


class TokenBucket:
    def __init__(self, rate_bytes_per_s: float, burst_bytes: int, *,
                 now=time.monotonic, sleep=asyncio.sleep):
        if rate_bytes_per_s <= 0:
            raise ConfigError(f"rate must be positive, got {rate_bytes_per_s}")
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        self.burst_bytes = int(burst_bytes)
        if self.burst_bytes <= 0:
            raise ConfigError(f"burst must be positive, got {burst_bytes}")
        self._now = now
        self._sleep = sleep
        self._tokens = float(self.burst_bytes)
        self._stamp = now()
        self.consumed_bytes = 0
        self.waited_s = 0.0

    @classmethod
    def for_rate(cls, bandwidth_bps: float, *, max_frame_bytes: int, now=time.monotonic,
                 sleep=asyncio.sleep) -> "TokenBucket":
        """The bucket for a stream capped at ``bandwidth_bps`` (bytes/s) whose
        frames are at most ``max_frame_bytes``, with the burst rule above."""
        return cls(bandwidth_bps, burst_bytes_for(max_frame_bytes), now=now, sleep=sleep)

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst_bytes,
                               self._tokens + (now - self._stamp) * self.rate_bytes_per_s)
            self._stamp = now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` tokens; seconds to wait before they may be sent."""
        self._refill(now)
        self._tokens -= nbytes
        self.consumed_bytes += nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bytes_per_s

    async def consume(self, nbytes: int) -> None:
        delay_s = self.reserve(nbytes, self._now())
        if delay_s > 0:
            self.waited_s += delay_s
            await self._sleep(delay_s)
