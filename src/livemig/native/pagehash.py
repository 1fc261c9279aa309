"""Which page hash implementation the native core runs (csrc/codec/lm_pagehash.c).

Theory of operation
-------------------
Every page and block hash the native loops make (and so both peers'
digests and block fingerprints) has one value, fixed by the scalar
definition in csrc/codec/lm_pagehash.h. How it is computed is chosen once
when the module loads: the AVX-512 form (all sixteen blocks of a page in
eight zmm registers) where the CPU has AVX-512 F, DQ and VL, else the
scalar loop; ``LIVEMIG_PAGEHASH=scalar`` in the environment forces the
scalar loop. :func:`implementation` names the choice (``livemig probe``
reports it); :func:`hash_page` and :func:`hash_pages` run a named
implementation explicitly, so tests and the bench compare the two in one
process.
"""
from __future__ import annotations

import numpy as np

from . import PAGE_SIZE, ffi, lib

IMPLEMENTATIONS = {"scalar": lib.LM_PAGEHASH_SCALAR, "avx512": lib.LM_PAGEHASH_AVX512}
ENV_VAR = "LIVEMIG_PAGEHASH"
"""Set to ``scalar`` (before the module loads) to force the scalar loop."""
_NAMES = {v: k for k, v in IMPLEMENTATIONS.items()}


def implementation() -> str:
    """The implementation this process uses: ``"avx512"`` or ``"scalar"``."""
    return _NAMES[lib.lm_pagehash_impl()]


def available(name: str) -> bool:
    """Whether implementation ``name`` can run on this CPU."""
    return bool(lib.lm_pagehash_available(IMPLEMENTATIONS[name]))


def _require(name: str) -> int:
    if not available(name):
        raise RuntimeError(f"page hash implementation {name!r} cannot run on this CPU")
    return IMPLEMENTATIONS[name]


def hash_page(name: str, page) -> tuple[int, np.ndarray]:
    """(page hash, its 16 block hashes) of one PAGE_SIZE-byte buffer, by ``name``."""
    impl = _require(name)
    view = memoryview(page).cast("B")
    if view.nbytes != PAGE_SIZE:
        raise ValueError(f"a page is {PAGE_SIZE} bytes, got {view.nbytes}")
    blocks = np.zeros(lib.LM_BLOCKS_PER_PAGE, dtype=np.uint64)
    out = ffi.new("uint64_t *")
    rc = lib.lm_pagehash_page(impl, ffi.from_buffer("uint8_t[]", view),
                              ffi.cast("uint64_t *", blocks.ctypes.data), out)
    if rc < 0:  # pragma: no cover - _require checked
        raise RuntimeError(f"lm_pagehash_page({name}) failed: {rc}")
    return int(out[0]), blocks


def hash_pages(name: str, buf) -> np.ndarray:
    """Page hashes of a buffer of whole pages, by ``name``."""
    impl = _require(name)
    view = memoryview(buf).cast("B")
    if view.nbytes % PAGE_SIZE:
        raise ValueError(f"buffer of {view.nbytes} bytes is not whole {PAGE_SIZE}-byte pages")
    npages = view.nbytes // PAGE_SIZE
    hashes = np.zeros(npages, dtype=np.uint64)
    rc = lib.lm_pagehash_pages(impl, ffi.from_buffer("uint8_t[]", view), npages,
                               ffi.cast("uint64_t *", hashes.ctypes.data))
    if rc < 0:  # pragma: no cover - _require checked
        raise RuntimeError(f"lm_pagehash_pages({name}) failed: {rc}")
    return hashes


def describe() -> dict:
    """For ``livemig probe``: the implementation in use and what could run."""
    return {"implementation": implementation(),
            "available": [n for n in IMPLEMENTATIONS if available(n)],
            "forced_scalar_by": ENV_VAR + "=scalar"}


__all__ = ["IMPLEMENTATIONS", "ENV_VAR", "implementation", "available", "hash_page",
           "hash_pages", "describe"]
