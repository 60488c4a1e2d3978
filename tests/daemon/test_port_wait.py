"""When every migration port is taken, a Prepare waits for one (issue 17): up to
``migration_port_wait`` seconds, served in arrival order, then RESOURCE_EXHAUSTED naming the range
as before; 0 fails at once.  A waiting Prepare holds no lock anyone needs, and an abort on the
destination or the end of its caller's session stops it, leaving nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import migrate, running_guest
from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon import core, migration
from virtmig.daemon.backend.base import GuestSpec, MigrationTuning, StreamAddress
from virtmig.proto.errors import (
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    PortsExhausted,
)
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import Host, free_port, hosts, session_pki, wait_until

F = MigrateFlags
P = MigrateParam


class HeldDest(RemoteDest):
    """Prepare goes through, then the migration stays between Prepare and Perform (holding its
    port) until ``go`` is set."""

    def __init__(self, dst: Host) -> None:
        super().__init__(dst.conn, True)
        self.prepared = asyncio.Event()
        self.go = asyncio.Event()

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        out = await super().prepare(params, cookie, flags)
        self.prepared.set()
        await self.go.wait()
        return out


async def one_port_pair(tmp_path: Path, wait: float) -> AsyncIterator[tuple[Host, Host, int]]:
    port = free_port()
    async with hosts(tmp_path, "test", ("src", {}), (
            "dst", {"migration_port_min": port, "migration_port_max": port,
                    "migration_port_wait": wait})) as (src, dst):
        for name in ("vm1", "vm2"):
            await running_guest(src, name)
        yield src, dst, port


@pytest.fixture
async def waiting(tmp_path: Path) -> AsyncIterator[tuple[Host, Host, int]]:
    async for pair in one_port_pair(tmp_path, 30):
        yield pair


def waiting_job(dst: Host, name: str) -> bool:
    dom = dst.daemon.registry.find_name(name)
    return dom is not None and dom.job is not None and dom.job.waiting_port


async def hold_first(src: Host, dst: Host) -> tuple[HeldDest, asyncio.Task[str]]:
    """vm1's migration, held after its Prepare took the one port."""
    held = HeldDest(dst)
    first = asyncio.ensure_future(run_v3(RemoteSource(src.conn, True), held, "vm1",
                                         TypedParams(), int(F.LIVE), protection=True))
    await asyncio.wait_for(held.prepared.wait(), 30)
    return held, first


@contextlib.asynccontextmanager
async def waiting_in_a_session(
        src: Host, dst: Host) -> AsyncIterator[tuple[AsyncConnection, asyncio.Future[object]]]:
    """vm2's Prepare, owned by a session held on another connection (so that ending the
    session leaves the Prepare call itself open), once it waits for a port: that session's
    connection and the Prepare's future; both connections are closed at the end."""
    caller = await AsyncConnection.open(dst.uri, pki_dir=session_pki().client())
    session = await AsyncConnection.open(dst.uri, pki_dir=session_pki().client())
    try:
        caller._session = await session.open_session()
        xml, cookie = await RemoteSource(src.conn, True).begin("vm2", TypedParams(), F.LIVE)
        second: asyncio.Future[object] = asyncio.ensure_future(RemoteDest(caller, True).prepare(
            TypedParams.of({P.DEST_XML: xml}), cookie, int(F.LIVE)))
        await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30,
                         what="vm2's Prepare waiting for a port")
        yield session, second
    finally:
        await session.close()
        await caller.close()


async def test_second_migration_waits_for_the_port_then_completes(
        waiting: tuple[Host, Host, int]) -> None:
    src, dst, port = waiting
    held, first = await hold_first(src, dst)
    assert dst.daemon.ports._used == {port}
    second = asyncio.ensure_future(migrate(src, dst, name="vm2"))
    await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30,
                     what="vm2's Prepare waiting for a port")
    # It holds no lock meanwhile, and shows as vm2's job in phase prepare.
    vm2 = dst.daemon.registry.by_name("vm2")
    assert not vm2.lock.locked() and not dst.daemon.registry.by_name("vm1").lock.locked()
    assert (await dst.conn.job_info("vm2")).phase == "prepare"
    assert not second.done()
    held.go.set()
    assert await asyncio.wait_for(first, 60) == "vm1"
    assert await asyncio.wait_for(second, 60) == "vm2"
    for name in ("vm1", "vm2"):
        assert (await dst.conn.state(name))[0] is DomainState.RUNNING
    assert not dst.daemon.ports._used and not dst.daemon.ports._waiters


async def test_without_a_wait_the_second_prepare_fails_at_once(tmp_path: Path) -> None:
    async for src, dst, port in one_port_pair(tmp_path, 0):
        held, first = await hold_first(src, dst)
        with pytest.raises(PortsExhausted) as err:
            await migrate(src, dst, name="vm2")
        assert str(err.value) == (
            f"internal error: Unable to find an unused port in range 'migration' ({port}-{port})")
        held.go.set()
        assert await asyncio.wait_for(first, 60) == "vm1"
        assert (await src.conn.state("vm2"))[0] is DomainState.RUNNING
        assert dst.daemon.registry.find_name("vm2") is None


async def test_a_wait_that_times_out_fails_naming_the_range(tmp_path: Path) -> None:
    async for src, dst, port in one_port_pair(tmp_path, 0.3):
        held, first = await hold_first(src, dst)
        with pytest.raises(PortsExhausted) as err:
            await migrate(src, dst, name="vm2")
        assert str(err.value) == (
            f"internal error: Unable to find an unused port in range 'migration' ({port}-{port}) "
            "after waiting 0.3 s (migration_port_wait)")
        assert dst.daemon.registry.find_name("vm2") is None  # rolled back
        assert (await src.conn.state("vm2"))[0] is DomainState.RUNNING
        held.go.set()
        assert await asyncio.wait_for(first, 60) == "vm1"
        assert not dst.daemon.ports._used and not dst.daemon.ports._waiters


async def test_an_abort_on_the_destination_stops_the_wait(
        waiting: tuple[Host, Host, int]) -> None:
    src, dst, port = waiting
    held, first = await hold_first(src, dst)
    second = asyncio.ensure_future(migrate(src, dst, name="vm2"))
    await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30,
                     what="vm2's Prepare waiting for a port")
    await dst.conn.abort_job("vm2")
    with pytest.raises(OperationAborted) as err:
        await asyncio.wait_for(second, 30)
    assert str(err.value) == ("operation aborted: job 'migration in' canceled by client while "
                              "waiting for a migration port")
    assert dst.daemon.registry.find_name("vm2") is None
    assert (await src.conn.state("vm2"))[0] is DomainState.RUNNING
    assert dst.daemon.ports._used == {port} and not dst.daemon.ports._waiters
    held.go.set()
    assert await asyncio.wait_for(first, 60) == "vm1"
    assert not dst.daemon.ports._used


async def test_the_end_of_the_callers_session_stops_the_wait(
        waiting: tuple[Host, Host, int]) -> None:
    """The session that owns the waiting Prepare ends (on another connection, so that the
    Prepare call itself stays open): the wait ends at once, with the session's error."""
    src, dst, port = waiting
    held, first = await hold_first(src, dst)
    async with waiting_in_a_session(src, dst) as (session, second):
        await session.close()
        with pytest.raises(OperationFailed, match="migration caller went away"):
            await asyncio.wait_for(second, 30)
    assert dst.daemon.registry.find_name("vm2") is None
    assert dst.daemon.ports._used == {port} and not dst.daemon.ports._waiters
    held.go.set()
    assert await asyncio.wait_for(first, 60) == "vm1"
    assert not dst.daemon.ports._used


async def test_a_released_port_goes_to_the_longest_waiter(
        waiting: tuple[Host, Host, int]) -> None:
    """Two waiting Prepares: the one that came first gets the port released first, while the
    other keeps waiting (the allocator hands the port over; no one can take it in between)."""
    src, dst, _port = waiting
    await running_guest(src, "vm3")
    held, first = await hold_first(src, dst)
    second = asyncio.ensure_future(migrate(src, dst, name="vm2"))
    await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30, what="vm2 waiting")
    third = asyncio.ensure_future(migrate(src, dst, name="vm3"))
    await wait_until(lambda: waiting_job(dst, "vm3"), timeout=30, what="vm3 waiting")
    held.go.set()
    assert await asyncio.wait_for(first, 60) == "vm1"
    assert await asyncio.wait_for(second, 60) == "vm2"
    assert await asyncio.wait_for(third, 60) == "vm3"
    assert [d.name for d in await dst.conn.list_domains()] == ["vm1", "vm2", "vm3"]


async def test_an_abort_on_the_source_stops_a_peer_to_peer_wait(
        waiting: tuple[Host, Host, int]) -> None:
    """Peer-to-peer: the source daemon runs the sequence; an abort of its job while the
    destination's Prepare waits cancels that Prepare (the destination rolls back at once)."""
    src, dst, port = waiting
    held, first = await hold_first(src, dst)
    second = asyncio.ensure_future(src.conn.migrate_to_uri3(
        "vm2", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER))
    await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30,
                     what="vm2's Prepare waiting for a port")
    await src.conn.abort_job("vm2")
    with pytest.raises(OperationAborted, match="canceled by client"):
        await asyncio.wait_for(second, 30)
    await wait_until(lambda: dst.daemon.registry.find_name("vm2") is None, timeout=30,
                     what="the destination to roll vm2 back")
    assert (await src.conn.state("vm2"))[0] is DomainState.RUNNING
    assert dst.daemon.ports._used == {port} and not dst.daemon.ports._waiters
    held.go.set()
    assert await asyncio.wait_for(first, 60) == "vm1"
    assert not dst.daemon.ports._used


async def test_a_prepare_that_waited_is_rolled_back_when_its_session_ends(
        waiting: tuple[Host, Host, int]) -> None:
    """Once its port came, a Prepare that waited is an ordinary incoming job: when its caller's
    session ends, it is rolled back at once (not left for the reaper as if still waiting)."""
    src, dst, port = waiting
    held, first = await hold_first(src, dst)
    async with waiting_in_a_session(src, dst) as (session, second):
        held.go.set()
        assert await asyncio.wait_for(first, 60) == "vm1"
        await asyncio.wait_for(second, 30)  # it got the port and went through
        assert dst.daemon.ports._used == {port}
        await session.close()
        await wait_until(lambda: dst.daemon.registry.find_name("vm2") is None, timeout=30,
                         what="vm2's incoming job to be rolled back")
    assert not dst.daemon.ports._used and not dst.daemon.ports._waiters


async def test_a_port_another_process_holds_goes_to_no_waiter(
        waiting: tuple[Host, Host, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """vm1's Prepare finds its port bound by another process (EADDRINUSE) while vm2 waits: the
    port is dropped without waking vm2 (of no use to it either), vm1 fails naming the range, and
    vm2 is never handed anything outside the range."""
    src, dst, port = waiting
    backend = dst.daemon.backend
    real_start = backend.incoming_start
    asked: list[int] = []

    async def start(spec: GuestSpec, listen: StreamAddress,
                    tuning: MigrationTuning | None = None) -> int:
        asked.append(listen.port)
        if spec.name == "vm1":
            await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30, what="vm2 waiting")
            raise OSError(errno.EADDRINUSE, "Address already in use")
        return await real_start(spec, listen, tuning)

    monkeypatch.setattr(backend, "incoming_start", start)
    first = asyncio.ensure_future(migrate(src, dst, name="vm1"))
    await wait_until(lambda: dst.daemon.registry.find_name("vm1") is not None, timeout=30,
                     what="vm1's Prepare")
    second = asyncio.ensure_future(migrate(src, dst, name="vm2"))
    with pytest.raises(PortsExhausted):
        await asyncio.wait_for(first, 30)
    assert waiting_job(dst, "vm2") and not second.done()
    await dst.conn.abort_job("vm2")
    with pytest.raises(OperationAborted, match="while waiting for a migration port"):
        await asyncio.wait_for(second, 30)
    assert asked == [port]
    assert not dst.daemon.ports._used and not dst.daemon.ports._waiters


async def test_a_prepare_waiting_for_a_port_is_a_call_in_progress(
        waiting: tuple[Host, Host, int]) -> None:
    """Waiting (without the domain's lock), Prepare still holds its job busy: a Finish for the
    same guest meanwhile is refused as a call in another's way."""
    src, dst, _port = waiting
    held, first = await hold_first(src, dst)
    second = asyncio.ensure_future(migrate(src, dst, name="vm2"))
    await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30,
                     what="vm2's Prepare waiting for a port")
    with pytest.raises(OperationInvalid) as err:
        await migration.dst_finish(dst.daemon, TypedParams.of({P.DEST_NAME: "vm2"}), b"",
                                   int(F.LIVE), False)
    assert str(err.value) == ("Requested operation is not valid: domain 'vm2' incoming "
                              "migration is busy in another call")
    assert waiting_job(dst, "vm2")
    await dst.conn.abort_job("vm2")
    with pytest.raises(OperationAborted):
        await asyncio.wait_for(second, 30)
    held.go.set()
    assert await asyncio.wait_for(first, 60) == "vm1"


def test_a_port_bound_elsewhere_is_passed_over_a_while() -> None:
    """``drop`` (another process has the port bound): freed (nobody here holds it:
    ``candidates``), passed over by the look-up of a port to take for ELSEWHERE_S seconds, then
    taken again; a release (the port was bound here) ends it at once."""
    now = [1000.0]
    ports = core.PortAllocator(100, 102, clock=lambda: now[0])
    ports.take(100)
    ports.drop(100)
    assert ports.free_after(ports.lo - 1) == 101 and ports.candidates() == [100, 101, 102]
    now[0] += core.ELSEWHERE_S - 1
    assert ports.free_after(ports.lo - 1) == 101
    now[0] += 1
    assert ports.free_after(ports.lo - 1) == 100 and ports.candidates() == [100, 101, 102]
    ports.take(100)
    ports.take(101)
    ports.drop(101)
    assert ports.free_after(ports.lo - 1) == 102
    ports.take(101)  # a waiter's port, bound by its migration, then released
    ports.release(101)
    assert ports.free_after(ports.lo - 1) == 101


def two_free_ports() -> int:
    """The lower of two adjacent loopback ports that nothing has bound."""
    for _ in range(50):
        lo = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", lo + 1))
            except OSError:
                continue
        return lo
    raise AssertionError("no two adjacent free ports in 50 tries")


@contextlib.asynccontextmanager
async def two_ports(tmp_path: Path,
                    lo: int) -> AsyncIterator[tuple[Host, Host, list[tuple[str, int]]]]:
    """A source running vm1 and vm2, a destination with the migration ports ``lo`` and ``lo +
    1`` on loopback (waits allowed), and the (guest, port) of every incoming start the
    destination's backend is asked for, in order."""
    async with hosts(tmp_path, "test", ("src", {}), (
            "dst", {"migration_port_min": lo, "migration_port_max": lo + 1,
                    "migration_port_wait": 30, "migration_address": "127.0.0.1"})) as (
            src, dst):
        for name in ("vm1", "vm2"):
            await running_guest(src, name)
        backend = dst.daemon.backend
        real_start = backend.incoming_start
        asked: list[tuple[str, int]] = []

        async def start(spec: GuestSpec, listen: StreamAddress,
                        tuning: MigrationTuning | None = None) -> int:
            asked.append((spec.name, listen.port))
            return await real_start(spec, listen, tuning)

        backend.incoming_start = start  # type: ignore[method-assign]
        yield src, dst, asked


async def test_a_port_another_process_holds_does_not_fail_the_prepares_after(
        tmp_path: Path) -> None:
    """Two ports; another process holds the first (a listening socket).  vm1's Prepare tries
    it, moves on to the second and is held there; vm2's Prepare, meanwhile, must not be handed
    the first port again (it failed, naming the range: the cascade that failed 264 of 400
    migrations in one bench run) but waits for vm1's port, and both migrations go through."""
    busy = two_free_ports()
    with socket.socket() as elsewhere:
        elsewhere.bind(("127.0.0.1", busy))
        elsewhere.listen()
        async with two_ports(tmp_path, busy) as (src, dst, asked):
            held, first = await hold_first(src, dst)
            second = asyncio.ensure_future(migrate(src, dst, name="vm2"))
            await wait_until(lambda: waiting_job(dst, "vm2"), timeout=30,
                             what="vm2's Prepare waiting for vm1's port")
            held.go.set()
            assert await asyncio.wait_for(first, 60) == "vm1"
            await asyncio.wait_for(second, 60)
            assert asked == [("vm1", busy), ("vm1", busy + 1), ("vm2", busy + 1)]
            for name in ("vm1", "vm2"):
                assert (await dst.conn.state(name))[0] is DomainState.RUNNING


async def test_a_port_found_bound_elsewhere_waits_for_one_held_here(tmp_path: Path) -> None:
    """Two ports: vm1's migration holds the first, then another process binds the second.
    vm2's Prepare is handed the second, finds it bound and, every other port being held by a
    migration here, waits for vm1's (without the domain's lock) instead of failing at once
    naming the range (as it did before); both migrations go through."""
    lo = two_free_ports()
    async with two_ports(tmp_path, lo) as (src, dst, asked):
        held, first = await hold_first(src, dst)
        with socket.socket() as elsewhere:
            elsewhere.bind(("127.0.0.1", lo + 1))
            elsewhere.listen()
            second = asyncio.ensure_future(migrate(src, dst, name="vm2"))
            await wait_until(lambda: waiting_job(dst, "vm2") or second.done(), timeout=30,
                             what="vm2's Prepare waiting for vm1's port")
            assert not second.done(), second.exception()
            vm2 = dst.daemon.registry.find_name("vm2")
            assert vm2 is not None and not vm2.lock.locked()
            held.go.set()
            assert await asyncio.wait_for(first, 60) == "vm1"
            await asyncio.wait_for(second, 60)
        assert asked == [("vm1", lo), ("vm2", lo + 1), ("vm2", lo)]
        for name in ("vm1", "vm2"):
            assert (await dst.conn.state(name))[0] is DomainState.RUNNING
        assert not dst.daemon.ports._used and not dst.daemon.ports._waiters
