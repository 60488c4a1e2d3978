"""Shared by the one-place tests: a loopback gate in front of a daemon (shut, it is a closed
port; opened again, the same port reaches the daemon), fast settling settings, and the fake
destinations whose Finish reply is lost.
"""

from __future__ import annotations

import asyncio
import contextlib

from virtmig.client.migrate import RemoteDest
from virtmig.proto.errors import ConnectionFailed
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, free_port

# Settle quickly in tests (bounds, not timings: the waits are bounded by wait_until).
FAST: dict[str, object] = {"settle_retry_min": 0.05, "settle_retry_max": 0.2, "peer_timeout": 5.0}


class Gate:
    """A TCP forwarder on a fixed loopback port to ``host``'s listener."""

    def __init__(self, host: Host) -> None:
        self.target = host.running.tcp_port
        self.port = free_port()
        self.uri = f"virtmig+tls://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  reuse_address=True)

    async def shut(self) -> None:
        """Nobody listens on the port any more, and the connections through it are cut."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


class LostFinishDest(RemoteDest):
    """Finish's reply is lost, and the destination cannot be asked by the client.

    ``reaches``: whether the Finish call reached the destination (the guest then runs there) or
    was lost on the way (the incoming guest waits there until it is rolled back).
    """

    def __init__(self, conn: object, reaches: bool) -> None:
        super().__init__(conn, True)  # type: ignore[arg-type]
        self.reaches = reaches

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        if self.reaches:
            await super().finish(params, cookie, flags, cancelled)
        raise ConnectionFailed("unable to connect to the daemon: connection reset")

    async def finished(self, dname: str) -> bool:
        raise ConnectionFailed("unable to connect to the daemon: no route")
