import json
import math
import os

import numpy as np
import pytest

from livemig.config import (DEFAULT_MAX_STREAMS, MAX_STREAMS, CodecConfig, MigrationConfig,
                            default_streams, parse_max_bandwidth)
from livemig.errors import ConfigError
from livemig.policy import Action, Decision
from livemig.stats import LatencyHistogram, MigrationStats, RoundRecord, percentiles


def test_defaults_match_the_documented_ones():
    c = MigrationConfig()
    assert (c.mode, c.max_downtime_ms, c.max_bandwidth_bps, c.auto_converge) == ("precopy", 300, None, False)
    assert (c.throttle_initial_pct, c.throttle_increment_pct, c.throttle_max_pct) == (20, 10, 99)
    assert c.max_rounds == 30 and c.codec.delta_cache_bytes == 32 << 20 and c.verify == "sent"


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import livemig.config as mod
    tree = ast.parse(inspect.getsource(mod))
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), \
                    f"{cls.name}.{node.target.id} lacks a docstring"


def test_dict_roundtrip_with_text_units():
    c = MigrationConfig.from_dict({"mode": "hybrid", "max_bandwidth_bps": "1Gbit/s",
                                   "batch_bytes": "256KiB",
                                   "codec": {"delta_cache_bytes": "8MiB", "encodings": ["zero", "lz4"]}})
    assert c.max_bandwidth_bps == 125e6 and c.batch_bytes == 256 << 10
    assert c.codec.encodings == ("zero", "lz4", "raw")
    d = c.to_dict()
    json.dumps(d)
    assert MigrationConfig.from_dict(d) == c


def test_the_limit_is_max_downtime_ms_in_code_and_downtime_ms_in_every_dict_form():
    c = MigrationConfig.from_dict({"downtime_ms": 50})
    assert c.max_downtime_ms == 50
    d = c.to_dict()
    assert d["downtime_ms"] == 50 and "max_downtime_ms" not in d
    assert MigrationConfig.from_dict(d) == c
    with pytest.raises(ConfigError, match="max_downtime_ms"):
        MigrationConfig.from_dict({"max_downtime_ms": 50})   # one name per form


def test_plan_and_sweep_profile_report_the_limit_as_downtime_ms():
    from livemig.analysis.plan import Plan
    from livemig.lab.sweep import PROFILES
    from livemig.policy import predict

    class Measured:
        def to_dict(self):
            return {}

    plan = Plan(1 << 30, 50.0, 1e8, Measured(), Measured(), predict(1e8, 0.0, 1 << 30, 50.0))
    assert plan.to_dict()["downtime_ms"] == 50.0
    profile = PROFILES["tiny"]
    assert profile.to_dict()["downtime_ms"] == profile.max_downtime_ms
    assert "max_downtime_ms" not in profile.to_dict()


@pytest.mark.parametrize("bad", [
    {"mode": "teleport"}, {"downtime_ms": 0}, {"throttle_max_pct": 120},
    {"throttle_initial_pct": 50, "throttle_max_pct": 40}, {"max_rounds": 0},
    {"verify": "maybe"}, {"hybrid_postcopy_after_rounds": 2}, {"nonsense": 1},
    {"batch_bytes": 100}, {"codec": {"encodings": ["zstd"]}}, {"codec": {"lz4_chunk_pages": 0}},
    {"codec": {"nonsense": 1}},
    {"max_bandwidth_bps": "fast"},
])
def test_invalid_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        MigrationConfig.from_dict(bad)


@pytest.mark.parametrize("given, bandwidth_bps", [
    (None, None), ("", None), ("1Gbit/s", 125e6), ("100MiB/s", 100 << 20), (5e6, 5e6),
])
def test_max_bandwidth_has_one_parser_used_by_the_config(given, bandwidth_bps):
    assert parse_max_bandwidth(given) == bandwidth_bps
    assert MigrationConfig(max_bandwidth_bps=given).max_bandwidth_bps == bandwidth_bps
    assert MigrationConfig.from_dict({"max_bandwidth_bps": given}).max_bandwidth_bps \
        == bandwidth_bps


@pytest.mark.parametrize("bad", [0, "0MiB/s", -5, "fast", True])
def test_max_bandwidth_refused_with_the_name_given(bad):
    with pytest.raises(ConfigError, match="--max-bandwidth"):
        parse_max_bandwidth(bad, what="--max-bandwidth")
    with pytest.raises(ConfigError, match="max_bandwidth_bps"):
        MigrationConfig(max_bandwidth_bps=bad)


def test_postcopy_codec_drops_delta_block_and_dup():
    post = MigrationConfig(mode="postcopy").codec_for_mode
    assert not post.enabled("delta") and not post.enabled("dup") and not post.enabled("block")
    assert CodecConfig().without("delta", "dup").encodings == ("zero", "block", "lz4", "raw")


def test_percentiles_exact():
    p = percentiles(range(1, 101))
    assert p["p50"] == pytest.approx(50.5) and p["max"] == 100
    assert math.isnan(percentiles([])["p50"])


def test_histogram_percentiles_within_bucket_error():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(3.5, 1.0, 20000)
    h = LatencyHistogram()
    h.add_many(samples[:10000])
    other = LatencyHistogram()
    other.add_many(samples[10000:])
    h.merge(other)
    assert h.count == 20000 and h.max_us == samples.max()
    for q in (50, 99):
        exact = np.percentile(samples, q)
        assert exact * 0.95 <= h.percentile(q) <= exact * 1.06
    assert LatencyHistogram().to_dict()["p50_us"] is None


def test_migration_stats_to_dict_is_json():
    s = MigrationStats(mode="hybrid", memory_bytes=1 << 30)
    s.set_status("active")
    s.add_round(RoundRecord(0, 2.0, 1000, 4096000, 50))
    s.add_decision(Decision(Action.CONTINUE, "why", math.inf, 1e8, 1e5))
    s.add_decision(Decision(Action.THROTTLE, "why", 400.0, 1e8, 1e5, throttle_pct=20))
    s.fault_latency.add_many([10, 20, 30])
    s.total_time_ms = 2000
    s.bytes_sent = 4096000
    d = json.loads(json.dumps(s.to_dict()))
    assert d["rounds"][0]["dirty_rate_pps"] == 25
    assert d["throttle_pct"] == 20 and d["expected_downtime_ms"] == 400
    assert d["throughput_bps"] == 2048000
    assert d["postcopy"]["fault_latency"]["count"] == 3
    with pytest.raises(ConfigError):
        s.set_status("teleporting")


def test_streams_default_from_cpus_and_bounds():
    assert MigrationConfig().streams == default_streams() == max(
        1, min(DEFAULT_MAX_STREAMS, len(os.sched_getaffinity(0))))
    assert MigrationConfig.from_dict({"streams": 0}).streams == 0
    assert MigrationConfig(streams=MAX_STREAMS).streams == MAX_STREAMS
    for bad in (-1, MAX_STREAMS + 1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="streams"):
            MigrationConfig(streams=bad)
