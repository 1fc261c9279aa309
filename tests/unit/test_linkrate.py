"""analysis/linkrate: which probe plan trusts, and the rate it reads."""
import math

import pytest

from livemig.analysis import linkrate
from livemig.analysis.plan import BandwidthProbe, format_plan
from livemig.engine.source.streamprobe import StreamProbeRun
from livemig.engine.source.streams import refusal
from livemig.config import MigrationConfig

MIB = 1 << 20


def test_stream_rate_leaves_out_the_first_round():
    # The first round pays the streams' start; the later ones are the rate.
    assert linkrate.stream_rate([(4 * MIB, 1.0), (8 * MIB, 0.01), (16 * MIB, 0.02)]) \
        == pytest.approx(24 * MIB / 0.03)


def test_stream_rate_of_one_round_or_none():
    assert linkrate.stream_rate([(8 * MIB, 0.5)]) == 16 * MIB
    assert linkrate.stream_rate([]) == 0.0
    assert math.isinf(linkrate.stream_rate([(1, 0.0)]))


GOOD = dict(version=2, capabilities={"streams", "stream-probe"},
            peer_max_payload_bytes=64 << 20, send_frame_bytes=300_000)


def test_the_stream_probe_runs_when_both_sides_can():
    assert linkrate.stream_probe_refusal(None, **GOOD) is None


@pytest.mark.parametrize("change,reason", [
    (dict(version=1), "wire version 1 was negotiated, which has no streams (an older peer)"),
    (dict(capabilities={"streams"}), "the destination does not offer the stream probe"),
    (dict(peer_max_payload_bytes=1000), "the destination accepts frames of at most 1000 bytes"),
])
def test_each_fallback_says_why(change, reason):
    assert linkrate.stream_probe_refusal(None, **{**GOOD, **change}).startswith(reason)


@pytest.mark.parametrize("config,tls,reason", [
    (MigrationConfig(streams=0), False, "streams=0"),
    (MigrationConfig(streams=2), True, "TLS"),
    (MigrationConfig(streams=2, mode="postcopy"), False, "post-copy"),
])
def test_the_source_refusal_comes_first(config, tls, reason):
    why = linkrate.stream_probe_refusal(refusal(config, tls=tls), **GOOD)
    assert reason in why


def _run(**kw):
    base = dict(nstreams=2, window_bytes=64 * MIB,
                rounds=((4 * MIB, 0.1), (8 * MIB, 0.02), (16 * MIB, 0.04)),
                pages=7168, bytes=28 * MIB, source_cpu_s=0.05, dest_pages=7168,
                dest_bytes=28 * MIB, dest_duration_s=0.2, dest_cpu_s=0.07,
                pages_by_encoding={"raw": 7168, "zero": 0, "lz4": 0, "block": 0})
    return StreamProbeRun(**{**base, **kw})


def test_a_stream_run_becomes_the_estimate_the_predictor_gets():
    est = linkrate.from_stream_run(_run(), rtt_ms=0.1, rate_limit_bps=None)
    assert est.kind == "streams" and est.fallback_reason is None
    assert est.bytes_per_s == pytest.approx(24 * MIB / 0.06)
    assert est.streams["dest_bytes_per_s"] == pytest.approx(28 * MIB / 0.2)
    assert est.duration_s == pytest.approx(0.16)


def test_a_control_probe_carries_its_fallback_reason():
    probe = BandwidthProbe(100 * MIB, 50 * MIB, 50, 0.5, 0.2, 51 * MIB, None)
    est = linkrate.from_control_probe(probe, "native streams disabled by configuration "
                                             "(streams=0)")
    assert est.kind == "control" and est.bytes_per_s == 100 * MIB
    assert est.control == {"frames": 50, "sent_bytes": 51 * MIB}


@pytest.mark.parametrize("est,words", [
    (linkrate.from_stream_run(_run(), 0.1, None), "probe: native streams ×2 (3 rounds"),
    (linkrate.from_control_probe(BandwidthProbe(1e8, 5e7, 50, 0.5, 0.2, 5e7, None), "TLS"),
     "probe: control channel (TLS)"),
])
def test_the_plan_text_names_the_probe(est, words):
    plan = {"probe": est.to_dict(), "memory_bytes": 64 * MIB, "downtime_ms": 300,
            "dirty_rate": {"bytes_per_s": 0, "method": "scan", "window_s": 1.0},
            "prediction": {"converges": True, "reason": "idle", "rounds": 1,
                           "expected_downtime_ms": 1.0, "total_time_s": 0.1,
                           "total_bytes": 64 * MIB, "recommended_mode": "precopy"}}
    assert words in format_plan(plan)
