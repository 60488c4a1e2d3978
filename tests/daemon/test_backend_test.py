"""The embedded ``test`` backend: lifecycle, memory model, and real TCP migrations on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import pytest

from virtmig.daemon.backend import test as test_backend
from virtmig.daemon.backend.base import (
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
from virtmig.daemon.backend.test import MAGIC, PAGE_SIZE, TestBackend, page_bytes, page_hash
from virtmig.proto.errors import ConfigUnsupported
from virtmig.testing import free_port, wait_until

MIB = 1024 * 1024
LOOPBACK = StreamAddress("127.0.0.1", 0)
T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float = 15) -> T:
    """No test may hang: every wait on a migration is bounded."""
    return await asyncio.wait_for(aw, seconds)


def make_spec(mib: int = 64, /, **options: str) -> GuestSpec:
    uuid = str(uuidlib.uuid4())
    return GuestSpec(
        uuid=uuid, name=f"g-{uuid[:8]}", memory_bytes=mib * MIB, vcpus=1, options=options
    )


def to(port: int) -> StreamAddress:
    return StreamAddress("127.0.0.1", port)


@pytest.fixture
async def src() -> AsyncIterator[TestBackend]:
    backend = TestBackend()
    yield backend
    await within(backend.close())


@pytest.fixture
async def dst() -> AsyncIterator[TestBackend]:
    backend = TestBackend()
    yield backend
    await within(backend.close())


async def migrate(
    src: TestBackend, dst: TestBackend, spec: GuestSpec, tuning: MigrationTuning | None = None
) -> tuple[MigrationProgress, MigrationProgress]:
    port = await dst.incoming_start(spec, LOOPBACK)
    assert port > 0
    out = await within(src.outgoing(spec.uuid, to(port), tuning or MigrationTuning()))
    inc = await within(dst.incoming_wait(spec.uuid))
    return out, inc


async def progress_reaches(
    backend: TestBackend, uuid: str, ok: Callable[[MigrationProgress], bool], what: str,
    timeout: float = 30,
) -> MigrationProgress:
    """The backend's progress of ``uuid``, once ``ok`` holds for it."""

    def reached() -> MigrationProgress | None:
        p = backend.progress(uuid)
        return p if ok(p) else None

    return await wait_until(
        reached, timeout=timeout,
        what=lambda: f"migration of {uuid} to reach {what}: {backend.progress(uuid)}")


async def wait_for_progress(backend: TestBackend, uuid: str, min_bytes: int) -> MigrationProgress:
    return await progress_reaches(backend, uuid, lambda p: p.processed_bytes >= min_bytes,
                                  f"{min_bytes} bytes sent", timeout=10)


# --- lifecycle -----------------------------------------------------------------------------------


async def test_lifecycle_and_states(src: TestBackend) -> None:
    spec = make_spec(1)
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    assert src.progress(spec.uuid) == MigrationProgress()

    await src.start(spec, paused=False)
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    with pytest.raises(BackendError, match="already running"):
        await src.start(spec, paused=True)
    await src.pause(spec.uuid)
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    await src.pause(spec.uuid)  # pausing a paused guest is harmless
    await src.resume(spec.uuid)
    assert src.state(spec.uuid) is GuestRunState.RUNNING

    await src.destroy(spec.uuid)
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    await src.destroy(spec.uuid)  # not running: no error
    await src.destroy("no-such-guest")
    for op in (src.pause, src.resume):
        with pytest.raises(BackendError, match="not running"):
            await op(spec.uuid)
    with pytest.raises(BackendError):
        src.memory_digest(spec.uuid)
    with pytest.raises(BackendError, match="not running"):
        await src.outgoing(spec.uuid, to(1), MigrationTuning())
    await src.cancel(spec.uuid)  # nothing to cancel: no-op

    await src.start(spec, paused=True)
    assert src.state(spec.uuid) is GuestRunState.PAUSED


async def test_bad_options_are_refused(src: TestBackend) -> None:
    bad = [
        make_spec(seed="banana"),
        make_spec(**{"dirty-rate-mib": "fast"}),
        make_spec(**{"dirty-rate-mib": "-1"}),
        make_spec(fault="explode"),
        GuestSpec(uuid=str(uuidlib.uuid4()), name="tiny", memory_bytes=100, vcpus=1),
    ]
    for spec in bad:
        with pytest.raises(ConfigUnsupported):
            src.validate(spec)
        with pytest.raises(BackendError):
            await src.start(spec, paused=False)
        assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    src.validate(make_spec(seed="0x1234", **{"dirty-rate-mib": "2.5"}))


async def test_memory_model(src: TestBackend, dst: TestBackend) -> None:
    page = page_bytes(7, 3, 0)
    assert len(page) == PAGE_SIZE
    assert len({page, page_bytes(7, 3, 1), page_bytes(7, 4, 0), page_bytes(8, 3, 0)}) == 4
    assert page_bytes(7, 3, 0) == page

    # Same seed, idle: same memory on two backends; a different seed: different memory.
    a, b, c = make_spec(4, seed="42"), make_spec(4, seed="42"), make_spec(4, seed="43")
    await src.start(a, paused=False)
    await dst.start(b, paused=False)
    await dst.start(c, paused=False)
    assert src.memory_digest(a.uuid) == dst.memory_digest(b.uuid) != dst.memory_digest(c.uuid)
    await asyncio.sleep(0.05)  # the subject: idle guests, given time to run, dirty nothing
    assert src.memory_digest(a.uuid) == dst.memory_digest(b.uuid)

    # A running guest with a dirty rate changes its memory; a paused one does not.
    busy = make_spec(4, **{"dirty-rate-mib": "64"})
    await src.start(busy, paused=False)
    before = src.memory_digest(busy.uuid)
    await wait_until(lambda: src.memory_digest(busy.uuid) != before, timeout=10,
                     what="the running guest to write to its memory")
    await src.pause(busy.uuid)
    paused = src.memory_digest(busy.uuid)
    await asyncio.sleep(0.05)  # the subject: a paused guest, given time to run, writes nothing
    assert src.memory_digest(busy.uuid) == paused


# --- migration -----------------------------------------------------------------------------------


async def test_migrate_idle_guest(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    digest = src.memory_digest(spec.uuid)

    out, inc = await migrate(src, dst, spec)

    assert out.status is MigrationStatus.COMPLETED
    assert out.total_bytes == 64 * MIB
    assert out.processed_bytes == 64 * MIB  # idle: every page exactly once
    assert out.remaining_bytes == 0
    assert out.iteration == 2  # the full pass, then an empty stop-and-copy pass
    assert out.normal_pages == 64 * MIB // PAGE_SIZE
    assert out.bandwidth_bytes_per_s > 0
    assert out.total_time_ms >= out.downtime_ms
    assert inc.status is MigrationStatus.COMPLETED
    assert inc.processed_bytes == 64 * MIB

    assert src.state(spec.uuid) is GuestRunState.PAUSED
    assert dst.state(spec.uuid) is GuestRunState.PAUSED
    assert dst.memory_digest(spec.uuid) == digest == src.memory_digest(spec.uuid)

    # The final progress stays; incoming_wait after the fact returns at once.
    assert src.progress(spec.uuid) == out
    assert dst.progress(spec.uuid) == inc
    assert await within(dst.incoming_wait(spec.uuid), 1) == inc

    # The received guest is a normal guest.
    await dst.resume(spec.uuid)
    assert dst.state(spec.uuid) is GuestRunState.RUNNING


async def test_migrate_dirtying_guest_converges(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64, **{"dirty-rate-mib": "16"})
    await src.start(spec, paused=False)
    initial = src.memory_digest(spec.uuid)

    out, _ = await migrate(src, dst, spec, MigrationTuning(max_downtime_ms=300))

    assert out.status is MigrationStatus.COMPLETED
    assert out.iteration >= 2
    assert out.processed_bytes > out.total_bytes  # dirtied pages went out again
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    final = src.memory_digest(spec.uuid)
    assert final != initial  # the guest really wrote to its memory meanwhile
    assert dst.memory_digest(spec.uuid) == final


async def test_non_live_migration_pauses_first(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(16, **{"dirty-rate-mib": "64"})
    await src.start(spec, paused=False)
    out, _ = await migrate(src, dst, spec, MigrationTuning(live=False))
    assert out.iteration == 1  # one stop-and-copy pass
    assert out.processed_bytes == out.total_bytes
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)


async def test_non_converging_migration_runs_until_paused(
    src: TestBackend, dst: TestBackend
) -> None:
    # Dirties 64 MiB/s, link 16 MiB/s: pre-copy never converges on its own.
    spec = make_spec(4, **{"dirty-rate-mib": "64"})
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=16 * MIB, max_downtime_ms=50)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(src, spec.uuid, 6 * MIB)  # well into iteration 2
    p = src.progress(spec.uuid)
    assert p.status is MigrationStatus.ACTIVE and p.iteration >= 2
    assert p.dirty_rate_pages_per_s > 0
    assert not job.done()

    await src.pause(spec.uuid)
    out = await within(job)
    assert out.status is MigrationStatus.COMPLETED
    await within(dst.incoming_wait(spec.uuid))
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)


async def test_corrupt_stream_is_refused(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(8, fault="corrupt-stream")
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)

    with pytest.raises(MigrationFailed, match="memory digest mismatch at switchover"):
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    with pytest.raises(MigrationFailed, match="digest mismatch"):
        await within(dst.incoming_wait(spec.uuid))

    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF  # the destination guest quit
    assert src.progress(spec.uuid).status is MigrationStatus.FAILED
    assert "digest" in src.progress(spec.uuid).error
    assert dst.progress(spec.uuid).status is MigrationStatus.FAILED


async def test_stream_for_another_guest_is_refused(src: TestBackend, dst: TestBackend) -> None:
    mine, other = make_spec(4), make_spec(4)
    await src.start(mine, paused=True)
    port = await dst.incoming_start(other, LOOPBACK)
    with pytest.raises(MigrationFailed, match="for another guest"):
        await within(src.outgoing(mine.uuid, to(port), MigrationTuning()))
    with pytest.raises(MigrationFailed, match="for another guest"):
        await within(dst.incoming_wait(other.uuid))
    assert src.state(mine.uuid) is GuestRunState.PAUSED  # paused before, paused after
    assert dst.state(other.uuid) is GuestRunState.SHUTOFF


async def test_connection_refused(src: TestBackend) -> None:
    port = free_port()
    spec = make_spec(4)
    await src.start(spec, paused=False)
    with pytest.raises(MigrationFailed, match=rf"Failed to connect to '127.0.0.1:{port}'"):
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert src.progress(spec.uuid).status is MigrationStatus.FAILED


async def test_bandwidth_limit_and_cancel(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=8 * MIB)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(src, spec.uuid, 1 * MIB)
    await wait_for_progress(dst, spec.uuid, 1)

    # Throttled: far from done (unthrottled, 64 MiB on loopback take a fraction of the time
    # 1 MiB takes at 8 MiB/s).
    p = src.progress(spec.uuid)
    assert p.status is MigrationStatus.ACTIVE
    assert p.iteration == 1
    assert 0 < p.processed_bytes < p.total_bytes // 2
    assert p.remaining_bytes == p.total_bytes - p.processed_bytes
    assert 0 < dst.progress(spec.uuid).processed_bytes <= p.processed_bytes
    assert src.state(spec.uuid) is GuestRunState.RUNNING  # live: still running

    await src.cancel(spec.uuid)
    with pytest.raises(MigrationCancelled, match="migration cancelled"):
        await within(job)
    with pytest.raises(MigrationFailed):
        await within(dst.incoming_wait(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF
    assert src.progress(spec.uuid).status is MigrationStatus.CANCELLED

    # The guest can be migrated again afterwards.
    out, _ = await migrate(src, dst, spec)
    assert out.status is MigrationStatus.COMPLETED


async def test_caller_cancellation_restores_guest(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=8 * MIB)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(src, spec.uuid, 1)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(job)
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    with pytest.raises(MigrationFailed):
        await within(dst.incoming_wait(spec.uuid))


async def test_destination_destroyed_mid_migration(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=8 * MIB)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(dst, spec.uuid, 1)

    await dst.destroy(spec.uuid)
    with pytest.raises(MigrationFailed):
        await within(job)
    with pytest.raises(MigrationFailed, match="guest unexpectedly quit"):
        await within(dst.incoming_wait(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


async def test_destination_destroyed_before_connect(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(4)
    port = await dst.incoming_start(spec, LOOPBACK)
    await dst.destroy(spec.uuid)
    with pytest.raises(MigrationFailed, match="guest unexpectedly quit"):
        await within(dst.incoming_wait(spec.uuid))
    await src.start(spec, paused=False)
    with pytest.raises(MigrationFailed, match="Failed to connect"):
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))


async def test_source_destroyed_mid_migration(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=8 * MIB)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(src, spec.uuid, 1)

    await src.destroy(spec.uuid)
    with pytest.raises(MigrationFailed, match="guest unexpectedly quit"):
        await within(job)
    with pytest.raises(MigrationFailed, match="ended early"):
        await within(dst.incoming_wait(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF


async def test_migrate_onwards_to_a_third_backend(src: TestBackend, dst: TestBackend) -> None:
    third = TestBackend()
    try:
        spec = make_spec(16, **{"dirty-rate-mib": "8"})
        await src.start(spec, paused=False)
        await migrate(src, dst, spec)
        first_hop = src.memory_digest(spec.uuid)
        assert dst.memory_digest(spec.uuid) == first_hop

        # The received guest runs (and dirties) on dst, then moves on to a third daemon.
        await dst.resume(spec.uuid)
        await wait_until(lambda: dst.memory_digest(spec.uuid) != first_hop, timeout=10,
                         what="the received guest to write to its memory")
        out, _ = await migrate(dst, third, spec)
        assert out.status is MigrationStatus.COMPLETED
        second_hop = dst.memory_digest(spec.uuid)
        assert second_hop != first_hop
        assert third.memory_digest(spec.uuid) == second_hop
        assert third.state(spec.uuid) is GuestRunState.PAUSED
    finally:
        await within(third.close())


async def test_port_busy(src: TestBackend, dst: TestBackend) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = make_spec(4)
        with pytest.raises(OSError) as info:
            await dst.incoming_start(spec, to(port))
        assert info.value.errno == errno.EADDRINUSE
    # Nothing left behind: no guest, no incoming migration, and a retry works.
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF
    assert dst.progress(spec.uuid) == MigrationProgress()
    with pytest.raises(MigrationFailed):
        await dst.incoming_wait(spec.uuid)
    await src.start(spec, paused=False)
    out, _ = await migrate(src, dst, spec)
    assert out.status is MigrationStatus.COMPLETED


async def test_listener_accepts_one_connection(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(16)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=64 * MIB)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(dst, spec.uuid, 1)
    with pytest.raises(OSError):  # the listener closed once the stream was accepted
        await within(asyncio.open_connection("127.0.0.1", port))
    out = await within(job)
    assert out.status is MigrationStatus.COMPLETED


async def raw_stream(port: int, data: bytes) -> bytes:
    """Send hand-made stream bytes to a destination; return everything it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()  # the source "dies" after these bytes
    try:
        return await within(reader.read())
    finally:
        writer.close()


def header(spec: GuestSpec, *, magic: bytes = MAGIC) -> bytes:
    uuid = spec.uuid.encode()
    npages = spec.memory_bytes // PAGE_SIZE
    return struct.pack("<8sHIQQH", magic, 1, PAGE_SIZE, npages, 42, len(uuid)) + uuid


async def test_destination_refuses_incomplete_stream(dst: TestBackend) -> None:
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    # One page of 256, then straight to switchover with the source's "digest".
    page = struct.pack("<II", 0, 0) + page_bytes(42, 0, 0)
    stream = header(spec) + b"I" + struct.pack("<IB", 1, 1) + b"P" + struct.pack("<I", 1) + page
    answer = await raw_stream(port, stream + b"S" + bytes(32))
    assert answer.startswith(b"AN")  # header accepted, switchover refused
    assert b"255 of 256 pages never received" in answer
    with pytest.raises(MigrationFailed, match="digest mismatch at switchover"):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.parametrize(
    ("after_header", "message"),
    [
        (None, "not a test backend stream"),
        (b"X", "unknown record"),
        (b"P" + struct.pack("<III", 1, 7, 0) + bytes(100), "ended early"),
        (b"P" + struct.pack("<III", 1, 99999, 0) + bytes(PAGE_SIZE), "page 99999 of 256"),
    ],
    ids=["bad-magic", "unknown-record", "truncated", "page-out-of-range"],
)
async def test_destination_refuses_malformed_stream(
    dst: TestBackend, after_header: bytes | None, message: str
) -> None:
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    if after_header is None:
        await raw_stream(port, header(spec, magic=b"NOTVMTST"))
    else:
        await raw_stream(port, header(spec) + after_header)
    with pytest.raises(MigrationFailed, match=message):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


async def test_silent_peers_time_out(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("virtmig.daemon.backend.test.wire.HANDSHAKE_TIMEOUT", 0.2)
    # A destination that connects but never sends a header gives up.
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(MigrationFailed, match="timed out waiting for the migration stream header"):
        await within(dst.incoming_wait(spec.uuid))
    writer.close()

    # A source whose "destination" accepts but never answers gives up, and runs on.
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda _, w: accepted.append(w), "127.0.0.1", 0)
    mute = server.sockets[0].getsockname()[1]
    await src.start(spec, paused=False)
    try:
        with pytest.raises(
            MigrationFailed, match="timed out waiting for the migration destination"
        ):
            await within(src.outgoing(spec.uuid, to(mute), MigrationTuning()))
    finally:
        server.close()
        for w in accepted:
            w.close()
    assert src.state(spec.uuid) is GuestRunState.RUNNING


async def test_close_aborts_migrations(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=8 * MIB)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(dst, spec.uuid, 1)
    await within(dst.close())
    with pytest.raises(MigrationFailed):
        await within(dst.incoming_wait(spec.uuid))
    with pytest.raises(MigrationFailed):
        await within(job)
    assert src.state(spec.uuid) is GuestRunState.RUNNING


# --- job control: live tuning --------------------------------------------------------------------


async def set_tuning_now(backend: TestBackend, uuid: str, **tuning: int) -> bool:
    """Tune the outgoing migration of ``uuid``; False while there is none (yet)."""
    try:
        await backend.set_tuning(uuid, **tuning)
    except BackendError as exc:
        assert "no outgoing migration is running" in str(exc)
        return False
    return True


async def test_set_tuning_raises_bandwidth(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    with pytest.raises(BackendError, match="no outgoing migration is running"):
        await src.set_tuning(spec.uuid, bandwidth_bytes_per_s=0)
    with pytest.raises(BackendError, match="no outgoing migration is running"):
        await src.set_tuning("no-such-guest", max_downtime_ms=10)
    port = await dst.incoming_start(spec, LOOPBACK)
    # 64 MiB at 1 MiB/s would take a minute: far beyond the bound on the wait below.
    tuning = MigrationTuning(bandwidth_bytes_per_s=1 * MIB)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_for_progress(src, spec.uuid, 1)
    with pytest.raises(BackendError, match="invalid"):
        await src.set_tuning(spec.uuid, bandwidth_bytes_per_s=-1)
    assert not job.done()

    await src.set_tuning(spec.uuid, bandwidth_bytes_per_s=0)  # unlimited
    out = await within(job)
    assert out.status is MigrationStatus.COMPLETED
    await within(dst.incoming_wait(spec.uuid))
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    with pytest.raises(BackendError, match="no outgoing migration is running"):
        await src.set_tuning(spec.uuid, bandwidth_bytes_per_s=0)  # over


async def test_set_tuning_max_downtime(src: TestBackend, dst: TestBackend) -> None:
    # 1 MiB dirtied at 64 MiB/s over a 16 MiB/s link: every pass leaves most pages dirty, an
    # expected downtime of ~60 ms -- converges with 300 ms, never with 0.
    spec = make_spec(1, **{"dirty-rate-mib": "64"})
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = MigrationTuning(bandwidth_bytes_per_s=16 * MIB, max_downtime_ms=300)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    # As soon as outgoing registered the migration: pass 1 has not ended.
    await wait_until(lambda: set_tuning_now(src, spec.uuid, max_downtime_ms=0), timeout=10,
                     interval=0, what="the outgoing migration to be registered")

    p = await progress_reaches(src, spec.uuid, lambda p: p.iteration >= 5, "iteration 5")
    assert p.status is MigrationStatus.ACTIVE
    assert p.expected_downtime_ms > 0
    assert not job.done()
    assert src.state(spec.uuid) is GuestRunState.RUNNING

    await src.set_tuning(spec.uuid, max_downtime_ms=10_000)
    out = await within(job)
    assert out.status is MigrationStatus.COMPLETED
    assert out.iteration >= 6  # the stop-and-copy pass came only after the change
    await within(dst.incoming_wait(spec.uuid))
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)


# --- job control: auto-converge ------------------------------------------------------------------

# 2 MiB dirtied at 64 MiB/s over a 16 MiB/s link (max downtime 50 ms): the dirty rate exceeds
# the bandwidth, so pre-copy alone never converges.
FAST_DIRTIER = {"dirty-rate-mib": "64"}
SLOW_LINK = MigrationTuning(bandwidth_bytes_per_s=16 * MIB, max_downtime_ms=50)


async def test_without_auto_converge_never_converges(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(2, **FAST_DIRTIER)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), SLOW_LINK))
    p = await progress_reaches(src, spec.uuid, lambda p: p.iteration >= 6, "iteration 6")
    assert p.status is MigrationStatus.ACTIVE
    assert p.throttle_percent == 0
    assert not job.done()
    await src.cancel(spec.uuid)
    with pytest.raises(MigrationCancelled):
        await within(job)
    assert src.state(spec.uuid) is GuestRunState.RUNNING


async def test_auto_converge_throttles_until_converged(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(2, **FAST_DIRTIER)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    tuning = replace(SLOW_LINK, auto_converge=True)  # initial 20 %, +10 % per pass
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    seen: list[int] = []

    def sampled_until_done() -> bool:
        if job.done():
            return True
        seen.append(src.progress(spec.uuid).throttle_percent)
        return False

    # bounded: without auto-converge this would never end
    await wait_until(sampled_until_done, timeout=30, what="the migration to converge")
    out = await within(job, 1)

    assert out.status is MigrationStatus.COMPLETED
    assert max(seen) >= 20
    assert seen == sorted(seen)  # the throttle only ever goes up during the migration
    assert {s for s in seen if s} <= set(range(20, 100, 10))
    assert out.throttle_percent >= max(seen)  # the last value stays in the final progress
    assert out.iteration >= 3
    await within(dst.incoming_wait(spec.uuid))
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    assert src._guests[spec.uuid].throttle == 0  # lifted at the end


async def test_auto_converge_throttle_lifted_on_cancel(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(2, **FAST_DIRTIER)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    # 5 %, then +1 % per pass: nowhere near converging before the cancel.
    tuning = replace(
        SLOW_LINK, auto_converge=True, auto_converge_initial=5, auto_converge_increment=1
    )
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    p = await progress_reaches(src, spec.uuid, lambda p: p.throttle_percent >= 6, "throttle 6 %")
    assert p.status is MigrationStatus.ACTIVE
    assert src._guests[spec.uuid].throttle == p.throttle_percent
    await src.cancel(spec.uuid)
    with pytest.raises(MigrationCancelled):
        await within(job)
    assert src._guests[spec.uuid].throttle == 0
    assert src.progress(spec.uuid).throttle_percent >= 6
    assert src.state(spec.uuid) is GuestRunState.RUNNING


# --- job control: post-copy ----------------------------------------------------------------------


def postcopy_tuning(postcopy_mib: int, bandwidth_mib: int = 16) -> MigrationTuning:
    return MigrationTuning(
        bandwidth_bytes_per_s=bandwidth_mib * MIB,
        postcopy=True,
        postcopy_bandwidth_bytes_per_s=postcopy_mib * MIB,
    )


async def switch_to_postcopy(
    src: TestBackend,
    dst: TestBackend,
    spec: GuestSpec,
    tuning: MigrationTuning,
    *,
    after_bytes: int,
    port: int | None = None,
) -> MigrationProgress:
    """Start a migration, switch it to post-copy after ``after_bytes``; the switch progress."""
    if port is None:
        port = await dst.incoming_start(spec, LOOPBACK)
    job = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    if after_bytes:
        await wait_for_progress(src, spec.uuid, after_bytes)
        await src.start_postcopy(spec.uuid)
    else:  # as soon as the migration is registered, the stream not yet set up
        await wait_until(lambda: start_postcopy_now(src, spec.uuid), timeout=10, interval=0,
                         what="the outgoing migration to be registered")
    await src.start_postcopy(spec.uuid)  # asking twice is harmless
    out = await within(job)
    assert out.status is MigrationStatus.POSTCOPY_ACTIVE
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    # The destination switches when it reads the POSTCOPY record.
    await progress_reaches(
        dst,
        spec.uuid,
        lambda p: p.status is not MigrationStatus.ACTIVE,
        "post-copy on the destination",
    )
    return out


async def start_postcopy_now(backend: TestBackend, uuid: str) -> bool:
    """Switch the outgoing migration of ``uuid`` to post-copy; False while there is none (yet)."""
    try:
        await backend.start_postcopy(uuid)
    except BackendError as exc:
        assert "no outgoing migration is running" in str(exc)
        return False
    return True


def page_versions(backend: TestBackend, uuid: str) -> list[int]:
    return list(backend._guests[uuid].versions)


def fresh_digest(backend: TestBackend, uuid: str) -> bytes:
    """The guest's memory digest computed from scratch (no hash cache)."""
    guest = backend._guests[uuid]
    hashes = b"".join(page_hash(page_bytes(guest.seed, i, v)) for i, v in enumerate(guest.versions))
    return test_backend._digest_of(hashes)


@pytest.mark.parametrize("after_bytes", [0, 1 * MIB], ids=["before-pass-1", "mid-pass-1"])
async def test_postcopy_idle_guest(src: TestBackend, dst: TestBackend, after_bytes: int) -> None:
    spec = make_spec(8)
    await src.start(spec, paused=False)
    initial = src.memory_digest(spec.uuid)

    out = await switch_to_postcopy(
        src, dst, spec, postcopy_tuning(16, bandwidth_mib=4), after_bytes=after_bytes
    )
    assert src.memory_digest(spec.uuid) == initial  # the source's memory as of the switch
    p = src.progress(spec.uuid)  # 8 MiB at 4 + 16 MiB/s: not done yet
    assert p.status is MigrationStatus.POSTCOPY_ACTIVE
    assert p.remaining_bytes > 0
    with pytest.raises(BackendError, match="cannot cancel migration in post-copy mode"):
        await src.cancel(spec.uuid)
    with pytest.raises(BackendError):
        await src.resume(spec.uuid)  # stopped: the guest lives on the destination now
    with pytest.raises(BackendError):
        dst.memory_digest(spec.uuid)  # not all there yet

    inc = await within(dst.incoming_wait(spec.uuid))
    final = await within(src.outgoing_wait(spec.uuid))
    assert inc.status is final.status is MigrationStatus.COMPLETED
    assert final.processed_bytes == final.total_bytes  # idle: every page exactly once
    assert inc.processed_bytes == inc.total_bytes
    assert final.postcopy_requests == inc.postcopy_requests == 0  # a paused guest pulls nothing
    assert out.processed_bytes < final.processed_bytes
    assert src.progress(spec.uuid) == final
    assert await within(src.outgoing_wait(spec.uuid), 1) == final  # settled: at once

    # Left paused on both sides; the destination holds exactly the memory of the switch.
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    assert dst.state(spec.uuid) is GuestRunState.PAUSED
    assert dst.memory_digest(spec.uuid) == initial == fresh_digest(dst, spec.uuid)
    await dst.resume(spec.uuid)
    assert dst.state(spec.uuid) is GuestRunState.RUNNING


# The destination's write rate while post-copy runs (~0.7 s): a few pages (its page-hash cache
# marks them stale) or most of its 2048 pages (the cache is rebuilt).
@pytest.mark.parametrize("dst_rate", ["1", "16"], ids=["few-writes", "many-writes"])
async def test_postcopy_dirtying_guest_pulls_pages(
    src: TestBackend, dst: TestBackend, dst_rate: str
) -> None:
    spec = make_spec(8, **{"dirty-rate-mib": "16"})
    await src.start(spec, paused=False)
    initial = src.memory_digest(spec.uuid)
    # Post-copy throttled to 8 MiB/s: the running destination touches pages before the
    # background stream brings them, so it must pull them.
    port = await dst.incoming_start(replace(spec, options={"dirty-rate-mib": dst_rate}), LOOPBACK)
    await switch_to_postcopy(src, dst, spec, postcopy_tuning(8), after_bytes=2 * MIB, port=port)
    at_switch = src.memory_digest(spec.uuid)
    assert at_switch != initial  # the source guest wrote to its memory during pre-copy
    source_versions = page_versions(src, spec.uuid)

    await dst.resume(spec.uuid)
    assert dst.state(spec.uuid) is GuestRunState.RUNNING
    pulling = await progress_reaches(dst, spec.uuid, lambda p: p.postcopy_requests > 0, "a pull")
    assert pulling.status is MigrationStatus.POSTCOPY_ACTIVE
    assert pulling.remaining_bytes > 0

    inc = await within(dst.incoming_wait(spec.uuid))
    final = await within(src.outgoing_wait(spec.uuid))
    assert inc.status is final.status is MigrationStatus.COMPLETED
    assert inc.postcopy_requests > 0
    assert final.postcopy_requests == inc.postcopy_requests  # every request reached the source
    assert dst.state(spec.uuid) is GuestRunState.RUNNING  # the backend leaves it running
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    assert src.memory_digest(spec.uuid) == at_switch

    # The destination's memory: the received pages plus its own writes since the switch.
    await dst.pause(spec.uuid)
    dest_versions = page_versions(dst, spec.uuid)
    deltas = [(d - s) & 0xFFFFFFFF for d, s in zip(dest_versions, source_versions, strict=True)]
    assert all(delta < 1 << 20 for delta in deltas)  # only ever written forward
    assert any(deltas)  # it did write
    digest = dst.memory_digest(spec.uuid)
    assert digest == fresh_digest(dst, spec.uuid) != at_switch

    # A normal guest again: it migrates onwards (pre-copy).
    await dst.resume(spec.uuid)
    third = TestBackend()
    try:
        out, _ = await migrate(dst, third, spec)
        assert out.status is MigrationStatus.COMPLETED
        assert third.memory_digest(spec.uuid) == dst.memory_digest(spec.uuid)
    finally:
        await within(third.close())


async def test_postcopy_cancel_is_refused(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(8, **{"dirty-rate-mib": "8"})
    await src.start(spec, paused=False)
    await switch_to_postcopy(src, dst, spec, postcopy_tuning(8), after_bytes=1 * MIB)
    await dst.resume(spec.uuid)
    with pytest.raises(BackendError, match="cannot cancel migration in post-copy mode"):
        await src.cancel(spec.uuid)
    await src.set_tuning(spec.uuid, bandwidth_bytes_per_s=MIB)  # recorded; post-copy unaffected
    inc = await within(dst.incoming_wait(spec.uuid))
    final = await within(src.outgoing_wait(spec.uuid))
    assert inc.status is final.status is MigrationStatus.COMPLETED
    assert dst.state(spec.uuid) is GuestRunState.RUNNING
    assert src.state(spec.uuid) is GuestRunState.PAUSED


class Relay:
    """A TCP relay between a source and a destination, to cut the connection on demand."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> int:
        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
            writer.transport.abort()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            self.writers += (writer, up_writer)
            self.tasks.append(asyncio.create_task(pipe(reader, up_writer)))
            self.tasks.append(asyncio.create_task(pipe(up_reader, writer)))

        self.server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        relay_port: int = self.server.sockets[0].getsockname()[1]
        return relay_port

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self.writers:
            w.transport.abort()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize(
    "failure", ["source-destroyed", "destination-destroyed", "connection-cut", "corrupt-stream"]
)
async def test_postcopy_failure_leaves_guests_paused(
    src: TestBackend, dst: TestBackend, failure: str
) -> None:
    src_spec = make_spec(8, **{"dirty-rate-mib": "8"})
    if failure == "corrupt-stream":
        src_spec = replace(src_spec, options={**src_spec.options, "fault": "corrupt-stream"})
    # The destination writes slowly and post-copy is slow: the failure strikes mid-way.
    dst_spec = replace(src_spec, options={"dirty-rate-mib": "1"})
    postcopy_mib = 32 if failure == "corrupt-stream" else 2
    await src.start(src_spec, paused=False)
    relay = Relay()
    port = await dst.incoming_start(dst_spec, LOOPBACK)
    if failure == "connection-cut":
        port = await relay.start(port)
    uuid = src_spec.uuid
    await switch_to_postcopy(
        src, dst, src_spec, postcopy_tuning(postcopy_mib), after_bytes=1 * MIB, port=port
    )
    await dst.resume(uuid)
    assert dst.state(uuid) is GuestRunState.RUNNING
    await asyncio.sleep(0.05)  # the subject: the destination guest runs a while in post-copy
    assert dst.progress(uuid).status is MigrationStatus.POSTCOPY_ACTIVE or failure == (
        "corrupt-stream"
    )

    # What each side says (the other side of a destroyed guest sees the stream end).
    if failure == "source-destroyed":
        await src.destroy(uuid)
        # (a reset when the source had unread page requests when it closed)
        src_says, dst_says = "guest unexpectedly quit", "ended early|Connection reset"
    elif failure == "destination-destroyed":
        await dst.destroy(uuid)
        src_says = dst_says = "guest unexpectedly quit"
    elif failure == "connection-cut":
        await relay.cut()
        src_says, dst_says = "socket", "ended early|socket"
    else:
        src_says = dst_says = "memory digest mismatch at switchover"
    with pytest.raises(PostcopyFailed, match=src_says):
        await within(src.outgoing_wait(uuid))
    with pytest.raises(PostcopyFailed, match=dst_says):
        await within(dst.incoming_wait(uuid))

    # Nothing was rolled back, resumed or destroyed by the backend.
    expected_src = GuestRunState.SHUTOFF if failure == "source-destroyed" else GuestRunState.PAUSED
    expected_dst = (
        GuestRunState.SHUTOFF if failure == "destination-destroyed" else GuestRunState.PAUSED
    )
    assert src.state(uuid) is expected_src
    assert dst.state(uuid) is expected_dst
    assert src.progress(uuid).status is MigrationStatus.FAILED
    assert dst.progress(uuid).status is MigrationStatus.FAILED
    await asyncio.sleep(0.05)  # the subject: time passes, and still nothing is undone
    assert src.state(uuid) is expected_src
    assert dst.state(uuid) is expected_dst
    if expected_dst is GuestRunState.PAUSED:
        # Part of its memory never arrived: it cannot run, be inspected or migrate on.
        with pytest.raises(BackendError, match="post-copy migration failed"):
            await dst.resume(uuid)
        with pytest.raises(BackendError):
            dst.memory_digest(uuid)
        with pytest.raises(BackendError):
            await dst.outgoing(uuid, to(1), MigrationTuning())
        await dst.destroy(uuid)  # an explicit destroy works
        assert dst.state(uuid) is GuestRunState.SHUTOFF
    if expected_src is GuestRunState.PAUSED:
        assert src.memory_digest(uuid)  # the source's memory is whole


async def test_postcopy_not_enabled_or_not_needed(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(64)
    await src.start(spec, paused=False)
    with pytest.raises(BackendError, match="no outgoing migration is running"):
        await src.start_postcopy(spec.uuid)
    with pytest.raises(BackendError, match="no outgoing migration"):
        await src.outgoing_wait(spec.uuid)

    # Without tuning.postcopy the switch is refused and pre-copy goes on.
    port = await dst.incoming_start(spec, LOOPBACK)
    job = asyncio.create_task(
        src.outgoing(spec.uuid, to(port), MigrationTuning(bandwidth_bytes_per_s=8 * MIB))
    )
    await wait_for_progress(src, spec.uuid, 1)
    with pytest.raises(BackendError, match="migration was not started with post-copy enabled"):
        await src.start_postcopy(spec.uuid)
    assert src.progress(spec.uuid).status is MigrationStatus.ACTIVE
    await src.cancel(spec.uuid)
    with pytest.raises(MigrationCancelled):
        await within(job)
    with pytest.raises(MigrationCancelled):
        await within(src.outgoing_wait(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    with pytest.raises(MigrationFailed):
        await within(dst.incoming_wait(spec.uuid))

    # Post-copy allowed but never started: a plain pre-copy migration.
    out, inc = await migrate(src, dst, spec, MigrationTuning(postcopy=True))
    assert out.status is inc.status is MigrationStatus.COMPLETED
    assert await within(src.outgoing_wait(spec.uuid), 1) == out
    assert out.postcopy_requests == 0
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
