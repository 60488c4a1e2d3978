"""The destination side of a test-backend migration: the incoming stream and how it settles.

The destination guest is paused until the stream completes.  It adopts the stream's seed and
hashes every page as received, adding its term to a running sum (a resent or discarded page's
earlier term leaves it: the term of its version, or, for bytes that are not that version's
content, the hash kept in ``Incoming.odd`` -- at most :data:`MAX_ODD_PAGES` of those); at SWITCH
it answers ACK only when every page arrived and the digest of that sum is the source's, else
NAK + reason ("memory digest mismatch at switchover: …").  On ACK it holds exactly the received
memory (and can be migrated onwards); on any failure before post-copy it quits, like a QEMU
whose incoming migration failed.  What it holds per page is sparse (:mod:`.sparse`): pages
received out of order, not every page of the guest.

Format 2 (:mod:`.wire`; offered by the source in its first ITER, answered with a VERSION reply
unless :data:`READS_RUNS` is off): a RUN record is compared with the bytes of the versions it
names without a step per page, its versions and pages are stored a chunk at a time, and no page is
hashed; a page that differs is kept as odd (bounded as above, refused at switchover).  Its SWITCH
("W") is checked against the versions digest of the received versions (in post-copy a copy of
them, ``Incoming.got``, apart from the guest's own writes); the format 1 sum is then not kept,
and the guest computes its digest afresh when next asked.

The stream runs on a :class:`.channel.Channel`: its reader thread reads whole records ahead
(:func:`.wire.read_record`, refusing one that may not come or whose length is out of bounds
before its body, and checking a RUN's pages where they arrived); this module's loop-side code
takes them in order and keeps every other check and all of the migration's state.

Post-copy: from the POSTCOPY record on, the guest may be resumed; a write to a page that has not
arrived is held and applied on arrival (the vCPU would block on the fault) and the page is
requested once (REQUEST records, sent every :data:`_PULL_INTERVAL`).  At the end its memory
becomes the received pages plus its writes since the switch.  A failure after the switch leaves
the guest paused with its incomplete memory (``broken``: :class:`PostcopyFailed`).  ``downtime_ms``
runs from the switch until the guest was resumed (or the end).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from array import array
from dataclasses import dataclass, field, replace

from virtmig.daemon.backend.base import (
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    PostcopyFailed,
)
from virtmig.daemon.backend.test.buffers import BufferPool
from virtmig.daemon.backend.test.channel import Channel
from virtmig.daemon.backend.test.guest import Guest
from virtmig.daemon.backend.test.memory import (
    PAGE_SIZE,
    digest_bytes,
    page_bytes,
    page_hash,
    page_term,
    received_page,
    run_matches,
    term_of,
    versions_digest,
)
from virtmig.daemon.backend.test.sparse import PageSet, Versions
from virtmig.daemon.backend.test.util import ms
from virtmig.daemon.backend.test.wire import (
    ITER_OFFER_RUNS,
    ITER_STOPPED,
    OFFER_LEN,
    RECORD,
    RECORD_LEN,
    Framing,
    Record,
    dst_read_header,
    is_switch,
    nak,
    offer_received,
    offer_reply,
    pack_indices,
    read_record,
    strerror,
)
from virtmig.proto import logsafe

log = logsafe.logger(__name__)

_PULL_INTERVAL = 0.005  # seconds between a post-copy destination's dirty ticks / page requests
MAX_ODD_PAGES = 1024  # pages held with bytes other than their version's before the stream fails
READS_RUNS = True  # answer a source's offer of format 2 (False: a format 1 destination, for tests)
# Answer an offer that came with the HEADER before the ACK (False: a destination that answers
# only once it reads the offer as a record, as before session 12, for tests).
EARLY_VERSION_REPLY = True


@dataclass(eq=False)
class Incoming:
    """One incoming migration: its listener, stream task, received-page map and outcome."""

    guest: Guest
    done: asyncio.Future[MigrationProgress]
    # Buffers for the pages of full runs: the backend's, kept across migrations.
    pool: BufferPool
    started: float = field(default_factory=time.monotonic)
    status: MigrationStatus = MigrationStatus.SETUP
    server: asyncio.Server | None = None
    task: asyncio.Task[None] | None = None
    # Connections proving themselves (TLS, stream token) before one becomes ``task``.
    admitting: set[asyncio.Task[None]] = field(default_factory=set)
    abort_reason: str = ""
    connected_at: float = 0.0
    stopped_at: float = 0.0
    received: PageSet = field(default_factory=PageSet)  # pages seen (and current)
    total: int = 0  # the sum of the received pages' digest terms
    odd: dict[int, bytes] = field(default_factory=dict)  # page hashes of unexpected bytes
    pages: int = 0  # page records received, repeats included
    iteration: int = 0
    postcopy: bool = False  # the POSTCOPY record arrived
    resumed_at: float = 0.0  # post-copy: when the guest first ran here
    requests: int = 0  # pages requested from the source
    # Format 2 (RUN records): offered to the source (VERSION reply sent), runs received (the
    # format 1 sum is not kept from then on), a versions switchover, the versions received
    # (post-copy only: the guest's own versions then include its writes).
    runs_offered: bool = False
    runs_seen: bool = False
    by_versions: bool = False
    got: Versions | None = None
    final: MigrationProgress | None = None

    def snapshot(self) -> MigrationProgress:
        if self.final is not None:
            return self.final
        now = time.monotonic()
        active = now - self.connected_at if self.connected_at else 0.0
        return MigrationProgress(
            status=self.status,
            total_bytes=self.guest.npages * PAGE_SIZE,
            processed_bytes=self.pages * PAGE_SIZE,
            remaining_bytes=(self.guest.npages - len(self.received)) * PAGE_SIZE,
            iteration=self.iteration,
            bandwidth_bytes_per_s=round(self.pages * PAGE_SIZE / active) if active > 0 else 0,
            setup_time_ms=ms((self.connected_at or now) - self.started),
            total_time_ms=ms(now - self.started),
            page_size=PAGE_SIZE,
            normal_pages=self.pages,
            postcopy_requests=self.requests,
        )


async def dst_receive(guests: dict[str, Guest], inc: Incoming, chan: Channel) -> None:
    """Own task for the one accepted stream: never raises, always settles ``inc.done`` (at once,
    as the stream ends), then waits for the stream's threads to end.  The stream's threads
    start once the channel holds a slot (:meth:`.channel.Channel.admit`: the wait ends with an
    abort, as the stream would)."""
    try:
        await chan.admit()
        inc.connected_at = time.monotonic()
        inc.status = MigrationStatus.ACTIVE
        await _receive_stream(inc, chan)
    except asyncio.CancelledError:
        chan.write(nak(f"destination: {inc.abort_reason or 'migration aborted'}"))
        chan.close()
        _fail(guests, inc, MigrationFailed(inc.abort_reason or "migration aborted"))
    except MigrationFailed as e:  # refused: tell the source why
        chan.write(nak(str(e)))
        chan.close()
        _fail(guests, inc, e)
    except asyncio.IncompleteReadError:
        chan.abort()
        _fail(
            guests,
            inc,
            MigrationFailed("migration stream ended early: the source closed the connection"),
        )
    except OSError as e:
        chan.abort()
        _fail(guests, inc, MigrationFailed(f"Unable to read from socket: {strerror(e)}"))
    except Exception as e:  # a bug: still fail cleanly
        log.exception("test backend: incoming migration of %s failed", inc.guest.uuid)
        chan.abort()
        _fail(guests, inc, MigrationFailed(f"internal error in incoming migration: {e}"))
    # (settled: a cancel from here on only stops this wait; the threads end regardless)
    with contextlib.suppress(asyncio.CancelledError):
        await chan.wait_closed()


def dst_abort(guests: dict[str, Guest], inc: Incoming, reason: str) -> None:
    """Abort the incoming migration: the stream task NAKs ``reason``, or it fails at once."""
    if inc.done.done():
        return
    if inc.server is not None:
        inc.server.close()
    for task in list(inc.admitting):
        task.cancel()
    if inc.task is not None and not inc.task.done():
        inc.abort_reason = reason
        inc.task.cancel()
    else:
        _fail(guests, inc, MigrationFailed(reason))


def _fail(guests: dict[str, Guest], inc: Incoming, error: MigrationFailed) -> None:
    """The incoming migration failed: incoming_wait raises ``error``.

    Before the switch to post-copy the guest quits; after it the guest stays, paused, with
    its incomplete memory (:class:`PostcopyFailed`).
    """
    if inc.server is not None:
        inc.server.close()
    guest, uuid = inc.guest, inc.guest.uuid
    if inc.done.done():
        return
    if inc.postcopy:
        if not isinstance(error, PostcopyFailed):
            error = PostcopyFailed(str(error))
        guest.tick()
        guest.paused = True
        guest.broken = True
        guest.faults = []
        guest.pending = {}
        guest.dirty = None
    elif guests.get(uuid) is guest:
        del guests[uuid]
    inc.status = MigrationStatus.FAILED
    inc.final = replace(inc.snapshot(), status=MigrationStatus.FAILED, error=str(error))
    inc.done.set_exception(error)
    inc.received = PageSet()
    inc.got = None
    inc.odd = {}


async def _receive_stream(inc: Incoming, chan: Channel) -> None:
    """Handshake, records, switchover check; MigrationFailed when the stream is refused."""
    guest = inc.guest
    npages = guest.npages
    seed = await dst_read_header(chan, guest.uuid, npages)
    # The memory is the source's: adopt its seed (it only differs if the XML changed it).
    guest.seed = seed
    if READS_RUNS and EARLY_VERSION_REPLY and offer_received(await chan.peek(OFFER_LEN)):
        inc.runs_offered = True  # (the ITER 0 that offered it is read as a record below)
        chan.write(offer_reply())
    chan.write(b"A")
    await chan.drain()
    # From here on the reader thread reads whole records ahead (wire.read_record).
    pool = inc.pool
    framing = Framing(npages, READS_RUNS, pool, seed)
    chan.start_frames(functools.partial(read_record, fr=framing), is_switch)

    # inc.total: the terms of the pages as received (post-copy: not the guest's own writes).
    pull: asyncio.Task[None] | None = None
    try:
        source_digest = await _receive_records(inc, chan, npages, seed, pool)
        if inc.postcopy:
            pull = asyncio.get_running_loop().create_task(_pull(inc, chan))
            source_digest = await _receive_records(inc, chan, npages, seed, pool)
    finally:
        if pull is not None:
            pull.cancel()
    assert source_digest is not None  # after POSTCOPY only SWITCH ends the records

    missing = npages - len(inc.received)
    if missing:
        raise MigrationFailed(
            f"memory digest mismatch at switchover: {missing} of {npages} pages never received"
        )
    if inc.by_versions:
        _check_versions(inc, seed, source_digest)
    else:
        digest = digest_bytes(inc.total)
        if digest != source_digest:
            raise MigrationFailed(
                f"memory digest mismatch at switchover: source {source_digest.hex()[:16]}…, "
                f"destination computed {digest.hex()[:16]}… from the received pages"
            )
    if inc.odd:  # (a source that computed its digest over bytes no guest of ours holds)
        raise MigrationFailed(
            f"memory digest mismatch at switchover: {len(inc.odd)} pages hold bytes that are "
            "not their version's content"
        )
    chan.write(b"A")
    await chan.drain()
    chan.close()
    # Verified: the guest's memory is (seed, received versions) plus, after a post-copy
    # switch, its own writes since.
    now = time.monotonic()
    guest.adopt_received(None if inc.by_versions else inc.total)
    inc.status = MigrationStatus.COMPLETED
    if inc.postcopy:
        downtime = ms((inc.resumed_at or now) - inc.stopped_at)
    else:
        downtime = ms(now - inc.stopped_at) if inc.stopped_at else 0
    inc.final = replace(
        inc.snapshot(),
        status=MigrationStatus.COMPLETED,
        remaining_bytes=0,
        downtime_ms=downtime,
        total_time_ms=ms(now - inc.started),
    )
    inc.received = PageSet()
    inc.got = None
    if inc.server is not None:
        inc.server.close()
    if not inc.done.done():
        inc.done.set_result(inc.final)


async def _receive_records(
    inc: Incoming, chan: Channel, npages: int, seed: int, pool: BufferPool
) -> bytes | None:
    """Take records until SWITCH (its digest) or, before post-copy, POSTCOPY (``None``).

    The reader thread has read each whole and refused any that may not come or whose length is
    out of bounds (:func:`.wire.read_record`); the rest of the checks are here."""
    received = inc.received
    while True:
        rec: Record = await chan.next_frame()
        kind = rec.kind
        if kind == b"G":
            assert rec.versions is not None
            _receive_run(inc, rec.a, rec.versions, rec.data, seed, rec.matches)
            pool.put(rec.data)
        elif kind == b"P":
            _receive_pages(inc, rec.b, rec.data, npages, seed)
        elif kind == b"I":
            inc.iteration, flags = rec.a, rec.b
            if flags & ITER_STOPPED and not inc.stopped_at:
                inc.stopped_at = time.monotonic()
            if flags & ITER_OFFER_RUNS and READS_RUNS and not inc.runs_offered:
                inc.runs_offered = True
                chan.write(offer_reply())
        elif kind == b"S":
            if inc.runs_seen:
                raise MigrationFailed(
                    "malformed migration stream: a format 1 switchover after page runs")
            return bytes(rec.data)
        elif kind == b"W":
            inc.by_versions = True
            return bytes(rec.data)
        elif kind == b"D":
            assert rec.versions is not None
            for idx in rec.versions:
                if received.discard(idx):
                    if inc.runs_seen:  # (the format 1 sum is not kept any more)
                        inc.odd.pop(idx, None)
                    else:
                        inc.total -= _term_received(inc, idx, seed)
        elif kind == b"C":
            inc.postcopy = True
            inc.status = MigrationStatus.POSTCOPY_ACTIVE
            inc.stopped_at = inc.stopped_at or time.monotonic()
            if inc.runs_offered:  # the received versions, apart from the guest's own writes
                inc.got = inc.guest.versions.copy()
            inc.guest.begin_postcopy(received)
            return None
        else:  # (read_record reads no other)
            raise MigrationFailed(f"malformed migration stream: unknown record {kind!r}")


def _receive_pages(
    inc: Incoming, count: int, buf: bytes | bytearray, npages: int, seed: int
) -> None:
    """The body of a PAGES record (format 1): page by page, each hashed into the sum."""
    guest, received, postcopy, got = inc.guest, inc.received, inc.postcopy, inc.got
    for off in range(0, len(buf), RECORD_LEN):
        idx, ver = RECORD.unpack_from(buf, off)
        if idx >= npages:
            raise MigrationFailed(f"malformed migration stream: page {idx} of {npages}")
        if idx in received:
            if postcopy:
                raise MigrationFailed(
                    f"malformed migration stream: page {idx} sent twice in post-copy"
                )
            inc.total -= _term_received(inc, idx, seed)  # replaced
        else:
            received.add(idx)
        h, expected = received_page(seed, buf, off + RECORD.size, idx, ver)
        inc.total += page_term(idx, h)
        if not expected:
            _odd(inc, idx, h)
        if postcopy:
            guest.receive(idx, ver)  # and the writes held for it
            if got is not None:
                got[idx] = ver
        else:
            guest.versions[idx] = ver
    inc.pages += count


def _receive_run(
    inc: Incoming, first: int, versions: array[int], pages: bytes | bytearray, seed: int,
    matches: bool,
) -> None:
    """The body of a RUN record (format 2), its count and pages checked against the guest's
    size already, and ``matches``: whether its pages are the bytes of the versions it names,
    checked in place (:func:`.memory.run_matches`, by the reader thread:
    :func:`.wire.read_record`); else a page that differs is kept as odd (refused at
    switchover)."""
    count = len(versions)
    inc.runs_seen = True
    if inc.postcopy:
        guest, received = inc.guest, inc.received
        for idx, ver in zip(range(first, first + count), versions, strict=True):
            if idx in received:
                raise MigrationFailed(
                    f"malformed migration stream: page {idx} sent twice in post-copy")
            received.add(idx)
            guest.receive(idx, ver)  # and the writes held for it
        assert inc.got is not None  # (set at the POSTCOPY record of a format 2 stream)
        inc.got.set_run(first, versions)
    else:
        inc.received.add_range(first, count)
        inc.guest.versions.set_run(first, versions)
        if inc.odd:  # resent: what was odd is replaced
            for idx in range(first, first + count):
                inc.odd.pop(idx, None)
    if not matches and not run_matches(seed, first, versions, pages):
        for k, ver in enumerate(versions):
            page = pages[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
            if page != page_bytes(seed, first + k, ver):
                _odd(inc, first + k, page_hash(page))
    inc.pages += count


def _odd(inc: Incoming, idx: int, h: bytes) -> None:
    """Page ``idx`` holds bytes that are not its version's content (hash ``h``)."""
    inc.odd[idx] = h
    if len(inc.odd) > MAX_ODD_PAGES:
        raise MigrationFailed(
            f"malformed migration stream: more than {MAX_ODD_PAGES} pages hold "
            "bytes that are not their version's content"
        )


def _check_versions(inc: Incoming, seed: int, source_digest: bytes) -> None:
    """Format 2's switchover check: every page arrived as its version's bytes (``odd`` is
    empty) and the received versions are the source's (their digest)."""
    if inc.odd:
        raise MigrationFailed(
            f"memory digest mismatch at switchover: {len(inc.odd)} pages hold bytes that are "
            "not their version's content"
        )
    got = inc.got if inc.got is not None else inc.guest.versions
    digest = versions_digest(seed, inc.guest.npages, got.written_chunks())
    if digest != source_digest:
        raise MigrationFailed(
            f"memory digest mismatch at switchover: source {source_digest.hex()[:16]}…, "
            f"destination computed {digest.hex()[:16]}… from the received page versions"
        )


def _term_received(inc: Incoming, idx: int, seed: int) -> int:
    """The digest term of page ``idx`` as received before (pre-copy: the guest has not run, so
    its version is the one received), which a resend or a discard takes out of the sum."""
    h = inc.odd.pop(idx, None)
    if h is not None:
        return page_term(idx, h)
    return term_of(seed, idx, inc.guest.versions[idx])


async def _pull(inc: Incoming, writer: Channel) -> None:
    """Post-copy destination: let the guest run, and request the pages it faults on."""
    guest = inc.guest
    try:
        while True:
            guest.tick()
            faults = guest.faults
            if faults:
                guest.faults = []
                writer.write(pack_indices(b"R", faults))
                inc.requests += len(faults)
                await writer.drain()
            await asyncio.sleep(_PULL_INTERVAL)
    except OSError:  # the stream broke: the receiving side reports it
        return
