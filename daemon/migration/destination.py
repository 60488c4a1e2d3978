"""The destination's phases: Prepare (the incoming domain, paused, and its data port) and Finish
(wait for the stream, persist, start the vCPUs or keep the guest paused; else undo the domain:
the definition is saved before the vCPUs start, so that a daemon killed once the guest runs here
keeps it, and the prior one is put back if they cannot start).

Prepare takes a port of the migration range before it binds it; when other migrations hold
every one, it waits for one (``migration_port_wait`` seconds at most, without the domain's lock,
the incoming job visible in phase prepare; an abort or the end of the caller's session stops the
wait: :func:`_dst_port`).  So it does when the port it took turns out bound by another process
and migrations here hold all the others (one deadline for both waits).

Prepare chooses the migration's stream token (a fresh secret, handed to the backend with the
port's settings and to the source in cookie B; never logged) and, with ``VIR_MIGRATE_TLS``, sets
the port up as TLS with the daemon's server certificate (:mod:`.tuning`).

Each phase checks its inputs before changing anything; any failure undoes the incoming domain
(:func:`~virtmig.daemon.migration.rollback.dst_discard`), except a post-copy failure in Finish:
nothing can be rolled back then, and the guest stays paused for recovery.

Protocol v2's Prepare2 and Finish2 (:mod:`.v2`) are these same phases: Prepare without a cookie
to read, Finish in phase finish2, where a guest that cannot be resumed is kept paused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import time

from virtmig.daemon import cookie as ck
from virtmig.daemon import jobctl, stall
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    PostcopyFailed,
    StreamAddress,
)
from virtmig.daemon.core import Daemon
from virtmig.daemon.domxml import DomainDef, parse_domain_xml, rename
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.migration.common import (
    _job_of,
    any_check,
    any_check_tls_force,
    any_cookie,
    any_stats,
)
from virtmig.daemon.migration.owner import any_check_owner
from virtmig.daemon.migration.rollback import dst_discard
from virtmig.daemon.migration.tuning import (
    check_stream_pki,
    check_tunnel_streams,
    dst_tuning,
    new_stream_token,
)
from virtmig.daemon.migration.uri import dst_check_bind, dst_parse_uri_in, dst_uri_out
from virtmig.daemon.placement import new_migration_id
from virtmig.daemon.registry import DomainObj
from virtmig.proto import logsafe
from virtmig.proto.errors import (
    InternalError,
    InternalInputError,
    MigrateFinishOk,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    PortsExhausted,
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
from virtmig.proto.params import MigrateParam, Party, TypedParams

log = logsafe.logger(__name__)

F = MigrateFlags
P = MigrateParam


async def dst_prepare(
    daemon: Daemon, params: TypedParams, cookie_in: bytes | None, flags: int, owner: str = "",
    protocol: str = "",
) -> tuple[bytes, str | None]:
    """``cookie_in`` None: protocol v2's Prepare2, which gets no cookie (cookie B, with the
    stream token, is made all the same); ``protocol``: the call's ``MigrationProtocol``,
    recorded in the job."""
    function = ("virDomainMigratePrepare2" if cookie_in is None
                else "virDomainMigratePrepare3Params")
    f = any_check(daemon, flags, params, function, Party.DST)
    any_check_tls_force(daemon, f)
    check_stream_pki(daemon, f, Party.DST)
    offline = bool(f & F.OFFLINE)
    dom_xml = params.get_str(P.DEST_XML)
    if not dom_xml:
        raise InternalInputError("no domain XML passed")
    uri_in = params.get_str(P.URI)
    listen = params.get_str(P.LISTEN_ADDRESS) or daemon.config.migration_address
    want_port: int | None = None
    host = ""
    tunnelled = bool(f & F.TUNNELLED)
    if tunnelled:
        check_tunnel_streams(daemon, f, params)
        listen = "127.0.0.1"  # reached through the Tunnel RPC only
    elif not offline:
        if uri_in:
            host, want_port = dst_parse_uri_in(uri_in)
        else:
            host = daemon.config.migration_host or daemon.hostname
            if host.startswith("localhost"):
                raise InternalError(
                    "hostname on destination resolved to localhost, but migration requires an FQDN")
        await dst_check_bind(daemon.config, listen, want_port)
    d = parse_domain_xml(dom_xml)
    origname = d.name
    dname = params.get_str(P.DEST_NAME)
    if dname and dname != d.name:
        d = rename(d, dname)
    # The migration's id and the source host, from cookie A (v2's Prepare2 gets no cookie).
    mid, src_uuid, src_name, src_cpu = _dst_cookie_a(daemon, cookie_in, origname, d.uuid)
    d = await _dst_as_run(daemon, d)
    daemon.validate(d)
    if not offline:
        daemon.backend.check_host_cpu(daemon.spec(d), src_cpu)

    jobctl.check_limit(daemon, AsyncJob.MIGRATION_IN)
    existing = daemon.registry.check_define(d)
    if existing is not None and (existing.active or existing.job is not None):
        raise OperationInvalid(f"domain '{existing.name}' is already active")
    dom = existing or daemon.registry.add(DomainObj(uuid=d.uuid, name=d.name))
    job = MigrationJob(
        kind=AsyncJob.MIGRATION_IN, phase=Phase.PREPARE, flags=f, params=params.copy(),
        origname=origname, owner=owner, protocol=protocol,
        migration_id=mid, peer_hostuuid=src_uuid, peer_hostname=src_name,
    )
    async with dom.lock:
        dom.job = job
        job.busy = True
        dom.live = d
    try:
        # A port of the range, waited for (without the lock) when all are held; again when the
        # one taken is found bound by another process and other migrations hold the rest.
        deadline = time.monotonic() + daemon.config.migration_port_wait
        while True:
            if not offline and not want_port:
                await _dst_port(daemon, dom, job, deadline)
            try:
                async with dom.lock:
                    cookie, uri_out = await _dst_incoming(
                        daemon, dom, job, d, listen, None if offline else want_port,
                        None if tunnelled or offline else (host, bool(uri_in)))
            except _PortGone:
                continue
            break
    except BaseException as exc:
        # The record says why (domjobinfo --completed on a domain defined here before).
        async with dom.lock:
            await dst_discard(daemon, dom, existed=existing is not None,
                              record=job.record(JobType.FAILED, str(exc) or "prepare failed"))
        raise
    job.busy = False
    await any_check_owner(daemon, dom)
    return cookie, uri_out


async def _dst_incoming(
    daemon: Daemon, dom: DomainObj, job: MigrationJob, d: DomainDef, listen: str,
    want_port: int | None, uri_host: tuple[str, bool] | None,
) -> tuple[bytes, str | None]:
    """Prepare under the domain's lock: unless offline, the incoming guest listening on the
    caller's ``want_port`` or the range's port the job holds; cookie B and the URI for the
    source (``uri_host``: the host to name and whether the caller gave a URI; None: no URI)."""
    token = ""
    uri_out = None
    if job.flags & F.OFFLINE:  # nothing listens
        daemon.registry.save_status(dom)
    else:
        # The stream's secret: only the source that got cookie B can prove it knows it.
        token = new_stream_token()
        await _dst_listen(daemon, job, d, listen, want_port,
                          dst_tuning(daemon, job.flags, job.params, token))
        dom.live = daemon.live(d)
        dom.id = daemon.registry.new_id()
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
        if uri_host is not None:
            uri_out = dst_uri_out(uri_host[0], job.port, given=uri_host[1])
    cookie = any_cookie(daemon, job.origname, d.uuid, stream_token=token,
                        migration_id=job.migration_id)
    return cookie, uri_out


def _dst_cookie_a(daemon: Daemon, cookie_in: bytes | None, origname: str,
                  uuid: str) -> tuple[str, str, str, str]:
    """Cookie A checked: the migration's id (the source's; a source that sent none, or protocol
    v2's Prepare2 that gets no cookie: a new one, which cookie B carries back), the source's
    host UUID and name and its host CPU digest ("" in v2)."""
    if cookie_in is None:
        return new_migration_id(), "", "", ""
    cookie_a = ck.parse_cookie(
        cookie_in,
        expected_name=origname,
        expected_uuid=uuid,
        local_hostuuid=daemon.host_uuid,
        accept=ck.ACCEPT_PREPARE,
    )
    return (cookie_a.migration_id or new_migration_id(), cookie_a.hostuuid, cookie_a.hostname,
            cookie_a.host_cpu)


class _PortGone(Exception):
    """The range's port the job held is bound by another process, and migrations here hold
    every other one: Prepare waits for one of theirs (without the domain's lock)."""


async def _dst_port(daemon: Daemon, dom: DomainObj, job: MigrationJob,
                    deadline: float) -> None:
    """A port of the migration range held for this job (``job.port``): a free one, else the
    first one released before ``deadline`` (``time.monotonic``; ``migration_port_wait`` 0:
    none is waited for).  The wait ends early when the job is aborted or its caller's session
    ends (``job.abort_event``; the session's end sets ``fail_error``); then, or when no port
    came, the error is raised."""
    ports = daemon.ports
    port = ports.free_after(ports.lo - 1)
    if port is not None:
        ports.take(port)
        job.port = port
        return
    wait = daemon.config.migration_port_wait
    if wait <= 0:
        raise ports.exhausted()
    log.info("incoming migration of %s waits up to %g s for a migration port", dom.name, wait)
    job.waiting_port = True
    try:
        port = await ports.wait(max(0.0, deadline - time.monotonic()), job.abort_event)
    finally:
        job.waiting_port = False
    if job.abort_requested:
        raise job.fail_error or OperationAborted(
            "job 'migration in' canceled by client while waiting for a migration port")
    if port is None:
        raise PortsExhausted(
            f"{ports.exhausted().detail} after waiting {wait:g} s (migration_port_wait)")
    job.port = port


async def _dst_listen(
    daemon: Daemon, job: MigrationJob, d: DomainDef, listen: str, want_port: int | None,
    tuning: MigrationTuning,
) -> None:
    """The incoming guest listening on the caller's ``want_port``, else on the range's port the
    job holds (``job.port``) or, when another process has that one bound, the lowest free one
    (that one passed over a while: ``PortAllocator.drop``), or :class:`_PortGone` when there
    is none but other migrations hold some; ``job.port`` is the port it listens on (released
    by the job's end, whatever happens)."""
    spec = daemon.spec(d)
    ports = daemon.ports
    port: int | None = want_port or job.port
    last: OSError | None = None
    while port is not None:
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
            if want_port:
                break
            ports.drop(port)  # another process has it: of no use to a waiter either
            job.port = 0
            port = ports.free_after(ports.lo - 1)
            if port is not None:
                ports.take(port)
                job.port = port
            elif ports.held() and daemon.config.migration_port_wait > 0:
                raise _PortGone from exc  # wait for a port other migrations hold
            continue
        except BackendError as exc:
            raise OperationFailed(f"cannot start incoming guest: {exc}") from exc
        if bound != job.port:
            if job.port:
                ports.release(job.port)
            ports.take(bound)
            job.port = bound
        return
    if not want_port:  # every port of the range is taken: libvirt's port allocator's words
        log.warning("no free migration port on %s: %s", listen,
                    last.strerror if last is not None else "none left")
        raise ports.exhausted()
    raise OperationFailed(
        f"no free migration port on {listen}"
        + (f": {last.strerror}" if last is not None else "")
    )


async def dst_finish(
    daemon: Daemon, params: TypedParams, cookie_in: bytes, flags: int, cancelled: bool,
    v2: bool = False,
) -> tuple[DomainObj, bytes]:
    """``v2``: protocol v2's Finish2 (phase finish2; the source's guest is already stopped, so a
    guest that cannot be resumed here is kept paused rather than killed, as libvirt does)."""
    function = "virDomainMigrateFinish2" if v2 else "virDomainMigrateFinish3Params"
    f = any_check(daemon, flags, params, function, Party.DST)
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
            job.set_phase(Phase.FINISH2 if v2 else Phase.FINISH3)
            daemon.registry.save_status(dom)
            if cancelled:
                raise _dst_cancelled_error(daemon, dom)
            if stall.POINT:
                await stall.at("finish3")
            incoming = ck.parse_cookie_opt(
                cookie_in,
                expected_name=job.origname,
                expected_uuid=dom.uuid,
                local_hostuuid=daemon.host_uuid,
                accept=ck.ACCEPT_FINISH,
            )
            persistent = (_dst_persistent_def(daemon, dom, incoming) if f & F.PERSIST_DEST
                          else None)
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
            await _dst_persist_and_start(daemon, dom, f, v2, persistent)
            if incoming is not None and incoming.statistics is not None and not job.postcopy:
                job.progress = dst_downtime(job.progress, incoming.statistics,
                                            int(time.time() * 1000))
            if stall.POINT:
                await stall.at("finish3-resumed")
            if job.port:
                daemon.ports.release(job.port)
            # The guest arrived: the one place it runs (virtmig.daemon.placement).
            await daemon.placement.arrived_durably(dom.uuid, job.migration_id,
                                                   job.peer_hostuuid)
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
            await dst_discard(daemon, dom, existed=existed, record=job.record(jtype, err))
            raise


async def _dst_persist_and_start(daemon: Daemon, dom: DomainObj, f: MigrateFlags, v2: bool,
                                 persistent: DomainDef | None) -> None:
    """PERSIST_DEST's definition is saved before the vCPUs start (libvirt's order too): a
    daemon that dies once the guest runs here keeps it defined (the fault matrix found it
    lost).  If the guest cannot be started, the definition before is put back."""
    prior = dom.config
    if persistent is not None:
        dom.config = persistent
        daemon.registry.save_config(dom)
    try:
        await _dst_start_vcpus(daemon, dom, f, v2)
    except BaseException:
        if persistent is not None:
            dom.config = prior
            daemon.registry.save_config(dom)
        raise


async def _dst_start_vcpus(daemon: Daemon, dom: DomainObj, f: MigrateFlags, v2: bool) -> None:
    """The stream is complete: run the guest, unless PAUSED.  In protocol v2 the source's guest
    is gone already: a guest that cannot be resumed stays here, paused, for an admin (libvirt's
    Finish2); in v3 the failure kills it and the source is resumed."""
    if f & F.PAUSED:
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.USER)
        return
    try:
        await daemon.backend.resume(dom.uuid)
    except BackendError as exc:
        if not v2:
            raise
        log.error("cannot resume %s after a v2 migration: it stays paused here: %s",
                  dom.name, exc)
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION, save=False)
        return
    # (end_job after this writes the status: nothing is awaited before it)
    daemon.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATED, save=False)


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


async def _dst_as_run(daemon: Daemon, d: DomainDef) -> DomainDef:
    """The incoming definition pinned (:meth:`Daemon.canonical`) and made concrete for this host
    (:meth:`Daemon.expanded`; a source sends a host-model CPU expanded already)."""
    try:
        return await daemon.expanded(daemon.canonical(d))
    except BackendError as exc:
        raise OperationFailed(f"cannot prepare the domain: {exc}") from exc


def _dst_cancelled_error(daemon: Daemon, dom: DomainObj) -> VirtmigError:
    """What Finish(cancelled) reports: the incoming side's own error, or FINISH_OK."""
    progress = daemon.backend.progress(dom.uuid)
    if progress.error:
        return OperationFailed(f"job 'migration in' failed: {progress.error}")
    return MigrateFinishOk()


def _dst_persistent_def(daemon: Daemon, dom: DomainObj, incoming: ck.Cookie | None
                        ) -> DomainDef:
    """The definition the destination keeps: the source's persistent XML (``--persistent-xml``
    or its stored one), pinned by the backend as a define would pin it (machine type, default
    devices: :meth:`Daemon.canonical`), else the running definition."""
    if incoming is not None and incoming.persistent_xml:
        d = daemon.canonical(parse_domain_xml(incoming.persistent_xml))
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



# A clock gap beyond this between the source's cookie and the destination is a clock that
# disagrees, not time spent: it is not counted.
_MAX_COOKIE_GAP_MS = 60_000


def dst_downtime(progress: MigrationProgress, stats: ck.MigrationStats,
                 now_ms: int) -> MigrationProgress:
    """The destination's downtime as libvirt counts it (``qemuDomainJobDataUpdateDowntime``):
    from the source's stop to the guest running here, i.e. the source's downtime plus the time
    since the source sent its cookie (``now_ms``, this host's clock; the cookie's ``delta``
    applied), and never less than what the destination measured itself."""
    gap = now_ms - (stats.sent + stats.delta) if stats.sent else 0
    if not 0 <= gap <= _MAX_COOKIE_GAP_MS:
        gap = 0
    downtime = max(progress.downtime_ms, stats.downtime + gap)
    return dataclasses.replace(progress, downtime_ms=downtime)
