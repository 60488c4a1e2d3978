"""Shared by the stream-security test modules: the stream's TLS settings from the throw-away PKI,
a loopback listener that records what it is sent (a fake destination), a recording relay (what
is on the wire), and the daemons' tunings as their backends receive them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from virtmig.daemon.backend.base import MigrationTuning, StreamTls
from virtmig.testing import Host
from virtmig.testing.pki import session_pki

PKI = session_pki()
BOUND = 30.0  # seconds any helper here may wait


def server_tls(pki_dir: Path) -> StreamTls:
    """A destination's stream TLS from a host PKI dir."""
    return StreamTls(pki_dir / "cacert.pem", pki_dir / "servercert.pem",
                     pki_dir / "private/serverkey.pem")


def client_tls(pki_dir: Path, hostname: str = "127.0.0.1") -> StreamTls:
    """A source's stream TLS from a PKI dir with a client certificate."""
    return StreamTls(pki_dir / "cacert.pem", pki_dir / "clientcert.pem",
                     pki_dir / "private/clientkey.pem", hostname)


def foreign_host_dir(tmp_path: Path, name: str) -> Path:
    """Host ``name``'s PKI dir, except that its client certificate is another CA's: its control
    plane works, the stream's TLS does not."""
    out = tmp_path / f"{name}-foreign-client"
    shutil.copytree(PKI.host(name), out)
    foreign = PKI.foreign_client(f"{name}.test")
    shutil.copy2(foreign / "clientcert.pem", out / "clientcert.pem")
    shutil.copy2(foreign / "private/clientkey.pem", out / "private/clientkey.pem")
    return out


@dataclass
class Recorder:
    """A loopback listener that keeps every byte it is sent.  After ``answer_after`` bytes of a
    connection it sends ``answer`` (None: it closes the connection then)."""

    answer_after: int = 32
    answer: bytes | None = b"\x00" * 64
    received: list[bytearray] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        answered = False
        try:
            async with asyncio.timeout(BOUND):
                while data := await reader.read(65536):
                    got += data
                    if not answered and len(got) >= self.answer_after:
                        answered = True
                        if self.answer is None:
                            break
                        writer.write(self.answer)
                        await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def recorder(answer: bytes | None = b"\x00" * 64) -> AsyncIterator[Recorder]:
    rec = Recorder(answer=answer)
    rec.server = await asyncio.start_server(rec._serve, "127.0.0.1", 0)
    try:
        yield rec
    finally:
        rec.server.close()
        await rec.server.wait_closed()


@dataclass
class Relay:
    """A loopback relay to ``target``'s port that keeps what the client sends."""

    target: int
    upstream: bytearray = field(default_factory=bytearray)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(65536):
                    if keep:
                        self.upstream.extend(data)
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))


@contextlib.asynccontextmanager
async def relay(target: int) -> AsyncIterator[Relay]:
    rel = Relay(target)
    rel.server = await asyncio.start_server(rel._serve, "127.0.0.1", 0)
    try:
        yield rel
    finally:
        rel.server.close()
        await rel.server.wait_closed()


@dataclass
class Tunings:
    """What each daemon's backend was given: the destination's at Prepare, the source's at
    Perform."""

    incoming: list[MigrationTuning] = field(default_factory=list)
    outgoing: list[MigrationTuning] = field(default_factory=list)


def spy_tunings(monkeypatch: pytest.MonkeyPatch, src: Host, dst: Host) -> Tunings:
    seen = Tunings()
    real_in, real_out = dst.daemon.backend.incoming_start, src.daemon.backend.outgoing

    async def incoming_start(spec: Any, listen: Any, tuning: MigrationTuning) -> int:
        seen.incoming.append(tuning)
        return await real_in(spec, listen, tuning)

    async def outgoing(uuid: str, dest: Any, tuning: MigrationTuning) -> Any:
        seen.outgoing.append(tuning)
        return await real_out(uuid, dest, tuning)

    monkeypatch.setattr(dst.daemon.backend, "incoming_start", incoming_start)
    monkeypatch.setattr(src.daemon.backend, "outgoing", outgoing)
    return seen
