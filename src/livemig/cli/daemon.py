"""``livemig daemon`` (run, stop, drain) and ``livemig shutdown``."""
from __future__ import annotations

import os
import sys

from ..errors import ConfigError
from .common import EXIT_FAILED, EXIT_OK, control_client, daemon_opts, emit, positive


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
    from ..service.control import ControlClient
    from ..service.daemon import default_control_path

    client = ControlClient(args.control or default_control_path(args.listen, what="--listen"),
                           timeout_s=None)
    if args.action == "stop":
        return _stop_daemon(args, client)
    if not args.to:
        raise ConfigError("livemig daemon drain needs --to HOST:PORT, the daemon to move "
                          "every VM to")
    res = client.call("daemon.drain", to=args.to)
    kept = "".join(f"\n  kept {name}: {why}" for name, why in res["kept"].items())
    emit(args, res, f"moved to {res['to']}: {', '.join(res['moved']) or 'none'}{kept}\n"
                     + ("daemon stopping" if res["stopping"] else
                        "the daemon keeps running: VMs remain here"))
    return EXIT_OK if res["stopping"] else EXIT_FAILED


def _daemon_limits(args) -> dict:
    from ..units import parse_size

    limit = args.max_incoming_memory
    return {"max_incoming_memory_bytes":
            parse_size(limit, what="--max-incoming-memory") if limit else None,
            "idle_timeout_s": args.idle_timeout}


def cmd_daemon(args) -> int:
    from ..aio.loop import run
    from ..service.daemon import Daemon, TlsFiles, default_control_path

    if args.config:
        from ..service.config_file import apply_config_file
        apply_config_file(args, args.daemon_parser, args.argv[1:])   # argv[0] is "daemon"
    if args.action != "run":
        return _cmd_daemon_stop_or_drain(args)
    if args.balance_controller and not args.fleet:
        raise ConfigError("--balance-controller needs --fleet etcd://HOST:PORT: the "
                          "controller is elected through the fleet's etcd")
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
        from ..service.detach import detach

        return detach(args.argv, control_path=control, state_dir=args.state_dir,
                      listen=args.listen, as_json=args.json)
    from ..service.eventlog import configure

    configure(args.log_level, args.log_file, args.log_json)

    async def main() -> None:
        daemon = Daemon(listen=args.listen, control_path=control, tls=tls,
                        insecure=args.insecure_no_tls,
                        postcopy_recovery_timeout_s=args.postcopy_recovery_timeout,
                        state_dir=args.state_dir, metrics=args.metrics,
                        advertise=args.advertise, **_daemon_limits(args))
        await daemon.start()
        if args.fleet:
            from ..fleet.member import FleetMember

            member = FleetMember(daemon, args.fleet, ttl_s=args.fleet_ttl,
                                 commit_timeout_s=args.fleet_commit_timeout,
                                 fast_commit=not args.fleet_loop_commit)
            try:
                await member.join()
            except BaseException:
                await member.close(leave=False)
                await daemon.close()      # joined nothing: serve nothing either
                raise
            daemon.fleet = member
            if args.balance_controller:
                from ..fleet.controller import BalanceController

                member.controller = BalanceController(member, interval_s=args.balance_interval,
                                                      window_s=args.balance_window)
                member.controller.start()
        print(f"livemig daemon listening on {daemon.listen_host}:{daemon.listen_port} "
              f"({'mutual TLS' if tls else 'no TLS'}), control socket {control}", flush=True)
        await daemon.serve_forever()

    run(main(), kind=args.loop)
    return EXIT_OK


def cmd_shutdown(args) -> int:
    return _stop_daemon(args, control_client(args))


def _stop_daemon(args, client) -> int:
    """``livemig shutdown`` and ``livemig daemon stop``: refused while the daemon
    hosts VMs or migrations, unless ``--force``."""
    emit(args, client.call("shutdown", force=args.force), "daemon stopping")
    return EXIT_OK


def register(sub) -> None:
    from ..fleet.balance import DEFAULT_WINDOW_S
    from ..fleet.controller import DEFAULT_INTERVAL_S

    sp = sub.add_parser("daemon", help="run a daemon hosting VMs and accepting migrations")
    sp.add_argument("--config", metavar="FILE", help="TOML file of settings named as these "
                    "flags (log-level = \"debug\"); flags given here win")
    sp.add_argument("--listen", default="127.0.0.1:7400", help="HOST:PORT for incoming migrations")
    sp.add_argument("--advertise", metavar="HOST:PORT",
                    help="the address other daemons reach this one at, if not --listen (behind "
                         "a NAT or a proxy); a fleet names the host by it")
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
    sp.add_argument("--postcopy-recovery-timeout", type=positive(float), default=30.0,
                    metavar="S",
                    help="how long an incoming post-copy migration waits for a lost source "
                         "to reconnect before the VM is declared lost and stopped (default 30)")
    _add_daemon_limit_flags(sp)
    sp.add_argument("--fleet", metavar="etcd://HOST:PORT[,…]",
                    help="join the fleet coordinated by this etcd: register the host under a "
                         "lease, and let etcd decide who owns each VM (docs/fleet.md)")
    sp.add_argument("--fleet-ttl", type=positive(int), default=10, metavar="S",
                    help="lease of this host's fleet record; lost after S s without etcd "
                         "(default 10)")
    sp.add_argument("--fleet-commit-timeout", type=positive(float), default=5.0, metavar="S",
                    help="how long an arriving VM's commit point tries to prove in etcd that "
                         "this host owns it; unproven by then, the VM is refused (default 5)")
    sp.add_argument("--fleet-loop-commit", action="store_true",
                    help="make the commit point's etcd transactions through the event loop "
                         "only, not first from a blocking socket (docs/fleet.md)")
    sp.add_argument("--balance-controller", action="store_true",
                    help="with --fleet: stand for election as the fleet's balance controller; "
                         "the one leader moves VMs to even out load (docs/fleet.md)")
    sp.add_argument("--balance-interval", type=positive(float), default=DEFAULT_INTERVAL_S,
                    metavar="S", help="the controller's pass interval (default %(default)g)")
    sp.add_argument("--balance-window", type=positive(float), default=DEFAULT_WINDOW_S,
                    metavar="S", help="a VM a balance moved is not moved again for S seconds "
                                      "(default %(default)g)")
    sp.add_argument("action", nargs="?", default="run", choices=["run", "stop", "drain"],
                    help="run (default) a daemon; stop the one at --listen/--control "
                         "(refused while it hosts VMs or migrations, unless --force); drain "
                         "it: migrate every VM --to another daemon, then stop")
    sp.add_argument("--force", action="store_true",
                    help="stop: stop even with VMs here (outgoing migrations are cancelled "
                         "and their VMs resume here first; every VM here is then stopped)")
    sp.add_argument("--to", metavar="HOST:PORT", help="drain: the daemon to move every VM to")
    sp.set_defaults(func=cmd_daemon, daemon_parser=sp)
    sp = sub.add_parser("shutdown", help="stop a daemon; refused while it hosts VMs or "
                        "migrations, unless --force (the same as `daemon stop`)")
    sp.add_argument("--force", action="store_true",
                    help="stop even so: migrations are cancelled, VMs stopped")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_shutdown)
