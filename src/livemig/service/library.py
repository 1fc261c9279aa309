"""The embedding API: ``migrate()`` and ``Destination`` for asyncio programs.

Thin conveniences over :mod:`livemig.engine.source.session` and :mod:`livemig.engine.destination.server`:
addresses as ``"host:port"``, keyword options instead of a config object, a
progress callback, and a destination object that yields arrived VMs.
"""
from __future__ import annotations

from typing import Callable

from ..addresses import format_hostport, parse_hostport
from ..config import MigrationConfig, parse_max_bandwidth
from ..engine.destination.server import MigrationServer
from ..engine.source.session import migrate as _migrate
from ..stats import MigrationStats
from ..vm.machine import VM
from ..aio.deadline import within


async def migrate(vm: VM, to: str, *, mode: str = "precopy", downtime_ms: float = 300.0,
                  max_bandwidth: str | float | None = None, auto_converge: bool = False,
                  max_rounds: int = 30, config: MigrationConfig | None = None, ssl=None,
                  name: str = "vm", tracker: str = "auto",
                  on_progress: Callable[[MigrationStats], None] | None = None
                  ) -> MigrationStats:
    """Migrate the running ``vm`` to the livemig destination at ``to``.

    ``downtime_ms`` is the limit on the guest's stop (the config's
    ``max_downtime_ms``; the stop measured is ``stats.downtime_ms``).
    ``max_bandwidth`` is bytes/s or text such as ``"100MiB/s"``/``"1Gbit/s"``.
    Give ``config`` to set everything at once (the keywords are then ignored).
    """
    host, port = parse_hostport(to, what="destination")
    if config is None:
        config = MigrationConfig(
            mode=mode, max_downtime_ms=downtime_ms, auto_converge=auto_converge,
            max_rounds=max_rounds,
            max_bandwidth_bps=parse_max_bandwidth(max_bandwidth, what="max_bandwidth"))
    return await _migrate(vm, host, port, config=config, ssl=ssl, name=name, tracker=tracker,
                          on_stats=on_progress)


class Destination:
    """Accepts incoming migrations at ``listen`` (``"host:port"``, port 0 = any).

    ``await next_vm()`` returns ``(name, vm, stats)`` for each VM that arrived,
    was verified and runs here; the caller owns (and closes) it.
    """

    def __init__(self, listen: str = "127.0.0.1:0", *, ssl=None,
                 config: MigrationConfig | None = None):
        host, port = parse_hostport(listen, what="listen address")
        self._server = MigrationServer(host, port, ssl=ssl, config=config)

    @property
    def address(self) -> str:
        return format_hostport(self._server.host, self._server.port)

    @property
    def port(self) -> int | None:
        return self._server.port

    async def next_vm(self, timeout_s: float | None = None) -> tuple[str, VM, MigrationStats]:
        arrival, vm = await within(self._server.completed.get(), timeout_s)
        return arrival.name, vm, arrival.stats

    async def start(self) -> "Destination":
        await self._server.start()
        return self

    async def close(self) -> None:
        await self._server.close()

    async def __aenter__(self) -> "Destination":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()
