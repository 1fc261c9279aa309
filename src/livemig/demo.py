"""``livemig demo``: two daemons on loopback, one VM migrated there and back.

The demo is also the end-to-end proof users can run themselves: it starts
two daemon processes, starts a self-checking ``memtest`` VM on the first,
migrates it to the second and back, then runs it to a fixed step and
compares it with a VM that never moved and was run to the same step here —
memory digest, CPU and device state, console output. It prints a table of
the migrations (or one JSON object with ``--json``) and exits non-zero if a
migration failed or the moved VM differs in any way.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from .control import ControlClient, ControlError
from .units import parse_rate, parse_size

DEMO_SEED = 2026
DEMO_VCPUS = 2
RUN_AHEAD_STEPS = 2_000_000
FILL_S = 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _daemon(tmpdir: str, label: str, loop: str):
    port = _free_port()
    control = os.path.join(tmpdir, f"{label}.sock")
    log_path = os.path.join(tmpdir, f"{label}.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "livemig", "daemon", "--listen", f"127.0.0.1:{port}",
         "--control", control, "--loop", loop],
        stdout=log, stderr=subprocess.STDOUT)
    client = ControlClient(control, timeout_s=None)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.call("ping")
                break
            except ControlError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise ControlError(f"daemon {label} did not start; its log:\n"
                                       + open(log_path).read()) from None
                time.sleep(0.05)
        yield client, f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ControlError):
            client.call("shutdown")
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _migrate(client: ControlClient, name: str, to: str, options: dict) -> dict:
    rec = client.call("migrate", name=name, to=to, **options)
    while rec["status"] in ("setup", "active"):
        rec = client.call("migration.wait", id=rec["id"], timeout_s=5.0)
    return rec


def _reference(memory_bytes: int, workload: str, step: int) -> dict:
    """A VM that never moves, run to ``step`` — the oracle."""
    from .vm.machine import VM

    with VM(memory=memory_bytes, vcpus=DEMO_VCPUS, workload=workload, seed=DEMO_SEED) as vm:
        vm.start()
        vm.run_to(step, timeout_s=120)
        return {"digest": vm.digest().hex(), "cpus": [vm.registers(i) for i in range(vm.nvcpus)],
                "console": [vm.console(i).hex() for i in range(vm.nvcpus)], "steps": vm.steps()}


def _row(leg: str, rec: dict) -> dict:
    s = rec.get("stats") or {}
    return {"leg": leg, "mode": s.get("mode", "precopy"), "status": rec["status"],
            "error": rec.get("error"), "downtime_ms": s.get("downtime_ms"),
            "total_ms": s.get("total_time_ms"), "rounds": s.get("nrounds"),
            "bytes_sent": s.get("bytes_sent"), "memory_bytes": s.get("memory_bytes"),
            "converged": s.get("converged"), "throttle_pct": s.get("throttle_pct"),
            "verified": False}


def _table(result: dict) -> str:
    head = (f"{'LEG':10} {'MODE':8} {'STATUS':10} {'VERIFIED':8} {'DOWNTIME':>11} {'TOTAL':>10} "
            f"{'ROUNDS':>6} {'SENT':>10} CONVERGED")
    lines = [head]
    for m in result["migrations"]:
        sent_mib = (m["bytes_sent"] or 0) / (1 << 20)
        lines.append(
            f"{m['leg']:10} {m['mode']:8} {m['status']:10} {str(m['verified']):8} "
            f"{(m['downtime_ms'] or 0):8.2f} ms {(m['total_ms'] or 0):7.0f} ms "
            f"{m['rounds'] or 0:>6} {sent_mib:6.1f} MiB {m['converged']}")
        if m.get("error"):
            lines.append(f"    error: {m['error']}")
    v = result["verification"]
    lines.append("")
    lines.append(f"VM '{result['vm']}' ({result['workload']}, {result['memory_bytes'] >> 20} MiB, "
                 f"{DEMO_VCPUS} vCPUs) checked at step {v['step']:,} against a VM that never moved:")
    for key in ("digest", "cpu_and_devices", "console"):
        lines.append(f"  {key:16} {'identical' if v[key] else 'DIFFERENT'}")
    lines.append("result: " + ("OK" if result["ok"] else "FAILED"))
    return "\n".join(lines)


def run_demo(*, memory: str = "256MiB", dirty_rate: str | None = "32MiB/s",
             as_json: bool = False, loop: str = "auto") -> int:
    memory_bytes = parse_size(memory, what="--memory")
    rate = parse_rate(dirty_rate, what="--dirty-rate") if dirty_rate else None
    workload, name = "memtest", "demo-vm"
    with tempfile.TemporaryDirectory(prefix="livemig-demo-") as tmp, \
            _daemon(tmp, "host-a", loop) as (a, a_addr), _daemon(tmp, "host-b", loop) as (b, b_addr):
        # Let the guest fill its memory at full speed, then pace it to the
        # requested dirty rate for the migrations.
        a.call("vm.start", name=name, memory=memory_bytes, vcpus=DEMO_VCPUS, workload=workload,
               dirty_rate=None, seed=DEMO_SEED)
        time.sleep(FILL_S)
        a.call("vm.set_dirty_rate", name=name, rate=rate)
        legs = [("A -> B", a, b_addr), ("B -> A", b, a_addr)]
        migrations = []
        for leg, client, to in legs:
            if not as_json:
                print(f"migrating {name} {leg} ...", flush=True)
            rec = _migrate(client, name, to, {"mode": "precopy"})
            migrations.append(_row(leg, rec))
            if rec["status"] != "completed":
                break
        ok = all(m["status"] == "completed" for m in migrations) and len(migrations) == len(legs)
        verification = {"step": None, "digest": False, "cpu_and_devices": False, "console": False}
        if ok:
            # Pacing only sets how fast the guest runs, never what it computes:
            # let it run free to the comparison step.
            a.call("vm.set_dirty_rate", name=name, rate=None)
            steps = a.call("vm.list")[0]["steps"]
            target = max(steps) + RUN_AHEAD_STEPS
            a.call("vm.run_to", name=name, step=target, timeout_s=120)
            moved = a.call("vm.inspect", name=name)
            ref = _reference(memory_bytes, workload, target)
            verification = {"step": target, "digest": moved["digest"] == ref["digest"],
                            "cpu_and_devices": moved["cpus"] == ref["cpus"],
                            "console": moved["console"] == ref["console"]}
            ok = all(verification[k] for k in ("digest", "cpu_and_devices", "console"))
            for m in migrations:
                m["verified"] = ok
        result = {"vm": name, "workload": workload, "memory_bytes": memory_bytes,
                  "dirty_rate_bps": rate, "migrations": migrations,
                  "verification": verification, "ok": ok}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    return 0 if ok else 1
