"""Property-based tests of hostile input (issue 11): hypothesis profiles and the daemons.

Profiles (``HYPOTHESIS_PROFILE=NAME`` or ``pytest --hypothesis-profile=NAME``):

* ``ci`` (the default, what ``make test`` runs): a few dozen examples per test, derandomized
  (the same examples every run, so CI is reproducible), no deadline (a loaded machine is slow,
  not wrong);
* ``fuzz`` (``make fuzz``): thousands of random examples per test, a new sample each run;
  failing examples are kept in ``.hypothesis/`` and replayed first next time.
"""

from __future__ import annotations

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
settings.register_profile("fuzz", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """Two ``test`` daemons shared by every example of a module (each example leaves them as
    it found them: that is one of the properties checked)."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with daemon_env(tmp) as started:
        yield started
        if os.environ.get("FUZZ_STATS"):  # what the examples got, by RPC and status
            print("\n" + "\n".join(f"{k}: {v}" for k, v in sorted(started.stats.items())))
