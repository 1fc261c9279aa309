"""The daemon's resource limits, built from its flags and the host.

A daemon bounds what peers can make it spend (docs/limits.md): guest memory
of arriving VMs (a :class:`~livemig.engine.destination.admission.MemoryBudget`),
connections waiting for their Welcome and their buffers (the channel server),
and silence in every phase (the migration config's timeouts). This module
turns the operator's choices, or their absence, into those objects.
"""
from __future__ import annotations

from ..engine.destination.admission import MemoryBudget, default_max_incoming_memory_bytes


def incoming_budget(max_incoming_memory_bytes: int | None) -> MemoryBudget:
    """The budget for arriving guest memory: as given, or derived from the
    memory this host has available now (which counts the VMs it runs)."""
    if max_incoming_memory_bytes is None:
        max_incoming_memory_bytes = default_max_incoming_memory_bytes()
    return MemoryBudget(max_incoming_memory_bytes)
