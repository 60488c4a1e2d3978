"""Putting a side back after a failed or abandoned migration: the source guest as it was before
(``src_restore``), the incoming domain undone (``dst_discard``).
"""

from __future__ import annotations

from virtmig.daemon.backend.base import BackendError, GuestRunState
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import JobRecord, MigrationJob
from virtmig.daemon.registry import DomainObj
from virtmig.proto import logsafe
from virtmig.proto.flags import DomainState, PausedReason, RunningReason, ShutoffReason

log = logsafe.logger(__name__)


async def src_restore(daemon: Daemon, dom: DomainObj, job: MigrationJob) -> None:
    """Put the source guest back as it was before migration, if it still exists.

    A guest that never left its pre-migration state (Begin only, or a live migration that ended
    before its switchover) is not touched: it stays ``running (booted)``, as in libvirt.
    """
    run = daemon.backend.state(dom.uuid)
    if run is GuestRunState.SHUTOFF:
        if dom.active:
            daemon.mark_inactive(dom, ShutoffReason.FAILED)
        return
    if job.pre_state is not DomainState.RUNNING:
        if dom.state is DomainState.PAUSED and dom.reason == PausedReason.MIGRATION:
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.USER)
        return
    if (run is GuestRunState.RUNNING and dom.state is DomainState.RUNNING
            and not daemon.backend.progress(dom.uuid).source_stopped):
        # As libvirt (qemuMigrationSrcRestoreDomainState): a live migration that ended before
        # its switchover never stopped the guest, which keeps its state and reason.
        return
    if run is GuestRunState.PAUSED:
        try:
            await daemon.backend.resume(dom.uuid)
        except BackendError as exc:
            log.error("cannot resume %s after failed migration: %s", dom.name, exc)
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.API_ERROR)
            return
    if job.streamed:
        daemon.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATION_CANCELED)


async def dst_discard(
    daemon: Daemon, dom: DomainObj, *, existed: bool, record: JobRecord
) -> None:
    """Undo an incoming domain: kill its guest, free its port, drop or deactivate the object."""
    await daemon.discard_incoming(dom, existed=existed, record=record)
