"""Daemons inside the test's own event loop, for tests that call their
handlers directly (``daemon._handlers()``) rather than through a socket."""
from __future__ import annotations

import contextlib
from pathlib import Path

from livemig.service.daemon import Daemon


@contextlib.asynccontextmanager
async def started_daemons(tmp: Path, *labels: str, **options):
    """Daemons on loopback port 0, one per label (control socket
    ``tmp/LABEL.sock``), started in order and all closed at the end."""
    daemons: list[Daemon] = []
    try:
        for label in labels:
            d = Daemon(listen="127.0.0.1:0", control_path=str(tmp / f"{label}.sock"), **options)
            await d.start()
            daemons.append(d)
        yield daemons
    finally:
        for d in reversed(daemons):
            await d.close()
