"""One embedded guest of the test backend: its options, page versions, dirtying and run state.

Guest options (attributes of ``<virtmig:guest .../>`` in the domain XML), checked at define time:

``seed``
    Integer 0..2**64-1 (``0x`` allowed); default: the first 8 bytes of sha256(uuid).
``dirty-rate-mib``
    MiB/s of pages the guest dirties while it runs, 0..:data:`MAX_DIRTY_RATE_MIB` (default 0:
    idle).  Nothing runs in the background: when the migration code syncs the dirty log (and on
    each batch it sends, on pause, resume and :meth:`TestBackend.memory_digest`), the pages
    dirtied since the last tick are materialised at once -- ``rate * running time``
    pseudo-random pages of its working set (its first :data:`WORKING_SET_PAGES` pages, 1 GiB)
    get their version bumped, at most :data:`MAX_TICK_PAGES` (and at most every page) per tick,
    so one tick is a bounded piece of work whatever the rate: beyond that a guest's dirtying
    saturates.  A paused guest dirties nothing.  An auto-converge CPU throttle of ``t`` % scales
    the rate by ``(100 - t) / 100``.
``fault``
    Test hook.  ``corrupt-stream``: the source sends page 0 once more in its stop-and-copy pass
    (in post-copy: among the remaining pages), with one wrong byte, so the destination's digest
    check fails and the migration must fail.

Memory cost: page versions are sparse (:mod:`.sparse`), and the memory digest (see
:mod:`.memory`) is a running sum of per-page terms: the guest keeps the sum over the pages
below ``_hashed_upto`` and, for pages written since their term was added, the version the sum
holds (``_stale``), so the digest at switchover only rehashes the pages dirtied since.  A guest
costs the daemon memory for the pages it wrote -- at most its working set's -- not for the
memory it declares.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtmig.daemon.backend.base import GuestRunState, GuestSpec
from virtmig.daemon.backend.test.memory import (
    DIGEST_MOD,
    MIB,
    PAGE_SIZE,
    VERSION_MASK,
    digest_bytes,
    term_of,
    versions_digest,
)
from virtmig.daemon.backend.test.sparse import PageSet, Versions

if TYPE_CHECKING:
    from virtmig.daemon.backend.test.outgoing import Outgoing

FAULT_CORRUPT_STREAM = "corrupt-stream"
_FAULTS = ("", FAULT_CORRUPT_STREAM)
_MAX_NPAGES = 0xFFFFFFFF
_HASH_SLICE_PAGES = 4096  # page terms per event-loop slice (~4 ms)
MAX_SEED = 2**64 - 1
MAX_DIRTY_RATE_MIB = 1024 * 1024  # 1 TiB/s
MAX_TICK_PAGES = 16384  # pages one tick dirties at most (64 MiB, ~10 ms of work)
WORKING_SET_PAGES = 1 << 18  # the guest writes to its first 1 GiB only


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
        seed = _seed(raw_seed)
    raw_rate = spec.options.get("dirty-rate-mib", "") or "0"
    try:
        rate_mib = float(raw_rate)
    except ValueError:
        raise ValueError(
            f"test backend option dirty-rate-mib={raw_rate[:40]!r} is not a number"
        ) from None
    if not 0 <= rate_mib <= MAX_DIRTY_RATE_MIB:  # (NaN fails too)
        raise ValueError(
            f"test backend option dirty-rate-mib={raw_rate[:40]!r} is out of range: "
            f"expected 0..{MAX_DIRTY_RATE_MIB} (MiB/s)"
        )
    fault = spec.options.get("fault", "")
    if fault not in _FAULTS:
        raise ValueError(
            f"test backend option fault={fault[:40]!r} is unknown (known: {_FAULTS[1]})"
        )
    return GuestOptions(seed, rate_mib * MIB / PAGE_SIZE, fault, npages)


def _seed(raw: str) -> int:
    # At most 2**64-1 is 20 decimal digits (or 0x + 16 hex): a longer text is refused before
    # int() spends time on it.
    text = raw.strip()
    try:
        seed = int(text, 0) if len(text) <= 24 else None
    except ValueError:
        raise ValueError(f"test backend option seed={raw[:40]!r} is not an integer") from None
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise ValueError(
            f"test backend option seed={raw[:40]!r} is out of range: expected 0..{MAX_SEED}"
        )
    return seed


class Guest:
    """One embedded guest: seed + page versions, run state and dirty log."""

    def __init__(self, spec: GuestSpec, opts: GuestOptions, *, paused: bool) -> None:
        self.spec = spec
        self.uuid = spec.uuid
        self.seed = opts.seed
        self.npages = opts.npages
        self.dirty_pages_per_s = opts.dirty_pages_per_s
        self.fault = opts.fault
        self.versions = Versions(self.npages)
        # The digest's running sum: the terms of the pages below _hashed_upto, at their current
        # version except for the pages in _stale (written since), whose term is of that version.
        self._sum = 0
        self._hashed_upto = 0
        self._stale: dict[int, int] = {}
        self.paused = paused  # paused by the user (pause(), start(paused=True))
        self.stopped = False  # stopped by an outgoing migration's switchover
        self.incoming = False  # waiting for an incoming stream: memory not there yet
        self.dirty: set[int] | None = None  # dirty log, while a migration tracks it
        self.outgoing: Outgoing | None = None
        self.throttle = 0  # auto-converge CPU throttle, percent
        # Incoming post-copy: the pages that have arrived (None: all memory is here); writes to
        # pages not there yet, held until they arrive; pages to request from the source.
        self.arrived: PageSet | None = None
        self.pending: dict[int, int] = {}
        self.faults: list[int] = []
        self.broken = False  # post-copy failed: part of the memory never arrived
        self._rng = random.Random(self.seed)
        self._carry = 0.0
        self._last_tick = time.monotonic()
        self.created = self._last_tick

    @property
    def running(self) -> bool:
        return not (self.paused or self.stopped or self.incoming)

    @property
    def has_memory(self) -> bool:
        """All of the guest's memory is here (not waiting for an incoming stream)."""
        return not self.incoming and self.arrived is None

    @property
    def nbytes(self) -> int:
        """Roughly what the guest's per-page state costs the daemon (for tests)."""
        sets = len(self._stale) + len(self.dirty or ()) + len(self.pending)
        arrived = self.arrived.nbytes if self.arrived is not None else 0
        return self.versions.nbytes + arrived + 100 * sets

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
        limit = min(self.npages, MAX_TICK_PAGES)
        if exact >= limit:  # saturated: a bounded amount of work per tick
            n, self._carry = limit, 0.0
        else:
            n = int(exact)
            self._carry = exact - n
        randrange, span = self._rng.randrange, min(self.npages, WORKING_SET_PAGES)
        touched = [randrange(span) for _ in range(n)]
        arrived = self.arrived
        if arrived is None:
            for i in touched:
                self._write(i)
        else:  # post-copy: a page that is not here yet faults; the write waits for it
            pending, faults = self.pending, self.faults
            for i in touched:
                if i in arrived:
                    self._write(i)
                elif i in pending:
                    pending[i] += 1
                else:
                    pending[i] = 1
                    faults.append(i)
        # Cheaper to rehash all, lazily (not while a post-copy's received sum is pending).
        if len(self._stale) > self.npages // 4 and arrived is None:
            self._sum, self._hashed_upto = 0, 0
            self._stale.clear()
        if self.dirty is not None:
            self.dirty.update(touched)
        return n

    def _write(self, i: int) -> None:
        old = self.versions.bump(i)
        if i < self._hashed_upto and i not in self._stale:
            self._stale[i] = old

    def receive(self, idx: int, version: int) -> None:
        """Post-copy: page ``idx`` arrived at ``version``; the writes held for it apply now
        (the received version's term is what the digest's sum holds)."""
        held = self.pending.pop(idx, 0)
        if held and idx < self._hashed_upto:
            self._stale.setdefault(idx, version)
        self.versions[idx] = (version + held) & VERSION_MASK

    def sync_dirty(self) -> set[int]:
        """Tick, then return and clear the dirty log (which must be enabled)."""
        self.tick()
        dirty, self.dirty = self.dirty or set(), set()
        return dirty

    def begin_postcopy(self, arrived: PageSet) -> None:
        """The incoming stream switched to post-copy: the guest may run on the pages here.

        From here on the digest's sum is the received pages' (:meth:`adopt_received`): the
        guest's own writes are recorded as stale against the versions received.
        """
        self.tick()
        self.arrived = arrived
        self.pending = {}
        self.faults = []
        self.incoming = False
        self.dirty = set()  # the guest's own writes: not part of the received memory
        self._sum, self._hashed_upto = 0, self.npages
        self._stale = {}

    def adopt_received(self, total: int | None) -> None:
        """The incoming stream completed: memory = received pages + own writes; ``total`` is
        the sum of the received pages' digest terms (``None``: not kept, as with stream
        format 2: the sum is computed when first needed)."""
        self.tick()
        if total is None:
            self._sum, self._hashed_upto = 0, 0
            self._stale = {}
        else:
            self._sum = total % DIGEST_MOD
            self._hashed_upto = self.npages  # (pre-copy: the guest never ran, nothing is stale)
        self.dirty = None
        self.arrived = None
        self.pending = {}
        self.faults = []
        self.incoming = False

    def set_throttle(self, percent: int) -> None:
        self.tick()  # the time so far ran at the old rate
        self.throttle = percent

    def hash_pages(self, budget: int) -> bool:
        """Bring up to ``budget`` page terms of the sum up to date; ``True`` once all are."""
        seed, versions = self.seed, self.versions
        total = self._sum
        start = self._hashed_upto
        end = min(self.npages, start + budget)
        for i in range(start, end):
            total += term_of(seed, i, versions[i])
        self._hashed_upto = end
        budget -= end - start
        stale = self._stale
        while stale and budget > 0:
            i, old = stale.popitem()
            budget -= 2
            total += term_of(seed, i, versions[i]) - term_of(seed, i, old)
        self._sum = total % DIGEST_MOD
        return end == self.npages and not stale

    async def hash_ahead(self) -> None:
        """Update the sum in slices, yielding, so a later :meth:`digest` is quick."""
        done = False
        while not done:
            done = self.hash_pages(_HASH_SLICE_PAGES)
            await asyncio.sleep(0)

    def digest(self) -> bytes:
        self.hash_pages(self.npages + 2 * len(self._stale))
        return digest_bytes(self._sum)

    def versions_digest(self) -> bytes:
        """Stream format 2's switchover digest of this memory (:func:`.memory.versions_digest`):
        one hash call per 64 pages written, none per page."""
        return versions_digest(self.seed, self.npages, self.versions.written_chunks())
