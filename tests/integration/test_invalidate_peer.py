"""A source that misuses PageInvalidate or lies in its owed bitmap is refused,
and the destination frees what it registered for the session."""
import os

import numpy as np
import pytest

from livemig.native import postcopy
from livemig.aio.channel import open_channel
from livemig.engine.destination.server import MigrationServer
from livemig.codec.digest import PageHashes
from livemig.protocol import (Abort, Accept, ChannelKind, MigrationOffer, Mode, PageInvalidate,
                              RoundAck, Switchover, VerifyFailed)
from support.waiting import PATIENCE_S

pytestmark = pytest.mark.skipif(not postcopy.probe().missing,
                                reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")

NPAGES = 256


async def _offered(srv):
    ch = await open_channel("127.0.0.1", srv.port, kind=ChannelKind.CONTROL,
                            session_id=os.urandom(16), timeout_s=PATIENCE_S)
    await ch.send(MigrationOffer({"name": "hostile", "memory_bytes": NPAGES * 4096, "vcpus": 1},
                                 Mode.HYBRID, NPAGES))
    assert isinstance(await ch.recv(), Accept)
    return ch


def _uffd_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "userfaultfd" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def test_page_outside_memory_is_a_protocol_error(run):
    async def main():
        async with MigrationServer("127.0.0.1", 0) as srv:
            ch = await _offered(srv)
            await ch.send(PageInvalidate(0, np.array([NPAGES], dtype=np.uint64)))
            reply = await ch.recv()
            assert isinstance(reply, Abort) and "page 256" in reply.reason
            await ch.close()
            assert not srv.sessions
    before = _uffd_fds()
    run(main())
    assert _uffd_fds() == before


def test_owed_bitmap_that_disagrees_with_what_is_missing_is_refused(run):
    async def main():
        async with MigrationServer("127.0.0.1", 0) as srv:
            ch = await _offered(srv)
            # Nothing was sent, so every page is missing here; the source claims
            # it owes none. The digest is right (all hash entries blank).
            await ch.send(PageInvalidate(0, np.array([3], dtype=np.uint64)))
            assert await ch.recv() == RoundAck(0, 1)
            hashes = PageHashes(NPAGES)
            hashes.values[:] = 0
            owed = bytes(NPAGES // 8)
            await ch.send(Switchover(b"state", hashes.digest(), NPAGES, owed))
            reply = await ch.recv()
            assert isinstance(reply, VerifyFailed)
            assert f"owes 0 pages but {NPAGES} are missing" in reply.reason
            await ch.close()
            assert not srv.sessions
    before = _uffd_fds()
    run(main())
    assert _uffd_fds() == before
