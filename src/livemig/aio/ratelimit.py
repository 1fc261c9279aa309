"""Token bucket for bandwidth caps, with the clock injected.

The bucket holds up to ``burst_bytes`` tokens and refills at
``rate_bytes_per_s``. ``reserve(nbytes, now)`` is pure arithmetic: it takes the
tokens at once (the balance may go negative, so a frame larger than the burst
still passes, and the debt delays the frames after it) and returns how long
the caller must wait before sending. Keeping the debt rather than refusing
keeps the long-run rate exact whatever the frame sizes. ``consume(nbytes)``
is the async wrapper the channel awaits before writing a frame; its clock
(``now``) and ``sleep`` are parameters, so tests drive it with a fake clock.
"""
from __future__ import annotations

import asyncio
import time

from ..errors import ConfigError


class TokenBucket:
    def __init__(self, rate_bytes_per_s: float, burst_bytes: int | None = None, *,
                 now=time.monotonic, sleep=asyncio.sleep):
        if rate_bytes_per_s <= 0:
            raise ConfigError(f"rate must be positive, got {rate_bytes_per_s}")
        self.rate_bytes_per_s = float(rate_bytes_per_s)
        # Default burst: 50 ms of traffic, at least 64 KiB.
        self.burst_bytes = int(burst_bytes if burst_bytes is not None
                               else max(64 << 10, rate_bytes_per_s * 0.05))
        if self.burst_bytes <= 0:
            raise ConfigError("burst must be positive")
        self._now = now
        self._sleep = sleep
        self._tokens = float(self.burst_bytes)
        self._stamp = now()
        self.consumed_bytes = 0
        self.waited_s = 0.0

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
