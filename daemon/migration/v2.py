"""Migration protocol v2 (libvirt's ``virDomainMigrateVersion2``), built from the v3 phases.

The client reads the source's migratable XML itself (``GetXML`` with ``migratable``), then:

* ``dst_prepare2``  Prepare2: the incoming domain and its port, as Prepare does, but with no
                    cookie to read (v2 has no Begin); cookie B still carries the stream token.
* ``src_perform2``  Perform: the job (phase perform2), the stream to the URI and, on success,
                    the guest **stopped here as migrated** (v2 has no Confirm); on failure the
                    guest is put back and the job ends, as v3's Perform does.
* ``dst_finish2``   Finish2 with Perform's return code: resume the guest (retcode 0), or destroy
                    the incoming one.

Peer-to-peer v2 runs the same phases from the source daemon, except that the source's guest is
stopped only once Finish2 reports it on the destination (``src_perform2(complete=False)``, then
``src_settle2``), and resumed otherwise: libvirt's Peer2Peer2.

A guest runs in one place (:mod:`virtmig.daemon.locate`) in v2 too.  v2 has no cookie A: the
destination's Prepare2 makes the migration's id and cookie B carries it to Perform, which records
it with the destination's host (and, peer-to-peer, its daemon's URI ``dconnuri``).  A Perform that
stops the guest as migrated records where it went, as Confirm does; Perform refuses a guest whose
last migration's outcome is unknown, and makes Begin's unsafe-disk check (v2 has no Begin).  When
peer-to-peer cannot tell whether Finish2 ran the guest there, the guest stays paused and the
destination is asked about that migration id in the background, as v3 does.  The destination
does not learn the source's host in v2.

Every v2 call first refuses the flags v2 never had (``V3_ONLY_FLAGS``: change protection, offline,
post-copy) with libvirt's virCheckFlags message, before anything changes.  The hazard v2 carries
in regular mode: Perform has already stopped the source when Finish2 runs, so a Finish2 that fails
leaves no running copy; this is why a client uses v2 only when one side lacks v3.
"""

from __future__ import annotations

from virtmig.daemon import locate
from virtmig.daemon.backend.base import StreamAddress
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import MigrationJob, Phase
from virtmig.daemon.migration.common import any_check, any_check_tls_force
from virtmig.daemon.migration.destination import dst_finish, dst_prepare
from virtmig.daemon.migration.owner import any_check_owner
from virtmig.daemon.migration.rollback import src_restore
from virtmig.daemon.migration.source import (
    _check_safe,
    _src_perform_job,
    _src_perform_start,
    _src_stream,
    src_complete,
)
from virtmig.daemon.registry import DomainObj
from virtmig.proto import logsafe
from virtmig.proto.compat import check_v2_flags
from virtmig.proto.flags import DomainState, JobType, MigrateFlags, MigrationProtocol, PausedReason
from virtmig.proto.params import TypedParams

log = logsafe.logger(__name__)

PREPARE2 = "virDomainMigratePrepare2"
PERFORM = "virDomainMigratePerform"
FINISH2 = "virDomainMigrateFinish2"


async def dst_prepare2(
    daemon: Daemon, params: TypedParams, flags: int, owner: str = ""
) -> tuple[bytes, str | None]:
    """Prepare2: cookie B and the URI the source streams to."""
    check_v2_flags(flags, PREPARE2)
    return await dst_prepare(daemon, params, None, flags, owner, protocol=MigrationProtocol.V2)


async def dst_finish2(
    daemon: Daemon, params: TypedParams, flags: int, retcode: int
) -> DomainObj:
    """Finish2: the domain running here, or (Perform failed: ``retcode`` not 0) the incoming
    guest destroyed and the error.  v2's Finish reads no cookie and makes none."""
    check_v2_flags(flags, FINISH2)
    dom, _cookie = await dst_finish(daemon, params, b"", flags, retcode != 0, v2=True)
    return dom


async def src_perform2(
    daemon: Daemon, dom: DomainObj, params: TypedParams, cookie_in: bytes, flags: int, *,
    owner: str = "", tunnel: StreamAddress | None = None, complete: bool = True,
    dest_uri: str = "",
) -> None:
    """Perform (v2): stream the guest to ``params``' URI.  ``complete``: stop the guest as
    migrated once the stream is over (regular v2); else (peer-to-peer) leave it paused with its
    job in perform2 for :func:`src_settle2`.  Any failure puts the guest back and ends the job.
    ``dest_uri``: the destination daemon as this host reaches it (peer-to-peer's dconnuri)."""
    f = check_v2_flags(flags, PERFORM)
    f = any_check(daemon, f, params, PERFORM)
    any_check_tls_force(daemon, f)  # v2 has no Begin: its checks are made here
    async with dom.lock:
        _begin_checks(daemon, dom, f)
        job = _src_perform_job(daemon, dom, f, params, owner, MigrationProtocol.V2)
        dest, _persistent, token = await _src_perform_start(
            daemon, dom, job, f, params, cookie_in, tunnel, dest_uri, phase=Phase.PERFORM2)
    await _src_stream(daemon, dom, job, f, params, dest, token)
    async with dom.lock:
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
        if complete:
            await src_complete(daemon, dom, job, f)
            return
    # Peer-to-peer: the job stays busy (nobody may end it) until src_settle2.
    await any_check_owner(daemon, dom)


def _begin_checks(daemon: Daemon, dom: DomainObj, f: MigrateFlags) -> None:
    """What v3's Begin checks before a migration, made by v2's Perform: not a guest whose last
    migration's outcome is unknown (it may run there), and no unsafe disk unless UNSAFE."""
    locate.refuse_uncertain(daemon, dom, "migrate")
    if dom.active and not f & MigrateFlags.UNSAFE:
        _check_safe(daemon, dom.definition)


async def src_settle2(daemon: Daemon, dom: DomainObj, migrated: bool | None) -> None:
    """Peer-to-peer v2 after Finish2: the guest runs on the destination (stop it here as
    migrated), does not (resume it), or nobody knows (None: the destination cannot be reached;
    the job ends, and the guest stays paused here until the destination answers how this
    migration ended: :func:`virtmig.daemon.locate.settle_later`)."""
    async with dom.lock:
        job = dom.job
        if job is None or job.phase is not Phase.PERFORM2:
            # Perform failed and already put the guest back (and ended its job).
            if migrated:
                log.error("migration of %s: the destination runs the guest although Perform "
                          "failed here; the guest here was put back", dom.name)
            return
        if migrated:
            await src_complete(daemon, dom, job, job.flags)
            return
        if migrated is None:
            log.error("migration of %s: whether it runs on the destination is unknown; the "
                      "guest stays paused here", dom.name)
            why = "outcome unknown: the destination cannot be reached"
            await _end(daemon, dom, job, why)
            if dom.active:  # (asked about the migration id cookie B carried)
                locate.settle_later(daemon, dom.uuid, locate.away_of(job), why)
            return
        await src_restore(daemon, dom, job)
        await _end(daemon, dom, job, "migration cancelled")


async def _end(daemon: Daemon, dom: DomainObj, job: MigrationJob, error: str) -> None:
    await daemon.registry.end_job(dom, job.record(JobType.FAILED, error))
