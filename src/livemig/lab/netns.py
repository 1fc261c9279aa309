"""Two emulated hosts on one machine: network namespaces, a veth pair, tc shaping.

Theory of operation
-------------------
``TwoHosts`` creates two network namespaces (ip-netns(8)), ``<prefix>-<pid>-<n>-src``
and ``...-dst``, and (with netem, or without delay) one veth pair (veth(4))
created *directly inside* them
(``ip link add veth0 netns A type veth peer name veth0 netns B``), so no interface
ever appears in the caller's namespace and fixed in-namespace names cannot clash
with anything. Each end gets an address from a /30 of 10.231.0.0/16 (unique per
instance in this process); nothing is routed anywhere else, so traffic between
``source_addr`` and ``dest_addr`` can only cross this one link.

The link is shaped on the egress of *both* veth ends, so both directions see the
rate and the delay (an RTT is therefore about ``2 * delay_ms``):

* rate: ``tbf`` (tc-tbf(8)), a token bucket. The bucket (``burst``) must hold at
  least one tick of tokens (``rate / HZ``) or the bucket cannot refill fast enough
  to reach the rate, and at least one 64 KiB GSO segment (veth hands TCP
  superpackets to the qdisc; tbf splits larger ones, which costs CPU). The queue
  (``limit``) is sized for ``rate * (delay + 50 ms)`` so a single TCP stream can
  keep the pipe full without tail drops turning the test into a loss test.
* delay: ``netem delay`` (tc-netem(8)) as the root with the tbf as its child, the
  layout the netem man page gives for "delay plus rate"; netem's ``limit`` (in
  packets) is sized for the bandwidth-delay product.

netem is optional in kernels (CONFIG_NET_SCH_NETEM; this project's reference
kernel lacks it). ``probe()`` creates a scratch namespace and really tries every
qdisc it needs, so ``available()`` can say exactly what is missing. Without netem,
a link built with ``delay_ms > 0`` is wired through a third namespace,
``...-wire``: each host's veth0 is paired with an interface there, and
:mod:`livemig.lab.delayline` (a user-space relay over AF_PACKET sockets) carries the
frames across with the delay; the tbf qdiscs stay on the hosts' veth0 egress.
The delay is never silently dropped: if neither way works, ``LinkUnavailable``.

Ordering hazards: a namespace lives on while any process is inside it, even after
``ip netns del``, so ``close()`` first ends the processes it started with
``popen`` and only then deletes the namespaces. Deleting a namespace destroys the
veth end inside it, and destroying one end of a veth pair destroys the other.
Names embed our pid, so ``cleanup_stale(prefix)`` removes only namespaces whose
creator pid is no longer alive.

Every command that runs to completion goes through ``run()``, which raises
``CommandError`` naming the command, its exit code and its stderr; long-running
processes (``popen``, the delay line) report a failure with the same error.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
from typing import Sequence

from . import delayline
from ..errors import CommandError, LinkUnavailable

_CAP_NET_ADMIN = 12  # linux/capability.h
_VETH = "veth0"
_ADDR_BLOCK = (10, 231)  # 10.231.0.0/16, split into /30 subnets
_GSO_MAX_BYTES = 65536
_MTU_BYTES = 1500
_QUEUE_SLACK_S = 0.050
_HZ_DEFAULT = 250
_DELAY_LINE_START_S = 10.0

_counter = itertools.count()
_counter_lock = threading.Lock()


def _tool(name: str) -> str | None:
    """Absolute path of an iproute2 tool; /usr/sbin and /sbin are often off PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def run(argv: Sequence[str], *, timeout_s: float = 15.0, check: bool = True,
        input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
    """Run one command; on failure raise CommandError naming it, its exit code and stderr.

    ``check=False`` returns the completed process whatever its exit code (used where
    a failure is an expected answer, e.g. probing). A timeout is a failure too.
    """
    argv = [str(a) for a in argv]
    try:
        proc = subprocess.run(argv, input=input_bytes, capture_output=True,
                              timeout=timeout_s)
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"not found: {exc.filename or argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        stderr = (exc.stderr or b"").decode(errors="replace")
        raise CommandError(argv, None, f"timed out after {timeout_s:g} s; {stderr}") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc


def _ip() -> str:
    return _tool("ip") or "ip"


def _tc() -> str:
    return _tool("tc") or "tc"


# --------------------------------------------------------------------------- shaping


@dataclasses.dataclass(frozen=True)
class TbfParams:
    """tc-tbf parameters for one rate; all sizes in bytes."""

    rate_bps: float
    burst_bytes: int
    limit_bytes: int


def tbf_params(rate_bps: float, delay_ms: float = 0.0, hz: int = _HZ_DEFAULT) -> TbfParams:
    """Bucket and queue sizes for a token bucket at ``rate_bps`` bits per second.

    burst >= one timer tick of tokens and >= two GSO segments; limit holds the
    bucket plus ``rate * (delay + 50 ms)`` (one bandwidth-delay product of queue).
    """
    if rate_bps <= 0:
        raise ValueError(f"rate_bps must be positive, got {rate_bps}")
    rate_bytes_per_s = rate_bps / 8.0
    burst_bytes = int(max(2 * _GSO_MAX_BYTES, 2 * rate_bytes_per_s / hz))
    queue_s = delay_ms / 1000.0 + _QUEUE_SLACK_S
    limit_bytes = int(burst_bytes + max(4 * _GSO_MAX_BYTES, rate_bytes_per_s * queue_s))
    return TbfParams(rate_bps, burst_bytes, limit_bytes)


def netem_limit_packets(rate_bps: float | None, delay_ms: float) -> int:
    """netem's queue (packets) must hold everything in flight during ``delay_ms``.

    Without a rate the veth can move several GB/s; 10 Gbit/s is assumed then.
    Sized by MTU-sized packets, which over-provisions when GSO packets are bigger.
    """
    bits_per_s = rate_bps if rate_bps else 10e9
    in_flight_bytes = bits_per_s / 8.0 * (delay_ms / 1000.0 + _QUEUE_SLACK_S)
    return max(1000, int(2 * in_flight_bytes / _MTU_BYTES))


def shaping_commands(ns: str, dev: str, rate_bps: float | None,
                     delay_ms: float) -> list[list[str]]:
    """The tc commands that install the requested shaping on ``dev`` in ``ns``
    (after its root qdisc was removed). Empty when the link is unshaped."""
    tc = [_tc(), "-n", ns, "qdisc", "add", "dev", dev]
    cmds: list[list[str]] = []
    tbf_parent = ["root"]
    if delay_ms > 0:
        cmds.append(tc + ["root", "handle", "1:", "netem", "delay", f"{delay_ms:g}ms",
                          "limit", str(netem_limit_packets(rate_bps, delay_ms))])
        tbf_parent = ["parent", "1:1"]
    if rate_bps:
        p = tbf_params(rate_bps, delay_ms)
        cmds.append(tc + tbf_parent + ["handle", "10:", "tbf", "rate", f"{int(p.rate_bps)}bit",
                                       "burst", str(p.burst_bytes), "limit", str(p.limit_bytes)])
    return cmds


# --------------------------------------------------------------------------- probe


def _has_net_admin() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return False


@dataclasses.dataclass(frozen=True)
class LinkSupport:
    """What ``probe()`` found: rate shaping and delay are judged separately.

    ``delay_method`` is ``"netem"`` (kernel qdisc), ``"delay-line"`` (the
    user-space relay of :mod:`livemig.lab.delayline`, used when the kernel lacks
    sch_netem) or ``None`` when no delay can be added.
    """

    rate_ok: bool
    rate_reason: str
    delay_method: str | None
    delay_reason: str

    @property
    def delay_ok(self) -> bool:
        return self.delay_method is not None


_probe_cache: LinkSupport | None = None
_probe_lock = threading.Lock()


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "(no message)"


def _packet_socket_problem() -> str | None:
    """Why the delay line's AF_PACKET socket cannot be opened, or None."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except OSError as exc:
        return f"AF_PACKET raw socket refused ({exc.strerror}; needs CAP_NET_RAW)"
    try:
        for opt, name in ((delayline.PACKET_VNET_HDR, "PACKET_VNET_HDR"),
                          (delayline.PACKET_IGNORE_OUTGOING, "PACKET_IGNORE_OUTGOING")):
            try:
                sock.setsockopt(delayline.SOL_PACKET, opt, 1)
            except OSError as exc:
                return f"setsockopt({name}) refused: {exc.strerror}"
    finally:
        sock.close()
    return None


def _probe_uncached() -> LinkSupport:
    if _tool("ip") is None or _tool("tc") is None:
        missing = " and ".join(t for t in ("ip", "tc") if _tool(t) is None)
        why = f"{missing} not found on PATH, /usr/sbin or /sbin (install iproute2)"
        return LinkSupport(False, why, None, why)
    if not _has_net_admin():
        why = "neither root nor CAP_NET_ADMIN: cannot create network namespaces"
        return LinkSupport(False, why, None, why)
    ns = f"lmprobe-{os.getpid()}-{next_index()}"
    try:
        try:
            run([_ip(), "netns", "add", ns])
        except CommandError as exc:
            why = f"creating a network namespace failed: {_first_line(exc.stderr)}"
            return LinkSupport(False, why, None, why)
        try:
            run([_ip(), "-n", ns, "link", "add", "lmp0", "type", "veth", "peer", "name", "lmp1"])
        except CommandError as exc:
            why = f"creating a veth pair failed (CONFIG_VETH?): {_first_line(exc.stderr)}"
            return LinkSupport(False, why, None, why)
        tc = [_tc(), "-n", ns, "qdisc"]
        tbf = run(tc + ["add", "dev", "lmp0", "root", "tbf", "rate", "100mbit", "burst",
                        "131072", "limit", "1000000"], check=False)
        if tbf.returncode == 0:
            rate_ok, rate_reason = True, "tbf rate shaping works"
        else:
            rate_ok, rate_reason = False, (
                "tc tbf refused (kernel lacks sch_tbf, CONFIG_NET_SCH_TBF?): "
                + _first_line(tbf.stderr.decode(errors="replace")))
        netem = run(tc + ["add", "dev", "lmp1", "root", "netem", "delay", "1ms"], check=False)
        if netem.returncode == 0:
            return LinkSupport(rate_ok, rate_reason, "netem", "netem delay works")
        no_netem = ("tc netem refused (kernel lacks sch_netem: CONFIG_NET_SCH_NETEM not set "
                    "or module not loadable): "
                    + _first_line(netem.stderr.decode(errors="replace")))
        problem = _packet_socket_problem()
        if problem is None:
            return LinkSupport(rate_ok, rate_reason, "delay-line",
                               no_netem + "; delay is emulated by a user-space delay line")
        return LinkSupport(rate_ok, rate_reason, None,
                           f"{no_netem}; and the user-space delay line cannot run: {problem}")
    finally:
        run([_ip(), "netns", "del", ns], check=False)


def probe(refresh: bool = False) -> LinkSupport:
    """Try (in a scratch namespace, removed again) everything TwoHosts needs; cached."""
    global _probe_cache
    with _probe_lock:
        if _probe_cache is None or refresh:
            _probe_cache = _probe_uncached()
        return _probe_cache


def available(need_delay: bool = False) -> tuple[bool, str]:
    """(True, "") when TwoHosts can be built here, else (False, precise reason).

    Rate shaping (tbf) is always required; netem only when ``need_delay``. When
    this says no, callers use livemig's in-process rate limiter instead.
    """
    s = probe()
    if not s.rate_ok:
        return False, s.rate_reason
    if need_delay and not s.delay_ok:
        return False, s.delay_reason
    return True, ""


# --------------------------------------------------------------------------- TwoHosts


def next_index() -> int:
    with _counter_lock:
        return next(_counter)


def _ns_name(prefix: str, index: int) -> str:
    return f"{prefix}-{os.getpid()}-{index}"


def _subnet(index: int) -> tuple[str, str]:
    """Two addresses of the index-th /30 in 10.231.0.0/16 (16384 subnets)."""
    slot = (os.getpid() * 64 + index) % 16384
    third, fourth = divmod(slot * 4, 256)
    a, b = _ADDR_BLOCK
    return f"{a}.{b}.{third}.{fourth + 1}", f"{a}.{b}.{third}.{fourth + 2}"


class TwoHosts:
    """Two network namespaces joined by a shaped veth link; a context manager.

    ``rate_bps`` is the link rate in **bits** per second (as links are sold;
    ``None`` leaves the rate unshaped), applied to each direction separately;
    ``delay_ms`` is the one-way delay added on each direction, so an RTT is about
    ``2 * delay_ms``. ``prefix`` names the namespaces ``<prefix>-<pid>-<n>-src``,
    ``-dst`` (and ``-wire`` when a delay line is needed).

    Delay comes from netem when the kernel has it. Otherwise, when ``delay_ms > 0``
    at construction, the two hosts are joined through a third "wire" namespace in
    which :mod:`livemig.lab.delayline` relays frames with the delay; ``delay_method``
    says which. A link built without delay on a kernel without netem cannot get
    one later (``set_link`` raises ``LinkUnavailable``).
    """

    def __init__(self, rate_bps: float | None = None, delay_ms: float = 0.0,
                 prefix: str = "lm"):
        if not re.fullmatch(r"[A-Za-z0-9_]{1,20}", prefix):
            raise ValueError(f"prefix must be 1-20 letters, digits or '_', got {prefix!r}")
        self._check_link(rate_bps, delay_ms)
        ok, why = available(need_delay=delay_ms > 0)
        if not ok:
            raise LinkUnavailable(f"cannot build the two-host link: {why}")
        self.prefix = prefix
        index = next_index()
        base = _ns_name(prefix, index)
        self.ns_source = base + "-src"
        self.ns_dest = base + "-dst"
        self.ns_wire: str | None = None
        self.source_addr, self.dest_addr = _subnet(index)
        self.dev = _VETH
        method = probe().delay_method
        self.delay_method: str | None = method if method == "netem" or delay_ms > 0 else None
        self.rate_bps: float | None = None
        self.delay_ms = 0.0
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._delay_line: subprocess.Popen | None = None
        self._closed = False
        try:
            self._build()
            self.set_link(rate_bps, delay_ms)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _check_link(rate_bps: float | None, delay_ms: float) -> None:
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive or None, got {rate_bps}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must not be negative, got {delay_ms}")

    def _add_ns(self, ns: str) -> None:
        run([_ip(), "netns", "add", ns])
        self._created.append(ns)
        run([_ip(), "-n", ns, "link", "set", "lo", "up"])

    def _build(self) -> None:
        ip = _ip()
        self._add_ns(self.ns_source)
        self._add_ns(self.ns_dest)
        if self.delay_method == "delay-line":
            self.ns_wire = self.ns_source[: -len("-src")] + "-wire"
            self._add_ns(self.ns_wire)
            for ns, wire_end in ((self.ns_source, "tosrc"), (self.ns_dest, "todst")):
                run([ip, "-n", ns, "link", "add", self.dev, "type", "veth",
                     "peer", "name", wire_end, "netns", self.ns_wire])
                run([ip, "-n", self.ns_wire, "link", "set", wire_end, "up"])
            # The wire is a cable, not a host: keep IPv6 autoconfiguration off it.
            run(self._wire_argv(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]))
        else:
            run([ip, "-n", self.ns_source, "link", "add", self.dev, "type", "veth",
                 "peer", "name", self.dev, "netns", self.ns_dest])
        for ns, addr in ((self.ns_source, self.source_addr), (self.ns_dest, self.dest_addr)):
            run([ip, "-n", ns, "addr", "add", f"{addr}/30", "dev", self.dev])
            run([ip, "-n", ns, "link", "set", self.dev, "up"])
        if self.ns_wire:
            self._start_delay_line()

    def _wire_argv(self, argv: Sequence[str]) -> list[str]:
        return [_ip(), "netns", "exec", self.ns_wire, *map(str, argv)]

    def _start_delay_line(self) -> None:
        argv = self._wire_argv([sys.executable, delayline.__file__, "tosrc", "todst", "0"])
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self._delay_line = proc
        ready, _, _ = select.select([proc.stdout], [], [], _DELAY_LINE_START_S)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            proc.kill()
            _, err = proc.communicate()
            raise CommandError(argv, proc.returncode,
                               err.decode(errors="replace") or "delay line did not start")

    def set_link(self, rate_bps: float | None, delay_ms: float = 0.0) -> None:
        """Reshape both directions now (rate in bits/s, one-way delay in ms).

        The root qdiscs are replaced, so packets queued at that instant are dropped
        and TCP retransmits them; connections survive.
        """
        self._check_link(rate_bps, delay_ms)
        if delay_ms > 0 and self.delay_method is None:
            support = probe()
            if support.delay_method == "delay-line":
                why = ("the kernel lacks sch_netem and this link was built without a delay "
                       "line; build TwoHosts with delay_ms > 0 to get one")
            else:
                why = support.delay_reason
            raise LinkUnavailable(f"cannot add {delay_ms:g} ms of delay to {self.ns_source}: "
                                  f"{why}")
        qdisc_delay_ms = delay_ms if self.delay_method == "netem" else 0.0
        for ns in (self.ns_source, self.ns_dest):
            # "no qdisc to delete" is the expected answer on a fresh veth (noqueue).
            run([_tc(), "-n", ns, "qdisc", "del", "dev", self.dev, "root"], check=False)
            for cmd in shaping_commands(ns, self.dev, rate_bps, qdisc_delay_ms):
                run(cmd)
        if self._delay_line is not None:
            if self._delay_line.poll() is not None:
                raise CommandError(self._delay_line.args, self._delay_line.returncode,
                                   self._delay_line.stderr.read().decode(errors="replace"))
            self._delay_line.stdin.write(f"{delay_ms:g}\n".encode())
            self._delay_line.stdin.flush()
        self.rate_bps = float(rate_bps) if rate_bps else None
        self.delay_ms = float(delay_ms)

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside namespace ``ns``."""
        if ns not in (self.ns_source, self.ns_dest):
            raise ValueError(f"{ns!r} is not one of this link's namespaces")
        return [_ip(), "netns", "exec", ns, *map(str, argv)]

    def popen(self, ns: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ``argv`` inside ``ns``; ``close()`` ends it if it still runs."""
        if self._closed:
            raise ValueError("TwoHosts is closed")
        proc = subprocess.Popen(self.exec_argv(ns, argv), **kw)
        self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen) -> None:
        """Stop tracking a finished process started with ``popen``."""
        if proc in self._procs and proc.poll() is not None:
            self._procs.remove(proc)

    def close(self) -> None:
        """End processes we started, then delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._delay_line is not None:
            self._delay_line.stdin.close()  # EOF on stdin ends the delay line
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs + ([self._delay_line] if self._delay_line else []):
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        errors = []
        for ns in reversed(self._created):
            res = run([_ip(), "netns", "del", ns], check=False)
            if res.returncode != 0 and ns in list_namespaces():
                errors.append(CommandError([_ip(), "netns", "del", ns], res.returncode,
                                           res.stderr.decode(errors="replace")))
        self._created.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> "TwoHosts":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TwoHosts({self.ns_source} {self.source_addr} <-> {self.ns_dest} "
                f"{self.dest_addr}, rate_bps={self.rate_bps}, delay_ms={self.delay_ms}, "
                f"delay_method={self.delay_method})")


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = run([_ip(), "netns", "list"]).stdout.decode()
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix: str = "lm") -> list[str]:
    """Delete namespaces named ``<prefix>-<pid>-<n>-src|dst|wire`` whose creator pid is
    gone (a crashed earlier run of ours), and ``probe()``'s scratch namespaces
    ``lmprobe-<pid>-<n>`` of dead pids. Returns the names deleted."""
    patterns = (re.compile(rf"^{re.escape(prefix)}-(\d+)-(\d+)-(src|dst|wire)$"),
                re.compile(r"^lmprobe-(\d+)-(\d+)$"))
    removed = []
    for ns in list_namespaces():
        m = patterns[0].match(ns) or patterns[1].match(ns)
        if m and not _pid_alive(int(m.group(1))):
            run([_ip(), "netns", "del", ns])
            removed.append(ns)
    return removed


# --------------------------------------------------------------------------- measurement

_RECEIVER = r"""
import json, socket, sys, time
addr, timeout_s = sys.argv[1], float(sys.argv[2])
srv = socket.socket(); srv.bind((addr, 0)); srv.listen(1); srv.settimeout(timeout_s)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept(); conn.settimeout(timeout_s)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    b = conn.recv(1)
    if b == b"p": conn.sendall(b"p"); continue
    if b != b"b": raise SystemExit("protocol error: %r" % b)
    break
t0 = time.monotonic(); n = 0; buf = bytearray(1 << 20)
while True:
    k = conn.recv_into(buf)
    if not k: break
    n += k
t1 = time.monotonic()
conn.sendall(b"d"); conn.close()
print(json.dumps({"nbytes": n, "elapsed_s": t1 - t0}), flush=True)
"""

_SENDER = r"""
import json, socket, sys, time
addr, port, max_bytes, max_time_s, pings, timeout_s = (sys.argv[1], int(sys.argv[2]),
    int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
s = socket.create_connection((addr, port), timeout=timeout_s)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(pings):
    t = time.monotonic(); s.sendall(b"p")
    if s.recv(1) != b"p": raise SystemExit("ping lost")
    rtts.append(time.monotonic() - t)
s.sendall(b"b"); chunk = b"\xa5" * (1 << 16); sent = 0; t0 = time.monotonic()
while sent < max_bytes and time.monotonic() - t0 < max_time_s:
    sent += s.send(chunk[: max_bytes - sent])
s.shutdown(socket.SHUT_WR); s.recv(1)
print(json.dumps({"rtts_s": rtts, "sent": sent}), flush=True)
"""


@dataclasses.dataclass(frozen=True)
class LinkMeasurement:
    """One measured TCP transfer from source to destination across the link."""

    nbytes: int
    elapsed_s: float
    rtt_ms: list[float]

    @property
    def bytes_per_s(self) -> float:
        return self.nbytes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def bits_per_s(self) -> float:
        return self.bytes_per_s * 8.0

    @property
    def rtt_ms_median(self) -> float:
        s = sorted(self.rtt_ms)
        return s[len(s) // 2] if s else float("nan")


def measure_link(hosts: TwoHosts, *, max_bytes: int, max_time_s: float = 2.0,
                 pings: int = 9, timeout_s: float = 10.0) -> LinkMeasurement:
    """Ping-pong ``pings`` one-byte messages (RTT), then stream at most ``max_bytes``
    for at most ``max_time_s`` from the source namespace to the destination one over
    TCP; throughput is timed at the receiver from the first bulk byte to EOF."""
    recv = hosts.popen(hosts.ns_dest, [sys.executable, "-c", _RECEIVER, hosts.dest_addr,
                                       timeout_s], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE)
    try:
        port_line = recv.stdout.readline().decode().strip()
        if not port_line.isdigit():
            recv.wait(timeout=timeout_s)
            raise CommandError(recv.args, recv.returncode, recv.stderr.read().decode())
        sender_argv = hosts.exec_argv(hosts.ns_source, [
            sys.executable, "-c", _SENDER, hosts.dest_addr, port_line, int(max_bytes),
            max_time_s, pings, timeout_s])
        sent = json.loads(run(sender_argv, timeout_s=max_time_s + 2 * timeout_s).stdout)
        out, err = recv.communicate(timeout=timeout_s)
        if recv.returncode != 0:
            raise CommandError(recv.args, recv.returncode, err.decode(errors="replace"))
        got = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
        recv.stdout.close()
        recv.stderr.close()
        hosts.forget(recv)
    return LinkMeasurement(got["nbytes"], got["elapsed_s"],
                           [r * 1000.0 for r in sent["rtts_s"]])


__all__ = ["TwoHosts", "available", "probe", "LinkSupport", "cleanup_stale",
           "list_namespaces", "measure_link", "LinkMeasurement", "run", "tbf_params",
           "CommandError", "LinkUnavailable"]
