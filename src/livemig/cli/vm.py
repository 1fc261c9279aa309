"""``livemig vm``: run, start, list, resolve, stop, save and restore VMs."""
from __future__ import annotations

import os
import sys

from ..units import format_size
from .common import EXIT_OK, control_client, daemon_opts, emit, vm_dirty_rate, vm_opts


def cmd_vm_run(args) -> int:
    from ..vm.runner import run_tracked

    return run_tracked(memory=args.memory, vcpus=args.vcpus, workload=args.workload,
                       dirty_rate=vm_dirty_rate(args), seconds=args.seconds, tracker=args.tracker,
                       interval_s=args.interval, as_json=args.json, seed=args.seed)


def cmd_vm_start(args) -> int:
    if args.fleet:
        return _start_in_fleet(args)
    res = control_client(args).call("vm.start", name=args.name, memory=args.memory,
                                    vcpus=args.vcpus, workload=args.workload,
                                    dirty_rate=vm_dirty_rate(args), seed=args.seed)
    emit(args, res, lambda r: f"started VM {r['name']}: {r['workload']}, "
                               f"{r['memory_bytes'] >> 20} MiB, {r['vcpus']} vCPUs")
    return EXIT_OK


def _start_in_fleet(args) -> int:
    """No daemon named: the fleet picks the host (fleet/place.py)."""
    from ..aio.loop import run
    from ..errors import ConfigError
    from ..fleet.etcd import EtcdClient
    from ..fleet.place import place_vm

    if args.control:
        raise ConfigError("give --fleet (the fleet picks the host) or --control (this daemon), "
                          "not both")
    tls = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(tls) and not all(tls):
        raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")

    async def main():
        ssl = None
        if all(tls):
            from ..aio.tls import client_context
            ssl = client_context(*tls)
        client = EtcdClient(args.fleet)
        try:
            return await place_vm(client, args.name, memory=args.memory, vcpus=args.vcpus,
                                  workload=args.workload, dirty_rate=vm_dirty_rate(args),
                                  seed=args.seed, ssl=ssl)
        finally:
            await client.close()
    res = run(main(), kind="asyncio")
    emit(args, res, lambda r: f"started VM {r['name']} on {r['host']}: {r['workload']}, "
                               f"{r['memory_bytes'] >> 20} MiB, {r['vcpus']} vCPUs"
                               + "".join(f"\n  refused by {why}" for why in r["refused_by"]))
    return EXIT_OK


def format_vms(vms) -> str:
    """The VM table; a VM arriving in post-copy, or whose guest reported an
    error, gets a line below its row saying so."""
    if not vms:
        return "no VMs"
    rows = [f"{'NAME':16} {'MEMORY':>9} {'VCPUS':>5} {'WORKLOAD':10} {'STATE':9} {'HEALTH':8} "
            "ORIGIN"]
    for v in vms:
        health = v["health"]
        rows.append(f"{v['name']:16} {v['memory_bytes'] >> 20:>5} MiB {v['vcpus']:>5} "
                    f"{v['workload'] or '-':10} {v['state']:9} {health['status']:8} {v['origin']}")
        if v["owed_pages"] is not None:
            rows.append(f"  post-copy: {v['owed_pages']:,} pages ({format_size(v['owed_bytes'])}) "
                        "still owed by the source")
        if health["status"] != "ok":
            rows.append(f"  health: {health['summary']}")
    return "\n".join(rows)


def cmd_vm_list(args) -> int:
    emit(args, control_client(args).call("vm.list"), format_vms)
    return EXIT_OK


def cmd_vm_resolve(args) -> int:
    action = "resume" if args.resume else "discard" if args.discard else None
    if action is not None and not args.json:
        print(f"WARNING: deciding by hand where VM {args.name} lives; livemig refuses if the "
              "destination answers and the decision would run the VM twice or lose it, but "
              "cannot check a destination it cannot reach", file=sys.stderr)
    res = control_client(args).call("vm.resolve", name=args.name, action=action)

    def human(r) -> str:
        if "owner" in r:      # a fleet daemon: etcd decided
            text = f"VM {r['name']}: {r['resolved']} here (etcd: {r['reason']})"
        else:
            text = (f"VM {r['name']}: {r['resolved']} here (the destination says: "
                    f"{r['destination_says']}{': ' + r['reason'] if r['reason'] else ''})")
        return f"{text}\n{r['warning']}" if r["warning"] else text
    emit(args, res, human)
    return EXIT_OK


def cmd_vm_stop(args) -> int:
    res = control_client(args).call("vm.stop", name=args.name)
    emit(args, res, f"stopped VM {args.name}")
    return EXIT_OK


def cmd_vm_save(args) -> int:
    res = control_client(args).call("vm.save", name=args.name, path=os.path.abspath(args.file))
    emit(args, res, lambda r: f"saved VM {r['name']} to {r['path']} ({r['bytes']:,} bytes)")
    return EXIT_OK


def cmd_vm_restore(args) -> int:
    res = control_client(args).call("vm.restore", path=os.path.abspath(args.file),
                                    name=args.name, paused=args.paused)
    emit(args, res, lambda r: f"restored VM {r['name']} from {args.file} "
                               f"({'running' if r['running'] else 'paused'})")
    return EXIT_OK


def register(sub) -> None:
    vm = sub.add_parser("vm", help="run or manage VMs").add_subparsers(dest="vm_command",
                                                                     required=True)
    sp = vm.add_parser("run", help="run a VM here under dirty tracking and report its dirty rate")
    vm_opts(sp)
    sp.add_argument("--seconds", type=float, default=5.0)
    sp.add_argument("--interval", type=float, default=1.0, help="report interval in seconds")
    sp.add_argument("--tracker", default="auto", help="auto, uffd-async, uffd-wp or mprotect")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_vm_run)
    sp = vm.add_parser("start", help="start a VM on a daemon, or where a fleet has room")
    sp.add_argument("name")
    vm_opts(sp)
    daemon_opts(sp)
    sp.add_argument("--fleet", metavar="etcd://HOST:PORT[,…]",
                    help="start it on the fleet's host with the most room, delivered to its "
                         "migration address (docs/fleet.md); no daemon named")
    for flag in ("--tls-cert", "--tls-key", "--tls-ca"):
        sp.add_argument(flag, help="with --fleet: this client's certificate, key and the CA "
                        "of the hosts (mutual TLS)")
    sp.set_defaults(func=cmd_vm_start)
    sp = vm.add_parser("list", help="list a daemon's VMs")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_vm_list)
    sp = vm.add_parser("resolve", help="settle a handover left in doubt: ask the destination "
                       "and apply its answer, or decide by hand")
    sp.add_argument("name")
    how = sp.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true",
                     help="resume the paused copy here (refused if the destination runs it)")
    how.add_argument("--discard", action="store_true",
                     help="free the copy here (refused if the destination does not run it)")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_vm_resolve)
    sp = vm.add_parser("stop", help="stop a VM and free it")
    sp.add_argument("name")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_vm_stop)
    sp = vm.add_parser("save", help="write a VM to a snapshot file (it pauses while written)")
    sp.add_argument("name")
    sp.add_argument("file")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_vm_save)
    sp = vm.add_parser("restore", help="start a VM from a snapshot file")
    sp.add_argument("file")
    sp.add_argument("--name", help="the VM's name (default: the file name without extension)")
    sp.add_argument("--paused", action="store_true", help="leave it paused")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_vm_restore)
