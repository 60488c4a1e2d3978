"""What the property tests found, each pinned by an ordinary example test: the smallest request
that showed the bug, and the clean refusal it gets now."""

from __future__ import annotations

import grpc
import pytest

from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.rpc import RpcConnection
from virtmig.daemon.backend.test import TestBackend
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import ERROR_METADATA_KEY
from virtmig.proto.flags import DomainState
from virtmig.proto.flags import MigrateFlags as F
from virtmig.proto.params import MigrateParam as P
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, domain_xml


async def test_empty_tunnel_stream_is_refused(pair: tuple[Host, Host]) -> None:
    """A Tunnel stream that ends before its first message (found: INTERNAL, "async generator
    raised StopAsyncIteration")."""
    _src, dst = pair
    async with await RpcConnection.open(dst.uri) as conn:
        call = conn.migration_stub.Tunnel(iter(()), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    trailers: dict[str, object] = dict(err.value.trailing_metadata() or ())  # type: ignore[arg-type]
    assert trailers[ERROR_METADATA_KEY] == "InvalidArgument"
    assert "first message" in (err.value.details() or "")


async def test_confirm_with_a_bad_cookie_can_still_be_cancelled(pair: tuple[Host, Host]) -> None:
    """Confirm with a bad cookie left the job in phase confirm3, so the Confirm(cancelled) that
    follows failed with INTERNAL "migration protocol going backwards" and the job stayed."""
    src, dst = pair
    await src.conn.define(domain_xml("vm1", memory_mib=4))
    await src.conn.start("vm1")
    s, d = RemoteSource(src.conn, False), RemoteDest(dst.conn, False)
    xml, cookie = await s.begin("vm1", TypedParams(), F.LIVE)
    cookie, uri = await d.prepare(TypedParams.of({P.DEST_XML: xml}), cookie, F.LIVE)
    await s.perform("vm1", TypedParams.of({P.URI: uri or ""}), cookie, F.LIVE)
    ref = pb.DomainRef(name="vm1")
    stub = src.conn.migration_stub
    with pytest.raises(grpc.aio.AioRpcError, match="cookie"):
        await stub.Confirm3(pb.Confirm3Request(domain=ref, cookie_in=b"bad", flags=F.LIVE))
    await stub.Confirm3(pb.Confirm3Request(domain=ref, flags=F.LIVE, cancelled=True))
    assert src.daemon.registry.by_name("vm1").job is None
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_migrated_domains_leave_nothing_in_the_test_backends(pair: tuple[Host, Host]) -> None:
    """After a completed migration and the destroy of the migrated guest, the test backends kept
    each migration (and through it both guests' page structures) for the daemon's life: RSS grew
    with every migrated domain (found: the check that ended migrations hold no guest)."""
    src, dst = pair
    for name in ("vm1", "vm2", "vm3"):
        await src.conn.define(domain_xml(name, memory_mib=4, dirty_rate_mib=2))
        await src.conn.start(name)
        await src.conn.migrate3(name, dst.conn, TypedParams(), F.LIVE)
        await dst.conn.destroy(name)
    for host in (src, dst):
        backend = host.daemon.backend
        assert isinstance(backend, TestBackend)
        assert (backend._guests, backend._progress, backend._incoming) == ({}, {}, {})
        assert len(backend._ended) == 3


@pytest.mark.parametrize("uri", ["tcp://[::1", "tcp:[::1:49152", "tcp://[127.0.0.1]:49152"])
async def test_unparsable_migration_uri_is_refused(pair: tuple[Host, Host], uri: str) -> None:
    """A migration URI urllib cannot split (an unbalanced IPv6 bracket) in Prepare's ``uri_in``
    or Perform's ``uri`` (found: INTERNAL "ValueError: Invalid IPv6 URL", logged as a bug)."""
    src, dst = pair
    await src.conn.define(domain_xml("vm1", memory_mib=4))
    await src.conn.start("vm1")
    s = RemoteSource(src.conn, False)
    xml, cookie = await s.begin("vm1", TypedParams(), F.LIVE)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await dst.conn.migration_stub.Prepare3(pb.Prepare3Request(
            cookie_in=cookie, flags=F.LIVE, dom_xml=xml, uri_in=uri))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Unable to parse migration URI" in (err.value.details() or "")
    assert not list(dst.daemon.registry)
    d = RemoteDest(dst.conn, False)
    cookie, _uri = await d.prepare(TypedParams.of({P.DEST_XML: xml}), cookie, F.LIVE)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await src.conn.migration_stub.Perform3(pb.Perform3Request(
            domain=pb.DomainRef(name="vm1"), cookie_in=cookie, flags=F.LIVE, uri=uri))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Unable to parse migration URI" in (err.value.details() or "")
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
