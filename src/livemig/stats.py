"""Migration statistics, shaped after QEMU's query-migrate.

Plain data with small update helpers; no clock (callers pass durations and
timestamps they measured) and no I/O. ``to_dict()`` gives JSON-able output
for the daemon, the CLI and bench results.

:class:`LatencyHistogram` keeps post-copy fault latencies in log-spaced
buckets (constant memory however many faults happen; relative error of a
percentile is bounded by the bucket width, ~4.5 % at 16 buckets per octave).
:func:`percentiles` is the exact version for a list of samples.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np

from .errors import ConfigError
from .policy import Decision
from .units import PAGE_SIZE, finite_or_none

ACTIVE_STATUSES = ("setup", "active", "postcopy-active")
"""A migration in one of these has not ended yet."""
STATUSES = ACTIVE_STATUSES + ("completed", "failed", "cancelled")


def percentiles(samples: Iterable[float], qs=(50, 99)) -> dict[str, float]:
    """Exact percentiles (``p50``, ``p99``, ...) and ``max`` of samples."""
    arr = np.asarray(list(samples), dtype=np.float64)
    if arr.size == 0:
        return {**{f"p{q:g}": math.nan for q in qs}, "max": math.nan}
    out = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
    out["max"] = float(arr.max())
    return out


class LatencyHistogram:
    """Log-bucketed histogram of latencies in microseconds."""

    def __init__(self, min_us: float = 1.0, max_us: float = 10e6, buckets_per_octave: int = 16):
        self.min_us = min_us
        self.buckets_per_octave = buckets_per_octave
        nb = int(math.ceil(math.log2(max_us / min_us) * buckets_per_octave)) + 2
        self.counts = np.zeros(nb, dtype=np.int64)
        self.count = 0
        self.max_us = 0.0
        self.sum_us = 0.0

    def _bucket(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            b = np.floor(np.log2(np.maximum(values, self.min_us) / self.min_us)
                         * self.buckets_per_octave).astype(np.int64) + 1
        b[values < self.min_us] = 0
        return np.minimum(b, self.counts.size - 1)

    def add(self, latency_us: float) -> None:
        self.add_many([latency_us])

    def add_many(self, latencies_us) -> None:
        v = np.asarray(latencies_us, dtype=np.float64).reshape(-1)
        if not v.size:
            return
        np.add.at(self.counts, self._bucket(v), 1)
        self.count += int(v.size)
        self.max_us = max(self.max_us, float(v.max()))
        self.sum_us += float(v.sum())

    def percentile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-th percentile (capped at max)."""
        if not self.count:
            return math.nan
        rank = max(1, int(math.ceil(q / 100.0 * self.count)))
        b = int(np.searchsorted(np.cumsum(self.counts), rank))
        edge = self.min_us if b == 0 else self.min_us * 2.0 ** (b / self.buckets_per_octave)
        return min(edge, self.max_us)

    def merge(self, other: "LatencyHistogram") -> None:
        if other.counts.size != self.counts.size or other.min_us != self.min_us:
            raise ConfigError("histograms have different bucket layouts")
        self.counts += other.counts
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)
        self.sum_us += other.sum_us

    def to_dict(self) -> dict:
        if not self.count:
            return {"count": 0, "p50_us": None, "p99_us": None, "max_us": None, "mean_us": None}
        return {"count": self.count, "p50_us": self.percentile(50), "p99_us": self.percentile(99),
                "max_us": self.max_us, "mean_us": self.sum_us / self.count}


@dataclass
class RoundRecord:
    index: int
    duration_s: float
    pages_sent: int
    bytes_sent: int
    dirty_pages: int
    """Pages dirty at the end of the round."""
    throttle_pct: float = 0.0

    @property
    def dirty_rate_pps(self) -> float:
        return self.dirty_pages / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dirty_rate_pps"] = self.dirty_rate_pps
        return d


def _zero_counts() -> dict[str, int]:
    return {e: 0 for e in ("zero", "dup", "delta", "block", "lz4", "raw")}


@dataclass
class MigrationStats:
    status: str = "setup"
    mode: str = "precopy"
    memory_bytes: int = 0
    setup_time_ms: float = 0.0
    total_time_ms: float = 0.0
    downtime_ms: float | None = None
    """Measured stop-to-resume time, once switched over."""
    expected_downtime_ms: float | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    bytes_sent: int = 0
    pages_sent: int = 0
    bytes_by_encoding: dict[str, int] = field(default_factory=_zero_counts)
    pages_by_encoding: dict[str, int] = field(default_factory=_zero_counts)
    throttle_pct: float = 0.0
    converged: bool = False
    decisions: list[Decision] = field(default_factory=list)
    error: str | None = None
    tracker: str | None = None
    remaining_bytes: int = 0
    data_path: str | None = None
    """Who carried the pre-copy pages: "native-streams ×N" (C threads on N bulk
    streams) or "python: <why the native streams were not used>"."""
    first_touch: str | None = None
    """Destination: how fresh guest memory was first written: "userfaultfd
    copy (no zeroing)", or "pre-faulted: <why not>"."""
    stream_cpu_s: float = 0.0
    """CPU time the native stream threads of this side spent (0 on the Python path)."""
    precopy_resumes: int = 0
    """Pre-copy rounds continued after a link break (resumable pre-copy)."""
    resent_pages: int = 0
    """Source: pages sent again after those breaks because the version sent never landed."""
    resend_avoided_pages: int = 0
    """Source: pages of the interrupted rounds that had landed, so were not sent again."""
    # post-copy
    postcopy_duration_ms: float = 0.0
    urgent_requests: int = 0
    pages_pushed: int = 0
    pages_requested: int = 0
    recoveries: int = 0
    invalidation_rounds: list[dict] = field(default_factory=list)
    """Hybrid: per round before the pause, pages invalidated, its ms, pages left."""
    stop_invalidated_pages: int = 0
    """Pages the destination discarded inside the stop (the last dirty set)."""
    fault_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    push_path: str | None = None
    """Who pushed the owed post-copy pages: "native-streams ×N" or
    "python: <why the native streams were not used>"."""
    fault_path: str | None = None
    """Who served the urgent channel here: "native" (C threads) or "python"."""
    fault_path_reason: str | None = None
    vcpu_blocked_ms: float | None = None
    """Destination, native path: sum of per-fault latencies (fault read ->
    page placed) of the faults it served, i.e. the time vCPUs spent blocked
    on them (one blocked thread per distinct faulted page)."""
    postcopy_started_ms: float | None = None
    """Milliseconds from the start to the post-copy resume (None before it)."""
    postcopy_timeline_ms: dict = field(default_factory=dict)
    """Where post-copy's time went: milestones in ms after the resume (source:
    push_first_queued, push_acked, postcopy_complete_received, complete_sent,
    end; destination: all_present, postcopy_complete_sent, complete_received,
    end). Each is the latest time it was reached (a reconnection may repeat it)."""
    push_in_flight_max: int = 0
    """Source, native push: the most chunks one stream had sent and not yet
    seen acknowledged at once (> 1: the window pipelined them)."""

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ConfigError(f"unknown migration status {status!r}")
        self.status = status

    def add_batch(self, batch) -> None:
        """Count an EncodedBatch (or DecodedBatch)."""
        self.bytes_sent += batch.nbytes
        self.pages_sent += batch.npages
        for k, v in batch.pages_by_encoding.items():
            self.pages_by_encoding[k] = self.pages_by_encoding.get(k, 0) + v
        for k, v in batch.bytes_by_encoding.items():
            self.bytes_by_encoding[k] = self.bytes_by_encoding.get(k, 0) + v

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def add_decision(self, decision: Decision) -> None:
        self.decisions.append(decision)
        if math.isfinite(decision.expected_downtime_ms):
            self.expected_downtime_ms = decision.expected_downtime_ms
        self.throttle_pct = decision.throttle_pct

    @property
    def throughput_bps(self) -> float:
        return self.bytes_sent / (self.total_time_ms / 1000.0) if self.total_time_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "status": self.status, "mode": self.mode, "memory_bytes": self.memory_bytes,
            "setup_time_ms": self.setup_time_ms, "total_time_ms": self.total_time_ms,
            "downtime_ms": finite_or_none(self.downtime_ms),
            "expected_downtime_ms": finite_or_none(self.expected_downtime_ms),
            "rounds": [r.to_dict() for r in self.rounds], "nrounds": len(self.rounds),
            "bytes_sent": self.bytes_sent, "pages_sent": self.pages_sent,
            "bytes_by_encoding": dict(self.bytes_by_encoding),
            "pages_by_encoding": dict(self.pages_by_encoding),
            "throughput_bps": self.throughput_bps, "throttle_pct": self.throttle_pct,
            "converged": self.converged, "decisions": [d.to_dict() for d in self.decisions],
            "error": self.error, "tracker": self.tracker,
            "remaining_bytes": self.remaining_bytes,
            "data_path": self.data_path, "stream_cpu_s": self.stream_cpu_s,
            "first_touch": self.first_touch,
            "precopy_resume": {
                "resumes": self.precopy_resumes,
                "resent_pages": self.resent_pages,
                "resent_bytes": self.resent_pages * PAGE_SIZE,
                "avoided_pages": self.resend_avoided_pages,
                "avoided_bytes": self.resend_avoided_pages * PAGE_SIZE,
            },
            "postcopy": {
                "duration_ms": self.postcopy_duration_ms, "urgent_requests": self.urgent_requests,
                "pages_pushed": self.pages_pushed, "pages_requested": self.pages_requested,
                "recoveries": self.recoveries, "fault_latency": self.fault_latency.to_dict(),
                "fault_path": self.fault_path, "fault_path_reason": self.fault_path_reason,
                "push_path": self.push_path,
                "vcpu_blocked_ms": self.vcpu_blocked_ms,
                "invalidation_rounds": list(self.invalidation_rounds),
                "stop_invalidated_pages": self.stop_invalidated_pages,
                "started_ms": self.postcopy_started_ms,
                "timeline_ms": dict(self.postcopy_timeline_ms),
                "push_in_flight_max": self.push_in_flight_max,
            },
        }


def progress(stats: MigrationStats, elapsed_s: float) -> dict:
    """What an operator watches, from live stats and the time since the start.

    ``round`` is the pre-copy round in flight (0 = the full copy). Before
    switchover ``remaining_bytes`` is what the round in flight still has to
    send (the whole memory at the start); in post-copy it is the pages still
    owed, and ``expected_downtime_ms`` is gone (the stop is over). ``eta_s``
    is remaining over throughput: a lower bound, since the guest keeps
    dirtying pages until the stop. Fields that do not apply are None."""
    postcopy = stats.status == "postcopy-active"
    precopy = stats.status in ("setup", "active")
    throughput_bps = stats.bytes_sent / elapsed_s if elapsed_s > 0 else 0.0
    remaining = stats.remaining_bytes
    last = stats.rounds[-1] if stats.rounds else None
    out = {
        "status": stats.status, "mode": stats.mode, "elapsed_s": elapsed_s,
        "round": len(stats.rounds) if precopy else None,
        "transferred_bytes": stats.bytes_sent, "remaining_bytes": remaining,
        "memory_bytes": stats.memory_bytes,
        "percent": (100.0 * (1.0 - remaining / stats.memory_bytes)
                    if stats.memory_bytes else None),
        "throughput_bps": throughput_bps,
        "eta_s": remaining / throughput_bps if throughput_bps > 0 and (precopy or postcopy)
        else None,
        "dirty_rate_bps": (last.dirty_pages * PAGE_SIZE / last.duration_s
                           if precopy and last is not None and last.duration_s > 0 else None),
        "expected_downtime_ms": finite_or_none(stats.expected_downtime_ms) if precopy else None,
        "throttle_pct": stats.throttle_pct,
        "owed_pages": remaining // PAGE_SIZE if postcopy else None,
        "fault_rate_pps": None,
    }
    if postcopy and stats.postcopy_started_ms is not None:
        postcopy_s = elapsed_s - stats.postcopy_started_ms / 1e3
        out["fault_rate_pps"] = stats.pages_requested / postcopy_s if postcopy_s > 0 else 0.0
    return out


__all__ = ["MigrationStats", "progress", "RoundRecord", "LatencyHistogram", "percentiles", "STATUSES",
           "ACTIVE_STATUSES"]
