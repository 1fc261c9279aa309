"""Which link probe ``livemig plan`` trusts, and the rate it reads from it.

Theory of operation
-------------------
A migration moves its pre-copy pages on one of two data paths
(engine/source/streams.py decides): the native bulk streams, or the Python
path on the control channel. Their rates differ by far more than the link's
noise (the control-channel probe was 5-11x off a native-streams migration,
bench/RESULTS.md), so the plan measures the path the migration would take:

* **streams** — when this source would run native streams (no TLS, the
  native library loads, ``streams`` > 0, not pure post-copy) and the
  destination granted the "stream-probe" capability on wire version 2: the
  stream probe (engine/source/streamprobe.py) sends rounds of incompressible
  pages through the migration's own stream threads. Its rate is
  :func:`stream_rate` of the rounds.
* **control** — otherwise: ProbeData frames on the control channel, what the
  Python path gets; the plan says why it fell back (:func:`stream_probe_refusal`).

The predictor (policy.predict) then gets the probe's rate, capped by the
configured ``max_bandwidth_bps`` (plan.predict_for).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..protocol import spec

STREAM_PROBE = spec.STREAM_PROBE_CAPABILITY


def stream_rate(rounds) -> float:
    """Page-batch bytes per second of a stream probe's ``(bytes, seconds)``
    rounds. The first round is left out when later ones exist: it carries
    the streams' start (threads, first TCP windows), which a migration pays
    once and a short probe would spread over every byte."""
    rounds = list(rounds)
    if not rounds:
        return 0.0
    counted = rounds[1:] if len(rounds) > 1 else rounds
    nbytes = sum(b for b, _ in counted)
    seconds = sum(s for _, s in counted)
    return nbytes / seconds if seconds > 0 else float("inf")


def stream_probe_refusal(source_refusal: str | None, *, version: int, capabilities,
                         peer_max_payload_bytes: int, send_frame_bytes: int,
                         tls: bool = False) -> str | None:
    """Why the stream probe cannot run on this control channel, or None.
    ``source_refusal`` is engine.source.streams.refusal() for the config;
    ``tls``: the channel is TLS, so the probe's streams must be too."""
    if source_refusal is not None:
        return source_refusal
    if version < spec.STREAMS_VERSION:
        return f"wire version {version} was negotiated, which has no streams (an older peer)"
    if tls and spec.TLS_STREAMS_CAPABILITY not in capabilities:
        return ("the destination does not run native streams under TLS (an older livemig, or "
                "it cannot here)")
    if STREAM_PROBE not in capabilities:
        return ("the destination does not offer the stream probe (an older livemig, or it "
                "cannot run native streams)")
    if peer_max_payload_bytes < send_frame_bytes:
        return f"the destination accepts frames of at most {peer_max_payload_bytes} bytes"
    return None


@dataclass(frozen=True)
class LinkEstimate:
    """The probe the plan used and what it measured (the plan's ``probe``)."""

    kind: str
    """"streams" (the native bulk streams) or "control" (the control channel)."""
    bytes_per_s: float
    """The rate the predictor gets (before the configured cap)."""
    bytes: int
    duration_s: float
    rtt_ms: float
    rate_limit_bps: float | None
    fallback_reason: str | None = None
    """Why the stream probe did not run (kind "control"), or None."""
    streams: dict | None = None
    """The stream probe's details: rounds, both sides' bytes, time and CPU."""
    control: dict | None = None
    """The control-channel probe's details (frames, sent bytes)."""

    def to_dict(self) -> dict:
        return asdict(self)


def from_stream_run(run, rtt_ms: float, rate_limit_bps: float | None) -> LinkEstimate:
    """A :class:`LinkEstimate` of a stream probe (engine.source.streamprobe.StreamProbeRun)."""
    rate = stream_rate(run.rounds)
    seconds = sum(s for _, s in run.rounds)
    dest_rate = run.dest_bytes / run.dest_duration_s if run.dest_duration_s > 0 else None
    return LinkEstimate(
        "streams", rate, run.bytes, seconds, rtt_ms, rate_limit_bps,
        streams={"nstreams": run.nstreams, "window_bytes": run.window_bytes,
                 "rounds": [list(r) for r in run.rounds], "pages": run.pages,
                 "source_cpu_s": run.source_cpu_s, "dest_pages": run.dest_pages,
                 "dest_bytes": run.dest_bytes, "dest_duration_s": run.dest_duration_s,
                 "dest_bytes_per_s": dest_rate, "dest_cpu_s": run.dest_cpu_s,
                 "pages_by_encoding": dict(run.pages_by_encoding)})


def from_control_probe(probe, fallback_reason: str | None) -> LinkEstimate:
    """A :class:`LinkEstimate` of the control-channel probe (plan.BandwidthProbe)."""
    return LinkEstimate("control", probe.bytes_per_s, probe.bytes, probe.duration_s,
                        probe.rtt_ms, probe.rate_limit_bps, fallback_reason,
                        control={"frames": probe.frames, "sent_bytes": probe.sent_bytes})


__all__ = ["LinkEstimate", "stream_rate", "stream_probe_refusal", "from_stream_run",
           "from_control_probe"]
