"""One stop at a time among a host's outgoing pre-copy migrations.

Theory of operation
-------------------
A migration's downtime estimate assumes it has the link and the CPUs to
itself while its guest is paused. Two migrations from the same host share
both: when one pauses its guest and sends its last pages, the other's round
traffic competes with them, and the stop lasts many times its estimate (3.6 s
against a 300 ms limit was seen). So a host's migrations share one
:class:`StopSlot`:

* a migration whose policy says "switch over" takes the slot if it is free
  and stops; if another migration holds it, it does not stop now — its guest
  keeps running and it sends one more round, then asks the policy again (the
  dirty set it stops with is then a fresh one, so its estimate still holds);
* while a migration holds the slot, every other migration of the host holds
  back its running rounds before each page batch, so the stopped guest's last
  pages and handover have the link to themselves;
* the slot is given back as soon as the handover is decided (the VM runs at
  the destination, or resumed here).

Holding back is bounded by the holder's handover timeouts, which are shorter
than a destination's idle timeout, so a waiting migration is never given up
by its destination for the pause.
"""
from __future__ import annotations

import asyncio


class StopSlot:
    def __init__(self) -> None:
        self._holder: object | None = None
        self._free = asyncio.Event()
        self._free.set()

    @property
    def holder(self) -> object | None:
        return self._holder

    def try_take(self, owner: object) -> bool:
        """Take the slot for ``owner``; False if another migration holds it."""
        if self._holder is not None and self._holder is not owner:
            return False
        self._holder = owner
        self._free.clear()
        return True

    def give_back(self, owner: object) -> None:
        if self._holder is owner:
            self._holder = None
            self._free.set()

    async def let_pass(self, owner: object) -> None:
        """Wait while another migration is stopping."""
        while self._holder is not None and self._holder is not owner:
            await self._free.wait()
