"""One embedded guest of the test backend: its options, page versions, dirtying and run state.

Guest options (attributes of ``<virtmig:test .../>`` in the domain XML):

``seed``
    Integer (``0x`` allowed); default: the first 8 bytes of sha256(uuid).
``dirty-rate-mib``
    MiB/s of pages the guest dirties while it runs (default 0: idle).  Nothing runs in the
    background: when the migration code syncs the dirty log (and on pause, resume and
    :meth:`TestBackend.memory_digest`), the pages dirtied since the last tick are materialised at
    once -- ``rate * running time`` pseudo-random pages get their version bumped (at most every
    page per tick).  A paused guest dirties nothing.  An auto-converge CPU throttle of ``t`` %
    scales the rate by ``(100 - t) / 100``.
``fault``
    Test hook.  ``corrupt-stream``: the source sends page 0 once more in its stop-and-copy pass
    (in post-copy: among the remaining pages), with one wrong byte, so the destination's digest
    check fails and the migration must fail.

A :class:`Guest` keeps a cache of its page hashes so that the memory digest (see
:mod:`.memory`) at switchover only rehashes the pages dirtied since.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtmig.daemon.backend.base import GuestRunState, GuestSpec
from virtmig.daemon.backend.test.memory import (
    MIB,
    PAGE_HASH_LEN,
    PAGE_SIZE,
    VERSION_MASK,
    digest_of,
    page_hash_of,
)

if TYPE_CHECKING:
    from virtmig.daemon.backend.test.outgoing import Outgoing

FAULT_CORRUPT_STREAM = "corrupt-stream"
_FAULTS = ("", FAULT_CORRUPT_STREAM)
_MAX_NPAGES = 0xFFFFFFFF
_HASH_SLICE_PAGES = 4096  # page hashes per event-loop slice (~4 ms)

@dataclass(frozen=True)
class GuestOptions:
    """A guest's test-backend options, parsed (see the module docstring)."""

    seed: int
    dirty_pages_per_s: float
    fault: str
    npages: int


def parse_options(spec: GuestSpec) -> GuestOptions:
    """Read the guest's test-backend options; ``ValueError`` says what is wrong."""
    npages = spec.memory_bytes // PAGE_SIZE
    if npages < 1:
        raise ValueError(f"guest memory must be at least {PAGE_SIZE} bytes")
    if npages > _MAX_NPAGES:
        raise ValueError(f"guest memory must be below {_MAX_NPAGES * PAGE_SIZE} bytes")
    raw_seed = spec.options.get("seed")
    if raw_seed is None or raw_seed == "":
        seed = int.from_bytes(hashlib.sha256(spec.uuid.encode()).digest()[:8], "little")
    else:
        try:
            seed = int(raw_seed, 0) % (1 << 64)
        except ValueError:
            raise ValueError(f"test backend option seed={raw_seed!r} is not an integer") from None
    raw_rate = spec.options.get("dirty-rate-mib", "") or "0"
    try:
        rate_mib = float(raw_rate)
    except ValueError:
        raise ValueError(
            f"test backend option dirty-rate-mib={raw_rate!r} is not a number"
        ) from None
    if not rate_mib >= 0 or rate_mib == float("inf"):
        raise ValueError(f"test backend option dirty-rate-mib={raw_rate!r} must be >= 0")
    fault = spec.options.get("fault", "")
    if fault not in _FAULTS:
        raise ValueError(f"test backend option fault={fault!r} is unknown (known: {_FAULTS[1]})")
    return GuestOptions(seed, rate_mib * MIB / PAGE_SIZE, fault, npages)


class Guest:
    """One embedded guest: seed + page versions, run state and dirty log."""

    def __init__(self, spec: GuestSpec, opts: GuestOptions, *, paused: bool) -> None:
        self.spec = spec
        self.uuid = spec.uuid
        self.seed = opts.seed
        self.npages = opts.npages
        self.dirty_pages_per_s = opts.dirty_pages_per_s
        self.fault = opts.fault
        self.versions: array[int] = array("I", bytes(4 * self.npages))
        # Page-hash cache: _hashes[16i:16i+16] is the hash of page i, valid for the pages below
        # _hashed_upto that are not in _stale (dirtied since they were hashed).
        self._hashes = bytearray(PAGE_HASH_LEN * self.npages)
        self._hashed_upto = 0
        self._stale: set[int] = set()
        self.paused = paused  # paused by the user (pause(), start(paused=True))
        self.stopped = False  # stopped by an outgoing migration's switchover
        self.incoming = False  # waiting for an incoming stream: memory not there yet
        self.dirty: set[int] | None = None  # dirty log, while a migration tracks it
        self.outgoing: Outgoing | None = None
        self.throttle = 0  # auto-converge CPU throttle, percent
        # Incoming post-copy: 1 per page that has arrived (None: all memory is here); writes to
        # pages not there yet, held until they arrive; pages to request from the source.
        self.arrived: bytearray | None = None
        self.pending: dict[int, int] = {}
        self.faults: list[int] = []
        self.broken = False  # post-copy failed: part of the memory never arrived
        self._rng = random.Random(self.seed)
        self._carry = 0.0
        self._last_tick = time.monotonic()

    @property
    def running(self) -> bool:
        return not (self.paused or self.stopped or self.incoming)

    @property
    def has_memory(self) -> bool:
        """All of the guest's memory is here (not waiting for an incoming stream)."""
        return not self.incoming and self.arrived is None

    def run_state(self) -> GuestRunState:
        return GuestRunState.RUNNING if self.running else GuestRunState.PAUSED

    def tick(self) -> int:
        """Materialise the pages dirtied since the last tick; return how many were dirtied."""
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        rate = self.dirty_pages_per_s * (100 - self.throttle) / 100
        if not self.running or rate <= 0 or elapsed <= 0:
            return 0
        exact = rate * elapsed + self._carry
        n = int(exact)
        self._carry = exact - n
        if n >= self.npages:
            n, self._carry = self.npages, 0.0
        versions, randrange, npages = self.versions, self._rng.randrange, self.npages
        touched = [randrange(npages) for _ in range(n)]
        arrived = self.arrived
        if arrived is None:
            for i in touched:
                versions[i] = (versions[i] + 1) & VERSION_MASK
        else:  # post-copy: a page that is not here yet faults; the write waits for it
            pending, faults = self.pending, self.faults
            for i in touched:
                if arrived[i]:
                    versions[i] = (versions[i] + 1) & VERSION_MASK
                elif i in pending:
                    pending[i] += 1
                else:
                    pending[i] = 1
                    faults.append(i)
        if self._hashed_upto:
            self._stale.update(touched)
            if len(self._stale) > self.npages // 4:  # cheaper to rehash all, lazily
                self._hashed_upto = 0
                self._stale.clear()
        if self.dirty is not None:
            self.dirty.update(touched)
        return n

    def sync_dirty(self) -> set[int]:
        """Tick, then return and clear the dirty log (which must be enabled)."""
        self.tick()
        dirty, self.dirty = self.dirty or set(), set()
        return dirty

    def set_hashes(self, hashes: bytearray) -> None:
        """Adopt ``hashes`` as the hashes of every page at its current version."""
        self._hashes = hashes
        self._hashed_upto = self.npages
        self._stale.clear()

    def begin_postcopy(self, arrived: bytearray) -> None:
        """The incoming stream switched to post-copy: the guest may run on the pages here."""
        self.tick()
        self.arrived = arrived
        self.pending = {}
        self.faults = []
        self.incoming = False
        self.dirty = set()  # the guest's own writes: not part of the received memory

    def adopt_received(self, hashes: bytearray) -> None:
        """The incoming stream completed: memory = received pages (``hashes``) + own writes."""
        self.tick()
        written = self.dirty or set()
        self.set_hashes(hashes)
        if len(written) > self.npages // 4:
            self._hashed_upto = 0
        else:
            self._stale = set(written)
        self.dirty = None
        self.arrived = None
        self.pending = {}
        self.faults = []
        self.incoming = False

    def set_throttle(self, percent: int) -> None:
        self.tick()  # the time so far ran at the old rate
        self.throttle = percent

    def hash_pages(self, budget: int) -> bool:
        """Bring up to ``budget`` page hashes up to date; ``True`` once all are."""
        seed, versions, hashes, n = self.seed, self.versions, self._hashes, PAGE_HASH_LEN
        start = self._hashed_upto
        end = min(self.npages, start + budget)
        for i in range(start, end):
            hashes[i * n : (i + 1) * n] = page_hash_of(seed, i, versions[i])
        self._hashed_upto = end
        budget -= end - start
        stale = self._stale
        while stale and budget > 0:
            i = stale.pop()
            budget -= 1
            if i < end:  # pages above are hashed fresh when their turn comes
                hashes[i * n : (i + 1) * n] = page_hash_of(seed, i, versions[i])
        return end == self.npages and not stale

    async def hash_ahead(self) -> None:
        """Update the hash cache in slices, yielding, so a later :meth:`digest` is quick."""
        done = False
        while not done:
            done = self.hash_pages(_HASH_SLICE_PAGES)
            await asyncio.sleep(0)

    def digest(self) -> bytes:
        self.hash_pages(self.npages + len(self._stale))
        return digest_of(self._hashes)

