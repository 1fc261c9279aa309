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

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_ERROR = 0, 1, 2, 3, 4
PROGRESS_PERIOD_S = 0.25
"""How often an attached command asks the daemon for progress."""


def _positive(kind):
    """An argparse type: a number > 0 (argparse names the flag in the error)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


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
        return _stop_daemon(args, client)
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

    if args.config:
        from .service.config_file import apply_config_file
        apply_config_file(args, args.daemon_parser, args.argv[1:])   # argv[0] is "daemon"
    if args.action != "run":
        return _cmd_daemon_stop_or_drain(args)
    tls = None
    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if any(given):
        if not all(given):
            raise ConfigError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        for flag, path in zip(("--tls-cert", "--tls-key", "--tls-ca"), given):
            if not os.access(path, os.R_OK):
                raise ConfigError(f"{flag} {path}: no such readable file; the daemon did not "
                                  "start")
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca)
    if args.insecure_no_tls:
        print("WARNING: --insecure-no-tls: migrations on this daemon are neither authenticated "
              "nor encrypted; anyone who reaches the port can deliver or read VMs",
              file=sys.stderr)
    control = args.control or default_control_path(args.listen, what="--listen")

    if args.detach:
        from .service.detach import detach

        return detach(args.argv, control_path=control, state_dir=args.state_dir,
                      listen=args.listen, as_json=args.json)
    from .service.eventlog import configure

    configure(args.log_level, args.log_file, args.log_json)

    async def main() -> None:
        daemon = Daemon(listen=args.listen, control_path=control, tls=tls,
                        insecure=args.insecure_no_tls,
                        postcopy_recovery_timeout_s=args.postcopy_recovery_timeout,
                        state_dir=args.state_dir, metrics=args.metrics,
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
    if args.streams is not None:
        opts["streams"] = args.streams
    return opts


def _summary(rec) -> str:
    from .service.display import progress_fields

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
    from .service.display import ProgressView
    from .stats import ACTIVE_STATUSES

    client = _client(args)
    opts = _migration_options(args)
    if args.timeout is not None:
        opts.update(timeout_s=args.timeout, timeout_action=args.timeout_action)
    rec = client.call("migrate", name=args.vm, to=args.to, **opts)
    if args.no_wait:
        _emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']} started; follow it with "
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
    _emit(args, rec, _summary)
    if rec.get("warning"):
        print(f"WARNING: {rec['warning']}", file=sys.stderr)
    return EXIT_OK if rec["status"] == "completed" else EXIT_FAILED


def cmd_status(args) -> int:
    from .service.display import ProgressView
    from .stats import ACTIVE_STATUSES

    client = _client(args)
    if args.watch and not args.json:
        _watch(client, args.id, ProgressView(sys.stdout, tty=sys.stdout.isatty()))
    if args.id is None:
        res = client.call("status")
        _emit(args, res, lambda r: _format_vms(r["vms"]) + "\n" + (
            "\n".join(_summary(m) for m in r["migrations"]) or "no migrations"))
        return EXIT_OK
    rec = client.call("migration.find", key=args.id)
    while args.json and args.watch and rec["status"] in ACTIVE_STATUSES:
        rec = client.call("migration.wait", id=rec["id"], timeout_s=PROGRESS_PERIOD_S)
    _emit(args, rec, _summary)
    return EXIT_OK


def _watch(client, key, view) -> None:
    """Redraw the active migrations (all, or the one ``key`` names) until none is left."""
    from .stats import ACTIVE_STATUSES

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
    rec = _client(args).call("migration.cancel", key=args.migration)
    _emit(args, rec, _summary)
    return EXIT_OK if rec["status"] == "cancelled" else EXIT_FAILED


def cmd_migrate_set(args) -> int:
    opts = {}
    if args.downtime_ms is not None:
        opts["downtime_ms"] = args.downtime_ms
    if args.max_bandwidth is not None:
        opts["max_bandwidth"] = args.max_bandwidth
    if args.unlimited_bandwidth:
        opts["unlimited_bandwidth"] = True
    rec = _client(args).call("migration.set", key=args.migration, **opts)
    changed = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in opts.items())
    _emit(args, rec, lambda r: f"migration {r['id']} of {r['vm']} ({r['status']}): {changed} "
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
    _emit(args, _client(args).call("history", limit=args.limit), _format_history)
    return EXIT_OK


def cmd_shutdown(args) -> int:
    return _stop_daemon(args, _client(args))


def _stop_daemon(args, client) -> int:
    """``livemig shutdown`` and ``livemig daemon stop``: refused while the daemon
    hosts VMs or migrations, unless ``--force``."""
    _emit(args, client.call("shutdown", force=args.force), "daemon stopping")
    return EXIT_OK


def cmd_vm_save(args) -> int:
    res = _client(args).call("vm.save", name=args.name, path=os.path.abspath(args.file))
    _emit(args, res, lambda r: f"saved VM {r['name']} to {r['path']} ({r['bytes']:,} bytes)")
    return EXIT_OK


def cmd_vm_restore(args) -> int:
    res = _client(args).call("vm.restore", path=os.path.abspath(args.file), name=args.name,
                             paused=args.paused)
    _emit(args, res, lambda r: f"restored VM {r['name']} from {args.file} "
                               f"({'running' if r['running'] else 'paused'})")
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


DEFAULT_DIRTY_RATE = "64MiB/s"
"""A VM's default pace: visible dirtying that pre-copy converges on over
loopback, without taking a CPU away from everything else."""


def cmd_completion(args) -> int:
    from .clicompletion import completion_script

    print(completion_script(args.shell, build_parser()), end="")
    return EXIT_OK


def _dirty_rate(text: str):
    """``--dirty-rate``: bytes/s (the ``/s`` is required), or 'unpaced' (None)."""
    from .units import parse_rate

    if text == "unpaced":
        return None
    if not text.rstrip().endswith(("/s", "ps")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate: write it per second, "
                                         f"e.g. {text.strip()}/s, or 'unpaced'")
    try:
        return parse_rate(text, what="--dirty-rate")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from .vm.programs import WORKLOADS

    # The package is always imported before its modules; its version is read
    # from it rather than imported (the facade ranks above the CLI).
    version = sys.modules[__package__].__version__

    p = argparse.ArgumentParser(prog="livemig", description="Live migration of toy VMs.")
    p.add_argument("--version", action="version", version=f"livemig {version}")
    sub = p.add_subparsers(dest="command", required=True)

    def daemon_opts(sp):
        sp.add_argument("--daemon", default="127.0.0.1:7400",
                        help="the daemon's listen address, used to find its control socket "
                             "(default: %(default)s)")
        sp.add_argument("--control", help="path of the daemon's control socket "
                        "(default: $LIVEMIG_CONTROL or derived from --daemon)")
        sp.add_argument("--json", action="store_true", help="print one JSON document")

    def vm_opts(sp):
        sp.add_argument("--memory", default="256MiB",
                        help="guest memory size in binary units: 1GiB = 1G = 1GB = 2^30 bytes "
                             "(default: %(default)s)")
        sp.add_argument("--vcpus", type=_positive(int), default=2)
        sp.add_argument("--workload", default="memtest", choices=sorted(WORKLOADS),
                        help="guest program (default: %(default)s; see docs/vm.md)")
        sp.add_argument("--dirty-rate", default=DEFAULT_DIRTY_RATE, type=_dirty_rate,
                        help="target dirty rate in bytes per second, e.g. 64MiB/s or 1Gbit/s "
                             "(default: %(default)s); 'unpaced' runs the vCPUs flat out, "
                             "one whole CPU each")
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

    sp = sub.add_parser("daemon", help="run a daemon hosting VMs and accepting migrations")
    sp.add_argument("--config", metavar="FILE", help="TOML file of settings named as these "
                    "flags (log-level = \"debug\"); flags given here win")
    sp.add_argument("--listen", default="127.0.0.1:7400", help="HOST:PORT for incoming migrations")
    sp.add_argument("--control", help="control socket path (default: $XDG_RUNTIME_DIR or /tmp)")
    sp.add_argument("--tls-cert")
    sp.add_argument("--tls-key")
    sp.add_argument("--tls-ca", help="CA that signs the peers' certificates (mutual TLS)")
    sp.add_argument("--insecure-no-tls", action="store_true",
                    help="allow a non-loopback listen address without TLS (dangerous)")
    sp.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    sp.add_argument("--state-dir", help="where the migration history (and, with --detach, the "
                    "log) is kept (default: $XDG_STATE_HOME/livemig or ~/.local/state/livemig)")
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="event log level (default: %(default)s)")
    sp.add_argument("--log-file", help="write the event log here (default: stderr)")
    sp.add_argument("--log-json", action="store_true", help="event log as JSON lines")
    sp.add_argument("--metrics", metavar="HOST:PORT",
                    help="serve Prometheus text metrics at http://HOST:PORT/metrics "
                         "(plain HTTP: keep it on loopback)")
    sp.add_argument("--detach", action="store_true",
                    help="run in the background; return once the daemon answers")
    sp.add_argument("--json", action="store_true", help="with --detach, stop or drain: print one JSON document")
    sp.add_argument("--postcopy-recovery-timeout", type=_positive(float), default=30.0,
                    metavar="S",
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
    sp.set_defaults(func=cmd_daemon, daemon_parser=sp)

    sp = sub.add_parser("migrate", help="migrate a VM to another daemon")
    sp.add_argument("vm")
    sp.add_argument("--to", required=True, help="the destination daemon's HOST:PORT")
    sp.add_argument("--mode", default="precopy", choices=["precopy", "postcopy", "hybrid"])
    sp.add_argument("--downtime-ms", type=_positive(float), help="downtime limit (default 300)")
    sp.add_argument("--max-bandwidth",
                    help="cap on pre-copy rounds and the post-copy bulk push, e.g. 100MiB/s or "
                         "1Gbit/s; post-copy fault replies (urgent channel) are not capped, "
                         "so the guest never waits on the cap for a page it needs")
    sp.add_argument("--auto-converge", action="store_true", help="throttle vCPUs if not converging")
    sp.add_argument("--max-rounds", type=_positive(int))
    sp.add_argument("--timeout", type=_positive(float), metavar="S",
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
    sp.add_argument("--downtime-ms", type=_positive(float), help="new downtime limit")
    sp.add_argument("--max-bandwidth", help="new bandwidth cap, e.g. 100MiB/s or 1Gbit/s")
    sp.add_argument("--unlimited-bandwidth", action="store_true", help="lift the cap")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_migrate_set)

    sp = sub.add_parser("history", help="finished migrations, kept across daemon restarts")
    sp.add_argument("--limit", type=_positive(int), help="only the last N")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_history)

    sp = sub.add_parser("shutdown", help="stop a daemon; refused while it hosts VMs or "
                        "migrations, unless --force (the same as `daemon stop`)")
    sp.add_argument("--force", action="store_true",
                    help="stop even so: migrations are cancelled, VMs stopped")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_shutdown)

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

    from .clicompletion import SHELLS
    sp = sub.add_parser("completion", help="print a shell completion script "
                        "(bash: source <(livemig completion bash))")
    sp.add_argument("shell", choices=SHELLS)
    sp.set_defaults(func=cmd_completion)
    return p


def _fail(args, exc: BaseException, code: int) -> int:
    """One line on stderr; with --json also an error object on stdout."""
    print(f"livemig: {exc}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": {
            "type": getattr(exc, "error_type", None) or type(exc).__name__,
            "message": str(exc), "exit_code": code}}, indent=2))
    return code


def _exit_code(exc: ControlError) -> int:
    if exc.error_type == "NoDaemon":
        return EXIT_NO_DAEMON
    if exc.error_type == "ConfigError":
        return EXIT_USAGE
    return EXIT_FAILED if exc.error_type in ("NoSuchVM", "NoSuchMigration", "Busy", "VMExists",
                                             "Refused", "InDoubt") \
        else EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args.func(args)
    except ConfigError as exc:
        return _fail(args, exc, EXIT_USAGE)
    except ControlError as exc:
        return _fail(args, exc, _exit_code(exc))
    except LivemigError as exc:
        return _fail(args, exc, EXIT_ERROR)
    except BrokenPipeError:
        # `livemig ... | head`: the reader left; so do we, quietly. Point
        # stdout at /dev/null so the interpreter's final flush does not fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:
        # The host refused (address in use, no such file): one line, no traceback.
        return _fail(args, exc, EXIT_ERROR)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
