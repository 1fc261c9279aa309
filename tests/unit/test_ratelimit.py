"""Token bucket arithmetic and its async wrapper, on an injected clock."""
import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.aio.ratelimit import MIN_BURST_BYTES, TokenBucket
from livemig.errors import ConfigError


def test_burst_passes_then_rate_applies():
    b = TokenBucket(1000, 500, now=lambda: 0.0)
    assert b.reserve(500, 0.0) == 0.0
    assert b.reserve(100, 0.0) == pytest.approx(0.1)
    assert b.reserve(0, 0.5) == 0.0          # 0.5 s refilled the 100-byte debt and more


def test_frame_larger_than_burst_passes_and_leaves_debt():
    b = TokenBucket(1000, 100, now=lambda: 0.0)
    assert b.reserve(1100, 0.0) == pytest.approx(1.0)
    assert b.reserve(1, 1.0) == pytest.approx(0.001)


def test_tokens_never_exceed_burst():
    b = TokenBucket(1000, 100, now=lambda: 0.0)
    assert b.reserve(0, 1000.0) == 0.0
    assert b.reserve(200, 1000.0) == pytest.approx(0.1)


def test_invalid_parameters():
    with pytest.raises(ConfigError):
        TokenBucket(0, 100)
    with pytest.raises(ConfigError):
        TokenBucket(10, 0)
    with pytest.raises(ConfigError):
        TokenBucket.for_rate(0, max_frame_bytes=1 << 20)


@pytest.mark.parametrize("frame_bytes, burst_bytes", [
    (1 << 20, 2 << 20),          # two of the largest frames
    (8 << 20, 16 << 20),
    (64 << 10, MIN_BURST_BYTES),  # small frames: the floor
])
def test_for_rate_burst_is_two_frames_at_least_the_floor(frame_bytes, burst_bytes):
    for rate in (1e3, 100e6, 10e9):   # whatever the rate
        b = TokenBucket.for_rate(rate, max_frame_bytes=frame_bytes, now=lambda: 0.0)
        assert b.burst_bytes == burst_bytes and b.rate_bytes_per_s == rate


def test_for_rate_lets_two_frames_through_back_to_back():
    frame = 1 << 20
    b = TokenBucket.for_rate(1000, max_frame_bytes=frame, now=lambda: 0.0)
    assert b.reserve(frame, 0.0) == 0.0 and b.reserve(frame, 0.0) == 0.0
    assert b.reserve(frame, 0.0) == pytest.approx(frame / 1000)


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 10**9), burst=st.integers(1, 10**7),
       sizes=st.lists(st.integers(0, 10**7), min_size=1, max_size=50))
def test_long_run_rate_is_exact(rate, burst, sizes):
    """Sending back to back and waiting as told: elapsed time is exactly what
    the rate demands beyond the burst (never less)."""
    b = TokenBucket(rate, burst, now=lambda: 0.0)
    now = 0.0
    for size in sizes:
        now += b.reserve(size, now)
    expected = max(0.0, (sum(sizes) - burst) / rate)
    assert now == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_consume_sleeps_on_the_injected_clock():
    clock = [0.0]
    slept = []

    async def fake_sleep(delay_s):
        slept.append(delay_s)
        clock[0] += delay_s

    async def main():
        b = TokenBucket(1 << 20, 1 << 20, now=lambda: clock[0], sleep=fake_sleep)
        for _ in range(5):
            await b.consume(1 << 20)
        return b

    b = asyncio.run(main())
    assert clock[0] == pytest.approx(4.0) and len(slept) == 4
    assert b.waited_s == pytest.approx(4.0)
