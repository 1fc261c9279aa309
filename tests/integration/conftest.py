"""Every integration test runs under both event loops; teardown fails on
leaked tasks or exceptions the loop had nowhere to deliver."""
import asyncio

import pytest

from livemig.aio.loop import loop_kind, new_event_loop
from support.etcd import etcd_cluster
from support.waiting import PATIENCE_S


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    loop = new_event_loop(request.param)
    assert loop_kind(loop) == request.param
    unhandled = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))

    def runner(coro):
        return loop.run_until_complete(asyncio.wait_for(coro, PATIENCE_S))

    runner.kind = request.param
    yield runner
    # Tasks still winding down (a closing channel's reader, a server's handler)
    # get their time; a task still pending after that has leaked.
    pending = asyncio.all_tasks(loop)
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=PATIENCE_S))
    # A few more turns of the loop run the close callbacks of transports.
    for _ in range(5):
        loop.run_until_complete(asyncio.sleep(0))
    leaked = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in leaked:
        task.cancel()
    if leaked:
        loop.run_until_complete(asyncio.wait(leaked))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    assert not leaked, f"tasks leaked: {leaked}"
    assert not unhandled, f"unhandled loop errors: {unhandled}"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """A one-member etcd on loopback for the fleet tests of one module (they
    skip, saying why, where no etcd is installed)."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd"), members=1) as cluster:
        yield cluster
