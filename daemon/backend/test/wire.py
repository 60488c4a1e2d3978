"""The test backend's migration stream format: records, replies and the handshake.

Stream protocol (all integers little-endian)::

    source                                                  destination
    (VIR_MIGRATE_TLS: the whole connection is TLS 1.3, both sides' certificates checked)
    With a stream token (cookie B's), first (:mod:`.secure`):
    PROOF   Ns (32 random bytes)                      ──►
                                                      ◄──   Nd (32 random bytes)
                                                            HMAC-SHA256(token, "dst" Ns Nd)
            checks it, else the migration fails
            HMAC-SHA256(token, "src" Nd Ns)           ──►   checks it, else drops the connection
                                                            and waits for another
    HEADER  "VMTESTMS" u16 version=1  u32 page_size   ──►   checks magic, version, page size,
            u64 npages  u64 seed  u16 len  uuid(utf-8)      uuid and npages against its guest
    (ITER   "I" u32 0  u8 2: the offer of format 2, sent with the HEADER by a source that
            reads a VERSION reply before the ACK)
                                                      ◄──   VERSION "V" u16 2 (when that offer
                                                            came with the HEADER)
                                                      ◄──   REPLY  "A"  (or "N" + reason; close)
    ITER    "I"  u32 iteration  u8 flags (1: source stopped, stop-and-copy pass;
                 2: the source offers format 2, set in the first ITER)
                                                      ◄──   VERSION "V" u16 2 (once, answering
                                                            the offer if not answered yet: it
                                                            reads format 2)
    PAGES   "P"  u32 count  count * (u32 index  u32 version  4096 bytes)     (~1 MiB per write)
    RUN     "G"  u32 first  u32 count (1..256)  count * u32 version           (format 2 only,
                 count * 4096 bytes: pages first .. first + count - 1          after "V")
     ...        (ITER / PAGES or RUN repeat: pass 1 sends every page, later passes the dirtied
                 ones)
    SWITCH  "S"  32-byte digest of the source's memory, taken with the guest stopped
            or "W" (format 2) 32-byte versions digest of the same memory
                                                      ◄──   REPLY  "A"  digest matches and
                                                                   every page was received
                                                            or "N" u16 len + reason (utf-8),
                                                            e.g. "memory digest mismatch at
                                                            switchover: …"

    Post-copy (after start_postcopy, instead of the stop-and-copy pass; source stopped):
    DISCARD "D"  u32 count  count * u32 index         ──►   (repeats, <= 65536 each) pages the
                                                            destination holds stale: dropped
    POSTCOPY "C"                                      ──►   the guest may run; a page it touches
                                                            that is not there is requested:
                                                      ◄──   REQUEST "R" u32 count  count * u32
                                                                   index (any time until ACK)
    PAGES   "P" / RUN "G"  ...  every remaining page exactly once, requested ones first
    SWITCH  "S" / "W"  digest of the source's memory as of the switch
                                                      ◄──   REPLY  "A" / "N" as above

Format 2 (issue 17) exists so that neither end does Python work per page: a RUN carries a run of
consecutive pages behind one header, which the source builds and the destination checks a run at a
time (:func:`.memory.run_bytes`, :func:`.memory.run_matches`: a page that is not its version's
bytes is kept as odd and refused at switchover, as in PAGES); its switchover digest "W" is
:func:`.memory.versions_digest`, over the page versions every page was checked against, instead of
a sum of two hashes per page. The two ends agree on it inside the stream, with no change to the
header (still version 1) or the control plane: the source offers it with ITER flag 2, which a
format 1 destination ignores; a format 2 destination answers with a VERSION reply, which the
source's reply reader takes at any time, switching to RUN records at its next batch and to "W" at
the switchover. A source offering in the first pass's ITER alone sends the pages its socket buffers
take (4 MiB: a small guest's whole first pass) as PAGES before the reply is back, each hashed at
both ends; so a source offers first with an ITER 0 in the same write as the HEADER, and a
destination that finds that ITER already received when it has checked the HEADER answers VERSION
before the ACK (:func:`offer_received`), which the source reads with the ACK
(:func:`src_handshake`): RUN records from the first page. Both halves are optional: a destination
that answers only after the ACK, or a source that offers only in the first pass's ITER (both as
before), still agree on format 2, one socket's worth of pages later. A format 1 source never
offers: its destination never sends "V" and refuses "G" and "W" as unknown records; a format 1
destination never answers: the source keeps to PAGES and "S". A destination that has received a RUN
refuses an "S" (it keeps no per-page sum from then on). A RUN is refused (NAK) when its count is 0
or above 256 or its pages go beyond the guest; a source refuses a "V" of a version below 2.

The destination answers ``N`` + reason and closes whenever it refuses the stream (wrong guest,
malformed record, guest destroyed).  The source reads replies the whole time, so a NAK or an EOF
aborts the migration at once.

The header and its reply must arrive within :data:`HANDSHAKE_TIMEOUT`; after that only EOF or an
error ends a stream early.  This module encodes and decodes the records (the destination's
reader thread reads them whole: :func:`read_record`); the source side that sends them is
:mod:`.outgoing`, the destination side :mod:`.incoming`, the socket under both
:mod:`.channel`.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from virtmig.daemon.backend.base import MigrationFailed, StreamAddress
from virtmig.daemon.backend.test.buffers import BufferPool
from virtmig.daemon.backend.test.channel import ByteReader, ByteWriter
from virtmig.daemon.backend.test.memory import (
    DIGEST_LEN,
    MIB,
    PAGE_SIZE,
    RUN_TEMPLATE_PAGES,
    SUFFIX,
    page_prefix,
    run_bytes,
    run_matches,
)
from virtmig.daemon.backend.test.sockio import BlockingReader
from virtmig.daemon.backend.test.sparse import Versions

MAGIC = b"VMTESTMS"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<8sHIQQH")  # magic, version, page size, npages, seed, uuid length
RECORD = struct.Struct("<II")  # page record header: index, version
RECORD_LEN = RECORD.size + PAGE_SIZE
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")
ITER = struct.Struct("<IB")  # iteration, flags
ITER_STOPPED = 1
ITER_OFFER_RUNS = 2  # the source can send format 2's records (a format 1 destination ignores it)
RUNS_VERSION = 2  # the format whose records a destination's VERSION reply says it reads
RUN = struct.Struct("<II")  # page run header: first page, count

MAX_BATCH_PAGES = 4096  # what a destination accepts in one record
MAX_INDICES = 65536  # page indices per DISCARD / REQUEST record
STREAM_LIMIT = 4 * MIB  # the accepting server's reader limit (the stream itself: .channel)
HANDSHAKE_TIMEOUT = 30.0  # seconds for the header and its reply; the stream itself has none


def strerror(exc: BaseException) -> str:
    """A socket error as a message: the errno's text when there is one."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def hostport(addr: StreamAddress) -> str:
    """``host:port`` of ``addr``, an IPv6 host in brackets."""
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{host}:{addr.port}"


# --- handshake -----------------------------------------------------------------------------------


async def src_handshake(
    reader: ByteReader,
    writer: ByteWriter,
    dest: StreamAddress,
    *,
    uuid: str,
    npages: int,
    seed: int,
    offered: Callable[[int], None] | None = None,
) -> None:
    """Send the HEADER and wait for its reply; MigrationFailed when refused or silent.

    ``offered``: the source offers format 2 with the HEADER (an ITER 0), and a VERSION reply
    before the ACK is given to it."""
    raw_uuid = uuid.encode()
    head = HEADER.pack(MAGIC, PROTOCOL_VERSION, PAGE_SIZE, npages, seed, len(raw_uuid)) + raw_uuid
    if offered is not None:
        head += b"I" + ITER.pack(0, ITER_OFFER_RUNS)
    writer.write(head)
    await writer.drain()
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            refused = await read_reply(reader, offered=offered)
    except TimeoutError:
        raise MigrationFailed(
            f"timed out waiting for the migration destination '{hostport(dest)}'"
        ) from None
    if refused is not None:
        raise MigrationFailed(refused)


OFFER_LEN = 1 + ITER.size  # the ITER 0 that offers format 2, behind the HEADER


def offer_received(ahead: bytes) -> bool:
    """Right after the HEADER, ``ahead`` being what is already received behind it
    (:meth:`.channel.Channel.peek`: nothing more is read from the socket, so a source that
    waits for the ACK before it sends anything else is never waited for): whether it is an
    ITER offering format 2 (sent with the HEADER)."""
    return (len(ahead) == OFFER_LEN and ahead[:1] == b"I"
            and bool(ITER.unpack_from(ahead, 1)[1] & ITER_OFFER_RUNS))


async def dst_read_header(reader: ByteReader, uuid: str, npages: int) -> int:
    """Read the HEADER and check it is for guest ``uuid`` of ``npages``; return the seed.

    MigrationFailed (to be sent back as a NAK) when it is late, malformed or for another guest.
    """
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            head = await reader.readexactly(HEADER.size)
            magic, version, page_size, their_npages, seed, uuid_len = HEADER.unpack(head)
            their_uuid = (await reader.readexactly(uuid_len)).decode("utf-8", "replace")
    except TimeoutError:
        raise MigrationFailed("timed out waiting for the migration stream header") from None
    if magic != MAGIC:
        raise MigrationFailed("incoming migration stream is not a test backend stream")
    if version != PROTOCOL_VERSION:
        raise MigrationFailed(f"unsupported migration stream version {version}")
    if their_uuid != uuid or their_npages != npages or page_size != PAGE_SIZE:
        raise MigrationFailed(
            f"incoming migration stream is for another guest: uuid {their_uuid}, {their_npages} "
            f"pages of {page_size} bytes; expected uuid {uuid}, {npages} pages of "
            f"{PAGE_SIZE} bytes"
        )
    return int(seed)


# --- records -------------------------------------------------------------------------------------


def page_records(
    seed: int, versions: Versions, batch: Sequence[int], corrupt: int | None
) -> bytes:
    """A PAGES record of ``batch`` at ``versions``; page ``corrupt`` gets a bad byte."""
    prefix = page_prefix(seed)
    parts = [b"P", U32.pack(len(batch))]
    for i in batch:
        v = versions[i]
        body = prefix if i != corrupt else bytes([prefix[0] ^ 0xFF]) + prefix[1:]
        parts += (RECORD.pack(i, v), body, SUFFIX.pack(seed, i, v))
    return b"".join(parts)


def _runs(batch: Sequence[int]) -> list[tuple[int, int]]:
    """``batch`` (ascending) as runs of consecutive pages: ``(first, count)``, each at most
    :data:`RUN_TEMPLATE_PAGES` long."""
    if isinstance(batch, range) and batch.step == 1:
        return [(first, min(RUN_TEMPLATE_PAGES, batch.stop - first))
                for first in range(batch.start, batch.stop, RUN_TEMPLATE_PAGES)]
    out: list[tuple[int, int]] = []
    first = prev = -2
    for i in batch:
        if i != prev + 1 or i - first >= RUN_TEMPLATE_PAGES:
            if prev >= 0:
                out.append((first, prev - first + 1))
            first = i
        prev = i
    if prev >= 0:
        out.append((first, prev - first + 1))
    return out


def page_runs(
    seed: int, versions: Versions, batch: Sequence[int], corrupt: int | None,
    pool: BufferPool | None = None,
) -> list[bytes | bytearray]:
    """RUN records of ``batch`` (ascending) at ``versions``; page ``corrupt`` gets a bad byte.

    Each record is two buffers, its header with the versions and its pages, for ``write``: no
    step per page, no copy of the pages into a larger buffer.  The pages of a full run are
    built in a buffer of ``pool`` when given, whose buffers hold runs of the seed
    (:func:`.memory.run_template`; the caller gives it back once sent)."""
    parts: list[bytes | bytearray] = []
    for first, count in _runs(batch):
        vers = versions.get_run(first, count)
        out = pool.get() if pool is not None and count * PAGE_SIZE == pool.size else None
        pages: bytes | bytearray = run_bytes(seed, first, vers, out, templated=out is not None)
        if corrupt is not None and first <= corrupt < first + count:
            damaged = bytearray(pages)
            damaged[(corrupt - first) * PAGE_SIZE] ^= 0xFF
            # bytes, which no pool takes back: these are not the seed's pages any more
            pages = bytes(damaged)
            if out is not None:
                assert pool is not None
                pool.put(out)
        if sys.byteorder == "big":
            vers.byteswap()
        parts += (b"G" + RUN.pack(first, count) + vers.tobytes(), pages)
    return parts


def pack_indices(kind: bytes, indices: Sequence[int]) -> bytes:
    """DISCARD / REQUEST records for ``indices`` (as many records as needed)."""
    out: list[bytes] = []
    for start in range(0, len(indices), MAX_INDICES):
        chunk = array("I", indices[start : start + MAX_INDICES])
        if sys.byteorder == "big":
            chunk.byteswap()
        out += (kind, U32.pack(len(chunk)), chunk.tobytes())
    return b"".join(out)


async def read_indices(reader: ByteReader, npages: int, what: str) -> array[int]:
    """The body of a DISCARD / REQUEST record; MigrationFailed when it is malformed."""
    (count,) = U32.unpack(await reader.readexactly(U32.size))
    _check_indices(count, what)
    return _indices(await reader.readexactly(4 * count), npages, what)


def _check_indices(count: int, what: str) -> None:
    if not 0 < count <= MAX_INDICES:
        raise MigrationFailed(f"malformed migration stream: {what} of {count} pages")


def _indices(raw: bytes | bytearray, npages: int, what: str) -> array[int]:
    indices = array("I")
    indices.frombytes(raw)
    if sys.byteorder == "big":
        indices.byteswap()
    if max(indices) >= npages:
        raise MigrationFailed(f"malformed migration stream: {what} of page {max(indices)}")
    return indices


# --- the destination's reader thread -------------------------------------------------------------


@dataclass
class Framing:
    """What the destination's reader thread knows of the stream, to tell how long a record is
    and whether it may come: the same checks as the destination's before a byte of its body."""

    npages: int
    reads_runs: bool  # it answers an offer of format 2
    pool: BufferPool | None = None  # for the pages of full runs (the taker gives them back)
    seed: int | None = None  # the header's: a RUN's pages are compared with their versions'
    runs: bool = False  # format 2 was offered and answered
    postcopy: bool = False  # the POSTCOPY record arrived


@dataclass(slots=True)
class Record:
    """One record of the stream, read whole: ``kind``, its numbers, its bytes.

    RUN: ``a`` first page, ``b`` count, ``versions``, ``data`` the pages, ``matches`` whether
    they are exactly the bytes of those versions (:func:`.memory.run_matches`, computed where
    they were just received: a pure function of the record and the seed); PAGES: ``b`` count,
    ``data`` the entries; ITER: ``a`` iteration, ``b`` flags; SWITCH (S, W): ``data`` the digest;
    DISCARD: ``versions`` the indices; POSTCOPY: nothing."""

    kind: bytes
    a: int = 0
    b: int = 0
    data: bytes | bytearray = b""
    versions: array[int] | None = None
    matches: bool = False


def is_switch(rec: Record) -> bool:
    """The SWITCH record ends what the source sends."""
    return rec.kind in (b"S", b"W")


def read_record(rd: BlockingReader, fr: Framing) -> Record:
    """Read the next record whole (in the reader thread); MigrationFailed for a record that may
    not come or whose length is out of bounds -- before its body is read."""
    kind = bytes(rd.exact(1))
    if kind == b"G" and fr.runs:
        first, count = RUN.unpack(rd.exact(RUN.size))
        if not 0 < count <= RUN_TEMPLATE_PAGES:
            raise MigrationFailed(f"malformed migration stream: run of {count} pages")
        if first + count > fr.npages:
            raise MigrationFailed(
                f"malformed migration stream: run of pages {first} to {first + count - 1} "
                f"of {fr.npages}")
        versions = array("I")
        versions.frombytes(rd.exact(4 * count))
        if sys.byteorder == "big":
            versions.byteswap()
        pool = fr.pool
        pages = (pool.get() if pool is not None and count * PAGE_SIZE == pool.size
                 else bytearray(count * PAGE_SIZE))
        rd.exact_into(memoryview(pages))
        matches = fr.seed is not None and run_matches(fr.seed, first, versions, pages)
        return Record(kind, first, count, pages, versions, matches)
    if kind == b"P":
        (count,) = U32.unpack(rd.exact(U32.size))
        if not 0 < count <= MAX_BATCH_PAGES:
            raise MigrationFailed(f"malformed migration stream: batch of {count} pages")
        return Record(kind, 0, count, rd.exact(count * RECORD_LEN))
    if kind == b"I":
        iteration, flags = ITER.unpack(rd.exact(ITER.size))
        if flags & ITER_OFFER_RUNS and fr.reads_runs:
            fr.runs = True
        return Record(kind, iteration, flags)
    if kind == b"S" or (kind == b"W" and fr.runs):
        return Record(kind, data=rd.exact(DIGEST_LEN))
    if kind in (b"D", b"C") and fr.postcopy:
        raise MigrationFailed(
            f"malformed migration stream: record {kind!r} after the switch to post-copy")
    if kind == b"D":
        (count,) = U32.unpack(rd.exact(U32.size))
        _check_indices(count, "discard")
        return Record(kind, versions=_indices(rd.exact(4 * count), fr.npages, "discard"))
    if kind == b"C":
        fr.postcopy = True
        return Record(kind)
    raise MigrationFailed(f"malformed migration stream: unknown record {kind!r}")



# --- replies -------------------------------------------------------------------------------------


def nak(reason: str) -> bytes:
    """A NAK reply carrying ``reason``."""
    data = reason.encode("utf-8", "replace")[:0xFFFF]
    return b"N" + U16.pack(len(data)) + data


def offer_reply() -> bytes:
    """The VERSION reply: the destination reads format :data:`RUNS_VERSION`'s records."""
    return b"V" + U16.pack(RUNS_VERSION)


async def read_reply(
    reader: ByteReader,
    requested: Callable[[ByteReader], Awaitable[None]] | None = None,
    offered: Callable[[int], None] | None = None,
) -> str | None:
    """Read one reply: ``None`` for ACK, the reason for NAK; MigrationFailed on EOF/garbage.

    With ``requested``, REQUEST records before the reply are handed to it (it reads the body);
    with ``offered``, a VERSION reply's version is.
    """
    try:
        while True:
            kind = await reader.readexactly(1)
            if kind == b"A":
                return None
            if kind == b"N":
                (n,) = U16.unpack(await reader.readexactly(U16.size))
                reason = (await reader.readexactly(n)).decode("utf-8", "replace")
                return reason or "migration refused by the destination"
            if kind == b"R" and requested is not None:
                await requested(reader)
                continue
            if kind == b"V" and offered is not None:
                (version,) = U16.unpack(await reader.readexactly(U16.size))
                offered(version)
                continue
            break
    except asyncio.IncompleteReadError:
        raise MigrationFailed(
            "Unable to read from socket: migration stream closed by the destination"
        ) from None
    except OSError as e:
        raise MigrationFailed(f"Unable to read from socket: {strerror(e)}") from None
    raise MigrationFailed(f"malformed reply from the migration destination: {kind!r}")
