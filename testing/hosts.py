"""Real daemons for tests: started in the caller's event loop, on loopback, on port 0.

:func:`start_host` runs a ``virtmigd`` (any backend, any :class:`DaemonConfig` setting) with a
connected client, over mutual TLS with the process's throw-away PKI
(:mod:`virtmig.testing.pki`); :func:`hosts` is the context manager that starts several and,
whatever happens, stops them with every guest they still run (:func:`teardown_hosts`).  For failure
tests: :class:`ClosedPortDest` (a destination whose Prepare names a port nobody listens on,
:func:`~virtmig.testing.ports.free_port`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteDest
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.core import Daemon, DaemonConfig
from virtmig.daemon.main import RunningDaemon, start_daemon
from virtmig.proto.aio import within
from virtmig.proto.params import TypedParams
from virtmig.proto.uri import parse_listen
from virtmig.testing.pki import session_pki
from virtmig.testing.ports import free_port
from virtmig.testing.qemu import kill_leftover_qemus
from virtmig.testing.qemu_user import daemon_settings, serial_log


class ClosedPortDest(RemoteDest):
    """A destination whose Prepare (or v2's Prepare2) answers with a loopback port nobody
    listens on."""

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await super().prepare(params, cookie, flags)
        return cookie, f"tcp:127.0.0.1:{free_port()}"

    async def prepare2(self, params: TypedParams, flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await super().prepare2(params, flags)
        return cookie, f"tcp:127.0.0.1:{free_port()}"


@dataclass
class Host:
    """A daemon running in this process, and a client connection to it."""

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


def connect_uri(running: RunningDaemon, listen: str) -> str:
    """The URI of ``running``'s listener ``listen`` (on loopback)."""
    address = parse_listen(listen)
    if address.transport == "unix":
        return f"virtmig+unix://{address.path}"
    return f"virtmig+{address.transport}://127.0.0.1:{running.tcp_port}"


async def start_host(tmp_path: Path, name: str, *, client: Path | None = None,
                     **overrides: object) -> Host:
    """Daemon ``name`` with its state in ``tmp_path/name``, on ``tls://127.0.0.1:0`` with its own
    host certificate, and a connection to it presenting ``client``'s certificate (default: the
    throw-away PKI's admin); ``overrides``: :class:`DaemonConfig` settings
    (``backend="qemu"``...; a qemu backend runs QEMU confined, with the guest cache as a
    storage dir and QEMU as :mod:`~virtmig.testing.qemu_user`'s test user when root, and
    ``migrate_tls_force`` off unless overridden)."""
    state = tmp_path / name
    pki = session_pki()
    settings: dict[str, object] = {
        "state_dir": str(state),
        "listen": ("tls://127.0.0.1:0",),
        "pki_dir": str(pki.host(name)),
        "hostname": f"{name}.test",
        "migration_address": "127.0.0.1",
        "migration_host": "127.0.0.1",
        "job_wait_timeout": 1.0,
    }
    if overrides.get("backend") == "qemu":  # confined: the guest cache, QEMU's test user
        settings.update(daemon_settings())
        # Listening on TLS only, a qemu daemon refuses migrations without --tls by default
        # (migrate_tls_force); the tests migrate without it too, and opt in where they test it.
        settings["migrate_tls_force"] = False
        # Tests drive the phases themselves, often without a session: a job no session owns is
        # rolled back after incoming_job_timeout (60 s), which a TCG migration on a loaded
        # machine can outlast (test_qemu_stall did).  Tests of that rule set their own.
        settings["incoming_job_timeout"] = 600.0
    settings.update(overrides)
    config = DaemonConfig(**settings)  # type: ignore[arg-type]
    running = await start_daemon(config)
    uri = connect_uri(running, config.listen[0])
    try:
        conn = await AsyncConnection.open(uri, pki_dir=client or pki.client())
    except BaseException:
        await running.stop(grace=0)
        raise
    return Host(running, conn, uri, state)


STOP_TIMEOUT = 60.0  # seconds a test daemon may take to stop before its teardown fails


async def stop_host(host: Host, timeout: float = STOP_TIMEOUT) -> None:
    """Close ``host``'s connection and stop its daemon; a daemon still stopping after
    ``timeout`` seconds fails the teardown with every asyncio task's stack (what it waits on),
    instead of hanging until the test's own timeout, which shows only the threads."""
    stopping = asyncio.ensure_future(_stop(host))
    done, _ = await asyncio.wait({stopping}, timeout=timeout)
    if not done:
        stacks = _task_stacks()
        stopping.cancel()
        raise AssertionError(f"daemon {host.uri} did not stop within {timeout:g} s; "
                             f"its event loop's tasks:\n{stacks}")
    await stopping


async def _stop(host: Host) -> None:
    await host.conn.close()
    await host.running.stop(grace=0.5)


def _task_stacks() -> str:
    """Every other task of the running loop, with the chain of coroutines it awaits (innermost
    last: ``Task.print_stack`` shows only the outermost of a suspended task)."""
    lines = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task():
            continue
        lines.append(f"{task.get_name()}:")
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
            if frame is not None:
                code = frame.f_code
                lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
            coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "\n".join(lines)


async def teardown_hosts(tmp_path: Path, *hosts: Host) -> None:
    """Stop the daemons and every guest they still run (QEMU guests outlive their daemon)."""
    try:
        for host in hosts:
            for dom in list(host.daemon.registry):
                with contextlib.suppress(Exception):
                    await within(host.daemon.backend.destroy(dom.uuid), 20)
            await stop_host(host)
    finally:
        assert not kill_leftover_qemus(tmp_path), "QEMU processes were left running"


@contextlib.asynccontextmanager
async def hosts(tmp_path: Path, backend: str,
                *names_and_settings: tuple[str, dict[str, object]]) -> AsyncIterator[list[Host]]:
    """Daemons on ``backend``, each with its own settings; stopped with all their guests."""
    started: list[Host] = []
    try:
        for name, settings in names_and_settings:
            started.append(await start_host(tmp_path, name, backend=backend,
                                            **settings))  # type: ignore[arg-type]
        yield started
    finally:
        await teardown_hosts(tmp_path, *started)
