"""The sans-IO connection: in-memory peer pairs, error sides, stickiness."""
import struct

import pytest

from livemig.errors import ConnectionLost, LocalProtocolError, RemoteProtocolError
from livemig.protocol import (CLOSED, NEED_DATA, Abort, Accept, ChannelKind, Connection, Hello,
                              MigrationOffer, Mode, PageBatch, Phase, Ping, PresentReport,
                              RefuseCode, RoundEnd, RoundStart, State, Switchover, Welcome,
                              answer_hello)
from livemig.protocol.state import Role
from support import conversations as conv

S, D = Role.SOURCE, Role.DESTINATION


def pair(kind=ChannelKind.CONTROL):
    return Connection(S, kind), Connection(D)


def deliver(a, b, event):
    for buf in a.send(event):
        b.receive_data(buf)
    got = b.next_event()
    assert got == event
    return got


def up_to_accept():
    s, d = pair()
    for sender, event in conv.control_precopy()[:4]:
        a, b = (s, d) if sender is S else (d, s)
        deliver(a, b, event)
    return s, d


@pytest.mark.parametrize("name", sorted(conv.ALL))
def test_in_memory_pair_runs_whole_conversations(name):
    s, d = pair(conv.ALL[name]()[0][1].channel_kind)
    for sender, event in conv.ALL[name]():
        a, b = (s, d) if sender is S else (d, s)
        deliver(a, b, event)
        assert s.state is d.state
        assert b.next_event() is NEED_DATA
    d.receive_data(b"")
    assert d.next_event() is CLOSED and d.state is State.CLOSED
    assert d.next_event() is CLOSED


def test_handshake_records_version_caps_and_limits():
    s, d = pair()
    hello = Hello(1, 3, ChannelKind.CONTROL, b"k" * 16, frozenset({"a", "b"}),
                  max_payload_bytes=1 << 16)
    deliver(s, d, hello)
    assert d.channel_kind is ChannelKind.CONTROL and d.session_id == b"k" * 16
    welcome = answer_hello(d.hello, capabilities={"b", "c"}, max_payload_bytes=4096)
    assert welcome == Welcome(2, frozenset({"b"}), 4096)   # the highest version both speak
    deliver(d, s, welcome)
    assert s.version == d.version == 2 and s.capabilities == frozenset({"b"})
    assert s.peer_max_payload_bytes == 4096 and d.peer_max_payload_bytes == 1 << 16


def test_answer_hello_refuses_version_and_missing_capabilities():
    h = Hello(3, 5, ChannelKind.CONTROL, bytes(16), frozenset({"x"}))
    assert answer_hello(h).code is RefuseCode.VERSION
    h = Hello(1, 1, ChannelKind.CONTROL, bytes(16), frozenset({"x"}))
    r = answer_hello(h, required={"lz4", "x"})
    assert r.code is RefuseCode.CAPABILITY and "lz4" in r.reason


def test_refusal_is_reported():
    s, d = pair()
    deliver(s, d, Hello(1, 1, ChannelKind.CONTROL, bytes(16)))
    deliver(d, s, answer_hello(d.hello, required={"lz4"}))
    assert s.state is State.REFUSED
    err = s.refused_error()
    assert err.side == "remote" and err.code == RefuseCode.CAPABILITY and "lz4" in str(err)


def test_welcome_outside_offered_range_is_remote_error():
    s, d = pair()
    deliver(s, d, Hello(1, 1, ChannelKind.CONTROL, bytes(16), frozenset({"a"})))
    with pytest.raises(LocalProtocolError, match="version"):
        d.send(Welcome(2))
    # a peer that does it anyway (built by hand) is caught on our side
    rogue = Connection(D)
    for buf in Connection(S, ChannelKind.CONTROL).send(
            Hello(1, 1, ChannelKind.CONTROL, bytes(16))):
        rogue.receive_data(buf)
    rogue.next_event()
    rogue.hello = Hello(1, 9, ChannelKind.CONTROL, bytes(16), frozenset({"a", "z"}))
    s2 = Connection(S, ChannelKind.CONTROL)
    s2.send(Hello(1, 1, ChannelKind.CONTROL, bytes(16), frozenset({"a"})))
    for buf in rogue.send(Welcome(1, frozenset({"z"}))):
        s2.receive_data(buf)
    with pytest.raises(RemoteProtocolError, match="never offered"):
        s2.next_event()


def test_local_error_for_illegal_send_is_sticky():
    s, d = up_to_accept()
    with pytest.raises(LocalProtocolError, match="PageBatch") as info:
        s.send(PageBatch(0, 1, b"x"))
    assert info.value.side == "local" and info.value.phase == "precopy"
    with pytest.raises(LocalProtocolError):
        s.send(RoundStart(0))


def test_unencodable_event_is_local_but_not_sticky():
    s, d = up_to_accept()
    with pytest.raises(LocalProtocolError, match="encode"):
        s.send(PageBatch(0, 1, b"x", flags=0x40))
    s.send(RoundStart(0))


def test_oversized_send_against_peer_cap_is_local_error():
    s, d = pair()
    deliver(s, d, Hello(1, 1, ChannelKind.CONTROL, bytes(16)))
    deliver(d, s, Welcome(1, max_payload_bytes=1024))
    deliver(s, d, MigrationOffer({}, Mode.PRECOPY, 1))
    deliver(d, s, Accept())
    s.send(RoundStart(0))
    with pytest.raises(LocalProtocolError, match="cap"):
        s.send(PageBatch(0, 1, bytes(4096)))


def test_remote_state_violation_is_sticky_and_allows_one_abort():
    s, d = up_to_accept()
    # The source's connection refuses to send a page outside a round, so
    # forge the frame with a connection that believes it is in a round.
    forged = Connection(S, ChannelKind.CONTROL)
    forged.conversation.state = State.IN_ROUND
    forged._send_sequence = s._send_sequence
    for buf in forged.send(PageBatch(0, 1, b"x")):
        d.receive_data(buf)
    with pytest.raises(RemoteProtocolError, match="PageBatch") as info:
        d.next_event()
    assert info.value.side == "remote" and info.value.phase == "precopy"
    with pytest.raises(RemoteProtocolError):
        d.next_event()
    with pytest.raises(LocalProtocolError):
        d.send(Ping(1))
    bufs = d.send(Abort(Phase.PRECOPY, "you broke the protocol"))
    for buf in bufs:
        s.receive_data(buf)
    assert s.next_event() == Abort(Phase.PRECOPY, "you broke the protocol")
    with pytest.raises(LocalProtocolError):
        d.send(Abort(Phase.PRECOPY, "twice"))


def test_truncated_stream_at_eof_is_a_lost_connection():
    """Cut off inside a frame: the peer or the link went away (a break that
    may be resumed), not a malformed frame."""
    s, d = pair()
    bufs = s.send(Hello(1, 1, ChannelKind.CONTROL, bytes(16)))
    raw = b"".join(bytes(b) for b in bufs)
    d.receive_data(raw[:-3])
    assert d.next_event() is NEED_DATA
    d.receive_data(b"")
    with pytest.raises(ConnectionLost, match="truncated"):
        d.next_event()


def test_eof_mid_conversation_is_remote_error_with_phase():
    s, d = up_to_accept()
    d.receive_data(b"")
    with pytest.raises(ConnectionLost, match="source closed") as info:
        d.next_event()
    assert info.value.phase == "precopy" and info.value.side == "remote"


def test_data_after_eof_is_local_misuse():
    s, d = pair()
    d.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        d.receive_data(b"x")


def test_not_an_event_is_local_error():
    s, _ = pair()
    with pytest.raises(LocalProtocolError):
        s.send(object())


def test_replayed_frame_is_rejected_by_sequence():
    s, d = pair()
    raw = b"".join(bytes(b) for b in s.send(Hello(1, 1, ChannelKind.CONTROL, bytes(16))))
    d.receive_data(raw + raw)
    d.next_event()
    with pytest.raises(RemoteProtocolError, match="sequence"):
        d.next_event()


def test_destination_learns_kind_and_names_channel_in_errors():
    s, d = pair(ChannelKind.URGENT)
    deliver(s, d, Hello(1, 1, ChannelKind.URGENT, bytes(16)))
    assert d.name == "destination/urgent"
    d.receive_data(b"NOPE" + bytes(40))
    with pytest.raises(RemoteProtocolError, match=r"^bad frame.* \(seen by the destination on "
                                                  r"its urgent channel\)$"):
        d.next_event()


def _hello_frame() -> bytearray:
    s = Connection(S, ChannelKind.CONTROL)
    return bytearray(b"".join(bytes(b) for b in s.send(
        Hello(1, 1, ChannelKind.CONTROL, bytes(16), frozenset({"lz4"})))))


def _put(offset, value, size):
    def mutate(raw):
        raw[offset:offset + size] = value.to_bytes(size, "little")
    return mutate


@pytest.mark.parametrize("mutate, reason", [
    (lambda raw: raw.__setitem__(0, ord("X")), "magic"),
    (_put(4, 7, 2), "version"),
    (_put(6, 0, 2), "type 0"),
    (_put(6, 4242, 2), "unknown frame type"),
    (_put(8, 1, 2), "flags"),
    (_put(10, 1, 2), "reserved"),
    (_put(12, 1 << 31, 4), "cap"),
    (_put(16, 1, 8), "sequence"),
    (_put(24, 12345, 8), "checksum"),
    (lambda raw: raw.__setitem__(40, raw[40] ^ 0xFF), "checksum"),
    (lambda raw: raw.__delitem__(slice(-1, None)), "truncated"),
    (lambda raw: raw.extend(b"LMIG"), "truncated"),
], ids=["magic", "version", "type0", "type", "flags", "reserved", "length", "sequence",
        "checksum", "payload-bit", "short", "trailing"])
def test_every_malformed_frame_is_a_remote_error(mutate, reason):
    raw = _hello_frame()
    mutate(raw)
    d = Connection(D)
    d.receive_data(bytes(raw))
    d.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=reason) as info:
        while d.next_event() is not CLOSED:
            pass
    assert info.value.side == "remote" and info.value.phase == "handshake"


def test_payload_that_does_not_parse_is_a_remote_error():
    from livemig.protocol import wire
    bufs = wire.encode_frame(Hello.WIRE_ID, 0, 0, [b"\x01\x00\x01\x00\x09"])  # kind 9, short
    d = Connection(D)
    for b in bufs:
        d.receive_data(b)
    with pytest.raises(RemoteProtocolError, match="bad Hello payload"):
        d.next_event()


def _ready_pair():
    s, d = pair()
    deliver(s, d, Hello(1, 1, ChannelKind.CONTROL, bytes(16)))
    deliver(d, s, Welcome(1))
    return s, d


def _forge(conn, state, event) -> list:
    """Frames of ``event`` from a connection that believes it is in ``state``,
    continuing ``conn``'s sequence: a peer that breaks the order."""
    forged = Connection(conn.our_role, ChannelKind.CONTROL)
    forged.conversation.state = state
    forged._send_sequence = conn._send_sequence
    return forged.send(event)


def test_out_of_order_message_is_a_remote_error_raised_by_the_connection():
    s, d = up_to_accept()
    s.send(RoundStart(0))
    s.send(RoundEnd(0, 0, 0))
    # The source waits for RoundAck; a PresentReport belongs to a resumed channel.
    for buf in _forge(d, State.RESUMED, PresentReport(1, b"\x01")):
        s.receive_data(buf)
    with pytest.raises(RemoteProtocolError,
                       match=r"the destination sent the list of pages it holds during pre-copy "
                             r"\[protocol: PresentReport in state precopy on the control "
                             r"channel; expected RoundAck from the destination\]") as info:
        s.next_event()
    assert info.value.side == "remote" and info.value.phase == "precopy"


def test_deeply_nested_offer_is_a_remote_error_answered_by_abort():
    from livemig.protocol import wire
    s, d = _ready_pair()
    config = b"[" * 200_000
    payload = struct.pack("<BBHIQI", 1, 0, 0, 4096, 1, len(config)) + config
    for buf in wire.encode_frame(MigrationOffer.WIRE_ID, 0, s._send_sequence, [payload]):
        d.receive_data(buf)
    with pytest.raises(RemoteProtocolError, match=r"MigrationOffer\.config is nested too deeply"):
        d.next_event()
    for buf in d.send(Abort(Phase.HANDSHAKE, "bad offer")):
        s.receive_data(buf)
    assert s.next_event() == Abort(Phase.HANDSHAKE, "bad offer")


def test_unencodable_switchover_bitmap_is_a_local_error():
    s, d = up_to_accept()
    with pytest.raises(LocalProtocolError, match=r"Switchover\.owed_bitmap"):
        s.send(Switchover(b"", bytes(16), 3, b"\xff"))
    s.send(Switchover(b"", bytes(16), 3, b"\x07"))


def _raw_frame(type_id, sequence, body):
    import xxhash
    from livemig.protocol import wire
    return wire.HEADER.pack(wire.MAGIC, 1, type_id, 0, 0, len(body), sequence,
                            xxhash.xxh3_64_intdigest(body)) + body


def test_before_welcome_frames_are_capped_at_handshake_size():
    """An unwelcomed peer cannot make us allocate the negotiated cap: a Hello
    announcing more than 64 KiB is refused on its header, before its payload."""
    from livemig.protocol.spec import HANDSHAKE_MAX_PAYLOAD_BYTES
    d = Connection(D)
    d.receive_data(_raw_frame(Hello.WIRE_ID, 0, bytes(HANDSHAKE_MAX_PAYLOAD_BYTES + 1))[:32])
    with pytest.raises(RemoteProtocolError, match="exceeds the cap of 65536"):
        d.next_event()


def test_negotiated_cap_applies_from_the_welcome():
    s, d = pair()
    deliver(s, d, Hello(1, 1, ChannelKind.CONTROL, bytes(16)))
    for buf in d.send(answer_hello(d.hello)):
        s.receive_data(buf)
    s.next_event()
    offer = MigrationOffer({"pad": "x" * (200 << 10)}, Mode.PRECOPY, 1)
    assert deliver(s, d, offer) == offer


def test_discard_received_drops_a_half_received_payload():
    d = Connection(D)
    frame = _raw_frame(Hello.WIRE_ID, 0, struct.pack("<HHBBHI", 1, 1, 1, 0, 0, 1 << 20)
                       + bytes(16) + struct.pack("<H", 0))
    d.receive_data(frame[:-3])
    assert d.next_event() is NEED_DATA and d.buffered_bytes > 0
    d.discard_received()
    assert d.buffered_bytes == 0
