"""The only importer of the compiled module ``livemig._native``.

Everything native goes through here: ``lib``/``ffi`` for the calls, and
``check()`` — the one error funnel that turns a ``-errno`` return into a typed
:mod:`livemig.errors` exception. At import it refuses a compiled module whose
ABI version differs from the one this Python code was written against, which
is what happens when csrc/ changed but the extension was not rebuilt.
The wrappers own what they create through :mod:`.handles` (``ffi.gc``, with
users freed before the objects they use).
"""
from __future__ import annotations

from ..errors import LivemigError, native_error
from ..units import PAGE_SIZE

ABI_VERSION = 19

try:
    from .._native import ffi, lib  # type: ignore[import-not-found]
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "livemig's native core (livemig._native) is not built: install the package "
        "with `pip install .` (or `python csrc/build_ffi.py` in a source checkout). "
        f"Import failed with: {exc}"
    ) from exc

if lib.lm_abi_version() != ABI_VERSION:  # pragma: no cover - depends on the build
    raise ImportError(
        f"livemig._native has ABI version {lib.lm_abi_version()}, but this livemig "
        f"expects {ABI_VERSION}: the compiled module is stale; rebuild it with "
        "`pip install .` from the same checkout"
    )
if lib.LM_PAGE_SIZE != PAGE_SIZE:  # pragma: no cover
    raise ImportError("livemig._native was built for another page size")


def check(rc: int, what: str, hint: str | None = None) -> int:
    """Return ``rc`` when it is a success (>= 0); raise the typed error otherwise."""
    if rc < 0:
        raise native_error(-rc, what, hint)
    return rc


__all__ = ["ffi", "lib", "check", "PAGE_SIZE", "ABI_VERSION", "LivemigError"]
