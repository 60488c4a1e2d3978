"""The embedded ``test`` backend: post-copy migrations (the switch, page pulls, refused cancel, a
failure after the switch).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest

from tests.daemon import backend_test_helpers
from tests.daemon.backend_test_helpers import (
    LOOPBACK,
    MIB,
    make_spec,
    migrate,
    progress_reaches,
    to,
    wait_for_progress,
    within,
)
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
)
from virtmig.daemon.backend.test import TestBackend, page_bytes, page_hash
from virtmig.testing import wait_until

# The shared fixtures, bound here so that pytest finds them.
dst = backend_test_helpers.dst
src = backend_test_helpers.src


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
