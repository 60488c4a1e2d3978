"""The source's phases: Begin (the migratable XML and cookie A; the job, with change
protection), Perform (stream the guest to the destination) and Confirm (stop the source as
migrated, or put it back).

Perform runs in steps, top-down in :func:`src_perform`: take the job, check and enter phase
perform3, stream (the domain's lock released, the job's watcher running), then perform3_done and
cookie C.  Perform ends the job on any failure, the source put back as it was (the client calls no
Confirm after a failed Perform); when the daemon stopped the stream itself, its reason is the
error (:func:`_perform_error`).  Protocol v2's Perform (:mod:`.v2`) runs the same steps in
phase perform2, then stops the guest itself (:func:`src_complete`, Confirm's success path).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from virtmig.daemon import cookie as ck
from virtmig.daemon import jobctl, locate, stall
from virtmig.daemon.abi import check_abi_stability
from virtmig.daemon.backend.base import (
    BackendError,
    MigrationCancelled,
    MigrationProgress,
    MigrationStatus,
    StreamAddress,
)
from virtmig.daemon.core import Daemon
from virtmig.daemon.domxml import (
    DomainDef,
    format_domain_xml,
    parse_domain_xml,
)
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.migration.common import (
    _job_of,
    _no_job,
    _require_active,
    any_check,
    any_check_tls_force,
    any_cookie,
    any_stats,
)
from virtmig.daemon.migration.owner import any_check_owner
from virtmig.daemon.migration.rollback import src_restore
from virtmig.daemon.migration.tuning import check_stream_pki, src_tuning
from virtmig.daemon.migration.uri import src_parse_uri
from virtmig.daemon.placement import new_migration_id
from virtmig.daemon.registry import DomainObj
from virtmig.proto import logsafe
from virtmig.proto.errors import (
    InternalInputError,
    InvalidArgument,
    MigrateUnsafe,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags, PausedReason, ShutoffReason
from virtmig.proto.params import MigrateParam, Party, TypedParams

log = logsafe.logger(__name__)

F = MigrateFlags
P = MigrateParam


# =================================================================================================
# Begin


async def src_begin(
    daemon: Daemon, dom: DomainObj, params: TypedParams, flags: int, owner: str = "",
    protocol: str = "",
) -> tuple[str, bytes]:
    """``protocol``: the ``MigrationProtocol`` of the call, recorded in the job."""
    f = any_check(daemon, flags, params, "virDomainMigrateBegin3Params")
    any_check_tls_force(daemon, f)
    check_stream_pki(daemon, f, Party.SRC)
    async with dom.lock:
        _no_job(dom)
        offline = bool(f & F.OFFLINE)
        if not offline:
            _require_active(dom)
        current = dom.config if offline and dom.config is not None else dom.definition
        locate.refuse_uncertain(daemon, dom, "migrate")
        if params.get_str(P.DEST_URI):
            locate.check_dest_uri(params.get_str(P.DEST_URI) or "")
        if not f & (F.UNSAFE | F.OFFLINE):
            _check_safe(daemon, current)
        xml = _src_begin_xml(daemon, current, params)
        # The migration's id, carried by the cookies (virtmig.daemon.placement).
        mid = new_migration_id()
        # A guest on the host's own CPU: the destination checks it has the same (host_cpu).
        cpu = "" if offline else daemon.backend.host_cpu(daemon.spec(current))
        cookie = any_cookie(daemon, dom.name, dom.uuid, migration_id=mid, host_cpu=cpu)
        if f & F.CHANGE_PROTECTION:
            jobctl.check_limit(daemon, AsyncJob.MIGRATION_OUT)
            dom.job = MigrationJob(
                kind=AsyncJob.MIGRATION_OUT,
                phase=Phase.BEGIN3,
                flags=f,
                params=params.copy(),
                pre_state=dom.state,
                owner=owner,
                migration_id=mid,
                protocol=protocol,
            )
            daemon.registry.save_status(dom)
    await any_check_owner(daemon, dom)
    return xml, cookie


def _check_safe(daemon: Daemon, current: DomainDef) -> None:
    """libvirt's Begin safety check (disks the host caches): ``VIR_MIGRATE_UNSAFE`` skips it."""
    why = daemon.backend.migration_unsafe(daemon.spec(current))
    if why:
        raise MigrateUnsafe(why)


def _src_begin_xml(daemon: Daemon, current: DomainDef, params: TypedParams) -> str:
    """The migratable XML the destination gets, pinned as the backend pins definitions (a guest
    started from an older, unpinned definition runs what its alias stood for here)."""
    current = daemon.canonical(current)
    xmlin = params.get_str(P.DEST_XML)
    if xmlin is None:
        return format_domain_xml(current, migratable=True)
    target = daemon.canonical(parse_domain_xml(xmlin))
    check_abi_stability(current, target)
    return format_domain_xml(target, migratable=True)


# =================================================================================================
# Perform


async def src_perform(
    daemon: Daemon,
    dom: DomainObj,
    dconnuri: str | None,
    params: TypedParams,
    cookie_in: bytes,
    flags: int,
    tunnel: StreamAddress | None = None,
    owner: str = "",
    dest_uri: str = "",
    protocol: str = "",
) -> bytes:
    """``tunnel``: where the stream goes in a tunnelled migration (the source's tunnel end);
    ``owner``: the caller's session, owner of the job Perform starts (without change
    protection); ``dest_uri``: the destination daemon as this host reaches it (p2p's
    dconnuri; else the ``virtmig.dest_uri`` param), recorded for :mod:`virtmig.daemon.locate`;
    ``protocol``: the call's ``MigrationProtocol``, recorded in that job."""
    f = any_check(daemon, flags, params, "virDomainMigratePerform3Params")
    if dconnuri:
        raise InternalInputError("Unexpected dconnuri parameter with non-peer2peer migration")
    async with dom.lock:
        job = _src_perform_job(daemon, dom, f, params, owner, protocol)
        dest, persistent, token = await _src_perform_start(daemon, dom, job, f, params,
                                                           cookie_in, tunnel, dest_uri)
    # The lock is not held while the stream runs: read-only calls, destroy, abort and tuning
    # must get through.
    await _src_stream(daemon, dom, job, f, params, dest, token)
    async with dom.lock:
        cookie = _src_perform_done(daemon, dom, job, persistent)
        # perform3_done is durable before the reply: nothing resumes the guest elsewhere before
        # it (virtmig.daemon.statusxml.status_needs_fsync)
        await daemon.registry.save_status_durably(dom)
    await any_check_owner(daemon, dom)
    return cookie


def _src_perform_job(
    daemon: Daemon, dom: DomainObj, f: MigrateFlags, params: TypedParams, owner: str,
    protocol: str = "",
) -> MigrationJob:
    """The job Perform runs in, marked busy: Begin's (change protection) or a new one."""
    if f & F.CHANGE_PROTECTION:
        job = _job_of(dom, AsyncJob.MIGRATION_OUT)
        if job.busy or job.phase is not Phase.BEGIN3:
            raise OperationInvalid(
                f"domain '{dom.name}' is already being migrated (phase {job.phase.label})")
    else:
        _no_job(dom)
        jobctl.check_limit(daemon, AsyncJob.MIGRATION_OUT)
        job = MigrationJob(kind=AsyncJob.MIGRATION_OUT, phase=Phase.NONE, flags=f,
                           params=params.copy(), pre_state=dom.state, owner=owner,
                           protocol=protocol)
        dom.job = job
    job.busy = True
    return job


async def _src_perform_start(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, f: MigrateFlags, params: TypedParams,
    cookie_in: bytes, tunnel: StreamAddress | None, dest_uri: str,
    phase: Phase = Phase.PERFORM3,
) -> tuple[StreamAddress, str | None, str]:
    """Perform's checks, then ``phase`` (perform3; perform2 in protocol v2): where the stream
    goes, the persistent XML for cookie C (PERSIST_DEST) and cookie B's stream token.  The
    guest is not touched yet; a failure ends the job."""
    try:
        if job.abort_requested:
            raise MigrationCancelled("aborted before perform")
        _require_active(dom)
        check_stream_pki(daemon, f, Party.SRC)
        cookie = ck.parse_cookie(
            cookie_in,
            expected_name=dom.name,
            expected_uuid=dom.uuid,
            local_hostuuid=daemon.host_uuid,
            accept=ck.ACCEPT_PERFORM,
        )
        dest = tunnel if tunnel is not None else src_parse_uri(params.get_str(P.URI))
        persistent = _src_persistent_xml(dom, params) if f & F.PERSIST_DEST else None
        given = dest_uri or params.get_str(P.DEST_URI)
        job.dest_uri = locate.check_dest_uri(given) if given else ""
        job.migration_id = cookie.migration_id or job.migration_id
        job.peer_hostuuid, job.peer_hostname = cookie.hostuuid, cookie.hostname
        job.set_phase(phase)
        job.streamed = True
        job.flags = f
        job.params = params.copy()
        daemon.registry.save_status(dom)
    except BaseException as exc:
        # Perform ends the job on any failure: the client calls no Confirm after it.
        err = _perform_error(job, exc)
        jtype = JobType.CANCELLED if isinstance(exc, MigrationCancelled) else JobType.FAILED
        await daemon.registry.end_job(dom, job.record(jtype, str(err)))
        if isinstance(exc, MigrationCancelled):
            raise err from exc
        raise
    return dest, persistent, cookie.stream_token


async def _src_stream(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, f: MigrateFlags, params: TypedParams,
    dest: StreamAddress, token: str,
) -> None:
    """Stream the guest to ``dest`` (paused first unless LIVE; bound to the destination's
    ``token``) while the job's watcher runs.  On failure the source is put back, the job ends,
    and the caller's error is raised."""
    watcher = asyncio.get_running_loop().create_task(jobctl.src_watch(daemon, dom, job))
    try:
        if not f & F.LIVE and dom.state is DomainState.RUNNING:
            await daemon.backend.pause(dom.uuid)
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
        if job.abort_requested:
            raise MigrationCancelled("aborted before the stream started")
        tuning = src_tuning(daemon, dom, f, params, dest, token)
        job.bandwidth_mib = tuning.bandwidth_bytes_per_s // (1024 * 1024)
        job.progress = await daemon.backend.outgoing(dom.uuid, dest, tuning)
    except (BackendError, VirtmigError) as exc:
        await _stop(watcher)
        await _src_perform_failed(daemon, dom, job, exc)
        raise _perform_error(job, exc) from exc
    except BaseException as exc:
        await _stop(watcher)
        await _src_perform_failed(daemon, dom, job, exc)
        raise
    await _stop(watcher)


def _src_perform_done(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, persistent: str | None
) -> bytes:
    """The stream is over (or switched to post-copy): the guest stays paused, phase
    perform3_done; cookie C, with the statistics and the persistent XML."""
    if job.progress.status is MigrationStatus.POSTCOPY_ACTIVE:
        job.postcopy = True
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.POSTCOPY, save=False)
    else:
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION, save=False)
    job.set_phase(Phase.PERFORM3_DONE)
    job.busy = False
    return any_cookie(
        daemon, dom.name, dom.uuid,
        statistics=any_stats(job.progress, job.started),
        persistent_xml=persistent,
        mandatory=("persistent",) if persistent is not None else (),
    )


def _src_persistent_xml(dom: DomainObj, params: TypedParams) -> str:
    given = params.get_str(P.PERSIST_XML)
    if given is not None:
        d = parse_domain_xml(given)
        if d.uuid != dom.uuid:
            raise InvalidArgument(
                f"persistent XML uuid {d.uuid} does not match domain uuid {dom.uuid}")
        return format_domain_xml(d, migratable=True)
    return format_domain_xml(dom.config or dom.definition, migratable=True)


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _perform_error(job: MigrationJob, exc: BaseException) -> VirtmigError:
    """What a failed Perform reports.

    When the daemon stopped the stream for a reason of its own (``job.fail_error``: the stall
    watchdog, the completion timeout, a lost destination), that reason: what the backend then
    says of the stopped stream (cancelled, or failed: it gave up ending it) is a consequence.
    libvirt does the same (qemuMigrationSrcRun keeps a job's first error over the cancel's).
    """
    if job.fail_error is not None and isinstance(exc, BackendError):
        return job.fail_error
    if isinstance(exc, MigrationCancelled):
        return OperationAborted("job 'migration out' canceled by client")
    if isinstance(exc, VirtmigError):
        return exc
    return OperationFailed(f"job 'migration out' failed: {exc}")


async def _src_perform_failed(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, exc: BaseException
) -> None:
    """Perform's own rollback (libvirt v3): the source is whole again and the job ends."""
    replaced = job.fail_error is not None and isinstance(exc, BackendError)
    if replaced and not isinstance(exc, MigrationCancelled):
        # The caller sees the daemon's reason (_perform_error): the backend's words stay here.
        log.warning("migration of %s: stream stopped (%s), then the backend failed: %s",
                    dom.name, job.fail_error, exc)
    else:
        log.info("migration of %s failed in perform: %s", dom.name, exc)
    await src_restore(daemon, dom, job)
    job.progress = daemon.backend.progress(dom.uuid)
    cancelled = isinstance(exc, MigrationCancelled) and job.fail_error is None
    jtype = JobType.CANCELLED if cancelled else JobType.FAILED
    await daemon.registry.end_job(dom, job.record(jtype, str(_perform_error(job, exc))))


# =================================================================================================
# Confirm


async def src_confirm(
    daemon: Daemon,
    dom: DomainObj,
    params: TypedParams,
    cookie_in: bytes,
    flags: int,
    cancelled: bool,
) -> None:
    f = any_check(daemon, flags, params, "virDomainMigrateConfirm3Params")
    async with dom.lock:
        if dom.job is None and cancelled:
            # Perform already rolled back and ended the job: Confirm(cancelled) is a no-op.
            return
        job = _job_of(dom, AsyncJob.MIGRATION_OUT)
        if job.busy:
            raise OperationInvalid(f"domain '{dom.name}' migration is busy in another call")
        if not cancelled and job.phase is not Phase.PERFORM3_DONE and not f & F.OFFLINE:
            raise OperationInvalid(
                f"domain '{dom.name}' migration has not been performed (phase {job.phase.label})")
        job.busy = True
        performed = job.phase is Phase.PERFORM3_DONE and job.streamed
        try:
            # The cookie is checked before the phase moves: a bad one leaves the job as it was,
            # so that Confirm(cancelled) can still roll it back.
            stats = ck.parse_cookie_opt(
                cookie_in,
                expected_name=dom.name,
                expected_uuid=dom.uuid,
                local_hostuuid=daemon.host_uuid,
                accept=ck.ACCEPT_CONFIRM,
            )
            job.set_phase(Phase.CONFIRM3_CANCELLED if cancelled else Phase.CONFIRM3)
            daemon.registry.save_status(dom)
            if stats is not None and stats.statistics is not None:
                job.progress = _with_dst_downtime(job.progress, stats.statistics)
        except BaseException:
            job.busy = False
            raise
        if cancelled and job.postcopy:
            # The destination may run with part of the memory: never resume here.
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
            job.set_phase(Phase.POSTCOPY_FAILED)
            job.busy = False
            daemon.registry.save_status(dom)
            return
        if cancelled:
            await _src_confirm_cancelled(daemon, dom, job, performed)
            return
        if stall.POINT:
            await stall.at("confirm3")
        if not f & F.OFFLINE:
            if job.postcopy:
                try:
                    job.progress = await daemon.backend.outgoing_wait(dom.uuid)
                except BackendError as exc:
                    daemon.set_state(dom, DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
                    job.set_phase(Phase.POSTCOPY_FAILED)
                    job.busy = False
                    daemon.registry.save_status(dom)
                    raise OperationFailed(f"post-copy migration failed: {exc}") from exc
            await src_complete(daemon, dom, job, f)
            return
        await daemon.registry.end_job(dom, job.record(JobType.COMPLETED))
        if f & F.UNDEFINE_SOURCE and not dom.active and dom.config is not None:
            dom.config = None
            daemon.registry.save_config(dom)
            daemon.registry.remove(dom)


async def src_complete(daemon: Daemon, dom: DomainObj, job: MigrationJob,
                       f: MigrateFlags) -> None:
    """The guest runs on the destination: stop it here as migrated, end the job as completed,
    and with UNDEFINE_SOURCE drop its definition, else record where it went (Confirm; protocol
    v2's Perform itself, or its peer-to-peer settling)."""
    await daemon.backend.retire(dom.uuid)
    # Where it went is durable before the status loses the job (a crash in between recovers
    # confirm3 again); the job-less status is written once, by mark_inactive.
    if f & F.UNDEFINE_SOURCE and dom.config is not None:
        dom.config = None
        daemon.registry.save_config(dom)
    elif dom.config is not None:  # where it went: virtmig.daemon.placement
        await daemon.placement.departed_durably(dom.uuid, locate.away_of(job))
    await daemon.registry.end_job(dom, job.record(JobType.COMPLETED), save=False)
    daemon.mark_inactive(dom, ShutoffReason.MIGRATED)


async def _src_confirm_cancelled(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, performed: bool
) -> None:
    """Confirm(cancelled): put the source back, unless the guest may run on the destination.

    After a Perform that streamed the whole guest, the destination is asked first (when its
    daemon's URI is known) how migration ``job.migration_id`` ended there: if it arrived, the
    guest is never resumed here (it is shut off as migrated); if the answer is unclear or does
    not come, it stays paused and the outcome is settled later (virtmig.daemon.locate).
    """
    if performed and job.dest_uri:
        away = locate.away_of(job)
        verdict: locate.Verdict | None = None
        try:
            verdict = locate.judge(await locate.ask(daemon, away.peer, dom.uuid,
                                                    job.migration_id), job.migration_id)
            why = f"Confirm(cancelled), but the destination's answer is '{verdict.value}'"
        except locate.PeerUnreachable as exc:
            why = f"Confirm(cancelled), and the destination cannot be asked: {exc}"
        if verdict is locate.Verdict.ARRIVED:
            await daemon.registry.end_job(dom, job.record(
                JobType.COMPLETED, "cancelled too late: the guest runs on the destination"))
            await locate.apply(daemon, dom, away, verdict)
            return
        if verdict is not locate.Verdict.FAILED:
            await daemon.registry.end_job(dom, job.record(JobType.FAILED, why))
            locate.settle_later(daemon, dom.uuid, away, why)
            return
    await src_restore(daemon, dom, job)
    await daemon.registry.end_job(dom, job.record(JobType.FAILED, "migration cancelled"))


def _with_dst_downtime(progress: MigrationProgress, stats: ck.MigrationStats) -> MigrationProgress:
    if stats.downtime:
        return dataclasses.replace(progress, downtime_ms=stats.downtime)
    return progress
