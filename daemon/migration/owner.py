"""The caller went away: what libvirt's qemuMigrationAnyConnectionClosed does when the session
that owns a migration job ends before the job does (checked again after each phase), and the
reaper that rolls back a job no session owns.

A job's owner is the session of the caller that started it (Begin with CHANGE_PROTECTION,
Prepare, Perform without it; in peer-to-peer the source daemon's own session for the run).
When that session ends, the job is abandoned at once (:func:`any_session_closed`).  A job whose
caller opened no session (or named one that does not exist) has no one to notice it: the reaper
(:func:`any_reap_unowned`) abandons it once it has been idle (no phase call running on it) for
``incoming_job_timeout`` seconds, the same way.  Post-copy failed jobs are kept for recovery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from virtmig.daemon import locate
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.migration.rollback import dst_discard
from virtmig.daemon.registry import DomainObj
from virtmig.proto import logsafe
from virtmig.proto.errors import OperationFailed
from virtmig.proto.flags import JobType

log = logsafe.logger(__name__)

GONE = "migration caller went away"
REAPER_TICK_S = 1.0


async def any_check_owner(daemon: Daemon, dom: DomainObj) -> None:
    """After a phase: if the job's caller already left, abandon the job now."""
    job = dom.job
    if job is not None and job.owner and not daemon.session_alive(job.owner):
        await any_owner_gone(daemon, dom)


async def any_owner_gone(daemon: Daemon, dom: DomainObj, error: str = GONE,
                         still: Callable[[MigrationJob], bool] | None = None) -> None:
    """The session that owns ``dom``'s migration job ended before the job did (or the job never
    had one and sat idle too long: ``error`` says which).

    * incoming (prepare): the incoming guest is destroyed (libvirt's auto-destroy), its port
      released, and a domain that was not defined before Prepare disappears;
    * outgoing begin3: the job just ends; the guest was never touched;
    * outgoing perform3_done: nobody knows whether the destination runs: the job ends and the
      guest stays paused (never resumed blindly: it may run on the destination) until the
      destination answers how the migration ended (:func:`virtmig.daemon.locate.settle_later`);
    * post-copy failed: the job is kept (only post-copy recovery can settle it).
    A phase that is running finishes first and checks again when it ends, except a Prepare
    waiting for a migration port: it stops waiting and rolls back, failing with ``error``.
    ``still``: a condition checked again under the domain's lock (the reaper's: the job is
    still unowned).
    """
    job = dom.job
    if job is not None and job.waiting_port and still is None:
        # A Prepare waiting for a migration port: it stops waiting and rolls back itself.
        job.fail_error = OperationFailed(error)
        job.request_abort()
        return
    async with dom.lock:
        job = dom.job
        if job is None or job.busy or job.phase >= Phase.POSTCOPY_FAILED:
            return
        if still is not None and not still(job):
            return
        if job.kind is AsyncJob.MIGRATION_IN:
            log.warning("incoming migration of %s rolled back: %s", dom.name, error)
            await dst_discard(daemon, dom, existed=dom.config is not None,
                              record=job.record(JobType.FAILED, error))
            return
        unknown = job.phase is Phase.PERFORM3_DONE
        if unknown:
            log.warning("Migration of domain %s finished but we don't know if the domain was "
                        "successfully started on destination or not (%s)", dom.name, error)
            job.set_phase(Phase.CONFIRM3_CANCELLED)
        else:
            log.info("migration of %s ended in phase %s: %s", dom.name, job.phase.label, error)
        await daemon.registry.end_job(dom, job.record(JobType.FAILED, error))
        if unknown and dom.active:
            # Never resumed blindly: the destination is asked (virtmig.daemon.locate).
            locate.settle_later(daemon, dom.uuid, locate.away_of(job), error)


async def any_session_closed(daemon: Daemon, session: str) -> None:
    daemon.sessions.discard(session)
    for dom in daemon.registry.jobs():
        if dom.job is not None and dom.job.owner == session:
            await any_owner_gone(daemon, dom)


def unowned_expired(daemon: Daemon, job: MigrationJob, now: float) -> bool:
    """Whether ``job`` has no live owner and no phase call has run on it for the timeout."""
    return (not job.busy and job.phase < Phase.POSTCOPY_FAILED
            and not daemon.session_alive(job.owner)
            and now - job.idle_since >= daemon.config.incoming_job_timeout)


async def any_reap_unowned(daemon: Daemon) -> None:
    """Run until cancelled: roll back every job :func:`unowned_expired` finds.

    It looks at least every second (more often for a short timeout), so a job goes within
    ``incoming_job_timeout`` plus one look.
    """
    timeout = daemon.config.incoming_job_timeout
    tick = min(REAPER_TICK_S, timeout / 4)
    error = f"no caller session for {timeout:g} s: job abandoned"
    while True:
        await asyncio.sleep(tick)
        now = time.monotonic()
        for dom in daemon.registry.jobs():
            job = dom.job
            if job is not None and unowned_expired(daemon, job, now):
                try:
                    await any_owner_gone(daemon, dom, error, still=lambda j: unowned_expired(
                        daemon, j, time.monotonic()))
                except Exception:  # a bug: keep reaping the others
                    log.exception("cannot roll back the unowned job of %s", dom.name)
