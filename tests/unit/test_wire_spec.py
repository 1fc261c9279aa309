"""protocol/spec.py is the one definition of the wire: the Python modules that
speak it take their numbers from it. The native side is compared in
tests/native/test_wire_native.py."""
import struct

from livemig.codec import batchformat as bf
from livemig.codec import rawbatch
from livemig.protocol import events, spec, wire


def test_every_message_has_its_spec_id_and_every_spec_id_a_message():
    assert {cls.__name__: cls.WIRE_ID for cls in events.ALL_EVENTS} == spec.MESSAGE_IDS


def test_frame_header_comes_from_the_spec():
    assert wire.MAGIC == spec.FRAME_MAGIC
    assert wire.WIRE_VERSION == spec.WIRE_VERSION
    assert wire.HEADER.format == spec.FRAME_HEADER_FORMAT
    assert wire.HEADER_BYTES == spec.FRAME_HEADER_BYTES == 32


def test_batch_format_comes_from_the_spec():
    assert (bf.MAGIC, bf.VERSION) == (spec.BATCH_MAGIC, spec.BATCH_VERSION)
    assert bf.HEADER.format == spec.BATCH_HEADER_FORMAT
    assert bf.RUN_BYTES == struct.calcsize(spec.BATCH_RUN_FORMAT)
    assert bf.CODES == spec.ENCODINGS
    assert rawbatch._RUN.format == spec.BATCH_RUN_FORMAT


def test_c_defines_cover_every_message_and_encoding():
    defs = spec.c_defines()
    assert defs["LM_MSG_PAGE_BATCH"] == str(spec.MESSAGE_IDS["PageBatch"])
    assert defs["LM_MSG_POSTCOPY_COMPLETE"] == "66"
    assert sum(k.startswith("LM_MSG_") for k in defs) == len(spec.MESSAGE_IDS)
    assert sum(k.startswith("LM_ENC_") for k in defs) == len(spec.ENCODINGS)
    assert defs["LM_WIRE_MAGIC"] == '"LMIG"'
