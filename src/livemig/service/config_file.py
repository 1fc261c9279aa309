"""The daemon's config file: ``livemig daemon --config FILE``.

The file is TOML whose keys are the daemon's long flags without the leading
dashes (``listen = "0.0.0.0:7400"``, ``log-level = "debug"``). The keys and
their checks are read from the daemon's argparse parser, so the file accepts
exactly what the flags accept and cannot drift from them. A value passes
through the flag's own type and choices; an on/off flag takes a TOML boolean.

Flags given on the command line win: the command line is parsed a second
time into a namespace pre-filled with a marker, and argparse fills in
defaults only for names it does not find, so every name still holding a
value other than the marker was given on the command line.

Unknown keys and bad values are errors that name the file and the key.
"""
from __future__ import annotations

import argparse
import tomllib

from ..errors import ConfigError

NOT_IN_A_FILE = frozenset({"help", "config", "detach", "json", "force", "to"})
"""Flags that choose how this one invocation runs, not how the daemon runs."""


def _file_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config keys (long flag names without dashes) and their argparse actions."""
    options = {}
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest not in NOT_IN_A_FILE:
            options[longs[0][2:]] = action
    return options


def _given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    marker = object()
    namespace = argparse.Namespace(**{a.dest: marker for a in parser._actions})
    parser.parse_known_args(argv, namespace)
    return {dest for dest, value in vars(namespace).items() if value is not marker}


def _convert(path: str, key: str, action: argparse.Action, value):
    where = f"{path}: key {key!r}"
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}; fix the file")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: expected a string or a number, got {value!r}; fix the file")
    text = str(value)
    try:
        converted = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}; fix the file") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: {converted!r} is not one of "
                          f"{', '.join(map(str, action.choices))}; fix the file")
    return converted


def read_config_file(path: str, parser: argparse.ArgumentParser) -> dict[str, object]:
    """The settings in ``path`` as argparse destinations and checked values."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}; the daemon did not start") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file") from None
    options = _file_options(parser)
    settings = {}
    for key, value in document.items():
        action = options.get(key)
        if action is None:
            raise ConfigError(f"{path}: unknown key {key!r}; the keys are the daemon's flags "
                              f"without '--': {', '.join(sorted(options))}")
        settings[action.dest] = _convert(path, key, action, value)
    return settings


def apply_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser,
                      argv: list[str]) -> None:
    """Set on ``args`` each setting of ``args.config`` that ``argv`` (the
    daemon's own arguments) did not give as a flag."""
    settings = read_config_file(args.config, parser)
    given = _given_on_command_line(parser, argv)
    for dest, value in settings.items():
        if dest not in given:
            setattr(args, dest, value)
