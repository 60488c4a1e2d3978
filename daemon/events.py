"""Domain events: libvirt's lifecycle events (type + detail), migration iterations, job ends.

:class:`Event` is one event, a plain value; :class:`EventBus` fans events out to subscribers (the
``Domains.Events`` stream converts them at the edge, ``virtmig.daemon.wire``).  A subscriber that
does not keep up loses its oldest events rather than slowing the daemon down.
:func:`lifecycle_for` derives libvirt's lifecycle event from a state change, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from virtmig.daemon.job import JobInfo
from virtmig.proto.flags import DomainState, PausedReason, RunningReason, ShutoffReason


class EventKind(enum.IntEnum):
    """The kinds of ``Domains.Events`` (the wire's ``EventKind`` values)."""

    LIFECYCLE = 0
    MIGRATION_ITERATION = 1
    JOB_COMPLETED = 2
    JOB_FAILED = 3


@dataclass(frozen=True)
class Event:
    """One domain event; the fields that do not apply to its kind stay empty."""

    kind: EventKind
    domain_name: str
    domain_uuid: str
    event: int = 0  # lifecycle: virDomainEventType
    detail: int = 0  # lifecycle: the type's detail enum
    description: str = ""  # lifecycle: virsh's words, "Started Migrated"
    iteration: int = 0  # MIGRATION_ITERATION
    job: JobInfo | None = None  # JOB_COMPLETED / JOB_FAILED
    timestamp_ms: int = 0  # set by EventBus.publish when 0


class Lifecycle(enum.IntEnum):
    """``virDomainEventType``."""

    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


class ShutdownDetail(enum.IntEnum):
    """``virDomainEventShutdownDetailType``."""

    FINISHED = 0
    GUEST = 1  # the guest powered itself off
    HOST = 2  # the host asked (a signal to QEMU)


#: Stopped's detail for a guest whose QEMU died (libvirt: ``VIR_DOMAIN_EVENT_STOPPED_FAILED``
#: with ``shutoff (crashed)``, when the monitor closed without a SHUTDOWN event).
STOPPED_FAILED = 5

# Detail enums, by event type: (value, virsh's word).
_DETAILS: dict[Lifecycle, tuple[str, ...]] = {
    Lifecycle.DEFINED: ("Added", "Updated", "Renamed", "Snapshot"),
    Lifecycle.UNDEFINED: ("Removed", "Renamed"),
    Lifecycle.STARTED: ("Booted", "Migrated", "Restored", "Snapshot", "Event wakeup"),
    Lifecycle.SUSPENDED: ("Paused", "Migrated", "I/O Error", "Watchdog", "Restored",
                          "Snapshot", "API error", "Post-copy", "Post-copy Error"),
    Lifecycle.RESUMED: ("Unpaused", "Migrated", "Snapshot", "Post-copy", "Post-copy Error"),
    Lifecycle.STOPPED: ("Shutdown", "Destroyed", "Crashed", "Migrated", "Saved", "Failed",
                        "Snapshot"),
    Lifecycle.SHUTDOWN: ("Finished", "Finished after guest request",
                         "Finished after host request"),
}
_WORDS = {
    Lifecycle.DEFINED: "Defined", Lifecycle.UNDEFINED: "Undefined", Lifecycle.STARTED: "Started",
    Lifecycle.SUSPENDED: "Suspended", Lifecycle.RESUMED: "Resumed", Lifecycle.STOPPED: "Stopped",
    Lifecycle.SHUTDOWN: "Shutdown", Lifecycle.PMSUSPENDED: "PMSuspended",
    Lifecycle.CRASHED: "Crashed",
}


def describe(event: Lifecycle, detail: int) -> str:
    words = _DETAILS.get(event, ())
    return f"{_WORDS[event]} {words[detail] if detail < len(words) else 'Unknown'}"


_SUSPEND_DETAIL = {
    PausedReason.USER: 0, PausedReason.MIGRATION: 1, PausedReason.IOERROR: 2,
    PausedReason.WATCHDOG: 3, PausedReason.API_ERROR: 6, PausedReason.POSTCOPY: 7,
    PausedReason.POSTCOPY_FAILED: 8,
}
_RESUME_DETAIL = {
    RunningReason.UNPAUSED: 0, RunningReason.MIGRATED: 1, RunningReason.MIGRATION_CANCELED: 1,
    RunningReason.POSTCOPY: 3, RunningReason.POSTCOPY_FAILED: 4,
}
_STOP_DETAIL = {
    ShutoffReason.SHUTDOWN: 0, ShutoffReason.DESTROYED: 1, ShutoffReason.CRASHED: 2,
    ShutoffReason.MIGRATED: 3, ShutoffReason.SAVED: 4, ShutoffReason.FAILED: 5,
    ShutoffReason.DAEMON: 5,
}


def lifecycle_for(
    old: DomainState, new: DomainState, reason: int
) -> Iterator[tuple[Lifecycle, int]]:
    """The lifecycle events libvirt emits for a change of state (none when nothing changed)."""
    inactive = (DomainState.SHUTOFF, DomainState.NOSTATE)
    if new in inactive:
        if old not in inactive:
            yield Lifecycle.STOPPED, _STOP_DETAIL.get(ShutoffReason(reason), 0)
        return
    if old in inactive:
        migrated = (new is DomainState.PAUSED and reason == PausedReason.MIGRATION) or (
            new is DomainState.RUNNING and reason == RunningReason.MIGRATED)
        yield Lifecycle.STARTED, 1 if migrated else 0
        if new is DomainState.PAUSED and not migrated:
            yield Lifecycle.SUSPENDED, _SUSPEND_DETAIL.get(PausedReason(reason), 0)
        return
    if new is DomainState.PAUSED and old is not DomainState.PAUSED:
        yield Lifecycle.SUSPENDED, _SUSPEND_DETAIL.get(PausedReason(reason), 0)
    elif new is DomainState.PAUSED and old is DomainState.PAUSED:
        if reason in (PausedReason.POSTCOPY_FAILED, PausedReason.POSTCOPY):
            yield Lifecycle.SUSPENDED, _SUSPEND_DETAIL[PausedReason(reason)]
    elif new is DomainState.RUNNING and old is DomainState.PAUSED:
        yield Lifecycle.RESUMED, _RESUME_DETAIL.get(RunningReason(reason), 0)


class EventBus:
    QUEUE_SIZE = 1024

    def __init__(self) -> None:
        self._subs: dict[int, tuple[str, asyncio.Queue[Event]]] = {}
        self._next = 0

    @contextlib.contextmanager
    def subscribe(self, uuid: str = "") -> Iterator[asyncio.Queue[Event]]:
        """Events for one domain (by UUID), or for all with ``""``."""
        key = self._next
        self._next += 1
        queue: asyncio.Queue[Event] = asyncio.Queue(self.QUEUE_SIZE)
        self._subs[key] = (uuid, queue)
        try:
            yield queue
        finally:
            del self._subs[key]

    def publish(self, event: Event) -> None:
        if not event.timestamp_ms:
            event = replace(event, timestamp_ms=int(time.time() * 1000))
        for uuid, queue in list(self._subs.values()):
            if uuid and uuid != event.domain_uuid:
                continue
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)

    def lifecycle(self, name: str, uuid: str, event: Lifecycle, detail: int) -> None:
        self.publish(Event(EventKind.LIFECYCLE, name, uuid, event=int(event), detail=detail,
                           description=describe(event, detail)))
