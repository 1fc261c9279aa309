"""Valid protocol conversations, as (sender, event) lists and as byte streams."""
from __future__ import annotations

import numpy as np

from livemig.protocol import (BATCH_POSTCOPY, BATCH_URGENT, Accept, ChannelKind, Commit, Complete,
                              Connection, Hello, MigrationOffer, Mode, PageBatch, PageInvalidate,
                              PageRequest, Ping, Pong, PostcopyComplete, PresentReport, ProbeData,
                              ProbeEnd, ProbeResult, Resumed, RoundAck, RoundEnd, RoundStart,
                              Switchover, Verified, Welcome)
from livemig.protocol.state import Role

S, D = Role.SOURCE, Role.DESTINATION
SESSION = bytes(range(16))
CAPS = frozenset({"lz4", "delta", "postcopy"})


def pages(npages: int, seed: int = 0) -> memoryview:
    """Incompressible page bytes."""
    rng = np.random.default_rng(seed)
    return memoryview(rng.integers(0, 256, npages * 4096, dtype=np.uint8))


def handshake(kind: ChannelKind, resume: bool = False) -> list:
    return [(S, Hello(1, 1, kind, SESSION, CAPS, resume)),
            (D, Welcome(1, frozenset({"lz4", "postcopy"})))]


def control_precopy() -> list:
    ev = handshake(ChannelKind.CONTROL)
    ev += [(S, MigrationOffer({"name": "vm0", "vcpus": 2}, Mode.PRECOPY, 64)), (D, Accept()),
           (S, Ping(7)), (D, Pong(7))]
    for rnd in range(3):
        ev += [(S, RoundStart(rnd)), (S, PageBatch(rnd, 4, pages(4, rnd))),
               (S, PageBatch(rnd, 2, pages(2, rnd + 10))), (S, RoundEnd(rnd, 6, 6 * 4096))]
    ev += [(S, Switchover(b"cpu-state", b"\x11" * 16)), (D, Verified()), (S, Commit()),
           (D, Resumed()), (S, Complete())]
    return ev


def control_hybrid() -> list:
    ev = handshake(ChannelKind.CONTROL)
    ev += [(S, MigrationOffer({"name": "vm1"}, Mode.HYBRID, 20)), (D, Accept()),
           (S, RoundStart(0)), (S, PageBatch(0, 3, pages(3))), (S, Ping(3)),
           (S, RoundEnd(0, 3, 3 * 4096)), (D, RoundAck(0, 3)),
           (S, Switchover(b"regs", b"\x22" * 16, 20, b"\x00\xf0\x0f")),
           (D, Pong(3)),   # an answer may cross the source's next messages
           (D, Verified()), (S, Commit()), (D, Resumed()),
           (D, PostcopyComplete(6)), (S, Complete())]
    return ev


def control_hybrid_invalidating() -> list:
    """A bandwidth probe, then hybrid with invalidation rounds before the
    pause (docs/postcopy.md)."""
    ev = handshake(ChannelKind.CONTROL)
    ev += [(S, Ping(1)), (D, Pong(1)), (S, ProbeData(0, b"\xa5" * 100)),
           (S, ProbeData(1, b"\xa5" * 100)), (S, ProbeEnd(2, 200)), (D, ProbeResult(1, 100, 9)),
           (S, MigrationOffer({"name": "vm2"}, Mode.HYBRID, 20)), (D, Accept()),
           (S, RoundStart(0)), (S, PageBatch(0, 10, pages(10))),
           (S, PageBatch(0, 10, pages(10, 1))), (S, RoundEnd(0, 20, 20 * 4096)),
           (D, RoundAck(0, 20)),
           (S, PageInvalidate(1, np.array([2, 3, 9], dtype=np.uint64))), (D, RoundAck(1, 3)),
           (S, PageInvalidate(2, np.array([15], dtype=np.uint64))), (D, RoundAck(2, 1)),
           (S, Switchover(b"regs", b"\x33" * 16, 20, b"\x0c\x82\x00")), (D, Verified()),
           (S, Commit()), (D, Resumed()),
           (D, PostcopyComplete(20)), (S, Complete())]
    return ev


def bulk() -> list:
    ev = handshake(ChannelKind.BULK)
    # a frame of 128 KiB followed by more in the same chunk: received straight
    # into its own buffer, and the bytes after it must wait for the next one
    ev += [(S, PageBatch(0, 32, pages(32))), (S, PageBatch(1, 1, pages(1, 3), BATCH_POSTCOPY))]
    return ev


def urgent() -> list:
    ev = handshake(ChannelKind.URGENT)
    ev += [(D, PageRequest(9, (1, 2, 3))), (S, PageBatch(0, 3, pages(3), BATCH_URGENT, 9)),
           (S, Ping(1)), (D, PageRequest(10, (4,))), (D, Pong(1)),
           (S, PageBatch(1, 1, pages(1), BATCH_URGENT | BATCH_POSTCOPY, 10))]
    return ev


def control_resumed() -> list:
    """A control channel reopened during post-copy (recovery)."""
    ev = handshake(ChannelKind.CONTROL, resume=True)
    ev += [(D, PresentReport(20, b"\xff\xff\x0f")),
           (D, PostcopyComplete(20, bytes(range(16)))), (S, Complete())]
    return ev


ALL = {"control-precopy": control_precopy, "control-hybrid": control_hybrid,
       "control-hybrid-invalidating": control_hybrid_invalidating,
       "control-resumed": control_resumed, "bulk": bulk, "urgent": urgent}


def streams(conversation: list) -> tuple[bytes, bytes, list, list]:
    """(bytes source sends, bytes destination sends, events the destination
    receives, events the source receives), by running both connections."""
    kind = conversation[0][1].channel_kind
    conns = {S: Connection(S, kind), D: Connection(D)}
    out = {S: bytearray(), D: bytearray()}
    received = {S: [], D: []}
    for sender, event in conversation:
        receiver = conns[sender.peer]
        for buf in conns[sender].send(event):
            out[sender] += buf
            receiver.receive_data(buf)
        received[sender.peer].append(receiver.next_event())
    return bytes(out[S]), bytes(out[D]), received[D], received[S]


def replay(role: Role, conversation: list, chunks) -> list:
    """Play ``role``'s side of ``conversation``: send our events, and receive
    the peer's from ``chunks`` (an iterable of byte chunks of the peer's
    stream, fed only when the connection asks for data). Returns the events
    received; the caller compares them with the conversation."""
    from livemig.protocol import NEED_DATA

    kind = conversation[0][1].channel_kind if role is S else None
    conn = Connection(role, kind)
    chunks = iter(chunks)
    received = []
    for sender, event in conversation:
        if sender is role:
            conn.send(event)
            continue
        while (got := conn.next_event()) is NEED_DATA:
            conn.receive_data(next(chunks, b""))
        received.append(got)
    return received


def replay_buffered(role: Role, conversation: list, chunks) -> list:
    """As :func:`replay`, but receiving through get_receive_buffer /
    receive_buffer_filled (the zero-copy path), a chunk at a time, each
    chunk written into as many of the offered buffers as it takes."""
    from livemig.protocol import NEED_DATA

    kind = conversation[0][1].channel_kind if role is S else None
    conn = Connection(role, kind)
    chunks = iter(chunks)
    received = []
    rest = memoryview(b"")  # what the connection's buffers could not take yet
    for sender, event in conversation:
        if sender is role:
            conn.send(event)
            continue
        while (got := conn.next_event()) is NEED_DATA:
            if not rest:
                rest = memoryview(next(chunks, b""))
                if not rest:
                    conn.receive_data(b"")
                    continue
            # fill the offered buffers until one is refused (a frame is then
            # complete and must be taken before more bytes are)
            while rest:
                buf = conn.get_receive_buffer(-1)
                n = min(len(buf), len(rest))
                if n == 0:
                    break
                buf[:n] = rest[:n]
                conn.receive_buffer_filled(n)
                rest = rest[n:]
        received.append(got)
    return received
