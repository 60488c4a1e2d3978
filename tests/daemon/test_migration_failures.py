"""Regular (client-coordinated) v3 migration between two real daemons on loopback: libvirt's
failure matrix.

Each row of libvirt's failure matrix (virDomainMigrateVersion3Full's handling of each failed step)
is a test here: afterwards the source guest runs as before, the destination holds nothing, and no
job is left on either side.
"""

from __future__ import annotations

import pytest

from tests.daemon.migration_helpers import (
    ConfirmFailsSource,
    F,
    FinishFailsDest,
    LostReplyDest,
    NoUriDest,
    P,
    assert_rolled_back,
    migrate,
    running_guest,
)
from tests.daemon.placement_helpers import LostFinishDest
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import Trace, run_v3
from virtmig.client.values import GuestLocation
from virtmig.daemon import jobctl, locate
from virtmig.daemon.backend.base import (
    BackendError,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationTuning,
    StreamAddress,
)
from virtmig.daemon.core import Daemon
from virtmig.proto.errors import (
    ConnectionFailed,
    InternalError,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, JobType
from virtmig.proto.params import TypedParams
from virtmig.testing import (
    ClosedPortDest,
    Host,
    domain_xml,
    free_port,
    wait_for_job,
    wait_until,
)


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


async def test_row_perform_fails_unreachable_port(pair: tuple[Host, Host],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    src, dst = pair
    await running_guest(src)

    with pytest.raises(OperationFailed, match=r"Connection refused|connect"):
        await run_v3(RemoteSource(src.conn, True), ClosedPortDest(dst.conn, True), "vm1",
                     TypedParams(), F.LIVE, protection=True)
    await assert_rolled_back(src, dst)
    # The caller got the backend's own error: no warning of a reason that replaced it.
    assert "then the backend failed" not in caplog.text


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
        assert f"then the backend failed: {backend_error}" in caplog.text


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


async def test_guest_that_cannot_start_puts_the_prior_definition_back(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PERSIST_DEST's definition is saved before the vCPUs start; when they cannot start, v3's
    Finish fails (the source runs again) and the destination's definition from before is put
    back."""
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    await dst.conn.define(domain_xml("vm1", uuid=uuid).replace("<vcpu>1</vcpu>",
                                                               "<vcpu>2</vcpu>"))

    async def broken(uuid: str) -> None:
        raise BackendError("the vCPUs cannot start")

    monkeypatch.setattr(dst.daemon.backend, "resume", broken)
    with pytest.raises(VirtmigError, match="the vCPUs cannot start"):
        await migrate(src, dst, F.LIVE | F.PERSIST_DEST)
    ddom = dst.daemon.registry.by_name("vm1")
    assert not ddom.active and ddom.config is not None and "<vcpu>2</vcpu>" in ddom.config.xml
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING


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


# --- Confirm(cancelled) after the whole guest streamed: the destination is asked first ---------


class BelievesItFailed(LostFinishDest):
    """Finish's reply is lost and the client takes it for a failure: Confirm(cancelled)."""

    async def finished(self, dname: str) -> bool:
        return False


CLOSED = "closed"  # virtmig.dest_uri: a loopback port nobody listens on


@pytest.mark.parametrize(("finish", "dest_uri", "state", "record"), [
    ("reaches", "dst", (DomainState.SHUTOFF, 4, "migrated"),
     (JobType.COMPLETED, "cancelled too late: the guest runs on the destination")),
    ("lost", "dst", (DomainState.PAUSED, 2, "migration"),
     (JobType.FAILED, "Confirm(cancelled), but the destination's answer is 'pending'")),
    ("reaches", CLOSED, (DomainState.PAUSED, 2, "migration"),
     (JobType.FAILED, "Confirm(cancelled), and the destination cannot be asked: ")),
    ("fails", "dst", (DomainState.RUNNING, 6, "migration-canceled"),
     (JobType.FAILED, "migration cancelled")),
])
async def test_confirm_cancelled_after_the_stream_asks_the_destination(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch, finish: str, dest_uri: str,
    state: tuple[DomainState, int, str], record: tuple[JobType, str],
) -> None:
    """What the destination answers about this migration (it arrived, it waits for Finish, it
    cannot be asked, it failed there) decides what Confirm(cancelled) does with the source's
    guest, and the source's job record says which it was.  The question names the guest and
    the migration."""
    src, dst = pair
    await running_guest(src)
    asked: list[tuple[str, str, str]] = []
    answer = locate.answer

    def spy(daemon: Daemon, uuid: str, migration_id: str = "") -> GuestLocation:
        job = src.daemon.registry.by_uuid(uuid).job  # (the source's phase: saved before asking)
        asked.append((uuid, migration_id, job.phase.label if job is not None else ""))
        return answer(daemon, uuid, migration_id)

    monkeypatch.setattr(locate, "answer", spy)
    uri = dst.uri if dest_uri == "dst" else f"virtmig+tls://127.0.0.1:{free_port()}"
    party = (FinishFailsDest(dst.conn, dst) if finish == "fails"
             else BelievesItFailed(dst.conn, reaches=finish == "reaches"))
    trace = Trace()
    with pytest.raises((ConnectionFailed, OperationFailed)):
        await run_v3(RemoteSource(src.conn, True), party, "vm1", TypedParams.of({P.DEST_URI: uri}),
                     F.LIVE, protection=True, trace=trace)
    assert trace.calls[-1] == "confirm(cancelled)"
    uuid = (await src.conn.lookup("vm1")).uuid
    # (first Confirm's question; an outcome left unknown is asked about again later)
    assert asked[:1] == ([] if dest_uri == CLOSED
                         else [(uuid, trace.migration_id, "confirm3_cancelled")])
    assert trace.migration_id
    assert await src.conn.state("vm1") == state
    done = await src.conn.job_info("vm1", completed=True)
    assert done.type is record[0] and done.error.startswith(record[1])
    assert (done.error == record[1]) is (dest_uri != CLOSED)  # (then the reason follows)
