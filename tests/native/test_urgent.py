"""The native urgent-channel threads (csrc/channels/) over socketpairs.

Faults come from native toucher threads (a Python thread must never touch a
missing page). The Python framer (protocol.wire, events, rawbatch) is the
reference peer: the threads must speak exactly its frames, and refuse
hostile ones with a reason instead of crashing.
"""
import errno
import socket
import struct

import numpy as np
import pytest

from livemig.lab.faultbench import Toucher
from livemig.native.memory import GuestMemory
from livemig.codec.kernels import hash_pages
from livemig.native.postcopy import PostcopyMemory, probe as pc_probe
from livemig.protocol import wire
from livemig.protocol.events import (BATCH_URGENT, WIRE_IDS, PageBatch, PageRequest,
                                     decode_event)
from livemig.codec.rawbatch import encode_raw, parse_raw
from livemig.native.urgent import NativeFaultServer, NativePageServer, probe
from support.waiting import PATIENCE_S, wait_for

PAGE = 4096
NPAGES = 256
PC = pc_probe()
OK, WHY = probe()
pytestmark = [
    pytest.mark.skipif(not PC.missing, reason=f"userfaultfd MISSING: {PC.reason}"),
    pytest.mark.skipif(not OK, reason=f"native urgent path: {WHY}"),
]


def _filled(seed=3):
    mem = GuestMemory(NPAGES * PAGE)
    mem.words[:] = np.random.default_rng(seed).integers(0, 2**63, size=mem.words.shape,
                                                        dtype=np.uint64)
    return mem


@pytest.fixture
def pair():
    """(source memory, destination memory, PostcopyMemory with nothing present)."""
    src, dst = _filled(), GuestMemory(NPAGES * PAGE)
    pm = PostcopyMemory(dst, np.zeros(NPAGES, dtype=bool))
    yield src, dst, pm
    pm.close(abandon=True)
    dst.close()
    src.close()


def _read_frame(sock, reader):
    while True:
        f = reader.next_frame()
        if f is not None:
            return f
        data = sock.recv(1 << 20)
        assert data, "peer closed"
        reader.feed(data)


def _frame(event, seq):
    flags, parts = event.encode()
    return b"".join(bytes(p) for p in wire.encode_frame(event.WIRE_ID, flags, seq, parts))


def test_request_reply_between_the_two_threads(pair):
    src, dst, pm = pair
    sh, dh = np.zeros(NPAGES, np.uint64), np.zeros(NPAGES, np.uint64)
    a, b = socket.socketpair()
    with NativePageServer(src, sh, 3) as ps, NativeFaultServer(pm, dh) as fs:
        ps.attach_fd(a.detach())
        fs.attach_fd(b.detach())
        pages = np.random.default_rng(2).permutation(NPAGES)[:100]
        t = Toucher(dst, pages, offset_bytes=8)
        t.join(PATIENCE_S)
        assert np.array_equal(t.values, src.words.reshape(NPAGES, -1)[pages, 1])
        want = hash_pages(src.pages)
        assert np.array_equal(dh[pages], want[pages]) and np.array_equal(sh[pages], want[pages])
        wait_for("every fault to be served", lambda: fs.stats()["faults_served"] == pages.size)
        lat = fs.drain_latencies_us()
        assert lat.size == pages.size and (lat > 0).all()
        assert sorted(ps.drain_requests().tolist()) == sorted(pages.tolist())
        st = fs.stats()
        assert st["pages_placed"] == pages.size and st["blocked_ns"] == st["latency_sum_ns"]
        assert fs.outstanding == 0
        assert fs.detach() == 0
        # the source's thread may have seen the destination close first
        assert ps.detach() in (0, -errno.ECONNRESET)


def test_destination_thread_speaks_the_python_framing(pair):
    """Its PageRequest decodes with the Python framer; a Python-built reply lands."""
    src, dst, pm = pair
    a, b = socket.socketpair()
    with NativeFaultServer(pm) as fs:
        fs.attach_fd(b.detach(), send_seq=5, recv_seq=9)
        t = Toucher(dst, [17], offset_bytes=0)
        reader = wire.FrameReader(valid_types=WIRE_IDS.keys())
        reader.expected_sequence = 5
        f = _read_frame(a, reader)
        req = decode_event(f.type_id, f.flags, f.payload)
        assert isinstance(req, PageRequest) and req.pages == (17,)
        chunks, _, _ = encode_raw(src.pages, np.array([17]))
        a.sendall(_frame(PageBatch(0, 1, chunks, BATCH_URGENT, req.request_id), 9))
        t.join(PATIENCE_S)
        assert t.values[0] == src.words[17, 0]
        assert fs.detach() == 0
    a.close()


def test_source_thread_reply_decodes_with_the_python_framing():
    src = _filled()
    a, b = socket.socketpair()
    try:
        with NativePageServer(src, None, 7) as ps:
            ps.attach_fd(b.detach(), send_seq=2, recv_seq=4)
            want = [9, 3, 4, 5, 200, 9]
            a.sendall(_frame(PageRequest(42, tuple(want)), 4))
            reader = wire.FrameReader(valid_types=WIRE_IDS.keys())
            reader.expected_sequence = 2
            got = decode_event(*(lambda f: (f.type_id, f.flags, f.payload))(_read_frame(a, reader)))
            assert isinstance(got, PageBatch) and got.request_id == 42 and got.round == 7
            assert got.flags == BATCH_URGENT and got.npages == 5
            runs = parse_raw(memoryview(got.data).cast("B"), NPAGES)
            assert [(r[0], r[1]) for r in runs] == [(3, 3), (9, 1), (200, 1)]
            for first, count, view in runs:
                assert bytes(view) == src.pages[first:first + count].tobytes()
            assert ps.detach() == 0
    finally:
        a.close()
        src.close()


def _hostile(payload_frame: bytes):
    """Feed one frame to a source thread; return (status, reason)."""
    src = _filled()
    a, b = socket.socketpair()
    try:
        with NativePageServer(src, None, 0) as ps:
            ps.attach_fd(b.detach())
            a.sendall(payload_frame)
            wait_for("the page server to fail", lambda: ps.status()[0] < 0)
            st, reason = ps.status()
            assert ps.detach() == st
            assert a.recv(1) == b""     # the thread's socket was shut down
            return st, reason
    finally:
        a.close()
        src.close()


def _req(pages, *, seq=0, request_id=1):
    return _frame(PageRequest(request_id, tuple(pages)), seq)


def _mutate(frame: bytes, offset: int, data: bytes) -> bytes:
    return frame[:offset] + data + frame[offset + len(data):]


@pytest.mark.parametrize("frame, err, words", [
    (_mutate(_req([1]), 0, b"XMIG"), errno.EPROTO, "magic"),
    (_mutate(_req([1]), 4, struct.pack("<H", 9)), errno.EPROTO, "version"),
    (_mutate(_req([1]), 6, struct.pack("<H", 33)), errno.EPROTO, "type"),
    (_mutate(_req([1]), 10, struct.pack("<H", 1)), errno.EPROTO, "reserved"),
    (_mutate(_req([1]), 12, struct.pack("<I", 1 << 30)), errno.EPROTO, "cap"),
    (_req([1], seq=3), errno.EPROTO, "sequence"),
    (_mutate(_req([1]), 24, struct.pack("<Q", 1)), errno.EBADMSG, "checksum"),
    (_req([NPAGES]), errno.ERANGE, "outside guest memory"),
    (_req([2**63 + 5]), errno.ERANGE, "outside guest memory"),
])
def test_source_thread_refuses_hostile_frames(frame, err, words):
    st, reason = _hostile(frame)
    assert st == -err and words in reason


def test_source_thread_refuses_a_bad_request_payload():
    body = struct.pack("<QII", 1, 3, 0) + struct.pack("<Q", 1)     # says 3 pages, holds 1
    frame = b"".join(bytes(p) for p in wire.encode_frame(64, 0, 0, [body]))
    st, reason = _hostile(frame)
    assert st == -errno.EPROTO and "3 pages" in reason


def test_destination_thread_refuses_out_of_range_reply(pair):
    src, dst, pm = pair
    a, b = socket.socketpair()
    with NativeFaultServer(pm) as fs:
        fs.attach_fd(b.detach())
        t = Toucher(dst, [4])
        reader = wire.FrameReader(valid_types=WIRE_IDS.keys())
        f = _read_frame(a, reader)
        req = decode_event(f.type_id, f.flags, f.payload)
        big = GuestMemory((NPAGES + 8) * PAGE)
        try:
            chunks, _, _ = encode_raw(big.pages, np.array([NPAGES + 2]))
            a.sendall(_frame(PageBatch(0, 1, chunks, BATCH_URGENT, req.request_id), 0))
            wait_for("the fault server to fail", lambda: fs.status()[0] < 0)
        finally:
            big.close()
        st, reason = fs.status()
        assert st == -errno.ERANGE and "outside guest memory" in reason
        assert fs.detach() == st
        # the fault is still outstanding; place it so the toucher can finish
        pm.place(4, src.pages[4])
        t.join(PATIENCE_S)
    a.close()


def test_destination_thread_refuses_a_reply_to_no_request(pair):
    src, dst, pm = pair
    a, b = socket.socketpair()
    with NativeFaultServer(pm) as fs:
        fs.attach_fd(b.detach())
        chunks, _, _ = encode_raw(src.pages, np.array([1]))
        a.sendall(_frame(PageBatch(0, 1, chunks, BATCH_URGENT, 99), 0))
        wait_for("the fault server to fail", lambda: fs.status()[0] < 0)
        assert fs.status()[0] == -errno.EPROTO and "never sent" in fs.status()[1]
        fs.detach()
    a.close()


def test_stop_while_blocked_and_outstanding_requests_are_sent_again(pair):
    src, dst, pm = pair
    a, b = socket.socketpair()
    with NativeFaultServer(pm) as fs:
        fs.attach_fd(b.detach())
        t = Toucher(dst, [30])
        reader = wire.FrameReader(valid_types=WIRE_IDS.keys())
        f = _read_frame(a, reader)
        assert decode_event(f.type_id, f.flags, f.payload).pages == (30,)
        assert fs.outstanding == 1
        assert fs.detach() == 0                 # blocked in poll (no timeout): the stop woke it
        assert a.recv(1) == b""
        a.close()
        # reconnection: the new thread asks for page 30 again, unprompted
        a2, b2 = socket.socketpair()
        fs.attach_fd(b2.detach())
        f = _read_frame(a2, wire.FrameReader(valid_types=WIRE_IDS.keys()))
        req = decode_event(f.type_id, f.flags, f.payload)
        assert req.pages == (30,) and fs.stats()["pages_resent"] == 1
        chunks, _, _ = encode_raw(src.pages, np.array([30]))
        a2.sendall(_frame(PageBatch(0, 1, chunks, BATCH_URGENT, req.request_id), 0))
        t.join(PATIENCE_S)
        assert t.values[0] == src.words[30, 0]
        assert fs.detach() == 0
        a2.close()


def test_pushed_pages_settle_waiting_faults(pair):
    src, dst, pm = pair
    a, b = socket.socketpair()
    with NativeFaultServer(pm) as fs:
        fs.attach_fd(b.detach())
        t = Toucher(dst, [8])
        _read_frame(a, wire.FrameReader(valid_types=WIRE_IDS.keys()))
        pm.place(8, src.pages[8])               # a push lands it first
        lat = fs.settle_us(np.array([7, 8, 9]))
        assert lat.size == 1 and fs.outstanding == 0
        assert fs.settle_us(np.array([8])).size == 0    # counted once
        t.join(PATIENCE_S)
        fs.detach()
    a.close()


def test_priority_is_validated_and_its_outcome_reported():
    """SCHED_FIFO is asked per handle; an invalid priority is refused before
    any thread starts, and the stats say what the kernel granted."""
    from livemig.codec.digest import PageHashes
    from livemig.native import lib
    mem = GuestMemory(16 * 4096, hugepages=False)
    srv = NativePageServer(mem, PageHashes(16).values, 0)
    try:
        assert lib.lm_urgent_set_priority(srv._h, 100) < 0
        a, b = socket.socketpair()
        srv.attach_fd(a.detach(), rt_priority=1)

        def scheduled():
            st = srv.stats()
            return (st["rt_priority"] or st["rt_errno"]) and st

        st = wait_for("the thread to report its scheduling", scheduled)
        assert st["rt_priority"] == 1 or st["rt_errno"] != 0
        assert "SCHED_FIFO" in srv.scheduling(1)
        assert srv.scheduling(0) == "normal priority"
        srv.detach()
        b.close()
    finally:
        srv.close()
        mem.close()
