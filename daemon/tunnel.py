"""Tunnelled migration: the data stream travels inside the daemons' gRPC connection.

::

    source backend ──tcp──► 127.0.0.1:P (SrcTunnel) ══ gRPC Migration.Tunnel ══► dst_tunnel
                                                                                   │ tcp
                                                        incoming guest ◄── 127.0.0.1:port

The backends do not know: each sees an ordinary loopback TCP stream, so any backend whose
migration stream is a TCP connection (test, qemu) can be tunnelled.  No migration port is opened
to the network on the destination.

``VIR_MIGRATE_TLS`` with TUNNELLED adds no TLS of its own: the daemons' gRPC connection is mutual
TLS already, and the backends' loopback stream stays plain.  A backend that binds its stream to
the migration's stream token (test) proves it through the relay like any other byte.

This module is a streaming transport of raw bytes, so it stays at the wire's edge: it builds and
reads its ``TunnelChunk`` messages itself (``dname`` first, then ``data``) rather than through
``virtmig.daemon.wire``; there is no value to convert, only bytes to move.

A backend may open several connections for one migration (QEMU's multifd channels, each its own
Tunnel call).  Their order matters: QEMU before 8.0 takes the first connection it accepts for its
main channel, and fails (its process exits) when that is a multifd channel.  Plain TCP keeps the
order the source QEMU connected in; the tunnel keeps it too: the source numbers its connections
in the order it accepted them (``TunnelChunk.seq``), and the destination connects each to the
incoming guest only after the ones before it (:class:`TunnelOrder`, bounded by
``ORDER_TIMEOUT_S``).  When one connection of a tunnel fails (the destination ended its call
with an error), the source closes all of them: the backend sees its stream fail at once rather
than wait on channels nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from virtmig.client.connection import AsyncConnection
from virtmig.daemon.backend.base import StreamAddress
from virtmig.daemon.core import Daemon
from virtmig.daemon.eventloop import start_server
from virtmig.daemon.job import AsyncJob, Phase
from virtmig.proto import logsafe
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.aio import within
from virtmig.proto.errors import InvalidArgument, OperationFailed, OperationInvalid
from virtmig.proto.flags import MigrateFlags

log = logsafe.logger(__name__)

CHUNK = 256 * 1024
DRAIN_TIMEOUT_S = 30.0
#: How long a destination's tunnel connection waits for the connections before it to connect.
ORDER_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"


class TunnelOrder:
    """A migration's tunnel connections on the destination, connected to the incoming guest in
    the order the source accepted them (their ``seq``)."""

    def __init__(self) -> None:
        self._next = 0  # every connection before this one has connected (or failed to)
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def turn(self, seq: int, timeout: float = ORDER_TIMEOUT_S) -> AsyncIterator[None]:
        """Wait (at most ``timeout``) until connections ``0..seq-1`` have had their turn; the
        next one's turn comes when this block ends, however it ends."""
        async with self._changed:
            try:
                await within(self._changed.wait_for(lambda: self._next >= seq), timeout)
            except TimeoutError:
                raise OperationFailed(
                    f"migration tunnel connection {seq + 1} came, but connection "
                    f"{self._next + 1} did not within {timeout:g} s") from None
        try:
            yield
        finally:
            async with self._changed:
                self._next = max(self._next, seq + 1)
                self._changed.notify_all()


async def dst_tunnel(
    daemon: Daemon, requests: AsyncIterator[pb.TunnelChunk]
) -> AsyncIterator[pb.TunnelChunk]:
    """The destination's end: join the gRPC stream to the incoming guest's local port."""
    first = await anext(requests, None)
    if first is None:
        raise InvalidArgument("a tunnel must name the incoming domain in its first message")
    dom = daemon.registry.by_name(first.dname)
    job = dom.job
    if (job is None or job.kind is not AsyncJob.MIGRATION_IN or job.phase is not Phase.PREPARE
            or not job.flags & MigrateFlags.TUNNELLED or not job.port):
        raise OperationInvalid(f"domain '{dom.name}' is not waiting for a tunnelled migration")
    if job.tunnel_order is None:
        job.tunnel_order = TunnelOrder()
    async with job.tunnel_order.turn(first.seq):
        reader, writer = await asyncio.open_connection(LOOPBACK, job.port)

    async def upstream() -> None:
        try:
            if first.data:
                writer.write(first.data)
            async for chunk in requests:
                writer.write(chunk.data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                writer.write_eof()

    task = asyncio.get_running_loop().create_task(upstream())
    try:
        while data := await reader.read(CHUNK):
            yield pb.TunnelChunk(data=data)
    except OSError as exc:  # the incoming guest dropped its end: a failed stream, not a bug
        raise OperationFailed(f"migration tunnel: the incoming guest's connection failed: "
                              f"{exc}") from exc
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        writer.close()


class SrcTunnel:
    """The source's end: a loopback port for the backend, joined to the peer's Tunnel RPC."""

    def __init__(self, peer: AsyncConnection, dname: str) -> None:
        self.peer = peer
        self.dname = dname
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._accepted = 0  # connections accepted so far: the next one's seq

    async def __aenter__(self) -> StreamAddress:
        self._server, (_host, port) = await start_server(self._serve, LOOPBACK, 0)
        return StreamAddress(LOOPBACK, port)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self._server is not None
        self._server.close()
        if et is None and self._pumps:
            # Success: the backend closed its end; let the last bytes reach the destination
            # (a backend may call a stream complete before its peer has read everything).
            await asyncio.wait(list(self._pumps), timeout=DRAIN_TIMEOUT_S)
        for task in list(self._pumps):
            task.cancel()
        for task in list(self._pumps):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pumps.add(task)
        seq, self._accepted = self._accepted, self._accepted + 1
        call: Any = self.peer.migration_stub.Tunnel()
        try:
            await call.write(pb.TunnelChunk(dname=self.dname, seq=seq))

            async def upstream() -> None:
                while data := await reader.read(CHUNK):
                    await call.write(pb.TunnelChunk(data=data))
                await call.done_writing()

            up = asyncio.get_running_loop().create_task(upstream())
            try:
                while True:
                    msg = await call.read()
                    if not isinstance(msg, pb.TunnelChunk):
                        break  # end of stream
                    writer.write(msg.data)
                    await writer.drain()
            finally:
                up.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await up
        except Exception as exc:  # the peer went away: the backend sees the stream end
            log.info("migration tunnel to the destination closed: %s", exc)
            for other in self._pumps - {task}:  # and its other connections with it
                other.cancel()
        except asyncio.CancelledError:
            # Ended by this tunnel (another connection failed, or the tunnel closed): not an
            # error.  asyncio's server would log a connection task that ends cancelled as one.
            pass
        finally:
            call.cancel()
            writer.close()
            self._pumps.discard(task)
