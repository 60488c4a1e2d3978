"""The ``test`` backend: guests that live inside the daemon, migrated over a real TCP stream.

This is virtmig's embedded default hypervisor; a guest is only memory (:mod:`.memory`, with the
options and dirtying of :mod:`.guest`).

The stream format is :mod:`.wire`; pacing, the downtime arithmetic and auto-converge are
:mod:`.pacing`.

Migration, source side (:meth:`TestBackend.outgoing`): iteration 1 sends all pages, each later
iteration the pages dirtied meanwhile; after each pass the expected downtime is (dirty pages *
4096) / the transfer rate of that pass, and once it is within ``max_downtime_ms`` (or the guest is
paused, or the migration is not live) the guest is stopped, the last dirty pages go out in a final
pass and the switchover record follows.  There is no iteration cap: a guest dirtying faster than
the link never converges and the migration runs until cancelled, as with QEMU.  On ACK the source
guest is left paused; on any failure, NAK or cancel it runs again if it ran before.  The
destination guest is paused until the stream completes; on ACK it holds exactly the received
memory (and can be migrated onwards), on any failure it quits, like a QEMU whose incoming
migration failed.

Job control:

``set_tuning``
    Bandwidth and max downtime of a running migration are read per batch and per pass, so a
    change applies to the next batch (a pacing sleep in progress is cut short) and to the next
    convergence check.  After the switch to post-copy, pacing follows
    ``postcopy_bandwidth_bytes_per_s`` only; a new bandwidth is recorded but does not apply.
Auto-converge (``tuning.auto_converge``)
    QEMU's heuristic (:mod:`.pacing`): the guest is throttled harder after each pass that did not
    converge while it dirtied at least half as fast as the pass sent.  The throttle ends with the
    migration, whatever its outcome; the final progress still reports the last value.
Post-copy (``tuning.postcopy``)
    ``start_postcopy`` asks for the switch; it happens at the next batch boundary of a pre-copy
    pass (a request while the guest is already stopped for the stop-and-copy pass is moot: the
    migration completes as pre-copy).  At the switch the source guest stops, the pages not
    current on the destination -- those dirtied since the last sync plus the unsent rest of the
    current pass -- are listed in DISCARD records (minus pages never sent at all), POSTCOPY
    follows and ``outgoing`` returns a progress with status ``POSTCOPY_ACTIVE``.  The remaining
    pages then stream in the background, each exactly once, paced by the post-copy bandwidth;
    requested pages jump the queue and never wait for the pacing (their bytes still count
    against it).  The destination guest can be resumed from the POSTCOPY record on; a write to a
    page that has not arrived is held and applied on arrival (the vCPU would block on the fault)
    and the page is requested once.  ``postcopy_requests`` counts requested pages (destination:
    sent, source: received).  At the end the destination checks the source's digest against the
    hashes of the bytes it *received* (its own writes are not part of it) and its memory becomes
    the received pages plus its writes since the switch.  Once switched nothing is rolled back:
    ``cancel`` refuses; a broken stream (EOF, NAK, either guest destroyed, daemon shutdown,
    digest mismatch) makes ``outgoing_wait`` and ``incoming_wait`` raise :class:`PostcopyFailed`,
    and the surviving guests are left paused.  The source guest keeps its complete memory (as of
    the switch); the destination guest's memory is incomplete, so it refuses ``resume``,
    ``memory_digest`` and ``outgoing`` until it is destroyed.  Source-side ``downtime_ms`` in
    post-copy is the time from the stop to the POSTCOPY record; destination side, from the switch
    until the guest was resumed (or the end).

Details: ``iteration`` counts passes including the stop-and-copy one, so an idle guest reports 2
(like QEMU's dirty-sync count); the post-copy phase is not a pass.  The destination adopts the
stream's seed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from virtmig.daemon.backend.base import (
    Backend,
    BackendError,
    GuestRunState,
    GuestSpec,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    PostcopyFailed,
    StreamAddress,
)
from virtmig.daemon.backend.test.guest import FAULT_CORRUPT_STREAM, Guest, parse_options
from virtmig.daemon.backend.test.memory import (
    DIGEST_LEN,
    PAGE_HASH_LEN,
    PAGE_SIZE,
    VERSION_MASK,
    digest_of,
    received_page_hash,
)
from virtmig.daemon.backend.test.pacing import (
    BATCH_PAGES,
    Pacer,
    expected_downtime_ms,
    next_throttle,
    wants_throttle,
)
from virtmig.daemon.backend.test.wire import (
    ITER,
    ITER_STOPPED,
    MAX_BATCH_PAGES,
    RECORD,
    RECORD_LEN,
    STREAM_LIMIT,
    U32,
    dst_read_header,
    hostport,
    nak,
    pack_indices,
    page_records,
    read_indices,
    read_reply,
    src_handshake,
    strerror,
)
from virtmig.proto.errors import ConfigUnsupported

log = logging.getLogger(__name__)

_PULL_INTERVAL = 0.005  # seconds between a post-copy destination's dirty ticks / page requests


# --- migration state -----------------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _future() -> asyncio.Future[Any]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _Outgoing:
    guest: Guest
    dest: StreamAddress
    tuning: MigrationTuning  # the current values: set_tuning replaces it
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
    # ``returned``: outgoing() may return (switched or finished); ``done``: the final outcome.
    returned: asyncio.Future[None] = field(default_factory=_future)
    done: asyncio.Future[MigrationProgress] = field(default_factory=_future)
    outcome: BackendError | None = None
    final: MigrationProgress | None = None

    def __post_init__(self) -> None:
        self.pacer = Pacer(self.tuning.bandwidth_bytes_per_s)
        self.done.add_done_callback(_retrieve)

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
            total_time_ms=_ms(time.monotonic() - self.started),
            page_size=PAGE_SIZE,
            normal_pages=self.pages_sent,
            postcopy_requests=self.requests,
            throttle_percent=self.throttle,
        )


@dataclass(eq=False)
class _Incoming:
    guest: Guest
    done: asyncio.Future[MigrationProgress]
    started: float = field(default_factory=time.monotonic)
    status: MigrationStatus = MigrationStatus.SETUP
    server: asyncio.Server | None = None
    task: asyncio.Task[None] | None = None
    abort_reason: str = ""
    connected_at: float = 0.0
    stopped_at: float = 0.0
    received: bytearray = field(default_factory=bytearray)  # 1 per page seen (and current)
    received_count: int = 0
    pages: int = 0  # page records received, repeats included
    iteration: int = 0
    postcopy: bool = False  # the POSTCOPY record arrived
    resumed_at: float = 0.0  # post-copy: when the guest first ran here
    requests: int = 0  # pages requested from the source
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
            remaining_bytes=(self.guest.npages - self.received_count) * PAGE_SIZE,
            iteration=self.iteration,
            bandwidth_bytes_per_s=round(self.pages * PAGE_SIZE / active) if active > 0 else 0,
            setup_time_ms=_ms((self.connected_at or now) - self.started),
            total_time_ms=_ms(now - self.started),
            page_size=PAGE_SIZE,
            normal_pages=self.pages,
            postcopy_requests=self.requests,
        )


def _retrieve(fut: asyncio.Future[MigrationProgress]) -> None:
    """Mark a future's exception as retrieved: nobody may ever wait for it."""
    if not fut.cancelled():
        fut.exception()


# --- the backend ---------------------------------------------------------------------------------


class TestBackend(Backend):
    """Embedded guests; migration streams their pages over TCP (see the module docstring)."""

    __test__ = False  # not a pytest test class
    name = "test"

    def __init__(self) -> None:
        self._guests: dict[str, Guest] = {}
        self._incoming: dict[str, _Incoming] = {}
        self._progress: dict[str, _Outgoing | _Incoming] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self, state_dir: Path) -> None:
        """Nothing is persisted: embedded guests live and die with the daemon."""

    async def close(self) -> None:
        tasks: list[asyncio.Task[None]] = []
        for guest in self._guests.values():
            if guest.outgoing is not None and guest.outgoing.task is not None:
                guest.outgoing.abort(MigrationFailed("migration aborted: daemon shutting down"))
                tasks.append(guest.outgoing.task)
        for inc in self._incoming.values():
            self._abort_incoming(inc, "destination daemon shutting down")
        tasks.extend(self._tasks)
        if tasks:
            await asyncio.wait(tasks)
        self._guests.clear()

    def validate(self, spec: GuestSpec) -> None:
        try:
            parse_options(spec)
        except ValueError as e:
            raise ConfigUnsupported(str(e)) from None

    # -- lifecycle --

    def _new_guest(self, spec: GuestSpec, *, paused: bool) -> Guest:
        if spec.uuid in self._guests:
            raise BackendError(f"guest {spec.uuid} is already running")
        try:
            opts = parse_options(spec)
        except ValueError as e:
            raise BackendError(str(e)) from None
        return Guest(spec, opts, paused=paused)

    def _guest(self, uuid: str) -> Guest:
        guest = self._guests.get(uuid)
        if guest is None:
            raise BackendError(f"guest {uuid} is not running")
        return guest

    async def start(self, spec: GuestSpec, *, paused: bool) -> None:
        guest = self._new_guest(spec, paused=paused)
        self._guests[spec.uuid] = guest

    async def destroy(self, uuid: str) -> None:
        guest = self._guests.pop(uuid, None)
        if guest is None:
            return
        if guest.outgoing is not None:
            guest.outgoing.abort(MigrationFailed("guest unexpectedly quit"))
        inc = self._incoming.get(uuid)
        if inc is not None and inc.guest is guest:
            self._abort_incoming(inc, "guest unexpectedly quit")
            if inc.task is not None:
                await asyncio.wait([inc.task])

    async def pause(self, uuid: str) -> None:
        guest = self._guest(uuid)
        guest.tick()
        guest.paused = True

    async def resume(self, uuid: str) -> None:
        guest = self._guest(uuid)
        if guest.incoming:
            raise BackendError(f"guest {uuid} is waiting for its incoming migration")
        if guest.stopped:
            raise BackendError(f"guest {uuid} is stopped for migration switchover")
        if guest.broken:
            raise BackendError(
                f"guest {uuid} cannot run: its post-copy migration failed before all of its "
                "memory arrived"
            )
        guest.tick()
        guest.paused = False
        inc = self._incoming.get(uuid)
        if guest.arrived is not None and inc is not None and inc.guest is guest:
            inc.resumed_at = inc.resumed_at or time.monotonic()

    def state(self, uuid: str) -> GuestRunState:
        guest = self._guests.get(uuid)
        return GuestRunState.SHUTOFF if guest is None else guest.run_state()

    def memory_digest(self, uuid: str) -> bytes:
        """The 32-byte digest of the guest's current memory (see the module docstring)."""
        guest = self._guest(uuid)
        if not guest.has_memory:
            raise BackendError(f"guest {uuid} has not received its memory yet")
        guest.tick()
        return guest.digest()

    # -- progress / job control --

    def progress(self, uuid: str) -> MigrationProgress:
        mig = self._progress.get(uuid)
        return MigrationProgress() if mig is None else mig.snapshot()

    def _running_outgoing(self, uuid: str) -> _Outgoing:
        guest = self._guests.get(uuid)
        mig = guest.outgoing if guest is not None else None
        if mig is None:
            raise BackendError(f"no outgoing migration is running for guest {uuid}")
        return mig

    async def cancel(self, uuid: str) -> None:
        """Cancel the guest's outgoing migration; no-op when none is running."""
        guest = self._guests.get(uuid)
        if guest is None or guest.outgoing is None:
            return
        if guest.outgoing.switched:
            raise BackendError("cannot cancel migration in post-copy mode")
        guest.outgoing.abort(MigrationCancelled("migration cancelled"))

    async def set_tuning(
        self,
        uuid: str,
        *,
        bandwidth_bytes_per_s: int | None = None,
        max_downtime_ms: int | None = None,
    ) -> None:
        mig = self._running_outgoing(uuid)
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s < 0:
            raise BackendError(f"invalid migration bandwidth {bandwidth_bytes_per_s}")
        if max_downtime_ms is not None and max_downtime_ms < 0:
            raise BackendError(f"invalid maximum downtime {max_downtime_ms} ms")
        if max_downtime_ms is not None:
            mig.tuning = replace(mig.tuning, max_downtime_ms=max_downtime_ms)
        if bandwidth_bytes_per_s is not None:
            mig.tuning = replace(mig.tuning, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
            if not mig.switched:
                mig.pacer.set_rate(bandwidth_bytes_per_s)

    async def start_postcopy(self, uuid: str) -> None:
        """Ask for the switch to post-copy; it happens at the next batch boundary."""
        mig = self._running_outgoing(uuid)
        if not mig.tuning.postcopy:
            raise BackendError("migration was not started with post-copy enabled")
        if not mig.switch_requested:
            mig.switch_requested = True
            mig.pacer.poke()

    async def outgoing_wait(self, uuid: str) -> MigrationProgress:
        mig = self._progress.get(uuid)
        if not isinstance(mig, _Outgoing):
            raise BackendError(f"no outgoing migration for guest {uuid}")
        return await asyncio.shield(mig.done)

    # -- incoming --

    async def incoming_start(self, spec: GuestSpec, listen: StreamAddress,
                             tuning: MigrationTuning | None = None) -> int:
        if listen.transport != "tcp":
            raise BackendError(f"test backend: unsupported migration transport {listen.transport}")
        guest = self._new_guest(spec, paused=True)
        guest.incoming = True
        done: asyncio.Future[MigrationProgress] = asyncio.get_running_loop().create_future()
        done.add_done_callback(_retrieve)
        inc = _Incoming(guest=guest, done=done, received=bytearray(guest.npages))
        self._guests[spec.uuid] = guest
        self._incoming[spec.uuid] = inc

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if inc.task is not None or inc.done.done():
                writer.transport.abort()  # exactly one stream per incoming migration
                return
            if inc.server is not None:
                inc.server.close()
            inc.task = self._spawn(self._receive(inc, reader, writer))

        try:
            inc.server = await asyncio.start_server(
                accepted, listen.host, listen.port, limit=STREAM_LIMIT
            )
        except BaseException:
            if self._guests.get(spec.uuid) is guest:
                del self._guests[spec.uuid]
            if self._incoming.get(spec.uuid) is inc:
                del self._incoming[spec.uuid]
            done.cancel()
            raise
        self._progress[spec.uuid] = inc
        port: int = inc.server.sockets[0].getsockname()[1]
        return port

    async def incoming_wait(self, uuid: str) -> MigrationProgress:
        inc = self._incoming.get(uuid)
        if inc is None:
            raise MigrationFailed(f"no incoming migration for guest {uuid}")
        return await asyncio.shield(inc.done)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _abort_incoming(self, inc: _Incoming, reason: str) -> None:
        if inc.done.done():
            return
        if inc.server is not None:
            inc.server.close()
        if inc.task is not None and not inc.task.done():
            inc.abort_reason = reason
            inc.task.cancel()
        else:
            self._fail_incoming(inc, MigrationFailed(reason))

    def _fail_incoming(self, inc: _Incoming, error: MigrationFailed) -> None:
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
        elif self._guests.get(uuid) is guest:
            del self._guests[uuid]
        inc.status = MigrationStatus.FAILED
        inc.final = replace(inc.snapshot(), status=MigrationStatus.FAILED, error=str(error))
        inc.done.set_exception(error)
        inc.received = bytearray()

    async def _receive(
        self, inc: _Incoming, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Own task for the one accepted stream: never raises, always settles ``inc.done``."""
        inc.connected_at = time.monotonic()
        inc.status = MigrationStatus.ACTIVE
        try:
            await self._receive_stream(inc, reader, writer)
        except asyncio.CancelledError:
            writer.write(nak(f"destination: {inc.abort_reason or 'migration aborted'}"))
            writer.close()
            self._fail_incoming(inc, MigrationFailed(inc.abort_reason or "migration aborted"))
        except MigrationFailed as e:  # refused: tell the source why
            writer.write(nak(str(e)))
            writer.close()
            self._fail_incoming(inc, e)
        except asyncio.IncompleteReadError:
            writer.transport.abort()
            self._fail_incoming(
                inc,
                MigrationFailed("migration stream ended early: the source closed the connection"),
            )
        except OSError as e:
            writer.transport.abort()
            self._fail_incoming(inc, MigrationFailed(f"Unable to read from socket: {strerror(e)}"))
        except Exception as e:  # a bug: still fail cleanly
            log.exception("test backend: incoming migration of %s failed", inc.guest.uuid)
            writer.transport.abort()
            self._fail_incoming(inc, MigrationFailed(f"internal error in incoming migration: {e}"))

    async def _receive_stream(
        self, inc: _Incoming, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        guest = inc.guest
        npages = guest.npages
        seed = await dst_read_header(reader, guest.uuid, npages)
        # The memory is the source's: adopt its seed (it only differs if the XML changed it).
        guest.seed = seed
        writer.write(b"A")
        await writer.drain()

        # Hashes of the pages as received (post-copy: not the guest's own writes).
        hashes = bytearray(PAGE_HASH_LEN * npages)
        pull: asyncio.Task[None] | None = None
        try:
            source_digest = await self._receive_records(inc, reader, hashes, npages, seed)
            if inc.postcopy:
                pull = asyncio.get_running_loop().create_task(self._pull(inc, writer))
                source_digest = await self._receive_records(inc, reader, hashes, npages, seed)
        finally:
            if pull is not None:
                pull.cancel()
        assert source_digest is not None  # after POSTCOPY only SWITCH ends the records

        missing = npages - inc.received_count
        if missing:
            raise MigrationFailed(
                f"memory digest mismatch at switchover: {missing} of {npages} pages never received"
            )
        digest = digest_of(hashes)
        if digest != source_digest:
            raise MigrationFailed(
                f"memory digest mismatch at switchover: source {source_digest.hex()[:16]}…, "
                f"destination computed {digest.hex()[:16]}… from the received pages"
            )
        writer.write(b"A")
        await writer.drain()
        writer.close()
        # Verified: the guest's memory is (seed, received versions) plus, after a post-copy
        # switch, its own writes since.
        now = time.monotonic()
        guest.adopt_received(hashes)
        inc.status = MigrationStatus.COMPLETED
        if inc.postcopy:
            downtime = _ms((inc.resumed_at or now) - inc.stopped_at)
        else:
            downtime = _ms(now - inc.stopped_at) if inc.stopped_at else 0
        inc.final = replace(
            inc.snapshot(),
            status=MigrationStatus.COMPLETED,
            remaining_bytes=0,
            downtime_ms=downtime,
            total_time_ms=_ms(now - inc.started),
        )
        inc.received = bytearray()
        if inc.server is not None:
            inc.server.close()
        if not inc.done.done():
            inc.done.set_result(inc.final)

    async def _receive_records(
        self,
        inc: _Incoming,
        reader: asyncio.StreamReader,
        hashes: bytearray,
        npages: int,
        seed: int,
    ) -> bytes | None:
        """Read records until SWITCH (its digest) or, before post-copy, POSTCOPY (``None``)."""
        guest = inc.guest
        versions, received, pending = guest.versions, inc.received, guest.pending
        postcopy = inc.postcopy
        while True:
            kind = await reader.readexactly(1)
            if kind == b"P":
                (count,) = U32.unpack(await reader.readexactly(U32.size))
                if not 0 < count <= MAX_BATCH_PAGES:
                    raise MigrationFailed(f"malformed migration stream: batch of {count} pages")
                buf = await reader.readexactly(count * RECORD_LEN)
                fresh = 0
                for off in range(0, len(buf), RECORD_LEN):
                    idx, ver = RECORD.unpack_from(buf, off)
                    if idx >= npages:
                        raise MigrationFailed(f"malformed migration stream: page {idx} of {npages}")
                    if postcopy:
                        if received[idx]:
                            raise MigrationFailed(
                                f"malformed migration stream: page {idx} sent twice in post-copy"
                            )
                        ver = (ver + pending.pop(idx, 0)) & VERSION_MASK  # held writes
                    h = received_page_hash(seed, buf, off + RECORD.size)
                    hashes[idx * PAGE_HASH_LEN : (idx + 1) * PAGE_HASH_LEN] = h
                    versions[idx] = ver
                    if not received[idx]:
                        received[idx] = 1
                        fresh += 1
                inc.received_count += fresh
                inc.pages += count
            elif kind == b"I":
                inc.iteration, flags = ITER.unpack(await reader.readexactly(ITER.size))
                if flags & ITER_STOPPED and not inc.stopped_at:
                    inc.stopped_at = time.monotonic()
            elif kind == b"S":
                return await reader.readexactly(DIGEST_LEN)
            elif kind in (b"D", b"C") and postcopy:
                raise MigrationFailed(
                    f"malformed migration stream: record {kind!r} after the switch to post-copy"
                )
            elif kind == b"D":
                for idx in await read_indices(reader, npages, "discard"):
                    if received[idx]:
                        received[idx] = 0
                        inc.received_count -= 1
            elif kind == b"C":
                inc.postcopy = True
                inc.status = MigrationStatus.POSTCOPY_ACTIVE
                inc.stopped_at = inc.stopped_at or time.monotonic()
                guest.begin_postcopy(received)
                return None
            else:
                raise MigrationFailed(f"malformed migration stream: unknown record {kind!r}")

    @staticmethod
    async def _pull(inc: _Incoming, writer: asyncio.StreamWriter) -> None:
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

    # -- outgoing --

    async def outgoing(
        self, uuid: str, dest: StreamAddress, tuning: MigrationTuning
    ) -> MigrationProgress:
        guest = self._guest(uuid)
        if not guest.has_memory:
            raise BackendError(f"guest {uuid} is waiting for its incoming migration")
        if guest.outgoing is not None:
            raise BackendError(f"guest {uuid} is already being migrated")
        if dest.transport != "tcp":
            raise BackendError(f"test backend: unsupported migration transport {dest.transport}")
        mig = _Outgoing(guest=guest, dest=dest, tuning=tuning)
        guest.outgoing = mig
        self._progress[uuid] = mig
        task = mig.task = asyncio.get_running_loop().create_task(self._send(mig))
        task.add_done_callback(functools.partial(self._settle, mig))
        try:
            await asyncio.shield(mig.returned)
        except asyncio.CancelledError:  # our caller cancelled us
            if not mig.switched:  # roll back; once switched the stream goes on regardless
                mig.abort(MigrationCancelled("migration cancelled"))
                await asyncio.wait([task])  # the source guest is settled after this
            raise
        if mig.switch_progress is not None:
            return mig.switch_progress
        if mig.outcome is not None:
            raise mig.outcome
        assert mig.final is not None
        return mig.final

    def _settle(self, mig: _Outgoing, task: asyncio.Task[None]) -> None:
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
        self._finish_outgoing(mig, error)

    def _finish_outgoing(self, mig: _Outgoing, error: BackendError | None) -> None:
        """Settle the source guest and freeze the final progress."""
        if mig.switched and error is not None and not isinstance(error, PostcopyFailed):
            error = PostcopyFailed(str(error))
        guest = mig.guest
        guest.outgoing = None
        if self._guests.get(guest.uuid) is guest:
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

    async def _send(self, mig: _Outgoing) -> None:
        """The outgoing stream, as the task ``cancel``/``destroy``/a NAK cancel."""
        guest, dest = mig.guest, mig.dest
        try:
            reader, writer = await asyncio.open_connection(
                dest.host, dest.port, limit=STREAM_LIMIT
            )
        except OSError as e:
            raise MigrationFailed(
                f"Failed to connect to '{hostport(dest)}': {strerror(e)}"
            ) from None
        watch: asyncio.Task[str | None] | None = None
        ok = False
        try:
            writer.transport.set_write_buffer_limits(high=STREAM_LIMIT)
            await src_handshake(
                reader, writer, dest, uuid=guest.uuid, npages=guest.npages, seed=guest.seed
            )

            # From here on a reply before switchover is a refusal (NAK) or the end (EOF); in
            # post-copy page requests come first.
            async def requested(upstream: asyncio.StreamReader) -> None:
                indices = await read_indices(upstream, guest.npages, "page request")
                if not mig.switched:
                    raise MigrationFailed("malformed reply: page request before post-copy")
                mig.requested.extend(indices)
                mig.requests += len(indices)
                mig.pacer.poke()

            watch = asyncio.get_running_loop().create_task(read_reply(reader, requested))

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
            await self._precopy(mig, writer)
            mig.awaiting_ack = True
            refused = await watch
            if refused is not None:
                raise MigrationFailed(refused)
            if not mig.switched:
                mig.downtime_ms = _ms(time.monotonic() - mig.stopped_at)
            ok = True
        except OSError as e:
            raise MigrationFailed(f"Unable to write to socket: {strerror(e)}") from None
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
            if ok:
                writer.close()
            else:
                writer.transport.abort()

    async def _precopy(self, mig: _Outgoing, writer: asyncio.StreamWriter) -> None:
        """Send the pre-copy passes, then the stop-and-copy pass and the switchover record --
        or, when post-copy is asked for, switch to :meth:`_postcopy`."""
        guest = mig.guest
        now = time.monotonic()
        mig.status = MigrationStatus.ACTIVE
        mig.active_at = now
        mig.setup_ms = _ms(now - mig.started)
        guest.tick()
        guest.dirty = set()
        if not mig.tuning.live:
            self._stop(mig)
        pages: Sequence[int] = range(guest.npages)
        fresh = True  # ``pages`` were never sent (pass 1)
        last_sync = now
        while True:
            final = guest.stopped
            if mig.switch_requested and not final:
                await self._postcopy(mig, writer, pages, fresh=fresh)
                return
            mig.iteration += 1
            if final and guest.fault == FAULT_CORRUPT_STREAM:
                pages = sorted({*pages, 0})
            sent_before, pass_start = mig.pages_sent, time.monotonic()
            rest = await self._send_pass(mig, writer, pages, final=final)
            if rest is not None:
                await self._postcopy(mig, writer, rest, fresh=fresh)
                return
            if final:
                break
            pass_bytes = (mig.pages_sent - sent_before) * PAGE_SIZE
            pass_time = time.monotonic() - pass_start
            fresh = False
            await guest.hash_ahead()  # while the guest runs: keeps the switchover digest short
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
                self._stop(mig)
                dirty |= guest.sync_dirty()
            elif mig.tuning.auto_converge and wants_throttle(remaining, pass_bytes):
                self._throttle_up(mig)
            pages = sorted(dirty)
        writer.write(b"S" + guest.digest())
        await writer.drain()

    @staticmethod
    def _stop(mig: _Outgoing) -> None:
        mig.guest.tick()
        mig.guest.stopped = True
        mig.stopped_at = time.monotonic()

    @staticmethod
    def _throttle_up(mig: _Outgoing) -> None:
        """Auto-converge: throttle the guest harder after a pass that did not converge."""
        percent = next_throttle(mig.throttle, mig.tuning)
        mig.throttle = percent
        mig.guest.set_throttle(percent)

    async def _send_pass(
        self,
        mig: _Outgoing,
        writer: asyncio.StreamWriter,
        pages: Sequence[int],
        *,
        final: bool,
    ) -> Sequence[int] | None:
        """One pass; returns the unsent pages when a switch to post-copy cut it short."""
        guest = mig.guest
        writer.write(b"I" + ITER.pack(mig.iteration, ITER_STOPPED if final else 0))
        mig.remaining_pages = len(pages)
        corrupt = 0 if final and guest.fault == FAULT_CORRUPT_STREAM else None
        pos = 0
        while pos < len(pages):
            if mig.switch_requested and not final:
                return pages[pos:]
            batch = pages[pos : pos + mig.pacer.batch_pages]
            pos += len(batch)
            data = page_records(guest.seed, guest.versions, batch, corrupt)
            writer.write(data)
            await writer.drain()
            mig.pages_sent += len(batch)
            mig.remaining_pages -= len(batch)
            await mig.pacer.pace(len(data))  # also yields to the event loop
        return None

    async def _postcopy(
        self, mig: _Outgoing, writer: asyncio.StreamWriter, rest: Sequence[int], *, fresh: bool
    ) -> None:
        """Switch to post-copy (``rest``: pages of the pass not sent yet), then send every page
        the destination lacks, requested ones first, and the switchover digest."""
        guest = mig.guest
        self._stop(mig)
        mig.switched = True
        mig.status = MigrationStatus.POSTCOPY_ACTIVE
        remaining = set(rest)
        remaining |= guest.sync_dirty()
        guest.dirty = None
        corrupt = None
        if guest.fault == FAULT_CORRUPT_STREAM:
            remaining.add(0)
            corrupt = 0
        order = sorted(remaining)
        # Pages never sent are not on the destination anyway: no need to discard them.
        discard = sorted(remaining.difference(rest)) if fresh else order
        wanted = bytearray(guest.npages)  # 1: still to send
        for i in order:
            wanted[i] = 1
        left = len(order)
        mig.remaining_pages = left
        mig.switch_progress = mig.snapshot()
        if discard:
            writer.write(pack_indices(b"D", discard))
        writer.write(b"C")
        await writer.drain()
        mig.downtime_ms = _ms(time.monotonic() - mig.stopped_at)
        if not mig.returned.done():
            mig.returned.set_result(None)  # outgoing() returns POSTCOPY_ACTIVE

        pacer, requested = mig.pacer, mig.requested
        pacer.set_rate(mig.tuning.postcopy_bandwidth_bytes_per_s)
        pos = 0
        while left:
            batch: list[int] = []
            while requested and len(batch) < BATCH_PAGES:
                i = requested.popleft()
                if wanted[i]:  # else already sent (or never needed)
                    wanted[i] = 0
                    batch.append(i)
            if not batch:
                if pacer.delay() > 0:
                    await pacer.wait()  # cut short by a request
                    continue
                step = pacer.batch_pages
                while pos < len(order) and len(batch) < step:
                    i = order[pos]
                    pos += 1
                    if wanted[i]:
                        wanted[i] = 0
                        batch.append(i)
            if not batch:
                raise MigrationFailed(f"internal error: {left} post-copy pages lost track of")
            data = page_records(guest.seed, guest.versions, batch, corrupt)
            writer.write(data)
            await writer.drain()
            left -= len(batch)
            mig.pages_sent += len(batch)
            mig.remaining_pages = left
            pacer.consume(len(data))
            await asyncio.sleep(0)
        # The guest has been stopped since the switch: this is its memory as of the switch.
        await guest.hash_ahead()
        writer.write(b"S" + guest.digest())
        await writer.drain()
