"""What every command shares: exit codes, argument types, the flags that
name a daemon and describe a VM, the control-socket client, and output
(people by default, one JSON document with ``--json``)."""
from __future__ import annotations

import argparse
import json
import os

from ..errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_ERROR = 0, 1, 2, 3, 4
PROGRESS_PERIOD_S = 0.25
"""How often an attached command asks the daemon for progress."""
DEFAULT_DIRTY_RATE = "64MiB/s"
"""A VM's default pace: visible dirtying that pre-copy converges on over
loopback, without taking a CPU away from everything else."""


def positive(kind):
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


def dirty_rate(text: str):
    """``--dirty-rate``: bytes/s (the ``/s`` is required), or 'unpaced' (0: no pace)."""
    from ..units import parse_rate

    if text == "unpaced":
        return 0.0
    if not text.rstrip().endswith(("/s", "ps")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate: write it per second, "
                                         f"e.g. {text.strip()}/s, or 'unpaced'")
    try:
        return parse_rate(text, what="--dirty-rate")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def workload(text: str) -> str:
    """``--workload``: a program's name, or ``trace:FILE`` with FILE made absolute
    (the daemon that loads it runs elsewhere)."""
    from ..vm.programs import TRACE_PREFIX, WORKLOADS

    if text.startswith(TRACE_PREFIX):
        path = text[len(TRACE_PREFIX):]
        if not path:
            raise argparse.ArgumentTypeError(f"name the file: {TRACE_PREFIX}FILE")
        return TRACE_PREFIX + os.path.abspath(path)
    if text not in WORKLOADS or text == "trace":
        names = ", ".join(n for n in sorted(WORKLOADS) if n != "trace")
        raise argparse.ArgumentTypeError(f"unknown workload {text!r}; choose one of {names}, "
                                         f"or {TRACE_PREFIX}FILE")
    return text


def vm_dirty_rate(args) -> float:
    """The dirty rate a VM is created with: ``--dirty-rate`` if given, else the
    default pace, or for a trace None (its recorded rate)."""
    from ..vm.programs import TRACE_PREFIX

    if args.dirty_rate is not None:
        return args.dirty_rate
    return None if args.workload.startswith(TRACE_PREFIX) else dirty_rate(DEFAULT_DIRTY_RATE)


class WorkloadChoices(list):
    """What ``--workload`` offers (shell completion lists it): the programs'
    names and ``trace:``, which takes any file after it."""

    def __init__(self):
        from ..vm.programs import TRACE_PREFIX, WORKLOADS

        super().__init__([n for n in sorted(WORKLOADS) if n != "trace"] + [TRACE_PREFIX])

    def __contains__(self, value) -> bool:
        from ..vm.programs import TRACE_PREFIX

        return list.__contains__(self, value) or (isinstance(value, str)
                                                  and value.startswith(TRACE_PREFIX))


def emit(args, obj, human) -> None:
    if getattr(args, "json", False):
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(human(obj) if callable(human) else human)


def control_path(args) -> str:
    from ..service.daemon import default_control_path

    if args.control:
        return args.control
    if os.environ.get("LIVEMIG_CONTROL"):
        return os.environ["LIVEMIG_CONTROL"]
    return default_control_path(args.daemon, what="--daemon")


def control_client(args):
    from ..service.control import ControlClient

    return ControlClient(control_path(args), timeout_s=None)


def daemon_opts(sp) -> None:
    """The flags of a command that talks to a running daemon."""
    sp.add_argument("--daemon", default="127.0.0.1:7400",
                    help="the daemon's listen address, used to find its control socket "
                         "(default: %(default)s)")
    sp.add_argument("--control", help="path of the daemon's control socket "
                    "(default: $LIVEMIG_CONTROL or derived from --daemon)")
    sp.add_argument("--json", action="store_true", help="print one JSON document")


def vm_opts(sp) -> None:
    """The flags that describe a VM to create."""
    from ..vm.programs import WORKLOADS

    sp.add_argument("--memory", default="256MiB",
                    help="guest memory size in binary units: 1GiB = 1G = 1GB = 2^30 bytes "
                         "(default: %(default)s)")
    sp.add_argument("--vcpus", type=positive(int), default=2)
    sp.add_argument("--workload", default="memtest", type=workload,
                    choices=WorkloadChoices(), metavar="WORKLOAD",
                    help=f"guest program: {', '.join(n for n in sorted(WORKLOADS) if n != 'trace')}"
                    ", or trace:FILE to replay a recorded dirty-page trace (default: "
                    "%(default)s; see docs/vm.md)")
    sp.add_argument("--dirty-rate", type=dirty_rate,
                    help="target dirty rate in bytes per second, e.g. 64MiB/s or 1Gbit/s "
                         f"(default: {DEFAULT_DIRTY_RATE}, or a trace's recorded rate); "
                         "'unpaced' runs the vCPUs flat out, one whole CPU each")
    sp.add_argument("--seed", type=int, default=0)
