"""The daemon's migration phases to the letter, continued: Perform, the source put back after
a failed Finish, the rest of Confirm, Finish and Prepare, and the checks every phase shares.

Written against mutmut's survivors in ``virtmig.daemon.migration`` (``make mutate``), as
``test_migration_mutants.py`` (whose helpers these tests use): each test pins a detail that a
mutant changed and the other tests did not notice.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.daemon.test_migration_mutants import CP, F, P, begin_prepare, guest
from virtmig.client.migrate import RemoteDest, RemoteSource, migrate3
from virtmig.client.sequence import run_v3
from virtmig.daemon import cookie as ck
from virtmig.daemon import migration
from virtmig.daemon.backend.base import GuestRunState, StreamAddress
from virtmig.daemon.job import Phase
from virtmig.proto.errors import (
    ArgumentUnsupported,
    InternalError,
    InternalInputError,
    InvalidArgument,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, JobType, PausedReason
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, domain_xml
from virtmig.testing.wait import wait_job_streaming

# --- Perform -----------------------------------------------------------------------------------


WITH_ALIAS = domain_xml("vm1").replace(
    "<target port='0'/>", "<target port='0'/><alias name='serial0'/>")


@pytest.mark.parametrize("given", [False, True])
async def test_persistent_definition_is_sent_migratable(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch, given: bool) -> None:
    src, dst = pair
    dom = await guest(src, xml=WITH_ALIAS)
    assert dom.config is not None and '<alias name="serial0"/>' in dom.config.xml
    params = TypedParams()
    if given:
        params.set(P.PERSIST_XML, WITH_ALIAS.replace("<name>vm1</name>",
                                                     f"<name>vm1</name><uuid>{dom.uuid}</uuid>"))
    cookies: list[bytes] = []
    finish = RemoteDest.finish

    async def seen(self: RemoteDest, params: TypedParams, cookie: bytes, flags: int,
                   cancelled: bool) -> tuple[str, bytes]:
        cookies.append(cookie)
        return await finish(self, params, cookie, flags, cancelled)

    monkeypatch.setattr(RemoteDest, "finish", seen)
    await migrate3(src.conn, "vm1", dst.conn, params, F.LIVE | F.PERSIST_DEST)
    config = dst.daemon.registry.by_name("vm1").config
    assert config is not None and "alias" not in config.xml
    cookie_c = ck.parse_cookie(cookies[0], expected_name="vm1", expected_uuid=dom.uuid,
                               local_hostuuid=dst.daemon.host_uuid, accept=ck.ACCEPT_FINISH)
    assert cookie_c.mandatory == ("persistent",)  # libvirt lists it: the receiver must read it


@pytest.mark.parametrize("protocol", [None, "v3"])
async def test_perform_without_owner_keeps_its_job_and_protocol(pair: tuple[Host, Host],
                                                                protocol: str | None) -> None:
    """Perform without change protection starts the job itself: no owner given, nobody to
    outlive (the reaper's), and the protocol given (none by default) recorded."""
    src, dst = pair
    dom = await guest(src)
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)
    cookie_b, uri = await migration.dst_prepare(dst.daemon, TypedParams.of({P.DEST_XML: xml}),
                                                cookie_a, int(F.LIVE))
    params = TypedParams.of({P.URI: uri or ""})
    if protocol is None:
        await migration.src_perform(src.daemon, dom, None, params, cookie_b, int(F.LIVE))
    else:
        await migration.src_perform(src.daemon, dom, None, params, cookie_b, int(F.LIVE),
                                    protocol=protocol)
    assert dom.job is not None and dom.job.phase is Phase.PERFORM3_DONE
    assert (dom.job.owner, dom.job.protocol) == ("", protocol or "")


async def test_a_second_protected_perform_is_refused(pair: tuple[Host, Host]) -> None:
    """With change protection, Perform runs only in Begin's job, once: after it, the job's
    phase names why another Perform is refused."""
    src, dst = pair
    dom = await guest(src)
    _dparams, cookie_b, uri = await begin_prepare(src, dst, dom)
    params = TypedParams.of({P.URI: uri or ""})
    await migration.src_perform(src.daemon, dom, None, params, cookie_b, F.LIVE | CP)
    with pytest.raises(OperationInvalid) as info:
        await migration.src_perform(src.daemon, dom, None, params, cookie_b, F.LIVE | CP)
    assert str(info.value) == ("Requested operation is not valid: domain 'vm1' is already "
                               "being migrated (phase perform3_done)")
    assert dom.job is not None and dom.job.phase is Phase.PERFORM3_DONE and not dom.job.busy


async def test_a_perform_refused_before_the_stream_ends_its_job_as_failed(
        pair: tuple[Host, Host]) -> None:
    """Perform's own checks fail (a URI it cannot use): the job ends FAILED with the error
    (CANCELLED is kept for an abort), and the guest was never touched."""
    src, dst = pair
    dom = await guest(src)
    _dparams, cookie_b, _uri = await begin_prepare(src, dst, dom)
    params = TypedParams.of({P.URI: "gopher://127.0.0.1:1"})
    with pytest.raises(ArgumentUnsupported) as info:
        await migration.src_perform(src.daemon, dom, None, params, cookie_b, F.LIVE | CP)
    assert dom.job is None and dom.state is DomainState.RUNNING
    assert dom.completed is not None and dom.completed.type is JobType.FAILED
    assert dom.completed.error == str(info.value)


async def test_a_streaming_perform_holds_the_job_busy(pair: tuple[Host, Host]) -> None:
    """While Perform streams (without the domain's lock), its job is busy: a Confirm that
    comes in then is refused as a call in another's way, not judged by the phase."""
    src, dst = pair
    dom = await guest(src, xml=domain_xml("vm1", 64, dirty_rate_mib=64))
    _dparams, cookie_b, uri = await begin_prepare(src, dst, dom)
    params = TypedParams.of({P.URI: uri or "", P.BANDWIDTH: 5})
    perform = asyncio.ensure_future(migration.src_perform(
        src.daemon, dom, None, params, cookie_b, F.LIVE | CP))
    await wait_job_streaming(src.conn, "vm1")
    with pytest.raises(OperationInvalid) as info:
        await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, True)
    assert str(info.value) == ("Requested operation is not valid: domain 'vm1' migration is "
                               "busy in another call")
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await asyncio.wait_for(perform, 60)


async def test_an_unprotected_perform_belongs_to_its_caller(pair: tuple[Host, Host]) -> None:
    """Perform without change protection starts the job for the session that called it: when
    that session ends, the job ends as an orphan's does (the guest stays paused)."""
    src, dst = pair
    dom = await guest(src)
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)
    cookie_b, uri = await migration.dst_prepare(dst.daemon, TypedParams.of({P.DEST_XML: xml}),
                                                cookie_a, int(F.LIVE))
    src.daemon.sessions.add("caller-1")
    await migration.src_perform(src.daemon, dom, None, TypedParams.of({P.URI: uri or ""}),
                                cookie_b, int(F.LIVE), owner="caller-1")
    assert dom.job is not None and dom.job.phase is Phase.PERFORM3_DONE
    await migration.any_session_closed(src.daemon, "caller-1")
    assert dom.job is None and dom.state is DomainState.PAUSED
    assert dom.completed is not None and dom.completed.type is JobType.FAILED


@pytest.mark.parametrize("given", [False, True])
async def test_begin_sends_the_migratable_xml(pair: tuple[Host, Host], given: bool) -> None:
    """The domain's own XML, or the caller's (``destination_xml``), without runtime state."""
    src, _dst = pair
    dom = await guest(src, xml=WITH_ALIAS)
    params = TypedParams()
    if given:
        params.set(P.DEST_XML, WITH_ALIAS.replace("<name>vm1</name>",
                                                  f"<name>vm1</name><uuid>{dom.uuid}</uuid>"))
    xml, _cookie = await migration.src_begin(src.daemon, dom, params, F.LIVE)
    assert "<name>vm1</name>" in xml and "alias" not in xml


async def test_perform_refuses_a_dconnuri_without_peer_to_peer(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    with pytest.raises(InternalInputError) as info:
        await migration.src_perform(src.daemon, dom, "virtmig+tls://127.0.0.1:1", TypedParams(),
                                    b"", int(F.LIVE))
    assert str(info.value) == ("internal error: Unexpected dconnuri parameter with "
                               "non-peer2peer migration")
    assert dom.job is None


async def test_abort_before_perform_is_cancelled(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    await src.conn.abort_job("vm1")
    params = TypedParams.of({P.URI: "tcp://127.0.0.1:1"})
    with pytest.raises(OperationAborted) as info:
        await migration.src_perform(src.daemon, dom, None, params, b"", F.LIVE | CP)
    assert str(info.value) == "operation aborted: job 'migration out' canceled by client"
    assert dom.completed is not None and dom.completed.type is JobType.CANCELLED
    assert dom.completed.error == "operation aborted: job 'migration out' canceled by client"


async def test_abort_during_the_stream_is_cancelled(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    task = asyncio.create_task(migrate3(src.conn, "vm1", dst.conn,
                                        TypedParams.of({P.BANDWIDTH: 8}), F.LIVE))
    await wait_job_streaming(src.conn, "vm1")
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted):
        await task
    info = await src.conn.job_info("vm1", completed=True)
    assert info.type is JobType.CANCELLED
    assert info.error == "operation aborted: job 'migration out' canceled by client"


# --- the source put back -----------------------------------------------------------------------


class FinishFailsDest(RemoteDest):
    """The incoming guest dies between Perform and Finish."""

    def __init__(self, dst: Host) -> None:
        super().__init__(dst.conn, True)
        self.dst = dst

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        uuid = self.dst.daemon.registry.by_name(params.get_str(P.DEST_NAME) or "").uuid
        await self.dst.daemon.backend.destroy(uuid)
        return await super().finish(params, cookie, flags, cancelled)


async def fail_in_finish(src: Host, dst: Host) -> None:
    with pytest.raises(OperationFailed, match="guest unexpectedly quit"):
        await run_v3(RemoteSource(src.conn, True), FinishFailsDest(dst), "vm1", TypedParams(),
                     F.LIVE, protection=True)


async def test_running_source_runs_again_after_a_failed_finish(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    await fail_in_finish(src, dst)
    assert src.daemon.backend.state(dom.uuid) is GuestRunState.RUNNING
    assert dom.state is DomainState.RUNNING


async def test_paused_source_is_paused_by_the_user_again(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src, paused=True)
    reason = dom.reason
    await fail_in_finish(src, dst)
    assert (dom.state, dom.reason) == (DomainState.PAUSED, PausedReason.USER)
    assert reason in (PausedReason.USER, PausedReason.STARTING_UP)
    assert src.daemon.backend.state(dom.uuid) is GuestRunState.PAUSED


async def test_paused_source_keeps_another_pause_reason(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src, paused=True)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    dom.reason = int(PausedReason.API_ERROR)
    await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, True)
    assert (dom.state, dom.reason) == (DomainState.PAUSED, PausedReason.API_ERROR)


# --- more of Confirm ---------------------------------------------------------------------------


async def test_confirm_with_a_bad_cookie_fails_and_frees_the_job(
        pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    with pytest.raises(InternalError, match="Malformed migration cookie"):
        await migration.src_confirm(src.daemon, dom, TypedParams(), b"junk\0", F.LIVE | CP,
                                    True)
    assert dom.job is not None and not dom.job.busy
    # The cookie is checked before the phase moves: nothing changed, Confirm can be called again.
    assert dom.job.phase is Phase.BEGIN3
    await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, True)
    assert dom.job is None
    assert dom.completed is not None and dom.completed.type is JobType.FAILED
    assert dom.completed.error == "migration cancelled"


async def test_confirm_with_a_bad_cookie_after_perform_changes_nothing(
        pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    assert dom.job is not None
    dom.job.set_phase(Phase.PERFORM3_DONE)
    with pytest.raises(InternalError):
        await migration.src_confirm(src.daemon, dom, TypedParams(), b"junk\0", F.LIVE | CP,
                                    False)
    assert dom.job.phase is Phase.PERFORM3_DONE and not dom.job.busy  # the cookie comes first


async def test_cancelled_confirm_after_post_copy_never_resumes(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    dom = await guest(src)
    await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    assert dom.job is not None
    job = dom.job
    job.postcopy = True
    await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, True)
    assert dom.job is job and not job.busy and job.phase is Phase.POSTCOPY_FAILED
    assert (dom.state, dom.reason) == (DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)


async def test_offline_migration_keeps_or_undefines_an_inactive_source(
        pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))
    await src.conn.define(domain_xml("vm2"))
    await migrate3(src.conn, "vm1", dst.conn, TypedParams(), F.OFFLINE | F.PERSIST_DEST)
    vm1 = src.daemon.registry.by_name("vm1")
    assert vm1.persistent
    assert vm1.completed is not None and vm1.completed.type is JobType.COMPLETED
    info = await src.conn.job_info("vm1", completed=True)
    assert info.type is JobType.COMPLETED
    await migrate3(src.conn, "vm2", dst.conn, TypedParams(),
                   F.OFFLINE | F.PERSIST_DEST | F.UNDEFINE_SOURCE)
    assert [d.name for d in src.daemon.registry] == ["vm1"]


async def test_offline_migration_of_a_running_source_keeps_it(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    await migrate3(src.conn, "vm1", dst.conn, TypedParams(),
                   F.OFFLINE | F.PERSIST_DEST | F.UNDEFINE_SOURCE)
    assert dom.persistent and dom.state is DomainState.RUNNING
    assert src.daemon.registry.by_name("vm1") is dom


# --- more of Finish and Prepare ----------------------------------------------------------------


async def test_finish_needs_a_domain_name(pair: tuple[Host, Host]) -> None:
    _src, dst = pair
    # a source-only parameter whose flag the destination never sees is not its business
    params = TypedParams.of({P.AUTO_CONVERGE_INITIAL: 30})
    with pytest.raises(NoDomain) as info:
        await migration.dst_finish(dst.daemon, params, b"", int(F.LIVE), False)
    assert str(info.value) == "Domain not found: missing domain name"


async def test_finish_while_busy(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    dparams, _cookie, _uri = await begin_prepare(src, dst, dom)
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.job is not None
    ddom.job.busy = True
    with pytest.raises(OperationInvalid) as info:
        await migration.dst_finish(dst.daemon, dparams, b"", int(F.LIVE), True)
    assert str(info.value) == ("Requested operation is not valid: domain 'vm1' incoming "
                               "migration is busy in another call")


async def test_prepare_ignores_source_only_params(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    params = TypedParams.of({P.DEST_XML: xml, P.AUTO_CONVERGE_INITIAL: 30})
    _cookie_b, uri = await migration.dst_prepare(dst.daemon, params, cookie_a, int(F.LIVE))
    assert uri is not None and uri.startswith("tcp:127.0.0.1:")


async def test_ipv6_hosts_are_bracketed(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    params = TypedParams.of({P.DEST_XML: xml, P.URI: "tcp://[::1]"})
    _cookie_b, uri = await migration.dst_prepare(dst.daemon, params, cookie_a, int(F.LIVE))
    ddom = dst.daemon.registry.by_name("vm1")
    assert ddom.job is not None
    assert uri == f"tcp://[::1]:{ddom.job.port}"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("tcp:", "invalid argument: missing host in migration URI: tcp://"),
        ("h:1", "argument unsupported: unsupported scheme h in migration URI h:1"),
        ("//h:1", "invalid argument: missing scheme in migration URI: //h:1"),
        ("tcp://h:x", "invalid argument: bad port in migration URI: tcp://h:x"),
    ],
)
def test_migration_uri_messages(uri: str, message: str) -> None:
    with pytest.raises(VirtmigError) as info:
        migration.dst_parse_uri_in(uri)
    assert str(info.value) == message


def test_migration_uris() -> None:
    assert migration.dst_parse_uri_in("tcp:h:5") == ("h", 5)
    assert migration.dst_parse_uri_in("tcp://h") == ("h", None)
    assert migration.src_parse_uri("tcp:h:5") == StreamAddress("h", 5)
    for uri, message in ((None, "invalid argument: migration URI is required"),
                         ("", "invalid argument: migration URI is required"),
                         ("tcp://h", "invalid argument: missing port in migration URI: tcp://h")):
        with pytest.raises(InvalidArgument) as info:
            migration.src_parse_uri(uri)
        assert str(info.value) == message


# --- the shared checks (migration.common) ------------------------------------------------------


async def test_check_lets_the_backends_own_flags_through(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    with pytest.raises(ArgumentUnsupported):
        migration.any_check(src.daemon, int(F.LIVE | F.PARALLEL), TypedParams(), "f")
    src.daemon.backend.extra_flags = F.PARALLEL  # as the qemu backend declares it
    assert migration.any_check(src.daemon, int(F.LIVE | F.PARALLEL), TypedParams(),
                               "f") == F.LIVE | F.PARALLEL


async def test_phases_without_a_migration_job_name_its_direction(
        pair: tuple[Host, Host]) -> None:
    src, dst = pair
    dom = await guest(src)
    with pytest.raises(OperationInvalid) as info:
        await migration.src_confirm(src.daemon, dom, TypedParams(), b"", F.LIVE | CP, False)
    assert str(info.value) == ("Requested operation is not valid: domain 'vm1' is not being "
                               "migrated")
    await dst.conn.define(domain_xml("vm1"))
    with pytest.raises(OperationInvalid) as info:
        await migration.dst_finish(dst.daemon, TypedParams.of({P.DEST_NAME: "vm1"}), b"",
                                   int(F.LIVE), False)
    assert str(info.value) == ("Requested operation is not valid: domain 'vm1' is not "
                               "processing incoming migration")


async def test_live_migration_of_an_inactive_domain_is_refused(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    await src.conn.define(domain_xml("vm1"))
    dom = src.daemon.registry.by_name("vm1")
    with pytest.raises(OperationInvalid) as info:
        await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | CP)
    assert str(info.value) == "Requested operation is not valid: domain is not running"
    assert dom.job is None
