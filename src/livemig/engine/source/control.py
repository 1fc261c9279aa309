"""What a host may ask of a running outgoing migration (the daemon's
commands): cancel it, change its bandwidth cap, switch it to post-copy, retry
a broken connection now. The session reads the requests at its own safe
points; a cancel interrupts a pre-copy at once, since a page batch may wait
long for a slow link's tokens."""
from __future__ import annotations

import asyncio

from ...aio.channel import Channel
from ...aio.ratelimit import TokenBucket
from .stopslot import StopSlot
from .streams import SourceStreams


class MigrationControl:
    """Requests a host may make of a running migration (daemon commands)."""

    def __init__(self, stop_slot: StopSlot | None = None):
        self.postcopy_requested = False
        self.stop_slot = stop_slot    # shared by a host's migrations: one stop at a time
        self.session_id: bytes | None = None    # set by the session: names it to the peer
        self.cancel_requested = False
        self._interruptible: asyncio.Task | None = None   # the session, while before the pause
        self._interrupted = False
        self._recover = asyncio.Event()
        self.limiter: TokenBucket | None = None     # the page streams' cap, if any
        self.streams: SourceStreams | None = None   # the native streams, while they run
        self._channels: list[Channel] = []
        self._batch_bytes = 0

    def request_cancel(self) -> None:
        """Abandon the migration before the pause: the VM runs on here.

        While pre-copy runs the session is interrupted at once (a page batch
        may wait many seconds for a slow link's tokens); once the session has
        left pre-copy for the switchover it is no longer interruptible, and
        the request only stops a session that has not got there yet."""
        self.cancel_requested = True
        task = self._interruptible
        if task is not None and not task.done():
            self._interrupted = True
            task.cancel()

    def set_max_bandwidth(self, bandwidth_bps: float | None) -> None:
        """Change the page streams' cap (bytes/s; None lifts it) from the
        next frame on."""
        self.limiter = (TokenBucket.for_rate(bandwidth_bps, max_frame_bytes=self._batch_bytes)
                        if bandwidth_bps else None)
        for ch in self._channels:
            ch.rate_limiter = self.limiter
        if self.streams is not None:
            self.streams.set_max_bandwidth(bandwidth_bps)

    def _paced(self, streams: SourceStreams) -> None:
        """Register the native streams for later changes of the cap, and
        give them the current one."""
        self.streams = streams
        streams.set_max_bandwidth(self.limiter.rate_bytes_per_s if self.limiter else None)

    def _capped(self, ch: Channel) -> Channel:
        """Register a page-stream channel for later changes of the cap."""
        self._channels = [c for c in self._channels if not c.closed] + [ch]
        return ch

    @property
    def past_precopy(self) -> bool:
        """The session has left pre-copy: a post-copy request no longer applies."""
        return self.session_id is not None and self._interruptible is None

    def request_postcopy(self) -> None:
        """Switch to post-copy after the current round (pre-copy or hybrid)."""
        self.postcopy_requested = True

    def recover_now(self) -> None:
        """Retry a broken post-copy (or post-Commit) connection now instead of
        after the backoff."""
        self._recover.set()
