"""Microbenchmarks of livemig's hot paths (pytest-benchmark).

Run them (the default test run never does; pyproject disables benchmarks):

    python -m pytest bench/micro --benchmark-enable \\
        [--benchmark-json bench/results/micro.json]

Each benchmark's docstring says what one round measures. Regions are 64 MiB,
so the whole set runs in well under a minute on two cores.
"""
import numpy as np
import pytest

from livemig.native.memory import GuestMemory

REGION_BYTES = 64 << 20


@pytest.fixture
def memory():
    with GuestMemory(REGION_BYTES) as mem:
        yield mem


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
