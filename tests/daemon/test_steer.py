"""Steering a running migration: speed, downtime, post-copy, auto-converge; on both backends.

Each test runs on the ``test`` backend and on ``qemu`` with the real test guest, except
auto-converge, which runs on ``test`` only: QEMU starts throttling after several dirty-bitmap
syncs, tens of seconds into a TCG migration of the test guest, longer than these tests (and
TCG guests) should run; its QEMU parameters and statistics are checked in ``test_backend_qemu``.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.daemon.test_jobs import assert_migrated, guest, migrate, on_qemu, until_streaming
from virtmig.client.connection import JobInfo
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.proto.errors import OperationAborted, OperationFailed, OperationInvalid
from virtmig.proto.flags import MAX_BANDWIDTH_MIB, DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import Host, wait_for_job, wait_until

F = MigrateFlags
P = MigrateParam


async def test_setspeed_while_running_speeds_it_up(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 1}))  # 64 s at this rate
    await until_streaming(src)
    await src.conn.set_max_speed("vm1", 0)  # unlimited
    await asyncio.wait_for(task, 30)
    await assert_migrated(src, dst)
    assert await src.conn.get_max_speed("vm1") == MAX_BANDWIDTH_MIB


async def test_setmaxdowntime_while_running_lets_it_converge(
    backend_pair: tuple[Host, Host],
) -> None:
    """A dirtying guest with a 1 ms downtime limit keeps iterating; 2 s lets it switch over."""
    src, dst = backend_pair
    await guest(src, dirty=32, booted=True)  # (a booting QEMU guest might converge anyway)
    await src.conn.set_max_downtime("vm1", 1)
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 64}))
    await wait_for_job(src.conn, "vm1",
                       lambda i: (i.stat("memory_iteration") or 0) >= 3,  # type: ignore[operator]
                       timeout=60, what="the migration's third iteration")
    assert not task.done()
    await src.conn.set_max_downtime("vm1", 2000)
    await asyncio.wait_for(task, 30)
    await assert_migrated(src, dst)


async def test_auto_converge_throttles_until_it_converges(pair: tuple[Host, Host]) -> None:
    src, dst = pair  # (test backend only: see the module docstring)
    await guest(src, dirty=128)  # dirties faster than the 32 MiB/s link
    params = TypedParams.of({P.BANDWIDTH: 32, P.AUTO_CONVERGE_INITIAL: 30,
                             P.AUTO_CONVERGE_INCREMENT: 20})
    task = migrate(src, dst, F.LIVE | F.AUTO_CONVERGE, params)
    throttles = set()

    def until_done(info: JobInfo) -> bool:  # every throttle the job watch shows, to the end
        throttle = info.stat("auto_converge_throttle")
        if isinstance(throttle, int) and throttle:
            throttles.add(throttle)
        return info.type is not JobType.UNBOUNDED and task.done()  # (not before it started)

    await wait_for_job(src.conn, "vm1", until_done, timeout=60, what="the migration to end")
    await task
    await assert_migrated(src, dst)
    assert throttles and min(throttles) >= 30
    assert all((t - 30) % 20 == 0 for t in throttles if t < 99)


@pytest.mark.postcopy
async def test_postcopy_switch_runs_the_guest_on_the_destination(
    backend_pair: tuple[Host, Host],
) -> None:
    src, dst = backend_pair
    await guest(src, dirty=128, booted=True)
    # (post-copy throttled so that it lasts long enough to be seen: a QEMU guest that has not
    # dirtied much yet would otherwise finish in a few milliseconds)
    params = TypedParams.of({P.BANDWIDTH: 32, P.BANDWIDTH_POSTCOPY: 16})
    task = migrate(src, dst, F.LIVE | F.POSTCOPY, params)
    await until_streaming(src)
    await src.conn.start_postcopy("vm1")

    async def running_in_postcopy() -> bool:
        # The source first: read after the destination, it may already be shut off (migrated).
        source = await src.conn.state("vm1")
        if (await dst.conn.state("vm1"))[:2] == (DomainState.RUNNING, 10):  # running (postcopy)
            assert source[2] == "postcopy"  # paused (postcopy)
            return True
        assert not task.done(), "the migration ended before the destination ran in post-copy"
        return False

    await wait_until(running_in_postcopy, timeout=60, what="the destination to run in post-copy")
    await asyncio.wait_for(task, 60)
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    await assert_migrated(src, dst)
    with pytest.raises(OperationInvalid, match="only be started while outgoing migration"):
        await dst.conn.start_postcopy("vm1")


@pytest.mark.postcopy
async def test_abort_in_postcopy_is_refused(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src, dirty=64)
    # (a QEMU guest that has just started holds little but its kernel: 4 MiB/s keeps its
    # pre-copy going until post-copy is asked for)
    task = migrate(src, dst, F.LIVE | F.POSTCOPY, TypedParams.of({
        P.BANDWIDTH_POSTCOPY: 4, P.BANDWIDTH: 4 if on_qemu(src) else 16}))
    await until_streaming(src)
    await src.conn.start_postcopy("vm1")

    async def in_postcopy() -> bool:
        return (await src.conn.state("vm1"))[2] == "postcopy"

    await wait_until(in_postcopy, timeout=30, what="the source to be paused for post-copy")
    with pytest.raises(OperationInvalid, match="cannot abort migration in post-copy mode"):
        await src.conn.abort_job("vm1")
    await src.conn.set_max_speed("vm1", 0, postcopy=True)
    await asyncio.wait_for(task, 60)
    await assert_migrated(src, dst)


class BreakAfterSwitch(RemoteDest):
    """Destroys the source guest once Finish runs the guest on the destination: the post-copy
    stream breaks."""

    def __init__(self, dst: Host, src: Host) -> None:
        super().__init__(dst.conn, True)
        self.src, self.dst = src, dst

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        uuid = (await self.src.conn.lookup("vm1")).uuid
        task = asyncio.ensure_future(super().finish(params, cookie, flags, cancelled))

        async def switched() -> bool:
            state = await self.dst.conn.state("vm1")
            return task.done() or state[:2] == (DomainState.RUNNING, 10)  # running (postcopy)

        await wait_until(switched, timeout=60, what="Finish to run the guest in post-copy")
        await self.src.daemon.backend.destroy(uuid)  # the source side dies mid post-copy
        return await task


@pytest.mark.postcopy
async def test_failure_after_the_switch_leaves_both_paused(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src, dirty=64, booted=True)  # (a just-started QEMU guest could converge first)
    params = TypedParams.of({P.BANDWIDTH: 16, P.BANDWIDTH_POSTCOPY: 2})

    async def switch_soon() -> None:
        await until_streaming(src)
        await src.conn.start_postcopy("vm1")

    switcher = asyncio.ensure_future(switch_soon())
    with pytest.raises(OperationFailed, match="post-copy"):
        await run_v3(RemoteSource(src.conn, True), BreakAfterSwitch(dst, src), "vm1", params,
                     F.LIVE | F.POSTCOPY, protection=True)
    await switcher
    # Neither side is resumed; the destination keeps its half for recovery.
    assert await dst.conn.state("vm1") == (DomainState.PAUSED, 13, "postcopy-failed")
    assert (await dst.conn.job_info("vm1")).phase == "postcopy_failed"
    src_state = await src.conn.state("vm1")
    assert src_state[0] in (DomainState.PAUSED, DomainState.SHUTOFF)  # never running
    await dst.conn.destroy("vm1")  # an admin's way out: the transient domain is gone
    assert not [d for d in dst.daemon.registry if d.job is not None]


@pytest.mark.postcopy
async def test_completion_timeout_postcopy_action(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src, dirty=128)
    params = TypedParams.of({P.BANDWIDTH: 32, P.COMPLETION_TIMEOUT: 8,
                             P.COMPLETION_TIMEOUT_ACTION: "postcopy"})
    await asyncio.wait_for(migrate(src, dst, F.LIVE | F.POSTCOPY, params), 60)
    await assert_migrated(src, dst)


async def test_abort_then_retry(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 4}))
    await until_streaming(src)
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await task
    await migrate(src, dst)
    await assert_migrated(src, dst)
