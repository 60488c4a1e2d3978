"""The five phases of migration protocol v3, as the daemon runs them.

Names say where code runs (libvirt's convention): ``src_*`` only on the source host, ``dst_*`` only
on the destination, ``any_*`` on either.  The call order and the decisions *between* phases belong
to the sequence driver (``virtmig.client.sequence``); each phase here checks its inputs before
changing anything, and on failure puts its own side back as it was:

* ``src_begin``    job ``migration out`` in phase begin3 (kept only with CHANGE_PROTECTION);
                   returns the migratable XML and cookie A.
* ``dst_prepare``  adds the incoming domain (paused, reason migration), job ``migration in`` in
                   phase prepare, opens the data port; returns cookie B and the URI.
* ``src_perform``  streams the guest to the URI; success leaves it paused (perform3_done);
                   failure resumes it (if it ran before) and ends the job.
* ``dst_finish``   cancelled: kills the incoming guest; else waits for the stream, starts vCPUs
                   (unless PAUSED), persists (PERSIST_DEST); any failure kills the incoming guest.
* ``src_confirm``  cancelled: resumes the source if it ran before; else stops it as migrated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import time
from urllib.parse import urlsplit

from virtmig.daemon import cookie as ck
from virtmig.daemon import jobctl
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    MigrationCancelled,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    PostcopyFailed,
    StreamAddress,
)
from virtmig.daemon.core import Daemon
from virtmig.daemon.domxml import (
    DomainDef,
    check_abi_stability,
    format_domain_xml,
    parse_domain_xml,
    rename,
)
from virtmig.daemon.job import AsyncJob, JobRecord, MigrationJob, Phase
from virtmig.daemon.registry import DomainObj
from virtmig.proto.compat import check_migration, compression_settings
from virtmig.proto.errors import (
    ArgumentUnsupported,
    InternalError,
    InvalidArgument,
    MigrateFinishOk,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    VirtmigError,
)
from virtmig.proto.flags import (
    DomainState,
    JobType,
    MigrateFlags,
    PausedReason,
    RunningReason,
    ShutoffReason,
)
from virtmig.proto.params import MigrateParam, Party, TypedParams, validate_migration_params

log = logging.getLogger(__name__)

F = MigrateFlags
P = MigrateParam
DEFAULT_PARALLEL = 2  # multifd channels when PARALLEL comes without parallel.connections (QEMU's)



def any_check(daemon: Daemon, flags: int, params: TypedParams, function: str,
              party: Party = Party.SRC) -> MigrateFlags:
    """Flags and params checks every phase runs before it changes anything."""
    validate_migration_params(params, flags, party)
    return check_migration(flags, params, function, daemon.backend.extra_flags)


def any_cookie(daemon: Daemon, dom_name: str, uuid: str, **extra: object) -> bytes:
    return ck.build_cookie(
        ck.Cookie(
            name=dom_name,
            uuid=uuid,
            hostname=daemon.hostname,
            hostuuid=daemon.host_uuid,
            **extra,  # type: ignore[arg-type]
        )
    )


_COOKIE_STATS = frozenset(f.name for f in dataclasses.fields(ck.MigrationStats))


def any_stats(progress: MigrationProgress, started: float) -> ck.MigrationStats:
    """The cookie's <statistics>: libvirt's job stats (one mapping, jobctl's) plus timestamps."""
    now = int(time.time() * 1000)
    values = {p.name: int(p.value) for p in jobctl.job_stats(progress, progress.total_time_ms,
                                                             completed=True)
              if p.name in _COOKIE_STATS}
    return ck.MigrationStats(started=int(started * 1000), stopped=now, sent=now, **values)


def _job_of(dom: DomainObj, kind: AsyncJob) -> MigrationJob:
    job = dom.job
    if job is None or job.kind is not kind:
        if kind is AsyncJob.MIGRATION_IN:
            raise OperationInvalid(f"domain '{dom.name}' is not processing incoming migration")
        raise OperationInvalid(f"domain '{dom.name}' is not being migrated")
    return job


def _no_job(dom: DomainObj) -> None:
    if dom.job is not None:
        raise OperationInvalid(f"another migration job is already running for domain '{dom.name}'")


def _require_active(dom: DomainObj) -> None:
    if not dom.active:
        raise OperationInvalid("domain is not running")


# =================================================================================================
# Begin (source)


async def src_begin(
    daemon: Daemon, dom: DomainObj, params: TypedParams, flags: int, owner: str = ""
) -> tuple[str, bytes]:
    f = any_check(daemon, flags, params, "virDomainMigrateBegin3Params")
    async with dom.lock:
        _no_job(dom)
        offline = bool(f & F.OFFLINE)
        if not offline:
            _require_active(dom)
        current = dom.config if offline and dom.config is not None else dom.definition
        xml = _src_begin_xml(current, params)
        cookie = any_cookie(daemon, dom.name, dom.uuid)
        if f & F.CHANGE_PROTECTION:
            jobctl.check_limit(daemon, AsyncJob.MIGRATION_OUT)
            dom.job = MigrationJob(
                kind=AsyncJob.MIGRATION_OUT,
                phase=Phase.BEGIN3,
                flags=f,
                params=params.copy(),
                pre_state=dom.state,
                owner=owner,
            )
            daemon.registry.save_status(dom)
    await any_check_owner(daemon, dom)
    return xml, cookie


def _src_begin_xml(current: DomainDef, params: TypedParams) -> str:
    xmlin = params.get_str(P.DEST_XML)
    if xmlin is None:
        return format_domain_xml(current, migratable=True)
    target = parse_domain_xml(xmlin)
    check_abi_stability(current, target)
    return format_domain_xml(target, migratable=True)


# =================================================================================================
# Prepare (destination)


def dst_parse_uri_in(uri: str) -> tuple[str, int | None]:
    """libvirt's rules for a caller-given migration URI on the destination."""
    if uri.startswith("tcp:") and not uri.startswith("tcp://"):
        uri = "tcp://" + uri[len("tcp:"):]
    parts = urlsplit(uri)
    if not parts.scheme:
        raise InvalidArgument(f"missing scheme in migration URI: {uri}")
    if parts.scheme != "tcp":
        raise ArgumentUnsupported(f"unsupported scheme {parts.scheme} in migration URI {uri}")
    if not parts.hostname:
        raise InvalidArgument(f"missing host in migration URI: {uri}")
    try:
        return parts.hostname, parts.port
    except ValueError as exc:
        raise InvalidArgument(f"bad port in migration URI: {uri}") from exc


def _fmt_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def dst_prepare(
    daemon: Daemon, params: TypedParams, cookie_in: bytes, flags: int, owner: str = ""
) -> tuple[bytes, str | None]:
    f = any_check(daemon, flags, params, "virDomainMigratePrepare3Params", Party.DST)
    offline = bool(f & F.OFFLINE)
    dom_xml = params.get_str(P.DEST_XML)
    if not dom_xml:
        raise InvalidArgument("no domain XML passed")
    uri_in = params.get_str(P.URI)
    listen = params.get_str(P.LISTEN_ADDRESS) or daemon.config.migration_address
    want_port: int | None = None
    host = ""
    tunnelled = bool(f & F.TUNNELLED)
    if tunnelled:
        listen = "127.0.0.1"  # reached through the Tunnel RPC only
    elif not offline:
        if uri_in:
            host, want_port = dst_parse_uri_in(uri_in)
        else:
            host = daemon.config.migration_host or daemon.hostname
            if host.startswith("localhost"):
                raise OperationFailed(
                    "hostname on destination resolved to localhost, but migration requires an FQDN")
    d = parse_domain_xml(dom_xml)
    origname = d.name
    dname = params.get_str(P.DEST_NAME)
    if dname and dname != d.name:
        d = rename(d, dname)
    ck.parse_cookie(
        cookie_in,
        expected_name=origname,
        expected_uuid=d.uuid,
        local_hostuuid=daemon.host_uuid,
        accept=ck.ACCEPT_PREPARE,
    )
    daemon.backend.validate(daemon.spec(d))

    jobctl.check_limit(daemon, AsyncJob.MIGRATION_IN)
    existing = daemon.registry.check_define(d)
    if existing is not None and (existing.active or existing.job is not None):
        raise OperationInvalid(f"domain '{existing.name}' is already active")
    dom = existing or daemon.registry.add(DomainObj(uuid=d.uuid, name=d.name))
    async with dom.lock:
        job = MigrationJob(
            kind=AsyncJob.MIGRATION_IN, phase=Phase.PREPARE, flags=f, params=params.copy(),
            origname=origname, owner=owner,
        )
        dom.job = job
        job.busy = True
        try:
            dom.live = d
            if offline:
                daemon.registry.save_status(dom)
                uri_out = None
            else:
                port = await _dst_listen(daemon, dom, d, listen, want_port,
                                         dst_tuning(f, params))
                job.port = port
                dom.id = daemon.registry.new_id()
                daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
                if tunnelled:
                    uri_out = None
                elif uri_in:
                    uri_out = f"tcp://{_fmt_host(host)}:{port}"
                else:
                    uri_out = f"tcp:{_fmt_host(host)}:{port}"
            cookie = any_cookie(daemon, origname, d.uuid)
        except BaseException:
            await _dst_discard(daemon, dom, existed=existing is not None,
                               record=job.record(JobType.FAILED, "prepare failed"))
            raise
        job.busy = False
    await any_check_owner(daemon, dom)
    return cookie, uri_out


async def _dst_listen(
    daemon: Daemon, dom: DomainObj, d: DomainDef, listen: str, want_port: int | None,
    tuning: MigrationTuning,
) -> int:
    spec = daemon.spec(d)
    candidates = [want_port] if want_port else daemon.ports.candidates()
    last: OSError | None = None
    for port in candidates:
        try:
            bound = await daemon.backend.incoming_start(spec, StreamAddress(listen, port),
                                                        tuning)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise OperationFailed(
                    f"cannot listen for incoming migration on {listen}:{port}: "
                    f"{exc.strerror or exc}"
                ) from exc
            last = exc
            continue
        except BackendError as exc:
            raise OperationFailed(f"cannot start incoming guest: {exc}") from exc
        daemon.ports.take(bound)
        return bound
    raise OperationFailed(
        f"no free migration port on {listen}"
        + (f": {last.strerror}" if last is not None else "")
    )


async def _dst_discard(
    daemon: Daemon, dom: DomainObj, *, existed: bool, record: JobRecord
) -> None:
    """Undo an incoming domain: kill its guest, free its port, drop or deactivate the object."""
    job = dom.job
    await daemon.backend.destroy(dom.uuid)
    if job is not None and job.port:
        daemon.ports.release(job.port)
    await daemon.registry.end_job(dom, record)
    if not existed:
        dom.config = None
    daemon.mark_inactive(dom, ShutoffReason.FAILED)


# =================================================================================================
# Perform (source)


def src_parse_uri(uri: str | None) -> StreamAddress:
    if not uri:
        raise InvalidArgument("migration URI is required")
    host, port = dst_parse_uri_in(uri)
    if port is None:
        raise InvalidArgument(f"missing port in migration URI: {uri}")
    return StreamAddress(host, port)


async def src_perform(
    daemon: Daemon,
    dom: DomainObj,
    dconnuri: str | None,
    params: TypedParams,
    cookie_in: bytes,
    flags: int,
    tunnel: StreamAddress | None = None,
) -> bytes:
    """``tunnel``: where the stream goes in a tunnelled migration (the source's tunnel end)."""
    f = any_check(daemon, flags, params, "virDomainMigratePerform3Params")
    if dconnuri:
        raise InvalidArgument("Unexpected dconnuri parameter with non-peer2peer migration")
    async with dom.lock:
        if f & F.CHANGE_PROTECTION:
            job = _job_of(dom, AsyncJob.MIGRATION_OUT)
            if job.busy or job.phase is not Phase.BEGIN3:
                raise OperationInvalid(
                    f"domain '{dom.name}' is already being migrated (phase {job.phase.label})")
        else:
            _no_job(dom)
            jobctl.check_limit(daemon, AsyncJob.MIGRATION_OUT)
            job = MigrationJob(kind=AsyncJob.MIGRATION_OUT, phase=Phase.NONE, flags=f,
                               params=params.copy(), pre_state=dom.state)
            dom.job = job
        job.busy = True
        try:
            if job.abort_requested:
                raise MigrationCancelled("aborted before perform")
            _require_active(dom)
            jobctl.check_timeout_params(params)
            ck.parse_cookie(
                cookie_in,
                expected_name=dom.name,
                expected_uuid=dom.uuid,
                local_hostuuid=daemon.host_uuid,
                accept=ck.ACCEPT_PERFORM,
            )
            dest = tunnel if tunnel is not None else src_parse_uri(params.get_str(P.URI))
            persistent = _src_persistent_xml(dom, params) if f & F.PERSIST_DEST else None
            job.set_phase(Phase.PERFORM3)
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
    # The lock is not held while the stream runs: read-only calls, destroy, abort and tuning
    # must get through.
    watcher = asyncio.get_running_loop().create_task(jobctl.src_watch(daemon, dom, job))
    try:
        if not f & F.LIVE and dom.state is DomainState.RUNNING:
            await daemon.backend.pause(dom.uuid)
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
        if job.abort_requested:
            raise MigrationCancelled("aborted before the stream started")
        job.progress = await daemon.backend.outgoing(dom.uuid, dest, src_tuning(daemon, dom, f,
                                                                               params))
    except (BackendError, VirtmigError) as exc:
        await _stop(watcher)
        await _src_perform_failed(daemon, dom, job, exc)
        raise _perform_error(job, exc) from exc
    except BaseException as exc:
        await _stop(watcher)
        await _src_perform_failed(daemon, dom, job, exc)
        raise
    await _stop(watcher)
    async with dom.lock:
        if job.progress.status is MigrationStatus.POSTCOPY_ACTIVE:
            job.postcopy = True
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.POSTCOPY, save=False)
        else:
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION, save=False)
        job.set_phase(Phase.PERFORM3_DONE)
        job.busy = False
        daemon.registry.save_status(dom)
        cookie = any_cookie(
            daemon, dom.name, dom.uuid,
            statistics=any_stats(job.progress, job.started),
            persistent_xml=persistent,
            mandatory=("persistent",) if persistent is not None else (),
        )
    await any_check_owner(daemon, dom)
    return cookie


def _src_persistent_xml(dom: DomainObj, params: TypedParams) -> str:
    given = params.get_str(P.PERSIST_XML)
    if given is not None:
        d = parse_domain_xml(given)
        if d.uuid != dom.uuid:
            raise InvalidArgument(
                f"persistent XML uuid {d.uuid} does not match domain uuid {dom.uuid}")
        return format_domain_xml(d, migratable=True)
    return format_domain_xml(dom.config or dom.definition, migratable=True)


def src_tuning(daemon: Daemon, dom: DomainObj, f: MigrateFlags,
               params: TypedParams) -> MigrationTuning:
    """The backend's settings for this run: params first, then the domain's, then defaults."""
    mib = 1024 * 1024
    return MigrationTuning(
        bandwidth_bytes_per_s=(params.get_int(P.BANDWIDTH) or dom.max_speed_mib) * mib,
        max_downtime_ms=dom.max_downtime_ms or daemon.config.default_max_downtime_ms,
        live=bool(f & F.LIVE),
        postcopy=bool(f & F.POSTCOPY),
        postcopy_bandwidth_bytes_per_s=(params.get_int(P.BANDWIDTH_POSTCOPY)
                                        or dom.max_speed_postcopy_mib) * mib,
        auto_converge=bool(f & F.AUTO_CONVERGE),
        auto_converge_initial=params.get_int(P.AUTO_CONVERGE_INITIAL, 20),
        auto_converge_increment=params.get_int(P.AUTO_CONVERGE_INCREMENT, 10),
        parallel_connections=parallel_connections(f, params),
        compression=compression_settings(params, f),
    )


def dst_tuning(f: MigrateFlags, params: TypedParams) -> MigrationTuning:
    """What the destination must set up before the stream starts: the same channels and
    compression as the source (both get the same flags and params)."""
    return MigrationTuning(postcopy=bool(f & F.POSTCOPY),
                           parallel_connections=parallel_connections(f, params),
                           compression=compression_settings(params, f))


def parallel_connections(f: MigrateFlags, params: TypedParams) -> int:
    return params.get_int(P.PARALLEL_CONNECTIONS, DEFAULT_PARALLEL) if f & F.PARALLEL else 0


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _perform_error(job: MigrationJob, exc: BaseException) -> VirtmigError:
    if isinstance(exc, MigrationCancelled):
        if job.fail_error is not None:
            return job.fail_error
        return OperationAborted("job 'migration out' canceled by client")
    if isinstance(exc, VirtmigError):
        return exc
    return OperationFailed(f"job 'migration out' failed: {exc}")


async def _src_perform_failed(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, exc: BaseException
) -> None:
    """Perform's own rollback (libvirt v3): the source is whole again and the job ends."""
    log.info("migration of %s failed in perform: %s", dom.name, exc)
    await src_restore(daemon, dom, job)
    job.progress = daemon.backend.progress(dom.uuid)
    cancelled = isinstance(exc, MigrationCancelled) and job.fail_error is None
    jtype = JobType.CANCELLED if cancelled else JobType.FAILED
    await daemon.registry.end_job(dom, job.record(jtype, str(_perform_error(job, exc))))


async def src_restore(daemon: Daemon, dom: DomainObj, job: MigrationJob) -> None:
    """Put the source guest back as it was before migration, if it still exists.

    A guest that never left its pre-migration state (Begin only) is not touched.
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
    if run is GuestRunState.PAUSED:
        try:
            await daemon.backend.resume(dom.uuid)
        except BackendError as exc:
            log.error("cannot resume %s after failed migration: %s", dom.name, exc)
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.API_ERROR)
            return
    if job.streamed:
        daemon.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATION_CANCELED)


# =================================================================================================
# Finish (destination)


async def dst_finish(
    daemon: Daemon, params: TypedParams, cookie_in: bytes, flags: int, cancelled: bool
) -> tuple[DomainObj, bytes]:
    f = any_check(daemon, flags, params, "virDomainMigrateFinish3Params", Party.DST)
    dname = params.get_str(P.DEST_NAME)
    if not dname:
        raise NoDomain("missing domain name")
    dom = daemon.registry.by_name(dname)
    async with dom.lock:
        job = _job_of(dom, AsyncJob.MIGRATION_IN)
        if job.busy:
            raise OperationInvalid(
                f"domain '{dom.name}' incoming migration is busy in another call")
        job.busy = True
        existed = dom.config is not None
        try:
            job.set_phase(Phase.FINISH3)
            daemon.registry.save_status(dom)
            if cancelled:
                raise _dst_cancelled_error(daemon, dom)
            incoming = ck.parse_cookie_opt(
                cookie_in,
                expected_name=job.origname,
                expected_uuid=dom.uuid,
                local_hostuuid=daemon.host_uuid,
                accept=ck.ACCEPT_FINISH,
            )
            persistent = _dst_persistent_def(dom, incoming) if f & F.PERSIST_DEST else None
            if f & F.OFFLINE:
                return await _dst_finish_offline(daemon, dom, job, persistent)
            if daemon.backend.state(dom.uuid) is GuestRunState.SHUTOFF:
                raise OperationFailed("guest unexpectedly quit")
            if f & F.POSTCOPY and await _dst_switched(daemon, dom):
                # Post-copy: the guest runs here while its last pages arrive.
                job.postcopy = True
                await daemon.backend.resume(dom.uuid)
                daemon.set_state(dom, DomainState.RUNNING, RunningReason.POSTCOPY)
            try:
                job.progress = await daemon.backend.incoming_wait(dom.uuid)
            except PostcopyFailed as exc:
                # Nothing can be rolled back: keep the guest, paused, for recovery.
                daemon.set_state(dom, DomainState.PAUSED, PausedReason.POSTCOPY_FAILED)
                job.set_phase(Phase.POSTCOPY_FAILED)
                daemon.registry.save_status(dom)
                raise OperationFailed(f"post-copy migration failed: {exc}") from exc
            except BackendError as exc:
                raise OperationFailed(f"job 'migration in' failed: {exc}") from exc
            if f & F.PAUSED:
                daemon.set_state(dom, DomainState.PAUSED, PausedReason.USER)
            else:
                await daemon.backend.resume(dom.uuid)
                # (end_job below writes the status: nothing is awaited before it)
                daemon.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATED, save=False)
            if persistent is not None:
                dom.config = persistent
                daemon.registry.save_config(dom)
            if job.port:
                daemon.ports.release(job.port)
            await daemon.registry.end_job(dom, job.record(JobType.COMPLETED))
            return dom, any_cookie(
                daemon, job.origname, dom.uuid, statistics=any_stats(job.progress, job.started)
            )
        except BaseException as exc:
            if job.phase is Phase.POSTCOPY_FAILED:
                job.busy = False
                raise
            err = str(exc) if not isinstance(exc, MigrateFinishOk) else ""
            jtype = JobType.CANCELLED if cancelled else JobType.FAILED
            await _dst_discard(daemon, dom, existed=existed, record=job.record(jtype, err))
            raise


async def _dst_switched(daemon: Daemon, dom: DomainObj) -> bool:
    """Whether the incoming stream switched to post-copy (else it completed, or failed).

    The source's Perform returns at the switch, possibly before this side has read the switch
    from the stream: wait (bounded) until the incoming side reports either outcome.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = daemon.backend.progress(dom.uuid).status
        if status is MigrationStatus.POSTCOPY_ACTIVE:
            return True
        if status in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                      MigrationStatus.CANCELLED):
            return False
        if daemon.backend.state(dom.uuid) is GuestRunState.SHUTOFF:
            return False
        await asyncio.sleep(0.01)
    return False


def _dst_cancelled_error(daemon: Daemon, dom: DomainObj) -> VirtmigError:
    """What Finish(cancelled) reports: the incoming side's own error, or FINISH_OK."""
    progress = daemon.backend.progress(dom.uuid)
    if progress.error:
        return OperationFailed(f"job 'migration in' failed: {progress.error}")
    return MigrateFinishOk()


def _dst_persistent_def(dom: DomainObj, incoming: ck.Cookie | None) -> DomainDef:
    if incoming is not None and incoming.persistent_xml:
        d = parse_domain_xml(incoming.persistent_xml)
        if d.uuid != dom.uuid:
            raise InternalError(f"persistent definition uuid {d.uuid} does not match {dom.uuid}")
        return rename(d, dom.name) if d.name != dom.name else d
    return dom.definition


async def _dst_finish_offline(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, persistent: DomainDef | None
) -> tuple[DomainObj, bytes]:
    dom.config = persistent if persistent is not None else dom.definition
    dom.live = None
    dom.state = DomainState.SHUTOFF
    dom.reason = int(ShutoffReason.UNKNOWN)
    daemon.registry.save_config(dom)
    await daemon.registry.end_job(dom, job.record(JobType.COMPLETED))
    return dom, b""


# =================================================================================================
# Confirm (source)


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
        try:
            job.set_phase(Phase.CONFIRM3_CANCELLED if cancelled else Phase.CONFIRM3)
            daemon.registry.save_status(dom)
            stats = ck.parse_cookie_opt(
                cookie_in,
                expected_name=dom.name,
                expected_uuid=dom.uuid,
                local_hostuuid=daemon.host_uuid,
                accept=ck.ACCEPT_CONFIRM,
            )
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
            await src_restore(daemon, dom, job)
            await daemon.registry.end_job(dom, job.record(JobType.FAILED, "migration cancelled"))
            return
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
            await daemon.backend.destroy(dom.uuid)
            await daemon.registry.end_job(dom, job.record(JobType.COMPLETED))
            if f & F.UNDEFINE_SOURCE and dom.config is not None:
                dom.config = None
                daemon.registry.save_config(dom)
            daemon.mark_inactive(dom, ShutoffReason.MIGRATED)
            return
        await daemon.registry.end_job(dom, job.record(JobType.COMPLETED))
        if f & F.UNDEFINE_SOURCE and not dom.active and dom.config is not None:
            dom.config = None
            daemon.registry.save_config(dom)
            daemon.registry.remove(dom)


def _with_dst_downtime(progress: MigrationProgress, stats: ck.MigrationStats) -> MigrationProgress:
    if stats.downtime:
        return dataclasses.replace(progress, downtime_ms=stats.downtime)
    return progress


# =================================================================================================
# The caller went away: what libvirt's qemuMigrationAnyConnectionClosed does when the
# controlling connection closes


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
            await _dst_discard(daemon, dom, existed=dom.config is not None,
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
