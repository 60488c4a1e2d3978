"""The ``test`` backend: guests that live inside the daemon, migrated over a real TCP stream.

This is virtmig's embedded default hypervisor.  A guest has no CPU and no devices, only memory --
a seed plus one version per 4 KiB page -- and migration really moves that memory: the source
sends every page's 4096 bytes over TCP and the destination checks the digest of the bytes it
received against the source's before the migration completes.

Modules, one concern each (bottom layer first):

``memory``
    What a page holds (a pure function of seed, index and version), the memory digest (a sum
    of per-page terms), runs of pages built a run at a time and the versions digest.
``sparse``
    Per-page state that costs memory only for the pages it concerns: page versions, page sets.
``guest``
    One embedded guest: its ``<virtmig:guest .../>`` options and their ranges, page versions,
    bounded dirtying, the digest's running sum and run state.
``wire``
    The migration stream format: the protocol diagram, the handshake on either end, the
    PAGES / RUN / DISCARD / REQUEST records, the replies and how the two ends agree on format 2.
``pacing``
    Bandwidth pacing, the expected-downtime arithmetic and the auto-converge throttle steps.
``util``
    Millisecond and future helpers shared by both ends.
``outgoing``
    The source side: pre-copy passes, the switch to post-copy, settling the source guest.
``incoming``
    The destination side: receiving records, the digest check at switchover, post-copy page
    requests, settling the destination guest.
``backend``
    :class:`TestBackend` ties them together: lifecycle, migration entry points, job control.

The names below are the public surface; ``virtmig.daemon.backend.test`` was a single module
before and still offers what the daemon and the tests import from it.  (Constants are read
where they are used: to change :data:`HANDSHAKE_TIMEOUT`, patch ``wire.HANDSHAKE_TIMEOUT``.)
"""

from __future__ import annotations

from virtmig.daemon.backend.test.backend import TestBackend
from virtmig.daemon.backend.test.guest import FAULT_CORRUPT_STREAM
from virtmig.daemon.backend.test.memory import MIB, PAGE_SIZE, digest_of, page_bytes, page_hash
from virtmig.daemon.backend.test.wire import HANDSHAKE_TIMEOUT, MAGIC, PROTOCOL_VERSION

__all__ = [
    "FAULT_CORRUPT_STREAM",
    "HANDSHAKE_TIMEOUT",
    "MAGIC",
    "MIB",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "TestBackend",
    "digest_of",
    "page_bytes",
    "page_hash",
]

# The single-module backend's private name for digest_of, which the test suite still uses.
_digest_of = digest_of
