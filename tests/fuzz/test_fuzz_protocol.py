"""Hostile and oddly split input: stream-splitting invariance, and garbage in
produces RemoteProtocolError and nothing else."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import RemoteProtocolError
from livemig.protocol import NEED_DATA, Connection
from livemig.protocol.events import PayloadError, decode_event
from livemig.protocol.state import Role
from support import conversations as conv

S, D = Role.SOURCE, Role.DESTINATION
# Build each conversation's byte streams once: hypothesis then only varies splits.
STREAMS = {name: (make(), conv.streams(make())) for name, make in conv.ALL.items()}
FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(edges, edges[1:]) if b > a]


@FAST
@given(name=st.sampled_from(sorted(conv.ALL)), role=st.sampled_from([S, D]),
       cuts=st.lists(st.integers(0, 1 << 30), max_size=40))
def test_any_chunking_yields_identical_events(name, role, cuts):
    conversation, (src_bytes, dst_bytes, dst_events, src_events) = STREAMS[name]
    incoming, expected = (dst_bytes, src_events) if role is S else (src_bytes, dst_events)
    got = conv.replay(role, conversation, split(incoming, cuts))
    assert got == expected


def test_byte_at_a_time_matches():
    conversation, (src_bytes, _, dst_events, _) = STREAMS["urgent"]
    got = conv.replay(D, conversation, [src_bytes[i:i + 1] for i in range(len(src_bytes))])
    assert got == dst_events


def drain(conn: Connection, chunks) -> None:
    """Feed chunks and pull events until the stream ends; only
    RemoteProtocolError may escape (the caller checks)."""
    for chunk in chunks:
        conn.receive_data(chunk)
        while conn.next_event() is not NEED_DATA:
            if conn.state.terminal:
                break
    conn.receive_data(b"")
    conn.next_event()


@FAST
@given(garbage=st.binary(max_size=600), role=st.sampled_from([S, D]))
def test_garbage_only_raises_remote_errors(garbage, role):
    conn = Connection(role, None if role is D else conv.ChannelKind.CONTROL)
    try:
        drain(conn, [garbage])
    except RemoteProtocolError as exc:
        assert exc.side == "remote"


@FAST
@given(name=st.sampled_from(sorted(conv.ALL)),
       edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255),
                                st.sampled_from(["flip", "insert", "delete"])),
                      min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 1 << 30)))
def test_mutated_valid_streams_only_raise_remote_errors(name, edits, cut):
    """The destination reads a corrupted source stream (sending nothing itself):
    every corruption, truncation or state violation is a RemoteProtocolError."""
    _, (src_bytes, _, _, _) = STREAMS[name]
    data = bytearray(src_bytes)
    for pos, value, op in edits:
        pos %= len(data) + (op == "insert")
        if op == "flip" and pos < len(data):
            data[pos] ^= value or 1
        elif op == "insert":
            data.insert(pos, value)
        elif pos < len(data):
            del data[pos]
    if cut is not None:
        del data[cut % (len(data) + 1):]
    conn = Connection(D)
    try:
        drain(conn, split(bytes(data), [pos for pos, _, _ in edits]))
    except RemoteProtocolError:
        return
    # The destination never answers, so even an intact stream fails at the
    # second message (the Welcome is missing): only silence passes.
    assert not data


@FAST
@given(name=st.sampled_from(sorted(conv.ALL)), role=st.sampled_from([S, D]),
       cuts=st.lists(st.integers(0, 1 << 30), max_size=40))
def test_any_chunking_through_receive_buffers_yields_identical_events(name, role, cuts):
    conversation, (src_bytes, dst_bytes, dst_events, src_events) = STREAMS[name]
    incoming, expected = (dst_bytes, src_events) if role is S else (src_bytes, dst_events)
    got = conv.replay_buffered(role, conversation, split(incoming, cuts))
    assert got == expected


def _payloads():
    """(message class, flags, payload) of every message of the conversations."""
    out = {}
    for make in conv.ALL.values():
        for _, event in make():
            flags, parts = event.encode()
            out.setdefault(type(event), []).append(
                (flags, b"".join(bytes(p) for p in parts)[:4096]))
    return sorted(out.items(), key=lambda item: item[0].WIRE_ID)


PAYLOADS = _payloads()


@FAST
@given(which=st.integers(0, 1 << 30), nth=st.integers(0, 1 << 30),
       edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255),
                                st.sampled_from(["flip", "insert", "delete"])), max_size=4),
       flags=st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_mutated_payloads_only_raise_payload_errors(which, nth, edits, flags):
    """Every message decoder, fed a corrupted payload of its own kind (or
    other flags), returns a message or raises PayloadError: nothing else."""
    cls, samples = PAYLOADS[which % len(PAYLOADS)]
    good_flags, payload = samples[nth % len(samples)]
    data = bytearray(payload)
    for pos, value, op in edits:
        pos %= len(data) + 1
        if op == "flip" and pos < len(data):
            data[pos] ^= value or 1
        elif op == "insert":
            data.insert(pos, value)
        elif pos < len(data):
            del data[pos]
    try:
        event = decode_event(cls.WIRE_ID, good_flags if flags is None else flags,
                             memoryview(bytes(data)))
    except PayloadError:
        return
    assert type(event) is cls
