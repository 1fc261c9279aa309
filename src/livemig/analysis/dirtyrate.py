"""Measure a running VM's dirty rate, the way QEMU's calc-dirty-rate does.

Theory of operation
-------------------
Whether pre-copy can converge depends on one number more than any other: how
many *distinct* pages the guest dirties per second, against the bandwidth.
Two ways to measure it, picked automatically:

``tracker``
    Arm a dirty tracker on guest memory for the window (the tracking backend
    of tracking.py: uffd-async write-protect plus PAGEMAP_SCAN on Linux 6.7+)
    and collect every ``interval_s``. The union of the collected sets is the
    exact set of pages written in the window — QEMU's "dirty bitmap" mode.
    The sum of the per-interval counts is reported too: it is what a pre-copy
    whose rounds last ``interval_s`` would have to resend.
``hash-sample``
    When a tracker is already armed on the memory (a migration is running: a
    second userfaultfd registration of the same range would fail with EBUSY,
    see userfaultfd(2), and would steal the migration's write reports), hash
    a random sample of pages at the start and at the end of the window and
    scale the share that changed to the whole memory — QEMU's "page
    sampling" mode. A page written back with the same content is missed, so
    this is a lower bound; a sample of k pages gives a relative standard
    error of about sqrt((1-p)/(k·p)) for a dirty share p.

``record_trace`` keeps what the tracker method throws away — each
interval's set of dirty pages — and writes it as a dirty-page trace file
(vm/trace.py) that the ``trace:FILE`` workload replays.

Concentration is reported as the share of dirty pages that fall in the
hottest 10 % of 2 MiB blocks (≈ 10 % for uniform writes, near 100 % for a
hot set) and as distinct pages per guest store (the guest's own store
counter), which says how much a longer round would be absorbed by rewrites.

Ordering: the tracker is armed before the window's clock starts and the last
collect happens after it ends, so every write inside the window is counted
(the tracker contract: a write made while armed is reported by the next
collect or the one after; the final collect after ``stop`` cannot lose one
because ``stop`` happens after it). Hashing runs natively over the sampled
rows (pagekernels.hash_pages), never per page in Python.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ConfigError
from ..native import PAGE_SIZE
from ..codec.kernels import hash_pages
from ..native.tracking import DirtyTracker, open_tracker
from ..vm import trace as tracefile

BLOCK_PAGES = (2 << 20) // PAGE_SIZE
"""Pages per 2 MiB block: the unit of the concentration measure."""
HOT_BLOCK_SHARE = 0.10
"""The hottest share of blocks whose dirty pages are counted."""
METHODS = ("auto", "tracker", "hash-sample")


@dataclass(frozen=True)
class DirtyRateReport:
    method: str
    """"tracker" (exact set of written pages) or "hash-sample" (estimate)."""
    window_s: float
    memory_bytes: int
    dirty_pages: int
    """Distinct pages written in the window (estimated for hash-sample)."""
    pages_per_s: float
    bytes_per_s: float
    interval_pages: int | None
    """Sum of the per-interval dirty counts (tracker method only)."""
    interval_s: float | None
    hot_block_share: float | None
    """Share of dirty pages in the hottest 10 % of 2 MiB blocks (None if no page)."""
    blocks_touched: int
    guest_stores: int
    """Stores the guest executed in the window (its own counter)."""
    distinct_per_store: float | None
    """dirty_pages / guest_stores: 1.0 when no page was written twice."""
    guest_dirty_rate_bps: float
    """The workload's own accounting (ticks × bytes per tick) over the window."""
    target_dirty_rate_bps: float | None
    tracker: str | None = None
    sampled_pages: int | None = None
    relative_error: float | None = None
    """Hash-sample: estimated relative standard error of dirty_pages."""

    @property
    def mib_per_s(self) -> float:
        return self.bytes_per_s / (1 << 20)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mib_per_s"] = self.mib_per_s
        return d


def hot_block_share(pages: np.ndarray, npages: int, share: float = HOT_BLOCK_SHARE
                    ) -> tuple[float | None, int]:
    """(share of ``pages`` in the hottest ``share`` of 2 MiB blocks, blocks touched)."""
    if len(pages) == 0:
        return None, 0
    nblocks = max(1, -(-npages // BLOCK_PAGES))
    counts = np.bincount(np.asarray(pages, dtype=np.int64) // BLOCK_PAGES, minlength=nblocks)
    top = max(1, int(math.ceil(nblocks * share)))
    hottest = np.partition(counts, nblocks - top)[nblocks - top:]
    return float(hottest.sum() / counts.sum()), int(np.count_nonzero(counts))


def _tracker_in_use(memory) -> DirtyTracker | None:
    for user in list(getattr(memory, "_users", ())):
        if isinstance(user, DirtyTracker) and not user.closed:
            return user
    return None


def measure_dirty_rate(vm, window_s: float = 1.0, *, method: str = "auto",
                       tracker: str = "auto", interval_s: float = 0.1,
                       sample_pages: int | None = None, seed: int | None = None
                       ) -> DirtyRateReport:
    """Watch the running ``vm`` for ``window_s`` seconds and report its dirty rate.

    ``method="auto"`` uses a tracker unless one is already attached to the
    VM's memory (a migration in flight), then hash sampling. Blocking: call
    it from a worker thread inside an event loop."""
    if not (isinstance(window_s, (int, float)) and 0 < window_s <= 3600):
        raise ConfigError(f"window must be in (0, 3600] seconds, got {window_s!r}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "hash-sample" if _tracker_in_use(vm.memory) is not None else "tracker"
    if method == "tracker":
        return _by_tracker(vm, float(window_s), tracker, float(interval_s))
    return _by_sampling(vm, float(window_s), sample_pages, seed)


def _guest_marks(vm) -> dict:
    return vm.stats() if vm.workload is not None else {"stores": 0, "dirty_rate_bps": 0.0,
                                                       "target_dirty_rate_bps": None}


def _report(vm, method, window_s, dirty_pages, before, after, concentration_pages, **extra):
    memory = vm.memory
    share, touched = hot_block_share(concentration_pages, memory.npages)
    stores = int(after["stores"] - before["stores"])
    return DirtyRateReport(
        method=method, window_s=window_s, memory_bytes=memory.length_bytes,
        dirty_pages=int(dirty_pages), pages_per_s=dirty_pages / window_s,
        bytes_per_s=dirty_pages * PAGE_SIZE / window_s, hot_block_share=share,
        blocks_touched=touched, guest_stores=stores,
        distinct_per_store=(dirty_pages / stores) if stores else None,
        guest_dirty_rate_bps=float(after["dirty_rate_bps"]),
        target_dirty_rate_bps=after.get("target_dirty_rate_bps"), **extra)


def _by_tracker(vm, window_s: float, backend: str, interval_s: float) -> DirtyRateReport:
    if not 0 < interval_s:
        raise ConfigError(f"interval must be > 0 s, got {interval_s!r}")
    if _tracker_in_use(vm.memory) is not None:
        raise ConfigError("a dirty tracker is already armed on this VM's memory (a migration "
                          "is running): use method='hash-sample'")
    seen = np.zeros(vm.memory.npages, dtype=np.bool_)
    interval_pages = 0
    with open_tracker(vm.memory, backend) as trk:
        trk.start()
        before = _guest_marks(vm)
        t0 = time.monotonic()
        end = t0 + window_s
        while True:
            now = time.monotonic()
            if now >= end:
                break
            time.sleep(min(interval_s, end - now))
            pages = trk.collect()
            interval_pages += len(pages)
            seen[pages] = True
        pages = trk.collect()  # writes that raced with the last sleep's end
        interval_pages += len(pages)
        seen[pages] = True
        after = _guest_marks(vm)
        elapsed = time.monotonic() - t0
        trk.stop()
        name = trk.name
    dirty = np.flatnonzero(seen)
    return _report(vm, "tracker", elapsed, len(dirty), before, after, dirty,
                   interval_pages=interval_pages, interval_s=interval_s, tracker=name)


def _by_sampling(vm, window_s: float, sample_pages: int | None, seed: int | None
                 ) -> DirtyRateReport:
    npages = vm.memory.npages
    k = sample_pages if sample_pages is not None else max(4096, npages // 16)
    if not isinstance(k, int) or k <= 0:
        raise ConfigError(f"sample_pages must be a positive integer, got {sample_pages!r}")
    k = min(k, npages)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(npages, size=k, replace=False)).astype(np.int64)
    pages = vm.memory.pages
    before = _guest_marks(vm)
    t0 = time.monotonic()
    h0 = hash_pages(pages, idx)
    time.sleep(window_s)
    h1 = hash_pages(pages, idx)
    elapsed = time.monotonic() - t0
    after = _guest_marks(vm)
    changed = idx[h0 != h1]
    p = len(changed) / k
    est = p * npages
    rel = math.sqrt((1 - p) / (k * p)) if p > 0 else None
    return _report(vm, "hash-sample", elapsed, round(est), before, after, changed,
                   interval_pages=None, interval_s=None, sampled_pages=k, relative_error=rel)


MAX_RECORD_S = 3600.0
MAX_RECORD_PAGES = ((tracefile.MAX_TRACE_BYTES
                     - tracefile.MAX_VARINT_BYTES * tracefile.MAX_INTERVALS)
                    // tracefile.MAX_VARINT_BYTES)
"""Dirty pages a recording may hold, checked as it records: at the largest
size of a number, the file still stays within what a reader accepts."""


def record_trace(vm, path: str, seconds: float = 10.0, *, interval_s: float = 0.1,
                 tracker: str = "auto") -> dict:
    """Record the running ``vm``'s dirty pages per ``interval_s`` for ``seconds``
    into the trace file ``path``. Blocking: call it from a worker thread.

    The last collect after the window counts with the last interval, as in
    the tracker method above, so no write inside the window is lost."""
    if not (isinstance(seconds, (int, float)) and 0 < seconds <= MAX_RECORD_S):
        raise ConfigError(f"--seconds must be in (0, {MAX_RECORD_S:g}], got {seconds!r}")
    interval_us = round(float(interval_s) * 1e6)
    if not tracefile.MIN_INTERVAL_US <= interval_us <= tracefile.MAX_INTERVAL_US:
        raise ConfigError(f"--interval must be {tracefile.MIN_INTERVAL_US / 1e6:g}.."
                          f"{tracefile.MAX_INTERVAL_US / 1e6:g} s, got {interval_s!r}")
    if _tracker_in_use(vm.memory) is not None:
        raise ConfigError("a dirty tracker is already armed on this VM's memory (a migration "
                          "is running): record the trace before or after it")
    nintervals = max(1, int(round(seconds / interval_s)))
    if nintervals > tracefile.MAX_INTERVALS:
        raise ConfigError(f"{nintervals} intervals of {interval_s:g} s is more than a trace "
                          f"holds ({tracefile.MAX_INTERVALS}): record fewer --seconds or use "
                          "a longer --interval")
    intervals: list[np.ndarray] = []
    held = 0
    with open_tracker(vm.memory, tracker) as trk:
        trk.start()
        t0 = time.monotonic()
        for i in range(nintervals):
            # sleep to the interval's end on the window's clock, so that
            # late wake-ups do not stretch the recording
            delay = t0 + (i + 1) * interval_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pages = np.unique(np.asarray(trk.collect(), dtype=np.int64))
            if i == nintervals - 1:
                pages = np.union1d(pages, np.asarray(trk.collect(), dtype=np.int64))
            held += len(pages)
            if held > MAX_RECORD_PAGES:
                raise ConfigError(f"the trace would hold more than {MAX_RECORD_PAGES:,} dirty "
                                  f"pages after {i + 1} intervals: record fewer --seconds")
            intervals.append(pages)
        elapsed = time.monotonic() - t0
        trk.stop()
        name = trk.name
    recorded = tracefile.Trace(vm.memory.length_bytes, interval_us / 1e6, tuple(intervals))
    size = tracefile.write(path, recorded)
    return {"path": path, "file_bytes": size, "tracker": name, "elapsed_s": elapsed,
            **recorded.describe()}


def format_record(r: dict) -> str:
    """Human text of ``record_trace``'s result."""
    return (f"recorded {r['intervals']} intervals of {r['interval_s']:g} s "
            f"({r['dirty_pages']:,} dirty pages, {r['dirty_rate_bps'] / (1 << 20):.2f} MiB/s, "
            f"tracker {r['tracker']}) to {r['path']}: {r['file_bytes']:,} bytes\n"
            f"replay it with --workload trace:{r['path']}")


def format_report(r: dict) -> str:
    """Human text of a report's ``to_dict()``."""
    lines = [f"dirty rate over {r['window_s']:.2f} s ({r['method']}"
             + (f", tracker {r['tracker']}" if r.get("tracker") else "")
             + (f", {r['sampled_pages']} pages sampled" if r.get("sampled_pages") else "") + "):",
             f"  {r['pages_per_s']:,.0f} pages/s = {r['mib_per_s']:.2f} MiB/s "
             f"({r['dirty_pages']:,} distinct pages of {r['memory_bytes'] // PAGE_SIZE:,})"]
    if r.get("target_dirty_rate_bps"):
        lines.append(f"  workload target {r['target_dirty_rate_bps'] / (1 << 20):.2f} MiB/s, "
                     f"guest's own count {r['guest_dirty_rate_bps'] / (1 << 20):.2f} MiB/s")
    if r.get("hot_block_share") is not None:
        lines.append(f"  {r['hot_block_share']:.0%} of dirty pages in the hottest 10 % of 2 MiB "
                     f"blocks ({r['blocks_touched']} blocks touched)")
    if r.get("distinct_per_store") is not None:
        lines.append(f"  {r['distinct_per_store']:.3f} distinct pages per guest store "
                     f"({r['guest_stores']:,} stores)")
    if r.get("interval_pages") is not None:
        lines.append(f"  {r['interval_pages']:,} page dirtyings counted per {r['interval_s']:g} s "
                     "interval (what rounds that short would resend)")
    return "\n".join(lines)


__all__ = ["DirtyRateReport", "measure_dirty_rate", "record_trace", "format_record", "hot_block_share", "format_report",
           "METHODS", "BLOCK_PAGES"]
