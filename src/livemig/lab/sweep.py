"""``livemig bench convergence``: dirty rate against convergence, measured.

Theory of operation
-------------------
Two daemons — a source and a destination — run as separate processes, so a
migration crosses two event loops, a kernel socket path and (with the
namespaces) a shaped link, exactly as between machines. The sweep drives them
through their control sockets only:

    for each link bandwidth, memory size, workload, mode, dirty rate, repeat:
        vm.start on the source  ─ plan (probe + dirty rate -> prediction)
        ─ migrate ─ record every stat ─ stop the VM wherever it ended up

Links: with ``netns.available()`` the daemons live in two network
namespaces joined by a veth pair shaped with tc tbf (docs/two-hosts.md), and
speak mutual TLS (aio.tls.make_test_pki) since a non-loopback listener
requires it; "unlimited" removes the qdisc. Otherwise both daemons listen on
loopback and the cap is the in-process token bucket of the migration stream
(``max_bandwidth_bps``). The JSON records which was used and why.

Modes the engine does not support are detected, not assumed: the first
migration of such a mode fails saying so, and that mode's points are
recorded as "unsupported" and not run again. Non-converging pre-copy gives
up at the profile's ``max_total_s`` and is recorded as not converged; the
VM stays on the source (that is the engine's contract) and is stopped there.

Each point's VM has one vCPU, so one of the machine's two cores is left for
the migration itself; rates in a profile stay below one vCPU's maximum
(≈ 250 MiB/s of uniform page writes here), except "max" (unpaced; a trace
unpaced replays at its recorded rate and is labelled "recorded").
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from ..addresses import DEFAULT_HOST, format_hostport
from .daemonproc import free_port, stop, wait_migration, wait_ready
from ..service.control import ControlClient
from ..errors import ConfigError, ControlError
from ..config import MigrationConfig
from ..policy import predict_hybrid, predict_postcopy
from ..units import MIB
from ..vm.programs import TRACE_PREFIX

MODES = {
    "precopy": {"mode": "precopy"},
    "precopy+auto-converge": {"mode": "precopy", "auto_converge": True},
    "postcopy": {"mode": "postcopy"},
    "hybrid": {"mode": "hybrid"},
}


@dataclass(frozen=True)
class Profile:
    name: str
    memory: tuple[str, ...]
    workloads: tuple[str, ...]
    rates_mib_s: tuple[float | None, ...]
    """Configured dirty rates in MiB/s; 0 runs the idle workload, None is unpaced."""
    modes: tuple[str, ...]
    bandwidths_bit_s: tuple[float | None, ...]
    """Link rates in bits/s as links are sold; None = unlimited."""
    repeats: int
    max_total_s: float
    max_downtime_ms: float = 300.0
    window_s: float = 0.5
    probe_time_s: float = 0.3
    warmup_s: float = 0.2
    encodings: tuple[str, ...] = ("zero", "raw")
    """Page encodings allowed. The toy workloads write one word into otherwise
    unchanged pages, which DELTA and LZ4 shrink to a few bytes: with them the
    link would never be the bottleneck. A real guest's dirty pages compress
    far less, so the sweep sends every dirty page whole unless told otherwise."""

    def to_dict(self) -> dict:
        """As the result document records it: the limit under its option name."""
        d = asdict(self)
        d["downtime_ms"] = d.pop("max_downtime_ms")
        return d


ALL_MODES = tuple(MODES)
PROFILES = {
    # seconds: what the test suite runs
    "tiny": Profile("tiny", ("32MiB",), ("uniform",), (0, 8), ("precopy", "postcopy"),
                    (None,), 1, 4.0, window_s=0.3, probe_time_s=0.2, warmup_s=0.1),
    # a few minutes
    "quick": Profile("quick", ("128MiB",), ("uniform",), (0, 16, 64, 160), ALL_MODES,
                     (None, 10e9, 1e9), 2, 6.0),
    # about an hour: every axis
    "full": Profile("full", ("128MiB", "512MiB", "1GiB"), ("uniform", "hotset", "memtest"),
                    (0, 8, 16, 32, 64, 96, 128, 192, None), ALL_MODES,
                    (None, 10e9, 1e9), 3, 20.0, window_s=1.0, probe_time_s=1.0, warmup_s=0.5),
}


def bandwidth_label(bit_s: float | None) -> str:
    if bit_s is None:
        return "unlimited"
    return f"{bit_s / 1e9:g}Gbit/s" if bit_s >= 1e9 else f"{bit_s / 1e6:g}Mbit/s"


def rate_label(rate_mib_s: float | None, workload: str = "") -> str:
    """A sweep row's dirty rate: unpaced is "max", except that a trace
    replays at the rate it was recorded at."""
    if rate_mib_s is None:
        return "recorded" if workload.startswith(TRACE_PREFIX) else "max"
    return f"{rate_mib_s:g}MiB/s"


# -- the two hosts ---------------------------------------------------------------------------
@dataclass
class _Hosts:
    method: str
    reason: str
    src: ControlClient
    dst: ControlClient
    dst_addr: str
    tls: bool
    server_hostname: str | None = None
    link: object = None
    procs: list = field(default_factory=list)
    delay_ms: float = 0.0

    def set_bandwidth(self, bit_s: float | None) -> dict:
        """Shape the link; the migration options that go with it."""
        if self.method == "netns":
            self.link.set_link(bit_s, self.delay_ms)
            return {}
        return {"max_bandwidth_bps": bit_s / 8} if bit_s else {}


@contextlib.contextmanager
def two_hosts(tmp: str, link: str = "auto", *, delay_ms: float = 0.0, prefix: str = "lm"):
    """Source and destination daemons: in namespaces when possible, else loopback.

    ``delay_ms`` (one way) needs the namespaces; ``prefix`` names them."""
    from . import netns

    ok, why = netns.available(need_delay=delay_ms > 0) if link in ("auto", "netns") \
        else (False, "--link ratelimit")
    if delay_ms > 0 and not ok:
        raise ConfigError(f"a link delay needs the two-host namespaces: {why}")
    if link == "netns" and not ok:
        raise ConfigError(f"--link netns: two-host namespaces unavailable: {why}")
    py = [sys.executable, "-m", "livemig", "daemon"]
    env = dict(os.environ)
    src_path = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src_path + os.pathsep + env.get("PYTHONPATH", "")
    with contextlib.ExitStack() as stack:
        if ok:
            from ..aio.tls import make_test_pki

            netns.cleanup_stale(prefix)
            shaped = stack.enter_context(netns.TwoHosts(delay_ms=delay_ms, prefix=prefix))
            pki = make_test_pki(os.path.join(tmp, "pki"))
            port = 7400
            roles = [("src", shaped.ns_source, shaped.source_addr, pki.client_cert, pki.client_key),
                     ("dst", shaped.ns_dest, shaped.dest_addr, pki.server_cert, pki.server_key)]
            clients, procs = [], []
            for label, ns, addr, cert, key in roles:
                control = os.path.join(tmp, f"{label}.sock")
                log_path = os.path.join(tmp, f"{label}.log")
                argv = py + ["--listen", format_hostport(addr, port), "--control", control,
                             "--tls-cert", str(cert), "--tls-key", str(key),
                             "--tls-ca", str(pki.ca_cert)]
                proc = shaped.popen(ns, argv, stdout=open(log_path, "w"),
                                    stderr=subprocess.STDOUT, env=env)
                client = ControlClient(control, timeout_s=None)
                wait_ready(client, proc, log_path, what="a benchmark daemon")
                stack.callback(stop, client, proc)
                clients.append(client)
                procs.append(proc)
            yield _Hosts("netns", "namespaces with tc tbf shaping", clients[0], clients[1],
                         format_hostport(shaped.dest_addr, port), True, "localhost", shaped, procs,
                         delay_ms)
            return
        clients, addrs = [], []
        for label in ("src", "dst"):
            address = format_hostport(DEFAULT_HOST, free_port())
            control = os.path.join(tmp, f"{label}.sock")
            log_path = os.path.join(tmp, f"{label}.log")
            proc = subprocess.Popen(py + ["--listen", address, "--control", control],
                                    stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)
            client = ControlClient(control, timeout_s=None)
            wait_ready(client, proc, log_path, what="a benchmark daemon")
            stack.callback(stop, client, proc)
            clients.append(client)
            addrs.append(address)
        yield _Hosts("ratelimit", f"in-process token bucket on loopback ({why})", clients[0],
                     clients[1], addrs[1], False)


# -- one point ---------------------------------------------------------------------------
def _unsupported(rec: dict) -> bool:
    return rec["status"] == "failed" and "not supported" in (rec.get("error") or "")


def run_point(hosts: _Hosts, profile: Profile, *, name: str, memory: str, workload: str,
              rate_mib_s: float | None, mode: str, bw_bit_s: float | None, seed: int) -> dict:
    """Start a VM, plan its migration, migrate it; every number recorded."""
    idle = rate_mib_s == 0
    rate = None if idle or rate_mib_s is None else f"{rate_mib_s}MiB/s"
    extra = hosts.set_bandwidth(bw_bit_s)
    sni = {"server_hostname": hosts.server_hostname} if hosts.server_hostname else {}
    point = {"memory": memory, "workload": "idle" if idle else workload, "sweep_workload": workload,
             "dirty_rate": rate_label(rate_mib_s, workload),
             "dirty_rate_bps": None if rate_mib_s is None else rate_mib_s * MIB,
             "mode": mode, "link": bandwidth_label(bw_bit_s), "link_bit_s": bw_bit_s,
             "link_method": hosts.method}
    hosts.src.call("vm.start", name=name, memory=memory, vcpus=1,
                   workload="idle" if idle else workload, dirty_rate=rate, seed=seed)
    where = hosts.src
    try:
        time.sleep(profile.warmup_s)
        plan = hosts.src.call("plan", name=name, to=hosts.dst_addr, window_s=profile.window_s,
                              probe_time_s=profile.probe_time_s,
                              downtime_ms=profile.max_downtime_ms, **extra, **sni)
        point["plan"] = plan
        options = {**MODES[mode], "downtime_ms": profile.max_downtime_ms,
                   "max_total_s": profile.max_total_s,
                   "codec": {"encodings": list(profile.encodings)}, **extra}
        t0 = time.monotonic()
        rec = wait_migration(hosts.src, hosts.src.call("migrate", name=name, to=hosts.dst_addr,
                                              **options, **sni))
        point["wall_s"] = time.monotonic() - t0
        if rec["status"] == "completed":
            where = hosts.dst
        point.update(status="unsupported" if _unsupported(rec) else rec["status"],
                     error=rec.get("error"), stats=rec.get("stats"))
    finally:
        with contextlib.suppress(ControlError):
            where.call("vm.stop", name=name)
    return point


def outcome(point: dict) -> str:
    """completed | not-converged (pre-copy gave up) | failed (an error) | unsupported."""
    if point["status"] in ("completed", "unsupported"):
        return point["status"]
    return "not-converged" if "did not converge" in (point.get("error") or "") else "failed"


def prediction(point: dict) -> dict:
    """The point's prediction under a model of its mode: ``plan``'s own
    (pre-copy) for pre-copy rows; for post-copy and hybrid rows the same
    measured bandwidth and dirty rate through the post-copy and hybrid models
    (policy.py). Empty when the plan measured nothing to predict from."""
    plan = point.get("plan") or {}
    mode = MODES[point["mode"]]["mode"]
    if mode == "precopy":
        return plan.get("prediction") or {}
    bw = plan.get("bandwidth_bps")
    if not bw:
        return {}
    if mode == "postcopy":
        return predict_postcopy(bw, plan["memory_bytes"]).to_dict()
    return predict_hybrid(bw, plan["dirty_rate"]["bytes_per_s"], plan["memory_bytes"],
                          plan["downtime_ms"], max_rounds=MigrationConfig().max_rounds).to_dict()


def predicted_outcome(point: dict, p: dict) -> str | None:
    """converges | no | post-copy (the model switches to post-copy, where
    converging does not apply); None without a prediction."""
    if not p:
        return None
    if p["converges"]:
        return "converges"
    return "post-copy" if MODES[point["mode"]]["mode"] != "precopy" else "no"


def _summarise(point: dict) -> dict:
    s = point.get("stats") or {}
    mem = s.get("memory_bytes") or 0
    p = prediction(point)
    return {
        "converged": point["status"] == "completed", "outcome": outcome(point),
        "total_time_s": (s.get("total_time_ms") or 0) / 1e3 if s else None,
        "downtime_ms": s.get("downtime_ms"),
        "bytes_sent": s.get("bytes_sent"),
        "bytes_per_memory": (s["bytes_sent"] / mem) if s.get("bytes_sent") is not None and mem
        else None,
        "rounds": s.get("nrounds"), "throttle_pct": s.get("throttle_pct"),
        "measured_dirty_rate_bps": ((point.get("plan") or {}).get("dirty_rate") or {})
        .get("bytes_per_s"),
        "measured_bandwidth_bps": (point.get("plan") or {}).get("bandwidth_bps"),
        "predicted_outcome": predicted_outcome(point, p), "predicted_rounds": p.get("rounds"),
        "predicted_downtime_ms": p.get("expected_downtime_ms"),
        "predicted_total_time_s": p.get("total_time_s"),
        "predicted_bytes_per_memory": (p["total_bytes"] / point["plan"]["memory_bytes"])
        if p.get("total_bytes") is not None else None,
        "recommended_mode": p.get("recommended_mode"),
    }


# -- the sweep ---------------------------------------------------------------------------
def run_sweep(profile: Profile, *, link: str = "auto", progress=None) -> dict:
    """Run every point of ``profile``; the result document (JSON-able)."""
    progress = progress or (lambda text: None)
    points: list[dict] = []
    unsupported: dict[str, str] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="livemig-sweep-") as tmp, \
            two_hosts(tmp, link) as hosts:
        meta = {"profile": profile.to_dict(), "link_method": hosts.method,
                "link_reason": hosts.reason, "tls": hosts.tls, "started": started,
                "host": {"python": sys.version.split()[0], "kernel": platform.release(),
                         "cpus": os.cpu_count()}}
        n = 0
        total = (len(profile.bandwidths_bit_s) * len(profile.memory) * len(profile.workloads)
                 * len(profile.modes) * len(profile.rates_mib_s) * profile.repeats)
        for bw in profile.bandwidths_bit_s:
            for memory in profile.memory:
                for workload in profile.workloads:
                    for mode in profile.modes:
                        for rate in profile.rates_mib_s:
                            for rep in range(profile.repeats):
                                n += 1
                                base = {"memory": memory, "sweep_workload": workload,
                                        "workload": "idle" if rate == 0 else workload,
                                        "dirty_rate": rate_label(rate, workload), "mode": mode,
                                        "dirty_rate_bps": None if rate is None else rate * MIB,
                                        "link": bandwidth_label(bw), "link_bit_s": bw,
                                        "link_method": hosts.method, "repeat": rep}
                                if mode in unsupported:
                                    points.append({**base, "status": "unsupported",
                                                   "error": unsupported[mode], "stats": None})
                                    continue
                                progress(f"[{n}/{total}] {mode} {rate_label(rate, workload)} "
                                         f"{base['link']} {memory} {workload} #{rep}"
                                         f"{_eta(started, n - 1, total)}")
                                pt = run_point(hosts, profile, name=f"sweep{n}", memory=memory,
                                               workload=workload, rate_mib_s=rate, mode=mode,
                                               bw_bit_s=bw, seed=n)
                                pt["repeat"] = rep
                                if pt["status"] == "unsupported":
                                    unsupported[mode] = pt["error"]
                                pt["summary"] = _summarise(pt)
                                points.append(pt)
    meta["finished"] = time.time()
    meta["unsupported_modes"] = unsupported
    return {"meta": meta, "points": points}


def run_sweep_cli(*, profile: str, out_dir: str, link: str = "auto", as_json: bool = False,
                  workload: str | None = None) -> int:
    """``workload`` replaces the profile's workloads, e.g. ``trace:FILE``: a
    recorded trace replayed at each of the profile's dirty rates."""
    from .sweepreport import write_outputs

    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    chosen = PROFILES[profile]
    if workload is not None:
        chosen = dataclasses.replace(chosen, workloads=(workload,))
    result = run_sweep(chosen, link=link,
                       progress=None if as_json else lambda t: print(t, flush=True))
    paths = write_outputs(result, out_dir, f"convergence-{profile}")
    failed = [p for p in result["points"] if outcome(p) == "failed"]
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(open(paths["markdown"]).read())
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        for p in failed:
            print(f"failed: {p['mode']} {p['dirty_rate']} {p['link']} {p['memory']} "
                  f"#{p.get('repeat', 0)}: {p.get('error')}", file=sys.stderr)
    # A run that failed (an error, not a pre-copy that did not converge) makes
    # the sweep's figures incomplete: say so in the exit code, as a test run would.
    return 1 if failed else 0


def _eta(started: float, done: int, total: int) -> str:
    """`` ETA 3m20s`` from the mean time of the points done so far."""
    if done == 0:
        return ""
    left_s = (time.time() - started) / done * (total - done)
    return f" ETA {int(left_s // 60)}m{int(left_s % 60):02d}s"


__all__ = ["Profile", "PROFILES", "MODES", "run_sweep", "run_point", "two_hosts",
           "run_sweep_cli", "bandwidth_label", "rate_label"]
