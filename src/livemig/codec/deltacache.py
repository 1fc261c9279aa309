"""The source's bounded cache of last-sent page versions (DELTA bases).

A DELTA page is encoded against the exact bytes the receiver holds for that
page, so the cache stores the *snapshot that was sent*, not guest memory (the
guest may write a page between our reading it and the bytes leaving; QEMU's
XBZRLE sends from its cache copy for the same reason).

Storage is one slab ``uint8[nslots, 4096]`` (``nslots = capacity_bytes //
4096``, allocated lazily by the kernel since numpy's ``empty`` does not touch
it), ``slot_of[page]`` and ``page_of[slot]`` maps, and a reference bit per
slot. Replacement is CLOCK, vectorised per batch: the hand sweeps from where
it stopped, clearing reference bits and taking unreferenced slots; slots used
by the same batch are protected so a batch never evicts its own pages. Memory
is bounded by construction: the slab is the only per-page storage.
"""
from __future__ import annotations

import numpy as np

from ..native import PAGE_SIZE


class DeltaCache:
    def __init__(self, npages: int, capacity_bytes: int):
        self.nslots = max(0, int(capacity_bytes) // PAGE_SIZE)
        self.slab = np.empty((self.nslots, PAGE_SIZE), dtype=np.uint8)
        self.slot_of = np.full(npages, -1, dtype=np.int64)
        self.page_of = np.full(self.nslots, -1, dtype=np.int64)
        self.ref = np.zeros(self.nslots, dtype=np.bool_)
        self.hand = 0

    @property
    def capacity_bytes(self) -> int:
        return self.nslots * PAGE_SIZE

    def __len__(self) -> int:
        return int(np.count_nonzero(self.page_of >= 0))

    def lookup(self, pages: np.ndarray) -> np.ndarray:
        """Slot of each page, -1 when not cached (no side effects)."""
        return self.slot_of[pages]

    def assign(self, pages: np.ndarray) -> np.ndarray:
        """A slot for each (distinct) page: its own if cached, else a CLOCK victim.

        Returns -1 for pages that got no slot (more new pages than free
        capacity: the earliest ones are left out). The caller must fill newly
        assigned slots before the next call."""
        slots = self.slot_of[pages].copy()
        if self.nslots == 0:
            return slots
        have = slots >= 0
        self.ref[slots[have]] = True
        new_pos = np.flatnonzero(~have)
        protected = np.zeros(self.nslots, dtype=np.bool_)
        protected[slots[have]] = True
        room = self.nslots - int(np.count_nonzero(protected))
        if new_pos.size > room:
            new_pos = new_pos[new_pos.size - room:]
        k = new_pos.size
        if k == 0:
            return slots
        order = (self.hand + np.arange(self.nslots)) % self.nslots
        free_first = order[~self.ref[order] & ~protected[order]]
        if free_first.size >= k:
            chosen = free_first[:k]
            # every slot the hand passed loses its second chance
            last = int(np.flatnonzero(order == chosen[-1])[0])
            self.ref[order[:last + 1]] = False
            self.hand = (int(chosen[-1]) + 1) % self.nslots
        else:
            # a full sweep clears every reference bit; take the rest in hand order
            self.ref[:] = False
            rest = order[~protected[order] & ~np.isin(order, free_first)]
            chosen = np.concatenate((free_first, rest[:k - free_first.size]))
            self.hand = (int(chosen[-1]) + 1) % self.nslots
        evicted = self.page_of[chosen]
        self.slot_of[evicted[evicted >= 0]] = -1
        self.page_of[chosen] = pages[new_pos]
        self.slot_of[pages[new_pos]] = chosen
        self.ref[chosen] = True
        slots[new_pos] = chosen
        return slots

    def drop(self, pages: np.ndarray) -> None:
        """Forget the cached versions of these pages."""
        slots = self.slot_of[pages]
        slots = slots[slots >= 0]
        self.page_of[slots] = -1
        self.ref[slots] = False
        self.slot_of[pages] = -1


__all__ = ["DeltaCache"]
