"""CFFI out-of-line API build of livemig._native.

The one hand-written header csrc/livemig.h is both the C include of every
source file (csrc/<layer>/lm_*.c; files include other layers' internal
headers by their path from csrc/, e.g. "postcopy/lm_postcopy_internal.h") and,
between the LM_CDEF_BEGIN/LM_CDEF_END markers, the cdef given to CFFI.

The wire numbers are not written in C at all: this script loads
src/livemig/protocol/spec.py on its own (runpy; the file imports only
`struct`, so the build needs neither numpy nor the livemig package), writes
its c_defines() to csrc/wire/lm_wire_gen.h (generated, not in git), and adds
every one of them to the cdef with the value left for the C compiler to
supply, so the compiled module carries the values C was really built with
(tests/native/test_wire_native.py compares them with spec.py). Nothing from
this script ships in the package.

The bulk streams speak TLS with OpenSSL (csrc/channels/lm_tls.c): when its
headers are found (Debian: libssl-dev) the module is compiled with
LM_HAVE_OPENSSL and linked with libssl and libcrypto; without them it is
still built, and lm_tls_probe says TLS streams are unavailable and why
(LIVEMIG_BUILD_WITHOUT_OPENSSL=1 builds that way on purpose).

Run directly (`python csrc/build_ffi.py`) to build in place into src/livemig/
for development; `pip install .` builds it through setup.py.
"""
import glob
import os
import re
import runpy

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "livemig.h")
SPEC = os.path.join(os.path.dirname(HERE), "src", "livemig", "protocol", "spec.py")
WIRE_HEADER = os.path.join(HERE, "wire", "lm_wire_gen.h")


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


def _wire_defines() -> dict[str, str]:
    return runpy.run_path(SPEC)["c_defines"]()


def _write_wire_header(defines: dict[str, str]) -> None:
    """Write lm_wire_gen.h, leaving the file (and its mtime, so nothing
    recompiles) alone when its text would not change."""
    lines = [
        "/* The wire numbers of src/livemig/protocol/spec.py, written by",
        " * csrc/build_ffi.py at every build. Edit spec.py, never this file. */",
        "#ifndef LM_WIRE_GEN_H",
        "#define LM_WIRE_GEN_H",
        "",
        *(f"#define {name} {value}" for name, value in defines.items()),
        "",
        "#endif /* LM_WIRE_GEN_H */",
        "",
    ]
    text = "\n".join(lines)
    try:
        with open(WIRE_HEADER, encoding="utf-8") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(WIRE_HEADER), exist_ok=True)
    with open(WIRE_HEADER, "w", encoding="utf-8") as f:
        f.write(text)


def _wire_cdef(defines: dict[str, str]) -> str:
    """Integers as `#define NAME ...` and strings (the magics) as constant
    char pointers: either way CFFI takes the value from the compiled C."""
    return "\n".join(
        f"static const char *const {name};" if value.startswith('"') else f"#define {name} ..."
        for name, value in defines.items()
    )


def _sources() -> list[str]:
    """Every lm_*.c under csrc/, whichever layer folder it sits in."""
    return sorted(glob.glob(os.path.join(HERE, "**", "lm_*.c"), recursive=True))


OPENSSL_INCLUDE_DIRS = ("/usr/include", "/usr/local/include")


def _openssl_include_dir() -> str | None:
    """Where openssl/ssl.h is (None: build without TLS streams)."""
    if os.environ.get("LIVEMIG_BUILD_WITHOUT_OPENSSL", "").strip() == "1":
        return None
    for d in (*filter(None, os.environ.get("OPENSSL_INCLUDE_DIR", "").split(os.pathsep)),
              *OPENSSL_INCLUDE_DIRS):
        if os.path.exists(os.path.join(d, "openssl", "ssl.h")):
            return d
    return None


def make_builder(absolute_paths: bool) -> FFI:
    """setuptools wants sources relative to where it runs (the project root);
    ffi.compile() changes into its temporary directory, so it needs them absolute."""
    defines = _wire_defines()
    _write_wire_header(defines)
    sources = _sources()
    if not absolute_paths:
        sources = [os.path.relpath(p) for p in sources]
    openssl = _openssl_include_dir()
    builder = FFI()
    builder.cdef(_cdef_text() + "\n" + _wire_cdef(defines))
    builder.set_source(
        "livemig._native",
        '#include "livemig.h"\n#include "wire/lm_wire_gen.h"',
        sources=sources,
        include_dirs=[HERE] + ([openssl] if openssl else []),
        define_macros=[("LM_HAVE_OPENSSL", "1")] if openssl else [],
        extra_compile_args=["-O2", "-std=gnu11", "-pthread", "-Wall", "-Wextra",
                            "-Wno-unused-parameter", "-fvisibility=hidden"],
        extra_link_args=["-pthread"],
        libraries=["pthread"] + (["ssl", "crypto"] if openssl else []),
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
