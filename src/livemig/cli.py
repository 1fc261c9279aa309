"""The ``livemig`` command line.

Every subcommand prints for people by default and one JSON document with
``--json``. Exit codes: 0 success; 1 the operation failed (for a migration:
it did not complete and the VM runs on at its source); 2 bad usage or
configuration; 3 no daemon at the control socket; 4 any other livemig error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .config import parse_max_bandwidth
from .errors import ConfigError, ControlError, LivemigError
from .units import MIB

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_ERROR = 0, 1, 2, 3, 4


def _emit(args, obj, human) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(human(obj) if callable(human) else human)


def _control_path(args) -> str:
    from .service.daemon import default_control_path

    if args.control:
        return args.control
    if os.environ.get("LIVEMIG_CONTROL"):
        return os.environ["LIVEMIG_CONTROL"]
    return default_control_path(args.daemon, what="--daemon")


def _client(args):
    from .service.control import ControlClient

    return ControlClient(_control_path(args), timeout_s=None)


# -- probe -----------------------------------------------------------------------
def cmd_probe(args) -> int:
    from .analysis.probe import format_probe, probe_host

    report = probe_host()
    _emit(args, report, format_probe)
    return EXIT_OK


# -- vm ------------------------------------------------------------------------------
def cmd_vm_run(args) -> int:
    from .vm.runner import run_tracked

    return run_tracked(memory=args.memory, vcpus=args.vcpus, workload=args.workload,
                       dirty_rate=args.dirty_rate, seconds=args.seconds, tracker=args.tracker,
                       interval_s=args.interval, as_json=args.json, seed=args.seed)


def cmd_vm_start(args) -> int:
    res = _client(args).call("vm.start", name=args.name, memory=args.memory, vcpus=args.vcpus,
                             workload=args.workload, dirty_rate=args.dirty_rate, seed=args.seed)
    _emit(args, res, lambda r: f"started VM {r['name']}: {r['workload']}, "
                               f"{r['memory_bytes'] >> 20} MiB, {r['vcpus']} vCPUs")
    return EXIT_OK


def _format_vms(vms) -> str:
    if not vms:
        return "no VMs"
    rows = [f"{'NAME':16} {'MEMORY':>9} {'VCPUS':>5} {'WORKLOAD':10} {'STATE':9} ORIGIN"]
    for v in vms:
        state = "migrating" if v["migrating"] else "in-doubt" if v.get("unresolved") else (
            "running" if v["running"] else "paused")
        rows.append(f"{v['name']:16} {v['memory_bytes'] >> 20:>5} MiB {v['vcpus']:>5} "
                    f"{v['workload']:10} {state:9} {v['origin']}")
    return "\n".join(rows)


def cmd_vm_list(args) -> int:
    _emit(args, _client(args).call("vm.list"), _format_vms)
    return EXIT_OK


def cmd_vm_resolve(args) -> int:
    action = "resume" if args.resume else "discard" if args.discard else None
    if action is not None and not args.json:
        print(f"WARNING: deciding by hand where VM {args.name} lives; livemig refuses if the "
              "destination answers and the decision would run the VM twice or lose it, but "
              "cannot check a destination it cannot reach", file=sys.stderr)
    res = _client(args).call("vm.resolve", name=args.name, action=action)

    def human(r) -> str:
        text = (f"VM {r['name']}: {r['resolved']} here (the destination says: "
                f"{r['destination_says']}{': ' + r['reason'] if r['reason'] else ''})")
        return f"{text}\n{r['warning']}" if r["warning"] else text
    _emit(args, res, human)
    return EXIT_OK


def cmd_vm_stop(args) -> int:
    res = _client(args).call("vm.stop", name=args.name)
    _emit(args, res, f"stopped VM {args.name}")
    return EXIT_OK


# -- daemon ------------------------------------------------------------------------------
def _add_daemon_limit_flags(sp) -> None:
    sp.add_argument("--max-incoming-memory", metavar="SIZE",
                    help="guest memory all arriving VMs together may take; offers beyond it "
                         "are refused before any page travels (default: half of the host's "
                         "MemAvailable at start)")
    sp.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                    help="give up an incoming pre-copy migration whose source sends nothing "
                         "for this long: the copy here is freed, the source resumes (default 60)")


def _cmd_daemon_stop_or_drain(args) -> int:
    """``livemig daemon stop [--force]`` and ``livemig daemon drain --to HOST:PORT``."""
    from .service.control import ControlClient
    from .service.daemon import default_control_path

    client = ControlClient(args.control or default_control_path(args.listen, what="--listen"),
                           timeout_s=None)
    if args.action == "stop":
        _emit(args, client.call("shutdown", force=args.force), "daemon stopping")
        return EXIT_OK
    if not args.to:
        raise ConfigError("livemig daemon drain needs --to HOST:PORT, the daemon to move "
                          "every VM to")
    res = client.call("daemon.drain", to=args.to)
    kept = "".join(f"\n  kept {name}: {why}" for name, why in res["kept"].items())
    _emit(args, res, f"moved to {res['to']}: {', '.join(res['moved']) or 'none'}{kept}\n"
                     + ("daemon stopping" if res["stopping"] else
                        "the daemon keeps running: VMs remain here"))
    return EXIT_OK if res["stopping"] else EXIT_FAILED


def _daemon_limits(args) -> dict:
    from .units import parse_size

    limit = args.max_incoming_memory
    return {"max_incoming_memory_bytes":
            parse_size(limit, what="--max-incoming-memory") if limit else None,
            "idle_timeout_s": args.idle_timeout}


def cmd_daemon(args) -> int:
    from .aio.loop import run
    from .service.daemon import Daemon, TlsFiles, default_control_path

    if args.action != "run":
        return _cmd_daemon_stop_or_drain(args)
    tls = None
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(given):
        if not all(given):
            raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    if args.insecure_no_tls:
        print("WARNING: --insecure-no-tls: migrations on this daemon are neither authenticated "
              "nor encrypted; anyone who reaches the port can deliver or read VMs",
              file=sys.stderr)
    control = args.control or default_control_path(args.listen, what="--listen")

    async def main() -> None:
        daemon = Daemon(listen=args.listen, control_path=control, tls=tls,
                        insecure=args.insecure_no_tls,
                        postcopy_recovery_timeout_s=args.postcopy_recovery_timeout,
                        **_daemon_limits(args))
        await daemon.start()
        print(f"livemig daemon listening on {daemon.listen_host}:{daemon.listen_port} "
              f"({'mutual TLS' if tls else 'no TLS'}), control socket {control}", flush=True)
        await daemon.serve_forever()

    run(main(), kind=args.loop)
    return EXIT_OK


# -- migrate / status ----------------------------------------------------------------------
def _limit_options(args) -> dict:
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
    opts = {"mode": args.mode, **_limit_options(args)}
    if args.auto_converge:
        opts["auto_converge"] = True
    if args.max_rounds is not None:
        opts["max_rounds"] = args.max_rounds
    if args.postcopy_after_rounds is not None:
        opts["hybrid_postcopy_after_rounds"] = args.postcopy_after_rounds
    return opts


def _progress_line(rec) -> str:
    s = rec.get("stats") or {}
    remaining = s.get("remaining_bytes", 0) / MIB
    tput = s.get("throughput_bps", 0) / MIB
    rate = s.get("throughput_bps") or 0
    eta = s.get("remaining_bytes", 0) / rate if rate > 0 else None
    return (f"\r[{rec['status']:>9}] round {s.get('nrounds', 0):>3}  remaining {remaining:8.1f} MiB"
            f"  {tput:7.1f} MiB/s  expected downtime {s.get('expected_downtime_ms', 0):7.1f} ms"
            f"  ETA {'-' if eta is None else f'{eta:5.1f} s'}   ")


def _summary(rec) -> str:
    s = rec.get("stats") or {}
    lines = [f"migration {rec['id']} of {rec['vm']} to {rec['peer']}: {rec['status']}"]
    if rec.get("error"):
        lines.append(f"  error: {rec['error']}")
    for key, label, fmt in (("total_time_ms", "total", "{:.1f} ms"),
                            ("downtime_ms", "downtime", "{:.2f} ms"), ("nrounds", "rounds", "{}"),
                            ("bytes_sent", "bytes sent", "{:,}"),
                            ("throttle_pct", "throttle", "{} %"), ("converged", "converged", "{}")):
        if key in s and s[key] is not None:
            lines.append(f"  {label:12} " + fmt.format(s[key]))
    pc = s.get("postcopy") or {}
    if pc.get("duration_ms"):
        lines.append(f"  {'post-copy':12} {pc['duration_ms']:.1f} ms, {pc['pages_pushed']:,} pages "
                     f"pushed, {pc['pages_requested']:,} requested, "
                     f"{pc['recoveries']} recoveries")
    return "\n".join(lines)


def cmd_postcopy(args) -> int:
    rec = _client(args).call("migration.postcopy", vm=args.vm)
    _emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']} will switch to post-copy "
                               "after its current round")
    return EXIT_OK


def cmd_recover(args) -> int:
    rec = _client(args).call("migration.recover", vm=args.vm)
    _emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']}: reconnecting now "
                               f"({r['status']})")
    return EXIT_OK


def cmd_migrate(args) -> int:
    from .stats import ACTIVE_STATUSES

    client = _client(args)
    rec = client.call("migrate", name=args.vm, to=args.to, **_migration_options(args))
    if args.no_wait:
        _emit(args, rec, lambda r: f"migration {r['id']} started")
        return EXIT_OK
    tty = sys.stdout.isatty() and not args.json
    while rec["status"] in ACTIVE_STATUSES:
        rec = client.call("migration.wait", id=rec["id"], timeout_s=0.25 if tty else 5.0)
        if tty:
            print(_progress_line(rec), end="", flush=True)
    if tty:
        print()
    _emit(args, rec, _summary)
    if rec.get("warning"):
        print(f"WARNING: {rec['warning']}", file=sys.stderr)
    return EXIT_OK if rec["status"] == "completed" else EXIT_FAILED


def cmd_status(args) -> int:
    from .stats import ACTIVE_STATUSES

    client = _client(args)
    if args.id is None:
        res = client.call("status")
        _emit(args, res, lambda r: _format_vms(r["vms"]) + "\n" + (
            "\n".join(_summary(m) for m in r["migrations"]) or "no migrations"))
        return EXIT_OK
    tty = sys.stdout.isatty() and not args.json
    rec = client.call("status", id=args.id)
    while args.watch and rec["status"] in ACTIVE_STATUSES:
        if tty:
            print(_progress_line(rec), end="", flush=True)
        time.sleep(0.25)
        rec = client.call("status", id=args.id)
    if tty and args.watch:
        print()
    _emit(args, rec, _summary)
    return EXIT_OK


# -- demo ------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .lab.demo import run_demo

    return run_demo(memory=args.memory, dirty_rate=args.dirty_rate, as_json=args.json,
                    loop=args.loop)


# -- dirtyrate / plan / bench --------------------------------------------------------------
def cmd_dirtyrate(args) -> int:
    from .analysis.dirtyrate import format_report

    res = _client(args).call("dirtyrate", name=args.vm, window_s=args.window,
                             method=args.method, interval_s=args.interval)
    _emit(args, res, format_report)
    return EXIT_OK


def cmd_plan(args) -> int:
    from .analysis.plan import format_plan

    res = _client(args).call("plan", name=args.vm, to=args.to, window_s=args.window,
                             probe_time_s=args.probe_time, **_limit_options(args))
    _emit(args, res, format_plan)
    return EXIT_OK


def cmd_bench_convergence(args) -> int:
    from .lab.sweep import run_sweep_cli

    return run_sweep_cli(profile=args.profile, out_dir=args.out, link=args.link,
                         as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livemig", description="Live migration of toy VMs.")
    sub = p.add_subparsers(dest="command", required=True)

    def daemon_opts(sp):
        sp.add_argument("--daemon", default="127.0.0.1:7400",
                        help="the daemon's listen address, used to find its control socket")
        sp.add_argument("--control", help="path of the daemon's control socket "
                        "(default: $LIVEMIG_CONTROL or derived from --daemon)")
        sp.add_argument("--json", action="store_true", help="print one JSON document")

    def vm_opts(sp):
        sp.add_argument("--memory", default="256MiB", help="guest memory size, e.g. 1GiB")
        sp.add_argument("--vcpus", type=int, default=2)
        sp.add_argument("--workload", default="memtest",
                        choices=["idle", "uniform", "hotset", "sweep", "memtest"])
        sp.add_argument("--dirty-rate", help="target dirty rate, e.g. 64MiB/s (default: unpaced)")
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("probe", help="what this kernel allows: userfaultfd, PAGEMAP_SCAN, trackers")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_probe)

    vm = sub.add_parser("vm", help="run or manage VMs").add_subparsers(dest="vm_command", required=True)
    sp = vm.add_parser("run", help="run a VM here under dirty tracking and report its dirty rate")
    vm_opts(sp)
    sp.add_argument("--seconds", type=float, default=5.0)
    sp.add_argument("--interval", type=float, default=1.0, help="report interval in seconds")
    sp.add_argument("--tracker", default="auto", help="auto, uffd-async, uffd-wp or mprotect")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_vm_run)
    sp = vm.add_parser("start", help="start a VM on a daemon")
    sp.add_argument("name")
    vm_opts(sp)
    daemon_opts(sp)
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

    sp = sub.add_parser("daemon", help="run a daemon hosting VMs and accepting migrations")
    sp.add_argument("--listen", default="127.0.0.1:7400", help="HOST:PORT for incoming migrations")
    sp.add_argument("--control", help="control socket path (default: $XDG_RUNTIME_DIR or /tmp)")
    sp.add_argument("--tls-cert")
    sp.add_argument("--tls-key")
    sp.add_argument("--tls-ca", help="CA that signs the peers' certificates (mutual TLS)")
    sp.add_argument("--insecure-no-tls", action="store_true",
                    help="allow a non-loopback listen address without TLS (dangerous)")
    sp.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    sp.add_argument("--postcopy-recovery-timeout", type=float, default=30.0, metavar="S",
                    help="how long an incoming post-copy migration waits for a lost source "
                         "to reconnect before the VM is declared lost and stopped (default 30)")
    _add_daemon_limit_flags(sp)
    sp.add_argument("action", nargs="?", default="run", choices=["run", "stop", "drain"],
                    help="run (default) a daemon; stop the one at --listen/--control "
                         "(refused while it hosts VMs or migrations, unless --force); drain "
                         "it: migrate every VM --to another daemon, then stop")
    sp.add_argument("--force", action="store_true",
                    help="stop: stop even with VMs here (outgoing migrations are cancelled "
                         "and their VMs resume here first; every VM here is then stopped)")
    sp.add_argument("--to", metavar="HOST:PORT", help="drain: the daemon to move every VM to")
    sp.add_argument("--json", action="store_true", help="stop/drain: print the answer as JSON")
    sp.set_defaults(func=cmd_daemon)

    sp = sub.add_parser("migrate", help="migrate a VM to another daemon")
    sp.add_argument("vm")
    sp.add_argument("--to", required=True, help="the destination daemon's HOST:PORT")
    sp.add_argument("--mode", default="precopy", choices=["precopy", "postcopy", "hybrid"])
    sp.add_argument("--downtime-ms", type=float, help="downtime limit (default 300)")
    sp.add_argument("--max-bandwidth",
                    help="cap on pre-copy rounds and the post-copy bulk push, e.g. 100MiB/s or "
                         "1Gbit/s; post-copy fault replies (urgent channel) are not capped, "
                         "so the guest never waits on the cap for a page it needs")
    sp.add_argument("--auto-converge", action="store_true", help="throttle vCPUs if not converging")
    sp.add_argument("--max-rounds", type=int)
    sp.add_argument("--postcopy-after-rounds", type=int,
                    help="hybrid: switch to post-copy after this many pre-copy rounds")
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
    sp.add_argument("id", nargs="?", type=int)
    sp.add_argument("--watch", action="store_true", help="follow a migration until it ends")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("dirtyrate", help="measure a running VM's dirty rate (calc-dirty-rate)")
    sp.add_argument("vm")
    sp.add_argument("--window", type=float, default=1.0, help="measurement window in seconds")
    sp.add_argument("--method", default="auto", choices=["auto", "tracker", "hash-sample"],
                    help="auto: a tracker, or hash sampling while a migration tracks the VM")
    sp.add_argument("--interval", type=float, default=0.1,
                    help="tracker collect interval in seconds")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_dirtyrate)

    sp = sub.add_parser("plan", help="dry run: probe the link, measure the dirty rate, predict")
    sp.add_argument("vm")
    sp.add_argument("--to", required=True, help="the destination daemon's HOST:PORT")
    sp.add_argument("--downtime-ms", type=float, help="downtime limit (default 300)")
    sp.add_argument("--max-bandwidth", help="the cap the migration would run under")
    sp.add_argument("--window", type=float, default=1.0, help="dirty-rate window in seconds")
    sp.add_argument("--probe-time", type=float, default=1.0, help="bandwidth probe seconds")
    sp.add_argument("--server-name", help="TLS name of the destination (default: its host)")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command",
                                                                      required=True)
    sp = bench.add_parser("convergence", help="sweep dirty rate x mode x bandwidth x memory "
                          "x workload; JSON, Markdown table and plot")
    sp.add_argument("--profile", default="quick", choices=["tiny", "quick", "full"])
    sp.add_argument("--out", default="bench/results", help="output directory")
    sp.add_argument("--link", default="auto", choices=["auto", "netns", "ratelimit"],
                    help="how bandwidth is capped: netns+tc when available, else in-process")
    sp.add_argument("--json", action="store_true", help="print the result document")
    sp.set_defaults(func=cmd_bench_convergence)

    sp = sub.add_parser("demo", help="two daemons on loopback; a VM migrated there and back")
    sp.add_argument("--memory", default="256MiB")
    sp.add_argument("--dirty-rate", default="32MiB/s")
    sp.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"livemig: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"livemig: {exc}", file=sys.stderr)
        if exc.error_type == "NoDaemon":
            return EXIT_NO_DAEMON
        if exc.error_type == "ConfigError":
            return EXIT_USAGE
        return EXIT_FAILED if exc.error_type in ("NoSuchVM", "NoSuchMigration", "Busy", "VMExists",
                                                 "Refused", "InDoubt") \
            else EXIT_ERROR
    except LivemigError as exc:
        print(f"livemig: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
