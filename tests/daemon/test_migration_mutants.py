"""The daemon's migration phases to the letter: messages, job records, what a rollback leaves.

Written against mutmut's survivors in ``virtmig.daemon.migration`` (``make mutate``): each test
pins a detail that a mutant changed and the other tests did not notice.  The phases are called
directly on real daemons (test backend) where the client would hide the detail.
"""

from __future__ import annotations

import dataclasses
import errno
import re
import time

import pytest

from virtmig.client.migrate import RemoteDest, migrate3
from virtmig.daemon import cookie as ck
from virtmig.daemon import migration
from virtmig.daemon.backend.base import (
    GuestSpec,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    StreamAddress,
    XbzrleStats,
)
from virtmig.daemon.registry import DomainObj
from virtmig.proto.errors import (
    InvalidArgument,
    MigrateFinishOk,
    OperationFailed,
    OperationInvalid,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, Party, TypedParams
from virtmig.testing import Host, domain_xml

F = MigrateFlags
P = MigrateParam
CP = F.CHANGE_PROTECTION


async def guest(host: Host, name: str = "vm1", xml: str | None = None, *,
                paused: bool = False) -> DomainObj:
    await host.conn.define(xml or domain_xml(name))
    await host.conn.start(name, paused=paused)
    return host.daemon.registry.by_name(name)


# --- each phase names itself in virCheckFlags' message ----------------------------------------


BAD = int(F.LIVE) | 1 << 40
UNKNOWN = "invalid argument: unsupported flags (0x10000000000) in function "


async def test_each_phase_names_its_function(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    d, s = dst.daemon, src.daemon
    calls = {
        "virDomainMigrateBegin3Params": migration.src_begin(s, dom, TypedParams(), BAD),
        "virDomainMigratePrepare3Params": migration.dst_prepare(d, TypedParams(), b"", BAD),
        "virDomainMigratePerform3Params": migration.src_perform(s, dom, None, TypedParams(),
                                                                b"", BAD),
        "virDomainMigrateFinish3Params": migration.dst_finish(d, TypedParams(), b"", BAD,
                                                              False),
        "virDomainMigrateConfirm3Params": migration.src_confirm(s, dom, TypedParams(), b"",
                                                                BAD, True),
        "virDomainMigratePrepare2": migration.dst_prepare2(d, TypedParams(), BAD),
        "virDomainMigratePerform": migration.src_perform2(s, dom, TypedParams(), b"", BAD),
        "virDomainMigrateFinish2": migration.dst_finish2(d, TypedParams(), BAD, 0),
    }
    for function, call in calls.items():
        with pytest.raises(InvalidArgument) as info:
            await call
        assert str(info.value) == UNKNOWN + function


async def test_any_check_checks_params_for_the_given_party(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    # listen_address is the destination's: the source refuses nothing about it
    migration.any_check(src.daemon, int(F.LIVE),
                        TypedParams.of({P.LISTEN_ADDRESS: "127.0.0.1"}), "f", Party.DST)


# --- Confirm -----------------------------------------------------------------------------------


async def test_confirm_while_busy(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    assert dom.job is not None
    dom.job.busy = True
    with pytest.raises(OperationInvalid) as info:
        await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, True)
    assert str(info.value) == ("Requested operation is not valid: domain 'vm1' migration is "
                               "busy in another call")


async def test_confirm_of_a_migration_not_performed(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    with pytest.raises(OperationInvalid) as info:
        await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, False)
    assert str(info.value) == ("Requested operation is not valid: domain 'vm1' migration has "
                               "not been performed (phase begin3)")
    assert dom.job is not None and not dom.job.busy


def cookie_d(src: Host, dst: Host, dom: DomainObj, downtime: int) -> bytes:
    return ck.build_cookie(ck.Cookie(
        name=dom.name, uuid=dom.uuid, hostname="dst.test", hostuuid=dst.daemon.host_uuid,
        statistics=ck.MigrationStats(downtime=downtime)))


async def test_confirm_takes_the_destinations_downtime(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    await migration.src_confirm(src.daemon, dom, TypedParams(), cookie_d(src, dst, dom, 1234),
                                F.LIVE | CP, True)
    assert dom.completed is not None and dom.completed.progress.downtime_ms == 1234
    info = await src.conn.job_info("vm1", completed=True)
    assert info.type is JobType.FAILED and info.stat("downtime") == 1234


async def test_confirm_keeps_own_downtime_without_the_destinations(
        pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    assert dom.job is not None
    dom.job.progress = MigrationProgress(downtime_ms=77)
    await migration.src_confirm(src.daemon, dom, TypedParams(), cookie_d(src, dst, dom, 0),
                                F.LIVE | CP, True)
    assert dom.completed is not None and dom.completed.progress.downtime_ms == 77


# --- cookie statistics -------------------------------------------------------------------------


def test_stats_are_the_completed_jobs_in_milliseconds() -> None:
    progress = MigrationProgress(
        status=MigrationStatus.COMPLETED, total_bytes=10, processed_bytes=9,
        remaining_bytes=1, iteration=3, dirty_rate_pages_per_s=5, bandwidth_bytes_per_s=6,
        expected_downtime_ms=99, downtime_ms=7, setup_time_ms=2, total_time_ms=1500,
        page_size=4096, normal_pages=8, xbzrle=XbzrleStats(cache_bytes=1))
    before = int(time.time() * 1000)
    stats = migration.any_stats(progress, 1700000000.25)
    after = int(time.time() * 1000)
    assert stats.started == 1700000000250
    assert before <= stats.stopped <= after and stats.sent == stats.stopped
    assert stats == ck.MigrationStats(
        started=1700000000250, stopped=stats.stopped, sent=stats.stopped, delta=0,
        time_elapsed=1500, downtime=7, setup_time=2, memory_total=10, memory_processed=9,
        memory_remaining=1, memory_bps=6, memory_constant=0, memory_normal=8,
        memory_normal_bytes=8 * 4096, memory_dirty_rate=5, memory_iteration=3,
        memory_page_size=4096)


# --- Finish ------------------------------------------------------------------------------------


async def begin_prepare(src: Host, dst: Host, dom: DomainObj, flags: int = F.LIVE,
                        ) -> tuple[TypedParams, bytes, str | None]:
    """Begin (change-protected) and Prepare: the destination's params, cookie B and URI."""
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), flags | CP)
    dparams = TypedParams.of({P.DEST_XML: xml})
    cookie_b, uri = await migration.dst_prepare(dst.daemon, dparams, cookie_a, flags)
    dparams.set(P.DEST_NAME, dom.name)
    return dparams, cookie_b, uri


async def test_a_v2_prepare_knows_nothing_of_the_source_host(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepare2 gets no cookie: the migration gets a new id, and the source host's UUID, name
    and CPU are unknown ("": the backend is told the source sent no CPU; nothing is recorded
    of a host nobody named)."""
    src, dst = pair
    dom = await guest(src)
    told: list[str] = []
    check = dst.daemon.backend.check_host_cpu

    def checked(spec: GuestSpec, source: str) -> None:
        told.append(source)
        check(spec, source)

    monkeypatch.setattr(dst.daemon.backend, "check_host_cpu", checked)
    xml, _cookie = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)
    await migration.dst_prepare2(dst.daemon, TypedParams.of({P.DEST_XML: xml}), int(F.LIVE))
    job = dst.daemon.registry.by_name("vm1").job
    assert job is not None and len(job.migration_id) == 32
    assert told == [""] and (job.peer_hostuuid, job.peer_hostname) == ("", "")


async def test_an_offline_prepare_holds_no_port_and_asks_no_cpu(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, nothing listens and no guest starts here: Prepare holds no migration port (it
    would wait for one, or fail, when the range is in use) and asks the backend about no CPU."""
    src, dst = pair
    dom = await guest(src)
    told: list[str] = []
    monkeypatch.setattr(dst.daemon.backend, "check_host_cpu",
                        lambda spec, source: told.append(source))
    _dparams, _cookie, uri = await begin_prepare(src, dst, dom, F.OFFLINE | F.PERSIST_DEST)
    assert uri is None and told == []
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.job is not None and ddom.job.port == 0 and not dst.daemon.ports._used


async def test_prepare_sets_up_the_callers_tuning_and_records_the_source(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """The incoming guest is started with the channels the caller's params ask for (the same
    as the source will use), and the job records the source host cookie A names."""
    src, dst = pair
    dom = await guest(src)
    tunings: list[MigrationTuning | None] = []
    start = dst.daemon.backend.incoming_start

    async def started(spec: GuestSpec, listen: StreamAddress,
                      tuning: MigrationTuning | None = None) -> int:
        tunings.append(tuning)
        return await start(spec, listen, tuning)

    monkeypatch.setattr(dst.daemon.backend, "incoming_start", started)
    for host in (src, dst):  # (as a backend with multifd does: QEMU's)
        monkeypatch.setattr(host.daemon.backend, "extra_flags", F.TLS | F.PARALLEL)
    flags = F.LIVE | F.PARALLEL
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), flags)
    await migration.dst_prepare(dst.daemon, TypedParams.of(
        {P.DEST_XML: xml, P.PARALLEL_CONNECTIONS: 3}), cookie_a, int(flags))
    # (once per port tried: a port of the range another process holds is skipped)
    assert tunings and {t.parallel_connections if t else None for t in tunings} == {3}
    job = dst.daemon.registry.by_name("vm1").job
    assert job is not None
    assert (job.peer_hostuuid, job.peer_hostname) == (src.daemon.host_uuid, src.daemon.hostname)


async def test_a_failed_prepare_keeps_a_prior_definition(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepare fails once its job exists (the guest cannot listen): a domain defined here
    before keeps its definition, shut off, with no job."""
    src, dst = pair
    dom = await guest(src)
    await dst.conn.define(domain_xml("vm1", uuid=dom.uuid))

    async def refused(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dst.daemon.backend, "incoming_start", refused)
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)
    with pytest.raises(OperationFailed) as info:
        await migration.dst_prepare(dst.daemon, TypedParams.of({P.DEST_XML: xml}), cookie_a,
                                    int(F.LIVE))
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.persistent and ddom.config is not None and ddom.job is None
    assert ddom.state is DomainState.SHUTOFF and not dst.daemon.ports._used
    assert ddom.completed is not None and ddom.completed.type is JobType.FAILED
    assert ddom.completed.error == str(info.value)  # why, not just "prepare failed"


async def test_cancelled_finish_reports_finish_ok(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    dparams, _cookie, _uri = await begin_prepare(src, dst, dom)
    ddom = dst.daemon.registry.by_name("vm1")
    with pytest.raises(MigrateFinishOk) as info:
        await migration.dst_finish(dst.daemon, dparams, b"", int(F.LIVE), True)
    assert str(info.value) == "migration successfully aborted"
    assert ddom.completed is not None and ddom.completed.type is JobType.CANCELLED
    assert ddom.completed.error == ""  # FINISH_OK is no error


@pytest.mark.parametrize("defined", [False, True])
async def test_a_rolled_back_finish_shuts_off_before_its_job_ends(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch, defined: bool) -> None:
    """Whoever sees the incoming job over must not see the guest still active: a client that
    asks after a cancelled Finish takes "no job, not shut off" for a guest that arrived (and
    confirms: the source's guest goes too).  The job's end waits for its status write."""
    src, dst = pair
    dom = await guest(src)
    if defined:
        await dst.conn.define(domain_xml("vm1", uuid=dom.uuid))
    dparams, _cookie, _uri = await begin_prepare(src, dst, dom)
    ddom = dst.daemon.registry.by_name("vm1")
    registry = dst.daemon.registry
    end_job = registry.end_job
    seen: list[tuple[DomainState, bool]] = []

    async def watched(d: DomainObj, *args: object, **kwargs: object) -> None:
        if d is ddom:
            seen.append((d.state, registry.find_name("vm1") is d))
        await end_job(d, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry, "end_job", watched)
    with pytest.raises(MigrateFinishOk):
        await migration.dst_finish(dst.daemon, dparams, b"", int(F.LIVE), True)
    assert seen == [(DomainState.SHUTOFF, defined)]


async def test_a_listen_refused_by_the_system_names_its_reason(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """The incoming guest cannot listen for another reason than a taken port: Prepare fails
    naming the address and the system's words (strerror, not Python's "[Errno 13] ...")."""
    src, dst = pair
    dom = await guest(src)
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)

    async def refused(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dst.daemon.backend, "incoming_start", refused)
    with pytest.raises(OperationFailed) as info:
        await migration.dst_prepare(dst.daemon, TypedParams.of({P.DEST_XML: xml}), cookie_a,
                                    int(F.LIVE))
    assert re.fullmatch(r"operation failed: cannot listen for incoming migration on "
                        r"[0-9.:\[\]a-f]+:\d+: Permission denied", str(info.value))
    assert dst.daemon.registry.find_name("vm1") is None and not dst.daemon.ports._used


async def test_failed_finish_keeps_an_existing_definition(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    await dst.conn.define(domain_xml("vm1", uuid=dom.uuid))
    dparams, _cookie, _uri = await begin_prepare(src, dst, dom)
    await dst.daemon.backend.destroy(dom.uuid)  # the incoming guest dies before Finish
    with pytest.raises(OperationFailed):
        await migration.dst_finish(dst.daemon, dparams, b"", int(F.LIVE), False)
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.persistent and ddom.state is DomainState.SHUTOFF and ddom.job is None
    assert ddom.completed is not None and ddom.completed.type is JobType.FAILED
    assert ddom.completed.error == "operation failed: guest unexpectedly quit"


async def test_offline_finish_keeps_the_cookies_definition(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    flags = F.OFFLINE | F.PERSIST_DEST
    dparams, _cookie, uri = await begin_prepare(src, dst, dom, flags)
    assert uri is None
    pxml = domain_xml("vm1", uuid=dom.uuid).replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>")
    cookie_c = ck.build_cookie(ck.Cookie(
        name="vm1", uuid=dom.uuid, hostname="src.test", hostuuid=src.daemon.host_uuid,
        mandatory=("persistent",), persistent_xml=pxml))
    ddom, cookie = await migration.dst_finish(dst.daemon, dparams, cookie_c, int(flags), False)
    assert cookie == b""
    assert ddom.config is not None and "<vcpu>2</vcpu>" in ddom.config.xml
    assert ddom.completed is not None and ddom.completed.type is JobType.COMPLETED


async def test_offline_finish_without_a_cookie_keeps_the_sent_definition(
        pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    flags = F.OFFLINE | F.PERSIST_DEST
    dparams, _cookie, _uri = await begin_prepare(src, dst, dom, flags)
    ddom, _cookie = await migration.dst_finish(dst.daemon, dparams, b"", int(flags), False)
    assert ddom.config is not None and "<vcpu>1</vcpu>" in ddom.config.xml
    assert ddom.completed is not None and ddom.completed.type is JobType.COMPLETED


async def test_finish_adds_the_time_since_the_sources_cookie(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination's downtime (not post-copy): the source's (cookie C's statistics) plus
    the time since the source sent the cookie, by this host's clock in milliseconds."""
    src, dst = pair
    dom = await guest(src)
    finish = RemoteDest.finish

    async def sent_5s_ago(self: RemoteDest, params: TypedParams, cookie: bytes, flags: int,
                          cancelled: bool) -> tuple[str, bytes]:
        c = ck.parse_cookie(cookie, expected_name="vm1", expected_uuid=dom.uuid,
                            local_hostuuid=dst.daemon.host_uuid, accept=ck.ACCEPT_FINISH)
        stats = dataclasses.replace(c.statistics or ck.MigrationStats(), downtime=1000,
                                    sent=int(time.time() * 1000) - 5000, delta=0)
        cookie = ck.build_cookie(dataclasses.replace(c, statistics=stats))
        return await finish(self, params, cookie, flags, cancelled)

    monkeypatch.setattr(RemoteDest, "finish", sent_5s_ago)
    await migrate3(src.conn, "vm1", dst.conn, TypedParams(), F.LIVE)
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.completed is not None and ddom.completed.type is JobType.COMPLETED
    assert 6000 <= ddom.completed.progress.downtime_ms < 60_000
