"""Migration jobs you can watch, steer and stop (libvirt's migration job and virsh's job
commands), on both backends.

Every test runs twice: on the ``test`` backend, and on the ``qemu`` backend with the real test
guest (:mod:`virtmig.testing.guest`, under KVM where usable; skipped without QEMU, failing
instead under VIRTMIG_REQUIRE_QEMU=1).
Every test checks the end state on both daemons: where the guest is and in which state, that no
job is left, and that the completed stats are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtmig.client import migrate as client_migrate
from virtmig.client import rpc
from virtmig.client.connection import Event, JobInfo
from virtmig.client.migrate import RemoteDest, RemoteSource, migrate3
from virtmig.client.sequence import Trace, run_v3
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.proto.errors import (
    InvalidArgument,
    NoDomain,
    OperationAborted,
    OperationInvalid,
    OperationTimeout,
    ResourceExhausted,
)
from virtmig.proto.flags import MAX_BANDWIDTH_MIB, DomainState, JobOperation, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    Host,
    domain_xml,
    guest_or_skip,
    hosts,
    qemu_domain_xml,
    wait_job_streaming,
    wait_until,
)

F = MigrateFlags
P = MigrateParam
TEST_MEMORY_MIB = 64
QEMU_MEMORY_MIB = 256  # what the test guest's kernel needs


def on_qemu(host: Host) -> bool:
    return isinstance(host.daemon.backend, QemuBackend)


def memory_mib(host: Host) -> int:
    return QEMU_MEMORY_MIB if on_qemu(host) else TEST_MEMORY_MIB


def guest_xml(host: Host, name: str = "vm1", dirty: int = 0) -> str:
    """A guest for ``host``'s backend; ``dirty``: MiB/s it keeps writing."""
    if on_qemu(host):  # (the guest's dirty_rate=0 means "as fast as it can": idle is 1 MiB/s)
        return qemu_domain_xml(guest_or_skip(), name, QEMU_MEMORY_MIB,
                               dirty_mb=64 if dirty else 16, dirty_rate=dirty or 1)
    return domain_xml(name, TEST_MEMORY_MIB, dirty_rate_mib=dirty)


async def guest(host: Host, name: str = "vm1", dirty: int = 0, *, booted: bool = False) -> None:
    """Define and start a guest; ``booted``: on QEMU, wait until its /init dirties memory."""
    await host.conn.define(guest_xml(host, name, dirty))
    await host.conn.start(name)
    if booted and on_qemu(host):
        await dirtying(host, name)


async def dirtying(host: Host, name: str, timeout: float = 120) -> None:
    """Wait until a QEMU test guest has booted and dirties memory (about 6 s under TCG, 1 s
    under KVM; the test backend's guests dirty from the start), for tests that need it to dirty
    at its rate."""
    uuid = (await host.conn.lookup(name)).uuid
    log = host.serial_log(uuid)
    await wait_until(lambda: log.exists() and b"DIRTY-READY" in log.read_bytes(),
                     timeout=timeout, interval=0.1, what=f"{name} to boot: {log}")


def migrate(src: Host, dst: Host, flags: int = F.LIVE, params: TypedParams | None = None,
            name: str = "vm1") -> asyncio.Task[object]:
    return asyncio.ensure_future(
        migrate3(src.conn, name, dst.conn, params or TypedParams(), flags))


async def until_streaming(host: Host, name: str = "vm1") -> JobInfo:
    """The source job's info once the migration of ``name`` streams (read from its job watch)."""
    return await wait_job_streaming(host.conn, name)


async def assert_rolled_back(src: Host, dst: Host, name: str = "vm1",
                             job: JobType = JobType.CANCELLED) -> None:
    assert (await src.conn.state(name))[0] is DomainState.RUNNING
    with pytest.raises(NoDomain):
        await dst.conn.lookup(name)
    for host in (src, dst):
        assert not [d.name for d in host.daemon.registry if d.job is not None]
    assert (await src.conn.job_info(name, completed=True)).type is job


async def assert_migrated(src: Host, dst: Host, name: str = "vm1") -> None:
    assert (await src.conn.state(name))[0] is DomainState.SHUTOFF
    assert (await dst.conn.state(name))[0] is DomainState.RUNNING
    for host in (src, dst):
        assert not [d.name for d in host.daemon.registry if d.job is not None]
        assert (await host.conn.job_info(name, completed=True)).type is JobType.COMPLETED


# --- watch -------------------------------------------------------------------------------


async def test_read_only_calls_never_wait_behind_a_migration(
    backend_pair: tuple[Host, Host],
) -> None:
    src, dst = backend_pair
    await guest(src)
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 8}))
    await until_streaming(src)
    answered = 0
    for _ in range(20):
        calls = [src.conn.list_domains(inactive=True), src.conn.info("vm1"),
                 src.conn.state("vm1"), src.conn.job_info("vm1"), src.conn.xml_desc("vm1"),
                 dst.conn.list_domains(inactive=True), dst.conn.state("vm1")]
        for call in calls:
            # A generous bound, not a timing: a call stuck behind the job would hang for good.
            await asyncio.wait_for(call, 5)
            answered += 1
        assert (await src.conn.job_info("vm1")).phase == "perform3"  # still migrating
    assert answered == 140
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await task
    await assert_rolled_back(src, dst)


async def test_job_info_while_running_and_completed(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    assert (await src.conn.job_info("vm1")).type is JobType.NONE
    assert (await src.conn.job_info("vm1", completed=True)).type is JobType.NONE
    # A QEMU guest that has just started holds little but its kernel: at 4 MiB/s its stream
    # lasts long enough to be seen (at 16 it could end before the watch saw it).
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 4 if on_qemu(src) else 16}))
    info = await until_streaming(src)
    assert info.type is JobType.UNBOUNDED and info.operation is JobOperation.MIGRATION_OUT
    # QEMU counts its ROMs too
    assert memory_mib(src) << 20 <= info.data_total < (memory_mib(src) + 16) << 20
    assert info.data_processed > 0
    assert info.stat("memory_bps") is not None
    incoming = await dst.conn.job_info("vm1")
    assert incoming.operation is JobOperation.MIGRATION_IN and incoming.phase == "prepare"
    await task
    await assert_migrated(src, dst)
    done = await src.conn.job_info("vm1", completed=True)
    assert done.data_remaining == 0 and done.stat("downtime") is not None
    assert done.operation is JobOperation.MIGRATION_OUT
    assert (await dst.conn.job_info("vm1", completed=True)).operation is \
        JobOperation.MIGRATION_IN


async def test_watch_job_pushes_progress_then_the_record(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    # A booted, dirtying guest: a QEMU guest that has just started has so few non-zero pages that
    # its migration can end between two samples of the watch.
    await guest(src, dirty=4, booted=True)
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 32}))
    await until_streaming(src)
    seen: list[JobInfo] = []
    async for info in src.conn.watch_job("vm1"):
        seen.append(info)
    await task
    running = [i for i in seen if i.type is JobType.UNBOUNDED]
    assert len(running) >= 2
    processed = [i.data_processed for i in running]
    assert processed == sorted(processed) and processed[-1] > processed[0]
    assert seen[-1].type is JobType.COMPLETED
    await assert_migrated(src, dst)


async def test_watch_without_job_returns_none_at_once(backend_pair: tuple[Host, Host]) -> None:
    src, _dst = backend_pair
    await guest(src)
    seen = [i async for i in src.conn.watch_job("vm1")]
    assert [i.type for i in seen] == [JobType.NONE]
    with pytest.raises(NoDomain):
        [i async for i in src.conn.watch_job("nope")]


async def collect(conn: object, stop: asyncio.Event, out: list[Event],
                  ready: asyncio.Event) -> None:
    from virtmig.client.connection import AsyncConnection

    assert isinstance(conn, AsyncConnection)
    stream = conn.events()
    it: AsyncIterator[Event] = stream.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    ready.set()
    while not stop.is_set():
        done, _ = await asyncio.wait({nxt}, timeout=0.05)
        if done:
            out.append(nxt.result())
            nxt = asyncio.ensure_future(it.__anext__())
    nxt.cancel()
    with contextlib.suppress(BaseException):
        await nxt
    await stream.aclose()  # type: ignore[attr-defined]


async def test_events_tell_the_story(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    stop = asyncio.Event()
    src_events: list[Event] = []
    dst_events: list[Event] = []
    r1, r2 = asyncio.Event(), asyncio.Event()
    tasks = [asyncio.ensure_future(collect(src.conn, stop, src_events, r1)),
             asyncio.ensure_future(collect(dst.conn, stop, dst_events, r2))]
    await r1.wait()
    await r2.wait()
    await wait_until(lambda: src.daemon.events._subs and dst.daemon.events._subs, timeout=30,
                     what="both event streams to be subscribed")
    await guest(src, dirty=4)
    await src.conn.suspend("vm1")
    await src.conn.resume("vm1")
    # Long enough (about a second) for the job watcher to see an iteration: QEMU sends only the
    # non-zero pages of a guest that has just booted.
    await migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 32 if on_qemu(src) else 64}))
    await wait_until(lambda: any(e.kind == "job-completed" for e in dst_events), timeout=30,
                     what="the destination's job-completed event")
    # The source's Stopped comes from Confirm, after the destination's job ended: wait for it
    # too (the stream may deliver it after migrate3 returns).
    await wait_until(lambda: any(e.kind == "lifecycle" and e.description.startswith("Stopped")
                                 for e in src_events), timeout=30,
                     what="the source's Stopped event")
    stop.set()
    await asyncio.gather(*tasks)
    src_life = [e.description for e in src_events if e.kind == "lifecycle"]
    assert src_life == ["Defined Added", "Started Booted", "Suspended Paused",
                        "Resumed Unpaused", "Suspended Migrated", "Stopped Migrated"]
    dst_life = [e.description for e in dst_events if e.kind == "lifecycle"]
    assert dst_life == ["Started Migrated", "Resumed Migrated"]
    assert any(e.kind == "migration-iteration" and e.iteration >= 1 for e in src_events)
    done = [e for e in src_events if e.kind == "job-completed"]
    assert len(done) == 1 and done[0].job is not None
    assert done[0].job.type is JobType.COMPLETED


# --- stop -------------------------------------------------------------------------------


async def test_abort_during_perform(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 8}))
    await until_streaming(src)
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted,
                       match="operation aborted: job 'migration out' canceled by client"):
        await task
    await assert_rolled_back(src, dst)
    # Aborted before the switchover, the guest was never stopped and stays as it was, with its
    # reason (libvirt 9.0), on both backends.
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")


class AbortingDest(RemoteDest):
    """Aborts the source job before (or after) Prepare runs on the destination."""

    def __init__(self, dst: Host, src: Host, *, after: bool) -> None:
        super().__init__(dst.conn, True)
        self.src, self.after = src, after

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        if not self.after:
            await self.src.conn.abort_job("vm1")
        out = await super().prepare(params, cookie, flags)
        if self.after:
            await self.src.conn.abort_job("vm1")
        return out


@pytest.mark.parametrize("after", [False, True], ids=["before-prepare", "during-prepare"])
async def test_abort_before_perform(backend_pair: tuple[Host, Host], after: bool) -> None:
    src, dst = backend_pair
    await guest(src)
    trace = Trace()
    with pytest.raises(OperationAborted, match="canceled by client"):
        await run_v3(RemoteSource(src.conn, True), AbortingDest(dst, src, after=after), "vm1",
                     TypedParams(), F.LIVE, protection=True, trace=trace)
    assert trace.calls == ["begin", "prepare", "perform", "finish(cancelled)"]
    await assert_rolled_back(src, dst)
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")  # never touched


def finish_waits_for_ever(dst: Host, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The destination's Finish waits for ever once the stream arrived (a device-state load
    that never ends); the event is set when it begins to."""
    finish_waiting = asyncio.Event()
    backend = dst.daemon.backend
    real_wait = backend.incoming_wait

    async def slow_wait(uuid: str) -> object:
        await real_wait(uuid)
        finish_waiting.set()
        await asyncio.Event().wait()  # the subject
        raise AssertionError("unreachable")

    monkeypatch.setattr(backend, "incoming_wait", slow_wait)
    return finish_waiting


async def test_abort_while_finish_waits(backend_pair: tuple[Host, Host],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finish waits (a slow device-state load); the abort cancels it and everything rolls back."""
    src, dst = backend_pair
    await guest(src)
    finish_waiting = finish_waits_for_ever(dst, monkeypatch)
    task = migrate(src, dst)
    await finish_waiting.wait()
    assert (await src.conn.job_info("vm1")).phase == "perform3_done"
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted, match="canceled by client"):
        await task
    await wait_until(lambda: dst.daemon.registry.find_name("vm1") is None, timeout=30,
                     what="the incoming guest to be gone")
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    for host in (src, dst):
        assert not [d.name for d in host.daemon.registry if d.job is not None]


@pytest.mark.parametrize("delay", [0.0, 2.0], ids=["watched-at-once", "watched-later"])
async def test_an_abort_before_the_watch_opens_still_cancels_finish(
        backend_pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
    """The client watches the source's job for an abort only once Finish has run for
    ``ABORT_WATCH_DELAY``: an abort asked for before the watch opens is in its first message,
    and cancels Finish as one asked for after.  (A Finish that waits for ever.)"""
    src, dst = backend_pair
    await guest(src)
    monkeypatch.setattr(client_migrate, "ABORT_WATCH_DELAY", delay)
    finish_waiting = finish_waits_for_ever(dst, monkeypatch)
    events: list[str] = []
    real_stream = rpc.RpcConnection._stream

    def stream(self: rpc.RpcConnection, *args: object, **kwargs: object) -> object:
        events.append("watch")
        return real_stream(self, *args, **kwargs)

    monkeypatch.setattr(rpc.RpcConnection, "_stream", stream)
    task = migrate(src, dst)
    await finish_waiting.wait()
    if delay:
        assert events == []  # (Finish began a moment ago; the watch opens in 2 s)
    else:
        await wait_until(lambda: events == ["watch"], timeout=30, what="the watch")
    events.append("abort")
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted, match="canceled by client"):
        await task
    assert events == (["abort", "watch"] if delay else ["watch", "abort"])
    await wait_until(lambda: dst.daemon.registry.find_name("vm1") is None, timeout=30,
                     what="the incoming guest to be gone")
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_abort_twice_or_with_nothing_running(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    with pytest.raises(OperationInvalid, match="no job is active on the domain"):
        await src.conn.abort_job("vm1")
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 8}))
    await until_streaming(src)
    incoming = await dst.conn.job_info("vm1")
    assert incoming.operation is JobOperation.MIGRATION_IN
    with pytest.raises(OperationInvalid, match="cannot abort incoming migration"):
        await dst.conn.abort_job("vm1")
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await task
    await assert_rolled_back(src, dst)
    with pytest.raises(OperationInvalid, match="no job is active"):
        await src.conn.abort_job("vm1")
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_second_abort_is_refused_and_changes_nothing(backend_pair: tuple[Host, Host]) -> None:
    src, _dst = backend_pair
    await guest(src)
    source = RemoteSource(src.conn, True)
    flags = F.LIVE | F.CHANGE_PROTECTION
    await source.begin("vm1", TypedParams(), flags)  # the job waits in begin3
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationInvalid, match="already requested"):
        await src.conn.abort_job("vm1")
    info = await src.conn.job_info("vm1")
    assert info.phase == "begin3" and info.abort_requested
    await source.confirm("vm1", TypedParams(), b"", flags, True)
    assert (await src.conn.job_info("vm1")).type is JobType.NONE
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")


# --- steer -------------------------------------------------------------------------------


async def test_speed_and_downtime_settings(backend_pair: tuple[Host, Host]) -> None:
    src, _dst = backend_pair
    await src.conn.define(guest_xml(src))
    assert await src.conn.get_max_speed("vm1") == MAX_BANDWIDTH_MIB  # unlimited, as libvirt
    await src.conn.set_max_speed("vm1", 100)  # an inactive domain keeps it for later
    assert await src.conn.get_max_speed("vm1") == 100
    with pytest.raises(OperationInvalid, match="domain is not running"):
        await src.conn.set_max_downtime("vm1", 50)
    with pytest.raises(OperationInvalid, match="domain is not running"):
        await src.conn.get_max_speed("vm1", postcopy=True)
    with pytest.raises(InvalidArgument, match="bandwidth must be less than"):
        await src.conn.set_max_speed("vm1", 2**62)
    await src.conn.start("vm1")
    assert await src.conn.get_max_downtime("vm1") == 300
    await src.conn.set_max_downtime("vm1", 50)
    assert await src.conn.get_max_downtime("vm1") == 50
    with pytest.raises(InvalidArgument, match="Invalid downtime"):
        await src.conn.set_max_downtime("vm1", 0)


async def test_domain_speed_applies_to_the_next_migration(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    await src.conn.set_max_speed("vm1", 8)
    task = migrate(src, dst)
    info = await until_streaming(src)
    # 8 MiB/s cannot move 64 MiB in a moment; unthrottled it would be done already.
    assert info.data_processed < info.data_total / 2
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await task
    await assert_rolled_back(src, dst)


async def test_postcopy_switch_needs_the_flag_and_a_migration(
    backend_pair: tuple[Host, Host],
) -> None:
    src, dst = backend_pair
    await guest(src)
    with pytest.raises(OperationInvalid, match="only be started while outgoing migration"):
        await src.conn.start_postcopy("vm1")
    task = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 8}))
    await until_streaming(src)
    with pytest.raises(OperationInvalid, match="requires migration to be started with "
                                               "VIR_MIGRATE_POSTCOPY"):
        await src.conn.start_postcopy("vm1")
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await task
    await assert_rolled_back(src, dst)


# --- beyond libvirt ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[int]:
    """A peer that accepts the stream and then never reads or answers: a hung destination."""
    conns: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    sock: socket.socket = server.sockets[0]
    try:
        yield sock.getsockname()[1]
    finally:
        for w in conns:
            w.close()
        server.close()
        await server.wait_closed()


class BlackholeDest(RemoteDest):
    def __init__(self, dst: Host, port: int) -> None:
        super().__init__(dst.conn, True)
        self.port = port

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await super().prepare(params, cookie, flags)
        return cookie, f"tcp:127.0.0.1:{self.port}"


async def test_stall_watchdog_names_the_stall(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    async with blackhole() as port:
        with pytest.raises(OperationTimeout, match=r"migration stalled: no progress for \d+ s "
                                                  r"with \d+ bytes remaining"):
            await run_v3(RemoteSource(src.conn, True), BlackholeDest(dst, port), "vm1",
                         TypedParams.of({P.STALL_TIMEOUT: 1}), F.LIVE, protection=True)
    await assert_rolled_back(src, dst, job=JobType.FAILED)
    assert "stalled" in (await src.conn.job_info("vm1", completed=True)).error


async def test_stall_watchdog_from_daemon_config(tmp_path: Path, backend: str) -> None:
    async with hosts(tmp_path, backend, ("src", {"stall_timeout_s": 1.0}),
                     ("dst", {})) as (src, dst):
        await guest(src)
        async with blackhole() as port:
            with pytest.raises(OperationTimeout, match="migration stalled"):
                await run_v3(RemoteSource(src.conn, True), BlackholeDest(dst, port), "vm1",
                             TypedParams(), F.LIVE, protection=True)
        await assert_rolled_back(src, dst, job=JobType.FAILED)


async def test_completion_timeout_abort(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    params = TypedParams.of({P.BANDWIDTH: 4, P.COMPLETION_TIMEOUT: 2})  # 2 s/GiB: 0.125 s
    with pytest.raises(OperationTimeout, match="did not complete within"):
        await migrate(src, dst, F.LIVE, params)
    await assert_rolled_back(src, dst, job=JobType.FAILED)


async def test_completion_timeout_suspend_lets_it_finish(backend_pair: tuple[Host, Host]) -> None:
    """A guest dirtying faster than the link never converges live; suspended, it does."""
    src, dst = backend_pair
    await guest(src, dirty=64)
    params = TypedParams.of({P.BANDWIDTH: 32, P.COMPLETION_TIMEOUT: 8,
                             P.COMPLETION_TIMEOUT_ACTION: "suspend"})
    await migrate(src, dst, F.LIVE, params)
    await assert_migrated(src, dst)


async def test_completion_timeout_action_is_checked(backend_pair: tuple[Host, Host]) -> None:
    src, dst = backend_pair
    await guest(src)
    with pytest.raises(InvalidArgument,
                       match=r"'virtmig\.completion_timeout_action' must be one of"):
        await migrate(src, dst, F.LIVE, TypedParams.of({P.COMPLETION_TIMEOUT_ACTION: "explode"}))
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert not [d for d in src.daemon.registry if d.job is not None]
    assert not [d for d in dst.daemon.registry if d.job is not None]


async def test_concurrency_limits(tmp_path: Path, backend: str) -> None:
    async with hosts(tmp_path, backend, ("src", {"max_outgoing_migrations": 1}),
                     ("dst", {"max_incoming_migrations": 1}), ("other", {})) as (src, dst, other):
        await guest(src, "vm1")
        await guest(src, "vm2")
        await guest(other, "vm3")
        first = migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 8}))
        await until_streaming(src)
        with pytest.raises(ResourceExhausted,
                           match="too many outgoing migrations: 1 running, the limit "
                                 "max_outgoing_migrations is 1"):
            await migrate(src, other, name="vm2")
        with pytest.raises(ResourceExhausted, match="max_incoming_migrations is 1"):
            await migrate(other, dst, name="vm3")
        assert (await src.conn.state("vm2"))[0] is DomainState.RUNNING
        assert (await other.conn.state("vm3"))[0] is DomainState.RUNNING
        await src.conn.abort_job("vm1")
        with pytest.raises(OperationAborted):
            await first
        await migrate(src, other, name="vm2")  # the slot is free again
        await assert_migrated(src, other, "vm2")
