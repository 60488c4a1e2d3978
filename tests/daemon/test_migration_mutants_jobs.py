"""The daemon's migration jobs to the letter: sessions, post-copy, tuning, ports, destroy.

Written against mutmut's survivors in ``virtmig.daemon.migration`` (``make mutate``), like
``test_migration_mutants``, whose helpers these tests share.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from types import SimpleNamespace
from typing import cast

import pytest

from tests.daemon.test_migration_mutants import begin_prepare, guest
from virtmig.client.migrate import RemoteDest, RemoteSource, migrate3
from virtmig.client.sequence import run_v3
from virtmig.daemon import cookie as ck
from virtmig.daemon import migration
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    GuestSpec,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    StreamAddress,
)
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import JobRecord, Phase
from virtmig.daemon.migration import destination
from virtmig.daemon.registry import DomainObj
from virtmig.proto.compat import Compression
from virtmig.proto.errors import (
    InternalError,
    InternalInputError,
    OperationAborted,
    OperationFailed,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags, PausedReason
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import Host, domain_xml
from virtmig.testing.wait import wait_job_streaming, wait_until

F = MigrateFlags
P = MigrateParam
CP = F.CHANGE_PROTECTION


# --- sessions ----------------------------------------------------------------------------------


async def test_closing_a_session_ends_only_its_jobs(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    vm1, vm2 = await guest(src, "vm1"), await guest(src, "vm2")
    src.daemon.sessions.update({"s1", "s2"})
    await migration.src_begin(src.daemon, vm1, TypedParams(), F.LIVE | CP, owner="s1")
    await migration.src_begin(src.daemon, vm2, TypedParams(), F.LIVE | CP, owner="s2")
    await migration.any_session_closed(src.daemon, "s1")
    assert "s1" not in src.daemon.sessions and "s2" in src.daemon.sessions
    assert vm1.job is None and vm2.job is not None
    assert vm1.completed is not None and vm1.completed.type is JobType.FAILED
    assert vm1.completed.error == "migration caller went away"
    assert vm1.state is DomainState.RUNNING


async def test_begin_of_a_caller_already_gone_is_abandoned(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP, owner="gone")
    assert dom.job is None
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)  # no owner: kept
    assert dom.job is not None and (dom.job.owner, dom.job.protocol) == ("", "")  # (defaults)


async def test_prepare2_of_a_caller_already_gone_is_abandoned(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    xml, _cookie = await migration.src_begin(src.daemon, await guest(src), TypedParams(), F.LIVE)
    params = TypedParams.of({P.DEST_XML: xml})
    await migration.dst_prepare2(dst.daemon, params, int(F.LIVE), "gone")
    assert not list(dst.daemon.registry)  # rolled back: the incoming domain is gone
    await migration.dst_prepare2(dst.daemon, params, int(F.LIVE))  # no owner: kept
    job = dst.daemon.registry.by_name("vm1").job
    assert job is not None and (job.owner, job.protocol) == ("", "v2")


async def test_owner_gone_after_perform_leaves_the_guest_paused(
        pair: tuple[Host, Host], caplog: pytest.LogCaptureFixture) -> None:
    src, dst = pair
    dom = await guest(src)
    _dparams, cookie_b, uri = await begin_prepare(src, dst, dom)
    params = TypedParams.of({P.URI: uri or ""})
    await migration.src_perform(src.daemon, dom, None, params, cookie_b, F.LIVE | CP)
    assert dom.job is not None and dom.job.phase is Phase.PERFORM3_DONE
    dom.job.owner = "gone"
    await migration.any_owner_gone(src.daemon, dom)
    assert dom.job is None
    assert dom.completed is not None and dom.completed.type is JobType.FAILED
    assert dom.completed.error == "migration caller went away"
    assert (dom.state, dom.reason) == (DomainState.PAUSED, PausedReason.MIGRATION)
    assert src.daemon.backend.state(dom.uuid) is GuestRunState.PAUSED
    assert "we don't know if the domain was successfully started" in caplog.text


async def test_owner_gone_during_prepare_destroys_the_incoming_guest(
        pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    await begin_prepare(src, dst, dom)
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.job is not None and ddom.job.port and ddom.job.protocol == ""  # (none given)
    await migration.any_owner_gone(dst.daemon, ddom)
    assert ddom.job is None and not ddom.active
    assert dst.daemon.backend.state(dom.uuid) is GuestRunState.SHUTOFF
    assert not dst.daemon.ports._used
    assert ddom.completed is not None and ddom.completed.type is JobType.FAILED
    assert ddom.completed.error == "migration caller went away"


async def test_owner_gone_during_prepare_keeps_an_existing_definition(
        pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    await dst.conn.define(domain_xml("vm1", uuid=dom.uuid))
    await begin_prepare(src, dst, dom)
    ddom = dst.daemon.registry.by_name("vm1")
    await migration.any_owner_gone(dst.daemon, ddom)
    assert ddom.job is None and not ddom.active and ddom.persistent
    assert dst.daemon.registry.by_name("vm1") is ddom


async def test_owner_gone_while_a_phase_runs_waits_for_it(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    job = dom.job
    assert job is not None
    job.busy = True
    await migration.any_owner_gone(src.daemon, dom)
    assert dom.job is job
    job.busy = False
    await migration.any_owner_gone(src.daemon, dom)
    assert dom.job is None


async def test_check_owner_with_a_live_session_keeps_the_job(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    src.daemon.sessions.add("alive")
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP, owner="alive")
    await migration.any_check_owner(src.daemon, dom)
    assert dom.job is not None and dom.job.owner == "alive"


# --- waiting for the post-copy switch ----------------------------------------------------------


class _Backend:
    def __init__(self, statuses: list[MigrationStatus], run: GuestRunState) -> None:
        self.statuses = statuses
        self.run = run
        self.polls = 0

    def progress(self, uuid: str) -> MigrationProgress:
        assert uuid == "u"
        self.polls += 1
        status = self.statuses[min(self.polls, len(self.statuses)) - 1]
        return MigrationProgress(status=status)

    def state(self, uuid: str) -> GuestRunState:
        assert uuid == "u"
        return self.run


class _Daemon:
    def __init__(self, backend: _Backend) -> None:
        self.backend = backend


class _Clock:
    """``time`` and ``asyncio`` for the switch wait: a clock that advances 10 s a reading,
    and a sleep that records its delay and yields."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delays: list[float] = []

    def monotonic(self) -> float:
        self.now += 10
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def switched(statuses: list[MigrationStatus],
             run: GuestRunState = GuestRunState.PAUSED) -> tuple[bool, int]:
    backend = _Backend(statuses, run)
    dom = DomainObj(uuid="u", name="vm1")
    result = asyncio.run(destination._dst_switched(cast(Daemon, _Daemon(backend)), dom))
    return result, backend.polls


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([MigrationStatus.POSTCOPY_ACTIVE], (True, 1)),
        ([MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE], (True, 2)),
        ([MigrationStatus.SETUP, MigrationStatus.COMPLETED], (False, 2)),
        ([MigrationStatus.FAILED], (False, 1)),
        ([MigrationStatus.CANCELLED], (False, 1)),
    ],
)
def test_switch_is_waited_for(statuses: list[MigrationStatus],
                              expected: tuple[bool, int],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(destination, "asyncio", SimpleNamespace(sleep=clock.sleep))
    assert switched(statuses) == expected
    # polled every 10 ms, not every second
    assert clock.delays == [0.01] * (expected[1] - 1)


def test_switch_is_not_waited_for_a_dead_guest() -> None:
    assert switched([MigrationStatus.ACTIVE], GuestRunState.SHUTOFF) == (False, 1)


def test_switch_wait_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(destination, "time", clock)
    monkeypatch.setattr(destination, "asyncio", SimpleNamespace(sleep=clock.sleep))
    result, polls = switched([MigrationStatus.ACTIVE])
    assert not result and polls == 2  # 10 → deadline 40; polled at 20 and 30; 40 is too late


# --- Finish's cookie and post-copy -------------------------------------------------------------


async def test_finish_sends_its_statistics_back(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    dparams, cookie_b, uri = await begin_prepare(src, dst, dom)
    cookie_c = await migration.src_perform(src.daemon, dom, None,
                                           TypedParams.of({P.URI: uri or ""}), cookie_b,
                                           F.LIVE | CP)
    ddom, cookie_d = await migration.dst_finish(dst.daemon, dparams, cookie_c, int(F.LIVE),
                                                False)
    got = ck.parse_cookie(cookie_d, expected_name="vm1", expected_uuid=dom.uuid,
                          local_hostuuid=src.daemon.host_uuid, accept=ck.ACCEPT_CONFIRM)
    assert got.hostuuid == dst.daemon.host_uuid
    assert got.statistics is not None and got.statistics.memory_total == 64 << 20
    sent = ck.parse_cookie(cookie_c, expected_name="vm1", expected_uuid=dom.uuid,
                           local_hostuuid=dst.daemon.host_uuid, accept=ck.ACCEPT_FINISH)
    assert sent.statistics is not None and sent.statistics.memory_total == 64 << 20  # Perform's
    assert sent.mandatory == () and sent.persistent_xml is None  # (no PERSIST_DEST)
    assert ddom.completed is not None and ddom.completed.type is JobType.COMPLETED
    await migration.src_confirm(src.daemon, dom, TypedParams(), cookie_d, F.LIVE | CP, False)
    assert dom.completed is not None and dom.completed.type is JobType.COMPLETED


async def test_post_copy_migration_completes(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src, xml=domain_xml("vm1", 64, dirty_rate_mib=64))
    params = TypedParams.of({P.BANDWIDTH: 16, P.BANDWIDTH_POSTCOPY: 64})
    task = asyncio.ensure_future(migrate3(src.conn, "vm1", dst.conn, params,
                                          F.LIVE | F.POSTCOPY))
    await wait_job_streaming(src.conn, "vm1")
    await src.conn.start_postcopy("vm1")
    await asyncio.wait_for(task, 60)
    assert (await dst.conn.state("vm1"))[:2] == (DomainState.RUNNING, 2)
    for host in (src, dst):
        info = await host.conn.job_info("vm1", completed=True)
        assert info.type is JobType.COMPLETED


async def test_cancelled_confirm_after_a_post_copy_perform_never_resumes(
        pair: tuple[Host, Host]) -> None:
    """Perform returned at the switch to post-copy: the destination may run the guest already,
    so Confirm(cancelled) leaves the source paused for recovery."""
    src, dst = pair
    dom = await guest(src, xml=domain_xml("vm1", 64, dirty_rate_mib=64))
    _dparams, cookie_b, uri = await begin_prepare(src, dst, dom, F.LIVE | F.POSTCOPY)
    params = TypedParams.of({P.URI: uri or "", P.BANDWIDTH: 16, P.BANDWIDTH_POSTCOPY: 64})
    perform = asyncio.ensure_future(migration.src_perform(
        src.daemon, dom, None, params, cookie_b, F.LIVE | F.POSTCOPY | CP))
    await wait_job_streaming(src.conn, "vm1")
    await src.conn.start_postcopy("vm1")
    await asyncio.wait_for(perform, 60)
    await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | F.POSTCOPY | CP,
                                True)
    assert dom.job is not None and dom.job.phase is Phase.POSTCOPY_FAILED
    assert (dom.state, dom.reason) == (DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)


async def test_a_streams_speed_reads_as_given_in_mib(pair: tuple[Host, Host]) -> None:
    """``--bandwidth`` is MiB/s: while the stream runs, migrate-getspeed reads it back as given
    (the job keeps the bytes/s the backend was handed, divided by 1024 * 1024)."""
    src, dst = pair
    await guest(src, xml=domain_xml("vm1", 64, dirty_rate_mib=64))
    task = asyncio.ensure_future(migrate3(src.conn, "vm1", dst.conn,
                                          TypedParams.of({P.BANDWIDTH: 5}), F.LIVE))
    await wait_job_streaming(src.conn, "vm1")
    assert await src.conn.get_max_speed("vm1") == 5
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await asyncio.wait_for(task, 60)


class BreakAfterSwitch(RemoteDest):
    """Kills the source guest while Finish waits for the post-copy stream: it breaks."""

    def __init__(self, dst: Host, src: Host) -> None:
        super().__init__(dst.conn, True)
        self.dst = dst
        self.src = src

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        uuid = self.src.daemon.registry.by_name("vm1").uuid
        task = asyncio.ensure_future(super().finish(params, cookie, flags, cancelled))
        ddom = self.dst.daemon.registry.by_name("vm1")
        await wait_until(lambda: task.done() or (ddom.job is not None and ddom.job.postcopy),
                         timeout=60, what="the destination to run the guest in post-copy")
        await self.src.daemon.backend.destroy(uuid)
        return await task


async def test_post_copy_failure_keeps_the_destination_for_recovery(
        pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src, xml=domain_xml("vm1", 64, dirty_rate_mib=64))
    params = TypedParams.of({P.BANDWIDTH: 16, P.BANDWIDTH_POSTCOPY: 2})

    async def switch_soon() -> None:
        await wait_job_streaming(src.conn, "vm1")
        await src.conn.start_postcopy("vm1")

    switcher = asyncio.ensure_future(switch_soon())
    with pytest.raises(OperationFailed) as info:
        await run_v3(RemoteSource(src.conn, True), BreakAfterSwitch(dst, src), "vm1", params,
                     F.LIVE | F.POSTCOPY, protection=True)
    await switcher
    assert str(info.value).startswith("operation failed: post-copy migration failed: ")
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.job is not None and not ddom.job.busy
    assert ddom.job.phase is Phase.POSTCOPY_FAILED
    assert (ddom.state, ddom.reason) == (DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
    # Its owner gone, the job is still kept: only post-copy recovery can settle it.
    await migration.any_owner_gone(dst.daemon, ddom)
    assert ddom.job is not None and ddom.job.phase is Phase.POSTCOPY_FAILED
    assert ddom.state is DomainState.PAUSED
    await dst.conn.destroy("vm1")  # possible only because no phase runs any more
    assert ddom.job is None


# --- the backend's settings --------------------------------------------------------------------


async def test_destination_tuning_matches_the_sources_channels(
        pair: tuple[Host, Host]) -> None:
    daemon = pair[1].daemon
    assert migration.dst_tuning(daemon, F.LIVE | F.POSTCOPY, TypedParams()) == MigrationTuning(
        postcopy=True)
    assert migration.dst_tuning(daemon, F.LIVE, TypedParams()) == MigrationTuning()
    params = TypedParams.of({P.PARALLEL_CONNECTIONS: 4, P.COMPRESSION: "zstd"})
    assert migration.dst_tuning(daemon, F.PARALLEL | F.COMPRESSED, params) == MigrationTuning(
        parallel_connections=4, compression=Compression(methods=("zstd",)))
    assert migration.parallel_connections(F.PARALLEL, TypedParams()) == 2
    assert migration.parallel_connections(F.LIVE, params) == 0


DEST = StreamAddress("127.0.0.1", 49152)  # where a stream would go (no TLS: not used)


async def test_source_tuning_params_then_domain_then_defaults(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    daemon = src.daemon
    assert migration.src_tuning(daemon, dom, F.LIVE, TypedParams(), DEST) == MigrationTuning(
        bandwidth_bytes_per_s=0, max_downtime_ms=daemon.config.default_max_downtime_ms,
        live=True)
    dom.max_speed_mib, dom.max_downtime_ms, dom.max_speed_postcopy_mib = 3, 44, 5
    assert migration.src_tuning(daemon, dom, F(0), TypedParams(), DEST) == MigrationTuning(
        bandwidth_bytes_per_s=3 << 20, max_downtime_ms=44, live=False,
        postcopy_bandwidth_bytes_per_s=5 << 20)
    params = TypedParams.of({P.BANDWIDTH: 7, P.BANDWIDTH_POSTCOPY: 9,
                             P.AUTO_CONVERGE_INITIAL: 30, P.AUTO_CONVERGE_INCREMENT: 15,
                             P.PARALLEL_CONNECTIONS: 3})
    flags = F.LIVE | F.POSTCOPY | F.AUTO_CONVERGE | F.PARALLEL
    assert migration.src_tuning(daemon, dom, flags, params, DEST) == MigrationTuning(
        bandwidth_bytes_per_s=7 << 20, max_downtime_ms=44, live=True, postcopy=True,
        postcopy_bandwidth_bytes_per_s=9 << 20, auto_converge=True, auto_converge_initial=30,
        auto_converge_increment=15, parallel_connections=3)
    compressed = migration.src_tuning(daemon, dom, F.LIVE | F.COMPRESSED, TypedParams(), DEST)
    assert compressed.compression == Compression(methods=("xbzrle",))


# --- the incoming port -------------------------------------------------------------------------


async def prepare_with(src: Host, dst: Host, given: dict[str, str]) -> tuple[str | None, int]:
    dom = src.daemon.registry.by_name("vm1")
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)
    params = TypedParams.of({P.DEST_XML: xml, **given})
    _cookie_b, uri = await migration.dst_prepare(dst.daemon, params, cookie_a, int(F.LIVE))
    job = dst.daemon.registry.by_name("vm1").job
    assert job is not None
    return uri, job.port


def bound_in_range(host: Host) -> socket.socket:
    """A loopback socket bound to a port of ``host``'s migration range nobody else holds."""
    for port in host.daemon.ports.candidates():
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        return s
    raise AssertionError("no free port in the migration range")


def free_range_port(host: Host) -> int:
    """A port of ``host``'s migration range that nobody listens on (bound once, released)."""
    with bound_in_range(host) as s:
        port: int = s.getsockname()[1]
        return port


async def test_the_uris_port_is_the_one_listened_on(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    port = free_range_port(dst)
    assert await prepare_with(src, dst, {P.URI: f"tcp://127.0.0.1:{port}"}) == (
        f"tcp://127.0.0.1:{port}", port)


async def test_port_in_use(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    with bound_in_range(dst) as busy:
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OperationFailed) as info:
            await prepare_with(src, dst, {P.URI: f"tcp://127.0.0.1:{port}"})
    assert str(info.value) == (  # the OSError's strerror, as asyncio words it
        "operation failed: no free migration port on 127.0.0.1: error while attempting to bind "
        f"on address ('127.0.0.1', {port}): address already in use")


# (An address the host does not have is refused before any bind: test_prepare_bind.py.)


# --- a phase that runs holds its job against destroy -----------------------------------------


def job_ends(host: Host) -> list[str]:
    """The error of every job record the daemon publishes from now on."""
    ends: list[str] = []
    publish = host.daemon.registry.on_job_end

    def record(dom: DomainObj, rec: JobRecord) -> None:
        ends.append(rec.error)
        if publish is not None:
            publish(dom, rec)

    host.daemon.registry.on_job_end = record
    return ends


async def test_destroy_during_finish_leaves_the_job_to_finish(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    dom = await guest(src)
    dparams, _cookie, _uri = await begin_prepare(src, dst, dom)
    waiting = asyncio.Event()
    incoming_wait = dst.daemon.backend.incoming_wait

    async def watched_wait(uuid: str) -> MigrationProgress:
        waiting.set()
        return await incoming_wait(uuid)

    monkeypatch.setattr(dst.daemon.backend, "incoming_wait", watched_wait)
    ends = job_ends(dst)
    finish = asyncio.ensure_future(
        migration.dst_finish(dst.daemon, dparams, b"", int(F.LIVE), False))
    await asyncio.wait_for(waiting.wait(), 10)  # Finish waits for a stream that never comes
    await dst.conn.destroy("vm1")
    with pytest.raises(OperationFailed):
        await asyncio.wait_for(finish, 10)
    assert len(ends) == 1 and ends[0].startswith("operation failed: job 'migration in' failed")


async def test_destroy_during_confirm_leaves_the_job_to_confirm(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _dst = pair
    dom = await guest(src)
    await src.conn.suspend("vm1")
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    assert dom.job is not None
    dom.job.pre_state = DomainState.RUNNING  # so Confirm(cancelled) resumes it
    gate, resuming = asyncio.Event(), asyncio.Event()
    resume = src.daemon.backend.resume

    async def slow_resume(uuid: str) -> None:
        resuming.set()
        await gate.wait()
        await resume(uuid)

    monkeypatch.setattr(src.daemon.backend, "resume", slow_resume)
    ends = job_ends(src)
    confirm = asyncio.ensure_future(
        migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, True))
    await asyncio.wait_for(resuming.wait(), 10)
    await src.conn.destroy("vm1")
    gate.set()
    await asyncio.wait_for(confirm, 10)
    assert ends == ["migration cancelled"]


async def test_incoming_side_gets_the_tuning(pair: tuple[Host, Host],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    dom = await guest(src)
    given: list[MigrationTuning | None] = []
    incoming_start = dst.daemon.backend.incoming_start

    async def spy(spec: GuestSpec, listen: StreamAddress,
                  tuning: MigrationTuning | None = None) -> int:
        given.append(tuning)
        return await incoming_start(spec, listen, tuning)

    monkeypatch.setattr(dst.daemon.backend, "incoming_start", spy)
    await begin_prepare(src, dst, dom, F.LIVE | F.POSTCOPY)
    # (one call per port tried: a port another test still holds is skipped)
    assert given and all(t is not None and dataclasses.replace(t, stream_token="")
                         == MigrationTuning(postcopy=True) for t in given)


async def test_post_copy_failure_seen_by_confirm_is_left_to_the_admin(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    assert dom.job is not None
    job = dom.job
    job.set_phase(Phase.PERFORM3_DONE)
    job.postcopy = True

    async def broken(uuid: str) -> MigrationProgress:
        raise BackendError("stream broke")

    monkeypatch.setattr(src.daemon.backend, "outgoing_wait", broken)
    with pytest.raises(OperationFailed) as info:
        await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, False)
    assert str(info.value) == "operation failed: post-copy migration failed: stream broke"
    assert dom.job is job and not job.busy and job.phase is Phase.POSTCOPY_FAILED
    assert (dom.state, dom.reason) == (DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
    await src.conn.destroy("vm1")  # possible only because no phase runs any more
    assert dom.job is None


# --- Prepare's refusals ------------------------------------------------------------------------


async def test_prepare_needs_the_domain_xml(pair: tuple[Host, Host]) -> None:
    _src, dst = pair
    with pytest.raises(InternalInputError) as info:
        await migration.dst_prepare(dst.daemon, TypedParams(), b"", int(F.LIVE))
    assert str(info.value) == "internal error: no domain XML passed"
    assert info.value.status_name == "INVALID_ARGUMENT"  # the caller's input, in libvirt's words


async def test_prepare_refuses_a_localhost_name_for_the_stream(pair: tuple[Host, Host],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               ) -> None:
    src, dst = pair
    dom = await guest(src)
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    monkeypatch.setattr(dst.daemon, "config",
                        dataclasses.replace(dst.daemon.config, migration_host=""))
    monkeypatch.setattr(dst.daemon, "hostname", "localhost.localdomain")
    with pytest.raises(InternalError) as info:
        await migration.dst_prepare(dst.daemon, TypedParams.of({P.DEST_XML: xml}), cookie_a,
                                    int(F.LIVE))
    assert str(info.value) == ("internal error: hostname on destination resolved to "
                               "localhost, but migration requires an FQDN")
