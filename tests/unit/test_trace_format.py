"""The dirty-page trace file (vm/trace.py): round trips, and every way a file
can be wrong refused by name before it costs more memory than its size."""
import struct

import numpy as np
import pytest
import xxhash

from livemig.errors import ConfigError
from livemig.vm import trace
from livemig.vm.programs import Layout


def _trace(seed=1, nintervals=20, npages=8192, per=300, interval_s=0.05):
    rng = np.random.default_rng(seed)
    ivs = tuple(np.unique(rng.integers(0, npages, per)) for _ in range(nintervals))
    return trace.Trace(npages * 4096, interval_s, ivs)


def test_round_trip_keeps_every_interval():
    t = _trace()
    back = trace.decode(trace.encode(t))
    assert back.memory_bytes == t.memory_bytes and back.interval_s == t.interval_s
    assert len(back.intervals) == len(t.intervals)
    for a, b in zip(t.intervals, back.intervals):
        assert np.array_equal(a, b)


def test_empty_dense_and_edge_intervals_round_trip():
    npages = 1 << 20
    ivs = (np.zeros(0, np.int64), np.arange(npages, dtype=np.int64),
           np.array([0, npages - 1], np.int64))
    t = trace.Trace(npages * 4096, 0.1, ivs)
    data = trace.encode(t)
    # a dense interval costs one byte per page
    assert len(data) < trace.HEADER_BYTES + npages + 64
    back = trace.decode(data)
    for a, b in zip(ivs, back.intervals):
        assert np.array_equal(a, b)


def test_file_size_is_small_per_dirty_page():
    t = _trace(per=2000, npages=1 << 18)
    body = len(trace.encode(t)) - trace.HEADER_BYTES
    assert body <= 3 * t.dirty_pages + 5 * len(t.intervals)


def _reseal(data: bytes, body: bytes, **header) -> bytes:
    fields = list(struct.unpack_from("<8sHHIQIIQQ", data))
    names = ["magic", "version", "reserved", "page_size", "memory_bytes", "interval_us",
             "nintervals", "body_length", "checksum"]
    fields[7], fields[8] = len(body), xxhash.xxh64_intdigest(body)
    for k, v in header.items():
        fields[names.index(k)] = v
    return struct.pack("<8sHHIQIIQQ", *fields) + body


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:10], "shorter than"),
    (lambda d: d[:-3], "truncated or extended"),
    (lambda d: d + b"\0", "truncated or extended"),
    (lambda d: b"NOTATRAC" + d[8:], "bad magic"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], version=2), "version 2"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], reserved=1), "reserved"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], page_size=65536), "65536-byte pages"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], memory_bytes=4097), "memory size"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], interval_us=0), "interval"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], nintervals=0), "intervals"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], nintervals=21), "interval 20 of 21"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], nintervals=19), "after the last"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:-1] + b"\x80"), "inside a number"),
    (lambda d: _reseal(d, b"\xff\xff\xff\xff\x01"), "longer than"),
    (lambda d: _reseal(d, b"\x80" * (3 << 20) + b"\x01"), "longer than"),
    (lambda d: _reseal(d, b"\xff\xff\x03" + b"\0" * 5), "claims"),
    (lambda d: _reseal(d, d[trace.HEADER_BYTES:], memory_bytes=4096 * 2000), "past the"),
])
def test_bad_files_are_refused_by_name(mutate, message):
    data = trace.encode(_trace())
    with pytest.raises(ConfigError, match=message):
        trace.decode(mutate(data), where="trace file t")


def test_hostile_count_costs_no_more_than_the_file():
    # an interval that claims 2**28 - 1 pages in a 20-byte body is refused
    # before anything of that size exists
    body = b"\xff\xff\xff\x7f" + b"\0" * 16
    data = _reseal(trace.encode(_trace()), body, memory_bytes=1 << 40)
    with pytest.raises(ConfigError, match="claims"):
        trace.decode(data)


def test_load_refuses_oversized_and_missing_files(tmp_path, monkeypatch):
    path = tmp_path / "t.lmtrace"
    trace.write(str(path), _trace())
    assert len(trace.load(str(path)).intervals) == 20
    monkeypatch.setattr(trace, "MAX_TRACE_BYTES", 16)
    with pytest.raises(ConfigError, match="more than"):
        trace.load(str(path))
    with pytest.raises(ConfigError, match="cannot read"):
        trace.load(str(tmp_path / "absent"))


def test_image_maps_pages_exactly_with_enough_memory():
    t = _trace(npages=4096)
    layout = Layout((4096 + 2 * 64 + 8) * 4096, 2)
    img = trace.image_for(t, data_npages=layout.data_npages, nvcpus=2)
    targets = layout.data_npages - img.trace_npages
    assert targets * 2 >= t.npages
    # every interval's pages all come back, split among the vCPUs
    cursors = [0, 0]
    for pages in t.intervals:
        got = []
        for v in range(2):
            s = img.streams[v]
            n = int(s[cursors[v]])
            got += [v * targets + int(x) for x in s[cursors[v] + 1:cursors[v] + 1 + n]]
            cursors[v] += 1 + n
            assert n <= img.slots
        assert sorted(got) == sorted(int(p) for p in pages)
    assert all(int(img.streams[v][cursors[v]]) == trace.END_WORD for v in range(2))
    assert 0 < img.pages_per_tick <= 1
    # the pace the recorded rate implies is slots per interval
    assert img.dirty_rate_bps(2) / (img.pages_per_tick * 4096 * 2) == pytest.approx(
        img.slots / t.interval_s)


def test_image_refuses_a_vm_too_small_for_its_trace_area():
    with pytest.raises(ConfigError, match="give the VM at least"):
        trace.image_for(_trace(), data_npages=4, nvcpus=2)


def test_a_decoded_trace_encodes_to_the_same_bytes():
    data = trace.encode(_trace(seed=4, npages=1 << 20, per=5000))
    assert trace.encode(trace.decode(data)) == data
