"""Behaviours a mutation check found unguarded, each pinned by a test that breaks with it.

* PERSIST_DEST: the destination keeps a real persistent definition (file, destroy, restart;
  PERSIST_XML's content or the source's persistent one), and without the flag it keeps none.
* Read-only calls answer while the destination's Finish holds the domain's lock and job.
* The completion-timeout action really taken: abort, suspend and post-copy each leave what only
  that action leaves (states with reasons, lifecycle events, the job's end).
* A DEST_XML that changes the guest's ABI (vCPUs, machine type) is refused through the daemons,
  and nothing changes on either side.

All on the ``test`` backend; ``test_failure_matrix_qemu`` runs failure-matrix rows on QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import Host, domain_xml, hosts, start_host, stop_host, teardown_hosts
from virtmig.client.connection import AsyncConnection, Event
from virtmig.client.migrate import migrate3
from virtmig.client.sequence import Trace
from virtmig.daemon.backend.base import GuestRunState
from virtmig.proto.errors import ConfigUnsupported, NoDomain, OperationTimeout
from virtmig.proto.flags import MAX_BANDWIDTH_MIB, DomainState, JobOperation, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import WaitTimeout, wait_until

F = MigrateFlags
P = MigrateParam
T = TypeVar("T")

READ_DEADLINE_S = 5.0  # generous under load; a call that waits behind the lock never answers


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        yield src, dst


async def until(check: Callable[[], Awaitable[T | None]], what: str,
                timeout: float = 10.0) -> T:
    """Poll ``check`` until it returns a value; fail after ``timeout``."""
    return await wait_until(check, timeout=timeout, what=what)


async def running_guest(host: Host, name: str = "vm1") -> str:
    """Define and start a guest (64 MiB, idle); returns its uuid."""
    dom = await host.conn.define(domain_xml(name))
    await host.conn.start(name)
    return dom.uuid


def migrate(src: Host, dst: Host, flags: int, params: TypedParams | None = None,
            trace: Trace | None = None) -> asyncio.Task[object]:
    return asyncio.ensure_future(
        migrate3(src.conn, "vm1", dst.conn, params or TypedParams(), flags, trace=trace))


async def no_jobs(*hosts_: Host) -> None:
    for host in hosts_:
        assert not [d.name for d in host.daemon.registry if d.job is not None]


# --- PERSIST_DEST ------------------------------------------------------------------------------


def definition_files(host: Host) -> list[str]:
    return sorted(p.name for p in (host.state_dir / "domains").glob("*.xml"))


async def restarted(tmp_path: Path, host: Host) -> Host:
    """The same daemon (same state dir and settings), stopped and started again."""
    await stop_host(host)
    return await start_host(tmp_path, host.state_dir.name)


async def test_persist_dest_definition_is_real_and_outlives_the_guest(tmp_path: Path) -> None:
    """Without PERSIST_XML the destination keeps the source's *persistent* definition (here
    redefined with 2 vCPUs while the guest runs with 1), on disk; it outlives a destroy and a
    daemon restart."""
    src, dst = await start_host(tmp_path, "src"), await start_host(tmp_path, "dst")
    try:
        uuid = await running_guest(src)
        await src.conn.define(domain_xml("vm1", uuid=uuid).replace("<vcpu>1</vcpu>",
                                                                   "<vcpu>2</vcpu>"))
        await migrate(src, dst, F.LIVE | F.PERSIST_DEST)
        dom = await dst.conn.lookup("vm1")
        assert dom.persistent and dom.uuid == uuid
        assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
        assert definition_files(dst) == [f"{uuid}.xml"]
        assert "<vcpu>2</vcpu>" in (dst.state_dir / "domains" / f"{uuid}.xml").read_text()
        assert "<vcpu>2</vcpu>" in await dst.conn.xml_desc("vm1", inactive=True)
        assert (await dst.conn.info("vm1")).vcpus == 1  # the running guest is the one that left
        await dst.conn.destroy("vm1")
        assert await dst.conn.state("vm1") == (DomainState.SHUTOFF, 2, "destroyed")
        assert (await dst.conn.info("vm1")).vcpus == 2
        dst = await restarted(tmp_path, dst)
        again = await dst.conn.lookup("vm1")
        assert again.persistent and again.uuid == uuid and again.state is DomainState.SHUTOFF
        assert "<vcpu>2</vcpu>" in await dst.conn.xml_desc("vm1")
    finally:
        await teardown_hosts(tmp_path, src, dst)


async def test_persist_xml_is_the_definition_kept(tmp_path: Path) -> None:
    src, dst = await start_host(tmp_path, "src"), await start_host(tmp_path, "dst")
    try:
        uuid = await running_guest(src)
        pxml = domain_xml("vm1", 128, uuid=uuid).replace("<vcpu>1</vcpu>", "<vcpu>4</vcpu>")
        await migrate(src, dst, F.LIVE | F.PERSIST_DEST, TypedParams.of({P.PERSIST_XML: pxml}))
        assert definition_files(dst) == [f"{uuid}.xml"]
        on_disk = (dst.state_dir / "domains" / f"{uuid}.xml").read_text()
        assert "<vcpu>4</vcpu>" in on_disk
        assert (await dst.conn.info("vm1")).max_memory_kib == 64 * 1024  # live: what left
        await dst.conn.destroy("vm1")
        info = await dst.conn.info("vm1")
        assert (info.vcpus, info.max_memory_kib) == (4, 128 * 1024)
        dst = await restarted(tmp_path, dst)
        assert (await dst.conn.info("vm1")).vcpus == 4
        # the source keeps its own definition (no UNDEFINE_SOURCE)
        assert (await src.conn.lookup("vm1")).persistent
        assert "<vcpu>1</vcpu>" in await src.conn.xml_desc("vm1", inactive=True)
    finally:
        await teardown_hosts(tmp_path, src, dst)


async def test_without_persist_dest_nothing_is_defined(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await migrate(src, dst, F.LIVE)
    assert not (await dst.conn.lookup("vm1")).persistent
    assert definition_files(dst) == []
    assert [d.name for d in await dst.conn.list_domains(active=False, inactive=True)] == []
    await dst.conn.destroy("vm1")
    with pytest.raises(NoDomain):  # transient: gone with its guest
        await dst.conn.lookup("vm1")
    assert definition_files(dst) == []


# --- read-only calls while the destination's Finish holds the domain ---------------------------


async def within(call: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(call, READ_DEADLINE_S)
    except TimeoutError:
        pytest.fail(f"a read-only call did not answer within {READ_DEADLINE_S} s: {call}")


async def test_read_only_calls_answer_while_finish_holds_the_domain(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = pair
    uuid = await running_guest(src)
    in_finish, release = asyncio.Event(), asyncio.Event()
    backend = dst.daemon.backend
    real_wait = backend.incoming_wait

    async def held_wait(uuid: str) -> object:
        in_finish.set()
        await release.wait()  # Finish holds the domain's lock and job meanwhile
        return await real_wait(uuid)

    monkeypatch.setattr(backend, "incoming_wait", held_wait)
    task = migrate(src, dst, F.LIVE)
    try:
        await asyncio.wait_for(in_finish.wait(), 30)
        held = dst.daemon.registry.by_name("vm1")
        assert held.lock.locked() and held.job is not None  # the premise of this test
        await read_everything(dst.conn, uuid)
        await read_everything(src.conn, uuid)  # the source waits in perform3_done meanwhile
    finally:
        release.set()
    await asyncio.wait_for(task, 30)
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    await no_jobs(src, dst)


async def read_everything(conn: AsyncConnection, uuid: str) -> None:
    """Every read-only call, each within a short deadline."""
    assert [d.name for d in await within(conn.list_domains())] == ["vm1"]
    assert (await within(conn.list_domains(active=False, inactive=True))) == []
    assert (await within(conn.lookup("vm1"))).uuid == uuid
    assert (await within(conn.lookup(uuid))).name == "vm1"
    state = await within(conn.state("vm1"))
    assert state == (DomainState.PAUSED, 2, "migration")
    info = await within(conn.info("vm1"))
    assert (info.domain.name, info.max_memory_kib, info.vcpus) == ("vm1", 64 * 1024, 1)
    for inactive, migratable in ((False, False), (True, False), (False, True)):
        xml = await within(conn.xml_desc("vm1", inactive=inactive, migratable=migratable))
        assert "<name>vm1</name>" in xml
    job = await within(conn.job_info("vm1"))
    assert job.type is JobType.UNBOUNDED
    assert (job.operation, job.phase) in ((JobOperation.MIGRATION_IN, "finish3"),
                                          (JobOperation.MIGRATION_OUT, "perform3_done"))
    assert (await within(conn.job_info("vm1", completed=True))).type is JobType.NONE
    watch = conn.watch_job("vm1")
    first = await within(watch.__anext__())
    await watch.aclose()  # type: ignore[attr-defined]
    assert first.phase == job.phase
    assert await within(conn.get_max_downtime("vm1")) == 300
    assert await within(conn.get_max_speed("vm1")) == MAX_BANDWIDTH_MIB  # unlimited
    assert (await within(conn.host(refresh=True))).active_domains == 1


# --- the completion-timeout action really taken ------------------------------------------------


class EventLog:
    """Every event one daemon publishes, read from its Events stream in the background."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.events: list[Event] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventLog:
        self._task = asyncio.ensure_future(self._read())
        # Subscribed once a change made now is seen: a throwaway definition, then its removal
        # (again until one is seen: the stream may not have reached the daemon yet).
        async def probed() -> bool:
            await self.conn.define(domain_xml("probe"))
            await self.conn.undefine("probe")
            with contextlib.suppress(WaitTimeout):
                await wait_until(lambda: self.events, timeout=0.1, what="an event")
            return any(e.domain_name == "probe" for e in self.events)

        await wait_until(probed, timeout=10, what="the Events stream to start")
        await self.until("probe", "Undefined Removed")
        self.events.clear()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _read(self) -> None:
        async for event in self.conn.events():
            self.events.append(event)

    def lifecycle(self, name: str = "vm1") -> list[str]:
        return [e.description for e in self.events
                if e.kind == "lifecycle" and e.domain_name == name]

    async def until(self, name: str, what: str) -> None:
        """Wait for an event of ``name``: a lifecycle description, or a kind ("job-failed")."""
        async def seen() -> bool | None:
            return True if any(e.domain_name == name and what in (e.kind, e.description)
                               for e in self.events) else None

        await until(seen, f"event {what!r} of {name}")


TIMEOUT_FLAGS = F.LIVE | F.POSTCOPY  # each action is possible, so each one can be told apart


def timeout_params(action: str) -> TypedParams:
    """4 MiB/s for 64 MiB: the first pass alone takes 16 s; 2 s per GiB: due after 0.125 s."""
    return TypedParams.of({P.BANDWIDTH: 4, P.COMPLETION_TIMEOUT: 2,
                           P.COMPLETION_TIMEOUT_ACTION: action})


async def test_completion_timeout_abort_keeps_the_guest_home(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    async with EventLog(src.conn) as src_log:
        await running_guest(src)
        with pytest.raises(OperationTimeout, match=r"did not complete within \d+ s "
                                                   r"\(completion timeout\)"):
            await asyncio.wait_for(migrate(src, dst, TIMEOUT_FLAGS, timeout_params("abort")), 30)
        await src_log.until("vm1", "job-failed")
    # Never stopped by the migration: as it was (libvirt).
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
    failed = await src.conn.job_info("vm1", completed=True)
    assert failed.type is JobType.FAILED and "completion timeout" in failed.error
    assert 0 < failed.data_processed < failed.data_total
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    await no_jobs(src, dst)
    assert not [e for e in src_log.lifecycle() if e.startswith("Suspended")]  # never paused


async def test_completion_timeout_suspend_finishes_it_paused(pair: tuple[Host, Host]) -> None:
    """libvirt's --timeout-suspend: the source is suspended mid-stream (paused, reason
    migration, event Suspended Migrated) and the migration finishes non-live; the guest was
    running when it started, so the destination runs it."""
    src, dst = pair
    async with EventLog(src.conn) as src_log, EventLog(dst.conn) as dst_log:
        uuid = await running_guest(src)
        task = migrate(src, dst, TIMEOUT_FLAGS, timeout_params("suspend"))

        async def paused_mid_stream() -> bool | None:
            # (the state first: Perform's own pause and its phase change happen together)
            state = await src.conn.state("vm1")
            job = await src.conn.job_info("vm1")
            guest = src.daemon.backend.state(uuid)  # the guest itself, not only its record
            if (state == (DomainState.PAUSED, 2, "migration") and job.phase == "perform3"
                    and guest is GuestRunState.PAUSED):
                return True
            assert not task.done(), "the migration ended without a pause in mid-stream"
            return None

        try:
            await until(paused_mid_stream, "the source paused while it streams")
        finally:
            await src.conn.set_max_speed("vm1", 0)  # then let it finish at once
        await asyncio.wait_for(task, 30)
        await dst_log.until("vm1", "job-completed")
        await src_log.until("vm1", "Stopped Migrated")
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert src_log.lifecycle() == ["Defined Added", "Started Booted", "Suspended Migrated",
                                   "Stopped Migrated"]
    assert dst_log.lifecycle() == ["Started Migrated", "Resumed Migrated"]  # no post-copy
    for host in (src, dst):
        assert (await host.conn.job_info("vm1", completed=True)).type is JobType.COMPLETED
    await no_jobs(src, dst)


async def test_completion_timeout_postcopy_switches(pair: tuple[Host, Host]) -> None:
    """The post-copy action: the source is paused for post-copy, the destination resumes in
    post-copy (libvirt's Suspended/Resumed Post-copy events), and then runs as migrated."""
    src, dst = pair
    async with EventLog(src.conn) as src_log, EventLog(dst.conn) as dst_log:
        await running_guest(src)
        await asyncio.wait_for(migrate(src, dst, TIMEOUT_FLAGS, timeout_params("postcopy")), 30)
        await dst_log.until("vm1", "job-completed")
        await src_log.until("vm1", "Stopped Migrated")
    assert src_log.lifecycle() == ["Defined Added", "Started Booted", "Suspended Post-copy",
                                   "Stopped Migrated"]
    assert dst_log.lifecycle() == ["Started Migrated", "Resumed Post-copy"]
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    for host in (src, dst):
        assert (await host.conn.job_info("vm1", completed=True)).type is JobType.COMPLETED
    await no_jobs(src, dst)


# --- DEST_XML that changes the guest's ABI -----------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("<vcpu>1</vcpu>", "<vcpu>2</vcpu>", "Target domain vCPU max 2 does not match source 1"),
        ("machine='pc'", "machine='q35'",
         "Target domain machine type q35 does not match source pc"),
    ],
    ids=["vcpus", "machine"],
)
async def test_dest_xml_abi_change_is_refused_through_the_daemons(
    pair: tuple[Host, Host], old: str, new: str, message: str
) -> None:
    src, dst = pair
    uuid = await running_guest(src)
    before = await src.conn.xml_desc("vm1")
    bad = domain_xml("vm1", uuid=uuid).replace(old, new)
    assert bad != domain_xml("vm1", uuid=uuid)
    trace = Trace()
    with pytest.raises(ConfigUnsupported, match=message):
        await migrate(src, dst, F.LIVE, TypedParams.of({P.DEST_XML: bad}), trace)
    assert trace.calls == ["begin"]
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")  # never touched
    assert await src.conn.xml_desc("vm1") == before
    assert (await src.conn.job_info("vm1")).type is JobType.NONE
    assert (await src.conn.job_info("vm1", completed=True)).type is JobType.NONE
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    assert await dst.conn.list_domains(active=True, inactive=True) == []
    assert definition_files(dst) == [] and not dst.daemon.ports._used
    await no_jobs(src, dst)
