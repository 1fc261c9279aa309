"""The native core speaks the wire of protocol/spec.py and nothing else.

csrc/build_ffi.py generates csrc/wire/lm_wire_gen.h from spec.c_defines() and
exposes every define through the cdef with the value the C compiler saw, so a
module built from an older spec (a stale build) fails here, and so does a
C file that writes a wire number by hand instead of using the generated name.
"""
import pathlib
import re

import pytest

from livemig.native import ffi, lib
from livemig.protocol import spec

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"


@pytest.mark.parametrize("name", sorted(spec.c_defines()))
def test_compiled_module_carries_the_spec_value(name):
    literal = spec.c_defines()[name]
    carried = getattr(lib, name)
    if literal.startswith('"'):
        assert ffi.string(carried) == literal.strip('"').encode("ascii")
    else:
        assert carried == int(literal, 0)


def _hand_written_sources():
    return [p for p in CSRC.rglob("*") if p.suffix in (".c", ".h") and p.name != "lm_wire_gen.h"]


@pytest.mark.skipif(not CSRC.is_dir(), reason="runs from a source checkout")
def test_no_c_file_defines_a_wire_number_itself():
    names = spec.c_defines()
    magics = [spec.FRAME_MAGIC.decode(), spec.BATCH_MAGIC.decode()]
    offenders = []
    for path in _hand_written_sources():
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r"#\s*define\s+(\w+)", text):
            if name in names:
                offenders.append(f"{path.relative_to(CSRC)} defines {name}")
        for magic in magics:
            if f'"{magic}"' in text:
                offenders.append(f"{path.relative_to(CSRC)} spells the magic {magic!r}")
    assert not offenders
