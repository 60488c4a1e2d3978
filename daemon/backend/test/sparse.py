"""Per-page state of a test-backend guest that costs memory only for the pages it concerns.

A guest may declare terabytes of memory; the daemon holds state only for pages that were written
or that a migration stream handles out of order, never a fixed amount per declared page:

:class:`Versions`
    Page versions (u32, wrapping), 0 for a page never written, in chunks of
    :data:`CHUNK_PAGES` allocated on the first write into them.
:class:`PageSet`
    A set of page indices stored as a prefix ``[0, upto)`` minus ``holes``, plus ``extra`` pages
    above it: cheap for what a migration stream does (pass 1 sends every page in order, later
    records resend or discard a few).

Both report what they hold in ``nbytes`` (an estimate of the Python objects), which the tests use
to prove the bound.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator

from virtmig.daemon.backend.test.memory import VERSION_MASK

CHUNK_SHIFT = 6
CHUNK_PAGES = 1 << CHUNK_SHIFT  # 64 pages: 256 bytes of versions per chunk
_CHUNK_MASK = CHUNK_PAGES - 1
_ZERO_CHUNK = bytes(4 * CHUNK_PAGES)
# Per entry of a dict or set of ints, with the int object: a generous estimate for accounting.
_ENTRY_BYTES = 100


class Versions:
    """Page versions of a guest of ``npages`` pages (see the module docstring)."""

    __slots__ = ("_chunks", "npages")

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self._chunks: dict[int, array[int]] = {}

    def __len__(self) -> int:
        return self.npages

    def __getitem__(self, idx: int) -> int:
        chunk = self._chunks.get(idx >> CHUNK_SHIFT)
        return 0 if chunk is None else chunk[idx & _CHUNK_MASK]

    def __setitem__(self, idx: int, version: int) -> None:
        key = idx >> CHUNK_SHIFT
        chunk = self._chunks.get(key)
        if chunk is None:
            if version == 0:
                return
            chunk = self._chunks[key] = array("I", _ZERO_CHUNK)
        chunk[idx & _CHUNK_MASK] = version

    def bump(self, idx: int) -> int:
        """Write page ``idx`` (its version + 1, wrapping); return the version it had."""
        old = self[idx]
        self[idx] = (old + 1) & VERSION_MASK
        return old

    def __iter__(self) -> Iterator[int]:
        for idx in range(self.npages):
            yield self[idx]

    @property
    def nbytes(self) -> int:
        """Roughly what the chunks cost (array objects and dict entries)."""
        if not self._chunks:
            return 0
        one = sys.getsizeof(next(iter(self._chunks.values())))
        return len(self._chunks) * (one + _ENTRY_BYTES)


class PageSet:
    """A set of page indices (see the module docstring); ``add``/``discard`` say whether they
    changed it."""

    __slots__ = ("extra", "holes", "upto")

    def __init__(self) -> None:
        self.upto = 0
        self.holes: set[int] = set()
        self.extra: set[int] = set()

    def __contains__(self, idx: object) -> bool:
        if not isinstance(idx, int):
            return False
        if idx < self.upto:
            return idx not in self.holes
        return idx in self.extra

    def __len__(self) -> int:
        return self.upto - len(self.holes) + len(self.extra)

    def add(self, idx: int) -> bool:
        if idx < self.upto:
            if idx in self.holes:
                self.holes.remove(idx)
                return True
            return False
        if idx != self.upto:
            if idx in self.extra:
                return False
            self.extra.add(idx)
            return True
        upto, extra = idx + 1, self.extra
        while upto in extra:  # each extra page is absorbed once
            extra.remove(upto)
            upto += 1
        self.upto = upto
        return True

    def discard(self, idx: int) -> bool:
        if idx < self.upto:
            if idx in self.holes:
                return False
            self.holes.add(idx)
            return True
        if idx in self.extra:
            self.extra.remove(idx)
            return True
        return False

    @property
    def nbytes(self) -> int:
        return (len(self.holes) + len(self.extra)) * _ENTRY_BYTES
