"""Commands that measure, demonstrate or help: probe, dirtyrate, plan,
bench convergence, demo, completion."""
from __future__ import annotations

import os

from ..errors import ConfigError
from .common import (EXIT_OK, WorkloadChoices, control_client, daemon_opts, emit, positive,
                     workload)
from .migration import limit_options


def cmd_probe(args) -> int:
    from ..analysis.probe import format_probe, probe_host

    report = probe_host()
    emit(args, report, format_probe)
    return EXIT_OK


RECORD_DEFAULT_S = 10.0


def cmd_dirtyrate(args) -> int:
    from ..analysis.dirtyrate import format_record, format_report

    if args.record is not None:
        # the daemon writes the file: give it a path that means the same there
        res = control_client(args).call("dirtyrate", name=args.vm,
                                        window_s=args.seconds or RECORD_DEFAULT_S,
                                        interval_s=args.interval,
                                        record=os.path.abspath(args.record))
        emit(args, res, format_record)
        return EXIT_OK
    if args.seconds is not None:
        raise ConfigError("--seconds goes with --record (a measurement takes --window)")
    res = control_client(args).call("dirtyrate", name=args.vm, window_s=args.window,
                             method=args.method, interval_s=args.interval)
    emit(args, res, format_report)
    return EXIT_OK


def cmd_plan(args) -> int:
    from ..analysis.plan import format_plan

    opts = limit_options(args)
    if args.streams is not None:
        opts["streams"] = args.streams
    res = control_client(args).call("plan", name=args.vm, to=args.to, window_s=args.window,
                             probe_time_s=args.probe_time, **opts)
    emit(args, res, format_plan)
    return EXIT_OK


def cmd_bench_convergence(args) -> int:
    from ..lab.sweep import run_sweep_cli

    return run_sweep_cli(profile=args.profile, out_dir=args.out, link=args.link,
                         as_json=args.json, workload=args.workload)


def cmd_demo(args) -> int:
    from ..lab.demo import run_demo

    return run_demo(memory=args.memory, dirty_rate=args.dirty_rate, as_json=args.json,
                    loop=args.loop)


def cmd_completion(args) -> int:
    from .completion import completion_script

    from . import build_parser

    print(completion_script(args.shell, build_parser()), end="")
    return EXIT_OK


def register_probe(sub) -> None:
    sp = sub.add_parser("probe", help="what this kernel allows: userfaultfd, PAGEMAP_SCAN, trackers")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_probe)


def register(sub) -> None:
    sp = sub.add_parser("dirtyrate", help="measure a running VM's dirty rate (calc-dirty-rate)")
    sp.add_argument("vm")
    sp.add_argument("--window", type=float, default=1.0, help="measurement window in seconds")
    sp.add_argument("--method", default="auto", choices=["auto", "tracker", "hash-sample"],
                    help="auto: a tracker, or hash sampling while a migration tracks the VM")
    sp.add_argument("--interval", type=positive(float), default=0.1,
                    help="tracker collect interval in seconds (also a trace's interval)")
    sp.add_argument("--record", metavar="FILE",
                    help="record the VM's dirty pages per interval to FILE, a trace that "
                    "--workload trace:FILE replays (docs/vm.md)")
    sp.add_argument("--seconds", type=positive(float),
                    help="with --record: how long to record (default 10)")
    daemon_opts(sp)
    sp.set_defaults(func=cmd_dirtyrate)

    sp = sub.add_parser("plan", help="dry run: probe the link, measure the dirty rate, predict")
    sp.add_argument("vm")
    sp.add_argument("--to", required=True, help="the destination daemon's HOST:PORT")
    sp.add_argument("--downtime-ms", type=float, help="downtime limit (default 300)")
    sp.add_argument("--max-bandwidth", help="the cap the migration would run under")
    sp.add_argument("--window", type=float, default=1.0, help="dirty-rate window in seconds")
    sp.add_argument("--probe-time", type=float, default=1.0, help="bandwidth probe seconds")
    sp.add_argument("--streams", type=int, metavar="N",
                    help="native bulk streams the migration would use (0: the Python path; "
                         "the probe follows)")
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
    sp.add_argument("--workload", type=workload, choices=WorkloadChoices(), metavar="WORKLOAD",
                    help="replace the profile's workloads, e.g. trace:FILE to sweep a "
                    "recorded trace at each dirty rate (docs/vm.md)")
    sp.add_argument("--json", action="store_true", help="print the result document")
    sp.set_defaults(func=cmd_bench_convergence)

    sp = sub.add_parser("demo", help="two daemons on loopback; a VM migrated there and back")
    sp.add_argument("--memory", default="256MiB")
    sp.add_argument("--dirty-rate", default="32MiB/s")
    sp.add_argument("--loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_demo)

    from .completion import SHELLS

    sp = sub.add_parser("completion", help="print a shell completion script "
                        "(bash: source <(livemig completion bash))")
    sp.add_argument("shell", choices=SHELLS)
    sp.set_defaults(func=cmd_completion)
