"""Per-page state of a test-backend guest that costs memory only for the pages it concerns.

A guest may declare terabytes of memory; the daemon holds state only for pages that were written
or that a migration stream handles out of order, never a fixed amount per declared page:

:class:`Versions`
    Page versions (u32, wrapping), 0 for a page never written, in chunks of
    :data:`CHUNK_PAGES` allocated on the first write into them.
:class:`PageSet`
    A set of page indices stored as a prefix ``[0, upto)`` minus ``holes``, plus ``extra`` pages
    above it: cheap for what a migration stream does (pass 1 sends every page in order, later
    records resend or discard a few); a run of pages joins it at once (``add_range``).

Runs of versions are read and written a chunk at a time (``get_run``/``set_run``), so a stream
of page runs costs one Python step per 64 pages, not per page.

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

    def get_run(self, first: int, count: int) -> array[int]:
        """The versions of pages ``first`` .. ``first + count - 1`` (one slice per chunk)."""
        out = array("I")
        idx, end = first, first + count
        while idx < end:
            key, off = idx >> CHUNK_SHIFT, idx & _CHUNK_MASK
            n = min(end - idx, CHUNK_PAGES - off)
            chunk = self._chunks.get(key)
            out += chunk[off : off + n] if chunk is not None else array("I", _ZERO_CHUNK[: 4 * n])
            idx += n
        return out

    def set_run(self, first: int, values: array[int]) -> None:
        """Set the versions of pages ``first`` .. ``first + len(values) - 1``."""
        idx, end, pos = first, first + len(values), 0
        while idx < end:
            key, off = idx >> CHUNK_SHIFT, idx & _CHUNK_MASK
            n = min(end - idx, CHUNK_PAGES - off)
            part = values[pos : pos + n]
            chunk = self._chunks.get(key)
            if chunk is None and any(part):
                chunk = self._chunks[key] = array("I", _ZERO_CHUNK)
            if chunk is not None:
                chunk[off : off + n] = part
            idx, pos = idx + n, pos + n

    def copy(self) -> Versions:
        other = Versions(self.npages)
        other._chunks = {key: array("I", chunk) for key, chunk in self._chunks.items()}
        return other

    def written_chunks(self) -> Iterator[tuple[int, bytes]]:
        """``(chunk index, its versions as little-endian u32)`` of the chunks holding a version
        other than 0, in ascending order: what :func:`.memory.versions_digest` hashes."""
        for key in sorted(self._chunks):
            chunk = self._chunks[key]
            if any(chunk):
                if sys.byteorder == "big":
                    chunk = array("I", chunk)
                    chunk.byteswap()
                yield key, chunk.tobytes()

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

    def add_range(self, first: int, count: int) -> None:
        """Add pages ``first`` .. ``first + count - 1`` (in order at the prefix's end: O(1))."""
        end = first + count
        holes, extra = self.holes, self.extra
        if holes and first < self.upto:
            low, high = first, min(end, self.upto)
            if len(holes) <= high - low:
                holes.difference_update([h for h in holes if low <= h < high])
            else:
                holes.difference_update(range(low, high))
        if end <= self.upto:
            return
        if first > self.upto:
            extra.update(range(first, end))
            return
        if extra:
            if len(extra) <= end - self.upto:
                extra.difference_update([e for e in extra if e < end])
            else:
                extra.difference_update(range(self.upto, end))
        while end in extra:  # each extra page is absorbed once
            extra.remove(end)
            end += 1
        self.upto = end

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
