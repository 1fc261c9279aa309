"""A source stream's window of rounds (lm_stream_source_window) over a socketpair.

The destination thread is attached only once the source has sent what its
window allows, so no ack can arrive early: the rounds in flight are exactly
the window, not a matter of timing. The default window is 1 (stop-and-wait),
which is what pre-copy runs with: the engine hands a stream one round and
waits for its ack before the next (engine/source/streams.py send_round).
"""
import errno
import socket

import numpy as np
import pytest

from livemig.codec.digest import PageHashes
from livemig.errors import LivemigError
from livemig.native.memory import GuestMemory
from livemig.native.streams import WINDOW_MAX, DestStream, SourceStream, probe
from support.waiting import wait_for

from test_streams import PAGE, V2, _filled, _wait

OK, WHY = probe()
pytestmark = pytest.mark.skipif(not OK, reason=f"native streams: {WHY}")
ROUND_PAGES = 4      # 16 KiB a round: the most a window holds fits the socket's buffer
NPAGES = (WINDOW_MAX + 2) * ROUND_PAGES


class LatePair:
    """A source thread whose destination thread is attached only on
    :meth:`attach_destination`: until then nothing acknowledges a round."""

    def __init__(self, src_mem, dst_mem):
        self.src_mem, self.dst_mem = src_mem, dst_mem
        self.sent = PageHashes(src_mem.npages)
        self.landed = PageHashes(dst_mem.npages)
        self.held = np.zeros(dst_mem.npages, dtype=bool)
        self.src = SourceStream(src_mem, self.sent.values)
        self.dst = DestStream(dst_mem, self.landed.values, self.held)
        a, self._b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.src.attach_fd(a.detach(), version=V2)

    def attach_destination(self):
        self.dst.attach_fd(self._b.detach(), version=V2)

    def close(self):
        self.src.close()
        self.dst.close()
        self._b.close()


@pytest.fixture
def pair():
    src_mem, dst_mem = _filled(npages=NPAGES), GuestMemory(NPAGES * PAGE)
    p = LatePair(src_mem, dst_mem)
    yield p
    p.close()
    src_mem.close()
    dst_mem.close()


def _rounds(n):
    return [np.arange(k * ROUND_PAGES, (k + 1) * ROUND_PAGES, dtype=np.uint64)
            for k in range(n)]


def _busy(fn):
    with pytest.raises(LivemigError) as info:
        fn()
    assert getattr(info.value, "errno", None) == errno.EBUSY
    assert "queueing a round" in str(info.value), info.value


@pytest.mark.parametrize("window", [2, 3, WINDOW_MAX])
def test_a_window_sends_its_rounds_before_any_ack(pair, window):
    pair.src.set_window(window)
    rounds = _rounds(window)
    for k, pages in enumerate(rounds):
        pair.src.send_round(k, pages)
    # every round sent whole (StreamEnd out) with none acknowledged
    wait_for(f"{window} rounds sent unacknowledged",
             lambda: pair.src.stats()["in_flight_max"] == window)
    assert pair.src.stats()["rounds"] == 0
    _busy(lambda: pair.src.send_round(window, _rounds(window + 1)[-1]))   # the window is full
    pair.attach_destination()
    failure = _wait(pair.src, lambda: pair.src.stats()["rounds"] == window, "every ack")
    assert failure is None, failure
    _wait(pair.dst, lambda: pair.dst.stats()["rounds"] == window, "the destination's rounds")
    n = window * ROUND_PAGES
    assert np.array_equal(pair.dst_mem.pages[:n], pair.src_mem.pages[:n])
    assert pair.held[:n].all() and not pair.held[n:].any()
    assert np.array_equal(pair.landed.values[:n], pair.sent.values[:n])
    counts = pair.src.round_counts()
    assert counts.round == window - 1 and counts.pages == ROUND_PAGES
    st = pair.src.stats()
    assert st["in_flight_max"] == window and st["ack_wait_ns"] > 0


def test_an_ack_frees_a_slot_for_the_next_round(pair):
    pair.src.set_window(2)
    first, second, third, fourth = _rounds(4)
    pair.src.send_round(0, first)
    pair.src.send_round(1, second)
    _busy(lambda: pair.src.send_round(2, third))
    pair.attach_destination()
    assert _wait(pair.src, lambda: pair.src.stats()["rounds"] >= 1, "the first ack") is None
    pair.src.send_round(2, third)
    assert _wait(pair.src, lambda: pair.src.stats()["rounds"] >= 2, "the second ack") is None
    pair.src.send_round(3, fourth)
    assert _wait(pair.src, lambda: pair.src.stats()["rounds"] == 4, "every ack") is None
    assert np.array_equal(pair.dst_mem.pages[:4 * ROUND_PAGES],
                          pair.src_mem.pages[:4 * ROUND_PAGES])
    assert 1 <= pair.src.stats()["in_flight_max"] <= 2


def test_the_default_window_is_stop_and_wait(pair):
    # What pre-copy runs with: a second round is refused until the first is acked.
    first, second = _rounds(2)
    pair.src.send_round(0, first)
    wait_for("the first round sent", lambda: pair.src.stats()["in_flight_max"] == 1)
    _busy(lambda: pair.src.send_round(1, second))
    pair.attach_destination()
    assert _wait(pair.src, lambda: pair.src.stats()["rounds"] == 1, "the first ack") is None
    pair.src.send_round(1, second)
    assert _wait(pair.src, lambda: pair.src.stats()["rounds"] == 2, "the second ack") is None
    assert pair.src.stats()["in_flight_max"] == 1


@pytest.mark.parametrize("rounds", [0, WINDOW_MAX + 1])
def test_a_window_outside_one_to_the_most_is_refused(pair, rounds):
    with pytest.raises(LivemigError) as info:
        pair.src.set_window(rounds)
    assert "window" in str(info.value), info.value
