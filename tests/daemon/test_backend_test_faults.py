"""The embedded ``test`` backend: faults and cancellation during a migration (refused connections,
destroyed or silent peers, cancelled callers, closing the backend).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.daemon import backend_test_helpers
from tests.daemon.backend_test_helpers import (
    LOOPBACK,
    MIB,
    make_spec,
    to,
    wait_for_progress,
    within,
)
from virtmig.daemon.backend.base import (
    GuestRunState,
    MigrationFailed,
    MigrationStatus,
    MigrationTuning,
)
from virtmig.daemon.backend.test import TestBackend
from virtmig.testing import free_port

# The shared fixtures, bound here so that pytest finds them.
dst = backend_test_helpers.dst
src = backend_test_helpers.src


async def test_connection_refused(src: TestBackend) -> None:
    port = free_port()
    spec = make_spec(4)
    await src.start(spec, paused=False)
    with pytest.raises(MigrationFailed, match=rf"Failed to connect to '127.0.0.1:{port}'"):
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert src.progress(spec.uuid).status is MigrationStatus.FAILED


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
