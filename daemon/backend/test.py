"""The ``test`` backend: guests that live inside the daemon, migrated over a real TCP stream.

This is virtmig's embedded default hypervisor.  A guest has no CPU and no devices, only memory,
and that memory is cheap to hold: it is a 64-bit ``seed`` plus one version counter per 4 KiB
page.  The content of a page is the pure function :func:`page_bytes` of ``(seed, index,
version)`` -- a 4072-byte block derived once per seed, followed by ``seed, index, version`` as
three little-endian u64.  Migration really moves that content: the source sends every page's
4096 bytes over TCP, and the destination hashes the bytes it *received*.

Guest options (attributes of ``<virtmig:test .../>`` in the domain XML):

``seed``
    Integer (``0x`` allowed); default: the first 8 bytes of sha256(uuid).
``dirty-rate-mib``
    MiB/s of pages the guest dirties while it runs (default 0: idle).  Nothing runs in the
    background: when the migration code syncs the dirty log (and on pause, resume and
    :meth:`TestBackend.memory_digest`), the pages dirtied since the last tick are materialised at
    once -- ``rate * running time`` pseudo-random pages get their version bumped (at most every
    page per tick).  A paused guest dirties nothing.
``fault``
    Test hook.  ``corrupt-stream``: the source sends page 0 once more in its stop-and-copy pass,
    with one wrong byte, so the destination's digest check fails and the migration must fail.

Memory digest: ``blake2b-256`` over the ``blake2b-128`` hashes of all pages in page order
(:meth:`TestBackend.memory_digest`).  Both ends compute it -- the source from its memory, the
destination from the bytes it received -- and a migration completes only when they agree.

Stream protocol (all integers little-endian)::

    source                                                  destination
    HEADER  "VMTESTMS" u16 version=1  u32 page_size   ──►   checks magic, version, page size,
            u64 npages  u64 seed  u16 len  uuid(utf-8)      uuid and npages against its guest
                                                      ◄──   REPLY  "A"  (or "N" + reason; close)
    ITER    "I"  u32 iteration  u8 flags (1: source stopped, stop-and-copy pass)
    PAGES   "P"  u32 count  count * (u32 index  u32 version  4096 bytes)     (~1 MiB per write)
     ...        (ITER / PAGES repeat: pass 1 sends every page, later passes the dirtied ones)
    SWITCH  "S"  32-byte digest of the source's memory, taken with the guest stopped
                                                      ◄──   REPLY  "A"  digest matches and
                                                                   every page was received
                                                            or "N" u16 len + reason (utf-8),
                                                            e.g. "memory digest mismatch at
                                                            switchover: …"

The destination answers ``N`` + reason and closes whenever it refuses the stream (wrong guest,
malformed record, guest destroyed).  The source reads replies the whole time, so a NAK or an EOF
aborts the migration at once rather than at switchover.

Migration, source side (:meth:`TestBackend.outgoing`): iteration 1 sends all pages, each later
iteration the pages dirtied meanwhile; after each pass the expected downtime is (dirty pages *
4096) / measured bandwidth, and once it is within ``max_downtime_ms`` (or the guest is paused, or
the migration is not live) the guest is stopped, the last dirty pages go out in a final pass and
the switchover record follows.  There is no iteration cap: a guest dirtying faster than the link
never converges and the migration runs until cancelled, as with QEMU.  On ACK the source guest is
left paused; on any failure, NAK or cancel it runs again if it ran before.  The destination guest
is paused until the stream completes; on ACK it holds exactly the received memory (and can be
migrated onwards), on any failure it quits, like a QEMU whose incoming migration failed.

Details: ``iteration`` counts passes including the stop-and-copy one, so an idle guest reports 2
(like QEMU's dirty-sync count).  ``bandwidth_bytes_per_s`` is paced by sleeping between batches
(smaller batches when throttled); every batch is one ``write`` + ``drain`` followed by a yield, so
the daemon's other RPCs on the same event loop stay responsive.  The header and its reply must
arrive within :data:`HANDSHAKE_TIMEOUT`; after that only EOF or an error ends a stream early.
The destination adopts the stream's seed.  Page hashing resumes a blake2b state cached per seed
when a page starts with the seed's block -- the result is the hash of the bytes as received.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import struct
import time
from array import array
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
    StreamAddress,
)
from virtmig.proto.errors import ConfigUnsupported

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
MIB = 1024 * 1024
FAULT_CORRUPT_STREAM = "corrupt-stream"
_FAULTS = ("", FAULT_CORRUPT_STREAM)

MAGIC = b"VMTESTMS"
PROTOCOL_VERSION = 1
_HEADER = struct.Struct("<8sHIQQH")  # magic, version, page size, npages, seed, uuid length
_SUFFIX = struct.Struct("<QQQ")  # last 24 bytes of every page: seed, index, version
_PREFIX_LEN = PAGE_SIZE - _SUFFIX.size
_RECORD = struct.Struct("<II")  # page record header: index, version
_RECORD_LEN = _RECORD.size + PAGE_SIZE
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_ITER = struct.Struct("<IB")  # iteration, flags
_ITER_STOPPED = 1
_DIGEST_LEN = 32
_PAGE_HASH_LEN = 16
_DIGEST_PERSON = b"virtmig-testmem"

_BATCH_PAGES = 256  # 1 MiB of page data per write when unthrottled
_MAX_BATCH_PAGES = 4096  # what a destination accepts in one record
_STREAM_LIMIT = 4 * MIB  # StreamReader buffer limit / transport write high-water mark
_MAX_NPAGES = 0xFFFFFFFF
_HASH_SLICE_PAGES = 4096  # page hashes per event-loop slice (~4 ms)
HANDSHAKE_TIMEOUT = 30.0  # seconds for the header and its reply; the stream itself has none


# --- guest memory --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _prefix(seed: int) -> tuple[bytes, hashlib.blake2b]:
    """The seed's 4072-byte page prefix and a blake2b state that has consumed it."""
    block = hashlib.shake_256(b"virtmig-test-page" + seed.to_bytes(8, "little")).digest(_PREFIX_LEN)
    state = hashlib.blake2b(block, digest_size=_PAGE_HASH_LEN)
    return block, state


def page_bytes(seed: int, idx: int, version: int) -> bytes:
    """The 4096 bytes of page ``idx`` at ``version`` of a guest with ``seed``."""
    return _prefix(seed)[0] + _SUFFIX.pack(seed, idx, version)


def page_hash(data: bytes | memoryview) -> bytes:
    """The 16-byte blake2b hash of one page's bytes (what the memory digest is made of)."""
    return hashlib.blake2b(data, digest_size=_PAGE_HASH_LEN).digest()


def _page_hash_of(seed: int, idx: int, version: int) -> bytes:
    """``page_hash(page_bytes(seed, idx, version))``, resuming the seed's cached prefix state."""
    h = _prefix(seed)[1].copy()
    h.update(_SUFFIX.pack(seed, idx, version))
    return h.digest()


def _received_page_hash(seed: int, buf: bytes, off: int) -> bytes:
    """``page_hash(buf[off:off + 4096])``; cheap when the page has the seed's prefix."""
    block, state = _prefix(seed)
    if buf.startswith(block, off):
        h = state.copy()
        h.update(buf[off + _PREFIX_LEN : off + PAGE_SIZE])
        return h.digest()
    return page_hash(memoryview(buf)[off : off + PAGE_SIZE])


def _digest_of(hashes: bytes | bytearray) -> bytes:
    return hashlib.blake2b(hashes, digest_size=_DIGEST_LEN, person=_DIGEST_PERSON).digest()


@dataclass(frozen=True)
class _Options:
    seed: int
    dirty_pages_per_s: float
    fault: str
    npages: int


def _parse_options(spec: GuestSpec) -> _Options:
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
        try:
            seed = int(raw_seed, 0) % (1 << 64)
        except ValueError:
            raise ValueError(f"test backend option seed={raw_seed!r} is not an integer") from None
    raw_rate = spec.options.get("dirty-rate-mib", "") or "0"
    try:
        rate_mib = float(raw_rate)
    except ValueError:
        raise ValueError(
            f"test backend option dirty-rate-mib={raw_rate!r} is not a number"
        ) from None
    if not rate_mib >= 0 or rate_mib == float("inf"):
        raise ValueError(f"test backend option dirty-rate-mib={raw_rate!r} must be >= 0")
    fault = spec.options.get("fault", "")
    if fault not in _FAULTS:
        raise ValueError(f"test backend option fault={fault!r} is unknown (known: {_FAULTS[1]})")
    return _Options(seed, rate_mib * MIB / PAGE_SIZE, fault, npages)


class _Guest:
    """One embedded guest: seed + page versions, run state and dirty log."""

    def __init__(self, spec: GuestSpec, opts: _Options, *, paused: bool) -> None:
        self.spec = spec
        self.uuid = spec.uuid
        self.seed = opts.seed
        self.npages = opts.npages
        self.dirty_pages_per_s = opts.dirty_pages_per_s
        self.fault = opts.fault
        self.versions: array[int] = array("I", bytes(4 * self.npages))
        # Page-hash cache: _hashes[16i:16i+16] is the hash of page i, valid for the pages below
        # _hashed_upto that are not in _stale (dirtied since they were hashed).
        self._hashes = bytearray(_PAGE_HASH_LEN * self.npages)
        self._hashed_upto = 0
        self._stale: set[int] = set()
        self.paused = paused  # paused by the user (pause(), start(paused=True))
        self.stopped = False  # stopped by an outgoing migration's switchover
        self.incoming = False  # waiting for an incoming stream: memory not there yet
        self.dirty: set[int] | None = None  # dirty log, while a migration tracks it
        self.outgoing: _Outgoing | None = None
        self._rng = random.Random(self.seed)
        self._carry = 0.0
        self._last_tick = time.monotonic()

    @property
    def running(self) -> bool:
        return not (self.paused or self.stopped or self.incoming)

    def run_state(self) -> GuestRunState:
        return GuestRunState.RUNNING if self.running else GuestRunState.PAUSED

    def tick(self) -> int:
        """Materialise the pages dirtied since the last tick; return how many were dirtied."""
        now = time.monotonic()
        elapsed, self._last_tick = now - self._last_tick, now
        if not self.running or self.dirty_pages_per_s <= 0 or elapsed <= 0:
            return 0
        exact = self.dirty_pages_per_s * elapsed + self._carry
        n = int(exact)
        self._carry = exact - n
        if n >= self.npages:
            n, self._carry = self.npages, 0.0
        versions, randrange, npages = self.versions, self._rng.randrange, self.npages
        touched = [randrange(npages) for _ in range(n)]
        for i in touched:
            versions[i] = (versions[i] + 1) & 0xFFFFFFFF
        if self._hashed_upto:
            self._stale.update(touched)
            if len(self._stale) > self.npages // 4:  # cheaper to rehash all, lazily
                self._hashed_upto = 0
                self._stale.clear()
        if self.dirty is not None:
            self.dirty.update(touched)
        return n

    def sync_dirty(self) -> set[int]:
        """Tick, then return and clear the dirty log (which must be enabled)."""
        self.tick()
        dirty, self.dirty = self.dirty or set(), set()
        return dirty

    def set_hashes(self, hashes: bytearray) -> None:
        """Adopt ``hashes`` as the hashes of every page at its current version."""
        self._hashes = hashes
        self._hashed_upto = self.npages
        self._stale.clear()

    def hash_pages(self, budget: int) -> bool:
        """Bring up to ``budget`` page hashes up to date; ``True`` once all are."""
        seed, versions, hashes, n = self.seed, self.versions, self._hashes, _PAGE_HASH_LEN
        start = self._hashed_upto
        end = min(self.npages, start + budget)
        for i in range(start, end):
            hashes[i * n : (i + 1) * n] = _page_hash_of(seed, i, versions[i])
        self._hashed_upto = end
        budget -= end - start
        stale = self._stale
        while stale and budget > 0:
            i = stale.pop()
            budget -= 1
            if i < end:  # pages above are hashed fresh when their turn comes
                hashes[i * n : (i + 1) * n] = _page_hash_of(seed, i, versions[i])
        return end == self.npages and not stale

    async def hash_ahead(self) -> None:
        """Update the hash cache in slices, yielding, so a later :meth:`digest` is quick."""
        done = False
        while not done:
            done = self.hash_pages(_HASH_SLICE_PAGES)
            await asyncio.sleep(0)

    def digest(self) -> bytes:
        self.hash_pages(self.npages + len(self._stale))
        return _digest_of(self._hashes)


# --- migration state -----------------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _strerror(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _hostport(addr: StreamAddress) -> str:
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    return f"{host}:{addr.port}"


def _nak(reason: str) -> bytes:
    data = reason.encode("utf-8", "replace")[:0xFFFF]
    return b"N" + _U16.pack(len(data)) + data


async def _read_reply(reader: asyncio.StreamReader) -> str | None:
    """Read one reply: ``None`` for ACK, the reason for NAK; MigrationFailed on EOF/garbage."""
    try:
        kind = await reader.readexactly(1)
        if kind == b"A":
            return None
        if kind == b"N":
            (n,) = _U16.unpack(await reader.readexactly(_U16.size))
            reason = (await reader.readexactly(n)).decode("utf-8", "replace")
            return reason or "migration refused by the destination"
    except asyncio.IncompleteReadError:
        raise MigrationFailed(
            "Unable to read from socket: migration stream closed by the destination"
        ) from None
    except OSError as e:
        raise MigrationFailed(f"Unable to read from socket: {_strerror(e)}") from None
    raise MigrationFailed(f"malformed reply from the migration destination: {kind!r}")


@dataclass(eq=False)
class _Outgoing:
    guest: _Guest
    dest: StreamAddress
    tuning: MigrationTuning
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
    final: MigrationProgress | None = None

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
        )


@dataclass(eq=False)
class _Incoming:
    guest: _Guest
    done: asyncio.Future[MigrationProgress]
    started: float = field(default_factory=time.monotonic)
    status: MigrationStatus = MigrationStatus.SETUP
    server: asyncio.Server | None = None
    task: asyncio.Task[None] | None = None
    abort_reason: str = ""
    connected_at: float = 0.0
    stopped_at: float = 0.0
    received: bytearray = field(default_factory=bytearray)  # 1 per page seen
    received_count: int = 0
    pages: int = 0  # page records received, repeats included
    iteration: int = 0
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
        )


def _retrieve(fut: asyncio.Future[MigrationProgress]) -> None:
    """Mark a future's exception as retrieved: nobody may ever call incoming_wait."""
    if not fut.cancelled():
        fut.exception()


# --- the backend ---------------------------------------------------------------------------------


class TestBackend(Backend):
    """Embedded guests; migration streams their pages over TCP (see the module docstring)."""

    __test__ = False  # not a pytest test class
    name = "test"

    def __init__(self) -> None:
        self._guests: dict[str, _Guest] = {}
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
            _parse_options(spec)
        except ValueError as e:
            raise ConfigUnsupported(str(e)) from None

    # -- lifecycle --

    def _new_guest(self, spec: GuestSpec, *, paused: bool) -> _Guest:
        if spec.uuid in self._guests:
            raise BackendError(f"guest {spec.uuid} is already running")
        try:
            opts = _parse_options(spec)
        except ValueError as e:
            raise BackendError(str(e)) from None
        return _Guest(spec, opts, paused=paused)

    def _guest(self, uuid: str) -> _Guest:
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
        guest.tick()
        guest.paused = False

    def state(self, uuid: str) -> GuestRunState:
        guest = self._guests.get(uuid)
        return GuestRunState.SHUTOFF if guest is None else guest.run_state()

    def memory_digest(self, uuid: str) -> bytes:
        """The 32-byte digest of the guest's current memory (see the module docstring)."""
        guest = self._guest(uuid)
        if guest.incoming:
            raise BackendError(f"guest {uuid} has not received its memory yet")
        guest.tick()
        return guest.digest()

    # -- progress / cancel --

    def progress(self, uuid: str) -> MigrationProgress:
        mig = self._progress.get(uuid)
        return MigrationProgress() if mig is None else mig.snapshot()

    async def cancel(self, uuid: str) -> None:
        """Cancel the guest's outgoing migration; no-op when none is running."""
        guest = self._guests.get(uuid)
        if guest is not None and guest.outgoing is not None:
            guest.outgoing.abort(MigrationCancelled("migration cancelled"))

    # -- incoming --

    async def incoming_start(self, spec: GuestSpec, listen: StreamAddress) -> int:
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
                accepted, listen.host, listen.port, limit=_STREAM_LIMIT
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
        """The incoming migration failed: its guest quits, incoming_wait raises ``error``."""
        if inc.server is not None:
            inc.server.close()
        uuid = inc.guest.uuid
        if self._guests.get(uuid) is inc.guest:
            del self._guests[uuid]
        if not inc.done.done():
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
            writer.write(_nak(f"destination: {inc.abort_reason or 'migration aborted'}"))
            writer.close()
            self._fail_incoming(inc, MigrationFailed(inc.abort_reason or "migration aborted"))
        except MigrationFailed as e:  # refused: tell the source why
            writer.write(_nak(str(e)))
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
            self._fail_incoming(inc, MigrationFailed(f"Unable to read from socket: {_strerror(e)}"))
        except Exception as e:  # a bug: still fail cleanly
            log.exception("test backend: incoming migration of %s failed", inc.guest.uuid)
            writer.transport.abort()
            self._fail_incoming(inc, MigrationFailed(f"internal error in incoming migration: {e}"))

    async def _receive_stream(
        self, inc: _Incoming, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        guest = inc.guest
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                head = await reader.readexactly(_HEADER.size)
                magic, version, page_size, npages, seed, uuid_len = _HEADER.unpack(head)
                uuid = (await reader.readexactly(uuid_len)).decode("utf-8", "replace")
        except TimeoutError:
            raise MigrationFailed("timed out waiting for the migration stream header") from None
        if magic != MAGIC:
            raise MigrationFailed("incoming migration stream is not a test backend stream")
        if version != PROTOCOL_VERSION:
            raise MigrationFailed(f"unsupported migration stream version {version}")
        if uuid != guest.uuid or npages != guest.npages or page_size != PAGE_SIZE:
            raise MigrationFailed(
                f"incoming migration stream is for another guest: uuid {uuid}, {npages} pages of "
                f"{page_size} bytes; expected uuid {guest.uuid}, {guest.npages} pages of "
                f"{PAGE_SIZE} bytes"
            )
        # The memory is the source's: adopt its seed (it only differs if the XML changed it).
        guest.seed = seed
        writer.write(b"A")
        await writer.drain()

        versions, received = guest.versions, inc.received
        hashes = bytearray(_PAGE_HASH_LEN * npages)
        while True:
            kind = await reader.readexactly(1)
            if kind == b"P":
                (count,) = _U32.unpack(await reader.readexactly(_U32.size))
                if not 0 < count <= _MAX_BATCH_PAGES:
                    raise MigrationFailed(f"malformed migration stream: batch of {count} pages")
                buf = await reader.readexactly(count * _RECORD_LEN)
                fresh = 0
                for off in range(0, len(buf), _RECORD_LEN):
                    idx, ver = _RECORD.unpack_from(buf, off)
                    if idx >= npages:
                        raise MigrationFailed(f"malformed migration stream: page {idx} of {npages}")
                    h = _received_page_hash(seed, buf, off + _RECORD.size)
                    hashes[idx * _PAGE_HASH_LEN : (idx + 1) * _PAGE_HASH_LEN] = h
                    versions[idx] = ver
                    if not received[idx]:
                        received[idx] = 1
                        fresh += 1
                inc.received_count += fresh
                inc.pages += count
            elif kind == b"I":
                inc.iteration, flags = _ITER.unpack(await reader.readexactly(_ITER.size))
                if flags & _ITER_STOPPED and not inc.stopped_at:
                    inc.stopped_at = time.monotonic()
            elif kind == b"S":
                source_digest = await reader.readexactly(_DIGEST_LEN)
                break
            else:
                raise MigrationFailed(f"malformed migration stream: unknown record {kind!r}")

        missing = npages - inc.received_count
        if missing:
            raise MigrationFailed(
                f"memory digest mismatch at switchover: {missing} of {npages} pages never received"
            )
        digest = _digest_of(hashes)
        if digest != source_digest:
            raise MigrationFailed(
                f"memory digest mismatch at switchover: source {source_digest.hex()[:16]}…, "
                f"destination computed {digest.hex()[:16]}… from the received pages"
            )
        writer.write(b"A")
        await writer.drain()
        writer.close()
        # Verified: the guest's memory is now (seed, received versions), hashes as received.
        now = time.monotonic()
        guest.set_hashes(hashes)
        guest.incoming = False
        guest.tick()
        inc.status = MigrationStatus.COMPLETED
        inc.final = replace(
            inc.snapshot(),
            status=MigrationStatus.COMPLETED,
            remaining_bytes=0,
            downtime_ms=_ms(now - inc.stopped_at) if inc.stopped_at else 0,
            total_time_ms=_ms(now - inc.started),
        )
        inc.received = bytearray()
        if inc.server is not None:
            inc.server.close()
        if not inc.done.done():
            inc.done.set_result(inc.final)

    # -- outgoing --

    async def outgoing(
        self, uuid: str, dest: StreamAddress, tuning: MigrationTuning
    ) -> MigrationProgress:
        guest = self._guest(uuid)
        if guest.incoming:
            raise BackendError(f"guest {uuid} is waiting for its incoming migration")
        if guest.outgoing is not None:
            raise BackendError(f"guest {uuid} is already being migrated")
        if dest.transport != "tcp":
            raise BackendError(f"test backend: unsupported migration transport {dest.transport}")
        mig = _Outgoing(guest=guest, dest=dest, tuning=tuning)
        guest.outgoing = mig
        self._progress[uuid] = mig
        mig.task = asyncio.get_running_loop().create_task(self._send(mig))
        try:
            await mig.task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # our caller cancelled us
                self._finish_outgoing(mig, MigrationCancelled("migration cancelled"))
                raise
            error = mig.error or MigrationFailed("migration aborted")
            self._finish_outgoing(mig, error)
            raise error from None
        except BackendError as e:
            error = mig.error or e
            self._finish_outgoing(mig, error)
            raise error from None
        except Exception as e:
            log.exception("test backend: outgoing migration of %s failed", uuid)
            error = MigrationFailed(f"internal error in outgoing migration: {e}")
            self._finish_outgoing(mig, error)
            raise error from e
        return self._finish_outgoing(mig, None)

    def _finish_outgoing(self, mig: _Outgoing, error: BackendError | None) -> MigrationProgress:
        """Settle the source guest and freeze the final progress."""
        guest = mig.guest
        guest.outgoing = None
        if self._guests.get(guest.uuid) is guest:
            guest.tick()
            guest.dirty = None
            if error is None:
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
        return mig.final

    async def _send(self, mig: _Outgoing) -> None:
        """The outgoing stream, as the task ``cancel``/``destroy``/a NAK cancel."""
        guest, dest = mig.guest, mig.dest
        try:
            reader, writer = await asyncio.open_connection(
                dest.host, dest.port, limit=_STREAM_LIMIT
            )
        except OSError as e:
            raise MigrationFailed(
                f"Failed to connect to '{_hostport(dest)}': {_strerror(e)}"
            ) from None
        watch: asyncio.Task[str | None] | None = None
        ok = False
        try:
            writer.transport.set_write_buffer_limits(high=_STREAM_LIMIT)
            uuid = guest.uuid.encode()
            writer.write(
                _HEADER.pack(
                    MAGIC, PROTOCOL_VERSION, PAGE_SIZE, guest.npages, guest.seed, len(uuid)
                )
                + uuid
            )
            await writer.drain()
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    refused = await _read_reply(reader)
            except TimeoutError:
                raise MigrationFailed(
                    f"timed out waiting for the migration destination '{_hostport(dest)}'"
                ) from None
            if refused is not None:
                raise MigrationFailed(refused)

            # From here on a reply before switchover is a refusal (NAK) or the end (EOF).
            watch = asyncio.get_running_loop().create_task(_read_reply(reader))

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
            mig.downtime_ms = _ms(time.monotonic() - mig.stopped_at)
            ok = True
        except OSError as e:
            raise MigrationFailed(f"Unable to write to socket: {_strerror(e)}") from None
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
            if ok:
                writer.close()
            else:
                writer.transport.abort()

    async def _precopy(self, mig: _Outgoing, writer: asyncio.StreamWriter) -> None:
        """Send the pre-copy passes, the stop-and-copy pass and the switchover record."""
        guest, tuning = mig.guest, mig.tuning
        now = time.monotonic()
        mig.status = MigrationStatus.ACTIVE
        mig.active_at = now
        mig.setup_ms = _ms(now - mig.started)
        guest.tick()
        guest.dirty = set()
        if not tuning.live:
            self._stop(mig)
        pages: Sequence[int] = range(guest.npages)
        last_sync = now
        throttle = _Throttle(tuning.bandwidth_bytes_per_s)
        while True:
            final = guest.stopped
            mig.iteration += 1
            if final and guest.fault == FAULT_CORRUPT_STREAM:
                pages = sorted({*pages, 0})
            await self._send_pass(mig, writer, pages, final=final, throttle=throttle)
            if final:
                break
            await guest.hash_ahead()  # while the guest runs: keeps the switchover digest short
            dirty = guest.sync_dirty()
            now = time.monotonic()
            if now > last_sync:
                mig.dirty_rate = round(len(dirty) / (now - last_sync))
            last_sync = now
            bandwidth = mig.bandwidth()
            remaining = len(dirty) * PAGE_SIZE
            if remaining == 0:
                expected_ms = 0
            elif bandwidth > 0:
                expected_ms = _ms(remaining / bandwidth)
            else:
                expected_ms = 1 << 31
            mig.expected_downtime_ms = expected_ms
            mig.remaining_pages = len(dirty)
            if expected_ms <= tuning.max_downtime_ms or guest.paused:
                self._stop(mig)
                dirty |= guest.sync_dirty()
            pages = sorted(dirty)
        writer.write(b"S" + guest.digest())
        await writer.drain()

    @staticmethod
    def _stop(mig: _Outgoing) -> None:
        mig.guest.tick()
        mig.guest.stopped = True
        mig.stopped_at = time.monotonic()

    async def _send_pass(
        self,
        mig: _Outgoing,
        writer: asyncio.StreamWriter,
        pages: Sequence[int],
        *,
        final: bool,
        throttle: _Throttle,
    ) -> None:
        guest = mig.guest
        writer.write(b"I" + _ITER.pack(mig.iteration, _ITER_STOPPED if final else 0))
        mig.remaining_pages = len(pages)
        seed, versions = guest.seed, guest.versions
        prefix = _prefix(seed)[0]
        corrupt = final and guest.fault == FAULT_CORRUPT_STREAM
        step = throttle.batch_pages
        for start in range(0, len(pages), step):
            batch = pages[start : start + step]
            parts = [b"P", _U32.pack(len(batch))]
            for i in batch:
                v = versions[i]
                parts += (_RECORD.pack(i, v), prefix, _SUFFIX.pack(seed, i, v))
            if corrupt:
                parts[3] = bytes([prefix[0] ^ 0xFF]) + prefix[1:]  # page batch[0]: one bad byte
                corrupt = False
            data = b"".join(parts)
            writer.write(data)
            await writer.drain()
            mig.pages_sent += len(batch)
            mig.remaining_pages -= len(batch)
            await throttle.pace(len(data))  # also yields to the event loop


class _Throttle:
    """Sleep-based pacing to an average of ``rate`` bytes/s (0: unlimited, just yield)."""

    def __init__(self, rate: int) -> None:
        self.rate = max(0, rate)
        self.batch_pages = (
            max(1, min(_BATCH_PAGES, self.rate // PAGE_SIZE // 20)) if self.rate else _BATCH_PAGES
        )
        self._next = time.monotonic()

    async def pace(self, nbytes: int) -> None:
        if not self.rate:
            await asyncio.sleep(0)
            return
        now = time.monotonic()
        self._next = max(self._next, now) + nbytes / self.rate
        await asyncio.sleep(max(0.0, self._next - now))
