"""The caller went away: what libvirt's qemuMigrationAnyConnectionClosed does when the session
that owns a migration job ends before the job does (checked again after each phase).
"""

from __future__ import annotations

import logging

from virtmig.daemon.core import Daemon
from virtmig.daemon.job import AsyncJob, Phase
from virtmig.daemon.migration.rollback import dst_discard
from virtmig.daemon.registry import DomainObj
from virtmig.proto.flags import JobType

log = logging.getLogger(__name__)


async def any_check_owner(daemon: Daemon, dom: DomainObj) -> None:
    """After a phase: if the job's caller already left, abandon the job now."""
    job = dom.job
    if job is not None and job.owner and not daemon.session_alive(job.owner):
        await any_owner_gone(daemon, dom)


async def any_owner_gone(daemon: Daemon, dom: DomainObj) -> None:
    """The session that owns ``dom``'s migration job ended before the job did.

    * incoming (prepare): the incoming guest is destroyed (libvirt's auto-destroy);
    * outgoing begin3: the job just ends; the guest was never touched;
    * outgoing perform3_done: nobody knows whether the destination runs: the job ends and the
      guest stays paused for an admin to decide (never resumed: it may run on the destination).
    A phase that is running finishes first and checks again when it ends.
    """
    async with dom.lock:
        job = dom.job
        if job is None or job.busy:
            return
        if job.kind is AsyncJob.MIGRATION_IN:
            log.warning("caller of incoming migration of %s went away: destroying it", dom.name)
            await dst_discard(daemon, dom, existed=dom.config is not None,
                              record=job.record(JobType.FAILED, "migration caller went away"))
            return
        if job.phase is Phase.PERFORM3_DONE:
            log.warning("Migration of domain %s finished but we don't know if the domain was "
                        "successfully started on destination or not", dom.name)
            job.set_phase(Phase.CONFIRM3_CANCELLED)
        else:
            log.info("caller of migration of %s went away in phase %s: job ended", dom.name,
                     job.phase.label)
        await daemon.registry.end_job(dom, job.record(JobType.FAILED,
                                                      "migration caller went away"))


async def any_session_closed(daemon: Daemon, session: str) -> None:
    daemon.sessions.discard(session)
    for dom in daemon.registry:
        if dom.job is not None and dom.job.owner == session:
            await any_owner_gone(daemon, dom)
