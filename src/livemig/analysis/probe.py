"""What this host's kernel allows livemig to do, as data and as text.

``probe_host()`` asks the kernel directly (UFFDIO_API, a PAGEMAP_SCAN
self-test, each tracker's probe) rather than trusting version numbers, and
returns a JSON-able dict; ``format_probe()`` renders it for people (the CLI's
``livemig probe``). ``backends_to_test()`` lists every tracker with its
availability so a test suite can run over each usable one and skip the others
with the probe's own reason.
"""
from __future__ import annotations

import errno as _errno
import os
import platform

from ..native import pagehash, tracking
from ..native import PAGE_SIZE, ffi, lib

#: UFFD_FEATURE_* bit -> name (include/uapi/linux/userfaultfd.h, Linux 6.18).
UFFD_FEATURES = {
    0: "PAGEFAULT_FLAG_WP", 1: "EVENT_FORK", 2: "EVENT_REMAP", 3: "EVENT_REMOVE",
    4: "MISSING_HUGETLBFS", 5: "MISSING_SHMEM", 6: "EVENT_UNMAP", 7: "SIGBUS",
    8: "THREAD_ID", 9: "MINOR_HUGETLBFS", 10: "MINOR_SHMEM", 11: "EXACT_ADDRESS",
    12: "WP_HUGETLBFS_SHMEM", 13: "WP_UNPOPULATED", 14: "POISON", 15: "WP_ASYNC",
    16: "MOVE",
}
#: _UFFDIO_* ioctl bit -> name.
UFFD_IOCTLS = {
    0: "REGISTER", 1: "UNREGISTER", 2: "WAKE", 3: "COPY", 4: "ZEROPAGE", 5: "MOVE",
    6: "WRITEPROTECT", 7: "CONTINUE", 8: "POISON", 63: "API",
}


def decode_bits(value: int, names: dict[int, str]) -> list[str]:
    """Names of the set bits of ``value``; unknown bits appear as ``bit<N>``."""
    return [names.get(b, f"bit{b}") for b in range(64) if value >> b & 1]


def _read_sysctl(name: str) -> int | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/"), encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _errname(rc: int) -> str:
    return _errno.errorcode.get(-rc, str(-rc))


def probe_host() -> dict:
    """Kernel facts relevant to livemig, JSON-able."""
    features = ffi.new("uint64_t *")
    ioctls = ffi.new("uint64_t *")
    rc = lib.lm_uffd_features(features, ioctls)
    uffd = {"available": rc == 0, "error": None if rc == 0 else _errname(rc),
            "features": [], "features_bits": 0, "ioctls": []}
    if rc == 0:
        uffd.update(features=decode_bits(features[0], UFFD_FEATURES),
                    features_bits=int(features[0]),
                    ioctls=decode_bits(ioctls[0], UFFD_IOCTLS))
    scan_rc = lib.lm_pagemap_scan_probe()
    backends = {}
    for name in tracking.PREFERENCE:
        st = tracking.probe_backend(name)
        backends[name] = {"available": st.available, "reason": st.reason, "hint": st.hint}
    try:
        auto, auto_reason = tracking.choose_backend()
    except tracking.BackendUnavailable as exc:
        auto, auto_reason = None, exc.reason
    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "page_size": PAGE_SIZE,
        "sysctl": {
            "vm.unprivileged_userfaultfd": _read_sysctl("vm.unprivileged_userfaultfd"),
            "vm.max_map_count": _read_sysctl("vm.max_map_count"),
        },
        "dev_userfaultfd": os.path.exists("/dev/userfaultfd"),
        "userfaultfd": uffd,
        "pagemap_scan": {"available": scan_rc == 0,
                         "error": None if scan_rc == 0 else _errname(scan_rc)},
        "trackers": backends,
        "auto": auto,
        "auto_reason": auto_reason,
        "postcopy": _postcopy_probe(),
        "urgent": _urgent_probe(),
        "etcd": _etcd_probe(),
        "page_hash": pagehash.describe(),
    }


# etcd itself recommends these for production: 3.5.0–3.5.5 can lose consistency
# when killed (docs/fleet.md).
ETCD_RECOMMENDED = ((3, 4, 22), (3, 5, 6))


def _etcd_probe() -> dict:
    """Is an etcd binary on PATH (for --fleet and its tests), and which version?"""
    import re
    import shutil
    import subprocess

    path = shutil.which("etcd")
    if path is None:
        return {"available": False, "path": None, "version": None, "recommended": False,
                "reason": "no etcd on PATH (apt-get install etcd-server)"}
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return {"available": False, "path": path, "version": None, "recommended": False,
                "reason": f"{path} --version failed: {exc}"}
    m = re.search(r"etcd Version: (\d+)\.(\d+)\.(\d+)", out)
    if m is None:
        return {"available": False, "path": path, "version": None, "recommended": False,
                "reason": f"{path} --version printed no version"}
    v = tuple(int(x) for x in m.groups())
    ok = any(v[:2] == r[:2] and v >= r for r in ETCD_RECOMMENDED) or v[:2] > (3, 5)
    return {"available": True, "path": path, "version": ".".join(map(str, v)),
            "recommended": ok, "reason": "recommended for production" if ok else
            "not a version etcd recommends for production (3.4.22+ or 3.5.6+)"}


def _realtime_probe() -> tuple[bool, str]:
    """Can a thread of ours run SCHED_FIFO? Tried for real on a throwaway
    thread (on Linux the call applies to the calling thread only)."""
    import threading

    out: list = []

    def attempt():
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            out.append((True, "allowed"))
        except OSError as exc:
            out.append((False, f"refused ({_errno.errorcode.get(exc.errno, exc.errno)}): "
                               "the urgent threads run at normal priority"))

    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    return out[0]


def _urgent_probe() -> dict:
    from ..native.urgent import probe as urgent_probe

    native, reason = urgent_probe()
    rt, rt_reason = _realtime_probe()
    return {"native": native, "reason": reason, "realtime": rt, "realtime_reason": rt_reason}


def _postcopy_probe() -> dict:
    from ..native.postcopy import probe as postcopy_probe

    p = postcopy_probe()
    return {"available": bool(p.missing), "move": bool(p.move),
            "user_mode_only": bool(p.user_mode_only), "reason": p.reason or "usable"}


def format_probe(d: dict) -> str:
    """A human-readable rendering of :func:`probe_host`'s result."""
    yes = {True: "yes", False: "no"}
    u = d["userfaultfd"]
    lines = [
        f"kernel            {d['kernel']} ({d['machine']}, {d['page_size']}-byte pages)",
        f"userfaultfd       {yes[u['available']]}" + ("" if u["available"] else f" ({u['error']})"),
    ]
    if u["available"]:
        lines.append(f"  features        {' '.join(u['features'])}")
        lines.append(f"  ioctls          {' '.join(u['ioctls'])}")
    sc = d["sysctl"]
    lines.append(f"  sysctl          vm.unprivileged_userfaultfd={sc['vm.unprivileged_userfaultfd']}"
                 f"  /dev/userfaultfd {'present' if d['dev_userfaultfd'] else 'absent'}")
    ps = d["pagemap_scan"]
    lines.append(f"PAGEMAP_SCAN      {yes[ps['available']]}" + ("" if ps["available"] else f" ({ps['error']})"))
    lines.append(f"vm.max_map_count  {sc['vm.max_map_count']}")
    lines.append("dirty trackers")
    for name, b in d["trackers"].items():
        mark = "usable" if b["available"] else f"unavailable: {b['reason']}"
        lines.append(f"  {name:<15} {mark}")
        if b.get("hint") and not b["available"]:
            lines.append(f"  {'':<15} hint: {b['hint']}")
    lines.append(f"auto choice       {d['auto']} — {d['auto_reason']}")
    pc = d["postcopy"]
    lines.append("post-copy         " + (
        f"yes (userfaultfd MISSING; UFFDIO_MOVE {yes[pc['move']]})" if pc["available"]
        else f"no: {pc['reason']} — pre-copy still works"))
    ur = d["urgent"]
    lines.append("fault service     " + (
        "native threads" if ur["native"] else f"event loop ({ur['reason']})")
        + f"; SCHED_FIFO {ur['realtime_reason']}")
    et = d.get("etcd") or {}
    lines.append("etcd (fleet)      " + (f"{et['version']} at {et['path']} ({et['reason']})"
                                         if et.get("available") else f"no: {et.get('reason')}"))
    ph = d.get("page_hash")
    if ph:
        lines.append(f"page hash         {ph['implementation']} (runs here: "
                     f"{', '.join(ph['available'])}; {ph['forced_scalar_by']} forces scalar)")
    return "\n".join(lines)


def backends_to_test() -> list[tuple[str, bool, str]]:
    """(name, usable, reason) for every tracker, best first."""
    out = []
    for name in tracking.PREFERENCE:
        st = tracking.probe_backend(name)
        reason = st.reason if st.hint is None else f"{st.reason} (hint: {st.hint})"
        out.append((name, st.available, reason))
    return out


__all__ = ["UFFD_FEATURES", "UFFD_IOCTLS", "backends_to_test", "decode_bits", "format_probe",
           "probe_host"]
