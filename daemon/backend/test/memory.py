"""The test backend's memory model: what a page holds and what the memory digest is.

A guest has no CPU and no devices, only memory, and that memory is cheap to hold: it is a 64-bit
``seed`` plus one version counter per 4 KiB page.  The content of a page is the pure function
:func:`page_bytes` of ``(seed, index, version)`` -- a 4072-byte block derived once per seed,
followed by ``seed, index, version`` as three little-endian u64.  Migration really moves that
content: the source sends every page's 4096 bytes over TCP, and the destination hashes the bytes
it *received*.

Memory digest: ``blake2b-256`` over the ``blake2b-128`` hashes of all pages in page order
(:func:`digest_of`; :meth:`TestBackend.memory_digest`).  Both ends compute it -- the source from
its memory, the destination from the bytes it received -- and a migration completes only when
they agree.

Page hashing resumes a blake2b state cached per seed when a page starts with the seed's block --
the result is the hash of the bytes as received.
"""

from __future__ import annotations

import functools
import hashlib
import struct

PAGE_SIZE = 4096
MIB = 1024 * 1024
SUFFIX = struct.Struct("<QQQ")  # last 24 bytes of every page: seed, index, version
PREFIX_LEN = PAGE_SIZE - SUFFIX.size
PAGE_HASH_LEN = 16
DIGEST_LEN = 32
_DIGEST_PERSON = b"virtmig-testmem"
VERSION_MASK = 0xFFFFFFFF  # page versions are u32 and wrap


@functools.lru_cache(maxsize=64)
def _prefix(seed: int) -> tuple[bytes, hashlib.blake2b]:
    """The seed's 4072-byte page prefix and a blake2b state that has consumed it."""
    block = hashlib.shake_256(b"virtmig-test-page" + seed.to_bytes(8, "little")).digest(PREFIX_LEN)
    state = hashlib.blake2b(block, digest_size=PAGE_HASH_LEN)
    return block, state


def page_prefix(seed: int) -> bytes:
    """The first 4072 bytes of every page of a guest with ``seed``."""
    return _prefix(seed)[0]


def page_bytes(seed: int, idx: int, version: int) -> bytes:
    """The 4096 bytes of page ``idx`` at ``version`` of a guest with ``seed``."""
    return _prefix(seed)[0] + SUFFIX.pack(seed, idx, version)


def page_hash(data: bytes | memoryview) -> bytes:
    """The 16-byte blake2b hash of one page's bytes (what the memory digest is made of)."""
    return hashlib.blake2b(data, digest_size=PAGE_HASH_LEN).digest()


def page_hash_of(seed: int, idx: int, version: int) -> bytes:
    """``page_hash(page_bytes(seed, idx, version))``, resuming the seed's cached prefix state."""
    h = _prefix(seed)[1].copy()
    h.update(SUFFIX.pack(seed, idx, version))
    return h.digest()


def received_page_hash(seed: int, buf: bytes, off: int) -> bytes:
    """``page_hash(buf[off:off + 4096])``; cheap when the page has the seed's prefix."""
    block, state = _prefix(seed)
    if buf.startswith(block, off):
        h = state.copy()
        h.update(buf[off + PREFIX_LEN : off + PAGE_SIZE])
        return h.digest()
    return page_hash(memoryview(buf)[off : off + PAGE_SIZE])


def digest_of(hashes: bytes | bytearray) -> bytes:
    """The 32-byte memory digest of the concatenated page hashes ``hashes`` (in page order)."""
    return hashlib.blake2b(hashes, digest_size=DIGEST_LEN, person=_DIGEST_PERSON).digest()
