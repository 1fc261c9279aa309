import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.config import MigrationConfig
from livemig.policy import (SWITCHOVER_COST_MS, Action, RoundStats, decide, predict,
                            predict_hybrid, predict_postcopy)

MIB = 1 << 20
PAGES_1G = (1 << 30) // 4096


def history(dirty_pages, *, bandwidth_bps=100 * MIB, first_pages=PAGES_1G):
    """Rounds where each sends the previous round's dirty set at bandwidth_bps."""
    rounds, to_send = [], first_pages
    for i, d in enumerate(dirty_pages):
        nbytes = to_send * 4096
        rounds.append(RoundStats(i, nbytes / bandwidth_bps, to_send, nbytes, d))
        to_send = d
    return rounds


def test_idle_vm_switches_over_after_one_round():
    d = decide(MigrationConfig(), history([0]), elapsed_s=10.0)
    assert d.action is Action.SWITCHOVER
    assert d.expected_downtime_ms < 300
    assert "within" in d.reason


def test_converging_history_continues_then_switches_over():
    cfg = MigrationConfig(max_downtime_ms=100)
    h = history([20000, 5000, 1000, 1000])
    assert decide(cfg, h[:2], elapsed_s=1).action is Action.CONTINUE
    # 1000 pages at 100 MiB/s ≈ 39 ms + 5 ms fits, but the set still shrinks
    # and a round is cheap: one more round for a smaller stop (test_stop_policy).
    assert decide(cfg, h[:3], elapsed_s=1).action is Action.CONTINUE
    d = decide(cfg, h, elapsed_s=1)
    assert d.action is Action.SWITCHOVER and "no longer shrinks" in d.reason


def test_compression_ratio_shortens_expected_downtime():
    base = history([1000, 1000, 20000])
    # same link, a codec that sends a tenth of the bytes: rounds take a tenth of the time
    squeezed = [RoundStats(r.index, r.duration_s / 10, r.pages_sent, r.bytes_sent // 10,
                           r.dirty_pages) for r in base]
    cfg = MigrationConfig()
    a = decide(cfg, base, elapsed_s=1).expected_downtime_ms
    b = decide(cfg, squeezed, elapsed_s=1).expected_downtime_ms
    assert b == pytest.approx((a - 5.0) / 10 + 5.0)


def test_precopy_without_auto_converge_gives_up_at_max_rounds():
    cfg = MigrationConfig(max_rounds=5)
    h = history([50000] * 5)
    assert decide(cfg, h[:4], elapsed_s=1).action is Action.CONTINUE
    d = decide(cfg, h, elapsed_s=1)
    assert d.action is Action.GIVE_UP and "5 rounds" in d.reason


def test_precopy_gives_up_after_max_total_time():
    cfg = MigrationConfig(max_total_s=60)
    d = decide(cfg, history([50000] * 3), elapsed_s=61)
    assert d.action is Action.GIVE_UP and "61" in d.reason


def test_auto_converge_throttles_20_then_plus_10_up_to_99():
    cfg = MigrationConfig(auto_converge=True, max_rounds=100)
    throttle, seen = 0.0, []
    dirty = [60000, 59000, 58500]
    for i in range(15):
        d = decide(cfg, history(dirty), elapsed_s=i, throttle_pct=throttle)
        if d.action is Action.THROTTLE:
            throttle = d.throttle_pct
            seen.append(throttle)
        dirty.append(58000)
    assert seen[:3] == [20, 30, 40]
    assert max(seen) == 99 and seen[-1] == 99
    d = decide(cfg, history(dirty), elapsed_s=1, throttle_pct=99)
    assert d.action is Action.CONTINUE and "maximum throttle" in d.reason


def test_no_throttle_while_converging():
    cfg = MigrationConfig(auto_converge=True, max_downtime_ms=1)
    d = decide(cfg, history([100000, 50000, 20000]), elapsed_s=1)
    assert d.action is Action.CONTINUE


def test_dirty_rate_above_bandwidth_is_not_converging():
    cfg = MigrationConfig(auto_converge=True, max_downtime_ms=1)
    # shrinking counts, but round durations make the dirty rate exceed bandwidth
    rounds = [RoundStats(0, 10, PAGES_1G, 1 << 30, 90000), RoundStats(1, 0.1, 90000, 1 << 20, 80000),
              RoundStats(2, 0.1, 80000, 1 << 20, 60000)]
    d = decide(cfg, rounds, elapsed_s=1)
    assert d.action is Action.THROTTLE and "dirty rate" in d.reason


def test_hybrid_switches_to_postcopy_when_not_converging():
    cfg = MigrationConfig(mode="hybrid")
    assert decide(cfg, history([50000, 50000]), elapsed_s=1).action is Action.CONTINUE
    d = decide(cfg, history([50000, 50000, 50000]), elapsed_s=1)
    assert d.action is Action.POSTCOPY and "not converging" in d.reason


def test_hybrid_after_n_rounds_and_on_request():
    cfg = MigrationConfig(mode="hybrid", hybrid_postcopy_after_rounds=2)
    assert decide(cfg, history([90000]), elapsed_s=1).action is Action.CONTINUE
    assert decide(cfg, history([90000, 80000]), elapsed_s=1).action is Action.POSTCOPY
    cfg = MigrationConfig(mode="hybrid")
    d = decide(cfg, history([90000]), elapsed_s=1, postcopy_requested=True)
    assert d.action is Action.POSTCOPY and "requested" in d.reason


def test_hybrid_still_switches_over_when_it_fits():
    d = decide(MigrationConfig(mode="hybrid"), history([10]), elapsed_s=1)
    assert d.action is Action.SWITCHOVER


def test_postcopy_mode_goes_postcopy_at_once():
    assert decide(MigrationConfig(mode="postcopy"), [], elapsed_s=0).action is Action.POSTCOPY


def test_decision_to_dict_is_json_safe():
    import json
    d = decide(MigrationConfig(), [], elapsed_s=0)
    json.dumps(d.to_dict())


# -- predictor -------------------------------------------------------------------
def test_predict_idle_vm_one_round():
    p = predict(125e6, 0.0, 1 << 30, 300)
    assert p.converges and p.rounds == 1 and p.recommended_mode == "precopy"
    assert math.isclose(p.total_time_s, (1 << 30) / 125e6 + 0.005, rel_tol=1e-6)


def test_predict_geometric_convergence():
    # R/B = 1/4: dirty bytes shrink 4x per round
    p = predict(400 * MIB, 100 * MIB, 1 << 30, 50)
    assert p.converges and p.rounds > 1
    assert p.round_bytes[1] == pytest.approx(p.round_bytes[0] / 4)


def test_predict_dirty_rate_above_bandwidth_recommends_postcopy():
    p = predict(100 * MIB, 200 * MIB, 1 << 30, 300)
    assert not p.converges and p.recommended_mode == "postcopy"


def test_predict_small_working_set_converges():
    p = predict(1e9, 4e9, 1 << 30, 300, working_set_bytes=64 * MIB)
    assert p.converges


@settings(max_examples=60, deadline=None)
@given(st.floats(1e6, 1e10), st.floats(0, 1e10), st.floats(0, 1e10))
def test_predict_more_dirtying_never_converges_sooner(bw, r1, r2):
    lo, hi = sorted((r1, r2))
    a = predict(bw, lo, 1 << 30, 300)
    b = predict(bw, hi, 1 << 30, 300)
    assert a.converges or not b.converges
    if a.converges and b.converges:
        assert a.rounds <= b.rounds


def test_expected_downtime_counts_page_cost_not_only_wire_bytes():
    """Pages that compress to a few bytes still cost their encode and apply:
    a round of 10 000 such pages that took 0.2 s predicts ~0.2 s for 10 000
    more, however few bytes they made on the wire."""
    from livemig.policy import expected_downtime_ms, measured_page_rate

    rounds = [RoundStats(0, 0.5, 60_000, 1 << 20, 10_000, zero_pages=50_000),
              RoundStats(1, 0.2, 10_000, 100_000, 10_000)]
    assert measured_page_rate(rounds) == (10_000 + 10_000) / 0.7
    bw = 1_100_000 / 0.7
    ms = expected_downtime_ms(rounds, bw, switchover_cost_ms=0)
    by_bytes = 10_000 * 4096 * (100_000 / (10_000 * 4096)) / bw * 1000
    assert ms > 5 * by_bytes
    assert abs(ms - 10_000 / ((20_000) / 0.7) * 1000) < 1e-6


def test_predict_postcopy_downtime_is_the_switchover_and_every_page_crosses_once():
    p = predict_postcopy(100 * MIB, 1 << 30)
    assert p.rounds == 0 and p.expected_downtime_ms == SWITCHOVER_COST_MS
    assert p.total_bytes == 1 << 30
    assert math.isclose(p.total_time_s, 1024 / 100 + SWITCHOVER_COST_MS / 1e3)


def test_predict_hybrid_goes_postcopy_where_precopy_cannot_converge():
    pre = predict(100 * MIB, 200 * MIB, 1 << 30, 300)
    hyb = predict_hybrid(100 * MIB, 200 * MIB, 1 << 30, 300)
    assert not pre.converges and pre.total_time_s == math.inf
    # R >= B is judged from the third round on, as decide() judges it
    assert hyb.rounds == 3 and hyb.expected_downtime_ms == SWITCHOVER_COST_MS
    assert math.isfinite(hyb.total_time_s) and "post-copy after 3" in hyb.reason


def test_predict_hybrid_is_precopy_where_precopy_converges():
    pre = predict(400 * MIB, 100 * MIB, 1 << 30, 50)
    hyb = predict_hybrid(400 * MIB, 100 * MIB, 1 << 30, 50)
    assert hyb.converges and (hyb.rounds, hyb.total_bytes) == (pre.rounds, pre.total_bytes)


def test_predict_reasons_give_rates_in_mib_per_s():
    p = predict(100 * MIB, 200 * MIB, 1 << 30, 300)
    assert "200.0 MiB/s" in p.reason and "100.0 MiB/s" in p.reason and " B/s" not in p.reason
