"""Mixed-version fleets on the ``test`` backend (and protocol v2 with QEMU, regular and
peer-to-peer): every pairing of daemons speaking {v3 with params, v3 without params, v2 only},
regular and peer-to-peer; each migrates with the protocol libvirt's order picks (seen in the
calls made, the completed job's ``virtmig.protocol`` stat and the memory that arrived) or is
refused with libvirt's message before anything changes; a daemon refuses the RPCs of a protocol
it does not speak; change protection is refused or dropped as libvirt does with v2.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import product
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import assert_rolled_back, running_guest
from virtmig.client.sequence import Trace
from virtmig.daemon.backend.base import GuestRunState
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import (
    ArgumentUnsupported,
    InternalError,
    InvalidArgument,
    NoSupport,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags, MigrationProtocol
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    Host,
    domain_xml,
    guest_or_skip,
    hosts,
    qemu_binary_or_skip,
    qemu_domain_xml,
)

F = MigrateFlags
P = MigrateParam
M = MigrationProtocol

# The three generations, as the daemon's config restricts them.
KINDS: dict[str, dict[str, object]] = {
    "v3+params": {},
    "v3": {"migration_params": False},
    "v2": {"migration_protocols": (2,)},
}
PAIRS = list(product(KINDS, KINDS))
CALLS = {
    M.V2: ["getxml", "prepare2", "perform", "finish2"],
    M.V3: ["begin", "prepare", "perform", "finish", "confirm"],
    M.V3_PARAMS: ["begin", "prepare", "perform", "finish", "confirm"],
}


def expected(src: str, dst: str) -> MigrationProtocol:
    if "v2" in (src, dst):
        return M.V2
    return M.V3_PARAMS if src == dst == "v3+params" else M.V3


@asynccontextmanager
async def fleet(tmp_path: Path, src: str, dst: str) -> AsyncIterator[tuple[Host, Host]]:
    async with hosts(tmp_path, "test", ("src", KINDS[src]), ("dst", KINDS[dst])) as (s, d):
        yield s, d


async def moved(src: Host, dst: Host, protocol: MigrationProtocol, digest: bytes) -> None:
    """The guest runs on the destination only, with the memory that left; both sides' completed
    jobs say which protocol ran."""
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    dom = await dst.conn.lookup("vm1")
    assert dst.digest(dom.uuid) == digest
    for host in (src, dst):
        done = await host.conn.job_info("vm1", completed=True)
        assert done.type is JobType.COMPLETED
        assert done.stat("virtmig.protocol") == protocol.value
        assert not [d for d in host.daemon.registry if d.job is not None]
    assert not dst.daemon.ports._used


@pytest.mark.parametrize(("src_kind", "dst_kind"), PAIRS)
async def test_regular(tmp_path: Path, src_kind: str, dst_kind: str) -> None:
    async with fleet(tmp_path, src_kind, dst_kind) as (src, dst):
        await running_guest(src)
        digest = src.digest((await src.conn.lookup("vm1")).uuid)
        trace = Trace()
        dom = await src.conn.migrate3("vm1", dst.conn, TypedParams(), F.LIVE, trace=trace)
        protocol = expected(src_kind, dst_kind)
        assert trace.protocol == protocol.value
        assert trace.calls == CALLS[protocol]
        assert dom.name == "vm1" and dom.state is DomainState.RUNNING
        await moved(src, dst, protocol, digest)


@pytest.mark.parametrize(("src_kind", "dst_kind"), PAIRS)
async def test_p2p(tmp_path: Path, src_kind: str, dst_kind: str) -> None:
    async with fleet(tmp_path, src_kind, dst_kind) as (src, dst):
        await running_guest(src)
        digest = src.digest((await src.conn.lookup("vm1")).uuid)
        trace = Trace()
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER,
                                       trace=trace)
        protocol = expected(src_kind, dst_kind)
        assert trace.protocol == protocol.value
        await moved(src, dst, protocol, digest)


async def test_p2p_tunnelled_v2(tmp_path: Path) -> None:
    """A tunnelled peer-to-peer v2 migration streams through the daemons' connection (Prepare2
    gives no URI to stream to)."""
    async with fleet(tmp_path, "v3+params", "v2") as (src, dst):
        await running_guest(src)
        digest = src.digest((await src.conn.lookup("vm1")).uuid)
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(),
                                       F.LIVE | F.PEER2PEER | F.TUNNELLED)
        await moved(src, dst, M.V2, digest)


async def test_v2_carries_rename_persist_and_paused(tmp_path: Path) -> None:
    """v2's arguments (dname, bandwidth, flags) arrive: a paused guest stays paused there."""
    async with fleet(tmp_path, "v3+params", "v2") as (src, dst):
        await running_guest(src)
        await src.conn.suspend("vm1")
        params = TypedParams.of({P.DEST_NAME: "vm1-new", P.BANDWIDTH: 1000})
        dom = await src.conn.migrate3("vm1", dst.conn, params,
                                      F.LIVE | F.PERSIST_DEST | F.UNDEFINE_SOURCE)
        assert dom.name == "vm1-new" and dom.persistent
        assert await dst.conn.state("vm1-new") == (DomainState.PAUSED, 1, "user")
        assert not [d.name for d in src.daemon.registry]  # undefined on the source


# --- refused, with nothing changed ----------------------------------------------------------------

XML_PARAM = "dest-xml"  # replaced by the guest's own XML in the test


def refusals() -> list[tuple[str, str, bool, dict[str, object], int, type[VirtmigError], str]]:
    """(src, dst, p2p, params, flags, error, message) for each pairing whose protocol cannot
    carry the request."""
    cases: list[tuple[str, str, bool, dict[str, object], int, type[VirtmigError], str]] = []
    for (s, d), p2p in product(PAIRS, (False, True)):
        proto = expected(s, d)
        # What the client's call to the source can carry decides too in peer-to-peer.
        if p2p and s == "v2":
            proto = M.V2
        if proto is M.V2:
            cases.append((s, d, p2p, {XML_PARAM: ""}, F.LIVE, ArgumentUnsupported,
                          "Unable to change target guest XML during migration"))
            cases.append((s, d, p2p, {}, F.LIVE | F.POSTCOPY, InvalidArgument,
                          r"unsupported flags \(0x8000\) in function virDomainMigratePrepare2"))
        if proto is not M.V3_PARAMS:
            cases.append((s, d, p2p, {P.AUTO_CONVERGE_INITIAL: 20}, F.LIVE | F.AUTO_CONVERGE,
                          ArgumentUnsupported, "extensible parameters"))
        if p2p and s == "v2":
            cases.append((s, d, p2p, {P.URI: "tcp://127.0.0.1:49152"}, F.LIVE, InternalError,
                          "Unable to override peer2peer migration URI"))
    return cases


@pytest.mark.parametrize(("src_kind", "dst_kind", "p2p", "values", "flags", "error", "message"),
                         refusals())
async def test_refused_before_anything_changes(
    tmp_path: Path, src_kind: str, dst_kind: str, p2p: bool, values: dict[str, object],
    flags: int, error: type[VirtmigError], message: str,
) -> None:
    async with fleet(tmp_path, src_kind, dst_kind) as (src, dst):
        await running_guest(src)
        if XML_PARAM in values:
            values = {P.DEST_XML: await src.conn.xml_desc("vm1", migratable=True)}
        params = TypedParams.of(values)  # type: ignore[arg-type]
        with pytest.raises(error, match=message):
            if p2p:
                await src.conn.migrate_to_uri3("vm1", dst.uri, params, flags | F.PEER2PEER)
            else:
                await src.conn.migrate3("vm1", dst.conn, params, flags)
        await assert_rolled_back(src, dst)


async def test_offline_needs_v3_on_both_sides(tmp_path: Path) -> None:
    async with fleet(tmp_path, "v3+params", "v2") as (src, dst):
        await src.conn.define(domain_xml("vm1"))
        flags = F.OFFLINE | F.PERSIST_DEST
        with pytest.raises(ArgumentUnsupported, match="not supported by the destination host"):
            await src.conn.migrate3("vm1", dst.conn, TypedParams(), flags)
        with pytest.raises(ArgumentUnsupported, match="not supported by the destination host"):
            await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), flags | F.PEER2PEER)
        with pytest.raises(ArgumentUnsupported, match="not supported by the source host"):
            await dst.conn.migrate3("vm1", src.conn, TypedParams(), flags)
        assert not [d for d in dst.daemon.registry]


async def test_change_protection_with_v2(tmp_path: Path) -> None:
    """libvirt's virDomainMigrate: a source that cannot enforce change protection refuses the
    flag before anything changes; a v3 source that can drops it when it falls back to v2 for a
    destination that speaks only v2 (v2's calls never had it), and the guest moves."""
    async with fleet(tmp_path, "v2", "v3+params") as (old, new):
        await running_guest(old)
        with pytest.raises(ArgumentUnsupported, match="cannot enforce change protection"):
            await old.conn.migrate3("vm1", new.conn, TypedParams(),
                                    F.LIVE | F.CHANGE_PROTECTION)
        await assert_rolled_back(old, new)

        await running_guest(new, "vm2")
        trace = Trace()
        dom = await new.conn.migrate3("vm2", old.conn, TypedParams(),
                                      F.LIVE | F.CHANGE_PROTECTION, trace=trace)
        assert trace.protocol == "v2" and trace.calls == CALLS[M.V2]
        assert dom.name == "vm2" and dom.state is DomainState.RUNNING
        assert await new.conn.state("vm2") == (DomainState.SHUTOFF, 4, "migrated")


@pytest.mark.parametrize(("kind", "rpc", "request_", "function"), [
    ("v2", "Begin3", pb.Begin3Request(domain=pb.DomainRef(name="vm1")),
     "virDomainMigrateBegin3"),
    ("v2", "Prepare3Params", pb.Prepare3ParamsRequest(), "virDomainMigratePrepare3Params"),
    ("v2", "Confirm3", pb.Confirm3Request(domain=pb.DomainRef(name="vm1")),
     "virDomainMigrateConfirm3"),
    ("v3", "Perform3Params", pb.Perform3ParamsRequest(domain=pb.DomainRef(name="vm1")),
     "virDomainMigratePerform3Params"),
    ("v3", "Finish3Params", pb.Finish3ParamsRequest(), "virDomainMigrateFinish3Params"),
    ("v3only", "Prepare2", pb.Prepare2Request(), "virDomainMigratePrepare2"),
    ("v3only", "Perform", pb.PerformRequest(domain=pb.DomainRef(name="vm1")),
     "virDomainMigratePerform"),
    ("v3only", "Finish2", pb.Finish2Request(dname="vm1"), "virDomainMigrateFinish2"),
])
async def test_a_daemon_refuses_the_rpcs_it_does_not_speak(
    tmp_path: Path, kind: str, rpc: str, request_: object, function: str,
) -> None:
    """As an older daemon would: the configured protocols are what it answers, not only what
    it advertises."""
    settings: dict[str, object] = ({"migration_protocols": (3,)} if kind == "v3only"
                                   else KINDS[kind])
    async with hosts(tmp_path, "test", ("old", settings)) as (old,):
        await running_guest(old)
        with pytest.raises(NoSupport, match=f"not supported by the connection driver: {function}"):
            await old.conn._call(getattr(old.conn.migration_stub, rpc), request_)
        assert (await old.conn.state("vm1"))[0] is DomainState.RUNNING
        assert not [d for d in old.daemon.registry if d.job is not None]


# --- once with QEMU -------------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("peer2peer", [False, True], ids=["regular", "p2p"])
async def test_v2_with_qemu(tmp_path: Path, peer2peer: bool) -> None:
    """A real guest moves with protocol v2 to a destination that speaks only v2: QEMU runs it
    there and is gone from the source (regular: Perform stopped it; peer-to-peer: the source
    daemon's Perform left it paused and stopped it once Finish2 reported it there)."""
    qemu_binary_or_skip()
    image = guest_or_skip()
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", KINDS["v2"])) as (src, dst):
        dom = await src.conn.define(qemu_domain_xml(image, "vm1", 256, dirty_mb=16,
                                                    dirty_rate=1))
        await src.conn.start("vm1")
        trace = Trace()
        if peer2peer:
            await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER,
                                           trace=trace)
            assert trace.protocol == "v2"
        else:
            await src.conn.migrate3("vm1", dst.conn, TypedParams(), F.LIVE, trace=trace)
            assert trace.protocol == "v2" and trace.calls == CALLS[M.V2]
        assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
        assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
        backend = dst.daemon.backend
        assert isinstance(backend, QemuBackend)
        assert (await backend.query(dom.uuid, "query-status"))["status"] == "running"
        assert src.daemon.backend.state(dom.uuid) is GuestRunState.SHUTOFF
        for host in (src, dst):
            done = await host.conn.job_info("vm1", completed=True)
            assert done.type is JobType.COMPLETED and done.stat("virtmig.protocol") == "v2"
            assert not [d for d in host.daemon.registry if d.job is not None]
