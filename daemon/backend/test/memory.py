"""The test backend's memory model: what a page holds and what the memory digest is.

A guest has no CPU and no devices, only memory, and that memory is cheap to hold: it is a 64-bit
``seed`` plus one version counter per 4 KiB page, stored only for pages ever written
(:mod:`.sparse`).  The content of a page is the pure function :func:`page_bytes` of
``(seed, index, version)`` -- a 4072-byte block derived once per seed, followed by
``seed, index, version`` as three little-endian u64.  Migration really moves that content: the
source sends every page's 4096 bytes over TCP, and the destination hashes the bytes it
*received*.

Memory digest: the sum modulo 2**256 of one term per page, :func:`page_term` -- the
``blake2b-256`` of (u64 page index, ``blake2b-128`` hash of the page's bytes) -- as 32
little-endian bytes (:func:`digest_of`; :meth:`TestBackend.memory_digest`).  A sum of per-page
hashes (an additive multiset hash, bound to page positions by the index) lets either end replace
one page's term without rehashing the others, so neither keeps a hash per page.  Both ends
compute it -- the source from its memory, the destination from the bytes it received -- and a
migration completes only when they agree.

Page hashing resumes a blake2b state cached per seed when a page starts with the seed's block --
the result is the hash of the bytes as received.

Runs of pages (stream format 2, :mod:`.wire`) are built and checked a run at a time, never a page
at a time: :func:`run_bytes` copies a cached template of the seed's pages and writes the three
suffix words of every page with three strided assignments; a destination checks what it
received in place (:func:`run_matches`: the suffix words as three strided columns, the prefixes
by ``startswith`` mapped over the page offsets), without copying it.  Their switchover check
is :func:`versions_digest`: ``blake2b-256`` over the seed, the page count and the guest's
written version chunks -- the same memory (a page's bytes are a function of seed, index and
version, and every page received was compared with its version's bytes), for one hash call per
64 pages written instead of two per page.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import sys
from array import array
from collections.abc import Iterable
from itertools import repeat

PAGE_SIZE = 4096
MIB = 1024 * 1024
SUFFIX = struct.Struct("<QQQ")  # last 24 bytes of every page: seed, index, version
PREFIX_LEN = PAGE_SIZE - SUFFIX.size
PAGE_HASH_LEN = 16
DIGEST_LEN = 32
_DIGEST_PERSON = b"virtmig-testmem"
VERSION_MASK = 0xFFFFFFFF  # page versions are u32 and wrap
DIGEST_MOD = 1 << (8 * DIGEST_LEN)
_U64 = struct.Struct("<Q")
_TERM_STATE = hashlib.blake2b(digest_size=DIGEST_LEN, person=_DIGEST_PERSON)


@functools.lru_cache(maxsize=64)
def _prefix(seed: int) -> tuple[bytes, hashlib.blake2b]:
    """The seed's 4072-byte page prefix and a blake2b state that has consumed it."""
    block = hashlib.shake_256(b"virtmig-test-page" + seed.to_bytes(8, "little")).digest(PREFIX_LEN)
    state = hashlib.blake2b(block, digest_size=PAGE_HASH_LEN)
    return block, state


RUN_TEMPLATE_PAGES = 256  # the longest run :func:`run_bytes` builds (1 MiB)
_WORDS = PAGE_SIZE // 8  # u64 words per page; the suffix is the last three
_VERSIONS_PERSON = b"virtmig-testver"


def run_template(seed: int) -> bytearray:
    """A new buffer of :data:`RUN_TEMPLATE_PAGES` pages with the seed's prefix (for
    ``run_bytes(..., templated=True)``)."""
    return bytearray(_run_template(seed))


@functools.lru_cache(maxsize=4)
def _run_template(seed: int) -> bytes:
    """:data:`RUN_TEMPLATE_PAGES` pages of the seed's prefix, their suffixes zero."""
    return (_prefix(seed)[0] + bytes(SUFFIX.size)) * RUN_TEMPLATE_PAGES


def run_bytes(seed: int, first: int, versions: array[int],
              out: bytearray | None = None, *, templated: bool = False) -> bytearray:
    """The bytes of pages ``first`` .. ``first + len(versions) - 1`` at ``versions``: the same as
    joining their :func:`page_bytes`, built without a step per page.

    Into ``out`` when given, a buffer of exactly that size (a reused buffer costs no allocation
    and no page faults); ``templated``: it holds a run of the seed already (every page's prefix
    is the seed's: :func:`run_template`), so only the suffixes are written."""
    count = len(versions)
    if not 0 < count <= RUN_TEMPLATE_PAGES:
        raise ValueError(f"a run is 1 to {RUN_TEMPLATE_PAGES} pages, not {count}")
    if out is None:
        buf = bytearray(memoryview(_run_template(seed))[: count * PAGE_SIZE])
    else:
        buf = out
        if not templated:
            buf[:] = memoryview(_run_template(seed))[: count * PAGE_SIZE]
    words = memoryview(buf).cast("Q")
    columns = (array("Q", [seed]) * count, array("Q", range(first, first + count)),
               array("Q", versions))
    for col, values in enumerate(columns):
        if sys.byteorder == "big":
            values.byteswap()
        words[_WORDS - 3 + col :: _WORDS] = values
    return buf


def _le_words(values: array[int]) -> bytes:
    """``values`` (typecode ``Q``) as little-endian u64 bytes."""
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def run_matches(seed: int, first: int, versions: array[int], pages: bytes | bytearray) -> bool:
    """Whether ``pages`` are exactly ``run_bytes(seed, first, versions)``, checked without a
    copy: the three suffix words of every page as strided columns, and every page's prefix
    with ``startswith`` at its offset (a ``memcmp`` each, mapped in C)."""
    count = len(versions)
    if len(pages) != count * PAGE_SIZE:
        return False
    words = memoryview(pages).cast("Q")
    columns = (array("Q", [seed]) * count, array("Q", range(first, first + count)),
               array("Q", versions))
    for col, values in enumerate(columns):
        if words[_WORDS - 3 + col :: _WORDS].tobytes() != _le_words(values):
            return False
    prefix = _prefix(seed)[0]
    return all(map(pages.startswith, repeat(prefix, count), range(0, len(pages), PAGE_SIZE)))


def versions_digest(seed: int, npages: int, chunks: Iterable[tuple[int, bytes]]) -> bytes:
    """The switchover digest of stream format 2: of the seed, the page count and the written
    version chunks ``(chunk index, versions as little-endian u32)`` in ascending order."""
    h = hashlib.blake2b(_U64.pack(seed) + _U64.pack(npages), digest_size=DIGEST_LEN,
                        person=_VERSIONS_PERSON)
    for key, raw in chunks:
        h.update(_U64.pack(key))
        h.update(raw)
    return h.digest()


def page_prefix(seed: int) -> bytes:
    """The first 4072 bytes of every page of a guest with ``seed``."""
    return _prefix(seed)[0]


def page_bytes(seed: int, idx: int, version: int) -> bytes:
    """The 4096 bytes of page ``idx`` at ``version`` of a guest with ``seed``."""
    return _prefix(seed)[0] + SUFFIX.pack(seed, idx, version)


def page_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte blake2b hash of one page's bytes (what the memory digest is made of)."""
    return hashlib.blake2b(data, digest_size=PAGE_HASH_LEN).digest()


def page_hash_of(seed: int, idx: int, version: int) -> bytes:
    """``page_hash(page_bytes(seed, idx, version))``, resuming the seed's cached prefix state."""
    h = _prefix(seed)[1].copy()
    h.update(SUFFIX.pack(seed, idx, version))
    return h.digest()


def received_page(seed: int, buf: bytes | bytearray, off: int, idx: int,
                  version: int) -> tuple[bytes, bool]:
    """``page_hash(buf[off:off + 4096])`` (cheap when the page has the seed's prefix), and
    whether those bytes are exactly ``page_bytes(seed, idx, version)``."""
    block, state = _prefix(seed)
    if buf.startswith(block, off):
        tail = buf[off + PREFIX_LEN : off + PAGE_SIZE]
        h = state.copy()
        h.update(tail)
        return h.digest(), tail == SUFFIX.pack(seed, idx, version)
    return page_hash(memoryview(buf)[off : off + PAGE_SIZE]), False


def page_term(idx: int, h: bytes) -> int:
    """Page ``idx``'s term of the memory digest, given the hash ``h`` of its bytes."""
    raw = _TERM_STATE.copy()
    raw.update(_U64.pack(idx) + h)
    return int.from_bytes(raw.digest(), "little")


def term_of(seed: int, idx: int, version: int) -> int:
    """``page_term(idx, page_hash(page_bytes(seed, idx, version)))``."""
    return page_term(idx, page_hash_of(seed, idx, version))


def digest_bytes(total: int) -> bytes:
    """The 32-byte memory digest of the sum of every page's term."""
    return (total % DIGEST_MOD).to_bytes(DIGEST_LEN, "little")


def digest_of(hashes: bytes | bytearray) -> bytes:
    """The memory digest of the concatenated page hashes ``hashes`` (in page order)."""
    total = sum(
        page_term(i, bytes(hashes[off : off + PAGE_HASH_LEN]))
        for i, off in enumerate(range(0, len(hashes), PAGE_HASH_LEN))
    )
    return digest_bytes(total)
