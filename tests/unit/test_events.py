"""Every message round-trips; malformed payloads raise PayloadError only."""
import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.protocol import events as ev
from livemig.protocol.events import PayloadError, decode_event
from livemig.protocol.fields import Reserved

SAMPLES = [
    ev.Hello(1, 3, ev.ChannelKind.CONTROL, b"s" * 16, frozenset({"lz4", "xbzrle.v1"}), True,
             1 << 20),
    ev.Hello(1, 1, ev.ChannelKind.URGENT, bytes(16)),
    ev.Welcome(2, frozenset({"lz4"}), 4096),
    ev.Refuse(ev.RefuseCode.CAPABILITY, "need lz4 — ünïcode"),
    ev.MigrationOffer({"name": "vm", "vcpus": 2, "devices": ["console"]}, ev.Mode.HYBRID,
                      1 << 18, 4096),
    ev.Accept(),
    ev.RoundStart(7),
    ev.PageBatch(7, 2, b"\x01" * 8192),
    ev.PageBatch(0, 1, b"x", ev.BATCH_URGENT | ev.BATCH_POSTCOPY, 99),
    ev.PageBatch(3, 0, b""),
    ev.RoundEnd(7, 1000, 4096000),
    ev.RoundAck(7, 1000),
    ev.StreamEnd(7, 250, 1024000),
    ev.StreamAck(7, 250),
    ev.PageInvalidate(8, np.array([0, 5, 6, 2**40], dtype=np.uint64)),
    ev.PageInvalidate(9),
    ev.Switchover(b"state" * 10, b"d" * 16),
    ev.Switchover(b"", b"d" * 16, 13, b"\xff\x1f"),
    ev.Resumed(),
    ev.Verified(),
    ev.Commit(),
    ev.VerifyFailed(b"a" * 16, b"b" * 16, "page 7 differs"),
    ev.PageRequest(5, (0, 1, 2**63)),
    ev.PresentReport(9, b"\x01\x01"),
    ev.PresentReport(0, b""),
    ev.ResumeReport(3, 9, b"\x01\x01"),
    ev.ResumeReport(0xFFFFFFFF, 0, b""),
    ev.PostcopyComplete(123, bytes(range(16))),
    ev.Complete(),
    ev.Abort(ev.Phase.POSTCOPY, "operator cancelled"),
    ev.Ping(2**64 - 1),
    ev.Pong(0),
    ev.ProbeData(0, b"\xa5" * 1000),
    ev.ProbeData(2**32 - 1, b""),
    ev.ProbeEnd(64, 64 << 20),
    ev.ProbeResult(63, 63 << 20, 51_000_000),
    ev.StreamProbe(4, 1000, 64 << 20),
    ev.StreamProbeGrant(2, 800, 32 << 20, "capped"),
    ev.StreamProbeGrant(0, 0, 0, "another stream probe runs here"),
    ev.StreamProbeEnd(8192, 8192 * 4200),
    ev.StreamProbeResult(8192, 8192 * 4200, 51_000_000, 40_000_000),
    ev.Outcome(ev.OutcomeCode.COMMITTED, bytes(range(16)), "running here"),
]


def roundtrip(event):
    flags, parts = event.encode()
    payload = memoryview(b"".join(bytes(p) for p in parts))
    return decode_event(event.WIRE_ID, flags, payload)


def test_every_message_has_a_sample():
    assert {type(e) for e in SAMPLES} == set(ev.ALL_EVENTS)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_roundtrip(event):
    assert roundtrip(event) == event


def test_wire_ids_are_unique_and_nonzero():
    ids = [cls.WIRE_ID for cls in ev.ALL_EVENTS]
    assert len(set(ids)) == len(ids) and 0 not in ids and all(i < 65536 for i in ids)


def test_pagebatch_data_is_passed_through_without_copy():
    data = memoryview(bytearray(4096 * 4))
    _, parts = ev.PageBatch(0, 4, data).encode()
    assert parts[1] is data
    flags, parts = ev.PageBatch(0, 4, data).encode()
    payload = memoryview(b"".join(bytes(p) for p in parts))
    decoded = decode_event(ev.PageBatch.WIRE_ID, flags, payload)
    assert decoded.data.obj is payload.obj  # a slice of the frame payload


def test_pagebatch_accepts_numpy_pages():
    np = pytest.importorskip("numpy")
    arr = np.arange(2 * 512, dtype=np.uint64).reshape(2, 512)
    got = roundtrip(ev.PageBatch(1, 2, arr))
    assert bytes(got.data) == arr.tobytes()


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_truncated_and_extended_payloads_fail_cleanly(event):
    flags, parts = event.encode()
    payload = b"".join(bytes(p) for p in parts)
    opaque_after = {ev.PageBatch: 16, ev.ProbeData: 8}.get(type(event))
    for cut in range(len(payload)):
        if opaque_after is not None and cut >= opaque_after:
            break  # page data and probe filler are opaque: any length is valid
        with pytest.raises(PayloadError):
            decode_event(event.WIRE_ID, flags, memoryview(payload[:cut]))
    if opaque_after is None:
        with pytest.raises(PayloadError):
            decode_event(event.WIRE_ID, flags, memoryview(payload + b"\x00"))


@pytest.mark.parametrize("cls", [c for c in ev.ALL_EVENTS if c.FLAGS == 0])
def test_undefined_flags_rejected(cls):
    with pytest.raises(PayloadError, match="flags"):
        decode_event(cls.WIRE_ID, 0x8000, memoryview(b""))


@pytest.mark.parametrize("cls, payload", [
    (ev.Hello, struct.pack("<HHBBHI16sH", 2, 1, 1, 0, 0, 4096, bytes(16), 0)),   # min > max
    (ev.Hello, struct.pack("<HHBBHI16sH", 1, 1, 9, 0, 0, 4096, bytes(16), 0)),   # bad kind
    (ev.Hello, struct.pack("<HHBBHI16sH", 1, 1, 1, 2, 0, 4096, bytes(16), 0)),   # resume=2
    (ev.Hello, struct.pack("<HHBBHI16sHB2s", 1, 1, 1, 0, 0, 4096, bytes(16), 1, 2, b"A!")),
    (ev.Hello, struct.pack("<HHBBHI16sHB2sB2s", 1, 1, 1, 0, 0, 4096, bytes(16), 2,
                           2, b"ab", 2, b"ab")),                                  # duplicate
    (ev.Refuse, struct.pack("<HH", 1, 2) + b"\xff\xfe"),                           # not UTF-8
    (ev.MigrationOffer, struct.pack("<BBHIQI", 9, 0, 0, 4096, 1, 2) + b"{}"),     # bad mode
    (ev.MigrationOffer, struct.pack("<BBHIQI", 1, 0, 0, 4000, 1, 2) + b"{}"),     # page size
    (ev.MigrationOffer, struct.pack("<BBHIQI", 1, 0, 0, 4096, 1, 2) + b"[]"),     # not object
    (ev.MigrationOffer, struct.pack("<BBHIQI", 1, 0, 0, 4096, 1, 2) + b"{x"),     # not JSON
    (ev.PresentReport, struct.pack("<Q", 9) + b"\x00\x02"),                       # padding bit
    (ev.PresentReport, struct.pack("<Q", 9) + b"\x00"),                           # short map
    (ev.ResumeReport, struct.pack("<IIQ", 1, 0, 9) + b"\x00\x02"),               # padding bit
    (ev.ResumeReport, struct.pack("<IIQ", 1, 0, 2**40) + b"\x00"),               # huge claim
    (ev.ResumeReport, struct.pack("<IIQ", 1, 7, 8) + b"\x00"),                   # reserved
    (ev.PageRequest, struct.pack("<QII", 1, 0, 0)),                                # empty
    (ev.PageRequest, struct.pack("<QII", 1, 2, 0) + bytes(8)),                    # short
    (ev.Abort, struct.pack("<BBH", 99, 0, 0)),                                    # phase
    (ev.RoundEnd, struct.pack("<IIQQ", 1, 1, 1, 1)),                              # reserved
    (ev.PageInvalidate, struct.pack("<II", 1, 2) + struct.pack("<Q", 3)),         # short
    (ev.PageInvalidate, struct.pack("<II", 1, 1) + struct.pack("<QB", 3, 0)),     # trailing
    (ev.PageInvalidate, struct.pack("<II", 1, 2) + struct.pack("<QQ", 9, 3)),     # descending
    (ev.PageInvalidate, struct.pack("<II", 1, 2) + struct.pack("<QQ", 3, 3)),     # repeated
    (ev.PageInvalidate, struct.pack("<II", 1, (1 << 20) + 1)),                    # over the cap
    (ev.PageInvalidate, struct.pack("<H", 1)),                                    # truncated
])
def test_bad_payloads(cls, payload):
    with pytest.raises(PayloadError):
        decode_event(cls.WIRE_ID, 0, memoryview(payload))


def test_urgent_reply_must_carry_urgent_flag():
    payload = struct.pack("<IIQ", 0, 1, 42)
    with pytest.raises(PayloadError, match="URGENT"):
        decode_event(ev.PageBatch.WIRE_ID, 0, memoryview(payload))


def test_encode_rejects_invalid_fields():
    with pytest.raises(ValueError):
        ev.Hello(1, 1, ev.ChannelKind.BULK, b"short").encode()
    with pytest.raises(ValueError):
        ev.Hello(1, 1, ev.ChannelKind.BULK, bytes(16), frozenset({"Bad Name"})).encode()
    with pytest.raises(ValueError, match="padding"):
        ev.Switchover(b"", bytes(16), 3, b"\xff").encode()
    with pytest.raises(ValueError):
        ev.PageRequest(1, ()).encode()
    with pytest.raises(ValueError):
        ev.PageBatch(0, 1, b"", flags=0x80).encode()
    with pytest.raises(ValueError):
        ev.PageInvalidate(0, np.array([4, 2], dtype=np.uint64)).encode()


caps = st.frozensets(st.from_regex(r"\A[a-z0-9][a-z0-9_.\-]{0,31}\Z"), max_size=8)
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


@st.composite
def bitmaps(draw):
    npages = draw(st.integers(0, 200))
    bits = draw(st.lists(st.booleans(), min_size=npages, max_size=npages))
    raw = bytearray((npages + 7) // 8)
    for i, b in enumerate(bits):
        raw[i // 8] |= b << (i % 8)
    return npages, bytes(raw)


events_strategy = st.one_of(
    st.builds(ev.Hello, st.integers(1, 100), st.just(100), st.sampled_from(ev.ChannelKind),
              st.binary(min_size=16, max_size=16), caps, st.booleans(), u32),
    st.builds(ev.Welcome, st.integers(0, 65535), caps, u32),
    st.builds(ev.Refuse, st.sampled_from(ev.RefuseCode), st.text(max_size=50)),
    st.builds(ev.MigrationOffer,
              st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8),
                              max_size=5),
              st.sampled_from(ev.Mode), u64, st.sampled_from([512, 4096, 1 << 21])),
    st.builds(ev.PageBatch, u32, u32, st.binary(max_size=300),
              st.sampled_from([0, ev.BATCH_POSTCOPY])),
    st.builds(ev.PageBatch, u32, u32, st.binary(max_size=300), st.just(ev.BATCH_URGENT), u64),
    st.builds(ev.RoundEnd, u32, u64, u64),
    bitmaps().map(lambda b: ev.PresentReport(*b)),
    st.tuples(st.binary(max_size=64), st.binary(min_size=16, max_size=16), bitmaps()).map(
        lambda t: ev.Switchover(t[0], t[1], *t[2])),
    st.builds(ev.PageRequest, u64, st.lists(u64, min_size=1, max_size=20).map(tuple)),
    st.builds(ev.PageInvalidate, u32, st.sets(u64, max_size=40).map(
        lambda s: np.array(sorted(s), dtype=np.uint64))),
    st.builds(ev.Abort, st.sampled_from(ev.Phase), st.text(max_size=40)),
    st.builds(ev.Ping, u64),
)


@settings(max_examples=300, deadline=None)
@given(events_strategy)
def test_roundtrip_property(event):
    assert roundtrip(event) == event


def test_pagebatch_sends_a_list_of_buffers_back_to_back():
    import numpy as np

    pages = np.arange(3 * 4096, dtype=np.uint8)
    parts = [b"head", memoryview(pages[:4096]), pages[4096:]]
    batch = ev.PageBatch(2, 3, parts)
    flags, encoded = batch.encode()
    assert batch.data_bytes == 4 + 3 * 4096
    payload = b"".join(bytes(p) for p in encoded)
    back = ev.PageBatch.decode(flags, memoryview(payload))
    assert bytes(back.data) == b"head" + pages.tobytes()
    assert (back.round, back.npages) == (2, 3)


def test_field_tables_cover_every_attribute():
    """The wire layout and the dataclass name the same fields (PageBatch's
    flags travel in the frame header, not the payload)."""
    for cls in ev.ALL_EVENTS:
        attrs = {f.name for f in dataclasses.fields(cls)} - {"flags"}
        on_wire = set(cls.LAYOUT.attrs)
        if cls is ev.Switchover:
            on_wire |= {"owed_npages", "owed_bitmap"}
        assert on_wire == attrs, cls.__name__


def _reserved_offsets(cls):
    """(field name, byte offset, size) of each reserved field in the fixed prefix."""
    offset = 0
    for f in cls.LAYOUT.fields:
        if f.fmt is None:
            return
        size = struct.calcsize("<" + f.fmt)
        if isinstance(f, Reserved):
            yield f.name, offset, size
        offset += size


RESERVED = [(event, name, offset, size) for event in SAMPLES
            for name, offset, size in _reserved_offsets(type(event))]


def test_reserved_fields_are_found():
    assert {type(e) for e, *_ in RESERVED} >= {
        ev.Hello, ev.Welcome, ev.MigrationOffer, ev.RoundEnd, ev.RoundAck, ev.PageRequest,
        ev.Abort, ev.ProbeData, ev.ProbeEnd, ev.ProbeResult}


@pytest.mark.parametrize("event, name, offset, size", RESERVED,
                         ids=lambda x: type(x).__name__ if isinstance(x, ev.Event) else str(x))
def test_every_reserved_field_must_be_zero(event, name, offset, size):
    flags, parts = event.encode()
    payload = bytearray(b"".join(bytes(p) for p in parts))
    payload[offset + size - 1] = 0x80
    with pytest.raises(PayloadError, match=rf"{type(event).__name__}\.{name} is \d+, must be 0"):
        decode_event(event.WIRE_ID, flags, memoryview(payload))


@pytest.mark.parametrize("cls, payload, message", [
    (ev.RoundEnd, struct.pack("<IIQ", 1, 0, 1), r"RoundEnd\.bytes: payload truncated"),
    (ev.Hello, struct.pack("<HHBBHI16sH", 1, 1, 9, 0, 0, 4096, bytes(16), 0),
     r"Hello\.channel_kind: unknown ChannelKind 9"),
    (ev.Hello, struct.pack("<HHBBHI16sH", 1, 1, 1, 2, 0, 4096, bytes(16), 0),
     r"Hello\.resume is 2, must be 0 or 1"),
    (ev.MigrationOffer, struct.pack("<BBHIQI", 1, 0, 0, 4000, 1, 2) + b"{}",
     r"MigrationOffer\.page_size 4000 is not a power of two"),
    (ev.Refuse, struct.pack("<HH", 1, 2) + b"\xff\xfe", r"Refuse\.reason is not UTF-8"),
    (ev.PageRequest, struct.pack("<QII", 1, 0, 0), r"PageRequest\.pages: count 0 is not in"),
    (ev.PresentReport, struct.pack("<Q", 9) + b"\x00\x02", r"PresentReport\.bitmap: .*padding"),
    (ev.ProbeEnd, struct.pack("<IIQ", 1, 0, (1 << 30) + 1), r"ProbeEnd\.bytes \d+ is not in"),
    (ev.Accept, b"\x00", r"Accept: 1 trailing bytes"),
])
def test_decode_errors_name_message_and_field(cls, payload, message):
    with pytest.raises(PayloadError, match=message):
        decode_event(cls.WIRE_ID, 0, memoryview(payload))


def test_encode_errors_name_message_and_field():
    with pytest.raises(ValueError, match=r"RoundStart\.round = -1 does not fit"):
        ev.RoundStart(-1).encode()
    with pytest.raises(ValueError, match=r"Hello\.session_id must be 16 bytes"):
        ev.Hello(1, 1, ev.ChannelKind.BULK, b"short").encode()
    with pytest.raises(ValueError, match=r"PageRequest\.pages: 1\.\.65536 entries"):
        ev.PageRequest(1, ()).encode()


def test_unknown_refuse_code_reads_as_other():
    got = decode_event(ev.Refuse.WIRE_ID, 0, memoryview(struct.pack("<HH", 77, 2) + b"hi"))
    assert got == ev.Refuse(ev.RefuseCode.OTHER, "hi")


def test_pong_is_not_a_ping():
    assert not issubclass(ev.Pong, ev.Ping) and not issubclass(ev.Ping, ev.Pong)
    assert ev.Pong(3) != ev.Ping(3)
    assert ev.Pong.LAYOUT.fixed_format == ev.Ping.LAYOUT.fixed_format == "<Q"


def _hello_with_capability(raw: bytes) -> bytes:
    return (struct.pack("<HHBBHI16sHB", 1, 1, 1, 0, 0, 4096, bytes(16), 1, len(raw)) + raw)


def test_capability_name_with_a_trailing_newline_is_refused():
    with pytest.raises(PayloadError, match="capability name"):
        decode_event(ev.Hello.WIRE_ID, 0, memoryview(_hello_with_capability(b"lz4\n")))
    with pytest.raises(ValueError, match="capability name"):
        ev.Hello(1, 1, ev.ChannelKind.BULK, bytes(16), frozenset({"lz4\n"})).encode()
    assert decode_event(ev.Hello.WIRE_ID, 0, memoryview(_hello_with_capability(b"lz4"))
                        ).capabilities == frozenset({"lz4"})


def test_deeply_nested_offer_config_is_a_payload_error():
    config = b"[" * 200_000
    payload = struct.pack("<BBHIQI", 1, 0, 0, 4096, 1, len(config)) + config
    with pytest.raises(PayloadError, match=r"MigrationOffer\.config is nested too deeply"):
        decode_event(ev.MigrationOffer.WIRE_ID, 0, memoryview(payload))
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        ev.MigrationOffer({"x": deep}, ev.Mode.PRECOPY, 1).encode()
