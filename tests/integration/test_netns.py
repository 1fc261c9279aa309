"""Two emulated hosts: namespaces, veth, tc shaping, delay, cleanup, error messages.

Traffic stays between the two namespaces' own addresses and is bounded in bytes
and time. Shaping checks measure a real TCP transfer across the link.
"""
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from livemig.lab import netns
from livemig.errors import CommandError, LinkUnavailable

OK, WHY = netns.available()
needs_netns = pytest.mark.skipif(not OK, reason=f"two-host link unavailable: {WHY}")
DELAY_OK, DELAY_WHY = netns.available(need_delay=True)
needs_delay = pytest.mark.skipif(not DELAY_OK, reason=f"link delay unavailable: {DELAY_WHY}")

PREFIX = "lmtest"


def ours():
    return [ns for ns in netns.list_namespaces() if ns.startswith(PREFIX + "-")]


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    if OK:
        assert ours() == [], "a test left namespaces behind"


# ---------------------------------------------------------------- no privileges needed


def test_command_error_names_command_exit_code_and_stderr():
    with pytest.raises(CommandError) as info:
        netns.run([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"])
    err = info.value
    assert err.returncode == 3 and err.stderr == "boom"
    assert sys.executable in str(err) and "exit code 3" in str(err) and "boom" in str(err)


def test_command_error_for_missing_program_and_timeout():
    with pytest.raises(CommandError, match="exit code 127.*not found"):
        netns.run(["/nonexistent/lm-no-such-tool", "x"])
    with pytest.raises(CommandError, match="no exit code: timed out after 0.2 s") as info:
        netns.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout_s=0.2)
    assert info.value.returncode is None


def test_run_returns_failures_when_not_checking():
    res = netns.run([sys.executable, "-c", "raise SystemExit(2)"], check=False)
    assert res.returncode == 2


def test_available_gives_a_reason_when_it_says_no():
    ok, why = netns.available()
    assert isinstance(ok, bool) and isinstance(why, str)
    assert ok == (why == "")
    s = netns.probe()
    assert s.rate_reason and s.delay_reason
    assert s.delay_method in ("netem", "delay-line", None)


@given(rate_bps=st.floats(1e5, 1e11), delay_ms=st.floats(0, 500))
def test_tbf_params_hold_a_tick_a_gso_segment_and_the_bdp(rate_bps, delay_ms):
    p = netns.tbf_params(rate_bps, delay_ms, hz=250)
    rate_bytes = rate_bps / 8
    assert p.burst_bytes >= rate_bytes / 250 and p.burst_bytes >= 2 * 65536
    assert p.limit_bytes >= p.burst_bytes + rate_bytes * delay_ms / 1000
    assert netns.netem_limit_packets(rate_bps, delay_ms) * 1500 >= rate_bytes * delay_ms / 1000


def test_bad_arguments_are_refused_before_touching_the_system():
    with pytest.raises(ValueError):
        netns.TwoHosts(rate_bps=0, prefix=PREFIX)
    with pytest.raises(ValueError):
        netns.TwoHosts(delay_ms=-1, prefix=PREFIX)
    with pytest.raises(ValueError):
        netns.TwoHosts(prefix="bad/prefix")


# ---------------------------------------------------------------- real namespaces


def addresses(ns):
    return netns.run(["ip", "-n", ns, "-o", "addr", "show"]).stdout.decode()


@needs_netns
def test_setup_and_teardown_leave_nothing_behind():
    with netns.TwoHosts(prefix=PREFIX) as h:
        assert set(ours()) == {h.ns_source, h.ns_dest}
        assert h.source_addr + "/30" in addresses(h.ns_source)
        assert h.dest_addr + "/30" in addresses(h.ns_dest)
        assert "127.0.0.1" in addresses(h.ns_dest)  # lo is up
        out = netns.run(h.exec_argv(h.ns_source, ["ip", "-o", "link", "show", "veth0"]))
        assert b"state UP" in out.stdout or b"LOWER_UP" in out.stdout
        m = netns.measure_link(h, max_bytes=1 << 20, max_time_s=1.0, pings=3)
        assert m.nbytes == 1 << 20 and len(m.rtt_ms) == 3
    assert ours() == []
    h.close()  # idempotent


@needs_netns
def test_exception_inside_the_block_still_cleans_up():
    with pytest.raises(KeyError):
        with netns.TwoHosts(rate_bps=100e6, prefix=PREFIX) as h:
            proc = h.popen(h.ns_dest, ["sleep", "30"])
            raise KeyError("boom")
    assert proc.poll() is not None, "close() must end processes started with popen"
    assert ours() == []


@needs_netns
def test_failed_construction_removes_what_it_created(monkeypatch):
    def broken(ns, dev, rate_bps, delay_ms):
        return [["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "bogus"]]

    monkeypatch.setattr(netns, "shaping_commands", broken)
    with pytest.raises(CommandError, match=r"`tc -n lmtest-.* tbf rate bogus` failed"):
        netns.TwoHosts(rate_bps=1e6, prefix=PREFIX)
    assert ours() == []


@needs_netns
def test_rate_of_200_mbit_is_measured_within_25_percent():
    with netns.TwoHosts(rate_bps=200e6, prefix=PREFIX) as h:
        m = netns.measure_link(h, max_bytes=30_000_000, max_time_s=1.5)
    assert 150e6 <= m.bits_per_s <= 250e6, f"measured {m.bits_per_s / 1e6:.1f} Mbit/s"


@needs_netns
@needs_delay
def test_delay_of_20_ms_shows_as_a_40_ms_round_trip():
    with netns.TwoHosts(rate_bps=200e6, delay_ms=20, prefix=PREFIX) as h:
        m = netns.measure_link(h, max_bytes=1 << 20, max_time_s=1.0, pings=7)
    assert 38.0 <= m.rtt_ms_median <= 55.0, f"RTT {m.rtt_ms}"


@needs_netns
@needs_delay
def test_set_link_reshapes_rate_and_delay_on_the_fly():
    with netns.TwoHosts(rate_bps=200e6, delay_ms=20, prefix=PREFIX) as h:
        h.set_link(50e6, 2)
        assert (h.rate_bps, h.delay_ms) == (50e6, 2)
        m = netns.measure_link(h, max_bytes=8_000_000, max_time_s=1.2, pings=5)
        assert 37.5e6 <= m.bits_per_s <= 62.5e6, f"measured {m.bits_per_s / 1e6:.1f} Mbit/s"
        assert 3.5 <= m.rtt_ms_median <= 15.0, f"RTT {m.rtt_ms}"
        h.set_link(None, 0)
        m = netns.measure_link(h, max_bytes=30_000_000, max_time_s=1.0, pings=5)
        assert m.bits_per_s > 400e6, f"unshaped link measured {m.bits_per_s / 1e6:.1f} Mbit/s"
        assert m.rtt_ms_median < 5.0


@needs_netns
def test_delay_on_a_link_built_without_one():
    with netns.TwoHosts(rate_bps=100e6, prefix=PREFIX) as h:
        if netns.probe().delay_method == "netem":
            h.set_link(100e6, 5)
            m = netns.measure_link(h, max_bytes=1 << 20, pings=5)
            assert m.rtt_ms_median >= 9.0
        else:
            with pytest.raises(LinkUnavailable, match="build TwoHosts with delay_ms > 0|netem"):
                h.set_link(100e6, 5)
            assert h.delay_ms == 0


@needs_netns
def test_cleanup_stale_removes_only_namespaces_of_dead_creators():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f"{PREFIX}-{dead.pid}-0-src", f"{PREFIX}-{dead.pid}-0-wire",
             f"lmprobe-{dead.pid}-3"]
    live = f"{PREFIX}-1-0-dst"  # pid 1 is always alive
    other = f"{PREFIX}x-{dead.pid}-0-src"  # another prefix: not ours to touch
    try:
        for ns in stale + [live, other]:
            netns.run(["ip", "netns", "add", ns])
        # Another test's cleanup may remove the dead pid's probe first.
        assert set(stale[:2]) <= set(netns.cleanup_stale(PREFIX)) <= set(stale)
        left = netns.list_namespaces()
        assert live in left and other in left and not set(stale) & set(left)
    finally:
        for ns in stale + [live, other]:
            netns.run(["ip", "netns", "del", ns], check=False)
