"""The native bandwidth cap (csrc/channels/lm_pace.c) from Python."""
import pytest

from livemig.errors import LivemigError
from livemig.native.pace import Pace


def test_a_new_pace_is_unlimited_and_counts_nothing():
    pace = Pace()
    assert pace.bandwidth_bps is None
    assert pace.stats() == {"bytes": 0, "waits": 0, "waited_ns": 0}


def test_set_and_lift():
    pace = Pace()
    pace.set(8e6, 2 << 20)
    assert pace.bandwidth_bps == 8e6
    pace.set(None, 2 << 20)
    assert pace.bandwidth_bps is None


@pytest.mark.parametrize("rate, burst", [(-1.0, 1 << 20), (float("inf"), 1 << 20),
                                         (float("nan"), 1 << 20), (1e6, 0)])
def test_bad_caps_are_refused(rate, burst):
    with pytest.raises((LivemigError, ValueError)):
        Pace().set(rate, burst)
