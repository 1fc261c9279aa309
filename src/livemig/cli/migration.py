"""``livemig migrate`` and the commands that follow or steer a migration:
status, cancel, migrate-set, postcopy, recover, history."""
from __future__ import annotations

import sys
import time

from ..config import parse_max_bandwidth
from .common import (EXIT_FAILED, EXIT_OK, PROGRESS_PERIOD_S, control_client, daemon_opts,
                     emit, positive)
from .vm import format_vms


def limit_options(args) -> dict:
    """What ``migrate`` and ``plan`` share: the downtime limit, the bandwidth
    cap and the destination's TLS name, as the daemon's options."""
    opts = {}
    if args.downtime_ms is not None:
        opts["downtime_ms"] = args.downtime_ms
    bandwidth_bps = parse_max_bandwidth(args.max_bandwidth, what="--max-bandwidth")
    if bandwidth_bps is not None:
        opts["max_bandwidth_bps"] = bandwidth_bps
    if args.server_name:
        opts["server_hostname"] = args.server_name
    return opts


def _migration_options(args) -> dict:
    opts = {"mode": args.mode, **limit_options(args)}
    if args.auto_converge:
        opts["auto_converge"] = True
    if args.max_rounds is not None:
        opts["max_rounds"] = args.max_rounds
    if args.postcopy_after_rounds is not None:
        opts["hybrid_postcopy_after_rounds"] = args.postcopy_after_rounds
    if args.streams is not None:
        opts["streams"] = args.streams
    if args.resume_timeout is not None:
        opts["precopy_resume_timeout_s"] = args.resume_timeout
    return opts


def _summary(rec) -> str:
    from ..service.display import progress_fields

    s = rec.get("stats") or {}
    way = "to" if rec["direction"] == "outgoing" else "from"
    lines = [f"migration {rec['id']} of {rec['vm']} {way} {rec['peer']}: {rec['status']}"]
    if rec.get("error"):
        lines.append(f"  error: {rec['error']}")
    if rec.get("progress"):
        lines.append("  " + "  ".join(progress_fields(rec)[1:]))
    for key, label, fmt in (("total_time_ms", "total", "{:.1f} ms"),
                            ("downtime_ms", "downtime", "{:.2f} ms"), ("nrounds", "rounds", "{}"),
                            ("bytes_sent", "bytes sent", "{:,}"),
                            ("throttle_pct", "throttle", "{} %"), ("converged", "converged", "{}")):
        if key == "converged" and (rec["direction"] != "outgoing" or s.get("mode") != "precopy"
                                   or rec["status"] != "completed"):
            continue   # post-copy switches over on purpose; the receiver judges nothing
        if key in s and s[key] is not None:
            lines.append(f"  {label:12} " + fmt.format(s[key]))
    if s.get("data_path"):
        lines.append(f"  {'pages on':12} {s['data_path']}")
    pc = s.get("postcopy") or {}
    if pc.get("duration_ms"):
        lines.append(f"  {'post-copy':12} {pc['duration_ms']:.1f} ms, {pc['pages_pushed']:,} pages "
                     f"pushed, {pc['pages_requested']:,} requested, "
                     f"{pc['recoveries']} recoveries")
        if pc.get("push_path"):
            lines.append(f"  {'pushed on':12} {pc['push_path']}")
    return "\n".join(lines)


def cmd_postcopy(args) -> int:
    rec = control_client(args).call("migration.postcopy", vm=args.vm)
    emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']} will switch to post-copy "
                               "after its current round")
    return EXIT_OK


def cmd_recover(args) -> int:
    rec = control_client(args).call("migration.recover", vm=args.vm)
    emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']}: reconnecting now "
                               f"({r['status']})")
    return EXIT_OK


def cmd_migrate(args) -> int:
    from ..service.display import ProgressView
    from ..stats import ACTIVE_STATUSES

    client = control_client(args)
    opts = _migration_options(args)
    if args.timeout is not None:
        opts.update(timeout_s=args.timeout, timeout_action=args.timeout_action)
    rec = client.call("migrate", name=args.vm, to=args.to, **opts)
    if args.no_wait:
        emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']} started; follow it with "
                                   f"`livemig status {r['vm']} --watch`")
        return EXIT_OK
    view = None if args.json else ProgressView(sys.stdout, tty=sys.stdout.isatty())
    try:
        while rec["status"] in ACTIVE_STATUSES:
            rec = client.call("migration.wait", id=rec["id"], timeout_s=PROGRESS_PERIOD_S)
            if view is not None and rec["status"] in ACTIVE_STATUSES:
                view.show([rec])
    except KeyboardInterrupt:
        # An attached migration never goes on unseen: Ctrl-C cancels it.
        print("\ninterrupted: cancelling the migration ...", file=sys.stderr, flush=True)
        rec = client.call("migration.cancel", key=rec["id"])
    if view is not None:
        view.done()
    emit(args, rec, _summary)
    if rec.get("warning"):
        print(f"WARNING: {rec['warning']}", file=sys.stderr)
    return EXIT_OK if rec["status"] == "completed" else EXIT_FAILED


def cmd_status(args) -> int:
    from ..service.display import ProgressView
    from ..stats import ACTIVE_STATUSES

    client = control_client(args)
    if args.watch and not args.json:
        _watch(client, args.id, ProgressView(sys.stdout, tty=sys.stdout.isatty()))
    if args.id is None:
        res = client.call("status")
        emit(args, res, lambda r: format_vms(r["vms"]) + "\n" + (
            "\n".join(_summary(m) for m in r["migrations"]) or "no migrations"))
        return EXIT_OK
    rec = client.call("migration.find", key=args.id)
    while args.json and args.watch and rec["status"] in ACTIVE_STATUSES:
        rec = client.call("migration.wait", id=rec["id"], timeout_s=PROGRESS_PERIOD_S)
    emit(args, rec, _summary)
    return EXIT_OK


def _watch(client, key, view) -> None:
    """Redraw the active migrations (all, or the one ``key`` names) until none is left."""
    from ..stats import ACTIVE_STATUSES

    while True:
        if key is None:
            recs = [m for m in client.call("status")["migrations"]
                    if m["status"] in ACTIVE_STATUSES]
        else:
            recs = [client.call("migration.find", key=key)]
            recs = [r for r in recs if r["status"] in ACTIVE_STATUSES]
        if not recs:
            view.done()
            return
        view.show(recs)
        time.sleep(PROGRESS_PERIOD_S)


def cmd_cancel(args) -> int:
    rec = control_client(args).call("migration.cancel", key=args.migration)
    emit(args, rec, _summary)
    return EXIT_OK if rec["status"] == "cancelled" else EXIT_FAILED


def cmd_migrate_set(args) -> int:
    opts = {}
    if args.downtime_ms is not None:
        opts["downtime_ms"] = args.downtime_ms
    if args.max_bandwidth is not None:
        opts["max_bandwidth"] = args.max_bandwidth
    if args.unlimited_bandwidth:
        opts["unlimited_bandwidth"] = True
    rec = control_client(args).call("migration.set", key=args.migration, **opts)
    changed = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in opts.items())
    emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']} ({r['status']}): {changed} "
                               "from now on")
    return EXIT_OK


def _na(value, fmt="{}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _format_history(rows) -> str:
    if not rows:
        return "no migrations recorded"
    out = [f"{'FINISHED':20} {'ID':>4} {'VM':12} {'DIR':3} {'PEER':21} {'MODE':8} {'STATUS':10} "
           f"{'TOTAL':>9} {'DOWNTIME':>9} {'ROUNDS':>6} CONVERGED"]
    for r in rows:
        out.append(f"{r['finished_at']:20} {r['id']:>4} {r['vm']:12} "
                   f"{'out' if r['direction'] == 'outgoing' else 'in':3} {r['peer']:21} "
                   f"{_na(r['mode']):8} {r['status']:10} "
                   f"{_na(r['total_time_ms'], '{:.0f} ms'):>9} "
                   f"{_na(r['downtime_ms'], '{:.1f} ms'):>9} {_na(r['rounds']):>6} "
                   f"{_na(r['converged'])}")
        if r.get("error"):
            out.append(f"{'':20} error: {r['error']}")
    return "\n".join(out)


def cmd_history(args) -> int:
    emit(args, control_client(args).call("history", limit=args.limit), _format_history)
    return EXIT_OK


def register(sub) -> None:
    sp = sub.add_parser("migrate", help="migrate a VM to another daemon")
    sp.add_argument("vm")
    sp.add_argument("--to", required=True, help="the destination daemon's HOST:PORT")
    sp.add_argument("--mode", default="precopy", choices=["precopy", "postcopy", "hybrid"])
    sp.add_argument("--downtime-ms", type=positive(float), help="downtime limit (default 300)")
    sp.add_argument("--max-bandwidth",
                    help="cap on pre-copy rounds and the post-copy bulk push, e.g. 100MiB/s or "
                         "1Gbit/s; post-copy fault replies (urgent channel) are not capped, "
                         "so the guest never waits on the cap for a page it needs")
    sp.add_argument("--auto-converge", action="store_true", help="throttle vCPUs if not converging")
    sp.add_argument("--max-rounds", type=positive(int))
    sp.add_argument("--timeout", type=positive(float), metavar="S",
                    help="if pre-copy has not switched over after S seconds, take "
                         "--timeout-action")
    sp.add_argument("--timeout-action", default="cancel", choices=["cancel", "postcopy"],
                    help="cancel (at once; the VM stays here) or switch to post-copy (when "
                         "the round in flight ends) (default: %(default)s)")
    sp.add_argument("--postcopy-after-rounds", type=int,
                    help="hybrid: switch to post-copy after this many pre-copy rounds")
    sp.add_argument("--streams", type=int, metavar="N",
                    help="bulk page streams on native threads (default: one per CPU, at most "
                         "4; 0 = pages on the Python path)")
    sp.add_argument("--resume-timeout", type=float, metavar="S",
                    help="pre-copy: how long a link break during the rounds may last; the VM "
                         "runs on here and the migration resumes where it stopped (default 60; "
                         "0 = fail at once)")
    sp.add_argument("--no-wait", action="store_true", help="start it and return")
    sp.add_argument("--server-name", help="TLS name of the destination (default: its host)")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_migrate)

    sp = sub.add_parser("postcopy", help="switch an ongoing migration of VM to post-copy now")
    sp.add_argument("vm")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_postcopy)

    sp = sub.add_parser("recover", help="retry a broken post-copy connection of VM now")
    sp.add_argument("vm")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_recover)

    sp = sub.add_parser("status", help="a daemon's VMs and migrations, or one migration")
    sp.add_argument("id", nargs="?", metavar="ID|VM",
                    help="a migration id, or a VM name for its latest migration")
    sp.add_argument("--watch", action="store_true",
                    help="follow the migration (without ID|VM: every active one) until it ends")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("cancel", help="cancel a migration before its switchover; "
                        "the VM runs on at the source")
    sp.add_argument("migration", metavar="VM|ID")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_cancel)

    sp = sub.add_parser("migrate-set", help="change the limits of a running migration")
    sp.add_argument("migration", metavar="VM|ID")
    sp.add_argument("--downtime-ms", type=positive(float), help="new downtime limit")
    sp.add_argument("--max-bandwidth", help="new bandwidth cap, e.g. 100MiB/s or 1Gbit/s")
    sp.add_argument("--unlimited-bandwidth", action="store_true", help="lift the cap")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_migrate_set)

    sp = sub.add_parser("history", help="finished migrations, kept across daemon restarts")
    sp.add_argument("--limit", type=positive(int), help="only the last N")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_history)
