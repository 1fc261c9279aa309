"""The stream probe's rounds at the source (engine/source/streamprobe.py):
they grow, stay within half the window, and two in a row never share a page,
so a round never lands on pages the destination is freshening."""
import asyncio

import numpy as np
import pytest

from livemig.engine.source import streamprobe
from livemig.engine.source.streams import RoundSent
from livemig.native import PAGE_SIZE

MiB = 1 << 20


class _Streams:
    """Sends nothing: records each round's pages, at a steady fake rate."""

    def __init__(self):
        self.rounds: list[np.ndarray] = []

    async def send_round(self, index, pages, stall_timeout_s):
        assert index == len(self.rounds)
        self.rounds.append(pages.copy())
        return RoundSent(len(pages), len(pages) * PAGE_SIZE, 0)


@pytest.mark.parametrize("window_mib,budget_mib", [(64, 64), (64, 256), (8, 64), (1, 8)])
def test_rounds_grow_and_two_in_a_row_never_share_a_page(window_mib, budget_mib):
    npages = window_mib * MiB // PAGE_SIZE
    fake = _Streams()
    rounds = asyncio.run(streamprobe._rounds(fake, npages, 60.0, budget_mib * MiB, 10.0, None))
    assert len(rounds) == len(fake.rounds) >= 2
    assert sum(b for b, _ in rounds) >= budget_mib * MiB
    for pages in fake.rounds:
        assert pages.dtype == np.uint64 and np.all(np.diff(pages.astype(np.int64)) > 0)
        assert int(pages.max()) < npages and len(pages) <= max(1, npages // 2)
    for before, after in zip(fake.rounds, fake.rounds[1:]):
        assert not np.intersect1d(before, after).size
    sizes = [len(p) for p in fake.rounds]
    assert sizes[0] == min(npages // 2, streamprobe.FIRST_ROUND_BYTES // PAGE_SIZE)
    assert max(sizes) == min(npages // 2, budget_mib * MiB // PAGE_SIZE)
