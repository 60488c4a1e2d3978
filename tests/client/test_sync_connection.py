"""The synchronous ``Connection``, end to end against real daemons (``test`` backend).

The daemons serve on the test's event loop, so each scenario is a plain function run in a worker
thread (``in_thread``) with blocking ``Connection`` calls, as a script would make them; a
migration runs on a second worker thread while the scenario watches and steers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from tests.conftest import Host, domain_xml
from virtmig.client import AsyncConnection, Connection, Domain, DomainKey, Event
from virtmig.proto.errors import InvalidArgument, NoDomain, OperationAborted
from virtmig.proto.flags import MAX_BANDWIDTH_MIB, DomainState, JobOperation, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import wait_until_sync

F = MigrateFlags
P = MigrateParam

# ref returns a protobuf DomainRef for the migration drivers: wire level, not part of the facade;
# open_dialed takes a channel dialed in the caller's event loop (the facade's runs on its thread).
NOT_IN_FACADE = {"ref", "open_dialed"}
# Parameters the facade does not take: its host() always asks the daemon; it opens with defaults.
NOT_IN_FACADE_PARAMS = {"host": {"refresh", "timeout"}, "open": {"connect_timeout"}}


async def in_thread(pair: tuple[Host, Host],
                    body: Callable[[Connection, Connection], None]) -> None:
    """``body(src, dst)`` with a ``Connection`` to each daemon, off the daemons' loop."""
    src, dst = pair

    def run() -> None:
        with Connection(src.uri) as s, Connection(dst.uri) as d:
            body(s, d)

    await asyncio.to_thread(run)


@contextlib.contextmanager
def migrating(s: Connection, d: Connection, params: TypedParams,
              flags: int = F.LIVE) -> Iterator[Future[Domain]]:
    """``s.migrate3`` of vm1 to ``d`` on a second thread, once it streams."""
    with ThreadPoolExecutor(1) as pool:
        migration = pool.submit(s.migrate3, "vm1", d, params, flags)
        until_streaming(s, migration)
        yield migration


def until_streaming(conn: Connection, migration: Future[Domain]) -> None:
    def streaming() -> bool:
        if migration.done():
            migration.result()  # its error, if it failed
            pytest.fail("the migration ended before it was seen streaming")
        with contextlib.suppress(NoDomain):
            info = conn.job_info("vm1")
            return info.phase == "perform3" and info.data_processed > 0
        return False

    wait_until_sync(streaming, timeout=20, what="the migration to stream")


def eventually(condition: Callable[[], bool], what: str) -> None:
    wait_until_sync(condition, timeout=10, what=what)


def guest(conn: Connection, dirty_rate_mib: int = 0) -> None:
    conn.define(domain_xml("vm1", 64, dirty_rate_mib=dirty_rate_mib))
    conn.start("vm1")


def test_every_async_method_has_a_sync_twin() -> None:
    """A method added only to ``AsyncConnection`` fails here until ``Connection`` has it too."""
    methods = {name: f for name, f in inspect.getmembers(AsyncConnection)
               if not name.startswith("_")
               and (inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f))}
    assert {"job_info", "watch_job", "events", "abort_job", "migrate3"} <= set(methods)
    for name in sorted(set(methods) - NOT_IN_FACADE):
        twin = getattr(Connection, name, None)
        assert callable(twin), f"Connection lacks {name}"
        assert not (inspect.iscoroutinefunction(twin) or inspect.isasyncgenfunction(twin))
        params = set(inspect.signature(methods[name]).parameters) - {"self", "cls"}
        params -= NOT_IN_FACADE_PARAMS.get(name, set())
        assert params == set(inspect.signature(twin).parameters) - {"self", "cls"}, name


async def test_job_info_during_and_after_a_migration(pair: tuple[Host, Host]) -> None:
    def body(s: Connection, d: Connection) -> None:
        guest(s)
        assert s.job_info("vm1").type is JobType.NONE
        with migrating(s, d, TypedParams.of({P.BANDWIDTH: 32})) as migration:
            info = s.job_info("vm1")
            assert info.type is JobType.UNBOUNDED
            assert info.operation is JobOperation.MIGRATION_OUT
            assert info.data_total >= 64 << 20 and info.stat("memory_bps") is not None
            assert d.job_info("vm1").operation is JobOperation.MIGRATION_IN
            dom = migration.result(timeout=30)
        assert (dom.name, dom.state) == ("vm1", DomainState.RUNNING)
        assert s.state("vm1")[0] is DomainState.SHUTOFF
        assert s.job_info("vm1").type is JobType.NONE
        done = s.job_info("vm1", completed=True)
        assert done.type is JobType.COMPLETED and done.data_remaining == 0
        assert d.job_info("vm1", completed=True).operation is JobOperation.MIGRATION_IN

    await in_thread(pair, body)


async def test_abort(pair: tuple[Host, Host]) -> None:
    def body(s: Connection, d: Connection) -> None:
        guest(s)
        with migrating(s, d, TypedParams.of({P.BANDWIDTH: 8})) as migration:
            s.abort_job("vm1")
            with pytest.raises(OperationAborted, match="canceled by client"):
                migration.result(timeout=30)
        assert s.state("vm1") == (DomainState.RUNNING, 1, "booted")  # never stopped: as it was
        assert s.job_info("vm1", completed=True).type is JobType.CANCELLED
        with pytest.raises(NoDomain):
            d.lookup("vm1")

    await in_thread(pair, body)


async def test_speed_and_downtime(pair: tuple[Host, Host]) -> None:
    def body(s: Connection, d: Connection) -> None:
        s.define(domain_xml("vm1", 64))
        assert s.get_max_speed("vm1") == MAX_BANDWIDTH_MIB
        s.set_max_speed("vm1", 100)
        assert s.get_max_speed("vm1") == 100
        s.start("vm1")
        s.set_max_speed("vm1", 7, postcopy=True)
        assert s.get_max_speed("vm1", postcopy=True) == 7
        assert s.get_max_speed("vm1") == 100
        assert s.get_max_downtime("vm1") == 300
        s.set_max_downtime("vm1", 50)
        assert s.get_max_downtime("vm1") == 50
        with pytest.raises(InvalidArgument, match="Invalid downtime"):
            s.set_max_downtime("vm1", 0)
        s.set_max_speed("vm1", 1)  # 64 s for this guest: only the change below finishes it
        with migrating(s, d, TypedParams()) as migration:
            s.set_max_speed("vm1", 0)  # unlimited
            assert migration.result(timeout=30).state is DomainState.RUNNING

    await in_thread(pair, body)


async def test_postcopy_switch(pair: tuple[Host, Host]) -> None:
    def body(s: Connection, d: Connection) -> None:
        guest(s, dirty_rate_mib=128)  # dirties faster than it is sent: it never converges
        params = TypedParams.of({P.BANDWIDTH: 32, P.BANDWIDTH_POSTCOPY: 16})
        with migrating(s, d, params, F.LIVE | F.POSTCOPY) as migration:
            s.start_postcopy("vm1")
            # The destination runs the guest in post-copy (running, reason 10) until the last
            # page arrived.
            def postcopy_or_end() -> str:
                if d.state("vm1")[:2] == (DomainState.RUNNING, 10):
                    return "postcopy"
                return "ended" if migration.done() else ""

            seen = wait_until_sync(postcopy_or_end, timeout=30,
                                   what="the destination in post-copy")
            migration.result(timeout=60)
        assert seen == "postcopy", "the migration ended before the destination ran in post-copy"
        assert d.state("vm1") == (DomainState.RUNNING, 2, "migrated")

    await in_thread(pair, body)


async def test_watch_job_iterates_until_the_job_ends(pair: tuple[Host, Host]) -> None:
    def body(s: Connection, d: Connection) -> None:
        guest(s)
        assert [i.type for i in s.watch_job("vm1")] == [JobType.NONE]
        with pytest.raises(NoDomain):
            list(s.watch_job("nope"))
        with migrating(s, d, TypedParams.of({P.BANDWIDTH: 32})) as migration:
            seen = list(s.watch_job("vm1"))
            migration.result(timeout=30)
        running = [i.data_processed for i in seen if i.type is JobType.UNBOUNDED]
        assert len(running) >= 2 and running == sorted(running) and running[-1] > running[0]
        assert seen[-1].type is JobType.COMPLETED

    await in_thread(pair, body)


async def test_events_then_stop_early(pair: tuple[Host, Host]) -> None:
    """A lifecycle event arrives; leaving the loop closes the stream on the daemon too."""
    src, _dst = pair

    def subscribers() -> int:
        return len(src.daemon.events._subs)

    def body(s: Connection, _d: Connection) -> None:
        # Keep the async stream referenced: only an explicit close, not garbage collection,
        # can end it then.
        streams: list[AsyncIterator[Event]] = []
        events = s.aconn.events

        def kept(key: DomainKey | None = None) -> AsyncIterator[Event]:
            streams.append(events(key))
            return streams[-1]

        s.aconn.events = kept  # type: ignore[method-assign]
        with ThreadPoolExecutor(1) as pool:
            stream = s.events()
            first = pool.submit(next, stream)
            eventually(lambda: subscribers() == 1, "the events stream never opened")
            s.define(domain_xml("vm1", 64))
            event: Event = first.result(timeout=10)
            assert (event.kind, event.domain_name, event.description) == \
                ("lifecycle", "vm1", "Defined Added")
            stream.close()
        eventually(lambda: subscribers() == 0, "close() left the stream open")
        s.aconn.events = events  # type: ignore[method-assign]

        def act() -> None:
            eventually(lambda: subscribers() == 1, "the second stream never opened")
            s.start("vm1")
            s.suspend("vm1")

        with ThreadPoolExecutor(1) as pool:
            acts = pool.submit(act)
            seen: list[str] = []
            for event in s.events("vm1"):
                seen.append(event.description)
                if event.description == "Suspended Paused":
                    break  # the generator is dropped here, and with it the stream
            acts.result(timeout=10)
        assert seen == ["Started Booted", "Suspended Paused"]
        eventually(lambda: subscribers() == 0, "leaving the loop left the stream open")

    await in_thread(pair, body)
