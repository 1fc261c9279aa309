"""Sizes and rates as people type them, read the same way everywhere."""
import ast
import importlib.util
import math
import os

import pytest

from livemig.errors import ConfigError
from livemig.units import (finite_or_none, format_rate, format_size, parse_optional_rate,
                           parse_rate, parse_size)


@pytest.mark.parametrize("text, nbytes", [
    ("4096", 4096), (4096, 4096), ("64KiB", 64 << 10), ("64k", 64 << 10), ("1GiB", 1 << 30),
    ("1.5G", 3 << 29), ("2 MiB", 2 << 20),
])
def test_parse_size(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text, bytes_per_s", [
    ("256MiB/s", 256 << 20), ("100M", 100 << 20), (1000, 1000.0), (2.5, 2.5),
    ("1Gbit/s", 125e6), ("10Gbps", 1.25e9), ("8kbit", 1000.0),
])
def test_parse_rate(text, bytes_per_s):
    assert parse_rate(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("bad", ["fast", "-1MiB/s", -1, True, "1 parsec/s"])
def test_parse_rate_refuses_naming_what(bad):
    with pytest.raises(ConfigError, match="--dirty-rate"):
        parse_rate(bad, what="--dirty-rate")


def test_optional_rate_is_none_when_nothing_is_given():
    assert parse_optional_rate(None) is None and parse_optional_rate("") is None
    assert parse_optional_rate("1MiB/s") == 1 << 20 and parse_optional_rate(0) == 0.0


def test_format():
    assert format_size(1536) == "1.5 KiB" and format_size(12) == "12 B"
    assert format_rate(64 << 20) == "64.0 MiB/s"


@pytest.mark.parametrize("x, want", [(1.5, 1.5), (0, 0), (None, None), (math.inf, None),
                                     (-math.inf, None), (math.nan, None)])
def test_finite_or_none_is_what_json_can_hold(x, want):
    assert finite_or_none(x) == want


def test_page_size_and_mib_are_defined_once():
    """Every module takes them from livemig.units (the native core checks its own)."""
    root = os.path.dirname(importlib.util.find_spec("livemig").origin)
    owners = []
    for dirpath, _, files in os.walk(root):
        for f in (f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, f)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Assign):
                    names = {t.id for t in node.targets if isinstance(t, ast.Name)}
                    owners += [(name, os.path.relpath(path, root))
                               for name in names & {"PAGE_SIZE", "MIB"}]
    assert sorted(owners) == [("MIB", "units.py"), ("PAGE_SIZE", "units.py")]
