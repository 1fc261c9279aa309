"""The wire, as data: every number that both livemig's Python and its C speak.

Theory of operation
-------------------
This file is the one definition of the frame header, the message ids, the
frame flags and the page-batch format. The Python side imports it
(``protocol.wire``, ``protocol.events``, ``codec.batchformat``); the native
side never writes these numbers by hand: at build time ``csrc/build_ffi.py``
loads this file on its own (it imports nothing, not even from livemig, so the
build needs neither numpy nor the package) and generates ``lm_wire_gen.h``
from :data:`C_DEFINES`. The compiled module exposes the generated defines, and
``tests/native/test_wire_native.py`` fails if a build ever carries other values
than this table (a stale build, or a hand-written copy creeping back).

Rules kept here: ids are this protocol's own numbers grouped by phase
(handshake 1-15, offer 16-31, rounds 32-47, switchover 48-63, post-copy 64-79,
completion 80-95, liveness 96-111, probe 112-127); 0 is never a valid id; every
layout is little-endian; reserved fields are sent as 0 and checked on receipt.
docs/protocol.md describes each field.
"""
from __future__ import annotations

import struct

# -- frames ----------------------------------------------------------------
FRAME_MAGIC = b"LMIG"
WIRE_VERSION = 1   # of handshake frames; later frames carry the negotiated version
# Version 2 adds the native bulk streams: StreamEnd / StreamAck on bulk
# channels and the "streams" capability (docs/protocol.md, "Bulk streams").
STREAMS_VERSION = 2
STREAMS_CAPABILITY = "streams"
PUSH_CAPABILITY = "postcopy-push"
"""Post-copy's push of owed pages on N native bulk streams (version 2):
granted on the control channel, offered again by each push stream's Hello."""
# A peer offering this may resume a pre-copy interrupted by a link break: the
# source reconnects with Hello(resume=True) and the destination answers
# ResumeReport (docs/protocol.md, "Resumable pre-copy"). Without it a break
# during the rounds fails the migration, as before.
RESUME_PRECOPY_CAPABILITY = "resume-precopy"
# A peer offering this measures the link on the native bulk streams before an
# offer: StreamProbe / StreamProbeGrant, N bulk streams of incompressible
# pages, StreamProbeEnd / StreamProbeResult (docs/protocol.md, "Stream
# probe"). Without it ``livemig plan`` probes on the control channel, as before.
STREAM_PROBE_CAPABILITY = "stream-probe"
# A peer offering this on a TLS control channel runs its native bulk streams
# under mutual TLS in the stream threads (docs/protocol.md, "Bulk streams
# under TLS"): such a stream opens with TLS_STREAM_PREAMBLE in the clear on
# the daemon's port, then a TLS 1.3 handshake, then its Hello inside TLS.
# Without it a TLS migration sends its pages on the Python path, as before.
TLS_STREAMS_CAPABILITY = "tls-streams"
# magic "LMTS", version 1 (u16), reserved (u16); never the 0x16 that opens a
# TLS ClientHello, so the listener tells the two apart by the first byte.
TLS_STREAM_PREAMBLE = b"LMTS\x01\x00\x00\x00"
# ResumeReport.acked_round when no round was acknowledged yet.
NO_ROUND = 0xFFFFFFFF
# magic, version, type, flags, reserved, length, sequence, checksum
FRAME_HEADER_FORMAT = "<4sHHHHIQQ"
FRAME_HEADER_BYTES = 32
# Receive cap on every frame before the handshake is done (Hello, Welcome,
# Refuse, Abort are all under 3 KiB): an unauthenticated peer cannot make a
# receiver allocate more than this. The negotiated cap applies from Welcome on.
HANDSHAKE_MAX_PAYLOAD_BYTES = 64 << 10

# -- message ids (the frame header's type field) ----------------------------
MESSAGE_IDS: dict[str, int] = {
    "Hello": 1, "Welcome": 2, "Refuse": 3,
    "MigrationOffer": 16, "Accept": 17,
    "RoundStart": 32, "PageBatch": 33, "RoundEnd": 34, "RoundAck": 35, "PageInvalidate": 36,
    "StreamEnd": 37, "StreamAck": 38, "ResumeReport": 39,
    "Switchover": 48, "Resumed": 49, "VerifyFailed": 50, "Verified": 51, "Commit": 52,
    "PageRequest": 64, "PresentReport": 65, "PostcopyComplete": 66,
    "Complete": 80, "Abort": 81, "Outcome": 82,
    "Ping": 96, "Pong": 97,
    "ProbeData": 112, "ProbeEnd": 113, "ProbeResult": 114,
    "StreamProbe": 115, "StreamProbeGrant": 116, "StreamProbeEnd": 117, "StreamProbeResult": 118,
}

# -- frame flags -------------------------------------------------------------
# PageBatch
BATCH_URGENT = 0x1      # a reply to a PageRequest: serve before anything else
BATCH_POSTCOPY = 0x2    # sent after switchover: pages the destination still owes
# Switchover
SWITCHOVER_POSTCOPY = 0x1   # an owed-pages bitmap follows; the destination faults them in

# -- payload prefixes the native urgent path reads and writes ----------------
PAGE_REQUEST_FORMAT = "<QII"    # request_id, count, reserved; then count u64 page indices
PAGE_BATCH_FORMAT = "<IIQ"      # round, npages, request_id; then a page batch
# -- and the native bulk streams' round markers --------------------------------
STREAM_END_FORMAT = "<IIQQ"     # round, reserved, pages, bytes
STREAM_ACK_FORMAT = "<IIQ"      # round, reserved, pages

# -- page batches (a PageBatch's data) ----------------------------------------
BATCH_MAGIC = b"LMPB"
BATCH_VERSION = 1
# magic, version, flags, reserved, nruns, npages, payload_bytes
BATCH_HEADER_FORMAT = "<4sBBHIIQ"
# first page, count, encoding, three reserved bytes, payload bytes
BATCH_RUN_FORMAT = "<QIBBBBI"
ENCODINGS: dict[str, int] = {"zero": 1, "dup": 2, "delta": 3, "lz4": 4, "raw": 5, "block": 6}


def _c_string(value: bytes) -> str:
    return '"' + value.decode("ascii") + '"'


def _snake(name: str) -> str:
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.upper())
    return "".join(out)


def c_defines() -> dict[str, str]:
    """Name -> C literal of every constant the native side uses; the generated
    header is exactly these lines, and the test compares them with this table."""
    defs = {
        "LM_WIRE_MAGIC": _c_string(FRAME_MAGIC),
        "LM_WIRE_VERSION": str(WIRE_VERSION),
        "LM_WIRE_HEADER_BYTES": str(struct.calcsize(FRAME_HEADER_FORMAT)),
        "LM_WIRE_BATCH_URGENT": hex(BATCH_URGENT),
        "LM_WIRE_BATCH_POSTCOPY": hex(BATCH_POSTCOPY),
        "LM_WIRE_SWITCHOVER_POSTCOPY": hex(SWITCHOVER_POSTCOPY),
        "LM_WIRE_REQUEST_PREFIX_BYTES": str(struct.calcsize(PAGE_REQUEST_FORMAT)),
        "LM_WIRE_BATCH_PREFIX_BYTES": str(struct.calcsize(PAGE_BATCH_FORMAT)),
        "LM_WIRE_STREAMS_VERSION": str(STREAMS_VERSION),
        "LM_WIRE_STREAM_END_BYTES": str(struct.calcsize(STREAM_END_FORMAT)),
        "LM_WIRE_STREAM_ACK_BYTES": str(struct.calcsize(STREAM_ACK_FORMAT)),
        "LM_BATCH_MAGIC": _c_string(BATCH_MAGIC),
        "LM_BATCH_VERSION": str(BATCH_VERSION),
        "LM_BATCH_HEADER_BYTES": str(struct.calcsize(BATCH_HEADER_FORMAT)),
        "LM_BATCH_RUN_BYTES": str(struct.calcsize(BATCH_RUN_FORMAT)),
    }
    for name, wire_id in MESSAGE_IDS.items():
        defs[f"LM_MSG_{_snake(name)}"] = str(wire_id)
    for name, code in ENCODINGS.items():
        defs[f"LM_ENC_{name.upper()}"] = str(code)
    return defs


assert struct.calcsize(FRAME_HEADER_FORMAT) == FRAME_HEADER_BYTES
assert len(TLS_STREAM_PREAMBLE) == 8 and TLS_STREAM_PREAMBLE[0] != 0x16
assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS) and 0 not in MESSAGE_IDS.values()
