"""A generated fleet for the planner: thousands of hosts, no daemons.

``generate`` builds hosts and VMs from a seed: hosts of ``host_memory_bytes``
and ``host_cpus``; VM sizes drawn from 1–16 GiB (mostly small) and vCPUs
1–8; dirty rates with the shape measured on real guests — most nearly idle,
a long tail of busy ones (log-normal, median 4 MiB/s, 5 % above 100 MiB/s).
VMs are packed onto hosts first-fit so hosts start unevenly loaded.
``simulate`` runs the same planner a real drain or balance uses and reports
the plan's figures and the CPU seconds the planning took.
"""
from __future__ import annotations

import time

import numpy as np

from ..units import MIB
from .planner import HostState, VMState, plan_balance, plan_drain

GIB = 1 << 30


def generate(nhosts: int, nvms: int, *, seed: int = 0, host_memory_bytes: int = 512 * GIB,
             host_cpus: int = 64) -> tuple[list[HostState], list[VMState]]:
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 4, 8, 16], size=nvms, p=[0.3, 0.3, 0.2, 0.15, 0.05]) * GIB
    vcpus = rng.choice([1, 2, 4, 8], size=nvms, p=[0.3, 0.35, 0.25, 0.1])
    dirty = rng.lognormal(mean=np.log(4 * MIB), sigma=1.8, size=nvms)
    hosts = [HostState(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7400", host_memory_bytes,
                       host_memory_bytes, host_cpus) for i in range(nhosts)]
    # Uneven start: each VM goes to one of a random quarter-skewed choice of hosts.
    weights = rng.pareto(2.0, size=nhosts) + 1.0
    order = rng.choice(nhosts, size=nvms, p=weights / weights.sum())
    vms = []
    for i in range(nvms):
        h = hosts[order[i]]
        if h.memory_free_bytes < sizes[i]:      # full: the next host with room
            h = next((x for x in hosts if x.memory_free_bytes >= sizes[i]), None)
            if h is None:
                break
        h.memory_free_bytes -= int(sizes[i])
        h.vcpus_used += int(vcpus[i])
        vms.append(VMState(f"vm{i}", h.addr, int(sizes[i]), int(vcpus[i]), float(dirty[i])))
    return hosts, vms


def simulate(*, nhosts: int, nvms: int, action: str = "drain", drain_hosts: int = 10,
             link_bps: float = 25e9 / 8, max_downtime_ms: float = 300.0,
             per_host_limit: int = 2, seed: int = 0) -> dict:
    hosts, vms = generate(nhosts, nvms, seed=seed)
    cpu0 = time.process_time()
    if action == "drain":
        loaded = sorted(hosts, key=lambda h: -h.load())[:drain_hosts]
        plan = plan_drain(hosts, vms, {h.addr for h in loaded}, link_bps=link_bps,
                          max_downtime_ms=max_downtime_ms, per_host_limit=per_host_limit)
    elif action == "balance":
        plan = plan_balance(hosts, vms, link_bps=link_bps, max_downtime_ms=max_downtime_ms,
                            per_host_limit=per_host_limit)
    else:
        raise ValueError(f"action must be drain or balance, got {action!r}")
    cpu_s = time.process_time() - cpu0
    modes: dict[str, int] = {}
    for m in plan.moves:
        modes[m.mode] = modes.get(m.mode, 0) + 1
    return {"action": action, "hosts": nhosts, "vms": len(vms), "moves": len(plan.moves),
            "unplaced": len(plan.unplaced), "modes": modes,
            "predicted_total_time_s": plan.total_time_s,
            "sum_of_single_migrations_s": plan.sum_single_s,
            "peak_concurrent": plan.peak_concurrent, "bytes_moved": plan.bytes_moved,
            "planner_cpu_s": cpu_s, "link_bps": link_bps, "per_host_limit": per_host_limit}
