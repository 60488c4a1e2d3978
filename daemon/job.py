"""The migration job: one per domain, outliving single RPCs, its phase only moving forward.

::

    source:   begin3 ─► perform3 ─► perform3_done ─► confirm3 | confirm3_cancelled ─► (ended)
                 └──────────────(Prepare failed: Confirm(cancelled))─────────┘
    destination:  prepare ─► finish3 ─► (ended)

    protocol v2:  source perform2 ─► (ended: stopped as migrated, or put back)
                  destination prepare ─► finish2 ─► (ended)

:meth:`MigrationJob.set_phase` is the one function that moves a phase; it refuses to go backwards
("migration protocol going backwards"), as libvirt does.  The job carries what later phases and
crash recovery need (flags, params, the domain's state before migration) and the live statistics.
:class:`JobInfo` is what callers are shown of a job (``virtmig.daemon.jobctl`` builds it).
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from virtmig.daemon.backend.base import MigrationProgress
from virtmig.proto.errors import InternalError, VirtmigError
from virtmig.proto.flags import DomainState, JobOperation, JobType, MigrateFlags
from virtmig.proto.params import TypedParam, TypedParams

if TYPE_CHECKING:
    from virtmig.daemon.tunnel import TunnelOrder


class AsyncJob(enum.Enum):
    MIGRATION_OUT = "migration out"
    MIGRATION_IN = "migration in"

    @property
    def operation(self) -> JobOperation:
        if self is AsyncJob.MIGRATION_OUT:
            return JobOperation.MIGRATION_OUT
        return JobOperation.MIGRATION_IN


class Phase(enum.IntEnum):
    """libvirt's ``qemuMigrationJobPhase``, with its values and strings."""

    NONE = 0
    PERFORM2 = 1
    BEGIN3 = 2
    PERFORM3 = 3
    PERFORM3_DONE = 4
    CONFIRM3_CANCELLED = 5
    CONFIRM3 = 6
    PREPARE = 7
    FINISH2 = 8
    FINISH3 = 9
    POSTCOPY_FAILED = 10
    BEGIN_RESUME = 11
    PERFORM_RESUME = 12
    CONFIRM_RESUME = 13
    PREPARE_RESUME = 14
    FINISH_RESUME = 15

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def streaming(self) -> bool:
        """The source's Perform phases (v2 and v3): the stream may be running."""
        return self in (Phase.PERFORM2, Phase.PERFORM3)

    @classmethod
    def from_label(cls, label: str) -> Phase:
        try:
            return cls[label.upper()]
        except KeyError as exc:
            raise ValueError(f"unknown migration phase '{label}'") from exc


@dataclass
class JobRecord:
    """What ``domjobinfo --completed`` shows after a job ended."""

    type: JobType
    operation: JobOperation
    time_elapsed_ms: int
    progress: MigrationProgress
    error: str = ""
    # The migration protocol the job ran with (``MigrationProtocol``; "" if unknown).
    protocol: str = ""
    # The migration's id (cookie A/B's <virtmig-migration-id>; "" if unknown).
    migration_id: str = ""


@dataclass(frozen=True)
class JobInfo:
    """A job as GetJobInfo and WatchJob report it (``virDomainJobInfo`` plus libvirt's job stats):
    the running job, the last completed one, or none (``type`` NONE, everything else empty)."""

    type: JobType
    operation: JobOperation = JobOperation.UNKNOWN
    time_elapsed_ms: int = 0
    data_total: int = 0
    data_processed: int = 0
    data_remaining: int = 0
    mem_total: int = 0
    mem_processed: int = 0
    mem_remaining: int = 0
    stats: tuple[TypedParam, ...] = ()
    phase: str = ""
    error: str = ""
    abort_requested: bool = False


@dataclass
class MigrationJob:
    kind: AsyncJob
    phase: Phase
    flags: MigrateFlags
    params: TypedParams = field(default_factory=TypedParams)
    started: float = field(default_factory=time.time)
    # Source: the guest's state before migration, to decide whether to resume after a failure.
    pre_state: DomainState = DomainState.NOSTATE
    # Destination: the domain's name on the source when renamed (for cookie checks).
    origname: str = ""
    # Destination: the migration port taken in Prepare (held from before it is bound).
    port: int = 0
    # Destination: Prepare waits for a migration port (every one is taken); an abort or the
    # end of the caller's session stops the wait (``abort_event``).
    waiting_port: bool = False
    # Set by Perform when it is under way; read-only calls read it without any lock.
    progress: MigrationProgress = field(default_factory=MigrationProgress)
    abort_requested: bool = False
    # True while a phase RPC is running on this job (it owns ending the job on failure); see
    # the ``busy`` property.
    _busy: bool = field(default=False, repr=False)
    # When the last phase call on this job ended (monotonic clock): a job nobody drives any more
    # is rolled back once it has been idle for ``incoming_job_timeout`` (migration.owner).
    idle_since: float = field(default_factory=time.monotonic)
    # Perform started streaming: the guest was touched (a rollback resumes it as "canceled").
    streamed: bool = False
    # Source: the bandwidth limit the stream runs with, in MiB/s (0: unlimited), set when it
    # starts and by migrate-setspeed during it; what migrate-getspeed reports meanwhile.
    bandwidth_mib: int = 0
    # Switched to post-copy: nothing can be rolled back any more.
    postcopy: bool = False
    # The error to report when the daemon itself cancelled the stream (stall watchdog,
    # completion timeout, lost peer in peer-to-peer).
    fail_error: VirtmigError | None = None
    # The session of the caller that started the job (Begin with CHANGE_PROTECTION, Prepare);
    # "" when the caller opened none.  When that session ends, the job is abandoned.
    owner: str = ""
    # The migration's id (cookie A/B's <virtmig-migration-id>), and the peer: on the source the
    # destination's host UUID and name (cookie B) and its daemon's URI as this host reaches it
    # (p2p's dconnuri, or the ``virtmig.dest_uri`` param); on the destination the source's.
    # Protocol v2 has no cookie A: its Prepare2 makes the id and cookie B carries it to Perform;
    # the destination does not learn the source's host (its peer fields stay "").
    # Kept in the status file: after a restart, recovery asks the peer about this migration.
    migration_id: str = ""
    peer_hostuuid: str = ""
    peer_hostname: str = ""
    dest_uri: str = ""
    # The migration protocol (``MigrationProtocol``) of the RPC that started the job.
    protocol: str = ""
    # The phase last reported to the registry's observer (virtmig.daemon.audit): a saved job
    # whose phase differs from it has changed phase.
    reported_phase: Phase = field(default=Phase.NONE, repr=False, compare=False)
    # When it was reported (monotonic clock): the time spent in a phase, for the metrics.
    reported_at: float = field(default_factory=time.monotonic, repr=False, compare=False)
    _abort_event: asyncio.Event | None = field(default=None, repr=False, compare=False)
    # Destination, tunnelled: the order its tunnel connections reach the incoming guest in.
    tunnel_order: TunnelOrder | None = field(default=None, repr=False, compare=False)

    @property
    def busy(self) -> bool:
        """A phase RPC runs on this job; clearing it stamps ``idle_since``."""
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        if self._busy and not value:
            self.idle_since = time.monotonic()
        self._busy = value

    @property
    def abort_event(self) -> asyncio.Event:
        """Set once an abort is requested (created lazily, on the running loop)."""
        if self._abort_event is None:
            self._abort_event = asyncio.Event()
            if self.abort_requested:
                self._abort_event.set()
        return self._abort_event

    def request_abort(self) -> None:
        self.abort_requested = True
        self.abort_event.set()

    def withdraw_abort(self) -> None:
        """The abort could not take effect (e.g. the stream is switching to post-copy)."""
        self.abort_requested = False
        if self._abort_event is not None:
            self._abort_event.clear()

    def set_phase(self, phase: Phase) -> None:
        if phase < self.phase and self.phase < Phase.POSTCOPY_FAILED:
            raise InternalError(
                f"migration protocol going backwards {self.phase.label} => {phase.label}"
            )
        self.phase = phase

    def elapsed_ms(self) -> int:
        return int((time.time() - self.started) * 1000)

    @property
    def asks_in_perform2(self) -> bool:
        """A protocol v2 source job whose guest may run on the destination if the job dies in
        perform2: peer-to-peer, where this daemon itself runs Finish2 and the destination's
        daemon is known (``dest_uri``).  In regular v2 the destination resumes its guest only
        after a Finish2 with Perform's success, which a Perform that died cannot have given."""
        return self.phase is Phase.PERFORM2 and bool(self.migration_id and self.dest_uri)

    def record(self, jtype: JobType, error: str = "") -> JobRecord:
        return JobRecord(jtype, self.kind.operation, self.elapsed_ms(), self.progress, error,
                         self.protocol, self.migration_id)
