"""After a daemon restart: take back guests that outlived it, and settle their migration jobs.

A guest whose backend still runs it gets its state, reason and id back from its status file.  A
migration job recorded there is settled by libvirt's recovery tables (what its QEMU driver does per
job phase after a restart), deciding from the recorded phase whether the guest is killed, resumed,
left paused, or kept for post-copy recovery (protocol v2's phases too: perform2 resumes the source,
finish2 resumes the destination, whose source already stopped its guest).  Nothing is resumed when
the outcome is unknown: a source job past Perform's start whose guest is paused is settled by
asking the destination about that migration (:func:`virtmig.daemon.locate.settle_later`, in the
background, so that an unreachable peer never holds up the daemon's start); a confirmed one
records where it went.  In perform2 that is asked only in peer-to-peer v2, where this daemon ran
Finish2 itself and knows the destination's daemon (``MigrationJob.asks_in_perform2``); a regular
v2 source is resumed, as v2's own rule has it: its destination resumes the guest only after a
Finish2 carrying Perform's success, which a Perform that died with the daemon cannot have given.
"""

from __future__ import annotations

from lxml import etree

from virtmig.daemon import locate
from virtmig.daemon.backend.base import BackendError, GuestRunState
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import AsyncJob, JobRecord, Phase
from virtmig.daemon.registry import DomainObj
from virtmig.daemon.statusxml import job_from_status
from virtmig.proto import logsafe
from virtmig.proto.flags import (
    REASONS,
    DomainState,
    JobType,
    PausedReason,
    RunningReason,
    ShutoffReason,
)

log = logsafe.logger(__name__)


def _state_of(status: etree._Element) -> tuple[DomainState, int]:
    try:
        state = DomainState[status.get("state", "nostate").upper()]
    except KeyError:
        return DomainState.NOSTATE, 0
    enum_cls = REASONS.get(state)
    label = status.get("reason", "unknown").upper().replace("-", "_")
    try:
        return state, int(enum_cls[label]) if enum_cls is not None else 0
    except KeyError:
        return state, 0


async def recover(daemon: Daemon, survivors: list[tuple[DomainObj, etree._Element]]) -> None:
    for dom, status in survivors:
        try:
            await _recover_one(daemon, dom, status)
        except (BackendError, OSError) as exc:
            log.error("cannot recover domain %s: %s", dom.name, exc)


async def _recover_one(daemon: Daemon, dom: DomainObj, status: etree._Element) -> None:
    recorded, reason = _state_of(status)
    run = daemon.backend.state(dom.uuid)
    state = DomainState.RUNNING if run is GuestRunState.RUNNING else DomainState.PAUSED
    if recorded is not state:
        reason = 0  # the reason recorded was for another state: unknown now
    dom.id = int(status.get("id", "-1"))
    if dom.id < 0:
        dom.id = daemon.registry.new_id()
    dom.state, dom.reason = state, reason
    job = job_from_status(status)
    log.info("recovered domain %s (%s%s)", dom.name, dom.state.name.lower(),
             f", migration job in phase {job.phase.label}" if job else "")
    if job is None:
        daemon.registry.save_status(dom)
        return
    record = JobRecord(JobType.FAILED, job.kind.operation, 0, job.progress,
                       "the daemon restarted during the migration")
    phase = job.phase
    if phase >= Phase.POSTCOPY_FAILED:
        dom.job = job  # kept for post-copy recovery
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
        return
    if job.kind is AsyncJob.MIGRATION_IN:
        if phase is Phase.FINISH2 and run is GuestRunState.PAUSED:
            # v2: the source stopped its guest before Finish2: resume it here and hope.
            await daemon.backend.resume(dom.uuid)
            daemon.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATED)
            dom.completed = record
            daemon.placement.arrived(dom.uuid, job.migration_id, job.peer_hostuuid)
            return
        if phase in (Phase.FINISH2, Phase.FINISH3) and run is GuestRunState.RUNNING:
            daemon.registry.save_status(dom)  # vCPUs already run here: keep it
            dom.completed = record
            daemon.placement.arrived(dom.uuid, job.migration_id, job.peer_hostuuid)
            return
        await daemon.backend.destroy(dom.uuid)  # an unfinished incoming guest
        dom.completed = record
        daemon.mark_inactive(dom, ShutoffReason.FAILED)
        return
    # outgoing
    dom.completed = record
    if phase is Phase.CONFIRM3:
        await daemon.backend.destroy(dom.uuid)  # it was confirmed on the destination
        if dom.persistent:
            daemon.placement.departed(dom.uuid, locate.away_of(job))
        daemon.mark_inactive(dom, ShutoffReason.MIGRATED)
        return
    if job.migration_id and run is GuestRunState.PAUSED and (phase in (
            Phase.PERFORM3, Phase.PERFORM3_DONE, Phase.CONFIRM3_CANCELLED)
            or job.asks_in_perform2):
        # Resumed only once the destination says the migration did not arrive there.
        daemon.registry.save_status(dom)
        locate.settle_later(daemon, dom.uuid, locate.away_of(job),
                            f"the daemon restarted in phase {phase.label}")
        return
    resume = phase in (Phase.PERFORM2, Phase.PERFORM3, Phase.CONFIRM3_CANCELLED) and \
        job.pre_state is DomainState.RUNNING and run is GuestRunState.PAUSED
    if resume:
        await daemon.backend.resume(dom.uuid)
        daemon.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATION_CANCELED)
        return
    # begin3: nothing happened; perform3_done: outcome unknown, left as it is (paused)
    daemon.registry.save_status(dom)
