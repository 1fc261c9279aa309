"""Frame header encoding and the incremental frame reader."""
import struct

import pytest
import xxhash

from livemig.protocol import wire

TYPES = {1, 2, 33}


def frame(type_id=33, flags=0, seq=0, payload=b"abc", **kw):
    return b"".join(bytes(b) for b in wire.encode_frame(type_id, flags, seq, [payload], **kw))


def reader(**kw):
    return wire.FrameReader(valid_types=TYPES, **kw)


def test_header_layout_is_fixed_little_endian():
    raw = frame(33, 0x2, 5, b"hello")
    assert len(raw) == 32 + 5
    magic, ver, typ, flags, res, length, seq, csum = struct.unpack_from("<4sHHHHIQQ", raw)
    assert (magic, ver, typ, flags, res, length, seq) == (b"LMIG", 1, 33, 2, 0, 5, 5)
    assert csum == xxhash.xxh3_64_intdigest(b"hello")


def test_encode_does_not_copy_payload_parts():
    big = memoryview(bytearray(1 << 20))
    bufs = wire.encode_frame(33, 0, 0, [b"prefix", big])
    assert bufs[2] is big and len(bufs[0]) == 32


def test_checksum_spans_parts():
    bufs = wire.encode_frame(33, 0, 0, [b"ab", b"", b"cd"])
    r = reader()
    for b in bufs:
        r.feed(b)
    assert bytes(r.next_frame().payload) == b"abcd"


def test_roundtrip_sequence_of_frames():
    r = reader()
    r.feed(frame(seq=0, payload=b"") + frame(1, seq=1, payload=b"x" * 100))
    a, b = r.next_frame(), r.next_frame()
    assert (a.type_id, a.sequence, bytes(a.payload)) == (33, 0, b"")
    assert (b.type_id, b.sequence, bytes(b.payload)) == (1, 1, b"x" * 100)
    assert r.next_frame() is None and not r.mid_frame


def test_large_payload_filled_in_place_and_owned():
    payload = bytes(range(256)) * 4096  # 1 MiB
    raw = frame(payload=payload)
    r = reader()
    r.feed(raw[:1000])
    assert r.next_frame() is None
    assert r._pending is not None          # body buffer allocated at its final size
    body = r._body
    for i in range(1000, len(raw), 65536):
        r.feed(memoryview(raw)[i:i + 65536])
    f = r.next_frame()
    assert f.payload.obj is body           # the bytes landed directly in it
    assert bytes(f.payload) == payload and f.payload.readonly


@pytest.mark.parametrize("mutate, reason", [
    (lambda h: h.__setitem__(slice(0, 4), b"XMIG"), "bad magic"),
    (lambda h: h.__setitem__(slice(4, 6), (2).to_bytes(2, "little")), "version"),
    (lambda h: h.__setitem__(slice(6, 8), (0).to_bytes(2, "little")), "type 0"),
    (lambda h: h.__setitem__(slice(6, 8), (999).to_bytes(2, "little")), "unknown frame type"),
    (lambda h: h.__setitem__(slice(10, 12), (1).to_bytes(2, "little")), "reserved"),
    (lambda h: h.__setitem__(slice(12, 16), (1 << 30).to_bytes(4, "little")), "exceeds the cap"),
    (lambda h: h.__setitem__(slice(16, 24), (3).to_bytes(8, "little")), "sequence"),
    (lambda h: h.__setitem__(32, h[32] ^ 1), "checksum"),
    (lambda h: h.__setitem__(slice(24, 32), bytes(8)), "checksum"),
])
def test_malformed_header_fields(mutate, reason):
    raw = bytearray(frame(payload=b"payload"))
    mutate(raw)
    r = reader(max_payload_bytes=1 << 20)
    r.feed(bytes(raw))
    with pytest.raises(wire.FrameError, match=reason):
        r.next_frame()


def test_bad_magic_detected_before_full_header():
    r = reader()
    r.feed(b"LMX")
    with pytest.raises(wire.FrameError, match="magic"):
        r.next_frame()


def test_oversized_length_rejected_without_allocating():
    r = reader(max_payload_bytes=4096)
    raw = bytearray(frame(payload=b"x"))
    raw[12:16] = (4097).to_bytes(4, "little")
    r.feed(bytes(raw[:32]))
    with pytest.raises(wire.FrameError, match="cap"):
        r.next_frame()
    assert r._body is None


def test_truncation_is_visible():
    r = reader()
    r.feed(frame(payload=b"x" * 10)[:-1])
    assert r.next_frame() is None and r.mid_frame


def test_encode_rejects_invalid_type_and_oversize():
    with pytest.raises(ValueError):
        wire.encode_frame(0, 0, 0, [])
    with pytest.raises(ValueError):
        wire.encode_frame(1, 1 << 16, 0, [])
    with pytest.raises(ValueError):
        wire.encode_frame(1, 0, 0, [b"x" * 10], max_payload_bytes=9)


def test_buffered_receive_lands_large_payload_in_place():
    small = frame(1, seq=0, payload=b"hi")
    payload = bytes(range(256)) * 1024       # 256 KiB
    big1 = frame(33, seq=1, payload=payload)
    big2 = frame(33, seq=2, payload=payload[::-1])
    stream = memoryview(small + big1 + big2)
    r = reader()
    frames, bodies = [], []
    while stream:
        buf = r.get_buffer(-1)
        if r._pending is not None:
            bodies.append(buf.obj)
        n = min(len(buf), len(stream))
        buf[:n] = stream[:n]
        stream = stream[n:]
        r.buffer_updated(n)
        while (f := r.next_frame()) is not None:
            frames.append(f)
    assert [bytes(f.payload) for f in frames] == [b"hi", payload, payload[::-1]]
    # After the first large frame only its successor's header is staged, so
    # the whole second payload was received in place.
    assert frames[2].payload.obj is bodies[-1]
    assert len(r.get_buffer(-1)) == wire.HEADER_BYTES
