"""``livemig fleet hosts|vms|drain|undrain|balance|controller|simulate`` (docs/fleet.md)."""
from __future__ import annotations

import os

from .common import EXIT_FAILED, EXIT_OK, emit

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
    lines = [f"{'HOST':<24} {'STATE':<6} {'VMS':>4} {'MEM FREE':>10} {'CPUS':>4} {'LOAD':>5} "
             "DRAIN"]
    for h in view.hosts:
        # The mark is etcd's; "seen" once the host's record says it knows.
        drain = ("-" if not h["drain_mark"] else
                 "marked, seen" if h.get("draining") else "marked")
        if h["state"] == "lost":
            lines.append(f"{h['addr']:<24} lost   (lease expired: no record){'':>13} {drain}")
        else:
            lines.append(f"{h['addr']:<24} live   {len(h.get('vms', {})):>4} "
                         f"{_mib(h.get('memory_available_bytes')):>10} {h.get('cpus', '?'):>4} "
                         f"{h.get('load_1m', 0):>5.2f} {drain}")
    emit(args, {"hosts": view.hosts}, "\n".join(lines))
    return EXIT_OK


def cmd_vms(args) -> int:
    view = _read(args)
    lines = [f"{'VM':<20} {'OWNER':<24} {'EPOCH':>5} {'OWNER':<6} {'RUNNING':<7} STATE"]
    for v in view.vms:
        why = f" ({v['why']})" if v.get("why") else ""
        lines.append(f"{v['name']:<20} {v['owner'] or '?':<24} {v['epoch'] or '?':>5} "
                     f"{v['owner_state']:<6} "
                     f"{'yes' if v['running_there'] else 'no':<7} {v['state']}{why}")
    emit(args, {"vms": view.vms}, "\n".join(lines))
    return EXIT_OK


def _with_client(args, body):
    from ..aio.loop import run
    from ..fleet.etcd import EtcdClient

    async def main():
        client = EtcdClient(_fleet_url(args))
        try:
            return await body(client)
        finally:
            await client.close()
    return run(main(), kind="asyncio")


def _plan_lines(plan) -> list[str]:
    lines = [f"{'VM':<16} {'FROM':<22} {'TO':<22} {'MODE':<9} {'PREDICTED':>9}"]
    for m in plan.moves:
        lines.append(f"{m.vm:<16} {m.source:<22} {m.destination:<22} {m.mode:<9} "
                     f"{m.predicted_time_s:>8.1f}s")
    for name, why in plan.unplaced.items():
        lines.append(f"{name:<16} stays: {why}")
    lines.append(f"{len(plan.moves)} moves, predicted {plan.total_time_s:.1f} s in all "
                 f"({plan.sum_single_s:.1f} s one at a time), peak {plan.peak_concurrent} "
                 f"concurrent, {plan.bytes_moved / (1 << 20):.0f} MiB to send")
    return lines


def cmd_drain(args) -> int:
    import sys

    from ..errors import ConfigError, LivemigError
    from ..fleet.drain import UNSETTLED, follow, request_drain
    from ..fleet.keys import status_key

    async def body(client):
        try:
            plan = await request_drain(client, args.host, link_bps=args.link_bps,
                                       max_downtime_ms=args.downtime_ms,
                                       per_host_limit=args.per_host_limit, dry_run=args.dry_run)
        except LookupError as exc:
            raise ConfigError(str(exc)) from None
        if args.dry_run:
            return plan, None

        def progress(status):
            if not args.json:
                done = sum(v["status"] not in UNSETTLED for v in status["vms"].values())
                print(f"drain {args.host}: {done}/{len(status['vms'])} VMs settled "
                      f"({status['state']})", file=sys.stderr, flush=True)
        try:
            return plan, await follow(client, status_key(args.host), on_progress=progress,
                                      timeout_s=args.timeout)
        except TimeoutError as exc:
            raise LivemigError(f"{exc}; the host goes on with its drain: follow it with "
                               "livemig fleet hosts") from None

    plan, status = _with_client(args, body)
    if status is None:
        emit(args, {"dry_run": True, "plan": plan.to_dict()}, "\n".join(_plan_lines(plan)))
        return EXIT_OK
    lines = [f"{name:<16} {v['status']:<10} → {v['destination']} {v.get('mode', '')} "
             f"{v.get('time_s', 0):.1f}s {v.get('error') or ''}"
             for name, v in status["vms"].items()]
    lines.append(f"drained in {status['time_s']:.1f} s; left on {args.host}: "
                 f"{', '.join(status['left']) or 'none'}")
    emit(args, {"plan": plan.to_dict(), "result": status}, "\n".join(lines))
    return EXIT_OK if not status["left"] else EXIT_FAILED


def cmd_undrain(args) -> int:
    from ..fleet.keys import drain_key, status_key

    async def body(client):
        await client.delete(status_key(args.host))
        return await client.delete(drain_key(args.host))
    removed = _with_client(args, body)
    emit(args, {"host": args.host, "was_draining": bool(removed)},
         f"{args.host}: {'drain mark removed' if removed else 'was not marked'}")
    return EXIT_OK


def cmd_balance(args) -> int:
    import asyncio
    import sys

    from ..errors import LivemigError
    from ..fleet.balance import request_balance
    from ..fleet.drain import UNSETTLED, follow
    from ..fleet.keys import moves_status_key

    async def body(client):
        plan, sources = await request_balance(
            client, link_bps=args.link_bps, max_downtime_ms=args.downtime_ms,
            per_host_limit=args.per_host_limit, window_s=args.window, dry_run=args.dry_run)
        settled: dict[str, int] = {}

        def progress(status):
            settled[status["host"]] = sum(v["status"] not in UNSETTLED
                                          for v in status["vms"].values())
            if not args.json:
                print(f"balance: {sum(settled.values())}/{len(plan.moves)} moves settled",
                      file=sys.stderr, flush=True)
        try:
            return plan, await asyncio.gather(*(
                follow(client, moves_status_key(src), on_progress=progress,
                       timeout_s=args.timeout) for src in sources))
        except TimeoutError as exc:
            raise LivemigError(f"{exc}; the hosts go on with their moves: follow them with "
                               "livemig fleet vms") from None
    plan, statuses = _with_client(args, body)
    if args.dry_run:
        emit(args, {"dry_run": True, "plan": plan.to_dict()}, "\n".join(_plan_lines(plan)))
        return EXIT_OK
    moved = {name: {**v, "source": st["host"]} for st in statuses
             for name, v in st["vms"].items()}
    failed = sorted(n for n, v in moved.items() if v["status"] != "completed")
    lines = [f"{name:<16} {v['status']:<10} {v['source']} → {v['destination']} "
             f"{v.get('mode', '')} {v.get('time_s', 0):.1f}s {v.get('error') or ''}"
             for name, v in moved.items()]
    lines.append(f"{len(moved) - len(failed)} of {len(moved)} moves completed"
                 if moved else "the fleet is balanced: nothing to move")
    emit(args, {"plan": plan.to_dict(), "result": {"moves": moved, "failed": failed}},
         "\n".join(lines))
    return EXIT_OK if not failed else EXIT_FAILED


def _ago(t, now) -> str:
    return "never" if not isinstance(t, (int, float)) else f"{max(0.0, now - t):.0f} s ago"


def cmd_controller(args) -> int:
    import time

    from ..fleet.controller import read_controller

    info = _with_client(args, read_controller)
    now, leader, state = time.time(), info["leader"], info["state"]
    lines = [f"leader      {leader.get('addr', '?')} (term {leader['term']}, since "
             f"{_ago(leader.get('since'), now)})" if leader else
             "leader      none (no candidate holds the leader key)",
             f"candidates  {', '.join(info['candidates']) or 'none'}"]
    last = state.get("last_pass")
    if last:
        lines.append(f"last pass   {_ago(state.get('last_pass_at'), now)} by "
                     f"{state.get('leader')} (term {state.get('term')}, pass "
                     f"{state.get('passes')}): {last['action']}: {last['reason']}")
        if last.get("held"):
            lines.append(f"held        {', '.join(last['held'])} (moved within the window)")
    moves = state.get("moves") or []
    if moves:
        lines.append(f"{'VM':<16} {'FROM':<22} {'TO':<22} {'STATUS':<11} {'TERM':>6}  WHEN")
        lines += [f"{m['vm']:<16} {m['from']:<22} {m['to']:<22} {m['status']:<11} "
                  f"{m.get('term', '?'):>6}  {_ago(m.get('at'), now)}" for m in moves]
    emit(args, info, "\n".join(lines))
    return EXIT_OK


def cmd_simulate(args) -> int:
    from ..fleet.simulate import simulate

    r = simulate(nhosts=args.hosts, nvms=args.vms, action=args.action,
                 drain_hosts=args.drain_hosts, link_bps=args.link_bps,
                 max_downtime_ms=args.downtime_ms, per_host_limit=args.per_host_limit,
                 seed=args.seed)
    emit(args, r, "\n".join([
        f"{r['action']} over {r['hosts']} hosts, {r['vms']} VMs: {r['moves']} moves "
        f"({', '.join(f'{k} {v}' for k, v in sorted(r['modes'].items()))}), "
        f"{r['unplaced']} unplaced",
        f"predicted total {r['predicted_total_time_s']:.1f} s (one at a time: "
        f"{r['sum_of_single_migrations_s']:.1f} s), peak {r['peak_concurrent']} concurrent, "
        f"{r['bytes_moved'] / (1 << 40):.2f} TiB sent",
        f"planned in {r['planner_cpu_s']:.2f} s of CPU"]))
    return EXIT_OK


def _planning_flags(p) -> None:
    from .common import positive

    p.add_argument("--link", dest="link_bps", type=_rate, default=1e9 / 8, metavar="RATE",
                   help="bandwidth each host's link gives migrations (default 1Gbit/s)")
    p.add_argument("--downtime-ms", type=positive(float), default=300.0,
                   help="downtime limit the mode is chosen for (default 300)")
    p.add_argument("--per-host-limit", type=positive(int), default=2, metavar="N",
                   help="migrations at a time per host, in or out (default 2)")


def _rate(text: str) -> float:
    from .common import dirty_rate

    value = dirty_rate(text)
    if not value:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r}: the link needs a bandwidth")
    return float(value)


def register(sub) -> None:
    from .common import positive

    sp = sub.add_parser("fleet", help="hosts and VMs of a fleet coordinated through etcd")
    fsub = sp.add_subparsers(dest="fleet_command", required=True)
    for name, func, text in (("hosts", cmd_hosts, "every host: live, or lost (lease expired)"),
                             ("vms", cmd_vms, "every VM with its owner and epoch"),
                             ("controller", cmd_controller, "the elected balance controller: "
                              "leader, term, candidates, last pass and its moves")):
        p = fsub.add_parser(name, help=text)
        p.add_argument("--fleet", metavar="etcd://HOST:PORT[,…]",
                       help=f"the fleet's etcd endpoints (default: ${FLEET_ENV})")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        p.set_defaults(func=func)
    for name, func, text in (("drain", cmd_drain, "move every VM off HOST (marked meanwhile)"),
                             ("undrain", cmd_undrain, "remove HOST's drain mark"),
                             ("balance", cmd_balance, "move VMs to even out load (--dry-run: "
                                                      "the moves, priced)")):
        p = fsub.add_parser(name, help=text)
        if name != "balance":
            p.add_argument("host", metavar="HOST:PORT", help="the host's migration address")
        p.add_argument("--fleet", metavar="etcd://HOST:PORT[,…]",
                       help=f"the fleet's etcd endpoints (default: ${FLEET_ENV})")
        p.add_argument("--json", action="store_true", help="print one JSON document")
        if name != "undrain":
            p.add_argument("--dry-run", action="store_true", help="print the plan only")
            _planning_flags(p)
        if name != "undrain":
            p.add_argument("--timeout", type=float, default=None, metavar="S",
                           help=f"give up following the {name} after S seconds")
        if name == "balance":
            p.add_argument("--window", type=positive(int), default=None, metavar="S",
                           help="a VM a balance moved is not moved again for S seconds "
                           "(default: 10 minutes)")
        p.set_defaults(func=func)
    p = fsub.add_parser("simulate", help="plan a drain or balance over a generated fleet")
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--vms", type=int, default=20000)
    p.add_argument("--action", choices=["drain", "balance"], default="drain")
    p.add_argument("--drain-hosts", type=int, default=10, metavar="N",
                   help="drain: the N most loaded hosts (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    _planning_flags(p)
    p.set_defaults(func=cmd_simulate, link_bps=25e9 / 8)
