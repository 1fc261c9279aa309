"""The daemon's resource limits, built from its flags and the host.

A daemon bounds what peers can make it spend (docs/limits.md): guest memory
of arriving VMs (a :class:`~livemig.engine.destination.admission.MemoryBudget`),
connections waiting for their Welcome and their buffers (the channel server),
and silence in every phase (the migration config's timeouts). This module
turns the operator's choices, or their absence, into those objects, and
words the one limit a migration can overrun without failing: its downtime.
"""
from __future__ import annotations

from ..engine.destination.admission import MemoryBudget, default_max_incoming_memory_bytes


def incoming_budget(max_incoming_memory_bytes: int | None) -> MemoryBudget:
    """The budget for arriving guest memory: as given, or derived from the
    memory this host has available now (which counts the VMs it runs)."""
    if max_incoming_memory_bytes is None:
        max_incoming_memory_bytes = default_max_incoming_memory_bytes()
    return MemoryBudget(max_incoming_memory_bytes)


def downtime_breach(stats, max_downtime_ms: float) -> str | None:
    """A warning when a completed migration's measured downtime exceeded its
    limit (other migrations on the same hosts, or a mispredicted last round,
    can cause it); None when within the limit or not measured."""
    downtime_ms = getattr(stats, "downtime_ms", None)
    if downtime_ms is None or downtime_ms <= max_downtime_ms:
        return None
    return (f"downtime {downtime_ms:.0f} ms exceeded the limit of {max_downtime_ms:g} ms "
            f"(expected {stats.expected_downtime_ms or 0:.0f} ms); the VM runs at the "
            "destination. Other migrations at the same time share the link and CPUs: "
            "migrate one at a time or raise --downtime-ms")
