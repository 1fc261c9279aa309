"""The smallest-stop rule of the convergence policy, on synthetic rounds.

Once the expected downtime fits the limit, pre-copy goes on while the dirty
set shrinks and rounds are cheap, and stops at the first of: a negligible
stop, a dirty set that no longer shrinks, POLISH_MAX_ROUNDS extra rounds, the
time budget, max_rounds, max_total_s. Closed loops below feed the policy the
rounds a simple guest model would produce and check that it always stops,
within max_rounds and never above the downtime limit.
"""
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.config import MigrationConfig
from livemig.policy import (NEGLIGIBLE_STOP_MS, POLISH_MAX_ROUNDS, POLISH_MIN_S, POLISH_SHARE,
                            SWITCHOVER_COST_MS, Action, RoundStats, decide)

PAGE = 4096
MIB = 1 << 20


def rounds_of(dirty_pages, *, first_pages=65536, bandwidth_bps=1000 * MIB):
    """Each round sends the previous round's dirty set at ``bandwidth_bps``."""
    rounds, to_send = [], first_pages
    for i, d in enumerate(dirty_pages):
        rounds.append(RoundStats(i, to_send * PAGE / bandwidth_bps, to_send, to_send * PAGE, d))
        to_send = d
    return rounds


def run_loop(cfg, *, first_pages, bandwidth_bps, dirty_pps, floor_pages=0, cap=200):
    """Pre-copy against a guest dirtying ``dirty_pps`` distinct pages/s (at
    least ``floor_pages`` per round, its hot set): the policy's decisions
    until it stops (or ``cap`` rounds, which would be a loop)."""
    rounds, decisions, to_send, elapsed = [], [], first_pages, 0.0
    for i in range(cap):
        duration = max(to_send * PAGE / bandwidth_bps, 1e-6)
        elapsed += duration
        dirty = min(first_pages, max(floor_pages, int(dirty_pps * duration)))
        rounds.append(RoundStats(i, duration, to_send, to_send * PAGE, dirty))
        d = decide(cfg, rounds, elapsed_s=elapsed)
        decisions.append(d)
        if d.action is not Action.CONTINUE:
            return rounds, decisions
        to_send = dirty
    raise AssertionError(f"no stop after {cap} rounds")


def test_shrinking_cheap_rounds_polish_to_a_smaller_stop():
    cfg = MigrationConfig()   # 300 ms limit
    # 256 MiB at 1 GB/s, the guest dirtying 20k pages/s: round 0 leaves ~5k
    # pages (≈ 25 ms, which fits); each round shrinks the set by 12x.
    rounds, decisions = run_loop(cfg, first_pages=65536, bandwidth_bps=1000 * MIB,
                                 dirty_pps=20000)
    first_fit = next(i for i, d in enumerate(decisions) if "within" in d.reason)
    assert first_fit == 0 and decisions[0].action is Action.CONTINUE
    assert "one more round for a smaller stop" in decisions[0].reason
    last = decisions[-1]
    assert last.action is Action.SWITCHOVER
    assert last.expected_downtime_ms - SWITCHOVER_COST_MS <= NEGLIGIBLE_STOP_MS
    assert last.expected_downtime_ms < decisions[0].expected_downtime_ms / 3


def test_a_flat_dirty_set_stops_at_once_when_it_fits():
    cfg = MigrationConfig()
    d = decide(cfg, rounds_of([2000, 2000, 2000]), elapsed_s=1.0)
    assert d.action is Action.SWITCHOVER
    assert "no longer shrinks" in d.reason and "smallest stop the dirty rate allows" in d.reason


def test_a_growing_dirty_set_stops_at_once_when_it_fits():
    cfg = MigrationConfig()
    d = decide(cfg, rounds_of([1000, 3000]), elapsed_s=1.0)
    assert d.action is Action.SWITCHOVER and "no longer shrinks" in d.reason


def test_a_hot_set_floor_stops_where_the_set_stops_shrinking():
    cfg = MigrationConfig()
    rounds, decisions = run_loop(cfg, first_pages=65536, bandwidth_bps=1000 * MIB,
                                 dirty_pps=20000, floor_pages=400)
    assert decisions[-1].action is Action.SWITCHOVER
    assert "no longer shrinks" in decisions[-1].reason
    assert rounds[-1].dirty_pages == 400


def test_expensive_rounds_stop_at_once():
    # A slow link: the dirty set fits (250 ms at 8 MB/s) and shrinks, but a
    # round costs far more than a quarter of the time so far allows.
    cfg = MigrationConfig(max_downtime_ms=300)
    rounds = [RoundStats(0, 0.5, 1000, 1000 * PAGE, 500)]
    d = decide(cfg, rounds, elapsed_s=0.5)
    assert d.action is Action.SWITCHOVER and "budget" in d.reason
    budget_s = max(POLISH_MIN_S, POLISH_SHARE * 0.5)
    assert f"budget of {budget_s * 1e3:.0f} ms" in d.reason


def test_the_budget_is_a_share_of_the_time_until_the_first_fit():
    cfg = MigrationConfig()
    # Round 0 took 4 s (67 MB/s) and left 4000 pages (≈ 250 ms: fits);
    # polishing rounds at the same speed shrink the set by 15% each.
    bw = 65536 * PAGE / 4.0
    rounds = [RoundStats(0, 4.0, 65536, 65536 * PAGE, 4000)]
    assert decide(cfg, rounds, elapsed_s=4.0).action is Action.CONTINUE
    spent, to_send = 0.0, 4000
    for i in range(1, 30):
        duration = to_send * PAGE / bw
        rounds.append(RoundStats(i, duration, to_send, to_send * PAGE, int(to_send * 0.85)))
        spent += duration
        to_send = int(to_send * 0.85)
        d = decide(cfg, rounds, elapsed_s=4.0 + spent)
        if d.action is Action.SWITCHOVER:
            break
    assert d.action is Action.SWITCHOVER and "budget" in d.reason
    assert len(rounds) > 2
    assert spent <= POLISH_SHARE * 4.0 + 1e-9


def test_polishing_respects_max_rounds():
    cfg = MigrationConfig(max_rounds=2)
    rounds, decisions = run_loop(cfg, first_pages=65536, bandwidth_bps=1000 * MIB,
                                 dirty_pps=20000)
    assert len(rounds) == 2 and decisions[-1].action is Action.SWITCHOVER
    assert "limit of 2" in decisions[-1].reason


def test_polishing_respects_max_total_time():
    cfg = MigrationConfig(max_total_s=0.3)
    rounds = rounds_of([5000])
    assert decide(cfg, rounds, elapsed_s=0.1).action is Action.CONTINUE
    d = decide(cfg, rounds, elapsed_s=0.299)
    assert d.action is Action.SWITCHOVER and "0.3 s limit" in d.reason


def test_polishing_stops_after_its_round_limit():
    cfg = MigrationConfig(max_rounds=100)
    # Round 0 took 1 s and left 6000 pages (≈ 92 ms: fits, a 250 ms budget);
    # then cheap rounds at 1 GB/s shrink the set by 20% each.
    rounds = [RoundStats(0, 1.0, 65536, 65536 * PAGE, 6000)]
    to_send = 6000
    for i in range(1, 1 + POLISH_MAX_ROUNDS):
        duration = to_send * PAGE / 1e9
        rounds.append(RoundStats(i, duration, to_send, to_send * PAGE, int(to_send * 0.8)))
        to_send = int(to_send * 0.8)
    d = decide(cfg, rounds, elapsed_s=1.2)
    assert d.action is Action.SWITCHOVER and f"at most {POLISH_MAX_ROUNDS}" in d.reason
    assert decide(cfg, rounds[:-1], elapsed_s=1.2).action is Action.CONTINUE


def test_an_idle_guest_stops_after_one_round():
    d = decide(MigrationConfig(), rounds_of([0]), elapsed_s=0.3)
    assert d.action is Action.SWITCHOVER and "no smaller stop" in d.reason


def test_a_stop_above_the_limit_is_never_polished():
    cfg = MigrationConfig(max_downtime_ms=10)
    d = decide(cfg, rounds_of([20000]), elapsed_s=0.3)
    assert d.action is Action.CONTINUE and "within" not in d.reason


@settings(max_examples=300, deadline=None)
@given(first_pages=st.integers(1, 1 << 18),
       bandwidth_mibs=st.floats(1.0, 4000.0),
       dirty_kpps=st.floats(0.0, 2000.0),
       floor_pages=st.integers(0, 5000),
       max_downtime_ms=st.floats(1.0, 1000.0),
       max_rounds=st.integers(1, 40))
def test_the_loop_always_stops_within_the_limits(first_pages, bandwidth_mibs, dirty_kpps,
                                                 floor_pages, max_downtime_ms, max_rounds):
    cfg = MigrationConfig(max_downtime_ms=max_downtime_ms, max_rounds=max_rounds)
    rounds, decisions = run_loop(cfg, first_pages=first_pages,
                                 bandwidth_bps=bandwidth_mibs * MIB,
                                 dirty_pps=dirty_kpps * 1000, floor_pages=floor_pages,
                                 cap=max_rounds + 1)
    last = decisions[-1]
    assert len(rounds) <= max_rounds
    assert last.action in (Action.SWITCHOVER, Action.GIVE_UP)
    if last.action is Action.SWITCHOVER:
        assert last.expected_downtime_ms <= max_downtime_ms
        assert math.isfinite(last.expected_downtime_ms)
