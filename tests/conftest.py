"""Shared fixtures and test policy.

Tests run against the installed package (``pip install '.[test]'``). Slow tests
(long soaks, GiB-sized sweeps) opt in with ``--runslow``.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
