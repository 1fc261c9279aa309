"""livemig — live migration of a process-level toy VM.

Embedding livemig in an asyncio program::

    import livemig

    # destination side
    async with livemig.Destination("127.0.0.1:7400") as dest:
        name, vm, stats = await dest.next_vm()      # a verified, running VM

    # source side
    vm = livemig.VM(memory="1GiB", vcpus=2, workload="memtest", dirty_rate="64MiB/s")
    vm.start()
    stats = await livemig.migrate(vm, "127.0.0.1:7400", downtime_ms=50,
                                  on_progress=lambda s: print(s.to_dict()["remaining_bytes"]))
    vm.close()   # released: it runs on the destination now

``migrate`` raises :class:`MigrationError` when the migration fails; the VM is
then running again on the source (``exc.source_resumed``), except for
:class:`HandoverInDoubt`, where it is kept paused (see docs/architecture.md).
"""
from __future__ import annotations

from .config import CodecConfig, MigrationConfig
from .errors import (BackendUnavailable, ConfigError, ConnectionLost, GuestError,
                     HandoverInDoubt, HandshakeRefused, LivemigError, MigrationError,
                     RemoteProtocolError, StateFormatError)
from .stats import MigrationStats

__version__ = "0.1.0"

_LAZY = {
    # native-backed names load on first use, so the pure core stays importable
    # (and testable) without the compiled module
    "VM": ("livemig.vm.machine", "VM"),
    "GuestMemory": ("livemig.native.memory", "GuestMemory"),
    "open_tracker": ("livemig.native.tracking", "open_tracker"),
    "DirtyTracker": ("livemig.native.tracking", "DirtyTracker"),
    "probe_host": ("livemig.analysis.probe", "probe_host"),
    "Destination": ("livemig.service.library", "Destination"),
    "migrate": ("livemig.service.library", "migrate"),
    "MigrationControl": ("livemig.engine.source.session", "MigrationControl"),
    "save_snapshot": ("livemig.vm.snapshot", "save"),
    "measure_dirty_rate": ("livemig.analysis.dirtyrate", "measure_dirty_rate"),
    "plan_migration": ("livemig.analysis.plan", "plan_migration"),
    "probe_bandwidth": ("livemig.analysis.plan", "probe_bandwidth"),
    "load_snapshot": ("livemig.vm.snapshot", "load"),
}


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'livemig' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


__all__ = ["VM", "GuestMemory", "open_tracker", "DirtyTracker", "probe_host", "Destination",
           "migrate", "MigrationControl", "save_snapshot", "load_snapshot", "measure_dirty_rate", "plan_migration",
           "probe_bandwidth", "MigrationConfig", "CodecConfig",
           "MigrationStats", "LivemigError", "ConfigError", "MigrationError", "HandoverInDoubt",
           "BackendUnavailable", "GuestError", "StateFormatError", "ConnectionLost",
           "HandshakeRefused", "RemoteProtocolError", "__version__"]
