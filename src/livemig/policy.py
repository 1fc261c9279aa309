"""Convergence policy: what to do after each pre-copy round.

A pure function of the round history (no clock: elapsed time is passed in),
so every decision can be replayed from recorded statistics and tested on
synthetic histories.

The model. Round 0 sends all of memory; each later round sends the pages
dirtied while the previous one was in flight. With bandwidth B (bytes/s,
measured on the wire) and a dirty rate R (bytes/s of distinct pages), a round
of d bytes takes d/B and leaves ~R·d/B dirty bytes, so the dirty set shrinks
by the factor R/B per round: pre-copy converges only when R < B. We stop and
switch over once the *expected downtime* — the last dirty set, scaled by the
wire's measured compression ratio, over B, plus a fixed switchover cost
(pause, CPU/device state, digest, resume) — fits the limit.

The smallest stop. Fitting the limit is when pre-copy *may* stop, not when
it must: while rounds are cheap and each one still shrinks the dirty set, one
more round makes the stop smaller at little cost. So once the expected
downtime first fits, pre-copy goes on ("polishing") and stops at the first of:
the transfer part of the stop is negligible (``NEGLIGIBLE_STOP_MS``); the
last round did not shrink the dirty set by ``MIN_SHRINK`` (the dirty rate
allows no smaller stop); ``POLISH_MAX_ROUNDS`` extra rounds; the time budget,
``POLISH_SHARE`` of the pre-copy time up to the first fit (at least
``POLISH_MIN_S``), would be exceeded by the next round (whose cost is the
expected transfer time of the dirty set); max_rounds or max_total_s. Every
decision says which, so the decision log explains each stop.

When it does not converge — the dirty set failed to shrink by
``MIN_SHRINK`` over the last two rounds, or R ≥ B — the mode decides:
pre-copy with auto-converge throttles the vCPUs (initial, then +increment
per round, up to the max: QEMU's cpu-throttle-initial/-increment scheme),
hybrid switches to post-copy, plain pre-copy carries on until max_rounds or
max_total_s and gives up (the source keeps running the VM).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Sequence

from .config import MigrationConfig
from .units import PAGE_SIZE, finite_or_none, format_mib_per_s

MIN_SHRINK = 0.10
"""Over two rounds the dirty set must shrink by at least this share."""
SWITCHOVER_COST_MS = 5.0
"""Fixed part of the downtime: pause, CPU/device state, digest check, resume."""
NEGLIGIBLE_STOP_MS = 0.5
"""A stop whose dirty pages take at most this long to send cannot usefully shrink."""
POLISH_MAX_ROUNDS = 8
"""Most rounds run after the expected downtime first fits the limit."""
POLISH_SHARE = 0.25
"""Those rounds may take at most this share of the pre-copy time up to the first fit ..."""
POLISH_MIN_S = 0.05
"""... or this long, whichever is more (a small guest's whole pre-copy is brief)."""


class Action(enum.Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    THROTTLE = "throttle"
    POSTCOPY = "postcopy"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class RoundStats:
    """What one round did, as the policy needs it."""

    index: int
    duration_s: float
    pages_sent: int
    bytes_sent: int
    """Wire bytes of the page batches of the round."""
    dirty_pages: int
    """Pages found dirty at the end of the round: the next round's work."""
    zero_pages: int = 0
    """Pages of the round sent as ZERO (nearly free: excluded from the page rate)."""

    @property
    def bandwidth_bps(self) -> float:
        return self.bytes_sent / self.duration_s if self.duration_s > 0 else math.inf

    @property
    def dirty_bytes(self) -> int:
        return self.dirty_pages * PAGE_SIZE

    @property
    def dirty_rate_bps(self) -> float:
        return self.dirty_bytes / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def wire_ratio(self) -> float:
        """Wire bytes per page byte (below 1 when the codec compresses)."""
        return self.bytes_sent / (self.pages_sent * PAGE_SIZE) if self.pages_sent else 1.0


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    expected_downtime_ms: float
    bandwidth_bps: float
    dirty_rate_bps: float
    throttle_pct: float = 0.0
    """The throttle to apply from now on (THROTTLE), else the current one."""

    def to_dict(self) -> dict:
        return {"action": self.action.value, "reason": self.reason,
                "expected_downtime_ms": finite_or_none(self.expected_downtime_ms),
                "bandwidth_bps": finite_or_none(self.bandwidth_bps),
                "dirty_rate_bps": self.dirty_rate_bps, "throttle_pct": self.throttle_pct}


def measured_bandwidth(rounds: Sequence[RoundStats], window: int = 2) -> float:
    """Bytes/s over the last ``window`` rounds (bytes summed over time summed)."""
    recent = rounds[-window:]
    t = sum(r.duration_s for r in recent)
    b = sum(r.bytes_sent for r in recent)
    return b / t if t > 0 else math.inf


def measured_page_rate(rounds: Sequence[RoundStats], window: int = 2) -> float:
    """Non-zero pages per second over the last ``window`` rounds: what one page
    really costs end to end (encode, link, apply), whatever the codec made of
    its bytes."""
    recent = rounds[-window:]
    t = sum(r.duration_s for r in recent)
    n = sum(max(0, r.pages_sent - r.zero_pages) for r in recent)
    return n / t if t > 0 and n > 0 else math.inf


def expected_downtime_ms(rounds: Sequence[RoundStats], bandwidth_bps: float,
                         switchover_cost_ms: float = SWITCHOVER_COST_MS) -> float:
    """Time to send the last round's dirty pages with the guest stopped, by two
    models, whichever is slower: wire bytes over the measured bandwidth (a
    link-bound migration), and pages over the measured page rate (a CPU-bound
    one: compressed pages are few bytes but still cost their encode and apply)."""
    last = rounds[-1]
    wire_bytes = last.dirty_bytes * min(1.0, last.wire_ratio)
    if wire_bytes == 0:
        return switchover_cost_ms
    if bandwidth_bps <= 0:
        return math.inf
    by_bytes_ms = wire_bytes / bandwidth_bps * 1000.0
    by_pages_ms = last.dirty_pages / measured_page_rate(rounds) * 1000.0
    return max(by_bytes_ms, by_pages_ms) + switchover_cost_ms


def is_converging(rounds: Sequence[RoundStats], bandwidth_bps: float) -> tuple[bool, str]:
    """False (with the reason) when the last two rounds show no convergence."""
    if len(rounds) < 3:
        return True, "too few rounds to judge"
    now, before = rounds[-1].dirty_pages, rounds[-3].dirty_pages
    if now > (1.0 - MIN_SHRINK) * before:
        return False, (f"dirty set went from {before} to {now} pages over two rounds "
                       f"(less than {MIN_SHRINK:.0%} smaller)")
    rate = rounds[-1].dirty_rate_bps
    if rate >= bandwidth_bps:
        return False, (f"dirty rate {format_mib_per_s(rate)} is at least the bandwidth "
                       f"{format_mib_per_s(bandwidth_bps)}")
    return True, "dirty set shrinking"


def _first_fit(config: MigrationConfig, rounds: Sequence[RoundStats],
               switchover_cost_ms: float) -> int:
    """Index of the first round after which the expected downtime fit the limit."""
    for i in range(len(rounds)):
        head = rounds[:i + 1]
        if expected_downtime_ms(head, measured_bandwidth(head),
                                switchover_cost_ms) <= config.max_downtime_ms:
            return i
    return len(rounds) - 1


def polish_or_stop(config: MigrationConfig, rounds: Sequence[RoundStats], downtime_ms: float,
                   switchover_cost_ms: float = SWITCHOVER_COST_MS, *,
                   elapsed_s: float) -> tuple[bool, str]:
    """With the expected downtime within the limit: (True, why) to run one
    more round for a smaller stop, (False, why) to stop now (module docstring,
    "The smallest stop")."""
    last = rounds[-1]
    transfer_ms = max(0.0, downtime_ms - switchover_cost_ms)
    if transfer_ms <= NEGLIGIBLE_STOP_MS:
        return False, f"its pages take {transfer_ms:.2f} ms: no smaller stop to gain"
    if last.dirty_pages > (1.0 - MIN_SHRINK) * last.pages_sent:
        return False, (f"the dirty set no longer shrinks ({last.pages_sent} pages sent, "
                       f"{last.dirty_pages} dirtied meanwhile): the smallest stop the dirty "
                       "rate allows")
    if len(rounds) >= config.max_rounds:
        return False, f"{len(rounds)} rounds reached the limit of {config.max_rounds}"
    fit = _first_fit(config, rounds, switchover_cost_ms)
    extra = len(rounds) - 1 - fit
    if extra >= POLISH_MAX_ROUNDS:
        return False, f"{extra} rounds run since it first fit (at most {POLISH_MAX_ROUNDS})"
    budget_s = max(POLISH_MIN_S, POLISH_SHARE * sum(r.duration_s for r in rounds[:fit + 1]))
    spent_s = sum(r.duration_s for r in rounds[fit + 1:])
    next_s = transfer_ms / 1000.0
    if spent_s + next_s > budget_s:
        return False, (f"another round (~{next_s * 1e3:.1f} ms) would pass the budget of "
                       f"{budget_s * 1e3:.0f} ms for shrinking the stop "
                       f"({spent_s * 1e3:.0f} ms spent)")
    if config.max_total_s is not None and elapsed_s + next_s >= config.max_total_s:
        return False, f"another round would pass the {config.max_total_s:g} s limit"
    return True, (f"the dirty set still shrinks ({last.pages_sent} → {last.dirty_pages} pages) "
                  f"and a round costs ~{next_s * 1e3:.1f} ms: one more round for a smaller "
                  f"stop ({extra + 1} of at most {POLISH_MAX_ROUNDS}, "
                  f"{spent_s * 1e3:.0f} of {budget_s * 1e3:.0f} ms spent)")


def decide(config: MigrationConfig, rounds: Sequence[RoundStats], *, elapsed_s: float,
           throttle_pct: float = 0.0, postcopy_requested: bool = False,
           switchover_cost_ms: float = SWITCHOVER_COST_MS) -> Decision:
    """The action after the last round in ``rounds`` (elapsed_s since the start)."""
    if config.mode == "postcopy":
        return Decision(Action.POSTCOPY, "post-copy mode: switch over at once",
                        math.nan, math.nan, 0.0, throttle_pct)
    if not rounds:
        return Decision(Action.CONTINUE, "no round finished yet", math.inf, math.nan, 0.0,
                        throttle_pct)
    bw = measured_bandwidth(rounds)
    rate = rounds[-1].dirty_rate_bps
    downtime = expected_downtime_ms(rounds, bw, switchover_cost_ms)

    def make(action: Action, reason: str, pct: float = throttle_pct) -> Decision:
        return Decision(action, reason, downtime, bw, rate, pct)

    if downtime <= config.max_downtime_ms:
        polish, why = polish_or_stop(config, rounds, downtime, switchover_cost_ms,
                                     elapsed_s=elapsed_s)
        fits = (f"expected downtime {downtime:.1f} ms is within the "
                f"{config.max_downtime_ms:g} ms limit")
        return make(Action.CONTINUE if polish else Action.SWITCHOVER, f"{fits}; {why}")
    hybrid = config.mode == "hybrid"
    if hybrid and postcopy_requested:
        return make(Action.POSTCOPY, "post-copy requested")
    out_of_rounds = len(rounds) >= config.max_rounds
    out_of_time = config.max_total_s is not None and elapsed_s >= config.max_total_s
    limit = (f"{len(rounds)} rounds reached the limit of {config.max_rounds}" if out_of_rounds
             else f"{elapsed_s:.1f} s reached the limit of {config.max_total_s:g} s"
             if out_of_time else "")
    converging, why = is_converging(rounds, bw)
    if hybrid:
        after = config.hybrid_postcopy_after_rounds
        if after is not None and len(rounds) >= after:
            return make(Action.POSTCOPY, f"{len(rounds)} pre-copy rounds done (switch after {after})")
        if not converging:
            return make(Action.POSTCOPY, f"not converging: {why}")
        if limit:
            return make(Action.POSTCOPY, limit)
        return make(Action.CONTINUE, f"expected downtime {downtime:.1f} ms; {why}")
    if limit:
        return make(Action.GIVE_UP, f"{limit}; expected downtime still {downtime:.1f} ms")
    if not converging and config.auto_converge:
        if throttle_pct <= 0:
            pct = config.throttle_initial_pct
        else:
            pct = min(config.throttle_max_pct, throttle_pct + config.throttle_increment_pct)
        if pct > throttle_pct:
            return make(Action.THROTTLE, f"not converging: {why}; throttle to {pct:g}%", pct)
        return make(Action.CONTINUE, f"not converging at the maximum throttle {pct:g}%: {why}")
    return make(Action.CONTINUE, f"expected downtime {downtime:.1f} ms; {why}")


# -- predictor (livemig plan) ---------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    converges: bool
    rounds: int
    """Pre-copy rounds before switchover (round 0, the full copy, included)."""
    expected_downtime_ms: float
    total_time_s: float
    total_bytes: int
    recommended_mode: str
    reason: str
    round_bytes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"converges": self.converges, "rounds": self.rounds,
                "expected_downtime_ms": finite_or_none(self.expected_downtime_ms),
                "total_time_s": finite_or_none(self.total_time_s),
                "total_bytes": self.total_bytes,
                "recommended_mode": self.recommended_mode, "reason": self.reason,
                "round_bytes": self.round_bytes}


def _precopy_rounds(bandwidth_bps: float, dirty_rate_bps: float, memory_bytes: int,
                    working_set_bytes: int, max_rounds: int):
    """(round, seconds, bytes sent, dirty bytes left) for rounds 1 … max_rounds
    of the model: round 1 sends all of memory, each later one the previous
    one's dirty set, min(working set, rate·t) (pages dirtied twice count once)."""
    to_send = memory_bytes
    for rnd in range(1, max_rounds + 1):
        t = to_send / bandwidth_bps
        dirty = min(working_set_bytes, dirty_rate_bps * t)
        yield rnd, t, to_send, dirty
        to_send = dirty


def predict(bandwidth_bps: float, dirty_rate_bps: float, memory_bytes: int,
            max_downtime_ms: float, *, working_set_bytes: int | None = None,
            max_rounds: int = 30, switchover_cost_ms: float = SWITCHOVER_COST_MS) -> Prediction:
    """Simulate pre-copy rounds under a constant bandwidth and dirty rate."""
    if bandwidth_bps <= 0:
        return Prediction(False, 0, math.inf, math.inf, 0, "postcopy",
                          "no bandwidth", [])
    ws = memory_bytes if working_set_bytes is None else min(working_set_bytes, memory_bytes)
    elapsed = 0.0
    total = 0
    sent_rounds: list[int] = []
    to_send = memory_bytes
    for rnd, t, sent, to_send in _precopy_rounds(bandwidth_bps, dirty_rate_bps, memory_bytes, ws,
                                                 max_rounds):
        elapsed += t
        total += sent
        sent_rounds.append(int(sent))
        downtime = to_send / bandwidth_bps * 1000.0 + switchover_cost_ms
        if downtime <= max_downtime_ms:
            return Prediction(True, rnd, downtime, elapsed + downtime / 1000.0,
                              int(total + to_send), "precopy",
                              f"converges after {rnd} round(s)", sent_rounds)
    downtime = to_send / bandwidth_bps * 1000.0 + switchover_cost_ms
    if dirty_rate_bps >= bandwidth_bps:
        mode, why = "postcopy", (f"dirty rate {format_mib_per_s(dirty_rate_bps)} ≥ bandwidth "
                                 f"{format_mib_per_s(bandwidth_bps)}: pre-copy cannot converge "
                                 "(or throttle the guest with auto-converge)")
    else:
        mode, why = "hybrid", (f"dirty set shrinks too slowly: {downtime:.0f} ms expected "
                               f"downtime after {max_rounds} rounds")
    return Prediction(False, max_rounds, downtime, math.inf, int(total), mode, why, sent_rounds)


def predict_postcopy(bandwidth_bps: float, memory_bytes: int, *,
                     switchover_cost_ms: float = SWITCHOVER_COST_MS) -> Prediction:
    """Post-copy from the start: no pre-copy round; the downtime is the
    switchover alone, then every page crosses once (pushed in the background,
    or pulled by a fault). ``converges`` is False: there is nothing to
    converge, the migration completes as long as the link does; the guest
    runs slowed by remote faults meanwhile, which the model does not price."""
    if bandwidth_bps <= 0:
        return Prediction(False, 0, math.inf, math.inf, 0, "postcopy", "no bandwidth", [])
    total_s = switchover_cost_ms / 1000.0 + memory_bytes / bandwidth_bps
    return Prediction(False, 0, switchover_cost_ms, total_s, memory_bytes, "postcopy",
                      "post-copy: downtime is the switchover alone; every page crosses once",
                      [])


def predict_hybrid(bandwidth_bps: float, dirty_rate_bps: float, memory_bytes: int,
                   max_downtime_ms: float, *, working_set_bytes: int | None = None,
                   max_rounds: int = 30,
                   switchover_cost_ms: float = SWITCHOVER_COST_MS) -> Prediction:
    """Hybrid as :func:`decide` runs it: pre-copy rounds while the dirty set
    shrinks; a pre-copy switchover if the downtime fits; else post-copy of the
    dirty set left once the dirty set stops shrinking by ``MIN_SHRINK`` over
    two rounds, R ≥ B (judged from the third round on), or max_rounds."""
    if bandwidth_bps <= 0:
        return Prediction(False, 0, math.inf, math.inf, 0, "postcopy", "no bandwidth", [])
    ws = memory_bytes if working_set_bytes is None else min(working_set_bytes, memory_bytes)
    elapsed = 0.0
    total = 0
    sent_rounds: list[int] = []
    dirty_after: list[float] = []
    for rnd, t, sent, dirty in _precopy_rounds(bandwidth_bps, dirty_rate_bps, memory_bytes, ws,
                                               max_rounds):
        elapsed += t
        total += sent
        sent_rounds.append(int(sent))
        dirty_after.append(dirty)
        downtime = dirty / bandwidth_bps * 1000.0 + switchover_cost_ms
        if downtime <= max_downtime_ms:
            return Prediction(True, rnd, downtime, elapsed + downtime / 1000.0,
                              int(total + dirty), "precopy",
                              f"converges in pre-copy after {rnd} round(s)", sent_rounds)
        if rnd >= 3 and (dirty > (1.0 - MIN_SHRINK) * dirty_after[-3]
                         or dirty_rate_bps >= bandwidth_bps):
            why = "the dirty set stopped shrinking"
            break
    else:
        why = f"{max_rounds} rounds reached"
    left = dirty_after[-1]
    total_s = elapsed + switchover_cost_ms / 1000.0 + left / bandwidth_bps
    return Prediction(False, len(sent_rounds), switchover_cost_ms, total_s, int(total + left),
                      "hybrid", f"post-copy after {len(sent_rounds)} pre-copy round(s): {why}; "
                      "downtime is the switchover alone", sent_rounds)


__all__ = ["Action", "RoundStats", "Decision", "decide", "predict", "predict_postcopy",
           "predict_hybrid", "Prediction",
           "measured_bandwidth", "measured_page_rate", "expected_downtime_ms", "is_converging",
           "polish_or_stop", "MIN_SHRINK", "SWITCHOVER_COST_MS", "NEGLIGIBLE_STOP_MS",
           "POLISH_MAX_ROUNDS", "POLISH_SHARE", "POLISH_MIN_S"]
