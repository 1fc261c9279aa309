"""The post-copy push on native streams: a source thread in post-copy mode and a
destination thread placing through userfaultfd, joined by a socketpair."""
import socket
import struct

import numpy as np
import pytest

from livemig.codec.digest import PageHashes
from livemig.errors import RemoteProtocolError
from livemig.native import postcopy
from livemig.native.memory import GuestMemory
from livemig.native.postcopy import PostcopyMemory
from livemig.native.streams import PostcopyDestStream, SourceStream, probe
from livemig.protocol import spec, wire
from livemig.protocol.events import PageBatch

from test_streams import PAGE, V2, _filled, _raw_batch, _send_round, _wait

NPAGES = 512
OK, WHY = probe()
pytestmark = [pytest.mark.skipif(not OK, reason=f"native streams: {WHY}"),
              pytest.mark.skipif(not postcopy.probe().missing,
                                 reason=f"userfaultfd: {postcopy.probe().reason}")]
RAW, LZ4 = spec.ENCODINGS["raw"], spec.ENCODINGS["lz4"]


class PushPair:
    """A post-copy source thread and a destination thread over userfaultfd
    memory with every page missing."""

    def __init__(self, src_mem):
        self.dst_mem = GuestMemory(src_mem.npages * PAGE)
        self.pm = PostcopyMemory(self.dst_mem)
        self.sent = PageHashes(src_mem.npages)
        self.landed = PageHashes(src_mem.npages)
        self.src = SourceStream(src_mem, self.sent.values)
        self.src.use_postcopy()
        self.dst = PostcopyDestStream(self.pm, self.landed.values)
        a, b = socket.socketpair()
        self.src.attach_fd(a.detach(), version=V2)
        self.dst.attach_fd(b.detach(), version=V2)

    def close(self):
        self.src.close()
        self.dst.close()
        self.pm.close(abandon=True)
        self.dst_mem.close()


def test_pushed_pages_land_through_userfaultfd_with_their_hashes():
    src_mem = _filled(npages=NPAGES)
    pair = PushPair(src_mem)
    try:
        # a page the urgent path placed first: skipped (EEXIST), nothing lost
        pair.pm.place(7, src_mem.pages[7:8].tobytes(), 1)
        _send_round(pair.src, 0, np.arange(NPAGES // 2))
        _send_round(pair.src, 1, np.arange(NPAGES // 2, NPAGES))
        _wait(pair.dst, lambda: pair.dst.stats()["rounds"] == 2, "both rounds placed")
        assert pair.pm.missing == 0
        assert np.array_equal(pair.dst_mem.pages, src_mem.pages)
        want = PageHashes.of_memory(src_mem.pages)
        assert pair.landed.digest() == pair.sent.digest() == want.digest()
        assert pair.pm.stats["eexist_pages"] >= 1
    finally:
        pair.close()
        src_mem.close()


def _feed(pm, hashes, frames_flags, batch):
    """Send one PageBatch with these flags to a post-copy destination thread;
    returns its failure."""
    dst = PostcopyDestStream(pm, hashes)
    a, sock = socket.socketpair()
    dst.attach_fd(a.detach(), version=V2)
    try:
        data, npages = batch
        frame = b"".join(bytes(p) for p in wire.encode_frame(
            PageBatch.WIRE_ID, frames_flags, 0,
            [struct.pack(spec.PAGE_BATCH_FORMAT, 0, npages, 0), data], version=V2))
        sock.sendall(frame)
        return _wait(dst, lambda: False, "a failure")
    finally:
        dst.close()
        sock.close()


@pytest.mark.parametrize("flags, batch, why", [
    (0, _raw_batch([(0, 1, RAW, PAGE)], 1), "post-copy (flags 0x2)"),
    (spec.BATCH_POSTCOPY, _raw_batch([(0, 1, LZ4, 16)], extra=b"x" * 16), "not carried"),
])
def test_a_postcopy_thread_refuses_precopy_frames_and_lz4(flags, batch, why):
    mem = GuestMemory(NPAGES * PAGE)
    pm = PostcopyMemory(mem)
    hashes = PageHashes(NPAGES)
    try:
        failure = _feed(pm, hashes.values, flags, batch)
        assert isinstance(failure, RemoteProtocolError) and why in str(failure), failure
        assert pm.missing == NPAGES       # nothing placed
    finally:
        pm.close(abandon=True)
        mem.close()
