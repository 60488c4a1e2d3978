"""Property-based tests of hostile input (issue 11): hypothesis profiles and the daemons.

Profiles (``HYPOTHESIS_PROFILE=NAME`` or ``pytest --hypothesis-profile=NAME``):

* ``ci`` (the default, what ``make test`` runs): a few dozen examples per test, derandomized
  (the same examples every run, so CI is reproducible), no deadline (a loaded machine is slow,
  not wrong);
* ``fuzz`` (``make fuzz``): thousands of random examples per test (``FUZZ_EXAMPLES=N``: N),
  a new sample each run; failing examples are kept in ``.hypothesis/`` and replayed first next
  time.

RSS and glibc: the examples send requests of megabytes (up to gRPC's 4 MiB limit).  glibc raises
its mmap threshold each time such a block is freed, so later blocks of that size come from the
heaps of the daemons' and gRPC's threads, whose freed space is reused but seldom returned: RSS
then grows by hundreds of MiB that no object holds (measured: flat with a fixed threshold, and
tracemalloc sees nothing retained).  :func:`fixed_mmap_threshold` pins the threshold at its
default so the RSS bound checks what the daemons hold, not the allocator's heuristic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.harness import Env, daemon_env

_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=25, derandomize=True, database=None, **_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "2000")),
                          **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def fixed_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold (blocks above it are mapped and unmapped on free); False where
    the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD))



@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Two ``test`` daemons shared by every example of a module (each example leaves them as
    it found them: that is one of the properties checked)."""
    fixed_mmap_threshold()
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with daemon_env(tmp) as started:
        yield started
        if os.environ.get("FUZZ_STATS"):  # what the examples got, by RPC and status
            print("\n" + "\n".join(f"{k}: {v}" for k, v in sorted(started.stats.items())))
