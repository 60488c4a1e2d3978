"""The tunnel's two ends, without gRPC: the destination connects a migration's tunnel
connections to the incoming guest in the order the source accepted them, and a source whose
connection fails closes the others.

QEMU 7.2 takes the first connection it accepts for its main channel; with multifd over the
tunnel, the destination's connections raced each other and a multifd channel could come first
(QEMU then exits and the migration hangs on the channels nobody reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from testing.wait import wait_until
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.limits import CallLimits
from virtmig.daemon.migration.tuning import check_tunnel_streams
from virtmig.daemon.tunnel import SrcTunnel, TunnelOrder, dst_tunnel
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.aio import within
from virtmig.proto.errors import ArgumentUnsupported, OperationFailed
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam as P
from virtmig.proto.params import TypedParams


async def test_connections_take_their_turns_in_order() -> None:
    order, seen = TunnelOrder(), []

    async def connection(seq: int) -> None:
        async with order.turn(seq):
            seen.append(seq)

    await asyncio.gather(*(connection(seq) for seq in (2, 1, 0)))
    assert seen == [0, 1, 2]


async def test_a_connection_whose_elders_never_come_fails_in_bounded_time() -> None:
    with pytest.raises(OperationFailed, match=re.escape(
            "migration tunnel connection 2 came, but connection 1 did not within 0.05 s")):
        async with TunnelOrder().turn(1, timeout=0.05):
            pass


async def test_a_failed_turn_lets_the_next_connection_go() -> None:
    order = TunnelOrder()
    with contextlib.suppress(ConnectionRefusedError):
        async with order.turn(0):
            raise ConnectionRefusedError
    async with order.turn(1, timeout=1):
        pass


class Listener:
    """The incoming guest's port: the first bytes of each connection, in the order accepted."""

    def __init__(self) -> None:
        self.accepted: list[asyncio.Future[bytes]] = []

    async def __aenter__(self) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.accepted.append(got)
            got.set_result(await reader.read(1))
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return cast(int, self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


async def chunks(*messages: pb.TunnelChunk) -> AsyncIterator[pb.TunnelChunk]:
    for message in messages:
        yield message
    await asyncio.Event().wait()  # the source keeps its side open


def waiting_destination(port: int) -> Any:
    """What dst_tunnel reads of a daemon: a domain whose tunnelled migration is prepared."""
    job = MigrationJob(AsyncJob.MIGRATION_IN, Phase.PREPARE, MigrateFlags.TUNNELLED, port=port)
    dom = SimpleNamespace(name="vm1", job=job)
    return SimpleNamespace(registry=SimpleNamespace(by_name=lambda name: dom))


async def test_the_destination_connects_in_the_sources_order() -> None:
    """Connection 2's call comes first; it reaches the guest after connection 1 all the same."""
    listener = Listener()
    async with listener as port:
        daemon = waiting_destination(port)
        second = asyncio.ensure_future(anext(dst_tunnel(daemon, chunks(
            pb.TunnelChunk(dname="vm1", seq=1, data=b"B")))))
        # (without the order, it connects at once)
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: listener.accepted, timeout=0.5, what="a connection")
        first = asyncio.ensure_future(anext(dst_tunnel(daemon, chunks(
            pb.TunnelChunk(dname="vm1", seq=0, data=b"A")))))
        await wait_until(lambda: len(listener.accepted) == 2, timeout=10,
                         what="both connections")
        assert [await got for got in listener.accepted] == [b"A", b"B"]
        for pending in (first, second):
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


class Call:
    """A Tunnel call that keeps what the source wrote; ``replies`` feeds its reads."""

    def __init__(self) -> None:
        self.written: list[pb.TunnelChunk] = []
        self.replies: asyncio.Queue[pb.TunnelChunk | Exception] = asyncio.Queue()

    async def write(self, message: pb.TunnelChunk) -> None:
        self.written.append(message)

    async def done_writing(self) -> None:
        pass

    async def read(self) -> pb.TunnelChunk:
        reply = await self.replies.get()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def cancel(self) -> None:
        pass


def peer_with(calls: list[Call]) -> Any:
    def open_call() -> Call:
        calls.append(Call())
        return calls[-1]

    return SimpleNamespace(migration_stub=SimpleNamespace(Tunnel=open_call))


async def test_the_source_numbers_its_connections_and_closes_all_when_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[Call] = []

    def calls_started(count: int) -> Callable[[], bool]:
        return lambda: len(calls) == count and bool(calls[-1].written)

    async with SrcTunnel(peer_with(calls), "vm1") as end:
        opened = []
        for n in (1, 2, 3):
            opened.append(await asyncio.open_connection(end.host, end.port))
            await wait_until(calls_started(n), timeout=10, what=f"connection {n}'s call")
        assert [(c.written[0].dname, c.written[0].seq) for c in calls] == [
            ("vm1", 0), ("vm1", 1), ("vm1", 2)]
        calls[0].replies.put_nowait(ConnectionResetError("the destination's guest went away"))
        for reader, writer in opened:  # every connection ends: the backend sees its stream fail
            assert await within(reader.read(), 10) == b""
            writer.close()
    # the connections it closed are not errors (asyncio logs a connection task that ended
    # cancelled as one)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_guest_that_resets_its_connection_fails_the_tunnel_call() -> None:
    """An OSError from the incoming guest's connection is a failed stream (OperationFailed),
    not a bug of the daemon's (INTERNAL, logged with a traceback)."""
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    async with server:
        daemon = waiting_destination(server.sockets[0].getsockname()[1])
        with pytest.raises(OperationFailed, match=r"migration tunnel: the incoming guest's "
                                                  r"connection failed: .*reset by peer"):
            await within(anext(dst_tunnel(daemon, chunks(pb.TunnelChunk(dname="vm1")))), 10)


def test_a_tunnelled_migrations_calls_must_fit_the_destinations_limit() -> None:
    """Its session and one Tunnel call per connection (the main one and each parallel one)."""
    daemon: Any = SimpleNamespace(calls=CallLimits(max_calls_per_client=32))
    f = MigrateFlags.LIVE | MigrateFlags.PEER2PEER | MigrateFlags.TUNNELLED
    parallel = f | MigrateFlags.PARALLEL
    check_tunnel_streams(daemon, parallel, TypedParams.of({P.PARALLEL_CONNECTIONS: 30}))
    check_tunnel_streams(daemon, f, TypedParams())
    with pytest.raises(ArgumentUnsupported, match=re.escape(
            "a tunnelled migration with 31 parallel connections needs 33 calls at once on the "
            "source daemon's connection; this daemon allows 32 (max_calls_per_client)")):
        check_tunnel_streams(daemon, parallel, TypedParams.of({P.PARALLEL_CONNECTIONS: 31}))
    daemon.calls = CallLimits(max_calls_per_client=1)
    with pytest.raises(ArgumentUnsupported, match="with 0 parallel connections needs 2 calls"):
        check_tunnel_streams(daemon, f, TypedParams())
    check_tunnel_streams(daemon, f & ~MigrateFlags.TUNNELLED, TypedParams())  # not tunnelled
