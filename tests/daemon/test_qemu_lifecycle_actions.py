"""``<on_poweroff>restart`` on the qemu backend: ``-action shutdown=pause``, and a guest that
powers off is reset and runs again in the same QEMU (libvirt's "fake reboot"); with the
default ``destroy`` QEMU exits.

The guest is tiny and idle (SeaBIOS, no kernel, ACPI on): its "poweroff" is the write a guest
kernel makes to the ACPI PM1a control register (SLP_EN, sleep type 0: soft off; SeaBIOS puts
the PM block at 0x600), made through the monitor's I/O port command, which QEMU reports as a
guest-initiated shutdown (``SHUTDOWN`` with ``guest: true``) just the same.
"""

from __future__ import annotations

import pytest

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import (
    PARSE_ONLY,
    Factory,
    guest_xml,
    make_spec,
    process_gone,
    within,
)
from virtmig.daemon.backend.base import GuestRunState, GuestSpec
from virtmig.daemon.backend.qemu import GuestFiles, QemuBackend, parse_config
from virtmig.testing import wait_until

backends = backend_qemu_helpers.backends
src = backend_qemu_helpers.src

PM1A_CNT = 0x604  # SeaBIOS's ACPI PM base 0x600, + 4
SOFT_OFF = 0x2000  # SLP_EN, SLP_TYP 0


def _xml(action: str) -> str:
    extra = "<features><acpi/></features>" + (f"<on_poweroff>{action}</on_poweroff>"
                                               if action else "")
    return guest_xml(devices="<memballoon model='none'/>").replace("<devices>",
                                                                    f"{extra}<devices>")


def test_restart_pauses_qemu_at_the_guest_poweroff() -> None:
    argv = parse_config(make_spec(_xml("restart")), settings=PARSE_ONLY).argv(
        GuestFiles(), incoming=False)
    assert argv[argv.index("-action") + 1] == "shutdown=pause"
    plain = parse_config(make_spec(_xml("destroy")), settings=PARSE_ONLY).argv(
        GuestFiles(), incoming=False)
    assert "-action" not in plain


async def _hmp(backend: QemuBackend, uuid: str, command: str) -> str:
    return str(await backend.query(uuid, "human-monitor-command", {"command-line": command}))


async def _power_off(backend: QemuBackend, uuid: str) -> None:
    """Once SeaBIOS has mapped the ACPI PM block (the port no longer reads all ones)."""

    async def mapped() -> bool:
        return not (await _hmp(backend, uuid, f"i /h {PM1A_CNT:#x}")).strip().endswith("0xffff")

    await wait_until(mapped, timeout=30, interval=0.1, what="SeaBIOS mapping the ACPI PM block")
    await _hmp(backend, uuid, f"o /h {PM1A_CNT:#x} {SOFT_OFF:#x}")


async def _restarted(src: QemuBackend, spec: GuestSpec) -> None:
    """The guest powers off, and the backend runs it again in the same QEMU."""
    pid = src.pid(spec.uuid)
    guest = src._guests[spec.uuid]
    seen = guest.status_events
    await _power_off(src, spec.uuid)
    # QEMU stopped it at the poweroff (SHUTDOWN, STOP), the backend ran it again (RESUME).
    await wait_until(lambda: guest.status_events >= seen + 2 and guest.status == "running",
                     timeout=20, what=lambda: f"the guest running again: {guest.status}")
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert src.pid(spec.uuid) == pid  # the same QEMU
    assert (await src.query(spec.uuid, "query-status"))["status"] == "running"


@pytest.mark.qemu
async def test_on_poweroff_restart_runs_the_guest_again(src: QemuBackend) -> None:
    spec = make_spec(_xml("restart"))
    await within(src.start(spec, paused=False))
    await _restarted(src, spec)
    await _restarted(src, spec)  # and again


@pytest.mark.qemu
async def test_on_poweroff_restart_survives_a_take_over(backends: Factory) -> None:
    first = await backends("host")
    spec = make_spec(_xml("restart"))
    await within(first.start(spec, paused=False))
    await within(first.close())  # the daemon goes away; its guest does not
    second = await backends("host")  # takes it over: it still restarts at its poweroff
    await _restarted(second, spec)


@pytest.mark.qemu
async def test_on_poweroff_destroy_ends_qemu(src: QemuBackend) -> None:
    spec = make_spec(_xml(""))
    await within(src.start(spec, paused=False))
    pid = src.pid(spec.uuid)
    await _power_off(src, spec.uuid)
    await wait_until(lambda: src.state(spec.uuid) is GuestRunState.SHUTOFF, timeout=20,
                     what="QEMU gone after the guest's poweroff")
    await wait_until(lambda: process_gone(pid), timeout=20, what="QEMU reaped")
