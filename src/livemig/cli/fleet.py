"""``livemig fleet hosts|vms`` — the fleet as etcd holds it (docs/fleet.md)."""
from __future__ import annotations

import os

from .common import EXIT_OK, emit

FLEET_ENV = "LIVEMIG_FLEET"


def _fleet_url(args) -> str:
    from ..errors import ConfigError

    url = args.fleet or os.environ.get(FLEET_ENV)
    if not url:
        raise ConfigError(f"livemig fleet needs --fleet etcd://HOST:PORT[,…] (or ${FLEET_ENV})")
    return url


def _read(args):
    from ..aio.loop import run
    from ..fleet.etcd import EtcdClient
    from ..fleet.view import read_fleet

    async def main():
        client = EtcdClient(_fleet_url(args))
        try:
            return await read_fleet(client)
        finally:
            await client.close()
    return run(main(), kind="asyncio")


def _mib(n) -> str:
    return "?" if n is None else f"{n / (1 << 20):.0f} MiB"


def cmd_hosts(args) -> int:
    view = _read(args)
    lines = [f"{'HOST':<24} {'STATE':<6} {'VMS':>4} {'MEM FREE':>10} {'CPUS':>4} {'LOAD':>5}"]
    for h in view.hosts:
        if h["state"] == "lost":
            lines.append(f"{h['addr']:<24} lost   (lease expired: no record)")
        else:
            lines.append(f"{h['addr']:<24} live   {len(h.get('vms', {})):>4} "
                         f"{_mib(h.get('memory_available_bytes')):>10} {h.get('cpus', '?'):>4} "
                         f"{h.get('load_1m', 0):>5.2f}")
    emit(args, {"hosts": view.hosts}, "\n".join(lines))
    return EXIT_OK


def cmd_vms(args) -> int:
    view = _read(args)
    lines = [f"{'VM':<20} {'OWNER':<24} {'EPOCH':>5} {'OWNER':<6} {'RUNNING':<7}"]
    for v in view.vms:
        lines.append(f"{v['name']:<20} {v['owner']:<24} {v['epoch']:>5} {v['owner_state']:<6} "
                     f"{'yes' if v['running_there'] else 'no':<7}")
    emit(args, {"vms": view.vms}, "\n".join(lines))
    return EXIT_OK


def register(sub) -> None:
    sp = sub.add_parser("fleet", help="hosts and VMs of a fleet coordinated through etcd")
    fsub = sp.add_subparsers(dest="fleet_command", required=True)
    for name, func, text in (("hosts", cmd_hosts, "every host: live, or lost (lease expired)"),
                             ("vms", cmd_vms, "every VM with its owner and epoch")):
        p = fsub.add_parser(name, help=text)
        p.add_argument("--fleet", metavar="etcd://HOST:PORT[,…]",
                       help=f"the fleet's etcd endpoints (default: ${FLEET_ENV})")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.set_defaults(func=func)
