"""LZ4 on the native bulk streams, and where pages and their versions land.

The source thread sends a run of RAW pages as LZ4 only where the codec's
rule says it pays (docs/codec.md); the destination thread decodes every LZ4
run of a batch before it places any page of it. The Python codec is the
reference peer in both directions. A corrupted LZ4 frame fails its checksum;
an LZ4 block that passes the checksum but does not decode to its pages (a
hostile peer) ends the thread with a reason, and nothing of the batch lands.
"""
import socket
import struct

import lz4.block

import numpy as np
import pytest

from livemig.codec.blockdelta import Fingerprints, HeldBlocks
from livemig.codec.decoder import BatchDecoder
from livemig.codec.digest import PageHashes
from livemig.codec.encoder import BatchEncoder
from livemig.config import CodecConfig
from livemig.errors import RemoteProtocolError
from livemig.native.memory import GuestMemory
from livemig.native.streams import BATCH_PAGES, DestStream, SourceStream
from livemig.protocol import spec, wire
from livemig.protocol.events import PageBatch, StreamAck, StreamEnd
from test_streams import (LZ4, OK, PAGE, V2, WHY, Feeder, _raw_batch, _read_frames, _send_round,
                          _wait)

NPAGES = 1024
CHUNK_PAGES = 16
pytestmark = pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")


def _compressible(seed=4, npages=NPAGES):
    """Pages of a few set words each (as the toy workloads write them), with
    every fourth page random and every fifth zero."""
    rng = np.random.default_rng(seed)
    mem = GuestMemory(npages * PAGE)
    words = mem.words.reshape(npages, PAGE // 8)
    words[:, ::64] = rng.integers(1, 1000, size=words[:, ::64].shape, dtype=np.uint64)
    words[::4] = rng.integers(0, 2**63, size=words[::4].shape, dtype=np.uint64)
    mem.pages[::5] = 0
    return mem


def _random(seed=6, npages=NPAGES):
    mem = GuestMemory(npages * PAGE)
    mem.words[:] = np.random.default_rng(seed).integers(0, 2**63, size=mem.words.shape,
                                                        dtype=np.uint64)
    return mem


class LZ4Pair:
    """A source thread with LZ4 on and a destination thread, over a socketpair."""

    def __init__(self, src_mem, dst_mem, *, blocks=True):
        a, b = socket.socketpair()
        self.sent = PageHashes(src_mem.npages)
        self.landed = PageHashes(dst_mem.npages)
        self.held = np.zeros(dst_mem.npages, dtype=bool)
        self.src = SourceStream(src_mem, self.sent.values,
                                Fingerprints(src_mem.npages) if blocks else None)
        ok, why = self.src.use_lz4(CHUNK_PAGES, 12.5)
        if not ok:
            pytest.skip(f"no liblz4 here: {why}")
        self.dst = DestStream(dst_mem, self.landed.values, self.held,
                              HeldBlocks(dst_mem.npages) if blocks else None)
        self.src.attach_fd(a.detach(), version=V2)
        self.dst.attach_fd(b.detach(), version=V2)

    def close(self):
        self.src.close()
        self.dst.close()


def _lz4_batch_bytes(npages=4):
    """A Python-encoded batch of npages compressible pages that goes LZ4."""
    mem = _compressible(npages=npages)
    mem.pages[:] = 7
    enc = BatchEncoder(mem, CodecConfig(encodings=("lz4", "raw")))
    (batch,) = enc.encode(np.arange(npages, dtype=np.uint64), 1 << 20, frozen=True)
    assert batch.pages_by_encoding["lz4"] == npages
    mem.close()
    return batch.tobytes(), npages


@pytest.mark.parametrize("blocks", [True, False])
def test_lz4_pages_land_bit_identical_on_both_sides(blocks):
    src_mem, dst_mem = _compressible(), GuestMemory(NPAGES * PAGE)
    pair = LZ4Pair(src_mem, dst_mem, blocks=blocks)
    try:
        _send_round(pair.src, 0, np.arange(NPAGES))
        _wait(pair.dst, lambda: pair.dst.round_counts() is not None, "the destination's marker")
        assert np.array_equal(src_mem.pages, dst_mem.pages)
        assert np.array_equal(pair.landed.values, PageHashes.of_memory(src_mem.pages).values)
        assert np.array_equal(pair.sent.values, pair.landed.values)
        st, dt = pair.src.stats(), pair.dst.stats()
        assert st["lz4_pages"] > NPAGES // 2 and dt["lz4_pages"] == st["lz4_pages"]
        # every LZ4 run saved at least the rule's 12.5 %
        assert dt["lz4_bytes"] == st["lz4_bytes"] <= 0.875 * st["lz4_pages"] * PAGE
        assert st["zero_pages"] == len(range(0, NPAGES, 5))
        # a run mixing random and sparse pages is judged whole (docs/codec.md)
        assert st["raw_pages"] + st["lz4_pages"] + st["zero_pages"] + st["block_pages"] == NPAGES
        assert st["batch_bytes"] < NPAGES * PAGE // 2
    finally:
        pair.close()
        src_mem.close()
        dst_mem.close()


def test_incompressible_memory_stays_raw_and_is_probed_rarely():
    src_mem, dst_mem = _random(), GuestMemory(NPAGES * PAGE)
    pair = LZ4Pair(src_mem, dst_mem)
    try:
        _send_round(pair.src, 0, np.arange(NPAGES))
        st = pair.src.stats()
        assert st["lz4_pages"] == 0 and st["raw_pages"] == NPAGES
        nbatches = NPAGES // BATCH_PAGES
        # a miss skips the probe for the following 31 batches
        assert 1 <= st["lz4_probes"] <= -(-nbatches // 32)
        _wait(pair.dst, lambda: pair.dst.round_counts() is not None, "the destination's marker")
        assert np.array_equal(src_mem.pages, dst_mem.pages)
    finally:
        pair.close()
        src_mem.close()
        dst_mem.close()


def test_source_lz4_batches_decode_with_the_python_codec():
    src_mem, dst_mem = _compressible(seed=8), GuestMemory(NPAGES * PAGE)
    a, b = socket.socketpair()
    sent = PageHashes(NPAGES)
    src = SourceStream(src_mem, sent.values)
    ok, why = src.use_lz4(CHUNK_PAGES, 12.5)
    if not ok:
        pytest.skip(f"no liblz4 here: {why}")
    src.attach_fd(a.detach(), version=V2)
    try:
        pages = np.arange(NPAGES, dtype=np.uint64)
        src.send_round(1, pages)
        frames = _read_frames(b, NPAGES // BATCH_PAGES + 1)
        decoder = BatchDecoder(dst_mem)
        total = lz4_pages = 0
        for ev in frames[:-1]:
            assert isinstance(ev, PageBatch)
            got = decoder.apply(ev.data)
            total += got.nbytes
            lz4_pages += got.pages_by_encoding["lz4"]
        assert frames[-1] == StreamEnd(1, NPAGES, total)
        assert lz4_pages == src.stats()["lz4_pages"] > 0
        b.sendall(b"".join(bytes(p) for p in wire.encode_frame(
            StreamAck.WIRE_ID, 0, 0, list(StreamAck(1, NPAGES).encode()[1]), version=V2)))
        assert _wait(src, lambda: src.round_counts() is not None, "the ack") is None
        assert np.array_equal(dst_mem.pages, src_mem.pages)
        assert np.array_equal(decoder.hashes.values, sent.values)
    finally:
        src.close()
        b.close()
        src_mem.close()
        dst_mem.close()


def test_destination_places_python_lz4_batches():
    src_mem = _compressible(seed=10)
    feeder = Feeder()
    try:
        enc = BatchEncoder(src_mem, CodecConfig(encodings=("zero", "lz4", "raw"),
                                                lz4_chunk_pages=CHUNK_PAGES))
        # a stream batch holds at most BATCH_PAGES pages: so many per encode
        batches = []
        for first in range(0, NPAGES, BATCH_PAGES):
            batches += enc.encode(np.arange(first, first + BATCH_PAGES, dtype=np.uint64),
                                  1 << 20, frozen=True)
        assert sum(bt.pages_by_encoding["lz4"] for bt in batches) > 0
        for bt in batches:
            feeder.batch(0, bt.tobytes(), bt.npages)
        feeder.end(0, NPAGES, sum(bt.nbytes for bt in batches))
        assert feeder.ack() == StreamAck(0, NPAGES)
        assert np.array_equal(feeder.mem.pages, src_mem.pages) and feeder.held.all()
        assert np.array_equal(feeder.hashes.values, PageHashes.of_memory(src_mem.pages).values)
        assert feeder.dst.stats()["lz4_pages"] > 0
    finally:
        feeder.close()
        src_mem.close()


def test_a_corrupted_lz4_frame_fails_its_checksum_and_nothing_lands():
    batch, npages = _lz4_batch_bytes()
    feeder = Feeder()
    try:
        prefix_bytes = struct.calcsize(spec.PAGE_BATCH_FORMAT)
        feeder.batch(0, batch, npages, corrupt_at=wire.HEADER.size + prefix_bytes + len(batch) - 3)
        failure = feeder.failure()
        assert isinstance(failure, RemoteProtocolError) and "checksum" in str(failure), failure
        assert not feeder.mem.pages.any() and not feeder.held.any()
    finally:
        feeder.close()


def _garbage_lz4():
    """An LZ4 run whose block names a match before its start: it passes the
    checksum (the framer makes it) but cannot decode."""
    return _raw_batch([(0, 1, LZ4, 4)], extra=b"\x0f\xff\xff\xff")


@pytest.mark.parametrize("case, why", [
    ("does not decode", "does not decompress"),
    ("decodes short", "does not decompress"),
    ("bigger than its bound", "LZ4 run"),
    ("more pages than a batch", "more than"),
])
def test_hostile_lz4_runs_end_the_thread_and_place_nothing(case, why):
    if case == "does not decode":
        batch, npages = _garbage_lz4()
    elif case == "decodes short":
        # one page's worth of LZ4 announced as two pages
        block = lz4.block.compress(b"\x07" * PAGE, store_size=False)
        batch, npages = _raw_batch([(0, 2, LZ4, len(block))], extra=block)
    elif case == "bigger than its bound":
        batch, npages = _raw_batch([(0, 1, LZ4, 2 * PAGE)], extra=b"\x00" * (2 * PAGE))
    else:
        n = BATCH_PAGES + 1
        batch, npages = _raw_batch([(0, n, LZ4, 64)], extra=b"\x00" * 64)
    feeder = Feeder()
    try:
        feeder.batch(0, batch, npages)
        failure = feeder.failure()
        assert isinstance(failure, RemoteProtocolError) and why in str(failure), failure
        assert not feeder.mem.pages.any() and not feeder.held.any()
    finally:
        feeder.close()


def test_zero_pages_land_as_zeros_over_what_was_held():
    src_mem, dst_mem = _random(seed=11), _random(seed=12)
    pair = LZ4Pair(src_mem, dst_mem)
    try:
        _send_round(pair.src, 0, np.arange(NPAGES))
        src_mem.pages[::3] = 0
        _send_round(pair.src, 1, np.arange(0, NPAGES, 3))
        _wait(pair.dst, lambda: (c := pair.dst.round_counts()) is not None and c.round == 1,
              "round 1 at the destination")
        assert not dst_mem.pages[::3].any()
        assert np.array_equal(src_mem.pages, dst_mem.pages)
        zero_hash = PageHashes.of_memory(np.zeros((1, PAGE), np.uint8)).values[0]
        assert (pair.landed.values[::3] == zero_hash).all()
    finally:
        pair.close()
        src_mem.close()
        dst_mem.close()


def test_a_pages_versions_land_in_order_whatever_their_encoding():
    src_mem, dst_mem = _compressible(seed=13), GuestMemory(NPAGES * PAGE)
    pair = LZ4Pair(src_mem, dst_mem)
    rng = np.random.default_rng(13)
    page = 100
    try:
        versions = [
            lambda p: p.__setitem__(slice(None), 0),                            # ZERO
            lambda p: p.__setitem__(slice(None), rng.integers(0, 255, PAGE)),    # RAW
            lambda p: p.__setitem__(slice(0, 8), 42),                            # BLOCK
            lambda p: p.__setitem__(slice(None), 9),                             # LZ4
        ]
        _send_round(pair.src, 0, np.arange(NPAGES))
        for k, write in enumerate(versions * 2, start=1):
            write(src_mem.pages[page])
            stripe = np.arange(page - 20, page + 20)   # neighbours make runs of each kind
            _send_round(pair.src, k, stripe)
            _wait(pair.dst, lambda: (c := pair.dst.round_counts()) is not None and c.round == k,
                  f"round {k} at the destination")
            assert np.array_equal(dst_mem.pages[page], src_mem.pages[page]), f"version {k}"
        assert np.array_equal(src_mem.pages, dst_mem.pages)
        assert np.array_equal(pair.landed.values, PageHashes.of_memory(dst_mem.pages).values)
    finally:
        pair.close()
        src_mem.close()
        dst_mem.close()
