"""What the property tests found, each pinned by an ordinary example test: the smallest request
that showed the bug, and the clean refusal it gets now."""

from __future__ import annotations

import grpc
import pytest

from virtmig.client.rpc import RpcConnection
from virtmig.proto.errors import ERROR_METADATA_KEY
from virtmig.testing import Host


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

