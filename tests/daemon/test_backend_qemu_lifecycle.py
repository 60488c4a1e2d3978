"""The ``qemu`` backend with real QEMU processes: lifecycle, start failures, reconnect (adoption).


Guests here are tiny and idle (SeaBIOS only, ``-m 64``, TCG): they start in well under a second.
They run under TCG even where KVM is usable: this module is the suite's TCG coverage (the QEMU
tests elsewhere run the test guest under KVM when the machine has it), and the backend's
TCG-only paths are exercised here.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import Factory, make_spec, process_gone, within
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
)
from virtmig.daemon.backend.qemu import (
    QemuBackend,
)
from virtmig.testing import wait_until

# The shared fixtures, bound here so that pytest finds them.
backends = backend_qemu_helpers.backends
src = backend_qemu_helpers.src


@pytest.mark.qemu
async def test_lifecycle(src: QemuBackend, tmp_path: Path) -> None:
    spec = make_spec()
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    await within(src.start(spec, paused=False))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    pid = src.pid(spec.uuid)
    assert (await src.query(spec.uuid, "query-status"))["status"] == "running"
    # The monitor socket is the daemon's, inherited by QEMU (no polling for it to appear).
    gdir = tmp_path / "src" / spec.uuid
    assert stat.S_ISSOCK((gdir / "qmp.sock").stat().st_mode)
    assert "-chardev socket,id=monitor,fd=" in (gdir / "qemu.log").read_text()
    with pytest.raises(BackendError, match="already running"):
        await src.start(spec, paused=True)

    await within(src.pause(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    assert (await src.query(spec.uuid, "query-status"))["status"] == "paused"
    await within(src.resume(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.RUNNING

    await within(src.destroy(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    assert process_gone(pid)  # exited and reaped: not even a zombie
    assert not (gdir / "qmp.sock").exists()
    await src.destroy(spec.uuid)  # not running: no error
    await src.destroy("no-such-guest")
    for op in (src.pause, src.resume):
        with pytest.raises(BackendError, match="not running"):
            await op(spec.uuid)
    await src.cancel(spec.uuid)  # nothing to cancel: no-op

    await within(src.start(spec, paused=True))
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    assert (await src.query(spec.uuid, "query-status"))["status"] == "prelaunch"
    pid = src.pid(spec.uuid)
    os.kill(pid, signal.SIGKILL)  # a guest that dies by itself is seen and reaped
    await wait_until(lambda: src.state(spec.uuid) is GuestRunState.SHUTOFF, timeout=30,
                     what="SHUTOFF")
    await wait_until(lambda: process_gone(pid), timeout=30, what="reaped")


@pytest.mark.qemu
async def test_start_failure_reports_qemu_message(src: QemuBackend, tmp_path: Path) -> None:
    (tmp_path / "bad-kernel").write_bytes(b"not a kernel" * 1000)
    spec = make_spec(os_extra=f"<kernel>{tmp_path}/bad-kernel</kernel>")
    with pytest.raises(BackendError, match=r"invalid kernel header"):
        await within(src.start(spec, paused=False))
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    assert not (tmp_path / "src" / spec.uuid / "pid").exists()
    assert not (tmp_path / "src" / spec.uuid / "qmp.sock").exists()


@pytest.mark.qemu
async def test_reconnect_after_close(backends: Factory, tmp_path: Path) -> None:
    first = await backends("host")
    running, paused = make_spec(name="a"), make_spec(name="b")
    await within(first.start(running, paused=False))
    await within(first.start(paused, paused=True))
    pid = first.pid(running.uuid)
    await within(first.close())  # the daemon goes away; its guests do not
    assert not process_gone(pid)

    second = await backends("host")
    assert second.state(running.uuid) is GuestRunState.RUNNING
    assert second.state(paused.uuid) is GuestRunState.PAUSED
    assert second.pid(running.uuid) == pid
    await within(second.pause(running.uuid))
    assert second.state(running.uuid) is GuestRunState.PAUSED
    await within(second.resume(paused.uuid))
    assert second.state(paused.uuid) is GuestRunState.RUNNING
    await within(second.destroy(running.uuid))
    assert second.state(running.uuid) is GuestRunState.SHUTOFF
    await wait_until(lambda: process_gone(pid), timeout=30, what="reaped")

    # A guest that died while no backend watched is not reported (stale pid file).
    other = second.pid(paused.uuid)
    await within(second.close())
    os.kill(other, signal.SIGKILL)
    await wait_until(lambda: process_gone(other), timeout=30, what="reaped")
    third = await backends("host")
    assert third.state(paused.uuid) is GuestRunState.SHUTOFF
    assert not (tmp_path / "host" / paused.uuid / "pid").exists()
