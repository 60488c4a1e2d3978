"""One QEMU guest as the backend knows it: the :class:`_Guest` record and its folder.

Concern: the state of one QEMU process -- folder, pid, monitor connection, run status, migration
status, the migration records, the tasks that watch it -- and how QMP events change that state.
Every waiter takes :meth:`_Guest.changed` before it looks at the state, and wakes at the next
change (:meth:`_Guest.notify`: an event, the exit).

What the guest does by itself goes to ``on_change`` (the backend's report to the daemon):
a disk error or a watchdog that stops its vCPUs (``BLOCK_IO_ERROR`` with action ``stop``,
``WATCHDOG`` with action ``pause``) at the ``STOP`` that follows (so that the guest is paused
when the daemon looks), and the end of its process when it comes (:meth:`_Guest.exit_change`:
after a ``SHUTDOWN`` event, a shutdown -- the guest's or the host's -- else a crash), unless
the backend stopped it itself (``stopping``).

Files, per guest, in ``<state_dir>/<uuid>/``: ``pid`` (written by the backend), ``qmp.sock``
(QEMU runs with that folder as its working directory and listens on the relative path, so the
108-byte socket path limit never bites; the backend connects through ``/proc/self/fd`` when the
absolute path is too long), ``qemu.log`` (QEMU's stdout and stderr, appended, one header line
per start) and ``serialN.log`` per serial port (created by the daemon and passed to QEMU as a
descriptor), ``nvram.fd`` (a UEFI guest's variable store, :mod:`.firmware`);
``on-poweroff-restart`` marks a guest started with ``<on_poweroff>restart`` (for a backend that
takes it over); ``migrate-tls/`` holds a TLS migration's credentials only while QEMU loads them.
The folder is the daemon's (mode 0750, group ``qemu_group`` when QEMU runs unprivileged): QEMU
is handed every file it uses and creates nothing there.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from virtmig.daemon.backend.base import GuestChange, GuestRunState
from virtmig.daemon.backend.qemu.migration import _STATUS_MAP, _Incoming, _Outgoing
from virtmig.proto.aio import within

SOCKET_NAME = "qmp.sock"
PID_NAME = "pid"
LOG_NAME = "qemu.log"

_LOG_PREFIX_RE = re.compile(r"^(\d{4}-\d\d-\d\dT[0-9:.]+Z\s+)?(\S*qemu-system-\S+?:\s+)?")


@dataclass(eq=False)
class _Guest:
    """One QEMU process and what the backend knows of it: folder, monitor, run and migration
    state, and the tasks that watch it."""

    uuid: str
    dir: Path
    pid: int
    proc: asyncio.subprocess.Process | None = None  # our child, started by this instance
    pidfd: int = -1  # a pidfd of its QEMU (-1: none): how it is killed, a taken-over one watched
    qmp: QMPClient | None = None
    log_offset: int = 0  # where this QEMU's output starts in qemu.log
    status: str = "prelaunch"  # QEMU's run status (query-status / STOP / RESUME)
    status_events: int = 0  # run-status events seen (STOP, RESUME, SHUTDOWN)
    exited: bool = False
    exit_code: int | None = None
    exit_reason: str = ""
    mig_status: str = "none"  # last MIGRATION event
    outgoing: _Outgoing | None = None
    incoming: _Incoming | None = None
    # <on_poweroff>restart: what runs when the guest powers off (QEMU then stops, not exits)
    on_guest_poweroff: Callable[[], Coroutine[Any, Any, None]] | None = None
    # What the guest did by itself, for the daemon (the backend's report; None: not told)
    on_change: Callable[[GuestChange], None] | None = None
    stopping: bool = False  # the backend stops it (quit, kill): its exit is not reported
    shutdown: str = ""  # since the last RESUME: "guest"/"host" after a SHUTDOWN event, else ""
    pause_cause: GuestChange | None = None  # a disk error or watchdog stops it: told at STOP
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    exit_task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def changed(self) -> asyncio.Event:
        """An event set at the next change (event, exit): take it *before* checking state."""
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def start_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` for this guest: cancelled when QEMU exits or the backend lets go."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def socket(self) -> Path:
        return self.dir / SOCKET_NAME

    def run_state(self) -> GuestRunState:
        if self.exited or self.status == "shutdown":
            return GuestRunState.SHUTOFF
        return GuestRunState.RUNNING if self.status == "running" else GuestRunState.PAUSED

    def log_size(self) -> int:
        """How far qemu.log goes now (``log_tail(since=...)`` reads what comes after)."""
        try:
            return (self.dir / LOG_NAME).stat().st_size
        except OSError:
            return 0

    def log_tail(self, lines: int = 2, *, since: int = 0) -> str:
        """QEMU's last messages of this run (after offset ``since``, if later), without
        timestamps and program name."""
        try:
            with open(self.dir / LOG_NAME, "rb") as f:
                f.seek(max(self.log_offset, since))
                data = f.read()[-16384:]
        except OSError:
            return ""
        out = []
        for raw in data.decode("utf-8", "replace").splitlines():
            line = _LOG_PREFIX_RE.sub("", raw.strip(), count=1).strip()
            if line and not line.startswith("virtmig:"):
                out.append(line)
        return "; ".join(out[-lines:])

    def _tell(self, change: GuestChange) -> None:
        if self.on_change is not None and not self.stopping:
            self.on_change(change)

    def exit_change(self) -> GuestChange:
        """What the end of this QEMU was: a shutdown (the guest's or the host's) when QEMU said
        so first (``SHUTDOWN``), else a crash (killed, crashed: libvirt's "monitor closed
        without SHUTDOWN event")."""
        if self.shutdown == "guest":
            return GuestChange.SHUTDOWN_GUEST
        if self.shutdown == "host":
            return GuestChange.SHUTDOWN_HOST
        return GuestChange.CRASHED

    def tell_exit(self) -> None:
        """Report the end of QEMU (called once it was reaped), unless the backend stopped it."""
        self._tell(self.exit_change())

    def on_event(self, event: Any) -> None:
        """Follow one QMP event: run status and migration status."""
        name = event.get("event")
        data = event.get("data")
        data = data if isinstance(data, dict) else {}
        if name in ("STOP", "RESUME", "SHUTDOWN"):
            self.status_events += 1
        if name == "STOP":
            if self.status == "running":
                self.status = "paused"
                if self.pause_cause is not None:
                    self._tell(self.pause_cause)
            self.pause_cause = None
            out = self.outgoing
            if out is not None and out.issued and not out.done.is_set():
                out.stopped = True  # the migration's switchover (or a suspend meanwhile)
        elif name == "RESUME":
            self.status = "running"
            self.shutdown = ""  # (<on_poweroff>restart ran it again)
            self.pause_cause = None
        elif name == "SHUTDOWN":
            self.status = "shutdown"
            self.shutdown = "guest" if data.get("guest") is True else "host"
            if data.get("guest") is True and self.on_guest_poweroff is not None:
                self.start_task(self.on_guest_poweroff())  # <on_poweroff>restart
        elif name == "BLOCK_IO_ERROR" and data.get("action") == "stop":
            self.pause_cause = GuestChange.PAUSED_IOERROR
        elif name == "WATCHDOG" and data.get("action") == "pause":
            self.pause_cause = GuestChange.PAUSED_WATCHDOG
        elif name == "MIGRATION":
            status = str(data.get("status", ""))
            self.mig_status = status
            inc = self.incoming
            if inc is not None and inc.final is None:
                if status == "active" and not inc.active_at:
                    inc.active_at = time.monotonic()
                if status == "postcopy-active":
                    inc.switched = True
                inc.status = _STATUS_MAP.get(status, inc.status)
            mig = self.outgoing
            if mig is not None and status == "postcopy-active" and not mig.done.is_set():
                mig.switched = True


async def _wait_guest(guest: _Guest, timeout: float, done: Callable[[], bool]) -> None:
    """Wait until ``done()``, re-checked at each change of the guest, for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        changed = guest.changed()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await within(changed.wait(), remaining)

