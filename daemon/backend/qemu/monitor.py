"""QEMU's monitor (QMP): the socket, the connection, one command, and the event pump.

Concern: talking to one QEMU over QMP with :mod:`qemu.qmp`.  A command is bounded in time
(:data:`QMP_TIMEOUT` unless told), and its failures become :class:`BackendError`s: QEMU's own
error answer is a :class:`QmpCommandFailed` that keeps QEMU's message and error class; no answer
in time a :class:`QmpNoAnswer`; a lost connection a plain :class:`BackendError` naming the command.

Out-of-band commands (``oob=True``: ``exec-oob``) are answered by QEMU's monitor thread even while
its main loop is blocked -- ordinary commands then wait behind the big QEMU lock.  QEMU offers
``oob`` in its greeting and :mod:`qemu.qmp` turns it on when it connects.  QEMU reads no more
commands at all, out-of-band ones included, while 8 ordinary ones wait in its queue (a command
we gave up on stays there): nothing resends an unanswered command in a loop.

Every command the backend sends goes through one path, the backend's ``_exec`` (which calls
:func:`execute` through ``_exec_any``); the flows receive that path as an :class:`Exec` and call
it, so tests can watch or refuse commands in one place.

The socket: QEMU listens on ``qmp.sock`` in the guest's folder (by a descriptor the backend
bound, or by the relative path); a path longer than ``sun_path`` is reached through
``/proc/self/fd`` (:func:`_socket_path`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError

from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.backend.qemu.guest import _Guest
from virtmig.proto import logsafe
from virtmig.proto.aio import within

log = logsafe.logger("virtmig.daemon.backend.qemu")

QMP_TIMEOUT = 30.0  # any single QMP command

T = TypeVar("T")

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL


class QmpCommandFailed(BackendError):
    """QEMU answered a command with an error; ``desc`` is QEMU's message."""

    def __init__(self, command: str, desc: str, error_class: str = "") -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


class QmpNoAnswer(BackendError):
    """QEMU did not answer a command in time (its main loop may be blocked)."""

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__(f"{command}: QEMU did not answer in {timeout} s")
        self.command = command
        self.timeout = timeout


class Exec(Protocol):
    """One QMP command on a guest, its result as an object (``{}`` if QEMU gave another kind):
    the backend's ``_exec``, which the flows are given.  ``oob``: out of band."""

    def __call__(
        self, guest: _Guest, command: str, args: dict[str, object] | None = None,
        timeout: float = QMP_TIMEOUT, *, oob: bool = False,
    ) -> Coroutine[Any, Any, dict[str, Any]]: ...


class _Monitor(QMPClient):
    """qemu.qmp's client, minus the cost of logging every message when nobody listens.

    qemu.qmp 0.0.x pretty-prints each message (``json.dumps(indent=2)``) for a debug log line
    before the logger decides to drop it: about 50 messages, 6 ms of CPU per migration, taken
    from the QEMU threads that do the migrating on a small host.  These hooks format lazily.
    """

    def _cb_outbound(self, msg: Message) -> Message:
        self.logger.debug("--> %s", _Redacted(msg))
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        self.logger.debug("<-- %s", msg)
        return msg


class _Redacted:
    """An outbound QMP message as the debug log shows it: a password (``set_password``'s, a
    VNC guest's) never reaches a log."""

    def __init__(self, msg: Message) -> None:
        self.msg = msg

    def __str__(self) -> str:
        args = self.msg.get("arguments")
        if isinstance(args, dict) and "password" in args:
            return str({**dict(self.msg), "arguments": {**args, "password": "<hidden>"}})
        return str(self.msg)


@contextlib.contextmanager
def _socket_path(path: Path) -> Iterator[str]:
    """A path that reaches the unix socket ``path`` even when it is longer than sun_path."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def execute(
    guest: _Guest, command: str, args: dict[str, object] | None = None,
    timeout: float = QMP_TIMEOUT, *, oob: bool = False,
) -> object:
    """One QMP command (``oob``: out of band); its result as QEMU gave it (a dict, a list...)."""
    if guest.exited or guest.qmp is None:
        why = guest.exit_reason or "no monitor connection"
        raise BackendError(f"guest {guest.uuid} is not running ({why})")
    try:
        result = await within(guest.qmp.execute(command, args, oob=oob), timeout)
    except ExecuteError as exc:
        raise QmpCommandFailed(command, str(exc), exc.error_class) from None
    except TimeoutError:
        raise QmpNoAnswer(command, timeout) from None
    except (ExecInterruptedError, QMPError, EOFError, OSError) as exc:
        raise BackendError(
            f"{command}: lost the monitor connection to QEMU ({exc or type(exc).__name__})"
        ) from None
    return result


async def connect(qmp: Exec, guest: _Guest, timeout: float) -> None:
    """Connect to the guest's monitor (QEMU may still be opening it), follow its events, and
    read its run status."""
    deadline = time.monotonic() + timeout
    while True:
        changed = guest.changed()
        if guest.exited:
            raise BackendError(
                f"{guest.exit_reason}" + (f": {tail}" if (tail := guest.log_tail()) else "")
            )
        if guest.socket.exists():
            client = _Monitor(f"qemu-{guest.uuid[:8]}")
            try:
                with _socket_path(guest.socket) as path:
                    await within(client.connect(path), max(0.1, deadline -
                                                                     time.monotonic()))
            except (ConnectError, OSError, TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise BackendError(
                        f"cannot connect to QEMU's monitor {guest.socket}: {exc}"
                    ) from None
            else:
                guest.qmp = client
                break
        elif time.monotonic() >= deadline:
            raise BackendError(f"QEMU did not open its monitor {guest.socket} in {timeout} s")
        with contextlib.suppress(TimeoutError):
            await within(changed.wait(), 0.01)
    guest.start_task(_pump(guest, client))
    await refresh_status(qmp, guest)


async def _pump(guest: _Guest, client: QMPClient) -> None:
    """Follow QMP events: run status and migration status."""
    async for event in client.events:
        try:
            guest.on_event(event)
        except Exception:  # a bug: keep following events
            log.exception("qemu backend: guest %s: cannot handle event %s", guest.uuid,
                          event)
        guest.notify()


async def refresh_status(qmp: Exec, guest: _Guest) -> str:
    """QEMU's run status, asked with ``query-status``."""
    info = await qmp(guest, "query-status")
    guest.status = str(info.get("status", guest.status))
    return guest.status


async def answers(*commands: Awaitable[T]) -> list[T | BackendError]:
    """Independent QMP commands (``qmp(guest, ...)`` calls whose order does not matter) sent at
    once: QEMU answers them one after the other without waiting for us in between, one round
    trip for all instead of one each, where a migration waits for them (issue 17).  A failure
    does not leave the others unanswered (qemu.qmp would drop their late answers with a
    warning): all are awaited; each one's result or :class:`BackendError`, in the order given.
    Any other exception (a cancellation) is raised."""
    results = await asyncio.gather(*commands, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, BackendError):
            raise result
    return cast("list[T | BackendError]", results)


async def together(*commands: Awaitable[T]) -> list[T]:
    """:func:`answers`, all or nothing: the first failure, in the order given, is raised."""
    results = await answers(*commands)
    for result in results:
        if isinstance(result, BackendError):
            raise result
    return cast("list[T]", results)


async def migration_with_status(qmp: Exec, guest: _Guest) -> object:
    """``query-migrate``'s answer (or its :class:`BackendError`), asked together with the run
    status (:func:`refresh_status`; its failure leaves ``guest.status`` as it was): what a
    flow reads when a stream ended."""
    answer, _status = await answers(qmp(guest, "query-migrate"), refresh_status(qmp, guest))
    return answer


async def cont(qmp: Exec, guest: _Guest) -> None:
    """Run the vCPUs.  QEMU answers once they run (the RESUME event follows), so no
    ``query-status`` round trip: under TCG it waits behind the starting vCPU for a while."""
    seen = guest.status_events
    await qmp(guest, "cont")
    if guest.status_events == seen:  # else the events (RESUME, maybe more) already tell
        guest.status = "running"
