"""Failpoints: named places where a test has the daemon die on the spot.

Some faults cannot be injected from outside the process at the exact point
that matters — e.g. a destination killed after its etcd commit but before it
resumes the guest, a window with no message on the wire. As etcd's gofail
does, the code names such points (``hit("fleet-after-commit")``); a daemon
started with ``LIVEMIG_FAILPOINTS=name[,name...]`` in its environment kills
itself with SIGKILL when it reaches one. Unset (always, outside tests), a
hit is one set lookup.
"""
from __future__ import annotations

import os
import signal

ENV_VAR = "LIVEMIG_FAILPOINTS"
AFTER_COMMIT = "fleet-after-commit"     # the destination's commit went through, not resumed
_ARMED = frozenset(n.strip() for n in os.environ.get(ENV_VAR, "").split(",") if n.strip())


def hit(name: str) -> None:
    if name in _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
