"""What the ``test`` backend keeps of ended migrations: no guest, no page map, a bounded number
of outcome records (found by the property tests: each migrated domain's guests stayed in memory
for the daemon's life)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from tests.daemon import backend_test_helpers
from tests.daemon.backend_test_helpers import LOOPBACK, make_spec, migrate, to, within
from virtmig.daemon.backend.base import (
    BackendError,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
)
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.backend.test.guest import Guest

dst = backend_test_helpers.dst
src = backend_test_helpers.src


def live(backend: TestBackend) -> int:
    return len(backend._progress) + len(backend._incoming)


async def test_migrated_and_destroyed_guests_leave_nothing(src: TestBackend,
                                                           dst: TestBackend) -> None:
    """Many guests migrated, then destroyed on both sides: neither backend keeps a migration or
    any of the guests (weak references to them all die), only each guest's outcome record."""
    refs: list[weakref.ref[Guest]] = []
    uuids = []
    for _ in range(12):
        spec = make_spec(1, **{"dirty-rate-mib": "4"})
        await src.start(spec, paused=False)
        refs.append(weakref.ref(src._guests[spec.uuid]))
        port = await dst.incoming_start(spec, LOOPBACK)
        refs.append(weakref.ref(dst._guests[spec.uuid]))
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
        await within(dst.incoming_wait(spec.uuid))
        await src.destroy(spec.uuid)
        await dst.destroy(spec.uuid)
        uuids.append(spec.uuid)
    for uuid in uuids:  # (each outcome settles as its stream task ends: the records are in)
        await within(src.outgoing_wait(uuid))
    # An incoming stream's task settles its outcome first, then waits for the stream's threads
    # (holding its guest meanwhile): a busy machine can still be in that wait here.
    pending = [*src._tasks, *dst._tasks]
    if pending:
        await within(asyncio.wait(pending))
    gc.collect()
    assert (live(src), live(dst)) == (0, 0)
    assert [r for r in refs if r() is not None] == []
    # The outcomes still answer, from the records.
    for uuid in uuids:
        assert src.progress(uuid).status is MigrationStatus.COMPLETED
        done = await within(dst.incoming_wait(uuid))
        assert done.status is MigrationStatus.COMPLETED and done.remaining_bytes == 0
        assert (await within(src.outgoing_wait(uuid))).status is MigrationStatus.COMPLETED
    assert len(src._ended) == len(dst._ended) == 12


async def test_ended_records_are_bounded() -> None:
    """Only the last ``max_ended`` guests' outcomes are kept; an older one is gone."""
    src, dst = TestBackend(max_ended=3), TestBackend(max_ended=3)
    try:
        specs = [make_spec(1) for _ in range(5)]
        for spec in specs:
            await src.start(spec, paused=True)
            await migrate(src, dst, spec)
            await within(src.outgoing_wait(spec.uuid))
        assert len(src._ended) == len(dst._ended) == 3
        assert dst.progress(specs[0].uuid) == MigrationProgress()
        with pytest.raises(MigrationFailed, match="no incoming migration"):
            await dst.incoming_wait(specs[0].uuid)
        with pytest.raises(BackendError, match="no outgoing migration"):
            await src.outgoing_wait(specs[1].uuid)
        assert dst.progress(specs[4].uuid).status is MigrationStatus.COMPLETED
    finally:
        await within(src.close())
        await within(dst.close())


async def test_a_failed_outcome_is_raised_anew_each_time(src: TestBackend,
                                                         dst: TestBackend) -> None:
    """A cancelled migration's record raises its error (a new exception each time: no traceback
    piles up on a kept one), and the record says which side it was."""
    spec = make_spec(64, **{"dirty-rate-mib": "1024"})  # never converges
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    task = src.outgoing(spec.uuid, to(port), MigrationTuning(bandwidth_bytes_per_s=1 << 20))
    running = asyncio.ensure_future(task)
    await backend_test_helpers.wait_for_progress(src, spec.uuid, 1)
    await src.cancel(spec.uuid)
    with pytest.raises(MigrationCancelled):
        await within(running)
    with pytest.raises(MigrationFailed):
        await within(dst.incoming_wait(spec.uuid))
    errors = []
    for _ in range(2):
        with pytest.raises(MigrationCancelled, match="migration cancelled") as err:
            await within(src.outgoing_wait(spec.uuid))
        errors.append(err.value)
    assert errors[0] is not errors[1]
    assert src.progress(spec.uuid).status is MigrationStatus.CANCELLED
    with pytest.raises(MigrationFailed, match="no incoming migration"):
        await src.incoming_wait(spec.uuid)  # the source's record is of an outgoing migration
    assert live(src) == live(dst) == 0
