"""The embedding API end to end: a destination and a source in one program,
the moved VM checked against one that never moved."""
import asyncio

import livemig
from support.waiting import PATIENCE_S


def _same(a, b):
    assert a.digest() == b.digest()
    for i in range(a.nvcpus):
        assert a.registers(i) == b.registers(i)
        assert a.console(i) == b.console(i)


def test_library_migrate_and_destination_round_trip():
    progress = []

    async def main():
        async with livemig.Destination("127.0.0.1:0") as dest:
            vm = livemig.VM(memory="32MiB", vcpus=2, workload="memtest",
                            dirty_rate="16MiB/s", seed=11)
            vm.start()
            # Time for the guest to dirty memory; nothing below depends on how much.
            await asyncio.sleep(0.2)
            stats = await livemig.migrate(vm, dest.address, auto_converge=True, name="lib",
                                          on_progress=progress.append)
            assert stats.status == "completed" and stats.converged
            assert stats.downtime_ms is not None and stats.downtime_ms > 0
            vm.close()
            name, moved, dest_stats = await dest.next_vm(timeout_s=PATIENCE_S)
            assert name == "lib" and dest_stats.status == "completed"
            return moved

    moved = asyncio.run(main())
    try:
        moved.pause()   # a running guest could pass the target before run_to
        target = max(moved.steps()) + 200_000
        moved.run_to(target)
        moved.check_guest()
        with livemig.VM(memory="32MiB", vcpus=2, workload="memtest", seed=11) as ref:
            ref.run_to(target)     # built parked: run straight to the target
            _same(moved, ref)
    finally:
        moved.close()
    assert progress and progress[-1].status == "completed"


def test_pure_core_imports_without_native():
    import subprocess
    import sys

    code = "import livemig, sys; print('livemig._native' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
