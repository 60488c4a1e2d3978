"""Shared fixtures: real daemons in the test's event loop, on loopback, port 0."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.build import GuestImage, guest_or_skip, kill_leftover_qemus, qemu_binary_or_skip
from tests.guest.host import daemon_settings, postcopy_as_root, release_qemu_user, serial_log
from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteDest
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.core import Daemon, DaemonConfig
from virtmig.daemon.main import RunningDaemon, start_daemon
from virtmig.proto.params import TypedParams


def domain_xml(name: str = "vm1", memory_mib: int = 64, *, uuid: str | None = None,
               dirty_rate_mib: int = 0, extra_options: str = "") -> str:
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    opts = f'dirty-rate-mib="{dirty_rate_mib}" ' if dirty_rate_mib else ""
    return textwrap.dedent(f"""\
        <domain type='test'>
          <name>{name}</name>
          {uuid_el}
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type></os>
          <metadata>
            <virtmig:guest xmlns:virtmig="urn:virtmig:domain:1" {opts}{extra_options}/>
          </metadata>
          <devices>
            <serial type='pty'><target port='0'/></serial>
          </devices>
        </domain>
        """)


def qemu_domain_xml(image: GuestImage, name: str = "vm1", memory_mib: int = 256, *,
                    uuid: str | None = None, dirty_mb: int = 64, dirty_rate: int = 0) -> str:
    """A ``qemu`` domain running the test guest (``tests/guest``).

    Its serial console goes to the log file in the guest's folder on whichever host runs it
    (:meth:`Host.serial_log`).
    """
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    console = "<serial type='pty'><target port='0'/></serial>"
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>{name}</name>
          {uuid_el}
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64' machine='pc'>hvm</type>
            <kernel>{image.kernel}</kernel>
            <initrd>{image.initrd}</initrd>
            <cmdline>{image.cmdline(dirty_mb=dirty_mb, dirty_rate=dirty_rate)}</cmdline>
          </os>
          <devices>
            {console}
            <memballoon model='none'/>
          </devices>
        </domain>
        """)


def free_port() -> int:
    """A loopback port nobody listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ClosedPortDest(RemoteDest):
    """A destination whose Prepare answers with a loopback port nobody listens on."""

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await super().prepare(params, cookie, flags)
        return cookie, f"tcp:127.0.0.1:{free_port()}"


@dataclass
class Host:
    running: RunningDaemon
    conn: AsyncConnection
    uri: str
    state_dir: Path

    @property
    def daemon(self) -> Daemon:
        return self.running.daemon

    def serial_log(self, uuid: str, port: int = 0) -> Path:
        """A ``qemu`` guest's serial log on this host."""
        return serial_log(self.state_dir, uuid, port)

    def digest(self, uuid: str) -> bytes:
        """The test backend's digest of a guest's whole memory."""
        backend = self.daemon.backend
        assert isinstance(backend, TestBackend)
        return backend.memory_digest(uuid)


async def start_host(tmp_path: Path, name: str, **overrides: object) -> Host:
    state = tmp_path / name
    settings: dict[str, object] = {
        "state_dir": str(state),
        "listen": ("tcp://127.0.0.1:0",),
        "hostname": f"{name}.test",
        "migration_address": "127.0.0.1",
        "migration_host": "127.0.0.1",
        "job_wait_timeout": 1.0,
    }
    if overrides.get("backend") == "qemu":  # confined: the guest cache, QEMU's test user
        settings.update(daemon_settings())
    settings.update(overrides)
    config = DaemonConfig(**settings)  # type: ignore[arg-type]
    running = await start_daemon(config)
    uri = f"virtmig+tcp://127.0.0.1:{running.tcp_port}"
    conn = await AsyncConnection.open(uri)
    return Host(running, conn, uri, state)


async def stop_host(host: Host) -> None:
    await host.conn.close()
    await host.running.stop(grace=0.5)


async def teardown_hosts(tmp_path: Path, *hosts: Host) -> None:
    """Stop the daemons and every guest they still run (QEMU guests outlive their daemon)."""
    try:
        for host in hosts:
            for dom in list(host.daemon.registry):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(host.daemon.backend.destroy(dom.uuid), 20)
            await stop_host(host)
    finally:
        assert not kill_leftover_qemus(tmp_path), "QEMU processes were left running"


@pytest.fixture(scope="session", autouse=True)
def _qemu_user_released() -> Iterator[None]:
    """At the end of the session, the QEMU test user goes if the tests created it."""
    yield
    release_qemu_user()


@pytest.fixture(autouse=True)
def _postcopy_qemu_user(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``postcopy`` runs QEMU as root where only root may use userfaultfd
    (``tests.guest.host``)."""
    with postcopy_as_root(request.node.get_closest_marker("postcopy") is not None):
        yield


@pytest.fixture(params=["test", pytest.param("qemu", marks=pytest.mark.qemu)])
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; qemu needs QEMU and the test guest (skipped, or failed under
    VIRTMIG_REQUIRE_QEMU=1, without them)."""
    if request.param == "qemu":
        qemu_binary_or_skip()
        guest_or_skip()
    return str(request.param)


@contextlib.asynccontextmanager
async def hosts(tmp_path: Path, backend: str,
                *names_and_settings: tuple[str, dict[str, object]]) -> AsyncIterator[list[Host]]:
    """Daemons on ``backend``, each with its own settings; stopped with all their guests."""
    started: list[Host] = []
    try:
        for name, settings in names_and_settings:
            started.append(await start_host(tmp_path, name, backend=backend, **settings))
        yield started
    finally:
        await teardown_hosts(tmp_path, *started)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    src = await start_host(tmp_path, "src")
    dst = await start_host(tmp_path, "dst")
    try:
        yield src, dst
    finally:
        await stop_host(src)
        await stop_host(dst)
