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
from virtmig.daemon.job import AsyncJob, Phase
from virtmig.proto import logsafe
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import InvalidArgument, OperationInvalid
from virtmig.proto.flags import MigrateFlags

log = logsafe.logger(__name__)

CHUNK = 256 * 1024
DRAIN_TIMEOUT_S = 30.0
LOOPBACK = "127.0.0.1"


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

    async def __aenter__(self) -> StreamAddress:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        port = self._server.sockets[0].getsockname()[1]
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
        call: Any = self.peer.migration_stub.Tunnel()
        try:
            await call.write(pb.TunnelChunk(dname=self.dname))

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
        finally:
            call.cancel()
            writer.close()
            self._pumps.discard(task)
