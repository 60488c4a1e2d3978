"""The daemon follows what a QEMU guest does by itself: a guest that powers off is
``shutoff (shutdown)`` with libvirt's Shutdown and Stopped (Shutdown) events, a transient one is
gone, a persistent one starts again; a QEMU killed outside any migration is
``shutoff (crashed)``; what the daemon causes keeps its own reason (``destroy``: destroyed, a
migrated-away source: migrated).

The guest is :mod:`tests.daemon.test_qemu_lifecycle_actions`' tiny idle SeaBIOS one, powered off
through the ACPI PM1a write a guest kernel makes.  Skipped without QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.daemon.backend_qemu_helpers import guest_xml, process_gone
from tests.daemon.migration_helpers import migrate
from tests.daemon.test_qemu_lifecycle_actions import _power_off
from virtmig.daemon.backend.base import GuestChange
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.proto.errors import NoDomain
from virtmig.proto.flags import DomainState, ShutoffReason
from virtmig.testing import Host, hosts, qemu_binary_or_skip, wait_until

pytestmark = pytest.mark.qemu


def _xml(name: str = "vm1", on_poweroff: str = "") -> str:
    action = f"<on_poweroff>{on_poweroff}</on_poweroff>" if on_poweroff else ""
    return guest_xml(name, devices="<memballoon model='none'/>").replace(
        "<devices>", f"<features><acpi/></features>{action}<devices>")


def _backend(host: Host) -> QemuBackend:
    backend = host.daemon.backend
    assert isinstance(backend, QemuBackend)
    return backend


@contextlib.asynccontextmanager
async def lifecycle(host: Host) -> AsyncIterator[list[str]]:
    """The lifecycle events of the ``Domains.Events`` stream, as they come."""
    seen: list[str] = []
    subscribed = len(host.daemon.events._subs)

    async def read() -> None:
        async for event in host.conn.events():
            if event.kind == "lifecycle":
                seen.append(event.description)

    task = asyncio.get_running_loop().create_task(read())
    try:
        await wait_until(lambda: len(host.daemon.events._subs) > subscribed, timeout=30,
                         what="the event stream to be subscribed")
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def no_reports(host: Host) -> Iterator[None]:
    """The backend reports nothing meanwhile: what the daemon causes is not the guest's doing."""
    backend = _backend(host)
    listener = backend._listener
    assert listener is not None
    told: list[GuestChange] = []

    def spy(uuid: str, change: GuestChange) -> None:
        told.append(change)
        listener(uuid, change)

    backend.set_listener(spy)
    try:
        yield
    finally:
        backend.set_listener(listener)
    assert told == []


async def _state(host: Host, name: str = "vm1") -> tuple[DomainState, int, str]:
    return await host.conn.state(name)


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    qemu_binary_or_skip()
    async with hosts(tmp_path, "qemu", ("h", {})) as (h,):
        yield h


async def test_guest_poweroff_is_a_shutdown_and_it_starts_again(host: Host) -> None:
    dom = await host.conn.define(_xml())
    await host.conn.start("vm1")
    pid = _backend(host).pid(dom.uuid)
    async with lifecycle(host) as events:
        await _power_off(_backend(host), dom.uuid)
        shut = (DomainState.SHUTOFF, int(ShutoffReason.SHUTDOWN), "shutdown")

        async def shut_off() -> bool:
            return await _state(host) == shut

        await wait_until(shut_off, timeout=30, what="the domain shut off after its poweroff")
        await wait_until(lambda: len(events) >= 2, timeout=10, what=lambda: f"events: {events}")
    assert events == ["Shutdown Finished after guest request", "Stopped Shutdown"]
    assert process_gone(pid)
    assert [d.name for d in await host.conn.list_domains(active=True)] == []
    await host.conn.start("vm1")  # startable again
    assert (await _state(host))[0] is DomainState.RUNNING
    assert _backend(host).pid(dom.uuid) != pid


async def test_guest_poweroff_removes_a_transient_domain(host: Host) -> None:
    dom = await host.conn.define(_xml())
    await host.conn.start("vm1")
    await host.conn.undefine("vm1")  # running: transient now
    await _power_off(_backend(host), dom.uuid)

    async def gone() -> bool:
        try:
            await _state(host)
        except NoDomain:
            return True
        return False

    await wait_until(gone, timeout=30, what="the transient domain gone after its poweroff")
    assert not (host.state_dir / "status" / f"{dom.uuid}.xml").exists()


async def test_qemu_killed_is_a_crash(host: Host) -> None:
    dom = await host.conn.define(_xml())
    await host.conn.start("vm1")
    pid = _backend(host).pid(dom.uuid)
    async with lifecycle(host) as events:
        os.kill(pid, signal.SIGKILL)
        crashed = (DomainState.SHUTOFF, int(ShutoffReason.CRASHED), "crashed")

        async def shut_off() -> bool:
            return await _state(host) == crashed

        await wait_until(shut_off, timeout=30, what="the domain shut off as crashed")
        await wait_until(lambda: events, timeout=10, what="the Stopped event")
    assert events == ["Stopped Failed"]
    await host.conn.start("vm1")
    assert (await _state(host))[0] is DomainState.RUNNING


async def test_on_poweroff_restart_keeps_the_domain_running(host: Host) -> None:
    """libvirt's fake reboot: QEMU's shutdown is transient, nothing is reported or emitted."""
    dom = await host.conn.define(_xml(on_poweroff="restart"))
    await host.conn.start("vm1")
    backend = _backend(host)
    guest = backend._guests[dom.uuid]
    seen = guest.status_events
    async with lifecycle(host) as events:
        with no_reports(host):
            await _power_off(backend, dom.uuid)
            await wait_until(lambda: guest.status_events >= seen + 3 and
                             guest.status == "running", timeout=30,
                             what=lambda: f"the guest running again: {guest.status}")
    assert events == []
    assert await _state(host) == (DomainState.RUNNING, 1, "booted")


async def test_destroy_stays_destroyed(host: Host) -> None:
    await host.conn.define(_xml())
    await host.conn.start("vm1")
    async with lifecycle(host) as events:
        with no_reports(host):
            await host.conn.destroy("vm1")
        await wait_until(lambda: events, timeout=10, what="the Stopped event")
    assert events == ["Stopped Destroyed"]
    assert await _state(host) == (DomainState.SHUTOFF, int(ShutoffReason.DESTROYED), "destroyed")


async def test_a_migrated_source_is_migrated_not_crashed(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", {})) as (src, dst):
        dom = await src.conn.define(_xml())
        await src.conn.start("vm1")
        pid = _backend(src).pid(dom.uuid)
        async with lifecycle(src) as events:
            with no_reports(src), no_reports(dst):
                await migrate(src, dst)
            await wait_until(lambda: "Stopped Migrated" in events, timeout=10,
                             what=lambda: f"Stopped Migrated in {events}")
        assert process_gone(pid)
        assert events == ["Suspended Migrated", "Stopped Migrated"]
        assert await _state(src) == (DomainState.SHUTOFF, int(ShutoffReason.MIGRATED),
                                     "migrated")
        assert (await _state(dst))[0] is DomainState.RUNNING
