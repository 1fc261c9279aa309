"""The ``livemig`` command line.

Every subcommand prints for people by default and one JSON document with
``--json``. Exit codes: 0 success; 1 the operation failed (for a migration:
it did not complete and the VM runs on at its source); 2 bad usage or
configuration; 3 no daemon at the control socket; 4 any other livemig error.

Each module here owns a group of commands and registers its own parsers:
``vm``, ``daemon``, ``migration`` (migrate and what follows or steers one),
``tools`` (probe, dirtyrate, plan, bench, demo, completion), ``fleet`` (hosts
and VMs of a fleet coordinated through etcd). This module
assembles them and is the one error funnel: every livemig error becomes one
line (and a JSON object with ``--json``) and an exit code, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import ConfigError, ControlError, LivemigError
from . import daemon, fleet, migration, tools, vm
from .common import EXIT_ERROR, EXIT_FAILED, EXIT_NO_DAEMON, EXIT_OK, EXIT_USAGE

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_NO_DAEMON",
           "EXIT_ERROR"]

COMMAND_GROUPS = (tools.register_probe, vm.register, daemon.register, migration.register,
                  tools.register, fleet.register)
"""Each adds its subcommands, in the order ``livemig --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    # The package is always imported before its modules; its version is read
    # from it rather than imported (the facade ranks above the CLI).
    version = sys.modules["livemig"].__version__

    p = argparse.ArgumentParser(prog="livemig", description="Live migration of toy VMs.")
    p.add_argument("--version", action="version", version=f"livemig {version}")
    sub = p.add_subparsers(dest="command", required=True)
    for register in COMMAND_GROUPS:
        register(sub)
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
