"""Regular (client-coordinated) v3 migration between two real daemons on loopback.

Each row of libvirt's failure matrix (virDomainMigrateVersion3Full's handling of each failed step)
is a test here: afterwards the source guest runs as before, the destination holds nothing, and no
job is left on either side.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virtmig.client.migrate import RemoteDest, RemoteSource, migrate3
from virtmig.client.sequence import Trace, run_v3
from virtmig.daemon import jobctl
from virtmig.daemon.backend.base import (
    BackendError,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationTuning,
    StreamAddress,
)
from virtmig.proto.errors import (
    ArgumentUnsupported,
    ConfigUnsupported,
    InternalError,
    InvalidArgument,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    ClosedPortDest,
    Host,
    domain_xml,
    start_host,
    stop_host,
    wait_for_job,
    wait_job_streaming,
    wait_until,
)

F = MigrateFlags
P = MigrateParam


async def running_guest(host: Host, name: str = "vm1", memory_mib: int = 64,
                        dirty_rate_mib: int = 0) -> str:
    await host.conn.define(domain_xml(name, memory_mib, dirty_rate_mib=dirty_rate_mib))
    await host.conn.start(name)
    return name


async def assert_rolled_back(src: Host, dst: Host, name: str = "vm1",
                             state: DomainState = DomainState.RUNNING) -> None:
    assert (await src.conn.state(name))[0] is state
    assert (await src.conn.job_info(name)).type is JobType.NONE
    with pytest.raises(NoDomain):
        await dst.conn.lookup(name)
    assert not [d for d in dst.daemon.registry if d.job is not None]
    assert not [d for d in src.daemon.registry if d.job is not None]
    assert not dst.daemon.ports._used


async def migrate(src: Host, dst: Host, flags: int = F.LIVE, params: TypedParams | None = None,
                  name: str = "vm1", trace: Trace | None = None) -> str:
    dom = await migrate3(src.conn, name, dst.conn, params or TypedParams(), flags, trace=trace)
    return dom.name


# --- success paths ---------------------------------------------------------------------------


async def test_live_migration_moves_the_guest(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src, dirty_rate_mib=4)
    trace = Trace()
    assert await migrate(src, dst, trace=trace) == "vm1"
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm"]
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    src_dom = await src.conn.lookup("vm1")
    dst_dom = await dst.conn.lookup("vm1")
    assert src_dom.uuid == dst_dom.uuid
    assert src_dom.persistent and not dst_dom.persistent  # no PERSIST_DEST: transient on dst
    assert dst.digest(dst_dom.uuid)
    for host in (src, dst):
        assert (await host.conn.job_info("vm1")).type is JobType.NONE
        done = await host.conn.job_info("vm1", completed=True)
        assert done.type is JobType.COMPLETED
    out = await src.conn.job_info("vm1", completed=True)
    assert out.data_total == 64 * 1024 * 1024 and out.data_remaining == 0


async def test_memory_that_arrives_equals_memory_that_left(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await src.conn.suspend("vm1")  # frozen memory: the digest cannot change under us
    uuid = (await src.conn.lookup("vm1")).uuid
    before = src.digest(uuid)
    await migrate(src, dst)
    assert dst.digest(uuid) == before


async def test_paused_source_stays_paused_on_destination(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await src.conn.suspend("vm1")
    await migrate(src, dst)
    assert await dst.conn.state("vm1") == (DomainState.PAUSED, 1, "user")


async def test_paused_flag(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await migrate(src, dst, F.LIVE | F.PAUSED)
    assert (await dst.conn.state("vm1"))[0] is DomainState.PAUSED


async def test_non_live_migration_pauses_first(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src, dirty_rate_mib=8)
    await migrate(src, dst, 0)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF


async def test_persist_dest_and_undefine_source(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await migrate(src, dst, F.LIVE | F.PERSIST_DEST | F.UNDEFINE_SOURCE)
    dom = await dst.conn.lookup("vm1")
    assert dom.persistent
    assert [p.name for p in (dst.state_dir / "domains").glob("*.xml")] == [f"{dom.uuid}.xml"]
    with pytest.raises(NoDomain):
        await src.conn.lookup("vm1")
    assert not list((src.state_dir / "domains").glob("*.xml"))


async def test_persistent_xml_is_what_destination_keeps(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    pxml = domain_xml("vm1", 64, uuid=uuid).replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>")
    await migrate(src, dst, F.LIVE | F.PERSIST_DEST,
                  TypedParams.of({P.PERSIST_XML: pxml}))
    assert "<vcpu>2</vcpu>" in await dst.conn.xml_desc("vm1", inactive=True)
    assert "<vcpu>1</vcpu>" in await dst.conn.xml_desc("vm1")


async def test_transient_source_disappears(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await src.conn.undefine("vm1")  # running and transient now
    await migrate(src, dst)
    with pytest.raises(NoDomain):
        await src.conn.lookup("vm1")


async def test_rename_with_dest_name(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    name = await migrate(src, dst, F.LIVE | F.PERSIST_DEST,
                         TypedParams.of({P.DEST_NAME: "vm1-new"}))
    assert name == "vm1-new"
    assert (await dst.conn.state("vm1-new"))[0] is DomainState.RUNNING
    assert "<name>vm1-new</name>" in await dst.conn.xml_desc("vm1-new", inactive=True)
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")


async def test_dest_xml_with_host_side_change_is_used(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    new = domain_xml("vm1", 64, uuid=uuid).replace(
        "<serial type='pty'>", "<serial type='pty'><!-- on the destination -->")
    await migrate(src, dst, F.LIVE, TypedParams.of({P.DEST_XML: new}))
    assert "on the destination" in await dst.conn.xml_desc("vm1")


async def test_dest_xml_abi_mismatch_is_refused_in_begin(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    bad = domain_xml("vm1", 128, uuid=uuid)
    trace = Trace()
    with pytest.raises(ConfigUnsupported, match="max memory"):
        await migrate(src, dst, F.LIVE, TypedParams.of({P.DEST_XML: bad}), trace=trace)
    assert trace.calls == ["begin"]
    await assert_rolled_back(src, dst)


async def test_bandwidth_param_is_applied(pair: tuple[Host, Host]) -> None:
    """8 MiB/s for 64 MiB cannot be done in a moment; unthrottled it would be."""
    import asyncio

    src, dst = pair
    await running_guest(src)
    task = asyncio.create_task(migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 8})))
    info = await wait_job_streaming(src.conn, "vm1")
    assert info.type is JobType.UNBOUNDED and info.phase == "perform3"
    assert 0 < info.data_processed < info.data_total / 2
    await src.conn.destroy("vm1")  # end it quickly
    with pytest.raises(VirtmigError):
        await task


async def test_offline_migration_defines_only(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    await migrate(src, dst, F.OFFLINE | F.PERSIST_DEST, trace=trace)
    assert trace.calls == ["begin", "prepare", "finish", "confirm"]
    dom = await dst.conn.lookup("vm1")
    assert dom.persistent and dom.state is DomainState.SHUTOFF
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_offline_of_inactive_domain_with_undefine(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))
    await migrate(src, dst, F.OFFLINE | F.PERSIST_DEST | F.UNDEFINE_SOURCE)
    assert (await dst.conn.lookup("vm1")).persistent
    with pytest.raises(NoDomain):
        await src.conn.lookup("vm1")


async def test_migrate_back_and_forth(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src, dirty_rate_mib=2)
    await migrate(src, dst)
    await migrate(dst, src)
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    with pytest.raises(NoDomain):  # it was transient on dst: gone once it left
        await dst.conn.lookup("vm1")


async def test_non_params_rpcs_when_a_daemon_lacks_params(
    pair: tuple[Host, Host], tmp_path: Path
) -> None:
    """An older destination without MIGRATION_PARAMS: the plain v3 RPCs carry the four params."""
    src, _dst = pair
    old = await start_host(tmp_path, "old", features=("V3", "OFFLINE", "CHANGE_PROTECTION"))
    try:
        await running_guest(src)
        await migrate(src, old, F.LIVE, TypedParams.of({P.DEST_NAME: "renamed",
                                                        P.BANDWIDTH: 512}))
        assert await old.conn.state("renamed") == (DomainState.RUNNING, 2, "migrated")
        await running_guest(src, "vm2")
        with pytest.raises(ArgumentUnsupported, match="extensible parameters"):
            await migrate(src, old, F.LIVE, TypedParams.of({P.LISTEN_ADDRESS: "127.0.0.1"}),
                          name="vm2")
        assert (await src.conn.state("vm2"))[0] is DomainState.RUNNING
    finally:
        await stop_host(old)


# --- refused up front --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "params", "error", "message"),
    [
        (F.LIVE | F.PEER2PEER, {}, InvalidArgument, "use virDomainMigrateToURI3"),
        (F.LIVE | F.TUNNELLED, {}, InvalidArgument, "without using peer2peer"),
        (F.OFFLINE, {}, OperationInvalid, "persistent flag set"),
        (F.LIVE | F.NON_SHARED_DISK | F.NON_SHARED_INC, {}, InvalidArgument, "mutually"),
        (F.LIVE | F.COMPRESSED, {}, ArgumentUnsupported, "VIR_MIGRATE_COMPRESSED"),
        (F.POSTCOPY, {}, ArgumentUnsupported, "non-live"),
        (F.LIVE | (1 << 40), {}, InvalidArgument, "unsupported flags"),
        (F.LIVE, {P.GRAPHICS_URI: "spice://x"}, ArgumentUnsupported, "graphics_uri"),
    ],
)
async def test_refused_before_anything_changes(
    pair: tuple[Host, Host], flags: int, params: dict[str, str], error: type[VirtmigError],
    message: str,
) -> None:
    src, dst = pair
    await running_guest(src)
    with pytest.raises(error, match=message):
        await migrate(src, dst, flags, TypedParams.of(params))
    await assert_rolled_back(src, dst)


async def test_unknown_param_is_refused(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    from virtmig.proto.params import ParamType, TypedParam

    bogus = TypedParams([TypedParam("no_such_param", ParamType.STRING, "x")])
    with pytest.raises(InvalidArgument, match="parameter 'no_such_param' not supported"):
        await migrate(src, dst, F.LIVE, bogus)
    await assert_rolled_back(src, dst)


async def test_migrate_to_uri3_refuses_direct(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    with pytest.raises(ArgumentUnsupported, match="direct migration is not supported"):
        await src.conn.migrate_to_uri3("vm1", None, TypedParams.of({P.URI: "tcp://x:1"}),
                                       F.LIVE)
    await assert_rolled_back(src, dst)


async def test_second_migration_job_is_refused(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    xml, cookie = await RemoteSource(src.conn, True).begin(
        "vm1", TypedParams(), F.LIVE | F.CHANGE_PROTECTION)
    with pytest.raises(OperationInvalid, match="another migration job is already running for "
                                               "domain 'vm1'"):
        await migrate(src, dst)
    # a state change waits for the job, then times out with libvirt's message
    from virtmig.proto.errors import OperationTimeout

    with pytest.raises(OperationTimeout, match="cannot acquire state change lock"):
        await src.conn.undefine("vm1")
    await RemoteSource(src.conn, True).confirm("vm1", TypedParams(), b"",
                                               F.LIVE | F.CHANGE_PROTECTION, True)
    await assert_rolled_back(src, dst)
    assert xml and cookie


async def test_same_host_is_refused(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    await running_guest(src)
    with pytest.raises(InternalError, match="Attempt to migrate guest to the same host"):
        await migrate(src, src)
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.job_info("vm1")).type is JobType.NONE


# --- the failure matrix ------------------------------------------------------------------------


async def test_row_begin_fails(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))  # defined, not running
    trace = Trace()
    with pytest.raises(OperationInvalid, match="domain is not running"):
        await migrate(src, dst, trace=trace)
    assert trace.calls == ["begin"]
    await assert_rolled_back(src, dst, state=DomainState.SHUTOFF)


async def test_row_prepare_fails_name_clash(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await dst.conn.define(domain_xml("vm1"))  # same name, another uuid
    trace = Trace()
    with pytest.raises(OperationFailed, match="already exists with uuid"):
        await migrate(src, dst, trace=trace)
    assert trace.calls == ["begin", "prepare", "confirm(cancelled)"]
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.job_info("vm1")).type is JobType.NONE
    assert (await dst.conn.lookup("vm1")).state is DomainState.SHUTOFF  # untouched
    assert (await dst.conn.job_info("vm1")).type is JobType.NONE


async def test_row_prepare_fails_uuid_clash(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    await dst.conn.define(domain_xml("other", uuid=uuid))
    with pytest.raises(OperationFailed, match="is already defined with uuid"):
        await migrate(src, dst)
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.job_info("vm1")).type is JobType.NONE


async def test_row_prepare_fails_already_active(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    await dst.conn.define(domain_xml("vm1", uuid=uuid))
    await dst.conn.start("vm1")
    with pytest.raises(OperationInvalid, match="is already active"):
        await migrate(src, dst)
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING  # untouched
    assert (await src.conn.job_info("vm1")).type is JobType.NONE


async def test_prepare_into_existing_inactive_definition(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    await dst.conn.define(domain_xml("vm1", uuid=uuid))
    await migrate(src, dst)
    dom = await dst.conn.lookup("vm1")
    assert dom.persistent and dom.state is DomainState.RUNNING


class NoUriDest(RemoteDest):
    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await super().prepare(params, cookie, flags)
        return cookie, None


async def test_row_no_uri_out(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    with pytest.raises(InternalError, match="did not set uri"):
        await run_v3(RemoteSource(src.conn, True), NoUriDest(dst.conn, True), "vm1",
                     TypedParams(), F.LIVE, protection=True, trace=trace)
    assert trace.calls == ["begin", "prepare", "finish(cancelled)", "confirm(cancelled)"]
    await assert_rolled_back(src, dst)


async def test_row_perform_fails_digest_mismatch(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1", extra_options='fault="corrupt-stream"'))
    await src.conn.start("vm1")
    trace = Trace()
    with pytest.raises(OperationFailed, match="digest"):
        await migrate(src, dst, trace=trace)
    assert trace.calls == ["begin", "prepare", "perform", "finish(cancelled)"]
    await assert_rolled_back(src, dst)
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 6, "migration-canceled")
    failed = await src.conn.job_info("vm1", completed=True)
    assert failed.type is JobType.FAILED and "digest" in failed.error


async def test_row_perform_fails_paused_source_stays_paused(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1", extra_options='fault="corrupt-stream"'))
    await src.conn.start("vm1", paused=True)
    with pytest.raises(OperationFailed):
        await migrate(src, dst)
    await assert_rolled_back(src, dst, state=DomainState.PAUSED)


class DestroyingSource(RemoteSource):
    """Destroys the incoming guest on the destination while Perform streams."""

    def __init__(self, conn: object, dst: Host) -> None:
        super().__init__(conn, True)  # type: ignore[arg-type]
        self.dst = dst

    async def perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes:
        import asyncio

        task = asyncio.create_task(super().perform(dom, params, cookie, flags))
        uuid = (await self.dst.conn.lookup(dom)).uuid
        await wait_until(
            lambda: task.done() or self.dst.daemon.backend.progress(uuid).processed_bytes > 0,
            timeout=30, what="the destination to receive the stream")
        await self.dst.conn.destroy(dom)
        return await task


async def test_row_perform_fails_destination_guest_dies(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src, memory_mib=64)
    trace = Trace()
    params = TypedParams.of({P.BANDWIDTH: 16})  # slow enough to be caught mid-stream
    with pytest.raises(OperationFailed):
        await run_v3(DestroyingSource(src.conn, dst), RemoteDest(dst.conn, True), "vm1",
                     params, F.LIVE, protection=True, trace=trace)
    assert trace.calls == ["begin", "prepare", "perform", "finish(cancelled)"]
    await assert_rolled_back(src, dst)


async def test_row_perform_fails_unreachable_port(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)

    with pytest.raises(OperationFailed, match=r"Connection refused|connect"):
        await run_v3(RemoteSource(src.conn, True), ClosedPortDest(dst.conn, True), "vm1",
                     TypedParams(), F.LIVE, protection=True)
    await assert_rolled_back(src, dst)


@pytest.mark.parametrize("backend_error", [
    MigrationCancelled("migration cancelled"),
    MigrationFailed("QEMU did not end the migration after cancel and yank: still 'active' 20 s "
                    "after the cancel request"),
], ids=["stream-cancelled", "backend-gave-up"])
async def test_row_perform_stopped_by_the_daemon_reports_its_reason(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    backend_error: BackendError,
) -> None:
    """The daemon stopped the stream for a reason of its own (the stall watchdog's, here): the
    caller sees that reason, whatever the backend then says of the stopped stream -- cancelled,
    or failed because it gave up ending it (libvirt keeps a job's first error over what the
    cancel reports).  The backend's own words go to the log."""
    src, dst = pair
    await running_guest(src)
    stall = OperationTimeout("job 'migration out' failed: migration stalled: no progress for 5 s "
                             "with 1048576 bytes remaining")

    async def stopped_stream(uuid: str, dest: StreamAddress,
                             tuning: MigrationTuning) -> MigrationProgress:
        dom = src.daemon.registry.by_name("vm1")
        assert dom.job is not None
        await jobctl.fail_job(src.daemon, dom, dom.job, stall)
        raise backend_error

    monkeypatch.setattr(src.daemon.backend, "outgoing", stopped_stream)
    trace = Trace()
    with pytest.raises(OperationTimeout) as info:
        await migrate(src, dst, trace=trace)
    assert str(info.value) == str(stall)
    assert trace.calls == ["begin", "prepare", "perform", "finish(cancelled)"]
    await assert_rolled_back(src, dst)
    failed = await src.conn.job_info("vm1", completed=True)
    assert failed.type is JobType.FAILED and failed.error == str(stall)
    if isinstance(backend_error, MigrationFailed):
        assert str(backend_error) in caplog.text


class FinishFailsDest(RemoteDest):
    """The incoming guest dies between Perform and Finish."""

    def __init__(self, conn: object, dst: Host) -> None:
        super().__init__(conn, True)  # type: ignore[arg-type]
        self.dst = dst

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        name = params.get_str(P.DEST_NAME) or ""
        uuid = (await self.dst.conn.lookup(name)).uuid
        await self.dst.daemon.backend.destroy(uuid)  # the guest crashes, the daemon lives
        return await super().finish(params, cookie, flags, cancelled)


async def test_row_finish_fails(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    with pytest.raises(OperationFailed, match="guest unexpectedly quit"):
        await run_v3(RemoteSource(src.conn, True), FinishFailsDest(dst.conn, dst), "vm1",
                     TypedParams(), F.LIVE, protection=True, trace=trace)
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm(cancelled)"]
    await assert_rolled_back(src, dst)
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 6, "migration-canceled")


class ConfirmFailsSource(RemoteSource):
    async def confirm(self, dom: str, params: TypedParams, cookie: bytes, flags: int,
                      cancelled: bool) -> None:
        raise OperationFailed("connection to source lost")


async def test_row_confirm_fails(pair: tuple[Host, Host], caplog: pytest.LogCaptureFixture
                                 ) -> None:
    src, dst = pair
    await running_guest(src)
    name = await run_v3(ConfirmFailsSource(src.conn, True), RemoteDest(dst.conn, True), "vm1",
                        TypedParams(), F.LIVE, protection=True)
    assert name == "vm1"
    assert "probably left in 'paused' state on source" in caplog.text
    # Never on both hosts: the destination runs, the source is left paused for an admin.
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
    assert (await src.conn.job_info("vm1")).phase == "perform3_done"
    await src.conn.destroy("vm1")  # the admin's way out ends the job too
    assert (await src.conn.job_info("vm1")).type is JobType.NONE


async def test_destroy_source_mid_perform(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    import asyncio

    task = asyncio.create_task(migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 8})))
    await wait_for_job(src.conn, "vm1", lambda i: i.phase == "perform3", timeout=60,
                       what="the migration to reach perform3")
    await src.conn.destroy("vm1")
    with pytest.raises((OperationFailed, OperationAborted)):
        await task
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    assert not [d for d in src.daemon.registry if d.job is not None]
    assert not [d for d in dst.daemon.registry if d.job is not None]


class LostReplyDest(RemoteDest):
    """Finish succeeds on the destination but its reply never arrives."""

    def __init__(self, conn: object, reachable: bool) -> None:
        super().__init__(conn, True)  # type: ignore[arg-type]
        self.reachable = reachable

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        await super().finish(params, cookie, flags, cancelled)
        from virtmig.proto.errors import ConnectionFailed

        raise ConnectionFailed("unable to connect to the daemon: connection reset")

    async def finished(self, dname: str) -> bool:
        if not self.reachable:
            from virtmig.proto.errors import ConnectionFailed

            raise ConnectionFailed("unable to connect to the daemon: no route")
        return await super().finished(dname)


async def test_lost_finish_reply_is_resolved_by_asking(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    name = await run_v3(RemoteSource(src.conn, True), LostReplyDest(dst.conn, True), "vm1",
                        TypedParams(), F.LIVE, protection=True, trace=trace)
    assert name == "vm1"
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm"]
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF  # never on both hosts


async def test_lost_finish_reply_unknown_outcome_leaves_source_paused(
    pair: tuple[Host, Host]
) -> None:
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    with pytest.raises(OperationFailed, match="left paused here"):
        await run_v3(RemoteSource(src.conn, True), LostReplyDest(dst.conn, False), "vm1",
                     TypedParams(), F.LIVE, protection=True, trace=trace)
    assert trace.calls == ["begin", "prepare", "perform", "finish"]  # no Confirm: no resume
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
