"""The source side of a test-backend migration: the outgoing stream and how it settles.

Phases of one outgoing migration (``Outgoing.status``)::

    SETUP ──connect, HEADER ⇄ reply──► ACTIVE: pass 1, 2, … ──converged──► stop, last pass,
                                         │                                SWITCH ⇄ reply
                                         │ start_postcopy (at a batch boundary)     │
                                         ▼                                          ▼
                                POSTCOPY_ACTIVE: stop, DISCARD,            COMPLETED  (ACK)
                                POSTCOPY, the remaining pages      ──►    FAILED     (error, NAK)
                                (requested first), SWITCH ⇄ reply         CANCELLED  (cancel)

SETUP connects with TLS when ``tuning.tls`` is set and, with a ``tuning.stream_token``, first
checks that the destination proves it knows it (:mod:`.secure`): else nothing of the guest is
sent.

Iteration 1 sends all pages, each later iteration the pages dirtied meanwhile; after each pass the
expected downtime is (dirty pages * 4096) / the transfer rate of that pass (:mod:`.pacing`), and
once it is within ``max_downtime_ms`` (or the guest is paused, or the migration is not live) the
guest is stopped, the last dirty pages go out in a final pass and the switchover record follows.
There is no iteration cap: a guest dirtying faster than the link never converges and the
migration runs until cancelled, as with QEMU.  On ACK the source guest is left paused; on any
failure, NAK or cancel it runs again if it ran before -- unless the migration had switched to
post-copy, which is never rolled back (the guest stays paused, the error is
:class:`PostcopyFailed`).  The source reads replies the whole time, so a NAK or an EOF aborts the
migration at once rather than at switchover.

The HEADER and the first ITER offer stream format 2 (:data:`OFFER_RUNS`); once the
destination's VERSION reply is read (with the HEADER's ACK from a destination that answers an
offer made with the HEADER), batches go out as RUN records (a run of pages behind one header,
built without a step per page) and the switchover digest is of the page versions (:mod:`.wire`),
so the source neither hashes pages while the guest runs nor before the switch.

``iteration`` counts passes including the stop-and-copy one, so an idle guest reports 2 (like
QEMU's dirty-sync count); the post-copy phase is not a pass.  In post-copy, ``downtime_ms`` is
the time from the stop to the POSTCOPY record.
"""

from __future__ import annotations

import asyncio
import heapq
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from virtmig.daemon.backend.base import (
    BackendError,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    PostcopyFailed,
    StreamAddress,
)
from virtmig.daemon.backend.test.buffers import BufferPool
from virtmig.daemon.backend.test.channel import ByteReader, Channel, StreamSlots
from virtmig.daemon.backend.test.guest import FAULT_CORRUPT_STREAM, Guest
from virtmig.daemon.backend.test.memory import PAGE_SIZE
from virtmig.daemon.backend.test.pacing import (
    BATCH_PAGES,
    Pacer,
    expected_downtime_ms,
    next_throttle,
    wants_throttle,
)
from virtmig.daemon.backend.test.secure import client_context, src_prove, tls_reason
from virtmig.daemon.backend.test.util import future, ms, retrieve
from virtmig.daemon.backend.test.wire import (
    HANDSHAKE_TIMEOUT,
    ITER,
    ITER_OFFER_RUNS,
    ITER_STOPPED,
    RUNS_VERSION,
    hostport,
    pack_indices,
    page_records,
    page_runs,
    read_indices,
    read_reply,
    src_handshake,
    strerror,
)
from virtmig.proto import logsafe

log = logsafe.logger(__name__)

OFFER_RUNS = True  # offer format 2 in the first ITER (False: a format 1 source, for tests)
# Offer it with the HEADER too, so that a destination's VERSION reply comes with the ACK (False: a
# source that offers in the first pass's ITER only, as before session 12, for tests).
OFFER_WITH_HEADER = True


@dataclass(eq=False)
class Outgoing:
    """One outgoing migration: its stream task, counters and outcome (``guest.outgoing``)."""

    guest: Guest
    dest: StreamAddress
    tuning: MigrationTuning  # the current values: set_tuning replaces it
    # The pages of full runs are built in its buffers (runs of the guest's seed:
    # :func:`.memory.run_template`), given back once sent: the backend's, kept across migrations.
    pool: BufferPool
    started: float = field(default_factory=time.monotonic)
    status: MigrationStatus = MigrationStatus.SETUP
    task: asyncio.Task[None] | None = None
    error: BackendError | None = None  # why the task was aborted (cancel, destroy, NAK, EOF)
    awaiting_ack: bool = False
    active_at: float = 0.0
    setup_ms: int = 0
    stopped_at: float = 0.0
    downtime_ms: int = 0
    pages_sent: int = 0
    remaining_pages: int = 0
    iteration: int = 0
    dirty_rate: int = 0
    expected_downtime_ms: int = 0
    throttle: int = 0  # auto-converge throttle in force
    # Post-copy: asked for, done (from the source guest's stop on), the progress at the switch,
    # requested pages not handled yet, and how many pages the destination requested.
    switch_requested: bool = False
    switched: bool = False
    switch_progress: MigrationProgress | None = None
    requested: deque[int] = field(default_factory=deque)
    requests: int = 0
    # The destination said it reads stream format 2 (VERSION reply): batches go out as RUN
    # records and the switchover digest is of the page versions.
    runs: bool = False
    # ``returned``: outgoing() may return (switched or finished); ``done``: the final outcome.
    returned: asyncio.Future[None] = field(default_factory=future)
    done: asyncio.Future[MigrationProgress] = field(default_factory=future)
    outcome: BackendError | None = None
    final: MigrationProgress | None = None
    slots: StreamSlots | None = None  # the backend's bound on outgoing streams' threads

    def __post_init__(self) -> None:
        self.pacer = Pacer(self.tuning.bandwidth_bytes_per_s)
        self.done.add_done_callback(retrieve)

    def abort(self, error: BackendError) -> None:
        if self.task is not None and not self.task.done() and self.error is None:
            self.error = error
            self.task.cancel()

    def bandwidth(self) -> float:
        elapsed = time.monotonic() - self.active_at if self.active_at else 0.0
        return self.pages_sent * PAGE_SIZE / elapsed if elapsed > 0 else 0.0

    def snapshot(self) -> MigrationProgress:
        if self.final is not None:
            return self.final
        return MigrationProgress(
            status=self.status,
            total_bytes=self.guest.npages * PAGE_SIZE,
            processed_bytes=self.pages_sent * PAGE_SIZE,
            remaining_bytes=self.remaining_pages * PAGE_SIZE,
            iteration=self.iteration,
            dirty_rate_pages_per_s=self.dirty_rate,
            bandwidth_bytes_per_s=round(self.bandwidth()),
            expected_downtime_ms=self.expected_downtime_ms,
            setup_time_ms=self.setup_ms,
            total_time_ms=ms(time.monotonic() - self.started),
            page_size=PAGE_SIZE,
            normal_pages=self.pages_sent,
            postcopy_requests=self.requests,
            throttle_percent=self.throttle,
            source_stopped=self.stopped_at > 0,
        )


async def src_send(mig: Outgoing) -> None:
    """The outgoing stream, as the task ``cancel``/``destroy``/a NAK cancel.  It ends once the
    stream's threads have (:class:`.channel.Channel`)."""
    guest, dest = mig.guest, mig.dest
    chan = await _connect(mig)
    watch: asyncio.Task[str | None] | None = None
    ok = False
    try:
        if mig.tuning.stream_token:
            await src_prove(chan, chan, dest, mig.tuning.stream_token)
        await src_handshake(
            chan, chan, dest, uuid=guest.uuid, npages=guest.npages, seed=guest.seed,
            offered=_offered(mig) if OFFER_RUNS and OFFER_WITH_HEADER else None,
        )
        watch = _watch_replies(mig, chan)
        await _precopy(mig, chan)
        mig.awaiting_ack = True
        refused = await watch
        if refused is not None:
            raise MigrationFailed(refused)
        if not mig.switched:
            mig.downtime_ms = ms(time.monotonic() - mig.stopped_at)
        ok = True
    except OSError as e:
        raise MigrationFailed(f"Unable to write to socket: {strerror(e)}") from None
    finally:
        if watch is not None and not watch.done():
            watch.cancel()
        if ok:
            chan.close()
        else:
            chan.abort()
        try:
            await chan.wait_closed()
        except asyncio.CancelledError:
            if not ok:  # (the ACK came: the migration completed whatever happens now)
                raise


async def _connect(mig: Outgoing) -> Channel:
    """The connection to the destination: TLS when ``tuning.tls`` says so.  With
    ``mig.slots``, it first waits for one of them (before connecting: the destination does
    not wait for a silent connection beyond its handshake timeout)."""
    dest, tls, slots = mig.dest, mig.tuning.tls, mig.slots
    ctx = client_context(tls) if tls is not None else None
    if slots is not None:
        await slots.take()
    try:
        sock = await _open(dest.host, dest.port)
    except BaseException as e:
        if slots is not None:
            slots.give()
        if isinstance(e, OSError):
            raise MigrationFailed(
                f"Failed to connect to '{hostport(dest)}': {strerror(e)}") from None
        raise
    chan = Channel(sock, slots=slots, holds=True)
    if ctx is None or tls is None:
        return chan
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            await chan.start_tls(ctx, server_side=False,
                                 server_hostname=tls.hostname or dest.host)
    except BaseException as e:
        chan.abort()
        await chan.wait_closed()
        if isinstance(e, ssl.SSLError):
            raise MigrationFailed(f"TLS handshake with the migration destination "
                                  f"'{hostport(dest)}' failed: {tls_reason(e)}") from None
        if isinstance(e, OSError):  # (TimeoutError too)
            raise MigrationFailed(
                f"Failed to connect to '{hostport(dest)}': {strerror(e)}") from None
        raise
    return chan


async def _open(host: str, port: int) -> socket.socket:
    """A TCP connection to ``host``:``port`` (each of its addresses in turn).  An address
    literal (what a Prepare's URI names unless told a host name) needs no resolver: asyncio's
    getaddrinfo would still take a trip through a worker thread for it."""
    loop = asyncio.get_running_loop()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except socket.gaierror:  # a name: resolved off the loop
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            return sock
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error


def src_settle(guests: Mapping[str, Guest], mig: Outgoing, task: asyncio.Task[None]) -> None:
    """Done callback of the stream task: turn its outcome into the migration's."""
    error: BackendError | None = None
    if task.cancelled():
        error = mig.error or MigrationFailed("migration aborted")
    else:
        exc = task.exception()
        if isinstance(exc, BackendError):
            error = mig.error or exc
        elif exc is not None:
            log.error(
                "test backend: outgoing migration of %s failed",
                mig.guest.uuid,
                exc_info=exc,
            )
            error = MigrationFailed(f"internal error in outgoing migration: {exc}")
    _finish(guests, mig, error)


def _finish(guests: Mapping[str, Guest], mig: Outgoing, error: BackendError | None) -> None:
    """Settle the source guest and freeze the final progress."""
    if mig.switched and error is not None and not isinstance(error, PostcopyFailed):
        error = PostcopyFailed(str(error))
    guest = mig.guest
    guest.outgoing = None
    if guests.get(guest.uuid) is guest:
        guest.tick()
        guest.dirty = None
        guest.throttle = 0
        if error is None or mig.switched:  # done, or nothing can be rolled back: paused
            guest.paused = True
        guest.stopped = False
    if error is None:
        status = MigrationStatus.COMPLETED
    elif isinstance(error, MigrationCancelled):
        status = MigrationStatus.CANCELLED
    else:
        status = MigrationStatus.FAILED
    snap = mig.snapshot()
    mig.final = replace(
        snap,
        status=status,
        remaining_bytes=0 if error is None else snap.remaining_bytes,
        expected_downtime_ms=mig.expected_downtime_ms,
        downtime_ms=mig.downtime_ms,
        error="" if error is None else str(error),
    )
    mig.outcome = error
    if error is None:
        mig.done.set_result(mig.final)
    else:
        mig.done.set_exception(error)
    if not mig.returned.done():
        mig.returned.set_result(None)


def _offered(mig: Outgoing) -> Callable[[int], None]:
    """What a VERSION reply does: RUN records from the next batch on (format 2)."""

    def offered(version: int) -> None:
        if version < RUNS_VERSION:
            raise MigrationFailed(f"malformed reply: stream format {version} offered")
        mig.runs = True

    return offered


def _watch_replies(mig: Outgoing, reader: Channel) -> asyncio.Task[str | None]:
    """The task reading the destination's replies for the rest of the stream.

    From here on a reply before switchover is a refusal (NAK) or the end (EOF): either aborts the
    migration at once.  In post-copy page requests come first; they join ``mig.requested``.
    """
    npages = mig.guest.npages
    offered = _offered(mig)

    async def requested(upstream: ByteReader) -> None:
        indices = await read_indices(upstream, npages, "page request")
        if not mig.switched:
            raise MigrationFailed("malformed reply: page request before post-copy")
        mig.requested.extend(indices)
        mig.requests += len(indices)
        mig.pacer.poke()

    watch = asyncio.get_running_loop().create_task(read_reply(reader, requested, offered))

    def replied(task: asyncio.Task[str | None]) -> None:
        if mig.awaiting_ack or task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, BackendError):
            mig.abort(exc)
        elif exc is not None:
            mig.abort(MigrationFailed(f"Unable to read from socket: {exc}"))
        else:
            mig.abort(MigrationFailed(task.result() or "unexpected early ACK"))

    watch.add_done_callback(replied)
    return watch


async def _precopy(mig: Outgoing, writer: Channel) -> None:
    """Send the pre-copy passes, then the stop-and-copy pass and the switchover record --
    or, when post-copy is asked for, switch to :func:`_postcopy`."""
    guest = mig.guest
    now = time.monotonic()
    mig.status = MigrationStatus.ACTIVE
    mig.active_at = now
    mig.setup_ms = ms(now - mig.started)
    guest.tick()
    guest.dirty = set()
    if not mig.tuning.live:
        _stop(mig)
    pages: Sequence[int] = range(guest.npages)
    fresh = True  # ``pages`` were never sent (pass 1)
    last_sync = now
    while True:
        final = guest.stopped
        if mig.switch_requested and not final:
            await _postcopy(mig, writer, pages, fresh=fresh)
            return
        mig.iteration += 1
        if final and guest.fault == FAULT_CORRUPT_STREAM:
            pages = sorted({*pages, 0})
        sent_before, pass_start = mig.pages_sent, time.monotonic()
        rest = await _send_pass(mig, writer, pages, final=final)
        if rest is not None:
            await _postcopy(mig, writer, rest, fresh=fresh)
            return
        if final:
            break
        pass_bytes = (mig.pages_sent - sent_before) * PAGE_SIZE
        pass_time = time.monotonic() - pass_start
        fresh = False
        if not mig.runs:  # while the guest runs: keeps a format 1 switchover digest short
            await guest.hash_ahead()
        dirty = guest.sync_dirty()
        now = time.monotonic()
        if now > last_sync:
            mig.dirty_rate = round(len(dirty) / (now - last_sync))
        last_sync = now
        # The link's speed as this pass saw it (it follows set_tuning at once).
        rate = pass_bytes / pass_time if pass_bytes and pass_time > 0 else mig.bandwidth()
        remaining = len(dirty) * PAGE_SIZE
        expected_ms = expected_downtime_ms(remaining, rate)
        mig.expected_downtime_ms = min(1 << 31, round(expected_ms))
        mig.remaining_pages = len(dirty)
        if expected_ms <= mig.tuning.max_downtime_ms or guest.paused:
            _stop(mig)
            dirty |= guest.sync_dirty()
        elif mig.tuning.auto_converge and wants_throttle(remaining, pass_bytes):
            _throttle_up(mig)
        pages = sorted(dirty)
    writer.write(_switch_record(mig))
    await writer.drain()


def _switch_record(mig: Outgoing) -> bytes:
    """SWITCH with the digest of the stopped guest's memory: of its page versions when the
    destination reads format 2 (VERSIONS SWITCH), else the sum of its page terms."""
    if mig.runs:
        return b"W" + mig.guest.versions_digest()
    return b"S" + mig.guest.digest()


def _batch(
    mig: Outgoing, writer: Channel, batch: Sequence[int], corrupt: int | None
) -> int:
    """Write one batch of pages (RUN records in format 2, else a PAGES record); its size."""
    guest = mig.guest
    if mig.runs:
        pool = mig.pool
        parts = page_runs(guest.seed, guest.versions, batch, corrupt, pool)
        writer.writelines(parts, pool.put)
        return sum(len(part) for part in parts)
    data = page_records(guest.seed, guest.versions, batch, corrupt)
    writer.write(data)
    return len(data)


def _stop(mig: Outgoing) -> None:
    """Stop the source guest for the last pass (or the switch to post-copy)."""
    mig.guest.tick()
    mig.guest.stopped = True
    mig.stopped_at = time.monotonic()


def _throttle_up(mig: Outgoing) -> None:
    """Auto-converge: throttle the guest harder after a pass that did not converge."""
    percent = next_throttle(mig.throttle, mig.tuning)
    mig.throttle = percent
    mig.guest.set_throttle(percent)


async def _send_pass(
    mig: Outgoing,
    writer: Channel,
    pages: Sequence[int],
    *,
    final: bool,
) -> Sequence[int] | None:
    """One pass; returns the unsent pages when a switch to post-copy cut it short."""
    guest = mig.guest
    flags = (ITER_STOPPED if final else 0) | (ITER_OFFER_RUNS if OFFER_RUNS else 0)
    writer.write(b"I" + ITER.pack(mig.iteration, flags))
    mig.remaining_pages = len(pages)
    corrupt = 0 if final and guest.fault == FAULT_CORRUPT_STREAM else None
    pos = 0
    while pos < len(pages):
        if mig.switch_requested and not final:
            return pages[pos:]
        batch = pages[pos : pos + mig.pacer.batch_pages]
        pos += len(batch)
        guest.tick()  # the guest's writes, a bounded share per batch (see .guest)
        nbytes = _batch(mig, writer, batch, corrupt)
        await writer.drain()
        mig.pages_sent += len(batch)
        mig.remaining_pages -= len(batch)
        await mig.pacer.pace(nbytes)  # also yields to the event loop
    return None


async def _postcopy(
    mig: Outgoing, writer: Channel, rest: Sequence[int], *, fresh: bool
) -> None:
    """Switch to post-copy (``rest``: pages of the pass not sent yet, a ``range`` in pass 1),
    then send every page the destination lacks, requested ones first, and the switchover digest.

    The pages to send are ``rest`` plus ``extra`` (dirtied since, not in ``rest``), sent in
    ascending order; a requested page jumps the queue when it is still ahead of that order and
    not sent yet (``early``).  Nothing here is per page of the guest: a huge guest switching in
    pass 1 costs what its dirty pages cost.
    """
    guest = mig.guest
    _stop(mig)
    mig.switched = True
    mig.status = MigrationStatus.POSTCOPY_ACTIVE
    in_rest: range | set[int] = rest if isinstance(rest, range) else set(rest)
    dirtied = guest.sync_dirty()
    guest.dirty = None
    corrupt = None
    if guest.fault == FAULT_CORRUPT_STREAM:
        dirtied.add(0)
        corrupt = 0
    extra = sorted(i for i in dirtied if i not in in_rest)
    # Pages never sent are not on the destination anyway: no need to discard them.
    discard: Sequence[int] = extra if fresh else list(heapq.merge(rest, extra))
    left = len(rest) + len(extra)
    mig.remaining_pages = left
    mig.switch_progress = mig.snapshot()
    if discard:
        writer.write(pack_indices(b"D", discard))
    writer.write(b"C")
    await writer.drain()
    mig.downtime_ms = ms(time.monotonic() - mig.stopped_at)
    if not mig.returned.done():
        mig.returned.set_result(None)  # outgoing() returns POSTCOPY_ACTIVE

    pacer, requested = mig.pacer, mig.requested
    pacer.set_rate(mig.tuning.postcopy_bandwidth_bytes_per_s)
    order = heapq.merge(rest, extra)
    nxt = next(order, None)  # every page of the order below it has been sent
    early: set[int] = set()  # requested pages sent ahead of the order
    extra_set = set(extra)
    while left:
        batch: list[int] = []
        while requested and len(batch) < BATCH_PAGES:
            i = requested.popleft()
            wanted = nxt is not None and i >= nxt and i not in early
            if wanted and (i in in_rest or i in extra_set):  # else sent (or never needed)
                early.add(i)
                batch.append(i)
        if not batch:
            if pacer.delay() > 0:
                await pacer.wait()  # cut short by a request
                continue
            step = pacer.batch_pages
            while nxt is not None and len(batch) < step:
                i, nxt = nxt, next(order, None)
                if i in early:
                    early.discard(i)
                else:
                    batch.append(i)
        if not batch:
            raise MigrationFailed(f"internal error: {left} post-copy pages lost track of")
        nbytes = _batch(mig, writer, batch, corrupt)
        await writer.drain()
        left -= len(batch)
        mig.pages_sent += len(batch)
        mig.remaining_pages = left
        pacer.consume(nbytes)
        await asyncio.sleep(0)
    # The guest has been stopped since the switch: this is its memory as of the switch.
    if not mig.runs:
        await guest.hash_ahead()
    writer.write(_switch_record(mig))
    await writer.drain()
