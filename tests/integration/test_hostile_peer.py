"""A hostile source against a real daemon: memory of failed handshakes and
unwelcomed connections is bounded and released with the connection.

Each test measures the daemon's RSS as a baseline, attacks, lets the peer
go, and waits (generously) for RSS to come back near the baseline. A
bystander VM on the attacked daemon keeps running, and a legitimate
migration into it still completes afterwards.
"""
import socket
import time

from support.daemons import DaemonProcess, start_vm
from support.hostile import frame, hello_body, read_frame, rss_bytes, wait_for_rss_below
from support.oracle import Recipe

# Slack over the baseline: allocator noise, not an attack's worth of memory
# (every attack below would leave hundreds of MiB if its buffers were kept).
RSS_SLACK_BYTES = 24 << 20
ATTACKS = 12
BIG_BYTES = 32 << 20


def _bystander_steps(daemon) -> int:
    return sum(next(v for v in daemon.client.call("vm.list") if v["name"] == "bystander")["steps"])


def _legitimate_migration_completes(src, dst) -> None:
    start_vm(src, "legit", Recipe("16MiB", 1, "uniform", seed=3, dirty_rate="1MiB/s"))
    rec = src.cli_json("migrate", "legit", "--to", dst.address)
    assert rec["status"] == "completed", rec
    assert "legit" in {v["name"] for v in dst.client.call("vm.list")}


def _daemons(tmp_path):
    src = DaemonProcess(tmp_path, "src", "auto")
    dst = DaemonProcess(tmp_path, "dst", "auto")
    try:
        start_vm(dst, "bystander", Recipe("8MiB", 1, "uniform", dirty_rate="64KiB/s"))
    except BaseException:
        src.close()
        dst.close()
        raise
    return src, dst


def test_oversized_hellos_are_refused_on_their_header(tmp_path):
    """Twelve Hellos announcing 32 MiB with a bad caps count: each is refused
    from its header (the handshake cap is 64 KiB), nothing is kept."""
    src, dst = _daemons(tmp_path)
    try:
        baseline = rss_bytes(dst.proc.pid)
        steps = _bystander_steps(dst)
        for _ in range(ATTACKS):
            with socket.create_connection(("127.0.0.1", dst.port)) as s:
                s.settimeout(30)
                body = hello_body(caps_count=60000, pad_bytes=BIG_BYTES)
                try:
                    s.sendall(frame("Hello", 0, body))
                except (ConnectionResetError, BrokenPipeError):
                    pass        # closed on the header, before the payload
                else:
                    answer = read_frame(s)
                    assert answer is None or answer[0] == "Abort", answer
        rss = wait_for_rss_below(dst.proc.pid, baseline + RSS_SLACK_BYTES)
        assert rss <= baseline + RSS_SLACK_BYTES, (baseline >> 20, rss >> 20)
        _legitimate_migration_completes(src, dst)
        assert _bystander_steps(dst) > steps
    finally:
        src.close()
        dst.close()


def test_bad_offers_after_welcome_leave_no_memory_behind(tmp_path):
    """Welcomed, then a 32 MiB MigrationOffer that does not decode: Abort,
    and the payload is freed with the connection (it used to stay reachable
    from the kept error's traceback, 32 MiB per attempt, for good)."""
    src, dst = _daemons(tmp_path)
    try:
        baseline = rss_bytes(dst.proc.pid)
        steps = _bystander_steps(dst)
        for _ in range(ATTACKS):
            with socket.create_connection(("127.0.0.1", dst.port)) as s:
                s.settimeout(30)
                s.sendall(frame("Hello", 0, hello_body()))
                assert read_frame(s)[0] == "Welcome"
                s.sendall(frame("MigrationOffer", 1, b"\xff" * BIG_BYTES))
                answer = read_frame(s)
                assert answer is not None and answer[0] == "Abort", answer
        rss = wait_for_rss_below(dst.proc.pid, baseline + RSS_SLACK_BYTES)
        assert rss <= baseline + RSS_SLACK_BYTES, (baseline >> 20, rss >> 20)
        _legitimate_migration_completes(src, dst)
        assert _bystander_steps(dst) > steps
    finally:
        src.close()
        dst.close()


def test_unwelcomed_connections_are_bounded(tmp_path):
    """A flood of silent connections: past the daemon's bound (64) new ones
    are closed on arrival; once the flood leaves, migrations get in again."""
    src, dst = _daemons(tmp_path)
    flood = []
    try:
        baseline = rss_bytes(dst.proc.pid)
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", dst.port))
            # a Hello header announcing 60 KiB, then silence: held mid-frame
            s.sendall(frame("Hello", 0, hello_body(pad_bytes=60 << 10))[:-1024])
            flood.append(s)
        extra = socket.create_connection(("127.0.0.1", dst.port))
        extra.settimeout(30)
        try:
            assert extra.recv(1) == b""          # closed at once, nothing read
        except ConnectionResetError:
            pass
        finally:
            extra.close()
        assert rss_bytes(dst.proc.pid) <= baseline + 64 * (512 << 10) + RSS_SLACK_BYTES
        for s in flood:
            s.close()
        flood.clear()
        rss = wait_for_rss_below(dst.proc.pid, baseline + RSS_SLACK_BYTES)
        assert rss <= baseline + RSS_SLACK_BYTES, (baseline >> 20, rss >> 20)
        deadline = time.monotonic() + 30
        while True:   # the daemon notices the closes on its own loop's time
            try:
                _legitimate_migration_completes(src, dst)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "migrations never got in after the flood"
                src.cli("vm", "stop", "legit", check=None)
                time.sleep(0.2)
    finally:
        for s in flood:
            s.close()
        src.close()
        dst.close()
