"""The embedded ``test`` backend: pre-copy migrations over TCP on loopback, live tuning and
auto-converge.
"""

from __future__ import annotations

import asyncio
import errno
import socket
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
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
)
from virtmig.daemon.backend.test import PAGE_SIZE, TestBackend
from virtmig.testing import wait_until

# The shared fixtures, bound here so that pytest finds them.
dst = backend_test_helpers.dst
src = backend_test_helpers.src


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
