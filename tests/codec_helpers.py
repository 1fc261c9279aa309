"""Helpers shared by the codec tests: a source/destination pair and a transfer loop."""
import numpy as np

from livemig.codec import batchformat as bf
from livemig.codec.encoder import BatchDecoder, BatchEncoder
from livemig.config import CodecConfig
from livemig.native.memory import GuestMemory

TEXT = np.frombuffer((b"The quick brown fox jumps over the lazy dog. " * 100)[:4096], np.uint8)


class Pair:
    def __init__(self, npages=64, config=None, placer=None):
        self.src = GuestMemory(npages * 4096, hugepages=False)
        self.dst = GuestMemory(npages * 4096, hugepages=False)
        self.enc = BatchEncoder(self.src, config or CodecConfig())
        self.dec = BatchDecoder(self.dst, placer)

    def send(self, indices, max_batch_bytes=1 << 20, *, frozen=False, mutate=None):
        """Encode and apply; ``mutate()`` runs between encoding and sending each
        batch (a guest writing while bytes are in flight). Returns the batches."""
        out = []
        for batch in self.enc.encode(np.asarray(indices, dtype=np.int64), max_batch_bytes,
                                     frozen=frozen):
            assert batch.nbytes <= max_batch_bytes
            assert batch.nbytes <= bf.HEADER.size + batch.npages * 4096 + batch.nruns * bf.RUN_BYTES
            if mutate is not None:
                mutate()
            data = batch.tobytes()
            assert len(data) == batch.nbytes
            decoded = self.dec.apply(data)
            assert decoded.npages == batch.npages
            assert decoded.pages_by_encoding == batch.pages_by_encoding
            out.append(batch)
        return out

    def close(self):
        self.src.close()
        self.dst.close()


def totals(batches):
    t = {name: 0 for name in bf.NAMES.values()}
    for b in batches:
        for k, v in b.pages_by_encoding.items():
            t[k] += v
    return t
