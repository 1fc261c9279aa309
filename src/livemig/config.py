"""Migration and codec configuration: validated dataclasses, nothing else.

Every field carries its unit in its name and a docstring under it. Values
that people type (sizes, rates) may be given as text (``"64MiB"``,
``"1Gbit/s"``) to :meth:`MigrationConfig.from_dict`, which is how the CLI and
the daemon build configs; the dataclasses themselves hold plain numbers. The
bandwidth cap has one parser, :func:`parse_max_bandwidth`, which
``MigrationConfig`` applies to whatever it is given (a number or text).
Validation happens in ``__post_init__`` and raises :class:`ConfigError` with
the field name, so a bad config fails before any connection is made.

Rates here are in *bytes* per second (``_bps`` = bytes/s), as
:func:`livemig.units.parse_rate` returns them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .units import PAGE_SIZE, parse_optional_rate, parse_size

MODES = ("precopy", "postcopy", "hybrid")
VERIFY_MODES = ("sent", "full")
ENCODINGS = ("zero", "dup", "delta", "block", "lz4", "raw")
MAX_STREAMS = 16
DEFAULT_MAX_STREAMS = 4


def default_streams() -> int:
    """Bulk streams by default: one per CPU this process may run on, at most
    DEFAULT_MAX_STREAMS (each stream is a thread on both sides)."""
    return max(1, min(DEFAULT_MAX_STREAMS, len(os.sched_getaffinity(0))))


def _positive(name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def parse_max_bandwidth(value: str | float | None, *,
                        what: str = "max_bandwidth_bps") -> float | None:
    """The bandwidth cap in bytes/s from bytes/s or text (``"100MiB/s"``,
    ``"1Gbit/s"``); nothing (None or ``""``) means no cap. ``what`` names the
    value in errors (the CLI passes its flag)."""
    bandwidth_bps = parse_optional_rate(value, what=what)
    if bandwidth_bps is not None:
        _positive(what, bandwidth_bps)
    return bandwidth_bps


def _pct(name: str, value) -> None:
    _positive(name, value, allow_zero=True)
    if value > 100:
        raise ConfigError(f"{name} must be a percentage in [0, 100], got {value}")


@dataclass
class CodecConfig:
    """How the page codec encodes batches."""

    encodings: tuple[str, ...] = ENCODINGS
    """Encodings the encoder may use. RAW is always allowed (the fallback);
    post-copy disables "delta" and "block" (the receiver holds no old copy)
    and "dup" (the destination guest already runs and may rewrite a DUP
    source page)."""

    dup_cache_entries: int = 1 << 16
    """Slots of the direct-mapped table of content hashes (DUP targets)."""

    delta_cache_bytes: int = 32 << 20
    """Bytes of last-sent page versions kept as delta bases (CLOCK-evicted).
    Pages outside it are still sent as BLOCK when few of their blocks
    changed; the block fingerprints take 1/32 of guest memory."""

    delta_max_page_bytes: int = 2048
    """A page is sent as DELTA only when its delta is at most this long."""

    lz4_chunk_pages: int = 16
    """LZ4 compresses runs of up to this many consecutive pages as one block."""

    lz4_min_saving_pct: float = 12.5
    """LZ4 is used only when it saves at least this share of the raw bytes."""

    zero_copy_raw: bool = True
    """Send RAW pages of *frozen* memory (the final round) as memoryviews into
    guest memory, without a copy. Pages of a running guest are always copied
    once first: the frame checksum must match the bytes that leave."""

    verify_dup: bool = True
    """The receiver checks the xxh3-128 hash of each DUP source page."""

    def __post_init__(self) -> None:
        self.encodings = tuple(self.encodings)
        unknown = set(self.encodings) - set(ENCODINGS)
        if unknown:
            raise ConfigError(f"codec encodings: unknown {sorted(unknown)}; known: {ENCODINGS}")
        if "raw" not in self.encodings:
            self.encodings = self.encodings + ("raw",)
        _positive("dup_cache_entries", self.dup_cache_entries, allow_zero=True)
        _positive("delta_cache_bytes", self.delta_cache_bytes, allow_zero=True)
        if not 16 <= self.delta_max_page_bytes < PAGE_SIZE:
            raise ConfigError(
                f"delta_max_page_bytes must be in [16, {PAGE_SIZE}), got {self.delta_max_page_bytes}")
        if not 1 <= self.lz4_chunk_pages <= 1024:
            raise ConfigError(f"lz4_chunk_pages must be in [1, 1024], got {self.lz4_chunk_pages}")
        _pct("lz4_min_saving_pct", self.lz4_min_saving_pct)

    def enabled(self, encoding: str) -> bool:
        return encoding in self.encodings

    def without(self, *encodings: str) -> "CodecConfig":
        """A copy with some encodings switched off (e.g. "delta" for post-copy)."""
        return dataclasses.replace(self, encodings=tuple(e for e in self.encodings
                                                         if e not in encodings))


@dataclass
class MigrationConfig:
    """Everything one migration is told. Times are in the unit their name says."""

    mode: str = "precopy"
    """precopy | postcopy | hybrid (pre-copy rounds, then post-copy)."""

    max_downtime_ms: float = 300.0
    """Largest acceptable stop-to-resume time; pre-copy switches over once the
    expected downtime is at most this. (The *measured* stop is
    ``MigrationStats.downtime_ms``.) Its name in the dict form, as on the
    command line and in the library's ``migrate()``, is ``downtime_ms``."""

    max_bandwidth_bps: float | None = None
    """Cap on the page stream in bytes/s; None = unlimited. Text such as
    "100MiB/s" is parsed (:func:`parse_max_bandwidth`)."""

    auto_converge: bool = False
    """Throttle the vCPUs when pre-copy does not converge."""

    throttle_initial_pct: float = 20.0
    """First throttle level applied by auto-converge (share of vCPU time taken)."""

    throttle_increment_pct: float = 10.0
    """Added to the throttle at each further non-converging round."""

    throttle_max_pct: float = 99.0
    """Throttle ceiling."""

    max_rounds: int = 30
    """Pre-copy rounds before giving up (or switching to post-copy in hybrid)."""

    max_total_s: float | None = None
    """Wall-time budget of the pre-copy phase; None = no limit."""

    hybrid_postcopy_after_rounds: int | None = None
    """Hybrid: switch to post-copy after this many rounds even if converging
    looks possible; None = only when not converging or at max_rounds."""

    codec: CodecConfig = field(default_factory=CodecConfig)
    """Page codec settings (encodings, caches)."""

    batch_bytes: int = 1 << 20
    """Upper bound of one encoded page batch on the wire."""

    verify: str = "sent"
    """The source's choice. "sent": compare digests of the per-page hashes kept
    while pages were sent/landed (cheap); "full": rehash all memory on both
    sides at switchover (costs ~100 ms of downtime per GiB; for tests and
    paranoia). A destination follows the kind of digest the source sends."""

    handshake_timeout_s: float = 10.0
    """Time allowed for connection and capability negotiation."""

    switchover_timeout_s: float = 30.0
    """Time allowed from pausing the source to the destination's digest verdict."""

    ack_timeout_s: float = 30.0
    """Time the source waits for the final acknowledgement before resuming."""

    idle_timeout_s: float = 60.0
    """Destination: how long an accepted pre-copy migration may receive no
    byte at all before it is given up (the copy here is discarded and its
    memory freed; the source resumes its VM). A slow link is not idle: any
    byte received restarts the clock."""

    postcopy_zero_round: bool = True
    """Post-copy mode: before pausing, send one round of the pages that are
    zero (run table only, no data) so the guest never faults on them."""

    postcopy_recovery_timeout_s: float = 30.0
    """How long either side waits for a broken post-copy connection to be
    re-established before giving up (the destination then stops the VM)."""

    precopy_resume_timeout_s: float = 60.0
    """How long a link break during the pre-copy rounds may last: the source
    keeps its VM running and reconnects (same session id, with backoff) for
    up to this long, then fails as without resume (VM running here); the
    destination holds the partial copy as long before it frees it. 0 turns
    resumable pre-copy off (a break fails the migration at once). Needs the
    peer's "resume-precopy" capability; see docs/protocol.md."""

    native_urgent: bool = True
    """Post-copy: serve the urgent (fault) channel from native threads on both
    sides when the host allows (libxxhash loadable, no TLS on the channel);
    False keeps it on the event loop. LIVEMIG_NATIVE_URGENT=0 in the
    environment also forces the event-loop path (see docs/postcopy.md)."""

    urgent_cpu: int = -1
    """CPU the native urgent thread is pinned to; -1 leaves it to the scheduler."""

    urgent_spin_us: int = 0
    """Native urgent thread: after each activity, poll without sleeping this
    long before blocking (trades CPU for wake-up latency); 0 = never spin."""

    urgent_rt_priority: int = 1
    """Native urgent threads run SCHED_FIFO at this priority (1..99; 0 =
    normal scheduling), so a blocked vCPU's page is served without waiting
    for a CPU slice. Hosts that refuse (no CAP_SYS_NICE) run them normally;
    the stats say which (``fault_path_reason``)."""

    streams: int = field(default_factory=default_streams)
    """Pre-copy: bulk page streams, each its own connection served by a native
    thread on both sides (1..MAX_STREAMS; default one per available CPU, at
    most DEFAULT_MAX_STREAMS). 0 keeps pages on the Python path. Used only
    where both peers and the link allow it (wire version 2, no TLS, no
    bandwidth cap); ``MigrationStats.data_path`` says which path ran and why.
    LIVEMIG_NATIVE_STREAMS=0 in the environment also forces the Python path."""

    postcopy_push_streams: bool = True
    """Post-copy and hybrid: push the owed pages after the switchover on
    native streams (as many as ``streams``, each a connection of its own with
    a C thread on both sides) instead of the event loop's bulk channel, where
    both peers can (same conditions as ``streams``). ``MigrationStats.push_path``
    says which path pushed and why."""

    def __post_init__(self) -> None:
        if isinstance(self.streams, bool) or not isinstance(self.streams, int) \
                or not 0 <= self.streams <= MAX_STREAMS:
            raise ConfigError(f"streams must be an int in 0..{MAX_STREAMS}, got {self.streams!r}")
        if not isinstance(self.urgent_rt_priority, int) or not 0 <= self.urgent_rt_priority <= 99:
            raise ConfigError(f"urgent_rt_priority must be an int in 0..99, "
                              f"got {self.urgent_rt_priority!r}")
        if not isinstance(self.urgent_spin_us, int) or not 0 <= self.urgent_spin_us <= 100_000:
            raise ConfigError(f"urgent_spin_us must be an int in 0..100000, "
                              f"got {self.urgent_spin_us!r}")
        if not isinstance(self.urgent_cpu, int) or self.urgent_cpu < -1:
            raise ConfigError(f"urgent_cpu must be -1 or a CPU number, got {self.urgent_cpu!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        _positive("max_downtime_ms", self.max_downtime_ms)
        self.max_bandwidth_bps = parse_max_bandwidth(self.max_bandwidth_bps)
        for name in ("throttle_initial_pct", "throttle_increment_pct", "throttle_max_pct"):
            _pct(name, getattr(self, name))
        if self.throttle_initial_pct > self.throttle_max_pct:
            raise ConfigError("throttle_initial_pct must not exceed throttle_max_pct")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise ConfigError(f"max_rounds must be an integer >= 1, got {self.max_rounds!r}")
        if self.max_total_s is not None:
            _positive("max_total_s", self.max_total_s)
        if self.hybrid_postcopy_after_rounds is not None:
            if not isinstance(self.hybrid_postcopy_after_rounds, int) \
                    or self.hybrid_postcopy_after_rounds < 0:
                raise ConfigError("hybrid_postcopy_after_rounds must be an integer >= 0")
            if self.mode != "hybrid":
                raise ConfigError("hybrid_postcopy_after_rounds needs mode='hybrid'")
        if not isinstance(self.codec, CodecConfig):
            raise ConfigError("codec must be a CodecConfig")
        if self.batch_bytes < 64 << 10:
            raise ConfigError(f"batch_bytes must be at least 64 KiB, got {self.batch_bytes}")
        for name in ("handshake_timeout_s", "switchover_timeout_s", "ack_timeout_s",
                     "idle_timeout_s", "postcopy_recovery_timeout_s"):
            _positive(name, getattr(self, name))
        if self.precopy_resume_timeout_s < 0:
            raise ConfigError("precopy_resume_timeout_s must be 0 (off) or positive, got "
                              f"{self.precopy_resume_timeout_s}")

    @property
    def codec_for_mode(self) -> CodecConfig:
        """The codec config for a post-copy migration: no DELTA (the receiver
        lacks the pages) and no DUP (the running guest may rewrite the source
        page at the receiver before the DUP is resolved)."""
        return self.codec.without("delta", "block", "dup") if self.mode == "postcopy" else self.codec

    # -- dict form (CLI, daemon, JSON) -----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["codec"]["encodings"] = list(self.codec.encodings)
        return {_DICT_NAMES.get(k, k): v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MigrationConfig":
        """Build from a dict; sizes/rates may be text; unknown keys are errors."""
        data = _by_field(cls, data, "migration")
        if "batch_bytes" in data:
            data["batch_bytes"] = parse_size(data["batch_bytes"], what="batch_bytes")
        codec = data.get("codec")
        if isinstance(codec, dict):
            data["codec"] = codec_config_from_dict(codec)
        return cls(**data)


_DICT_NAMES = {"max_downtime_ms": "downtime_ms"}
"""Fields whose dict-form name differs: the names users write on the command
line, to the control socket and in JSON stay as they always were."""


def _by_field(cls, data: dict[str, Any], what: str) -> dict[str, Any]:
    """``data`` (dict-form names) keyed by the field names of ``cls``; a key
    that names no field is an error."""
    field_of = {_DICT_NAMES.get(f.name, f.name): f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - set(field_of)
    if unknown:
        raise ConfigError(f"unknown {what} option(s): {sorted(unknown)}")
    return {field_of[k]: v for k, v in data.items()}


def codec_config_from_dict(data: dict[str, Any]) -> CodecConfig:
    data = _by_field(CodecConfig, data, "codec")
    if "delta_cache_bytes" in data:
        data["delta_cache_bytes"] = parse_size(data["delta_cache_bytes"], what="delta_cache_bytes")
    if "encodings" in data:
        data["encodings"] = tuple(data["encodings"])
    return CodecConfig(**data)


__all__ = ["CodecConfig", "MigrationConfig", "codec_config_from_dict", "parse_max_bandwidth",
           "MODES", "ENCODINGS", "VERIFY_MODES"]
