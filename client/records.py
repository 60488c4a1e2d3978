"""The client library's typed values of job, event, location and history replies (frozen, plain
data): :class:`DomainInfo`, :class:`JobInfo`, :class:`Event`, :class:`GuestLocation` and
:class:`HistoryEntry`.

Apart from :mod:`virtmig.client.values` (which re-exports them, imported on first use) because
each frozen dataclass costs its module's import about a millisecond and a half (dataclasses
compiles its methods), and a command that lists domains, asks for the host or migrates without
``--verbose`` needs none of these (issue 17: start-up).  Each value is built from its wire
message in one ``from_msg``; nothing here talks to a daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from virtmig.client.values import Domain
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.flags import DomainState, JobOperation, JobType

if TYPE_CHECKING:
    from virtmig.proto.params import TypedParam

__all__ = ["DomainInfo", "Event", "GuestLocation", "HistoryEntry", "JobInfo"]


@dataclass(frozen=True)
class DomainInfo:
    domain: Domain
    max_memory_kib: int
    memory_kib: int
    vcpus: int
    cpu_time_ns: int
    os_type: str

    @classmethod
    def from_msg(cls, m: pb.DomainInfo) -> DomainInfo:
        return cls(Domain.from_msg(m.domain), m.max_memory_kib, m.memory_kib, m.vcpus,
                   m.cpu_time_ns, m.os_type)


@dataclass(frozen=True)
class JobInfo:
    type: JobType
    operation: JobOperation
    time_elapsed_ms: int
    data_total: int
    data_processed: int
    data_remaining: int
    mem_total: int
    mem_processed: int
    mem_remaining: int
    stats: tuple[TypedParam, ...]
    phase: str
    error: str
    abort_requested: bool = False

    @classmethod
    def from_msg(cls, m: pb.JobInfo) -> JobInfo:
        # Here, not at the top: the typed params (and their table) are for job commands only.
        from virtmig.proto.wire import from_wire

        return cls(JobType(m.type), JobOperation(m.operation), m.time_elapsed_ms, m.data_total,
                   m.data_processed, m.data_remaining, m.mem_total, m.mem_processed,
                   m.mem_remaining, tuple(from_wire(m.stats)), m.phase, m.error,
                   m.abort_requested)

    def stat(self, name: str) -> int | float | bool | str | None:
        """One of libvirt's job stats by its wire name (``memory_bps``, ``downtime``...)."""
        for p in self.stats:
            if p.name == name:
                return p.value
        return None


_EVENT_KINDS = {
    pb.EVENT_KIND_LIFECYCLE: "lifecycle",
    pb.EVENT_KIND_MIGRATION_ITERATION: "migration-iteration",
    pb.EVENT_KIND_JOB_COMPLETED: "job-completed",
    pb.EVENT_KIND_JOB_FAILED: "job-failed",
}


@dataclass(frozen=True)
class Event:
    """A domain event (``Domains.Events``): lifecycle, migration iteration or job end."""

    kind: str  # "lifecycle", "migration-iteration", "job-completed", "job-failed"
    domain_name: str
    domain_uuid: str
    event: int
    detail: int
    description: str
    iteration: int
    job: JobInfo | None
    timestamp_ms: int

    @classmethod
    def from_msg(cls, m: pb.Event) -> Event:
        return cls(_EVENT_KINDS.get(m.kind, "unknown"), m.domain_name, m.domain_uuid, m.event,
                   m.detail, m.description, m.iteration,
                   JobInfo.from_msg(m.job) if m.HasField("job") else None, m.timestamp_ms)


@dataclass(frozen=True)
class GuestLocation:
    """Where a guest is, as one host knows it (``GuestLocation``; virtmig.daemon.locate): a
    copy runs there (``active``), the last incoming migration that finished there, one under
    way, and where that host sent it (``away_*``, "" when it did not)."""

    host_uuid: str
    known: bool
    active: bool
    state: DomainState
    arrived_migration_id: str
    incoming_migration_id: str
    incoming_phase: str
    away_host_uuid: str
    away_hostname: str
    away_uri: str
    away_migration_id: str

    @classmethod
    def from_msg(cls, m: pb.GuestLocationReply) -> GuestLocation:
        return cls(m.host_uuid, m.known, m.active, DomainState(m.state), m.arrived_migration_id,
                   m.incoming_migration_id, m.incoming_phase, m.away_host_uuid,
                   m.away_hostname, m.away_uri, m.away_migration_id)


@dataclass(frozen=True)
class HistoryEntry:
    """One finished migration, as the daemon asked saw it (its ``role``: source or
    destination).  Field names and meanings are the daemon's history lines'."""

    time: str
    migration_id: str
    domain: str
    uuid: str
    role: str
    source: str
    destination: str
    mode: str
    transport: str
    protocol: str
    outcome: str
    error: str
    duration_ms: int
    downtime_ms: int
    bytes: int

    @classmethod
    def from_msg(cls, m: pb.HistoryEntry) -> HistoryEntry:
        return cls(**{f.name: getattr(m, f.name) for f in fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
