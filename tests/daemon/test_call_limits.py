"""Limits on clients and their concurrent calls (issue 11): ``max_clients`` and
``max_calls_per_client``, refused with RESOURCE_EXHAUSTED naming the limit, and slots given back
however a call ends (completed, failed, refused, cancelled, its connection closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from virtmig.client.connection import AsyncConnection
from virtmig.daemon.limits import CallLimits
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import ERROR_METADATA_KEY, NoDomain, ResourceExhausted
from virtmig.testing import Host, domain_xml, hosts, wait_until

PER_CLIENT = "^resource busy: too many concurrent calls from this client: {n} in flight, " \
             "the limit max_calls_per_client is {n}$"
CLIENTS = "^resource busy: too many clients: {n} have calls in flight, the limit max_clients " \
          "is {n}$"


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Host]:
    """A daemon allowing 3 clients with calls in flight, 2 calls each."""
    async with hosts(tmp_path, "test", ("solo", {"max_clients": 3,
                                                 "max_calls_per_client": 2})) as (host,):
        yield host


def limits(host: Host) -> CallLimits:
    return host.daemon.calls


async def in_flight(host: Host, calls: int, clients: int) -> None:
    """Wait until the daemon counts exactly this many calls and clients."""
    await wait_until(lambda: (limits(host).calls, limits(host).clients) == (calls, clients),
                     timeout=10, what=f"{calls} calls of {clients} clients in flight")


def hold_events(conn: AsyncConnection) -> asyncio.Task[None]:
    """An ``events`` stream held open (no events come: nothing happens on the daemon)."""

    async def consume() -> None:
        async for _ in conn.events():
            pass

    return asyncio.get_running_loop().create_task(consume())


async def cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_calls_per_client(limited: Host) -> None:
    host = limited
    streams = [hold_events(host.conn), hold_events(host.conn)]
    await in_flight(host, 2, 1)
    with pytest.raises(ResourceExhausted, match=PER_CLIENT.format(n=2)):
        await host.conn.host(refresh=True)
    # The status is RESOURCE_EXHAUSTED, and the handler never ran (nothing was looked up).
    call = host.conn.domains_stub.Lookup(pb.DomainRequest(domain=pb.DomainRef(name="nosuch")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = {str(k): str(v) for k, v in await call.trailing_metadata()}
    assert trailers[ERROR_METADATA_KEY] == "ResourceExhausted"
    assert limits(host).refused == 2
    # Another connection is another client.
    async with await AsyncConnection.open(host.uri) as other:
        assert (await other.host(refresh=True)).hostname == "solo.test"
    # One stream ends: its slot is free again.
    await cancel(streams.pop())
    await in_flight(host, 1, 1)
    assert (await host.conn.host(refresh=True)).hostname == "solo.test"
    await cancel(*streams)
    await in_flight(host, 0, 0)


async def test_clients(limited: Host) -> None:
    host = limited
    conns = [await AsyncConnection.open(host.uri) for _ in range(3)]
    try:
        streams = [hold_events(c) for c in conns]
        await in_flight(host, 3, 3)
        # A fourth connection cannot even say hello; the three in flight go on.
        with pytest.raises(ResourceExhausted, match=CLIENTS.format(n=3)):
            await AsyncConnection.open(host.uri)
        with pytest.raises(ResourceExhausted, match=CLIENTS.format(n=3)):
            await host.conn.list_domains()
        assert (await conns[0].host(refresh=True)).hostname == "solo.test"
        # One client's calls end: another may come in.
        await cancel(streams.pop())
        await in_flight(host, 2, 2)
        assert await host.conn.list_domains() == []
        await cancel(*streams)
    finally:
        for conn in conns:
            await conn.close()
    await in_flight(host, 0, 0)


async def test_no_slot_leaks_however_calls_end(limited: Host) -> None:
    host = limited
    conn = host.conn
    await conn.define(domain_xml("vm1"))
    for _ in range(10):  # each more than the limits allow, if a slot leaked
        assert (await conn.host(refresh=True)).hostname == "solo.test"  # completed
        with pytest.raises(NoDomain):  # failed in the handler
            await conn.lookup("nosuch")
        with pytest.raises(NoDomain):  # a stream failed in the handler
            async for _ in conn.watch_job("nosuch"):
                pass
        streams = [hold_events(conn), hold_events(conn)]
        await in_flight(host, 2, 1)
        with pytest.raises(ResourceExhausted):  # refused: takes no slot
            await conn.lookup("vm1")
        await cancel(*streams)  # cancelled by the caller
        await in_flight(host, 0, 0)
    # A connection that closes with a session and a stream open frees both.
    other = await AsyncConnection.open(host.uri)
    await other.open_session()
    stream = hold_events(other)
    await in_flight(host, 2, 1)
    await other.close()
    await in_flight(host, 0, 0)
    await cancel(stream)
    assert limits(host).clients == 0 and limits(host).calls == 0


async def test_unix_socket_calls_count_as_clients(tmp_path: Path) -> None:
    """Over unix sockets every connection has the same peer: each call is a client of its own,
    bounded by max_clients (the read-only socket's calls too: the limits are the daemon's)."""
    run = tmp_path / "run"
    settings = {"listen": ("tls://127.0.0.1:0", f"unix://{run}/virtmigd.sock"),
                "readonly_socket": True, "max_clients": 3, "max_calls_per_client": 1}
    async with hosts(tmp_path, "test", ("solo", settings)) as (host,):
        rw = await AsyncConnection.open(f"virtmig+unix://{run}/virtmigd.sock")
        ro = await AsyncConnection.open(f"virtmig+unix://{run}/virtmigd-ro.sock")
        try:
            # Two calls on one unix connection, past max_calls_per_client = 1.
            streams = [hold_events(rw), hold_events(rw), hold_events(ro)]
            await in_flight(host, 3, 3)
            with pytest.raises(ResourceExhausted, match=CLIENTS.format(n=3)):
                await ro.list_domains()
            with pytest.raises(ResourceExhausted, match=CLIENTS.format(n=3)):
                await host.conn.list_domains()
            await cancel(*streams)
            await in_flight(host, 0, 0)
            assert await ro.list_domains() == []
        finally:
            await rw.close()
            await ro.close()


async def test_the_cli_migrate_fits_in_8_calls(tmp_path: Path) -> None:
    """``migrate --verbose`` holds a session, a job watch and events while it calls: it needs
    far fewer calls at once than the default max_calls_per_client (32)."""
    async with hosts(tmp_path, "test", ("src", {"max_calls_per_client": 8}),
                     ("dst", {"max_calls_per_client": 8})) as (src, dst):
        await src.conn.define(domain_xml("busy", 32, dirty_rate_mib=64))
        await src.conn.start("busy")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "virtmig.client.cli", "-c", src.uri, "migrate", "--live",
            "--verbose", "--postcopy", "--postcopy-after-precopy", "--timeout", "1",
            "--timeout-postcopy", "--bandwidth", "16", "busy", dst.uri,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert err.decode().endswith("Migration: [100.00 %]\n")
        assert (limits(src).refused, limits(dst).refused) == (0, 0)
