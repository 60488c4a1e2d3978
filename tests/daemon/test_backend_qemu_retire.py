"""``QemuBackend.retire``: a guest that migrated away is stopped as far as anyone can see once
QEMU quit (its monitor closed, after its images and network backends), while the kernel ends
the process; starting the same guest again and closing the backend wait for that end.

Each test holds the backend's view of the process's end (the task ``stop_process`` waits on)
behind a gate: what must not wait for it returns anyway, what must wait for it does not.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any, cast

import pytest

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import make_spec, process_gone, within
from virtmig.daemon.backend.base import GuestRunState, GuestSpec
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.daemon.backend.qemu import backend as qemu_backend
from virtmig.daemon.backend.qemu import process as qemu_process
from virtmig.daemon.backend.qemu.guest import _Guest
from virtmig.testing import wait_until_sync

backends = backend_qemu_helpers.backends
src = backend_qemu_helpers.src

HOLD = 0.3  # how long a wait that must not end is watched


async def paused_guest(backend: QemuBackend) -> tuple[GuestSpec, int]:
    """A guest started paused on ``backend``, and its QEMU's pid."""
    spec = make_spec()
    await within(backend.start(spec, paused=True))
    return spec, backend.pid(spec.uuid)


async def still_waiting(work: asyncio.Future[None]) -> bool:
    """Whether ``work`` is still waiting after ``HOLD`` seconds."""
    done, _ = await asyncio.wait({work}, timeout=HOLD)
    return not done


def hold_the_end(backend: QemuBackend, uuid: str) -> asyncio.Event:
    """Gate the backend's wait for the end of guest ``uuid``'s process: until the returned
    event is set, ``stop_process`` (``destroy``, the reaping of a retired guest) sees QEMU
    still running, however soon it really ends."""
    guest = backend._guests[uuid]
    gate, ended = asyncio.Event(), guest.exit_task
    assert ended is not None

    async def gated() -> None:
        await gate.wait()
        await ended

    guest.exit_task = asyncio.get_running_loop().create_task(gated())
    return gate


@pytest.mark.qemu
async def test_retire_does_not_wait_for_the_process_to_end(src: QemuBackend) -> None:
    spec, pid = await paused_guest(src)
    gate = hold_the_end(src, spec.uuid)

    await within(src.retire(spec.uuid), 10)  # destroy would wait for the gate
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF

    # The same guest again (a migration back): its start waits until the old one has ended.
    again = asyncio.ensure_future(src.start(spec, paused=True))
    assert await still_waiting(again)
    gate.set()
    await within(again)
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    assert process_gone(pid)
    assert src.pid(spec.uuid) != pid
    await within(src.destroy(spec.uuid))


@pytest.mark.qemu
async def test_close_waits_for_a_retired_guest(src: QemuBackend) -> None:
    spec, pid = await paused_guest(src)
    gate = hold_the_end(src, spec.uuid)
    await within(src.retire(spec.uuid), 10)

    closing = asyncio.ensure_future(src.close())
    assert await still_waiting(closing)  # a retired QEMU is reaped, never left behind
    gate.set()
    await within(closing)
    assert process_gone(pid)


@pytest.mark.qemu
async def test_retire_kills_a_qemu_that_does_not_quit(src: QemuBackend,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec, pid = await paused_guest(src)
    monkeypatch.setattr(qemu_backend, "QUIT_GRACE", HOLD)
    monkeypatch.setattr(qemu_process, "QUIT_GRACE", HOLD)
    sent = src._exec

    async def no_quit(guest: Any, command: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if command == "quit":  # the command is lost: QEMU goes on as if never asked
            return {}
        return await sent(guest, command, *args, **kwargs)

    monkeypatch.setattr(src, "_exec", no_quit)
    await within(src.retire(spec.uuid))
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    assert process_gone(pid)  # killed and reaped before retire returned


@pytest.mark.qemu
async def test_retire_of_a_guest_that_is_not_running(src: QemuBackend, tmp_path: Path) -> None:
    await within(src.retire("no-such-guest"))
    spec, _ = await paused_guest(src)
    await within(src.destroy(spec.uuid))
    await within(src.retire(spec.uuid))  # stopped already: nothing to do
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.qemu
async def test_retire_asks_qemu_to_quit_once(src: QemuBackend,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    spec, pid = await paused_guest(src)
    sent, commands = src._exec, []

    async def watched(guest: Any, command: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        commands.append(command)
        return await sent(guest, command, *args, **kwargs)

    monkeypatch.setattr(src, "_exec", watched)
    await within(src.retire(spec.uuid))
    await within(src.close())  # the reaping is over
    assert process_gone(pid)
    assert commands == ["quit"]  # not again on the closed monitor while it is reaped


def test_killing_a_qemu_that_just_ended_leaves_its_reaping_to_its_watcher(
    tmp_path: Path
) -> None:
    """A QEMU that exits as the backend kills it (after ``quit``'s grace) is signalled
    through its pidfd: ``_kill`` never reaps it, so asyncio's child watcher gets its real exit
    status (a kill that polled first reaped it, and the watcher reported "Unknown child
    process" with status 255).  Here the child is a zombie nobody has reaped yet."""
    child = subprocess.Popen(["sh", "-c", "exit 3"])
    guest = _Guest(uuid="x", dir=tmp_path, pid=child.pid, proc=cast(Any, child),
                   pidfd=os.pidfd_open(child.pid))
    try:
        assert guest.pidfd >= 0
        wait_until_sync(lambda: qemu_process._proc_state(child.pid) == "Z", timeout=15,
                        what="the child to exit")
        qemu_process._kill(guest)
        assert qemu_process._proc_state(child.pid) == "Z"  # signalled, not reaped
        assert os.waitpid(child.pid, 0)[1] == 3 << 8  # the watcher's to reap, with its status
    finally:
        child.returncode = 3  # (reaped above: Popen must not wait for it again)
        os.close(guest.pidfd)


@pytest.mark.qemu
async def test_a_started_qemu_is_killed_through_its_pidfd(src: QemuBackend) -> None:
    spec, _ = await paused_guest(src)
    guest = src._guests[spec.uuid]
    assert guest.pidfd >= 0
    assert os.readlink(f"/proc/self/fd/{guest.pidfd}") == "anon_inode:[pidfd]"
    qemu_process._kill(guest)
    await within(asyncio.shield(cast(asyncio.Task[None], guest.exit_task)))
    assert guest.exit_reason == "QEMU was killed by SIGKILL"  # this QEMU got it
    assert guest.pidfd == -1  # closed with the end of its process
    await within(src.destroy(spec.uuid))
