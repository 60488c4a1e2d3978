"""Regular (client-coordinated) v3 migration between two real daemons on loopback: what a
migration moves and keeps, its flags and params, and what is refused before anything changes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.migration_helpers import F, P, assert_rolled_back, migrate, running_guest
from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import Trace
from virtmig.daemon import cookie as ck
from virtmig.daemon import migration, stall
from virtmig.daemon.placement import Away, Peer
from virtmig.daemon.registry import DomainObj
from virtmig.proto.errors import (
    ArgumentUnsupported,
    ConfigUnsupported,
    GuestElsewhere,
    InternalError,
    InvalidArgument,
    MigrateUnsafe,
    NoDomain,
    OperationInvalid,
    OperationTimeout,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, JobType
from virtmig.proto.migid import is_migration_id
from virtmig.proto.params import TypedParams
from virtmig.testing import (
    Host,
    domain_xml,
    start_host,
    stop_host,
    wait_job_streaming,
)


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


# --- the status file: one write per step -------------------------------------------------------


@pytest.mark.parametrize(("mode", "writes"), [("live", (5, 3)), ("paused-first", (6, 3)),
                                              ("post-copy", (5, 4))])
async def test_status_writes_per_migration(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch, mode: str, writes: tuple[int, int],
) -> None:
    """How often each daemon writes the domain's status file in one migration (source,
    destination): a step that changes the state and writes the status right after writes it
    once (``set_state(save=False)``), not twice, on the migration's critical path.  Durable writes
    (``save_status_durably``) count too; the source's job-less status is written once, by
    ``mark_inactive``, after the placement record (``src_complete``)."""
    src, dst = pair
    await running_guest(src, dirty_rate_mib=64 if mode == "post-copy" else 0)
    counts = [0, 0]
    for i, host in enumerate((src, dst)):
        def counted(dom: DomainObj, i: int = i, real: Any = host.daemon.registry.save_status
                    ) -> None:
            counts[i] += 1
            real(dom)

        async def counted_durably(dom: DomainObj, i: int = i,
                                  real: Any = host.daemon.registry.save_status_durably) -> None:
            counts[i] += 1
            await real(dom)

        monkeypatch.setattr(host.daemon.registry, "save_status", counted)
        monkeypatch.setattr(host.daemon.registry, "save_status_durably", counted_durably)
    if mode != "post-copy":
        await migrate(src, dst, F.LIVE if mode == "live" else 0)
    else:
        params = TypedParams.of({P.BANDWIDTH: 16, P.BANDWIDTH_POSTCOPY: 64})
        task = asyncio.ensure_future(migrate(src, dst, F.LIVE | F.POSTCOPY, params))
        await wait_job_streaming(src.conn, "vm1")
        await src.conn.start_postcopy("vm1")
        await asyncio.wait_for(task, 60)  # (switched: the destination's count says so)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert tuple(counts) == writes


# --- the fault-injection harness's stall points -------------------------------------------------


async def test_a_migration_passes_each_stall_point_in_its_phase(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tests/faults stops a daemon at a named point (:mod:`virtmig.daemon.stall`) to kill it
    there: each point is reached once, with the phase it names saved (source's, destination's);
    a daemon that restarts from ``confirm3`` takes the guest as migrated."""
    src, dst = pair
    await running_guest(src)
    reached: list[tuple[str, str, str]] = []

    def phase(host: Host) -> str:
        job = host.daemon.registry.by_name("vm1").job
        return job.phase.label if job is not None else ""

    async def at(point: str) -> None:
        reached.append((point, phase(src), phase(dst)))

    monkeypatch.setattr(stall, "POINT", "on")
    monkeypatch.setattr(stall, "at", at)
    await migrate(src, dst)
    assert reached == [("finish3", "perform3_done", "finish3"),
                       ("finish3-resumed", "perform3_done", "finish3"),
                       ("confirm3", "confirm3", "")]


# --- Begin -------------------------------------------------------------------------------------


async def test_offline_begin_sends_the_next_boots_definition(pair: tuple[Host, Host]) -> None:
    """An offline migration moves the persistent definition, not what runs now."""
    src, _dst = pair
    await running_guest(src)
    dom = src.daemon.registry.by_name("vm1")
    await src.conn.define(domain_xml("vm1", uuid=dom.uuid).replace("<vcpu>1</vcpu>",
                                                                   "<vcpu>2</vcpu>"))
    xml, _cookie = await migration.src_begin(src.daemon, dom, TypedParams(),
                                             F.OFFLINE | F.PERSIST_DEST)
    assert "<vcpu>2</vcpu>" in xml
    live, _cookie = await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)
    assert "<vcpu>1</vcpu>" in live


async def test_begin_refuses_a_guest_whose_outcome_is_unknown(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    dom = src.daemon.registry.by_name("vm1")
    src.daemon.placement.departed(dom.uuid, Away(Peer(dst.daemon.host_uuid, "dst.test"),
                                                 "e" * 32, uncertain=True))
    with pytest.raises(GuestElsewhere, match="cannot migrate domain 'vm1': whether its"):
        await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE | F.CHANGE_PROTECTION)
    assert dom.job is None


async def test_begin_sends_the_host_cpu_unless_offline(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Cookie A carries the digest of the source's CPU for a guest on the host's own CPU (the
    backend's ``host_cpu``), not for an offline migration, which runs nothing there; and the
    migration's id, made by Begin."""
    src, dst = pair
    await running_guest(src)
    dom = src.daemon.registry.by_name("vm1")
    monkeypatch.setattr(src.daemon.backend, "host_cpu", lambda spec: "ab" * 32)
    for flags, cpu in ((F.LIVE, "ab" * 32), (F.OFFLINE | F.PERSIST_DEST, "")):
        _xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(), flags)
        got = ck.parse_cookie(cookie_a, expected_name="vm1", expected_uuid=dom.uuid,
                              local_hostuuid=dst.daemon.host_uuid, accept=ck.ACCEPT_PREPARE)
        assert got.host_cpu == cpu and is_migration_id(got.migration_id)


async def test_begin_checks_the_disks_unless_unsafe_or_offline(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    src, _dst = pair
    await running_guest(src)
    dom = src.daemon.registry.by_name("vm1")
    monkeypatch.setattr(src.daemon.backend, "migration_unsafe", lambda spec: "a cached disk")
    with pytest.raises(MigrateUnsafe, match="a cached disk"):
        await migration.src_begin(src.daemon, dom, TypedParams(), F.LIVE)
    for flags in (F.LIVE | F.UNSAFE, F.OFFLINE | F.PERSIST_DEST):
        await migration.src_begin(src.daemon, dom, TypedParams(), flags)


async def test_begin_names_the_migration_in_its_job(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    dom = src.daemon.registry.by_name("vm1")
    _xml, cookie_a = await migration.src_begin(src.daemon, dom, TypedParams(),
                                               F.LIVE | F.CHANGE_PROTECTION)
    got = ck.parse_cookie(cookie_a, expected_name="vm1", expected_uuid=dom.uuid,
                          local_hostuuid=dst.daemon.host_uuid, accept=ck.ACCEPT_PREPARE)
    info = await src.conn.job_info("vm1")
    assert info.phase == "begin3" and info.stat("virtmig.migration_id") == got.migration_id
