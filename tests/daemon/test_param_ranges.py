"""One range per typed parameter, enforced alike on every path that sets it (issue 11).

Bandwidth travels as the ``bandwidth`` param of the ``*Params`` RPCs, as the ``resource`` field of
the non-params ones (protocol v2's ``Prepare2`` and ``Perform`` included, and peer-to-peer runs
whatever RPC starts them), and as ``SetMaxSpeed``'s value (either phase); the maximum downtime as
``SetMaxDowntime``'s.  Each path is called here as a hostile client would, past the client
library's own check (the raw stubs), and must be refused by the daemon with the same typed error
and change nothing; the library refuses the same values before it sends anything.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.daemon.migration_helpers import begun_xml_and_cookie, running_guest
from virtmig.client.connection import AsyncConnection
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import InvalidArgument, NoDomain, Overflow
from virtmig.proto.flags import MAX_BANDWIDTH_MIB, MAX_DOWNTIME_MS, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.proto.wire import to_wire
from virtmig.testing import Host

F = MigrateFlags
P = MigrateParam
HUGE = 2**64 - 1  # the largest uint64: what a hostile client sends
OVERFLOW = f"^numerical overflow: bandwidth must be less than {MAX_BANDWIDTH_MIB + 1}$"
REF = pb.DomainRef(name="vm1")


async def closed_connection(host: Host) -> AsyncConnection:
    """A connection to ``host`` that can send nothing any more: a call that reaches the wire
    fails, so a refusal from it was the library's own check."""
    conn = await AsyncConnection.open(host.uri)
    await conn.close()
    return conn


async def assert_untouched(src: Host, dst: Host) -> None:
    """The guest runs on the source with no job, the destination has no domain and no port."""
    assert (await src.conn.job_info("vm1")).type is JobType.NONE
    assert not [d for d in src.daemon.registry if d.job is not None]
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    assert not list(dst.daemon.registry)
    assert not dst.daemon.ports._used


@pytest.mark.parametrize("postcopy", [False, True], ids=["precopy", "postcopy"])
async def test_set_max_speed_has_the_bandwidth_range(pair: tuple[Host, Host],
                                                     postcopy: bool) -> None:
    src, _dst = pair
    await running_guest(src)
    conn = src.conn
    for bad in (MAX_BANDWIDTH_MIB + 1, HUGE):
        with pytest.raises(Overflow, match=OVERFLOW):
            await conn._call(conn.migration_stub.SetMaxSpeed, pb.SpeedRequest(
                domain=REF, bandwidth_mib=bad, flags=int(postcopy)))
        assert await conn.get_max_speed("vm1", postcopy=postcopy) == (
            0 if postcopy else MAX_BANDWIDTH_MIB)  # unchanged: unlimited
        with pytest.raises(Overflow, match=OVERFLOW):
            await (await closed_connection(src)).set_max_speed("vm1", bad, postcopy=postcopy)
    await conn.set_max_speed("vm1", MAX_BANDWIDTH_MIB, postcopy=postcopy)
    assert await conn.get_max_speed("vm1", postcopy=postcopy) == MAX_BANDWIDTH_MIB


async def test_set_max_downtime_has_one_range(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    await running_guest(src)
    conn = src.conn
    for bad in (0, MAX_DOWNTIME_MS + 1, HUGE):
        message = (f"^invalid argument: Invalid downtime {bad}: must be between 1 and "
                   f"{MAX_DOWNTIME_MS} ms$")
        with pytest.raises(InvalidArgument, match=message):
            await conn._call(conn.migration_stub.SetMaxDowntime,
                             pb.DowntimeRequest(domain=REF, downtime_ms=bad))
        assert await conn.get_max_downtime("vm1") == 300
        with pytest.raises(InvalidArgument, match=message):
            await (await closed_connection(src)).set_max_downtime("vm1", bad)
    await conn.set_max_downtime("vm1", MAX_DOWNTIME_MS)
    assert await conn.get_max_downtime("vm1") == MAX_DOWNTIME_MS


def _bw(value: int, name: str = P.BANDWIDTH) -> list[pb.TypedParam]:
    return to_wire(TypedParams.of({name: value}))


# Each migration RPC that carries a bandwidth, with an out-of-range one: (conn, xml, cookie) ->
# the call.  Prepare gets a real domain XML and cookie from a Begin, so that only the bandwidth
# is wrong.
Call = Callable[[AsyncConnection, AsyncConnection, str, bytes, int], Awaitable[Any]]
SRC_CALLS: dict[str, Call] = {
    "Begin3": lambda s, d, x, c, bw: s._call(s.migration_stub.Begin3, pb.Begin3Request(
        domain=REF, flags=F.LIVE, resource=bw)),
    "Begin3Params": lambda s, d, x, c, bw: s._call(s.migration_stub.Begin3Params,
                                                   pb.Begin3ParamsRequest(
        domain=REF, flags=F.LIVE, params=_bw(bw))),
    "Begin3Params-postcopy": lambda s, d, x, c, bw: s._call(
        s.migration_stub.Begin3Params, pb.Begin3ParamsRequest(
            domain=REF, flags=F.LIVE | F.POSTCOPY, params=_bw(bw, P.BANDWIDTH_POSTCOPY))),
    "Perform3": lambda s, d, x, c, bw: s._call(s.migration_stub.Perform3, pb.Perform3Request(
        domain=REF, flags=F.LIVE, uri="tcp://127.0.0.1:1", resource=bw)),
    "Perform3Params": lambda s, d, x, c, bw: s._call(
        s.migration_stub.Perform3Params, pb.Perform3ParamsRequest(
            domain=REF, flags=F.LIVE,
            params=[*to_wire(TypedParams.of({P.URI: "tcp://127.0.0.1:1"})), *_bw(bw)])),
    "Prepare3": lambda s, d, x, c, bw: d._call(d.migration_stub.Prepare3, pb.Prepare3Request(
        cookie_in=c, flags=F.LIVE, dom_xml=x, resource=bw)),
    "Prepare3Params": lambda s, d, x, c, bw: d._call(
        d.migration_stub.Prepare3Params, pb.Prepare3ParamsRequest(
            cookie_in=c, flags=F.LIVE,
            params=[*to_wire(TypedParams.of({P.DEST_XML: x})), *_bw(bw)])),
    # Protocol v2: no Begin, no params; the bandwidth is Prepare2's and Perform's ``resource``.
    "Prepare2": lambda s, d, x, c, bw: d._call(d.migration_stub.Prepare2, pb.Prepare2Request(
        flags=F.LIVE, dom_xml=x, resource=bw)),
    "Perform": lambda s, d, x, c, bw: s._call(s.migration_stub.Perform, pb.PerformRequest(
        domain=REF, flags=F.LIVE, uri="tcp://127.0.0.1:1", resource=bw)),
    # Peer-to-peer: the source daemon runs the migration itself, with the destination's real
    # URI (a missing check would migrate, not fail).
    "Perform-p2p": lambda s, d, x, c, bw: s._call(s.migration_stub.Perform, pb.PerformRequest(
        domain=REF, flags=F.LIVE | F.PEER2PEER, uri=str(d.uri), resource=bw)),
    "Perform3-p2p": lambda s, d, x, c, bw: s._call(s.migration_stub.Perform3, pb.Perform3Request(
        domain=REF, flags=F.LIVE | F.PEER2PEER, dconnuri=str(d.uri), resource=bw)),
    "Perform3Params-p2p": lambda s, d, x, c, bw: s._call(
        s.migration_stub.Perform3Params, pb.Perform3ParamsRequest(
            domain=REF, flags=F.LIVE | F.PEER2PEER, dconnuri=str(d.uri), params=_bw(bw))),
}


@pytest.mark.parametrize("rpc", sorted(SRC_CALLS))
async def test_every_migration_rpc_refuses_a_bandwidth_out_of_range(
        pair: tuple[Host, Host], rpc: str) -> None:
    src, dst = pair
    await running_guest(src)
    xml, cookie = await begun_xml_and_cookie(src)  # so that only the bandwidth is wrong
    await assert_untouched(src, dst)
    for bad in (MAX_BANDWIDTH_MIB + 1, HUGE):
        with pytest.raises(Overflow, match=OVERFLOW):
            await SRC_CALLS[rpc](src.conn, dst.conn, xml, cookie, bad)
        await assert_untouched(src, dst)


async def test_the_largest_bandwidth_migrates(pair: tuple[Host, Host]) -> None:
    """The top of the range is accepted by every phase: a migration at MAX_BANDWIDTH_MIB."""
    src, dst = pair
    await running_guest(src)
    dom = await src.conn.migrate3("vm1", dst.conn, TypedParams.of(
        {P.BANDWIDTH: MAX_BANDWIDTH_MIB}), F.LIVE)
    assert dom.name == "vm1" and (await dst.conn.state("vm1"))[0].label == "running"


@pytest.mark.parametrize(
    ("flags", "name", "value", "message"),
    [
        (F.AUTO_CONVERGE, P.AUTO_CONVERGE_INITIAL, 100,
         "'auto_converge.initial' must be between 1 and 99, got 100"),
        (F.AUTO_CONVERGE, P.AUTO_CONVERGE_INCREMENT, 0,
         "'auto_converge.increment' must be between 1 and 99, got 0"),
        (0, P.STALL_TIMEOUT, 2**31, "'virtmig.stall_timeout' must be between 0 and 2147483647"),
        (0, P.COMPLETION_TIMEOUT, HUGE, "'virtmig.completion_timeout' must be between 0 and"),
        (0, P.COMPLETION_TIMEOUT_ACTION, "explode",
         "'virtmig.completion_timeout_action' must be one of abort, suspend, postcopy"),
        # Ranges come before the backend's flag check: the value is what is wrong.
        (F.PARALLEL, P.PARALLEL_CONNECTIONS, 256,
         "'parallel.connections' must be between 1 and 255, got 256"),
    ],
)
async def test_the_daemon_checks_each_params_range(
        pair: tuple[Host, Host], flags: int, name: str, value: int | str, message: str) -> None:
    src, dst = pair
    await running_guest(src)
    params = TypedParams.of({name: value})
    conn = src.conn
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        await conn._call(conn.migration_stub.Begin3Params, pb.Begin3ParamsRequest(
            domain=REF, flags=F.LIVE | flags, params=to_wire(params)))
    await assert_untouched(src, dst)
    with pytest.raises(InvalidArgument, match=re.escape(message)):  # the library's own check
        await (await closed_connection(src)).migrate3("vm1", dst.conn, params, F.LIVE | flags)
