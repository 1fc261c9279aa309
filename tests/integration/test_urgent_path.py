"""Which path serves the urgent channel: native threads when the host allows,
the event loops otherwise (forced off, TLS); both move the VM intact."""
import pytest

from livemig.native import postcopy, urgent
from livemig.config import CodecConfig, MigrationConfig
from livemig.engine.destination.server import MigrationServer
from livemig.engine.source.session import migrate
from livemig.vm.machine import VM
from support.oracle import fill_then_start

OK, WHY = urgent.probe()
pytestmark = pytest.mark.skipif(not postcopy.probe().missing,
                                reason=f"userfaultfd MISSING unavailable: {postcopy.probe().reason}")


async def _postcopy_once(cfg):
    vm = VM("16MiB", 2, "uniform", seed=4, dirty_rate="32MiB/s")
    try:
        fill_then_start(vm)     # owed pages the guest will fault on at the destination
        async with MigrationServer("127.0.0.1", 0, config=cfg) as srv:
            stats = await migrate(vm, "127.0.0.1", srv.port, config=cfg)
            arrival, moved = await srv.completed.get()
            moved.close()
        return stats, arrival.stats
    finally:
        vm.close()


CFG = dict(mode="postcopy", codec=CodecConfig().without("lz4"), max_bandwidth_bps=32 << 20)


@pytest.mark.skipif(not OK, reason=f"native urgent path: {WHY}")
def test_native_path_is_chosen_and_serves_faults(run):
    src, dst = run(_postcopy_once(MigrationConfig(**CFG)))
    assert src.status == dst.status == "completed"
    assert src.fault_path == dst.fault_path == "native"
    assert dst.pages_requested > 0 and dst.fault_latency.count >= dst.pages_requested
    assert dst.vcpu_blocked_ms is not None and dst.vcpu_blocked_ms > 0
    assert src.pages_requested == dst.pages_requested


def test_forced_off_by_config_uses_the_event_loop(run):
    src, dst = run(_postcopy_once(MigrationConfig(**CFG, native_urgent=False)))
    assert src.status == dst.status == "completed"
    assert src.fault_path == dst.fault_path == "python"
    assert "configuration" in dst.fault_path_reason
    assert dst.pages_requested > 0


def test_forced_off_by_environment(run, monkeypatch):
    monkeypatch.setenv(urgent.ENV_SWITCH, "0")
    src, dst = run(_postcopy_once(MigrationConfig(**CFG)))
    assert src.status == dst.status == "completed"
    assert src.fault_path == dst.fault_path == "python"
    assert urgent.ENV_SWITCH in src.fault_path_reason


@pytest.mark.skipif(not OK, reason=f"native urgent path: {WHY}")
def test_mixed_paths_interoperate(run):
    """Same frames on both paths: a native destination with a Python source."""
    cfg_src = MigrationConfig(**CFG, native_urgent=False)
    cfg_dst = MigrationConfig(**CFG)

    async def main():
        vm = VM("16MiB", 2, "uniform", seed=4, dirty_rate="32MiB/s")
        try:
            vm.start()
            async with MigrationServer("127.0.0.1", 0, config=cfg_dst) as srv:
                stats = await migrate(vm, "127.0.0.1", srv.port, config=cfg_src)
                arrival, moved = await srv.completed.get()
                moved.close()
            return stats, arrival.stats
        finally:
            vm.close()

    src, dst = run(main())
    assert src.status == dst.status == "completed"
    assert (src.fault_path, dst.fault_path) == ("python", "native")


class _TlsChannel:
    def get_extra_info(self, name, default=None):
        return object() if name in ("ssl_object", "socket") else default


def test_tls_channel_falls_back_with_a_reason():
    choice = urgent.choose_path(_TlsChannel())
    assert not choice.native and choice.name == "python" and "TLS" in choice.reason
