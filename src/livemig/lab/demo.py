"""``livemig demo``: two daemons on loopback, one VM migrated there and back.

The demo is also the end-to-end proof users can run themselves: it starts
two daemon processes, starts a self-checking ``memtest`` VM on the first and
moves it back and forth four times — pre-copy, post-copy, hybrid (switching
to post-copy after one round), pre-copy. After each leg it runs the VM to a
fixed step and compares it with a VM that never moved, run here to the same
step — memory digest, CPU and device state, console output — then resumes it.
It prints a table of the migrations (or one JSON object with ``--json``) and
exits non-zero if a migration failed or the moved VM differs in any way.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

from ..addresses import DEFAULT_HOST, format_hostport
from ..service.control import ControlClient
from .daemonproc import free_port, stop, wait_hosted, wait_migration, wait_ready
from ..units import parse_optional_rate, parse_size

DEMO_SEED = 2026
DEMO_VCPUS = 2
RUN_AHEAD_STEPS = 2_000_000
FILL_S = 0.5


@contextlib.contextmanager
def _daemon(tmpdir: str, label: str, loop: str):
    address = format_hostport(DEFAULT_HOST, free_port())
    control = os.path.join(tmpdir, f"{label}.sock")
    log_path = os.path.join(tmpdir, f"{label}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig", "daemon", "--listen", address,
         "--control", control, "--loop", loop],
        stdout=log, stderr=subprocess.STDOUT)
    client = ControlClient(control, timeout_s=None)
    try:
        wait_ready(client, proc, log_path, what=f"daemon {label}", timeout_s=20)
        yield client, address
    finally:
        stop(client, proc)
        log.close()


def _migrate(client: ControlClient, name: str, to: str, options: dict) -> dict:
    return wait_migration(client, client.call("migrate", name=name, to=to, **options))


def _observe(vm, step: int) -> dict:
    """The oracle's view of ``vm`` (a VM that never moves) at ``step``."""
    vm.run_to(step, timeout_s=120)
    return {"digest": vm.digest().hex(), "cpus": [vm.registers(i) for i in range(vm.nvcpus)],
            "console": [vm.console(i).hex() for i in range(vm.nvcpus)], "steps": vm.steps()}


LEGS = (("precopy", {"mode": "precopy"}),
        ("postcopy", {"mode": "postcopy"}),
        # a downtime limit no round can meet, so the leg really goes post-copy
        ("hybrid", {"mode": "hybrid", "hybrid_postcopy_after_rounds": 1, "downtime_ms": 0.001}),
        ("precopy", {"mode": "precopy"}))


def _row(leg: str, rec: dict) -> dict:
    s = rec.get("stats") or {}
    return {"leg": leg, "mode": s.get("mode", "precopy"), "status": rec["status"],
            "error": rec.get("error"), "downtime_ms": s.get("downtime_ms"),
            "total_ms": s.get("total_time_ms"), "rounds": s.get("nrounds"),
            "bytes_sent": s.get("bytes_sent"), "memory_bytes": s.get("memory_bytes"),
            "converged": s.get("converged"), "throttle_pct": s.get("throttle_pct"),
            "postcopy": s.get("postcopy"), "verified": False, "verified_at_step": None}


def _destination_view(dst: ControlClient, name: str) -> tuple[dict | None, str | None]:
    """The destination's record of the same migration: fault-service latency
    is measured where the faults happen, and a failure has its side there."""
    incoming = [m for m in dst.call("status")["migrations"]
                if m["direction"] == "incoming" and m["vm"] == name]
    if not incoming:
        return None, None
    rec = incoming[-1]
    latency = ((rec.get("stats") or {}).get("postcopy") or {}).get("fault_latency")
    return latency, rec.get("error")


def _table(result: dict) -> str:
    head = (f"{'LEG':10} {'MODE':8} {'STATUS':10} {'VERIFIED':8} {'DOWNTIME':>11} {'TOTAL':>10} "
            f"{'ROUNDS':>6} {'SENT':>10} CONVERGED")
    lines = [head]
    for m in result["migrations"]:
        sent_mib = (m["bytes_sent"] or 0) / (1 << 20)
        lines.append(
            f"{m['leg']:10} {m['mode']:8} {m['status']:10} {str(m['verified']):8} "
            f"{(m['downtime_ms'] or 0):8.2f} ms {(m['total_ms'] or 0):7.0f} ms "
            f"{m['rounds'] or 0:>6} {sent_mib:6.1f} MiB "
            # post-copy and hybrid switch over on purpose: convergence is not theirs
            f"{m['converged'] if m['mode'] == 'precopy' else 'n/a'}")
        if m.get("error"):
            lines.append(f"    error: {m['error']}")
            if m.get("destination_error"):
                lines.append(f"    destination: {m['destination_error']}")
        pc = m.get("postcopy") or {}
        if pc.get("duration_ms"):
            lat = m.get("fault_latency") or {}
            lines.append(f"    post-copy {pc['duration_ms']:.0f} ms, {pc['pages_requested']} pages "
                         f"requested (fault service p50 {lat.get('p50_us') or 0:.0f} us, "
                         f"p99 {lat.get('p99_us') or 0:.0f} us), {pc['pages_pushed']} pushed")
    v = result["verification"]
    lines.append("")
    lines.append(f"VM '{result['vm']}' ({result['workload']}, {result['memory_bytes'] >> 20} MiB, "
                 f"{DEMO_VCPUS} vCPUs) checked after each leg against a VM that never moved; "
                 f"last at step {v['step'] or 0:,}:")
    for key in ("digest", "cpu_and_devices", "console"):
        lines.append(f"  {key:16} {'identical' if v[key] else 'DIFFERENT'}")
    lines.append("result: " + ("OK" if result["ok"] else "FAILED"))
    return "\n".join(lines)


def run_demo(*, memory: str = "256MiB", dirty_rate: str | None = "32MiB/s",
             as_json: bool = False, loop: str = "auto") -> int:
    memory_bytes = parse_size(memory, what="--memory")
    rate = parse_optional_rate(dirty_rate, what="--dirty-rate")
    workload, name = "memtest", "demo-vm"
    with tempfile.TemporaryDirectory(prefix="livemig-demo-") as tmp, \
            _daemon(tmp, "host-a", loop) as (a, a_addr), _daemon(tmp, "host-b", loop) as (b, b_addr):
        # Let the guest fill its memory at full speed, then pace it to the
        # requested dirty rate for the migrations.
        a.call("vm.start", name=name, memory=memory_bytes, vcpus=DEMO_VCPUS, workload=workload,
               dirty_rate=None, seed=DEMO_SEED)
        time.sleep(FILL_S)
        a.call("vm.set_dirty_rate", name=name, rate=rate)
        from ..vm.machine import VM

        hosts = [("A", a, a_addr), ("B", b, b_addr)]
        migrations = []
        verification = {"step": None, "digest": False, "cpu_and_devices": False, "console": False}
        ok = True
        with VM(memory=memory_bytes, vcpus=DEMO_VCPUS, workload=workload, seed=DEMO_SEED) as ref:
            for i, (mode, options) in enumerate(LEGS):
                (src_label, src, _), (dst_label, dst, to) = hosts[i % 2], hosts[(i + 1) % 2]
                leg = f"{src_label} -> {dst_label}"
                if not as_json:
                    print(f"migrating {name} {leg} by {mode} ...", flush=True)
                rec = _migrate(src, name, to, options)
                row = _row(leg, rec)
                row["fault_latency"], row["destination_error"] = _destination_view(dst, name)
                migrations.append(row)
                if rec["status"] != "completed":
                    ok = False
                    break
                # Check the moved VM against the unmoved one at the same step.
                # Pacing only sets how fast the guest runs, never what it
                # computes: let it run free to the comparison step.
                wait_hosted(dst, name)   # a post-copy arrival's last pages land first
                steps = dst.call("vm.pause", name=name)["steps"]   # no vCPU passes the target
                dst.call("vm.set_dirty_rate", name=name, rate=None)
                target = max(steps) + RUN_AHEAD_STEPS
                dst.call("vm.run_to", name=name, step=target, timeout_s=120)
                moved = dst.call("vm.inspect", name=name)
                want = _observe(ref, target)
                verification = {"step": target, "digest": moved["digest"] == want["digest"],
                                "cpu_and_devices": moved["cpus"] == want["cpus"],
                                "console": moved["console"] == want["console"]}
                row["verified"] = all(verification[k] for k in
                                      ("digest", "cpu_and_devices", "console"))
                row["verified_at_step"] = target
                if not row["verified"]:
                    ok = False
                    break
                dst.call("vm.resume", name=name)
                dst.call("vm.set_dirty_rate", name=name, rate=rate)
        ok = ok and len(migrations) == len(LEGS)
        result = {"vm": name, "workload": workload, "memory_bytes": memory_bytes,
                  "dirty_rate_bps": rate, "migrations": migrations,
                  "verification": verification, "ok": ok}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    return 0 if ok else 1
