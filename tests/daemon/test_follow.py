"""The daemon follows what a guest does by itself (a backend's ``GuestChange`` report), as
libvirt's QEMU driver does: shut off as shutdown or crashed with its events, a transient domain
removed, paused on a disk error or a watchdog; never over a migration job that owns the domain.

These run on the test backend, whose guests never act by themselves: the test stops the
backend's guest behind the daemon's back (what a guest that dies looks like to the daemon) and
makes the report the qemu backend would (``tests/daemon/test_follow_qemu.py`` does it for real);
the qemu backend's side of the reports (which QMP events make which report) is tested here too.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from virtmig.daemon.backend.base import GuestChange
from virtmig.daemon.backend.qemu.guest import _Guest
from virtmig.daemon.core import Daemon
from virtmig.daemon.events import Event
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.proto.errors import NoDomain
from virtmig.proto.flags import DomainState, MigrateFlags, ShutoffReason
from virtmig.testing import Host, domain_xml, start_host, stop_host, wait_until


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    h = await start_host(tmp_path, "solo")
    yield h
    await stop_host(h)


@contextlib.contextmanager
def lifecycle(daemon: Daemon) -> Iterator[list[str]]:
    """The lifecycle events' descriptions the daemon publishes meanwhile."""
    seen: list[str] = []
    with daemon.events.subscribe() as queue:
        try:
            yield seen
        finally:
            while not queue.empty():
                event: Event = queue.get_nowait()
                seen.append(event.description)


async def running_guest(host: Host, name: str = "vm1") -> str:
    dom = await host.conn.define(domain_xml(name))
    await host.conn.start(name)
    return dom.uuid


async def gone_by_itself(host: Host, uuid: str, change: GuestChange) -> None:
    """The guest ends behind the daemon's back, and the backend says how."""
    await host.daemon.backend.destroy(uuid)
    host.daemon.backend.report(uuid, change)


async def followed(host: Host) -> None:
    await wait_until(lambda: not host.daemon._following, timeout=10,
                     what="the daemon to follow the report")


async def test_a_guest_that_died_is_shut_off_as_crashed(host: Host) -> None:
    uuid = await running_guest(host)
    with lifecycle(host.daemon) as events:
        await gone_by_itself(host, uuid, GuestChange.CRASHED)
        await followed(host)
    assert await host.conn.state("vm1") == (DomainState.SHUTOFF, ShutoffReason.CRASHED,
                                            "crashed")
    assert events == ["Stopped Failed"]  # libvirt's event when QEMU dies
    assert not (host.state_dir / "status" / f"{uuid}.xml").exists()
    await host.conn.start("vm1")  # startable again
    assert (await host.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_a_guest_poweroff_removes_a_transient_domain(host: Host) -> None:
    uuid = await running_guest(host)
    await host.conn.undefine("vm1")  # transient now
    with lifecycle(host.daemon) as events:
        await gone_by_itself(host, uuid, GuestChange.SHUTDOWN_GUEST)
        await followed(host)
    assert events == ["Shutdown Finished after guest request", "Stopped Shutdown"]
    with pytest.raises(NoDomain):
        await host.conn.state("vm1")
    assert not (host.state_dir / "status" / f"{uuid}.xml").exists()


async def test_a_host_shutdown_is_a_shutdown(host: Host) -> None:
    uuid = await running_guest(host)
    with lifecycle(host.daemon) as events:
        await gone_by_itself(host, uuid, GuestChange.SHUTDOWN_HOST)
        await followed(host)
    assert await host.conn.state("vm1") == (DomainState.SHUTOFF, ShutoffReason.SHUTDOWN,
                                            "shutdown")
    assert events == ["Shutdown Finished after host request", "Stopped Shutdown"]


async def test_a_stale_report_changes_nothing(host: Host) -> None:
    """An exit reported for a guest that runs again (destroyed and started since), or for a
    domain the daemon already stopped, is ignored."""
    uuid = await running_guest(host)
    with lifecycle(host.daemon) as events:
        host.daemon.backend.report(uuid, GuestChange.CRASHED)  # its guest still runs
        await followed(host)
        await host.conn.destroy("vm1")
        host.daemon.backend.report(uuid, GuestChange.SHUTDOWN_GUEST)  # already shut off
        await followed(host)
        host.daemon.backend.report("6d1e1c2a-0000-4000-8000-000000000000", GuestChange.CRASHED)
        await followed(host)
    assert events == ["Stopped Destroyed"]
    assert await host.conn.state("vm1") == (DomainState.SHUTOFF, ShutoffReason.DESTROYED,
                                            "destroyed")


async def test_a_disk_error_or_a_watchdog_pauses_a_running_guest(host: Host) -> None:
    uuid = await running_guest(host)
    backend = host.daemon.backend
    with lifecycle(host.daemon) as events:
        await backend.pause(uuid)  # its vCPUs stopped behind the daemon's back: a disk error
        backend.report(uuid, GuestChange.PAUSED_IOERROR)
        await followed(host)
        assert await host.conn.state("vm1") == (DomainState.PAUSED, 5, "ioerror")
        backend.report(uuid, GuestChange.PAUSED_WATCHDOG)  # paused already: stays as it is
        await followed(host)
        await host.conn.resume("vm1")
        backend.report(uuid, GuestChange.PAUSED_WATCHDOG)  # stale: the guest runs
        await followed(host)
        assert await host.conn.state("vm1") == (DomainState.RUNNING, 5, "unpaused")
        await backend.pause(uuid)
        backend.report(uuid, GuestChange.PAUSED_WATCHDOG)
        await followed(host)
    assert await host.conn.state("vm1") == (DomainState.PAUSED, 6, "watchdog")
    assert events == ["Suspended I/O Error", "Resumed Unpaused", "Suspended Watchdog"]


def _job() -> MigrationJob:
    return MigrationJob(kind=AsyncJob.MIGRATION_OUT, phase=Phase.PERFORM3_DONE,
                        flags=MigrateFlags(0), pre_state=DomainState.RUNNING)


async def test_a_job_owning_the_domain_goes_first(host: Host) -> None:
    """While a migration job owns the domain nothing changes; once it ends, what it left is
    followed: a domain the job shut off stays as the job left it, one still active is shut off."""
    uuid = await running_guest(host)
    await running_guest(host, "vm2")
    dom1, dom2 = host.daemon.registry.by_name("vm1"), host.daemon.registry.by_name("vm2")
    dom1.job, dom2.job = _job(), _job()
    with lifecycle(host.daemon) as events:
        await gone_by_itself(host, uuid, GuestChange.CRASHED)
        await gone_by_itself(host, dom2.uuid, GuestChange.CRASHED)
        await wait_until(lambda: len(host.daemon._following) == 2, timeout=10,
                         what="the reports to be followed")
        assert await host.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
        # vm1's job settles the guest itself (a migration's end), then ends
        host.daemon.mark_inactive(dom1, ShutoffReason.MIGRATED)
        await host.daemon.registry.end_job(dom1, None)
        await host.daemon.registry.end_job(dom2, None)  # vm2's leaves it running
        await followed(host)
    assert await host.conn.state("vm1") == (DomainState.SHUTOFF, ShutoffReason.MIGRATED,
                                            "migrated")
    assert await host.conn.state("vm2") == (DomainState.SHUTOFF, ShutoffReason.CRASHED,
                                            "crashed")
    assert events == ["Stopped Migrated", "Stopped Failed"]


# --- the qemu backend's reports ------------------------------------------------------------------


def _guest(tmp_path: Path) -> tuple[_Guest, list[GuestChange]]:
    told: list[GuestChange] = []
    guest = _Guest(uuid="u", dir=tmp_path, pid=1, on_change=told.append)
    guest.status = "running"
    return guest, told


def test_qemu_guest_reports_what_it_does_by_itself(tmp_path: Path) -> None:
    guest, told = _guest(tmp_path)
    assert guest.exit_change() is GuestChange.CRASHED  # no SHUTDOWN first: killed or crashed
    guest.on_event({"event": "BLOCK_IO_ERROR", "data": {"action": "report"}})
    guest.on_event({"event": "WATCHDOG", "data": {"action": "reset"}})
    assert told == []  # the guest goes on: nothing to follow
    guest.on_event({"event": "BLOCK_IO_ERROR", "data": {"action": "stop"}})
    assert told == []  # told once QEMU stopped it
    guest.on_event({"event": "STOP"})
    guest.on_event({"event": "RESUME"})
    guest.on_event({"event": "WATCHDOG", "data": {"action": "pause"}})
    guest.on_event({"event": "STOP"})
    guest.on_event({"event": "RESUME"})
    guest.on_event({"event": "STOP"})  # (the daemon's own pause: not the guest's doing)
    assert told == [GuestChange.PAUSED_IOERROR, GuestChange.PAUSED_WATCHDOG]
    guest.on_event({"event": "RESUME"})
    guest.on_event({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}})
    assert guest.exit_change() is GuestChange.SHUTDOWN_GUEST
    guest.on_event({"event": "RESUME"})  # <on_poweroff>restart ran it again
    assert guest.exit_change() is GuestChange.CRASHED
    guest.on_event({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-signal"}})
    guest.tell_exit()
    assert told[-1] is GuestChange.SHUTDOWN_HOST


def test_qemu_guest_the_backend_stops_is_not_reported(tmp_path: Path) -> None:
    guest, told = _guest(tmp_path)
    guest.stopping = True  # stop_process: destroy, a migration's end, a failed start
    guest.on_event({"event": "BLOCK_IO_ERROR", "data": {"action": "stop"}})
    guest.on_event({"event": "STOP"})
    guest.tell_exit()
    assert told == []
