"""A QEMU migration that stalls in its completion phase still ends (qemu backend).

In its completion phase the source QEMU stops the vCPUs and its migration thread writes the last
pages and the device state while holding the big QEMU lock: a destination that stops reading then
blocks that write for good, and with it QEMU's main loop and every ordinary QMP command,
``migrate_cancel`` included.  The stall watchdog's cancel must still end the migration (the
backend yanks the migration sockets out of band), and the source guest must run again.

The reproduction: a proxy between source and destination forwards the stream at 16 MiB/s and
stops reading for good once the source QEMU stops its vCPUs (its ``STOP`` event: the completion
phase), with small socket buffers so that the rest of the stream cannot hide in them; once the
stream flows, a downtime limit of ten minutes sends QEMU into that phase with most of the guest's
memory left to send.

And when even the ``yank`` does not help (a QEMU that answers nothing at all: stopped with
SIGSTOP), the backend's flow still ends, with its own error, and leaves the guest alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Host, hosts, qemu_domain_xml
from tests.daemon.backend_qemu_helpers import SLOW, make_spec, to, wait_status, within
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon.backend.base import GuestRunState, MigrationFailed, MigrationStatus
from virtmig.daemon.backend.qemu import QemuBackend, outgoing
from virtmig.proto.errors import NoDomain, OperationTimeout
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    guest_or_skip,
    kill_leftover_qemus,
    qemu_binary_or_skip,
    qemu_settings,
    wait_until,
)

pytestmark = pytest.mark.qemu

F = MigrateFlags
P = MigrateParam
LINK_RATE = 16 << 20  # bytes/s through the proxy
SOCKET_BUFFER = 64 << 10  # the proxy's receive buffer (the kernel doubles it)
BOOT_TIMEOUT = 120.0  # until the guest dirties its memory (about 6 s under TCG, more under load)
# The stall watchdog's bound: a margin over a busy machine's pauses in pre-copy (the proxy runs in
# the test's event loop).
STALL_S = 5
# The whole migration, stall included: stall watchdog (STALL_S), cancel, yank, settle.  Without the
# yank it never ends.
MIGRATION_BOUND = 90.0
STREAMING = 4 << 20  # bytes through the proxy: the migration streams
COMPLETE_NOW_MS = 600_000  # a downtime limit that anything left to send fits in
HEARTBEAT = re.compile(rb"HEARTBEAT n=(\d+)")


class FreezeProxy:
    """Forwards a stream at ``rate`` bytes/s to ``target``; stops reading from the source for good
    once ``frozen()`` is true (checked before each read)."""

    def __init__(self, frozen: Callable[[], bool], rate: int) -> None:
        self.target: tuple[str, int] = ("", 0)
        self.frozen = frozen
        self.rate = rate
        self.froze = False
        self.forwarded = 0  # bytes forwarded to the target
        self._closed = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, to_writer]
        await asyncio.gather(self._up(reader, to_writer), self._down(to_reader, writer),
                             return_exceptions=True)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            if self.frozen():
                self.froze = True
                await self._closed.wait()  # a peer that never reads again
                return
            data = await reader.read(65536)
            if not data:
                return
            writer.write(data)
            await writer.drain()
            self.forwarded += len(data)
            await asyncio.sleep(len(data) / self.rate)  # the link's rate, not a synchronisation

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    def close(self) -> None:
        self._closed.set()
        for w in self._writers:
            w.close()


@contextlib.asynccontextmanager
async def proxy_server(proxy: FreezeProxy) -> AsyncIterator[int]:
    """The proxy on a loopback port (its connections get small receive buffers)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(proxy.handle, sock=sock)
    try:
        yield sock.getsockname()[1]
    finally:
        proxy.close()
        server.close()
        await server.wait_closed()


class ProxyDest(RemoteDest):
    """The destination as prepared, reached through the proxy on ``port``."""

    def __init__(self, dst: Host, proxy: FreezeProxy, port: int) -> None:
        super().__init__(dst.conn, True)
        self.proxy = proxy
        self.port = port

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, uri = await super().prepare(params, cookie, flags)
        assert uri is not None and uri.startswith("tcp:")
        host, port = uri[len("tcp:"):].rsplit(":", 1)
        self.proxy.target = (host.strip("[]"), int(port))
        return cookie, f"tcp:127.0.0.1:{self.port}"


def heartbeat(log: Path) -> int:
    """The last heartbeat counter in a serial log (-1: none yet)."""
    beats = HEARTBEAT.findall(log.read_bytes()) if log.exists() else []
    return int(beats[-1]) if beats else -1


async def until(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check`` until it holds; fail when ``timeout`` runs out."""
    await wait_until(check, timeout=timeout, what=what, interval=0.1)


async def test_stall_in_completion_phase_ends_and_the_source_runs(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    image = guest_or_skip()
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", {})) as (src, dst):
        await src.conn.define(qemu_domain_xml(image, "vm1", 256, dirty_mb=64, dirty_rate=8))
        await src.conn.start("vm1")
        uuid = (await src.conn.lookup("vm1")).uuid
        backend = src.daemon.backend
        assert isinstance(backend, QemuBackend)
        serial = src.serial_log(uuid)
        await until("the guest dirties its memory",
                    lambda: serial.exists() and b"DIRTY-READY" in serial.read_bytes(),
                    BOOT_TIMEOUT)
        sent: list[str] = []
        real_exec = backend._exec

        async def spy(guest: Any, command: str, args: dict[str, Any] | None = None,
                      **kw: Any) -> dict[str, Any]:
            sent.append(command)
            return await real_exec(guest, command, args, **kw)

        guest = backend._guests[uuid]
        # The jobs belong to this caller's sessions, as the client's migrate3 makes them: a job
        # no session owns is rolled back after incoming_job_timeout (60 s), and under load this
        # migration took longer (the destination went, the stream stalled in pre-copy).
        await src.conn.open_session()
        await dst.conn.open_session()
        proxy = FreezeProxy(lambda: guest.status != "running", LINK_RATE)
        async with proxy_server(proxy) as port:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(backend, "_exec", spy)
                flow = asyncio.create_task(asyncio.wait_for(
                    run_v3(RemoteSource(src.conn, True), ProxyDest(dst, proxy, port), "vm1",
                           TypedParams.of({P.STALL_TIMEOUT: STALL_S}), F.LIVE, protection=True),
                    MIGRATION_BOUND))
                # Once the stream flows, a downtime limit far beyond what is left sends QEMU into
                # its completion phase at its next check, whatever pre-copy's pace (a guest
                # dirtying at half the link's rate converged only slowly when both cores were
                # busy: the bound ran out in pre-copy), with most of the memory still to send.
                await until("the stream to flow",
                            lambda: proxy.forwarded >= STREAMING or flow.done(), BOOT_TIMEOUT)
                if not flow.done():
                    await src.conn.set_max_downtime("vm1", COMPLETE_NOW_MS)
                with pytest.raises(OperationTimeout, match="migration stalled"):
                    await flow
        assert proxy.froze, "the source never stopped its vCPUs: no completion phase"
        assert "yank" in sent, "migrate_cancel ended it: the stall was not in the completion phase"

        # The source guest runs again, QEMU says so, and its heartbeat goes on.
        assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
        assert (await backend.query(uuid, "query-status"))["status"] == "running"
        last = heartbeat(serial)
        await until("the source guest's heartbeat goes on", lambda: heartbeat(serial) > last, 15)
        # Nothing on the destination, no job on either side.
        with pytest.raises(NoDomain):
            await dst.conn.lookup("vm1")
        assert not dst.daemon.ports._used
        for host in (src, dst):
            assert not [d.name for d in host.daemon.registry if d.job is not None]
        done = await src.conn.job_info("vm1", completed=True)
        assert done.type is JobType.FAILED and "stalled" in done.error


@contextlib.asynccontextmanager
async def blackhole() -> AsyncIterator[int]:
    """A port that accepts the stream and never reads it."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def src(tmp_path: Path) -> AsyncIterator[QemuBackend]:
    qemu_binary_or_skip()
    b = QemuBackend(qemu_settings(tmp_path))  # confined, as every test backend
    await within(b.open(tmp_path / "src"))
    try:
        yield b
    finally:
        for uuid in list(b._guests):
            await within(b.destroy(uuid))
        await within(b.close())
        assert not kill_leftover_qemus(tmp_path), "a test left QEMU processes running"


async def test_cancel_gives_up_on_a_qemu_that_answers_nothing(
    src: QemuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither ``migrate_cancel`` nor the out-of-band ``yank`` is answered: the flow fails with
    its own error within its bounds, and the guest is left alone (its QEMU still runs, and runs
    the guest again once it answers)."""
    monkeypatch.setattr(outgoing, "CANCEL_ANSWER_TIMEOUT", 0.5)
    monkeypatch.setattr(outgoing, "CANCEL_TIMEOUT", 1.0)
    monkeypatch.setattr(outgoing, "YANK_TIMEOUT", 1.0)
    spec = make_spec()
    await within(src.start(spec, paused=False))
    pid = src.pid(spec.uuid)
    async with blackhole() as port:
        out = asyncio.create_task(src.outgoing(spec.uuid, to(port), SLOW))
        await wait_status(src, spec.uuid, MigrationStatus.ACTIVE)
        os.kill(pid, signal.SIGSTOP)
        try:
            await within(src.cancel(spec.uuid), 5)
            with pytest.raises(MigrationFailed, match="QEMU did not end the migration after "
                                                      "cancel and yank: still 'active'"):
                await within(out, 10)
            progress = src.progress(spec.uuid)
            assert progress.status is MigrationStatus.FAILED
            assert "after cancel and yank" in progress.error
            os.kill(pid, 0)  # never stopped: its QEMU is still there
            assert src.state(spec.uuid) is GuestRunState.RUNNING  # as QEMU last said
        finally:
            os.kill(pid, signal.SIGCONT)
        # QEMU answers again: it cancels the migration it was asked to, and the guest runs.
        assert (await within(src.query(spec.uuid, "query-status")))["status"] == "running"
        assert src.pid(spec.uuid) == pid
