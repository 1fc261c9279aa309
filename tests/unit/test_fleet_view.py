"""The fleet view from etcd's keys: live, lost, and records no livemig wrote."""
import asyncio
import json

from livemig.fleet import keys
from livemig.fleet.etcd import KeyValue
from livemig.fleet.view import read_fleet


class _Keys:
    def __init__(self, items: dict[str, bytes]):
        self.items = items

    async def get_prefix(self, prefix):
        return [KeyValue(k, v, 1, 1, 0) for k, v in sorted(self.items.items())
                if k.startswith(prefix)]


def test_live_lost_and_malformed_records():
    items = {
        keys.known_key("h1:1"): b"{}", keys.known_key("h2:1"): b"{}",
        keys.host_key("h1:1"): json.dumps({"cpus": 4, "vms": {"v": {"running": True,
                                                                     "memory_bytes": 5}}}).encode(),
        keys.host_key("junk:1"): b"\xff not json",
        keys.vm_key("v"): keys.owner_record("h1:1", 3),
        keys.vm_key("w"): keys.owner_record("h2:1", 1),
        keys.vm_key("x"): b'{"owner": 5}',
        keys.drain_key("h2:1"): b"{}", keys.status_key("h2:1"): b"{}",
    }
    view = asyncio.run(read_fleet(_Keys(items)))
    hosts = {h["addr"]: h for h in view.hosts}
    assert hosts["h1:1"]["state"] == "live" and not hosts["h1:1"]["drain_mark"]
    assert hosts["h2:1"] == {"addr": "h2:1", "state": "lost", "drain_mark": True}
    assert "malformed" in hosts["junk:1"]
    vms = {v["name"]: v for v in view.vms}
    assert vms["v"]["owner_state"] == "live" and vms["v"]["running_there"] and vms["v"]["epoch"] == 3
    assert vms["w"]["owner_state"] == "lost" and not vms["w"]["running_there"]
    assert vms["x"]["owner_state"] == "malformed" and vms["x"]["owner"] is None
