"""The test backend's :class:`TestBackend`: guest lifecycle, migration entry points, job control.

It keeps the guests (:mod:`.guest`) and the migrations running for them, and hands the streams to
:mod:`.outgoing` (source) and :mod:`.incoming` (destination).

Stream protection (:mod:`.secure`): with ``tuning.tls`` (``VIR_MIGRATE_TLS``) the stream is TLS
1.3 with both certificates checked; with a ``tuning.stream_token`` both ends prove they know it
before the stream's header.  A protected incoming port admits connections concurrently and takes
the first that passes; without protection (no TLS, no token) the first connection is the stream.

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

Ended migrations
    Once a migration's outcome is settled the backend drops it (and with it any reference to its
    guest and page maps) and keeps a small :class:`~.ended.Ended` record of the last
    :data:`~.ended.MAX_ENDED` guests' outcomes: ``progress``, ``outgoing_wait`` and
    ``incoming_wait`` answer from it after the guests are destroyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import time
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from virtmig.daemon.backend.base import (
    DEFAULT_MAX_VCPUS,
    Backend,
    BackendError,
    GuestLimits,
    GuestRunState,
    GuestSpec,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationTuning,
    StreamAddress,
    host_memory_bytes,
)
from virtmig.daemon.backend.test.buffers import BufferPool, KeyedPools
from virtmig.daemon.backend.test.channel import Channel, StreamSlots
from virtmig.daemon.backend.test.ended import MAX_ENDED, Ended, EndedTable
from virtmig.daemon.backend.test.guest import Guest, parse_options
from virtmig.daemon.backend.test.incoming import Incoming, dst_abort, dst_receive
from virtmig.daemon.backend.test.memory import PAGE_SIZE, RUN_TEMPLATE_PAGES, run_template
from virtmig.daemon.backend.test.outgoing import Outgoing, src_send, src_settle
from virtmig.daemon.backend.test.secure import StreamRefused, dst_admit, server_context
from virtmig.daemon.backend.test.util import retrieve
from virtmig.daemon.backend.test.wire import STREAM_LIMIT
from virtmig.daemon.eventloop import start_server
from virtmig.daemon.settings import held
from virtmig.proto import logsafe
from virtmig.proto.errors import ConfigUnsupported
from virtmig.proto.flags import MigrateFlags

log = logsafe.logger(__name__)


# 1 MiB run buffers kept between migrations: about what one stream holds at once (a source:
# its write queue's high-water mark and the run it builds; a destination: the runs its reader
# thread reads ahead, and the one being checked)
SEND_BUFFERS_KEPT = 8  # per seed, for the last RUN_POOL_SEEDS seeds sent
RECEIVE_BUFFERS_KEPT = 16
RUN_POOL_SEEDS = 2


class TestBackend(Backend):
    """Embedded guests; migration streams their pages over TCP (see the module docstring)."""

    __test__ = False  # not a pytest test class
    name = "test"
    extra_flags = MigrateFlags.TLS  # TLS on the stream (:mod:`.secure`)

    def __init__(self, *, max_memory_bytes: int = 0, max_vcpus: int = 0,
                 max_ended: int = MAX_ENDED,
                 stream_threads: int = held("test_stream_threads")) -> None:
        """``max_memory_bytes``: the largest guest (0: the host's RAM); ``max_vcpus``: the most
        vCPUs (0: :data:`~virtmig.daemon.backend.base.DEFAULT_MAX_VCPUS`); ``max_ended``: the
        guests whose last migration's outcome is kept once it ended; ``stream_threads``: the
        migration streams' threads at most (at least 4): two per stream, half of them for
        outgoing streams and half for incoming ones; a stream beyond waits for one to end
        (:class:`.channel.StreamSlots`)."""
        if stream_threads < 4:
            raise ValueError(f"stream_threads must be at least 4, not {stream_threads}")
        self._max_memory = max_memory_bytes
        self._max_vcpus = max_vcpus
        self.out_slots = StreamSlots(stream_threads // 4, "out")
        self.in_slots = StreamSlots(stream_threads // 4, "in")
        # The streams' 1 MiB run buffers, kept from one migration to the next (a new one costs
        # its zeroing and page faults, and a source's its copy of the seed's run template): a
        # small guest's migration otherwise paid for every run it moved.  At most 32 MiB held
        # by an idle backend: one pool for incoming streams, one per seed for the last
        # RUN_POOL_SEEDS seeds sent.
        size = RUN_TEMPLATE_PAGES * PAGE_SIZE
        self.run_pools = KeyedPools(size, keep=SEND_BUFFERS_KEPT, keys=RUN_POOL_SEEDS,
                                    new=run_template)
        self.receive_pool = BufferPool(size, RECEIVE_BUFFERS_KEPT)
        self._guests: dict[str, Guest] = {}
        # Live migrations only (an ended one leaves its record in _ended).
        self._incoming: dict[str, Incoming] = {}
        self._progress: dict[str, Outgoing | Incoming] = {}
        self._ended = EndedTable(max_ended)
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
            dst_abort(self._guests, inc, "destination daemon shutting down")
        tasks.extend(self._tasks)
        if tasks:
            await asyncio.wait(tasks)
        self._guests.clear()

    def limits(self, spec: GuestSpec) -> GuestLimits:
        """``test_max_memory_mib`` (default: the host's RAM) and ``test_max_vcpus`` (default
        4096).  A guest's memory costs the daemon little whatever its size (see :mod:`.guest`):
        the memory cap is the host's, as a real hypervisor's would be."""
        return GuestLimits(
            self._max_memory or host_memory_bytes() or 2**63 - 1,
            self._max_vcpus or DEFAULT_MAX_VCPUS,
            memory_source="test_max_memory_mib" if self._max_memory else "the host's RAM",
            vcpus_source="test_max_vcpus",
        )

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
            dst_abort(self._guests, inc, "guest unexpectedly quit")
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

    def cpu_time_ns(self, uuid: str) -> int:
        """A simulated guest's CPU time: how long it has existed here, as libvirt's test driver
        reports a clock for it."""
        guest = self._guests.get(uuid)
        return int((time.monotonic() - guest.created) * 1e9) if guest is not None else 0

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
        if mig is not None:
            return mig.snapshot()
        ended = self._ended.get(uuid)
        return MigrationProgress() if ended is None else ended.final

    def _track(self, uuid: str, mig: Outgoing | Incoming) -> None:
        """``mig`` is the guest's live migration until its outcome is settled."""
        self._progress[uuid] = mig
        mig.done.add_done_callback(functools.partial(self._settled, uuid, mig))

    def _settled(self, uuid: str, mig: Outgoing | Incoming,
                 done: asyncio.Future[MigrationProgress]) -> None:
        """Done callback of a migration's outcome: keep its record, drop the migration."""
        incoming = isinstance(mig, Incoming)
        if incoming and self._incoming.get(uuid) is mig:
            del self._incoming[uuid]
        if self._progress.get(uuid) is mig:
            del self._progress[uuid]
            self._ended.add(uuid, Ended.of(incoming, done, mig.final))

    def _running_outgoing(self, uuid: str) -> Outgoing:
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
        if isinstance(mig, Outgoing):
            return await asyncio.shield(mig.done)
        ended = self._ended.get(uuid) if mig is None else None
        if ended is None or ended.incoming:
            raise BackendError(f"no outgoing migration for guest {uuid}")
        return ended.outcome()

    # -- incoming --

    async def incoming_start(self, spec: GuestSpec, listen: StreamAddress,
                             tuning: MigrationTuning | None = None) -> int:
        if listen.transport != "tcp":
            raise BackendError(f"test backend: unsupported migration transport {listen.transport}")
        tuning = tuning or MigrationTuning()
        ctx = server_context(tuning.tls) if tuning.tls is not None else None
        guest = self._new_guest(spec, paused=True)
        guest.incoming = True
        done: asyncio.Future[MigrationProgress] = asyncio.get_running_loop().create_future()
        done.add_done_callback(retrieve)
        inc = Incoming(guest=guest, done=done, pool=self.receive_pool)
        self._guests[spec.uuid] = guest
        self._incoming[spec.uuid] = inc
        accepted = functools.partial(self._accepted, inc, ctx, tuning.stream_token)
        try:
            # (OSError here, EADDRINUSE: the caller's to handle)
            inc.server, (_host, port) = await start_server(accepted, listen.host, listen.port,
                                                           limit=STREAM_LIMIT)
        except BaseException:
            if self._guests.get(spec.uuid) is guest:
                del self._guests[spec.uuid]
            if self._incoming.get(spec.uuid) is inc:
                del self._incoming[spec.uuid]
            done.cancel()
            raise
        self._track(spec.uuid, inc)
        return port

    def _accepted(self, inc: Incoming, ctx: ssl.SSLContext | None, token: str,
                  reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection to the incoming port, taken out of asyncio before a byte is read
        (:class:`.channel.Channel`).  Unprotected (no TLS, no token): the first one is the
        stream.  Else each proves itself concurrently (:mod:`.secure`); the first that does is
        the stream, the others are dropped."""
        if inc.task is not None or inc.done.done():
            writer.transport.abort()  # exactly one stream per incoming migration
            return
        chan = Channel.adopt(writer, self.in_slots)
        if ctx is None and not token:
            self._take_stream(inc, chan)
            return
        inc.admitting.add(self._spawn(self._admit(inc, ctx, token, chan)))

    async def _admit(self, inc: Incoming, ctx: ssl.SSLContext | None, token: str,
                     chan: Channel) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = chan.get_extra_info("peername")
        ok = False
        try:
            await dst_admit(chan, ctx, token)
            ok = inc.task is None and not inc.done.done()
        except StreamRefused as e:
            log.warning("test backend: incoming migration of %s: dropped a connection from %s: "
                        "%s", inc.guest.uuid, peer, e)
        finally:
            inc.admitting.discard(task)
            if not ok:
                chan.abort()
        if ok:
            for other in list(inc.admitting):
                other.cancel()
            self._take_stream(inc, chan)
        else:
            with contextlib.suppress(asyncio.CancelledError):
                await chan.wait_closed()

    def _take_stream(self, inc: Incoming, chan: Channel) -> None:
        if inc.server is not None:
            inc.server.close()
        inc.task = self._spawn(dst_receive(self._guests, inc, chan))

    async def incoming_wait(self, uuid: str) -> MigrationProgress:
        inc = self._incoming.get(uuid)
        if inc is not None:
            return await asyncio.shield(inc.done)
        ended = self._ended.get(uuid) if uuid not in self._progress else None
        if ended is None or not ended.incoming:
            raise MigrationFailed(f"no incoming migration for guest {uuid}")
        return ended.outcome()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        mig = Outgoing(guest=guest, dest=dest, tuning=tuning,
                       pool=self.run_pools.pool(guest.seed), slots=self.out_slots)
        guest.outgoing = mig
        self._track(uuid, mig)
        task = mig.task = asyncio.get_running_loop().create_task(src_send(mig))
        task.add_done_callback(functools.partial(src_settle, self._guests, mig))
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
