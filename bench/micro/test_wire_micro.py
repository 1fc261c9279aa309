"""Frame encoding and parsing through the sans-IO connection."""
import pytest

from livemig.protocol import ChannelKind, Connection, Hello, PageBatch, Role, Welcome
from livemig.protocol.connection import answer_hello

PAYLOAD = bytes(range(256)) * 4096       # 1 MiB page batch
NFRAMES = 16


def _pair():
    src = Connection(Role.SOURCE, ChannelKind.BULK)
    dst = Connection(Role.DESTINATION)
    for buf in src.send(Hello(1, 1, ChannelKind.BULK, bytes(16))):
        dst.receive_data(buf)
    hello = dst.next_event()
    for buf in dst.send(answer_hello(hello)):
        src.receive_data(buf)
    assert isinstance(src.next_event(), Welcome)
    return src, dst


def test_frame_encode(benchmark):
    """16 one-MiB PageBatch frames to buffers (header + payload checksum)."""
    src, _ = _pair()
    batch = PageBatch(0, 256, PAYLOAD)
    benchmark(lambda: [src.send(batch) for _ in range(NFRAMES)])


@pytest.mark.parametrize("chunk_bytes", [1 << 16, 1 << 20])
def test_frame_parse(benchmark, chunk_bytes):
    """Parse 16 one-MiB frames fed in chunks of ``chunk_bytes``, checksums checked."""
    src = Connection(Role.SOURCE, ChannelKind.BULK)
    hello_bytes = b"".join(bytes(b) for b in src.send(Hello(1, 1, ChannelKind.BULK, bytes(16))))
    src.receive_data(b"".join(bytes(b) for b in _opened(hello_bytes)[1]))
    src.next_event()
    stream = b"".join(bytes(b) for _ in range(NFRAMES)
                      for b in src.send(PageBatch(0, 256, PAYLOAD)))
    chunks = [stream[off:off + chunk_bytes] for off in range(0, len(stream), chunk_bytes)]

    def parse(conn):
        n = 0
        for chunk in chunks:
            conn.receive_data(chunk)
            while isinstance(conn.next_event(), PageBatch):
                n += 1
        return n
    got = benchmark.pedantic(parse, setup=lambda: ((_opened(hello_bytes)[0],), {}),
                             rounds=10, iterations=1)
    assert got == NFRAMES


def _opened(hello_bytes):
    """A destination connection that received ``hello_bytes`` and welcomed it."""
    dst = Connection(Role.DESTINATION)
    dst.receive_data(hello_bytes)
    return dst, dst.send(answer_hello(dst.next_event()))
