"""A daemon's limits on what a source can make it spend: guest memory of
arriving VMs, and time while a source is silent; compatibility checks on the
offer; and concurrent migrations, which stop one at a time.

Real daemon processes; the misbehaving sources speak the protocol from a
plain socket (support.hostile) and stop where the test says.
"""
import pytest

from livemig.protocol import Abort, Accept, Refuse, RefuseCode, RoundAck, RoundEnd, RoundStart

from support.daemons import (EXIT_FAILED, DaemonProcess, assert_daemon_vm_matches_unmoved,
                             start_vm)
from support.hostile import SilentSource, rss_bytes, wait_for_rss_below
from support.oracle import Recipe

RSS_SLACK_BYTES = 24 << 20


def test_offers_beyond_the_incoming_memory_limit_are_refused(tmp_path):
    src = DaemonProcess(tmp_path, "src", "auto")
    dst = DaemonProcess(tmp_path, "dst", "auto", "--max-incoming-memory", "48MiB")
    try:
        assert dst.info["max_incoming_memory_bytes"] == 48 << 20
        start_vm(src, "big", Recipe("64MiB", 1, "uniform", seed=1, dirty_rate="1MiB/s"))
        rec = src.cli_json("migrate", "big", "--to", dst.address, check=EXIT_FAILED)
        assert rec["status"] == "failed", rec
        assert "incoming memory limit is 48.0 MiB" in rec["error"], rec["error"]
        big = next(v for v in src.client.call("vm.list") if v["name"] == "big")
        assert big["running"] and not big["migrating"]     # still the source's, running
        assert dst.client.call("vm.list") == []
        start_vm(src, "small", Recipe("32MiB", 1, "uniform", seed=2, dirty_rate="1MiB/s"))
        assert src.cli_json("migrate", "small", "--to", dst.address)["status"] == "completed"
    finally:
        src.close()
        dst.close()


def test_an_offer_larger_than_ram_is_never_accepted(tmp_path):
    """MAP_NORESERVE would map 1 TiB without complaint; the offer is refused
    on its numbers, and nothing is allocated."""
    dst = DaemonProcess(tmp_path, "dst", "auto")
    try:
        baseline = rss_bytes(dst.proc.pid)
        peer = SilentSource(dst.port)
        answer = peer.offer("huge", 1 << 40)
        peer.close()
        assert isinstance(answer, Refuse) and answer.code is RefuseCode.RESOURCES, answer
        assert "this host can give at most" in answer.reason
        assert rss_bytes(dst.proc.pid) <= baseline + RSS_SLACK_BYTES
    finally:
        dst.close()


def _silent_after(tmp_path, drive) -> None:
    """Accept a 64 MiB offer, let ``drive`` take the peer further, then fall
    silent: the daemon gives up after its idle timeout, says so, and frees
    the memory it had faulted in for the VM."""
    dst = DaemonProcess(tmp_path, "dst", "auto", "--idle-timeout", "2")
    src = DaemonProcess(tmp_path, "src", "auto")
    try:
        baseline = rss_bytes(dst.proc.pid)
        peer = SilentSource(dst.port)
        assert isinstance(peer.offer("quiet", 64 << 20), Accept)
        drive(peer)
        answer = peer.recv()        # generous socket timeout: a condition, not a speed
        assert isinstance(answer, Abort) and "sent nothing for 2 s" in answer.reason, answer
        peer.close()
        status = dst.client.call("status")
        rec = next(m for m in status["migrations"] if m["vm"] == "quiet")
        assert rec["status"] == "failed" and "sent nothing" in rec["error"], rec
        assert status["vms"] == []
        rss = wait_for_rss_below(dst.proc.pid, baseline + RSS_SLACK_BYTES)
        assert rss <= baseline + RSS_SLACK_BYTES, (baseline >> 20, rss >> 20)
        start_vm(src, "legit", Recipe("16MiB", 1, "uniform", seed=3, dirty_rate="1MiB/s"))
        assert src.cli_json("migrate", "legit", "--to", dst.address)["status"] == "completed"
    finally:
        src.close()
        dst.close()


def test_a_source_silent_after_accept_is_timed_out(tmp_path):
    _silent_after(tmp_path, lambda peer: None)


def test_a_source_silent_after_a_round_is_timed_out(tmp_path):
    def one_empty_round(peer):
        peer.send(RoundStart(0))
        peer.send(RoundEnd(0, 0, 0))
        assert isinstance(peer.recv(), RoundAck)

    _silent_after(tmp_path, one_empty_round)


def test_a_vm_the_host_cannot_run_is_refused_before_any_page(tmp_path):
    """ISA revision, vCPU features and page size are checked on the offer."""
    from livemig.protocol import MigrationOffer, Mode
    from livemig.vm.isa import ISA_REVISION

    dst = DaemonProcess(tmp_path, "dst", "auto")
    try:
        base = {"name": "alien", "memory_bytes": 16 << 20, "vcpus": 1, "workload": "idle"}
        for config, page_size, reason in (
                ({**base, "isa_revision": ISA_REVISION + 1}, 4096, "needs ISA revision"),
                ({**base, "features": ["vector"]}, 4096, "features this host lacks: vector"),
                (base, 16384, "supports only 4096")):
            peer = SilentSource(dst.port)
            peer.send(MigrationOffer(config, Mode.PRECOPY, (16 << 20) // page_size,
                                     page_size=page_size))
            answer = peer.recv()
            peer.close()
            assert isinstance(answer, Refuse) and answer.code is RefuseCode.OFFER, answer
            assert reason in answer.reason and "keeps running on the source" in answer.reason
        assert dst.client.call("status") == {"vms": [], "migrations": []}
    finally:
        dst.close()


@pytest.mark.parametrize("count", [2, 4])
def test_concurrent_migrations_all_complete_with_their_downtime_within_or_reported(tmp_path,
                                                                                   count):
    """Several VMs leave one daemon at once: each completes, identical to a
    twin that never moved, and a downtime past its limit is never silent."""
    src = DaemonProcess(tmp_path, "src", "auto")
    dst = DaemonProcess(tmp_path, "dst", "auto")
    try:
        recipes = {f"vm{i}": Recipe("32MiB", 1, "uniform", seed=i, dirty_rate="4MiB/s")
                   for i in range(count)}
        for name, recipe in recipes.items():
            start_vm(src, name, recipe)
        recs = [src.cli_json("migrate", name, "--to", dst.address, "--downtime-ms", "300",
                             "--no-wait") for name in recipes]
        for rec in recs:
            final = src.client.call("migration.wait", id=rec["id"], timeout_s=120)
            assert final["status"] == "completed", final
            downtime_ms = final["stats"]["downtime_ms"]
            assert (downtime_ms <= 300) == (final["warning"] is None), final
        for name, recipe in recipes.items():
            assert_daemon_vm_matches_unmoved(dst, name, recipe)
    finally:
        src.close()
        dst.close()
