"""The native bulk-stream threads (csrc/channels/lm_stream*.c) over socketpairs.

The Python codec is the reference peer: batches a source thread sends must
decode with the Python decoder to the same memory and hashes, and batches the
Python encoder makes (ZERO and RAW) must land through a destination thread;
BLOCK pages carry only the blocks that changed.
Hostile frames must end a thread with a reason and a typed error, never a
crash, and place nothing of the batch that broke the rules. Every wait is on
the thread's eventfd, with a generous timeout.
"""
import select
import socket
import struct
from pathlib import Path

import numpy as np
import pytest

from livemig.codec.blockdelta import Fingerprints, HeldBlocks
from livemig.codec.decoder import BatchDecoder
from livemig.codec.digest import PageHashes
from livemig.codec.encoder import BatchEncoder
from livemig.config import CodecConfig
from livemig.errors import ConnectionLost, LivemigError, RemoteProtocolError
from livemig.native.memory import GuestMemory
from livemig.native.streams import (BATCH_PAGES, STRIPE_PAGES, DestStream, SourceStream,
                                    partition, probe)
from livemig.protocol import spec, wire
from livemig.protocol.events import WIRE_IDS, PageBatch, StreamAck, StreamEnd, decode_event

PAGE = 4096
NPAGES = 1024
V2 = spec.STREAMS_VERSION
TIMEOUT_S = 20.0
OK, WHY = probe()
pytestmark = pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")


def _filled(seed=3, npages=NPAGES):
    """Random pages, with every third page zero."""
    mem = GuestMemory(npages * PAGE)
    mem.words[:] = np.random.default_rng(seed).integers(0, 2**63, size=mem.words.shape,
                                                        dtype=np.uint64)
    mem.pages[::3] = 0
    return mem


def _wait(stream, cond, what: str):
    """Until cond() or the thread failed, woken by its eventfd."""
    while True:
        stream.clear_notify()
        failure = stream.failure()
        if failure is not None or cond():
            return failure
        ready, _, _ = select.select([stream.fileno()], [], [], TIMEOUT_S)
        assert ready, f"no news from the stream thread while waiting for {what}"


def _send_round(src: SourceStream, index: int, pages) -> None:
    src.send_round(index, np.asarray(pages, dtype=np.uint64))
    failure = _wait(src, lambda: (c := src.round_counts()) is not None and c.round == index,
                    f"round {index}")
    assert failure is None, failure


class Pair:
    """A source and a destination thread joined by a socketpair; with
    ``blocks``, both keep block fingerprints (BLOCK pages)."""

    def __init__(self, src_mem, dst_mem, *, blocks=False):
        a, b = socket.socketpair()
        self.sent = PageHashes(src_mem.npages)
        self.landed = PageHashes(dst_mem.npages)
        self.held = np.zeros(dst_mem.npages, dtype=bool)
        self.fingerprints = Fingerprints(src_mem.npages) if blocks else None
        self.held_blocks = HeldBlocks(dst_mem.npages) if blocks else None
        self.src = SourceStream(src_mem, self.sent.values, self.fingerprints)
        self.dst = DestStream(dst_mem, self.landed.values, self.held, self.held_blocks)
        self.src.attach_fd(a.detach(), version=V2)
        self.dst.attach_fd(b.detach(), version=V2)

    def close(self):
        self.src.close()
        self.dst.close()


# -- partitioning ---------------------------------------------------------------------
@pytest.mark.parametrize("nstreams", [1, 2, 3, 4])
def test_partition_is_a_stable_split_by_stripe(nstreams):
    rng = np.random.default_rng(nstreams)
    everything = np.arange(100_000, dtype=np.uint64)
    owner = {}
    for k, part in enumerate(partition(everything, nstreams)):
        owner.update(dict.fromkeys(part.tolist(), k))
    for _ in range(5):
        subset = np.unique(rng.integers(0, 100_000, size=5000)).astype(np.uint64)
        parts = partition(subset, nstreams)
        assert len(parts) == nstreams
        assert np.array_equal(np.sort(np.concatenate(parts)), subset)   # a split, no loss
        for k, part in enumerate(parts):
            assert part.dtype == np.uint64 and np.all(np.diff(part.astype(np.int64)) > 0)
            # the same page always goes to the same stream, whatever the round holds
            assert all(owner[p] == k for p in part.tolist())
            assert all((p // STRIPE_PAGES) % nstreams == k for p in part.tolist())


# -- a source and a destination thread --------------------------------------------------------
def test_rounds_land_bit_identical_with_hashes_and_markers():
    src_mem, dst_mem = _filled(), GuestMemory(NPAGES * PAGE)
    pair = Pair(src_mem, dst_mem)
    try:
        _send_round(pair.src, 0, np.arange(NPAGES))
        _wait(pair.dst, lambda: pair.dst.round_counts() is not None, "the destination's marker")
        assert np.array_equal(src_mem.pages, dst_mem.pages)
        assert np.array_equal(pair.sent.values, PageHashes.of_memory(src_mem.pages).values)
        assert np.array_equal(pair.landed.values, pair.sent.values) and pair.held.all()
        counts = pair.src.round_counts()
        assert counts == pair.dst.round_counts() and counts.pages == NPAGES
        st = pair.src.stats()
        assert st["zero_pages"] == len(range(0, NPAGES, 3))
        assert st["raw_pages"] == NPAGES - st["zero_pages"]
        assert st["batches"] == NPAGES // BATCH_PAGES and st["rounds"] == 1

        # A page's later version overwrites the earlier one, in order: round 1
        # rewrites some pages, round 2 none (an empty part still closes).
        src_mem.words[5] += 1
        src_mem.pages[7] = 0
        src_mem.words[600] ^= 0xFF
        _send_round(pair.src, 1, [5, 7, 600])
        _send_round(pair.src, 2, [])
        assert pair.src.round_counts().round == 2 and pair.src.round_counts().pages == 0
        assert np.array_equal(src_mem.pages, dst_mem.pages)
        assert np.array_equal(pair.landed.values, PageHashes.of_memory(dst_mem.pages).values)
        assert pair.dst.stats()["rounds"] == 3
    finally:
        pair.close()
        src_mem.close()
        dst_mem.close()


def test_block_pages_carry_only_the_blocks_that_changed():
    src_mem, dst_mem = _filled(seed=8), GuestMemory(NPAGES * PAGE)
    pair = Pair(src_mem, dst_mem, blocks=True)
    try:
        _send_round(pair.src, 0, np.arange(NPAGES))
        assert pair.src.stats()["block_pages"] == 0   # nothing held there yet
        # One word in each of 100 pages, a whole page, and a page made zero.
        words = src_mem.words
        changed = np.arange(10, 310, 3)
        words[changed, 5] += 1
        words[2] = np.arange(words.shape[1], dtype=np.uint64) + 99
        src_mem.pages[4] = 0
        before = pair.src.stats()
        _send_round(pair.src, 1, np.union1d(changed, [2, 4]))
        st = pair.src.stats()
        assert st["block_pages"] - before["block_pages"] == changed.size
        assert st["block_bytes"] - before["block_bytes"] == changed.size * (2 + 256)
        assert st["raw_pages"] - before["raw_pages"] == 1
        assert st["zero_pages"] - before["zero_pages"] == 1
        _wait(pair.dst, lambda: pair.dst.stats()["rounds"] == 2, "round 1 there")
        assert pair.dst.stats()["block_pages"] == changed.size
        assert np.array_equal(src_mem.pages, dst_mem.pages)
        assert np.array_equal(pair.landed.values, PageHashes.of_memory(dst_mem.pages).values)
        assert np.array_equal(pair.landed.values, pair.sent.values)
        # The source's idea of what the receiver holds is what it holds. The
        # receiver keeps block hashes only of pages that had a BLOCK version.
        assert pair.fingerprints.valid.all()
        assert np.array_equal(np.flatnonzero(pair.held_blocks.valid), changed)
        assert np.array_equal(pair.fingerprints.table[changed], pair.held_blocks.table[changed])
        # A page's next RAW version makes its block hashes stale; the BLOCK
        # version after that still lands right.
        words[changed[:4]] = words[changed[:4]] * 3 + 1
        _send_round(pair.src, 2, changed[:4])
        words[changed[:4], 9] += 1
        _send_round(pair.src, 3, changed[:4])
        _wait(pair.dst, lambda: pair.dst.stats()["rounds"] == 4, "round 3 there")
        assert pair.dst.stats()["block_pages"] == changed.size + 4
        assert np.array_equal(src_mem.pages, dst_mem.pages)
        assert np.array_equal(pair.landed.values, PageHashes.of_memory(dst_mem.pages).values)
    finally:
        pair.close()
        src_mem.close()
        dst_mem.close()


def test_source_refuses_pages_outside_memory_and_a_second_round_in_flight():
    src_mem = _filled()
    a, b = socket.socketpair()
    src = SourceStream(src_mem, None)
    src.attach_fd(a.detach(), version=V2)
    try:
        with pytest.raises(LivemigError):
            src.send_round(0, np.array([NPAGES], dtype=np.uint64))
        src.send_round(0, np.array([1, 2, 3], dtype=np.uint64))   # the refusal queued nothing
        end = _read_frames(b, 2)[-1]
        assert isinstance(end, StreamEnd) and (end.round, end.pages) == (0, 3)
        # No StreamAck comes: round 0 stays in flight, so round 1 must wait.
        with pytest.raises(LivemigError) as info:
            src.send_round(1, np.array([4], dtype=np.uint64))
        assert "busy" in str(info.value).lower() or "EBUSY" in str(info.value)
        assert src.running
    finally:
        src.close()
        b.close()
        src_mem.close()


def _read_frames(sock, count):
    reader = wire.FrameReader(valid_types=WIRE_IDS.keys(), version=V2)
    frames = []
    while len(frames) < count:
        data = sock.recv(1 << 20)
        assert data, "the source thread closed the stream early"
        reader.feed(data)
        while (frame := reader.next_frame()) is not None:
            frames.append(decode_event(frame.type_id, frame.flags, frame.payload))
    return frames


def test_source_thread_speaks_the_python_codec():
    src_mem, dst_mem = _filled(seed=5), GuestMemory(NPAGES * PAGE)
    a, b = socket.socketpair()
    sent = PageHashes(NPAGES)
    src = SourceStream(src_mem, sent.values)
    src.attach_fd(a.detach(), version=V2)
    try:
        pages = np.arange(0, NPAGES, 2, dtype=np.uint64)
        src.send_round(4, pages)
        nbatches = -(-pages.size // BATCH_PAGES)
        frames = _read_frames(b, nbatches + 1)
        decoder = BatchDecoder(dst_mem)
        total = 0
        for ev in frames[:-1]:
            assert isinstance(ev, PageBatch) and ev.round == 4 and ev.flags == 0
            got = decoder.apply(ev.data)
            assert got.npages == ev.npages
            total += got.nbytes
        end = frames[-1]
        assert end == StreamEnd(4, pages.size, total)
        b.sendall(b"".join(bytes(p) for p in wire.encode_frame(
            StreamAck.WIRE_ID, 0, 0, list(StreamAck(4, pages.size).encode()[1]), version=V2)))
        failure = _wait(src, lambda: src.round_counts() is not None, "the ack")
        assert failure is None
        idx = pages.astype(np.int64)
        assert np.array_equal(dst_mem.pages[idx], src_mem.pages[idx])
        assert np.array_equal(decoder.hashes.values[idx], sent.values[idx])
    finally:
        src.close()
        b.close()
        src_mem.close()
        dst_mem.close()


# -- a destination thread fed by a scripted peer -------------------------------------------
class Feeder:
    """Frames to a destination thread, as the Python framer builds them."""

    def __init__(self, npages=NPAGES, *, blocks=True):
        self.mem = GuestMemory(npages * PAGE)
        self.hashes = PageHashes(npages)
        self.held = np.zeros(npages, dtype=bool)
        self.blocks = HeldBlocks(npages) if blocks else None
        self.dst = DestStream(self.mem, self.hashes.values, self.held, self.blocks)
        a, self.sock = socket.socketpair()
        self.dst.attach_fd(a.detach(), version=V2)
        self.seq = 0

    def send(self, type_id, payload_parts, *, flags=0, corrupt_at=None, version=V2):
        frame = b"".join(bytes(p) for p in wire.encode_frame(type_id, flags, self.seq,
                                                             payload_parts, version=version))
        if corrupt_at is not None:
            frame = bytearray(frame)
            frame[corrupt_at] ^= 0x40
        self.seq += 1
        self.sock.sendall(frame)

    def batch(self, round_index, batch_bytes: bytes, npages: int, **kw):
        self.send(PageBatch.WIRE_ID, [struct.pack(spec.PAGE_BATCH_FORMAT, round_index, npages, 0),
                                      batch_bytes], **kw)

    def end(self, round_index, pages, nbytes):
        self.send(StreamEnd.WIRE_ID, list(StreamEnd(round_index, pages, nbytes).encode()[1]))

    def ack(self):
        """The StreamAck the thread sends back."""
        return _read_frames(self.sock, 1)[0]

    def failure(self):
        return _wait(self.dst, lambda: False, "a failure")

    def close(self):
        self.dst.close()
        self.sock.close()
        self.mem.close()


def _python_batches(mem, pages):
    enc = BatchEncoder(mem, CodecConfig(encodings=("zero", "raw")))
    return list(enc.encode(np.asarray(pages, dtype=np.uint64), 1 << 20, frozen=True))


def test_destination_places_what_the_python_encoder_sends():
    src_mem = _filled(seed=9)
    feeder = Feeder()
    try:
        batches = _python_batches(src_mem, np.arange(NPAGES))
        for b in batches:
            feeder.batch(0, b.tobytes(), b.npages)
        feeder.end(0, NPAGES, sum(b.nbytes for b in batches))
        assert feeder.ack() == StreamAck(0, NPAGES)
        assert np.array_equal(feeder.mem.pages, src_mem.pages) and feeder.held.all()
        assert np.array_equal(feeder.hashes.values, PageHashes.of_memory(src_mem.pages).values)
        assert feeder.dst.round_counts().pages == NPAGES and feeder.dst.running
    finally:
        feeder.close()
        src_mem.close()


def _raw_batch(runs, payload_pages=0, *, extra=b"", magic=b"LMPB", version=1, flags=0,
               npages=None, payload_bytes=None):
    """A page batch from (first, count, encoding, payload_bytes) runs, with
    payload_pages pages of filler and ``extra`` bytes as its payload; returns
    (batch bytes, pages the header announces)."""
    table = b"".join(struct.pack(spec.BATCH_RUN_FORMAT, first, count, enc, 0, 0, 0, pb)
                     for first, count, enc, pb in runs)
    payload = b"\xa5" * (PAGE * payload_pages) + extra
    npages = sum(r[1] for r in runs) if npages is None else npages
    payload_bytes = len(payload) if payload_bytes is None else payload_bytes
    header = struct.pack(spec.BATCH_HEADER_FORMAT, magic, version, flags, 0, len(runs), npages,
                         payload_bytes)
    return header + table + payload, npages


RAW, ZERO, LZ4, BLOCK, DUP = (spec.ENCODINGS[n] for n in ("raw", "zero", "lz4", "block", "dup"))
HOSTILE = {
    "bad batch magic": (_raw_batch([(0, 1, RAW, PAGE)], 1, magic=b"XXXX"), "bad magic"),
    "batch version": (_raw_batch([(0, 1, RAW, PAGE)], 1, version=9), "version"),
    "page outside memory": (_raw_batch([(NPAGES - 1, 2, RAW, 2 * PAGE)], 2), "outside memory"),
    "huge first page": (_raw_batch([(2**63, 1, ZERO, 0)]), "outside memory"),
    "encoding a stream does not carry": (_raw_batch([(0, 1, DUP, 100)], extra=b"x" * 100),
                                         "not carried"),
    "RAW size": (_raw_batch([(0, 2, RAW, PAGE)], 1), "RAW run"),
    "runs overlap": (_raw_batch([(4, 2, ZERO, 0), (5, 1, ZERO, 0)]), "not after"),
    "runs descend": (_raw_batch([(9, 1, ZERO, 0), (3, 1, ZERO, 0)]), "not after"),
    "empty run": (_raw_batch([(0, 0, ZERO, 0)]), "empty"),
    "count mismatch": (_raw_batch([(0, 2, ZERO, 0)], npages=3), "announces"),
    "length mismatch": (_raw_batch([(0, 1, RAW, PAGE)], 1, payload_bytes=PAGE + 1),
                        "does not match"),
    "reserved header bits": (_raw_batch([(0, 1, ZERO, 0)], flags=1), "reserved"),
    # one BLOCK page whose mask names two blocks, but the run holds one
    "BLOCK masks and data disagree": (_raw_batch([(3, 1, BLOCK, 2 + 256)],
                                                 extra=b"\x03\x00" + b"b" * 256), "BLOCK masks"),
    "BLOCK run too short": (_raw_batch([(3, 2, BLOCK, 3)], extra=b"\x00" * 3), "BLOCK run"),
    "ZERO with payload": (_raw_batch([(0, 1, ZERO, 8)], extra=b"z" * 8), "ZERO run"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_batches_end_the_thread_cleanly_and_place_nothing(name):
    (batch, npages), why = HOSTILE[name]
    feeder = Feeder()
    try:
        feeder.batch(0, batch, npages if name != "count mismatch" else 2)
        failure = feeder.failure()
        assert isinstance(failure, RemoteProtocolError) and why in str(failure), failure
        assert not feeder.mem.pages.any() and not feeder.held.any()
        assert feeder.sock.recv(16) == b""   # the thread shut the stream down
    finally:
        feeder.close()


def test_block_pages_are_refused_without_fingerprints():
    feeder = Feeder(blocks=False)
    try:
        batch, npages = _raw_batch([(3, 1, BLOCK, 2 + 256)], extra=b"\x01\x00" + b"b" * 256)
        feeder.batch(0, batch, npages)
        failure = feeder.failure()
        assert isinstance(failure, RemoteProtocolError) and "not carried" in str(failure)
    finally:
        feeder.close()


def test_a_block_page_lands_over_the_page_held():
    feeder = Feeder()
    try:
        raw, n = _raw_batch([(3, 1, RAW, PAGE)], 1)
        feeder.batch(0, raw, n)
        block, n = _raw_batch([(3, 1, BLOCK, 2 + 256)], extra=b"\x02\x00" + b"b" * 256)
        feeder.batch(0, block, n)
        feeder.end(0, 2, len(raw) + len(block))
        assert feeder.ack() == StreamAck(0, 2)
        want = np.frombuffer(b"\xa5" * 256 + b"b" * 256 + b"\xa5" * (PAGE - 512), np.uint8)
        assert np.array_equal(feeder.mem.pages[3], want)
        assert feeder.hashes.values[3] == PageHashes.of_memory(feeder.mem.pages).values[3]
    finally:
        feeder.close()


def test_a_corrupted_payload_fails_its_checksum_and_nothing_lands():
    feeder = Feeder()
    try:
        batch, npages = _raw_batch([(0, 4, RAW, 4 * PAGE)], 4)
        feeder.batch(0, batch, npages, corrupt_at=wire.HEADER.size + 2000)
        failure = feeder.failure()
        assert isinstance(failure, RemoteProtocolError) and "checksum" in str(failure)
        assert not feeder.mem.pages.any()
    finally:
        feeder.close()


def test_raw_pages_land_over_held_pages_and_make_their_block_hashes_stale():
    """RAW pages are hashed from the checked frame and copied into place: what
    lands and its page hash describe the same bytes; the block hashes held
    before are marked stale (a later BLOCK page hashes its page whole)."""
    feeder = Feeder()
    try:
        first, n = _raw_batch([(2, 3, RAW, 3 * PAGE)], 3)
        rng = np.random.default_rng(5)
        fresh = rng.integers(0, 256, size=3 * PAGE, dtype=np.uint8).tobytes()
        second, _ = _raw_batch([(2, 3, RAW, 3 * PAGE)], extra=fresh)
        feeder.batch(0, first, n)
        feeder.batch(0, second, n)
        feeder.end(0, 2 * n, len(first) + len(second))
        assert feeder.ack() == StreamAck(0, 2 * n)
        landed = feeder.mem.pages[2:5]
        assert landed.tobytes() == fresh
        assert np.array_equal(feeder.hashes.values, PageHashes.of_memory(feeder.mem.pages).values)
        assert not feeder.blocks.valid.any()
    finally:
        feeder.close()


def test_a_corrupted_batch_leaves_the_pages_held_before_it_untouched():
    feeder = Feeder()
    try:
        good, n = _raw_batch([(0, 4, RAW, 4 * PAGE)], 4)
        feeder.batch(0, good, n)
        bad, _ = _raw_batch([(0, 4, RAW, 4 * PAGE)], extra=b"\x5a" * (4 * PAGE))
        feeder.batch(0, bad, n, corrupt_at=wire.HEADER.size + 3 * PAGE)
        failure = feeder.failure()
        assert isinstance(failure, RemoteProtocolError) and "checksum" in str(failure)
        assert feeder.mem.pages[:4].tobytes() == b"\xa5" * (4 * PAGE)
        assert np.array_equal(feeder.hashes.values, PageHashes.of_memory(feeder.mem.pages).values)
    finally:
        feeder.close()


@pytest.mark.parametrize("case, why", [
    ("miscounted marker", "counts"),
    ("batch after its round closed", "after round"),
    ("batch of another round inside a round", "inside round"),
    ("frame version 1", "version"),
    ("urgent flag", "flags"),
    ("truncated", "inside a frame"),
])
def test_marker_and_framing_violations_are_refused(case, why):
    feeder = Feeder()
    try:
        batch, npages = _raw_batch([(0, 2, ZERO, 0)])
        if case == "miscounted marker":
            feeder.batch(0, batch, npages)
            feeder.end(0, npages + 1, len(batch))
        elif case == "batch after its round closed":
            feeder.batch(3, batch, npages)
            feeder.end(3, npages, len(batch))
            assert feeder.ack() == StreamAck(3, npages)
            feeder.batch(3, batch, npages)
        elif case == "batch of another round inside a round":
            feeder.batch(3, batch, npages)
            feeder.batch(4, batch, npages)
        elif case == "frame version 1":
            feeder.batch(0, batch, npages, version=1)
        elif case == "urgent flag":
            feeder.batch(0, batch, npages, flags=spec.BATCH_URGENT)
        else:
            frame = b"".join(bytes(p) for p in wire.encode_frame(
                PageBatch.WIRE_ID, 0, 0, [struct.pack(spec.PAGE_BATCH_FORMAT, 0, 2, 0), batch],
                version=V2))
            feeder.sock.sendall(frame[:-5])
            feeder.sock.shutdown(socket.SHUT_WR)
        failure = feeder.failure()
        assert isinstance(failure, RemoteProtocolError) and why in str(failure), failure
        # A stream cut mid-frame is a lost peer (a resumed pre-copy goes on
        # after it); a frame that arrived whole and wrong is a violation.
        assert isinstance(failure, ConnectionLost) == (case == "truncated"), failure
    finally:
        feeder.close()


def test_source_thread_reports_a_peer_that_vanishes_mid_round():
    src_mem = _filled(seed=2, npages=4096)
    a, b = socket.socketpair()
    src = SourceStream(src_mem, None)
    src.attach_fd(a.detach(), version=V2)
    try:
        src.send_round(0, np.arange(4096, dtype=np.uint64))
        assert b.recv(1 << 16)   # the round started...
        b.close()                # ...and the peer is gone
        failure = _wait(src, lambda: False, "the failure")
        assert isinstance(failure, ConnectionLost), failure
    finally:
        src.close()
        src_mem.close()


def test_source_thread_refuses_a_wrong_ack():
    src_mem = _filled()
    a, b = socket.socketpair()
    src = SourceStream(src_mem, None)
    src.attach_fd(a.detach(), version=V2)
    try:
        src.send_round(2, np.array([1, 2], dtype=np.uint64))
        frames = _read_frames(b, 2)
        assert frames[-1].round == 2
        b.sendall(b"".join(bytes(p) for p in wire.encode_frame(
            StreamAck.WIRE_ID, 0, 0, list(StreamAck(2, 3).encode()[1]), version=V2)))
        failure = _wait(src, lambda: False, "the failure")
        assert isinstance(failure, RemoteProtocolError) and "acknowledged" in str(failure)
    finally:
        src.close()
        b.close()
        src_mem.close()


def _thread_names() -> list[str]:
    tasks = Path("/proc/self/task")
    return [(t / "comm").read_text().strip() for t in tasks.iterdir()]


def test_the_native_threads_carry_names_top_and_perf_show():
    src_mem, dst_mem = _filled(seed=3), GuestMemory(NPAGES * PAGE)
    pair = Pair(src_mem, dst_mem)
    try:
        names = _thread_names()
        assert names.count("lm-bulk-send") == 1 and names.count("lm-bulk-recv") == 1, names
    finally:
        pair.close()
        src_mem.close()
        dst_mem.close()
    assert "lm-bulk-send" not in _thread_names()
