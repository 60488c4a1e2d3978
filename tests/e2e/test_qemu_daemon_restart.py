"""End to end: a ``qemu`` daemon stops while its guest runs and starts again: the guest outlives
its daemon, and the restarted daemon takes it over (its backend finds the QEMU process and its
monitor again) and reports it running."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_qemu_migration import reaped
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.proto.flags import DomainState
from virtmig.testing import (
    Host,
    firmware_guest_xml,
    kill_leftover_qemus,
    qemu_binary_or_skip,
    start_host,
    stop_host,
    wait_until,
)

pytestmark = pytest.mark.qemu

TINY_XML = firmware_guest_xml("tiny")


async def restarted_with_guest(tmp_path: Path) -> tuple[Host, str, int]:
    """A daemon that started a (SeaBIOS-only) guest, stopped, and started again."""
    host = await start_host(tmp_path, "host", backend="qemu")
    await host.conn.define(TINY_XML)
    await host.conn.start("tiny")
    uuid = (await host.conn.lookup("tiny")).uuid
    backend = host.daemon.backend
    assert isinstance(backend, QemuBackend)
    pid = backend.pid(uuid)
    await stop_host(host)
    assert not reaped(pid)  # still running without its daemon
    return await start_host(tmp_path, "host", backend="qemu"), uuid, pid


async def test_daemon_restart_keeps_the_guest(tmp_path: Path) -> None:
    """Guests outlive their daemon: the restarted daemon's backend takes them over."""
    qemu_binary_or_skip()
    try:
        host, uuid, pid = await restarted_with_guest(tmp_path)
        try:
            backend = host.daemon.backend
            assert isinstance(backend, QemuBackend)
            assert backend.state(uuid).value == "running"
            assert backend.pid(uuid) == pid
            await backend.pause(uuid)
            assert backend.state(uuid).value == "paused"
            await backend.destroy(uuid)
            await wait_until(lambda: reaped(pid), timeout=30, what="QEMU to be reaped")
        finally:
            await stop_host(host)
    finally:
        assert not kill_leftover_qemus(tmp_path), "QEMU processes were left running"


async def test_daemon_restart_reports_the_guest_running(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    try:
        host, _uuid, _pid = await restarted_with_guest(tmp_path)
        try:
            assert (await host.conn.state("tiny"))[0] is DomainState.RUNNING
            await host.conn.destroy("tiny")
            assert (await host.conn.state("tiny"))[0] is DomainState.SHUTOFF
        finally:
            await stop_host(host)
    finally:
        kill_leftover_qemus(tmp_path)
