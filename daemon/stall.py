"""Test-only stall points: the fault-injection harness (``tests/faults``) stops a daemon at a
named point inside a migration phase, to kill it or cut its link exactly there.

**Never set this in production.**  Inert unless the daemon's environment has
``VIRTMIG_TEST_STALL=POINT:FILE`` when this module is imported (read once, at the daemon's start;
nothing over the network can set or reach it).  Then the first time the daemon reaches ``POINT``
it logs a WARNING, creates ``FILE`` and waits, holding whatever it holds there (the domain's lock,
its job), until ``FILE`` is removed; later passes do not stop.  The call sites guard with
``if stall.POINT:``, so a daemon without it pays one attribute test.

Points (:data:`POINTS`):

* ``finish3``: the destination's Finish, phase ``finish3`` saved, before it waits for the
  stream's end;
* ``finish3-resumed``: the destination's Finish after the guest's vCPUs started here, before
  its definition is persisted and the job ends;
* ``confirm3``: the source's Confirm (not cancelled), phase ``confirm3`` saved, before its guest
  is stopped as migrated;
* ``p2p-after-begin``, ``p2p-after-prepare``, ``p2p-after-perform``, ``p2p-after-finish``,
  ``p2p-after-confirm``: the phase boundaries of the peer-to-peer driver, which runs in the
  source daemon (:mod:`virtmig.daemon.p2p`, also tunnelled): after that phase succeeded (Prepare
  and Finish: the destination answered), before the next one is called.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from virtmig.proto import logsafe

log = logsafe.logger(__name__)

ENV = "VIRTMIG_TEST_STALL"
P2P_POINTS = tuple(f"p2p-after-{phase}"
                   for phase in ("begin", "prepare", "perform", "finish", "confirm"))
POINTS = frozenset({"finish3", "finish3-resumed", "confirm3", *P2P_POINTS})


def _parse(spec: str) -> tuple[str, Path | None]:
    point, _, file = spec.partition(":")
    if not spec:
        return "", None
    if point not in POINTS or not file:
        raise ValueError(f"{ENV}={spec!r}: expected POINT:FILE, POINT one of {sorted(POINTS)}")
    return point, Path(file)


POINT, _FILE = _parse(os.environ.get(ENV, ""))
_passed = False


async def at(point: str) -> None:
    """Stop here if this is the point the daemon was started with (the first time only)."""
    global _passed
    if point != POINT or _FILE is None or _passed:
        return
    _passed = True
    log.warning("test stall at %s: waiting until %s is removed", point, _FILE)
    _FILE.write_text(f"{os.getpid()}\n")
    while _FILE.exists():  # noqa: ASYNC110 - a file to watch, no event to wait on
        await asyncio.sleep(0.05)
    log.warning("test stall at %s: going on", point)
