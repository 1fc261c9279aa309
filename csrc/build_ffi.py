"""CFFI out-of-line API build of livemig._native.

The one hand-written header csrc/livemig.h is both the C include of every
source file (csrc/<layer>/lm_*.c; files include other layers' internal
headers by their path from csrc/, e.g. "postcopy/lm_postcopy_internal.h") and, between the LM_CDEF_BEGIN/LM_CDEF_END markers, the cdef
given to CFFI. Nothing from this script ships in the package.

Run directly (`python csrc/build_ffi.py`) to build in place into src/livemig/
for development; `pip install .` builds it through setup.py.
"""
import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "livemig.h")


def _cdef_text() -> str:
    with open(HEADER, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* LM_CDEF_BEGIN \*/(.*?)/\* LM_CDEF_END \*/", text, re.S)
    if not m:
        raise RuntimeError("csrc/livemig.h lacks the LM_CDEF_BEGIN/LM_CDEF_END markers")
    body = m.group(1)
    # cffi's parser takes integer #defines but no other preprocessor lines.
    return "\n".join(
        line for line in body.splitlines()
        if not line.lstrip().startswith("#") or re.match(r"\s*#define\s+\w+\s+\(?-?[0-9xXa-fA-FuUlL]+\)?\s*(/\*.*\*/)?\s*$", line)
    )


def _sources() -> list[str]:
    """Every lm_*.c under csrc/, whichever layer folder it sits in."""
    return sorted(glob.glob(os.path.join(HERE, "**", "lm_*.c"), recursive=True))


def make_builder(absolute_paths: bool) -> FFI:
    """setuptools wants sources relative to where it runs (the project root);
    ffi.compile() changes into its temporary directory, so it needs them absolute."""
    sources = _sources()
    if not absolute_paths:
        sources = [os.path.relpath(p) for p in sources]
    builder = FFI()
    builder.cdef(_cdef_text())
    builder.set_source(
        "livemig._native",
        '#include "livemig.h"',
        sources=sources,
        include_dirs=[HERE],
        extra_compile_args=["-O2", "-std=gnu11", "-pthread", "-Wall", "-Wextra",
                            "-Wno-unused-parameter", "-fvisibility=hidden"],
        extra_link_args=["-pthread"],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_builder(absolute_paths=False)

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(HERE), "src")
    tmp = os.path.join(os.path.dirname(HERE), "build", "cffi")
    built = make_builder(absolute_paths=True).compile(tmpdir=tmp)
    import shutil
    dest = os.path.join(out, "livemig", os.path.basename(built))
    shutil.copy(built, dest)
    print("built", dest)
