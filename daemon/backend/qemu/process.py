"""The QEMU processes: start, watch, stop, let go of, and take over after a restart.

Concern: the life of one ``qemu-system-x86_64`` process, outside QMP -- its folder, command
line, log and pid files, its exit, its reaping -- and adopting a guest an earlier backend left
running.

Processes: QEMU is started with :func:`asyncio.create_subprocess_exec` in its own session (a
signal to the daemon's process group does not reach it), confined as
:mod:`~virtmig.daemon.backend.qemu.confine` says (its user and groups, the sandbox, only the
descriptors the daemon opened for it: images, serial logs, the listening sockets of unix serial
ports and channels (bound in the guest's folder), the monitor socket, qemu.log as stdout and
stderr), and is always reaped by the daemon
(``await proc.wait()``; PID 1 on these machines reaps orphans slowly).  :meth:`QemuBackend.close`
disconnects QMP and leaves guests running; a later :meth:`QemuBackend.open` on the same folder
finds them (pid file, live process whose working directory is the guest folder, connectable QMP
socket) and takes them over.  A taken-over guest is watched with a pidfd (polled if pidfds are
unavailable) and reaped with ``os.waitpid`` only if it happens to be this process's child.
The end of a QEMU the backend did not stop itself (:func:`stop_process` marks those) is
reported to the daemon once it is reaped (the guest's ``on_change``: a shutdown or a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import socket
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import BinaryIO

from qemu.qmp import QMPClient, Runstate

from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.backend.qemu.chardev import bind_guest_socket
from virtmig.daemon.backend.qemu.config import GuestFiles, QemuConfig
from virtmig.daemon.backend.qemu.confine import (
    VNC_SOCKET_DIR,
    QemuSettings,
    RunAs,
    make_qemu_dir,
    open_image,
    open_serial_log,
    prepare_guest_dir,
    remove_qemu_dir,
    remove_tls_creds,
)
from virtmig.daemon.backend.qemu.firmware import open_firmware
from virtmig.daemon.backend.qemu.guest import LOG_NAME, PID_NAME, SOCKET_NAME, _Guest
from virtmig.daemon.backend.qemu.migration import _POSTCOPY_STATES, _TERMINAL
from virtmig.daemon.backend.qemu.monitor import Exec, _socket_path, connect
from virtmig.daemon.backend.qemu.net import NicConfig
from virtmig.daemon.backend.qemu.tap import open_tap
from virtmig.proto import logsafe
from virtmig.proto.aio import within

log = logsafe.logger("virtmig.daemon.backend.qemu")

START_TIMEOUT = 30.0  # spawn until QMP answers
RECONNECT_TIMEOUT = 5.0
QUIT_GRACE = 3.0  # after "quit", before SIGKILL
KILL_TIMEOUT = 10.0
POLL_INTERVAL = 0.2  # liveness polling of a taken-over guest when pidfds are unavailable


async def launch(cfg: QemuConfig, gdir: Path, *, incoming: bool, settings: QemuSettings,
                 owner: RunAs | None) -> _Guest:
    """Start QEMU in ``gdir`` (vCPUs stopped), with its exit watched; the caller connects.

    QEMU runs confined (see :mod:`~virtmig.daemon.backend.qemu.confine`): as ``owner`` when given,
    under the sandbox when ``settings`` say so, with the files the daemon opened for it.
    """
    prepare_guest_dir(gdir, owner)
    if cfg.vnc is not None and cfg.vnc.socket:  # QEMU binds its VNC socket there itself
        make_qemu_dir(gdir, VNC_SOCKET_DIR, owner)
    else:
        remove_qemu_dir(gdir, VNC_SOCKET_DIR)
    with contextlib.suppress(FileNotFoundError):
        (gdir / SOCKET_NAME).unlink()
    with _listen_unix(gdir / SOCKET_NAME) as monitor, open_guest_files(cfg, settings, gdir,
                                                                  owner) as files:
        argv = cfg.argv(files, incoming=incoming, monitor_fd=monitor.fileno(),
                        sandbox=settings.sandbox)
        command = argv if owner is None else owner.command(argv)
        with _open_log(gdir, command) as logf:
            offset = logf.tell()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command, cwd=gdir, stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                    pass_fds=(monitor.fileno(), *files.fds),
                )
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    (gdir / SOCKET_NAME).unlink()
                raise BackendError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    guest = _Guest(uuid=cfg.uuid, dir=gdir, pid=proc.pid, proc=proc, log_offset=offset,
                   pidfd=_pidfd(proc.pid))
    guest.exit_task = asyncio.get_running_loop().create_task(_watch_exit(guest))
    return guest


def _pidfd(pid: int) -> int:
    """A pidfd of our just-started child ``pid`` (-1 where pidfds are unavailable, or it ended
    already): what :func:`_kill` signals it through."""
    with contextlib.suppress(AttributeError, OSError):
        return os.pidfd_open(pid)
    return -1


@contextlib.contextmanager
def open_guest_files(cfg: QemuConfig, settings: QemuSettings, gdir: Path,
                owner: RunAs | None) -> Iterator[GuestFiles]:
    """The guest's images, serial logs and taps, opened for QEMU; closed here once it has them
    (a tap then lives as long as QEMU holds it)."""
    opened: list[int] = []

    def keep(fd: int) -> int:
        opened.append(fd)
        return fd

    def tap(nic: NicConfig) -> int:
        if not nic.needs_tap:
            return -1
        created = open_tap(nic)
        log.info("qemu backend: guest %s: %s is tap %s%s", cfg.uuid, nic.id, created.name,
                 f" on bridge {nic.bridge}" if nic.bridge else "")
        return keep(created.fd)

    try:
        dirs = settings.storage_dirs
        files = GuestFiles(
            disks=tuple(keep(open_image(
                f"<disk type='{d.kind}' device='{d.device}'>", d.path, dirs,
                writable=not d.readonly, qcow2=d.fmt == "qcow2", block=d.kind == "block",
                block_devices=settings.block_devices)) if d.path else -1 for d in cfg.disks),
            serials=tuple(keep(open_serial_log(gdir, s.port, append=s.append, owner=owner))
                          for s in cfg.serials),
            kernel=keep(open_image("<os><kernel>", cfg.kernel, dirs, writable=False,
                                   reader=owner)) if cfg.kernel else -1,
            initrd=keep(open_image("<os><initrd>", cfg.initrd, dirs, writable=False,
                                   reader=owner)) if cfg.initrd else -1,
            nics=tuple(tap(nic) for nic in cfg.nics),
            sockets=tuple(keep(bind_guest_socket(gdir, name)) for name in cfg.socket_names),
            firmware=tuple(keep(fd) for fd in open_firmware(cfg.firmware, gdir, owner)),
        )
        yield files
    finally:
        for fd in opened:
            os.close(fd)


async def _watch_exit(guest: _Guest) -> None:
    """Wait for the QEMU process to end, reap it, and settle everything that waits on it."""
    if guest.proc is not None:
        code: int | None = await guest.proc.wait()
    else:
        code = await _wait_foreign(guest)
    guest.exited = True
    guest.exit_code = code
    guest.exit_reason = _describe_exit(code)
    guest.status = "shutdown"
    inc = guest.incoming
    if inc is not None and inc.final is None:
        tail = guest.log_tail()
        inc.fail(inc.error or (f"{guest.exit_reason}: {tail}" if tail else guest.exit_reason))
    for path in (guest.dir / PID_NAME, guest.socket):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    remove_tls_creds(guest.dir)
    remove_qemu_dir(guest.dir, VNC_SOCKET_DIR)
    if guest.pidfd >= 0:
        os.close(guest.pidfd)
        guest.pidfd = -1
    guest.notify()
    for task in list(guest.tasks):
        task.cancel()
    if guest.qmp is not None:
        with contextlib.suppress(Exception):
            await guest.qmp.disconnect()
    log.info("qemu backend: guest %s (pid %d): %s", guest.uuid, guest.pid, guest.exit_reason)
    guest.tell_exit()  # (not when the backend stopped it: stop_process)


async def _wait_foreign(guest: _Guest) -> int | None:
    """Wait for a taken-over QEMU (maybe not our child) to end; reap it if it is ours."""
    if guest.pidfd >= 0:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(guest.pidfd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(guest.pidfd)
    else:
        while _alive(guest.pid):
            code = _try_reap(guest.pid)
            if code is not None:
                return code
            await asyncio.sleep(POLL_INTERVAL)
    for _ in range(50):  # a zombie of ours: reap it (another waiter may have been first)
        code = _try_reap(guest.pid)
        if code is not None or not _proc_state(guest.pid):
            return code
        await asyncio.sleep(0.01)
    return None


async def stop_process(qmp: Exec, guest: _Guest, *, ask: bool = True) -> None:
    """``quit`` (unless ``ask`` is false: it was sent already), then SIGKILL after a grace
    period; returns once the process is reaped.  The backend caused this exit: it is not
    reported to the daemon (``guest.stopping``)."""
    guest.stopping = True
    if ask and not guest.exited and guest.qmp is not None:
        with contextlib.suppress(BackendError):
            await qmp(guest, "quit", timeout=1.0)
    if not await _wait_exit(guest, QUIT_GRACE):
        _kill(guest)
        if not await _wait_exit(guest, KILL_TIMEOUT):
            log.error("qemu backend: guest %s (pid %d) survives SIGKILL", guest.uuid,
                      guest.pid)


async def monitor_closed(client: QMPClient, ended: Awaitable[object], timeout: float) -> bool:
    """Whether QEMU closed its monitor ``client`` (after ``quit``), or ``ended`` (the process's
    end) came first, within ``timeout`` seconds.  From ``RUNNING`` the monitor's only change is
    to closing; a close missed before the wait began is caught by the end."""
    closing = asyncio.ensure_future(client.runstate_changed())
    ending = asyncio.ensure_future(ended)
    try:
        if client.runstate is Runstate.RUNNING:
            await asyncio.wait({closing, ending}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        return client.runstate is not Runstate.RUNNING or ending.done()
    finally:
        for waiter in (closing, ending):
            waiter.cancel()
        await asyncio.gather(closing, ending, return_exceptions=True)


async def _wait_exit(guest: _Guest, timeout: float) -> bool:
    task = guest.exit_task
    if task is None:
        return guest.exited
    with contextlib.suppress(TimeoutError):
        await within(asyncio.shield(task), timeout)
    return task.done()


def _kill(guest: _Guest) -> None:
    """SIGKILL, through the guest's pidfd where it has one: never another process that took a
    reaped QEMU's pid, and never a reap.  asyncio's ``Process.kill()`` polls first, and a QEMU
    that had just exited was reaped there, before asyncio's child watcher, which then reported
    it as "Unknown child process" with exit status 255."""
    if guest.exited:
        return
    try:
        if guest.pidfd >= 0:
            signal.pidfd_send_signal(guest.pidfd, signal.SIGKILL)
        elif guest.proc is not None:
            guest.proc.kill()
        else:
            os.kill(guest.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def detach(guest: _Guest) -> None:
    """Stop watching the guest but leave its QEMU running (``close``)."""
    tasks = [*guest.tasks, *([guest.exit_task] if guest.exit_task else [])]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    if guest.qmp is not None:
        with contextlib.suppress(Exception):
            await guest.qmp.disconnect()
        guest.qmp = None
    guest.notify()
    if guest.proc is not None and guest.proc.returncode is None:
        _release(guest.proc)
    if guest.pidfd >= 0:
        os.close(guest.pidfd)
        guest.pidfd = -1


def adopt(gdir: Path) -> _Guest | None:
    """The guest an earlier backend left running in ``gdir``, with its exit watched; None (and
    the stale files removed) when its QEMU is gone.  The caller registers it, then
    :func:`take_over`."""
    uuid = gdir.name
    remove_tls_creds(gdir)  # QEMU loaded them, if it ever did: a crashed daemon's leftover
    try:
        pid = int((gdir / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        pid = 0
    pidfd = -1
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid) if pid > 0 else -1  # first: no pid reuse after the check
    if not _runs_in(pid, gdir):
        log.info("qemu backend: guest %s is gone (stale pid file)", uuid)
        if pidfd >= 0:
            os.close(pidfd)
        for name in (PID_NAME, SOCKET_NAME):
            with contextlib.suppress(FileNotFoundError):
                (gdir / name).unlink()
        return None
    guest = _Guest(uuid=uuid, dir=gdir, pid=pid, pidfd=pidfd)
    try:
        guest.log_offset = (gdir / LOG_NAME).stat().st_size
    except OSError:
        guest.log_offset = 0
    guest.exit_task = asyncio.get_running_loop().create_task(_watch_exit(guest))
    return guest


async def take_over(qmp: Exec, guest: _Guest) -> bool:
    """Reconnect to an adopted guest and settle the migration it was in; False when it was
    stopped instead (it does not answer, or it waited for an incoming migration)."""
    uuid, pid = guest.uuid, guest.pid
    try:
        await connect(qmp, guest, RECONNECT_TIMEOUT)
        info = await qmp(guest, "query-migrate")
    except BackendError as exc:
        log.error("qemu backend: guest %s (pid %d) does not answer on its monitor (%s): "
                  "killing it", uuid, pid, exc)
        await stop_process(qmp, guest)
        return False
    status = str(info.get("status", "none"))
    if status in _POSTCOPY_STATES:
        # Past the switch to post-copy nothing can be rolled back: a cancel would restart a
        # source whose destination may run, and this guest may hold the only current copy.
        log.warning("qemu backend: guest %s is in a post-copy migration (%s): left as it is",
                    uuid, status)
    elif guest.status == "inmigrate":
        log.warning("qemu backend: guest %s was waiting for an incoming migration: "
                    "destroying it", uuid)
        await stop_process(qmp, guest)
        return False
    elif status not in _TERMINAL and status != "none":
        log.warning("qemu backend: guest %s had a migration in progress (%s): cancelling",
                    uuid, status)
        with contextlib.suppress(BackendError):
            await qmp(guest, "migrate_cancel")
    log.info("qemu backend: took over guest %s (pid %d, %s)", uuid, pid, guest.status)
    return True


def _proc_state(pid: int) -> str:
    """The process's state letter from /proc (``""``: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    close = stat.rfind(b")")
    return stat[close + 2 : close + 3].decode() if close > 0 else ""


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return bool(state) and state not in ("Z", "X")


def _try_reap(pid: int) -> int | None:
    """Reap ``pid`` if it is our exited child: its exit status (negative: signal), else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _release(proc: asyncio.subprocess.Process) -> None:
    """Let a running QEMU outlive this backend (and this daemon).

    asyncio kills a child whose subprocess transport is closed, or garbage-collected unclosed,
    while the child runs (``BaseSubprocessTransport.close()``).  Marking the transport closed
    skips that kill; nothing else is attached to it (no pipes).  While this process lives,
    asyncio's child watcher still reaps the QEMU when it exits.
    """
    transport = getattr(proc, "_transport", None)
    if transport is not None and proc.returncode is None and hasattr(transport, "_closed"):
        transport._closed = True


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "QEMU exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"QEMU was killed by {name}"
    return f"QEMU exited with status {code}"


def _guest_dirs(state_dir: Path) -> list[Path]:
    """The guest folders with a pid file (creating ``state_dir`` if needed)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return [c for c in sorted(state_dir.iterdir()) if c.is_dir() and (c / PID_NAME).exists()]


@contextlib.contextmanager
def _listen_unix(path: Path) -> Iterator[socket.socket]:
    """A unix socket listening at ``path``, for QEMU to inherit; closed here once it has."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _socket_path(path) as reachable:
            sock.bind(reachable)
        sock.listen(4)
        yield sock
    except OSError as exc:
        raise BackendError(f"cannot create QEMU's monitor socket {path}: {exc}") from None
    finally:
        sock.close()


def _open_log(gdir: Path, argv: list[str]) -> BinaryIO:
    """Open the guest folder's qemu.log for appending, with a header for this start."""
    logf = open(gdir / LOG_NAME, "ab")  # noqa: SIM115 - the caller closes it
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    logf.write(f"virtmig: {stamp} starting: {shlex.join(argv)}\n".encode())
    logf.flush()
    return logf


def _runs_in(pid: int, gdir: Path) -> bool:
    """Whether ``pid`` is a live process whose working directory is ``gdir`` (our QEMU)."""
    if pid <= 0 or not _alive(pid):
        return False
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(gdir.resolve())
    except OSError:
        return False


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)
