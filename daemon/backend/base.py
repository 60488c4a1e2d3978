"""The hypervisor backend interface: plain typed values in, plain typed values out.

The daemon owns names, definitions, states with reasons, jobs and persistence; a backend only runs
guests and moves their memory.  No gRPC, XML-parsing or job types cross this boundary.

Migration, as a backend sees it::

    destination                                  source
    incoming_start(spec, addr) -> port           (guest running or paused)
       guest paused, listening                   outgoing(uuid, addr, tuning)
                                  ══ stream ══►     pre-copy iterations, then switchover:
    incoming_wait(uuid)  returns once the           source guest stopped, last pages, digest
       stream completed and the digest matched   returns final MigrationProgress (guest paused)

A failed or cancelled stream makes ``outgoing`` raise :class:`MigrationFailed` /
:class:`MigrationCancelled` with the source guest still alive (running, if it was), and makes
``incoming_wait`` raise :class:`MigrationFailed`.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class GuestRunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"  # not running (never started, destroyed, or died)


@dataclass(frozen=True)
class GuestSpec:
    """What a backend needs to run a guest."""

    uuid: str
    name: str
    memory_bytes: int
    vcpus: int
    # Backend options from the domain XML's <metadata><virtmig:BACKEND .../> element's attributes.
    options: Mapping[str, str] = field(default_factory=dict)
    # The full domain XML, for backends that build a command line from devices.
    xml: str = ""


@dataclass(frozen=True)
class StreamAddress:
    """Where the migration data stream goes: ``tcp`` host+port (``unix`` path reserved)."""

    host: str
    port: int
    transport: str = "tcp"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class MigrationTuning:
    bandwidth_bytes_per_s: int = 0  # 0: unlimited
    max_downtime_ms: int = 300
    live: bool = True


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class MigrationProgress:
    status: MigrationStatus = MigrationStatus.NONE
    total_bytes: int = 0
    processed_bytes: int = 0
    remaining_bytes: int = 0
    iteration: int = 0
    dirty_rate_pages_per_s: int = 0
    bandwidth_bytes_per_s: int = 0
    expected_downtime_ms: int = 0
    downtime_ms: int = 0
    setup_time_ms: int = 0
    total_time_ms: int = 0
    page_size: int = 4096
    normal_pages: int = 0
    error: str = ""


class BackendError(Exception):
    """A backend operation failed; ``str()`` says why in the backend's words."""


class MigrationFailed(BackendError):
    pass


class MigrationCancelled(BackendError):
    pass


class Backend(abc.ABC):
    """One hypervisor.  Guests are keyed by UUID (canonical lowercase string)."""

    name: str = ""

    async def open(self, state_dir: Path) -> None:  # noqa: B027 - optional hook
        """Called once before use; ``state_dir`` is the backend's own folder."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Called once at daemon shutdown."""

    def validate(self, spec: GuestSpec) -> None:  # noqa: B027 - optional hook
        """Refuse (``ConfigUnsupported``) what this backend cannot run, at define time."""

    @abc.abstractmethod
    async def start(self, spec: GuestSpec, *, paused: bool) -> None: ...

    @abc.abstractmethod
    async def destroy(self, uuid: str) -> None:
        """Stop the guest at once.  No error when it is not running."""

    @abc.abstractmethod
    async def pause(self, uuid: str) -> None: ...

    @abc.abstractmethod
    async def resume(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def state(self, uuid: str) -> GuestRunState: ...

    @abc.abstractmethod
    async def incoming_start(self, spec: GuestSpec, listen: StreamAddress) -> int:
        """Start ``spec`` paused and waiting for a stream on ``listen``; return the bound port.

        Raises ``OSError`` (errno EADDRINUSE) when the port is taken, so the caller can retry.
        """

    @abc.abstractmethod
    async def incoming_wait(self, uuid: str) -> MigrationProgress:
        """Wait until the incoming stream completed and was verified; raise MigrationFailed."""

    @abc.abstractmethod
    async def outgoing(
        self, uuid: str, dest: StreamAddress, tuning: MigrationTuning
    ) -> MigrationProgress:
        """Migrate to ``dest``; return the final progress with the guest paused."""

    @abc.abstractmethod
    def progress(self, uuid: str) -> MigrationProgress: ...

    @abc.abstractmethod
    async def cancel(self, uuid: str) -> None:
        """Cancel a running outgoing migration; ``outgoing`` then raises MigrationCancelled."""
