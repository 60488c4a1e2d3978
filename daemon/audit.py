"""What a migration leaves behind for operators: a log line per phase change, one INFO line per
finished migration, its :mod:`~virtmig.daemon.history` entry, and the metrics
(:mod:`~virtmig.daemon.metrics`).

The registry calls :class:`Audit` (``Registry.observer``): :meth:`Audit.phase` when a job's
phase is saved to its status file (every phase change is, before the daemon acts on it), and
:meth:`Audit.ended` when a job ends with a record.  Both log lines carry the migration id, the
one cookie A/B's ``<virtmig-migration-id>`` carries, which the job stats show as
``virtmig.migration_id`` on both daemons; in ``log_format = "json"`` they carry the same figures
as fields (:mod:`virtmig.daemon.logs`)::

    migration 5f0c... of vm1: phase none -> begin3 (source)
    migration 5f0c... of vm1 completed: source host-a, destination host-b, mode live,
        transport direct, protocol v3+params, duration 1234 ms, downtime 12 ms, bytes 268435456
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from virtmig.daemon.history import Entry, History
from virtmig.daemon.job import AsyncJob, JobRecord, MigrationJob, Phase
from virtmig.proto import logsafe
from virtmig.proto.flags import JobType, MigrateFlags

if TYPE_CHECKING:
    from virtmig.daemon.registry import DomainObj

log = logsafe.logger(__name__)


class Sink(Protocol):
    """What else hears of phases and outcomes (the metrics)."""

    def phase(self, job: MigrationJob, old: Phase, spent: float) -> None: ...

    def ended(self, job: MigrationJob, entry: Entry, spent: float) -> None: ...


def mode_of(job: MigrationJob) -> str:
    if job.flags & MigrateFlags.OFFLINE:
        return "offline"
    if job.postcopy:
        return "postcopy"
    return "live" if job.flags & MigrateFlags.LIVE else "non-live"


def transport_of(job: MigrationJob) -> str:
    if job.flags & MigrateFlags.TUNNELLED:
        return "tunnelled"
    return "p2p" if job.flags & MigrateFlags.PEER2PEER else "direct"


def _peer(job: MigrationJob) -> str:
    if job.peer_hostname:
        return job.peer_hostname
    return urlsplit(job.dest_uri).hostname or "" if job.dest_uri else ""


ERROR_LIMIT = 1000  # characters of an error message a history entry keeps
OUTCOMES = {JobType.COMPLETED: "completed", JobType.FAILED: "failed",
            JobType.CANCELLED: "cancelled"}


def entry_of(hostname: str, dom: DomainObj, job: MigrationJob, record: JobRecord) -> Entry:
    out = job.kind is AsyncJob.MIGRATION_OUT
    progress = record.progress
    return Entry(
        time=datetime.now(UTC).isoformat(timespec="milliseconds"),
        migration_id=job.migration_id, domain=dom.name, uuid=dom.uuid,
        role="source" if out else "destination",
        source=hostname if out else job.peer_hostname,
        destination=_peer(job) if out else hostname,
        mode=mode_of(job), transport=transport_of(job), protocol=record.protocol,
        outcome=OUTCOMES.get(record.type, record.type.name.lower()),
        error=record.error[:ERROR_LIMIT],
        duration_ms=record.time_elapsed_ms, downtime_ms=progress.downtime_ms,
        bytes=progress.processed_bytes,
    )


class Audit:
    """The registry's observer of migration jobs on one daemon."""

    def __init__(self, hostname: str, history: History | None = None) -> None:
        self.hostname = hostname
        self.history = history
        self.sinks: list[Sink] = []

    def phase(self, dom: DomainObj, job: MigrationJob, old: Phase, spent: float) -> None:
        """``job`` moved from ``old`` (``NONE``: it started) after ``spent`` seconds in it."""
        if log.isEnabledFor(logging.INFO):  # the record's fields are built only to be logged
            role = "source" if job.kind is AsyncJob.MIGRATION_OUT else "destination"
            fields: dict[str, Any] = {
                "event": "migration_phase", "migration_id": job.migration_id,
                "domain": dom.name, "uuid": dom.uuid, "role": role,
                "from_phase": old.label, "phase": job.phase.label}
            log.info("migration %s of %s: phase %s -> %s (%s)", job.migration_id or "-",
                     dom.name, old.label, job.phase.label, role, extra={"fields": fields})
        for sink in self.sinks:
            sink.phase(job, old, spent)

    def ended(self, dom: DomainObj, job: MigrationJob, record: JobRecord,
              spent: float) -> Entry:
        """``spent``: the seconds ``job`` was in its last phase."""
        entry = entry_of(self.hostname, dom, job, record)
        if log.isEnabledFor(logging.INFO):
            self._log_ended(entry)
        if self.history is not None:
            self.history.append(entry)
        for sink in self.sinks:
            sink.ended(job, entry, spent)
        return entry

    @staticmethod
    def _log_ended(entry: Entry) -> None:
        fields: dict[str, Any] = {"event": "migration_end", **entry.__dict__}
        error = f" ({entry.error})" if entry.error else ""
        log.info("migration %s of %s %s%s: source %s, destination %s, mode %s, transport %s, "
                 "protocol %s, duration %d ms, downtime %d ms, bytes %d",
                 entry.migration_id or "-", entry.domain, entry.outcome, error,
                 entry.source or "-", entry.destination or "-", entry.mode, entry.transport,
                 entry.protocol or "-", entry.duration_ms, entry.downtime_ms, entry.bytes,
                 extra={"fields": fields})
