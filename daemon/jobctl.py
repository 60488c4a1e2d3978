"""Job control: what a running migration job shows and how it is steered and stopped.

* job info (:class:`~virtmig.daemon.job.JobInfo`) and libvirt's job stats, live or of the last
  completed job;
* ``watch``: the job's info each time it changes, then its completed record;
* ``abort`` (libvirt's AbortJob), max downtime and max speed (also between migrations), the
  switch to post-copy, the xbzrle compression cache of a running domain (its next migrations');
* ``src_watch``: the background task that follows an outgoing stream while Perform waits: it
  publishes progress and MIGRATION_ITERATION events, runs virtmig's stall watchdog and completion
  timeout, and reports through the job (it never raises into Perform).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from virtmig.daemon.backend.base import BackendError, MigrationProgress, MigrationStatus
from virtmig.daemon.core import Daemon
from virtmig.daemon.events import Event, EventKind
from virtmig.daemon.job import AsyncJob, JobInfo, JobRecord, MigrationJob, Phase
from virtmig.daemon.registry import DomainObj
from virtmig.proto import logsafe
from virtmig.proto.aio import within
from virtmig.proto.errors import (
    InvalidArgument,
    NoSupport,
    OperationFailed,
    OperationInvalid,
    OperationTimeout,
    OperationUnsupported,
    ResourceExhausted,
)
from virtmig.proto.flags import (
    MAX_BANDWIDTH_MIB,
    CompletionAction,
    DomainState,
    JobOperation,
    JobType,
    MigrateFlags,
    PausedReason,
)
from virtmig.proto.migid import MIGRATION_ID_STAT
from virtmig.proto.params import (
    MigrateParam,
    ParamType,
    TypedParam,
    check_compression_cache,
    check_max_downtime,
    check_max_speed,
)

log = logsafe.logger(__name__)

ABORT_JOB_POSTCOPY = 2  # VIR_DOMAIN_ABORT_JOB_POSTCOPY
MAX_SPEED_POSTCOPY = 1  # VIR_DOMAIN_MIGRATE_MAX_SPEED_POSTCOPY
WATCH_INTERVAL_S = 0.1
PROTOCOL_STAT = "virtmig.protocol"
_RUNNING = (MigrationStatus.SETUP, MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE)

# --- info ----------------------------------------------------------------------------------------


def job_stats(
    progress: MigrationProgress, elapsed_ms: int, completed: bool, error: str = "",
    protocol: str = "", migration_id: str = "",
) -> list[TypedParam]:
    """libvirt's job stats names for what the backend reports; virtmig's ``virtmig.protocol``
    (the migration protocol the job ran with) and ``virtmig.migration_id`` when known."""
    u = ParamType.ULLONG
    items = [
        TypedParam("time_elapsed", u, elapsed_ms),
        TypedParam("data_total", u, progress.total_bytes),
        TypedParam("data_processed", u, progress.processed_bytes),
        TypedParam("data_remaining", u, progress.remaining_bytes),
        TypedParam("memory_total", u, progress.total_bytes),
        TypedParam("memory_processed", u, progress.processed_bytes),
        TypedParam("memory_remaining", u, progress.remaining_bytes),
        TypedParam("memory_bps", u, progress.bandwidth_bytes_per_s),
        TypedParam("memory_dirty_rate", u, progress.dirty_rate_pages_per_s),
        TypedParam("memory_iteration", u, progress.iteration),
        TypedParam("memory_page_size", u, progress.page_size),
        TypedParam("memory_normal", u, progress.normal_pages),
        TypedParam("memory_normal_bytes", u, progress.normal_pages * progress.page_size),
        TypedParam("memory_postcopy_requests", u, progress.postcopy_requests),
        TypedParam("setup_time", u, progress.setup_time_ms),
        TypedParam("auto_converge_throttle", ParamType.INT, progress.throttle_percent),
        TypedParam("downtime", u,
                   progress.downtime_ms if completed else progress.expected_downtime_ms),
    ]
    if (x := progress.xbzrle) is not None:
        items += [
            TypedParam("compression_cache", u, x.cache_bytes),
            TypedParam("compression_bytes", u, x.compressed_bytes),
            TypedParam("compression_pages", u, x.pages),
            TypedParam("compression_cache_misses", u, x.cache_misses),
            TypedParam("compression_overflow", u, x.overflows),
        ]
    if error:
        items.append(TypedParam("errmsg", ParamType.STRING, error))
    if protocol:
        items.append(TypedParam(PROTOCOL_STAT, ParamType.STRING, protocol))
    if migration_id:
        items.append(TypedParam(MIGRATION_ID_STAT, ParamType.STRING, migration_id))
    return items


def _info(jtype: JobType, operation: JobOperation, elapsed: int, progress: MigrationProgress, *,
          completed: bool, error: str = "", phase: str = "",
          abort_requested: bool = False, protocol: str = "", migration_id: str = "") -> JobInfo:
    return JobInfo(
        type=jtype,
        operation=operation,
        time_elapsed_ms=elapsed,
        data_total=progress.total_bytes,
        data_processed=progress.processed_bytes,
        data_remaining=progress.remaining_bytes,
        mem_total=progress.total_bytes,
        mem_processed=progress.processed_bytes,
        mem_remaining=progress.remaining_bytes,
        stats=tuple(job_stats(progress, elapsed, completed, error, protocol, migration_id)),
        phase=phase,
        error=error,
        abort_requested=abort_requested,
    )


def record_info(rec: JobRecord) -> JobInfo:
    return _info(rec.type, rec.operation, rec.time_elapsed_ms, rec.progress,
                 completed=True, error=rec.error, protocol=rec.protocol,
                 migration_id=rec.migration_id)


def live_progress(daemon: Daemon, dom: DomainObj, job: MigrationJob) -> MigrationProgress:
    if job.kind is AsyncJob.MIGRATION_OUT and job.phase.streaming:
        live = daemon.backend.progress(dom.uuid)
        if live.status in _RUNNING:
            return live
    return job.progress


def job_info(daemon: Daemon, dom: DomainObj, *, completed: bool = False) -> JobInfo:
    if completed:
        rec = dom.completed
        return record_info(rec) if rec is not None else JobInfo(JobType.NONE)
    job = dom.job
    if job is None:
        return JobInfo(JobType.NONE)
    return _info(JobType.UNBOUNDED, job.kind.operation, job.elapsed_ms(),
                 live_progress(daemon, dom, job), completed=False, phase=job.phase.label,
                 abort_requested=job.abort_requested, protocol=job.protocol,
                 migration_id=job.migration_id)


async def watch(daemon: Daemon, dom: DomainObj) -> AsyncIterator[JobInfo]:
    """The current job's info whenever it changes; its completed record when it ends."""
    job = dom.job
    if job is None:
        yield job_info(daemon, dom)
        return
    last: JobInfo | None = None
    while dom.job is job:
        info = job_info(daemon, dom)
        unclocked = replace(info, time_elapsed_ms=0)  # compare without the clock
        if unclocked != last:
            last = unclocked
            yield replace(info, time_elapsed_ms=job.elapsed_ms())
        async with dom.job_changed:
            with contextlib.suppress(TimeoutError):
                await within(dom.job_changed.wait(), 1.0)
    if dom.completed is not None:
        yield record_info(dom.completed)


def job_event(dom: DomainObj, rec: JobRecord) -> Event:
    kind = EventKind.JOB_COMPLETED if rec.type is JobType.COMPLETED else EventKind.JOB_FAILED
    return Event(kind, dom.name, dom.uuid, job=record_info(rec))


# --- steering ------------------------------------------------------------------------------------


def _outgoing(dom: DomainObj) -> MigrationJob | None:
    job = dom.job
    return job if job is not None and job.kind is AsyncJob.MIGRATION_OUT else None


async def abort(daemon: Daemon, dom: DomainObj, flags: int) -> None:
    """libvirt's AbortJob; the phase that runs (or the next one) rolls back and reports it."""
    job = dom.job
    if job is None:
        raise OperationInvalid("no job is active on the domain")
    if job.kind is AsyncJob.MIGRATION_IN:
        if job.waiting_port:  # Prepare stops waiting for a port and rolls back
            log.info("incoming migration of %s aborted while waiting for a port", dom.name)
            job.request_abort()
            return
        if job.flags & MigrateFlags.OFFLINE and not job.busy:
            await _abort_offline_incoming(daemon, dom, job)
            return
        raise OperationInvalid("cannot abort incoming migration; use virDomainDestroy instead")
    if job.postcopy:
        if not flags & ABORT_JOB_POSTCOPY:
            raise OperationInvalid("cannot abort migration in post-copy mode")
        raise OperationUnsupported("aborting a post-copy migration is not supported by this host")
    if flags & ABORT_JOB_POSTCOPY:
        raise OperationInvalid("current job is not outgoing migration in post-copy mode")
    if job.abort_requested:
        raise OperationInvalid("abort of job 'migration out' already requested")
    if job.phase in (Phase.CONFIRM3, Phase.CONFIRM3_CANCELLED):
        raise OperationInvalid("migration job is already being confirmed")
    job.request_abort()
    log.info("abort requested for migration of %s in phase %s", dom.name, job.phase.label)
    if job.phase.streaming:
        try:
            await daemon.backend.cancel(dom.uuid)
        except BackendError as exc:
            # e.g. the switch to post-copy was already asked for: nothing can be rolled back,
            # and a pending abort must not later cancel Finish on a guest that runs there.
            job.withdraw_abort()
            raise OperationInvalid(f"cannot abort the migration now: {exc}") from exc
    await daemon.registry.job_changed(dom)


async def _abort_offline_incoming(daemon: Daemon, dom: DomainObj, job: MigrationJob) -> None:
    """An offline incoming migration between Prepare and Finish has no guest to destroy: abort
    rolls it back (the domain as it was before Prepare)."""
    async with dom.lock:
        if dom.job is not job or job.busy:
            raise OperationInvalid(
                f"domain '{dom.name}' incoming migration is busy in another call")
        log.info("offline incoming migration of %s aborted", dom.name)
        await daemon.discard_incoming(dom, existed=dom.config is not None, record=job.record(
            JobType.CANCELLED, "incoming migration aborted"))


def _require_active(dom: DomainObj) -> None:
    if not dom.active:
        raise OperationInvalid("domain is not running")


async def set_max_downtime(daemon: Daemon, dom: DomainObj, downtime_ms: int) -> None:
    check_max_downtime(downtime_ms)
    _require_active(dom)
    dom.max_downtime_ms = downtime_ms
    job = _outgoing(dom)
    if job is not None and job.phase.streaming:
        with contextlib.suppress(BackendError):
            await daemon.backend.set_tuning(dom.uuid, max_downtime_ms=downtime_ms)


def get_max_downtime(daemon: Daemon, dom: DomainObj) -> int:
    _require_active(dom)
    return dom.max_downtime_ms or daemon.config.default_max_downtime_ms


async def set_max_speed(daemon: Daemon, dom: DomainObj, mib: int, flags: int) -> None:
    check_max_speed(mib)
    if flags & MAX_SPEED_POSTCOPY:
        _require_active(dom)
        dom.max_speed_postcopy_mib = mib
        return
    dom.max_speed_mib = mib
    job = _outgoing(dom)
    if job is not None and job.phase.streaming:
        job.bandwidth_mib = mib
        with contextlib.suppress(BackendError):
            await daemon.backend.set_tuning(dom.uuid, bandwidth_bytes_per_s=mib * 1024 * 1024)


def get_max_speed(dom: DomainObj, flags: int) -> int:
    """libvirt's: the limit a running migration streams with (``--bandwidth``, or set since),
    else the domain's; "unlimited" reads as libvirt's largest, 8796093022207 MiB/s, as QEMU
    reports it.  The post-copy limit is read as set (0: unlimited, as QEMU's default)."""
    if flags & MAX_SPEED_POSTCOPY:
        _require_active(dom)
        return dom.max_speed_postcopy_mib
    job = _outgoing(dom)
    if job is not None and job.phase.streaming and job.bandwidth_mib:
        return job.bandwidth_mib
    return dom.max_speed_mib or MAX_BANDWIDTH_MIB


GET_COMPCACHE_API = "virDomainMigrateGetCompressionCache"
SET_COMPCACHE_API = "virDomainMigrateSetCompressionCache"


def _compcache_call(daemon: Daemon, api: str, flags: int) -> None:
    """A backend without compression has no cache (libvirt's drivers without the API say so);
    no flags are defined."""
    if not daemon.backend.extra_flags & MigrateFlags.COMPRESSED:
        raise NoSupport(api)
    if flags:
        raise InvalidArgument(f"unsupported flags (0x{flags:x}) in function {api}")


async def get_compression_cache(daemon: Daemon, dom: DomainObj, flags: int = 0) -> int:
    """libvirt's MigrateGetCompressionCache: the running domain's xbzrle cache size (bytes),
    which its next migrations use unless one gives ``compression.xbzrle.cache``."""
    _compcache_call(daemon, GET_COMPCACHE_API, flags)
    _require_active(dom)
    try:
        return await daemon.backend.get_compression_cache(dom.uuid)
    except BackendError as exc:
        raise OperationFailed(f"cannot get the compression cache size of domain "
                              f"'{dom.name}': {exc}") from exc


async def set_compression_cache(daemon: Daemon, dom: DomainObj, size: int,
                                flags: int = 0) -> None:
    """libvirt's MigrateSetCompressionCache; a state change: it waits (bounded) for a running
    migration job of the domain to end, as libvirt's modify job does."""
    _compcache_call(daemon, SET_COMPCACHE_API, flags)
    check_compression_cache(size)
    async with daemon.registry.state_change(dom, SET_COMPCACHE_API):
        _require_active(dom)
        try:
            await daemon.backend.set_compression_cache(dom.uuid, size)
        except BackendError as exc:
            raise OperationFailed(f"cannot set the compression cache size of domain "
                                  f"'{dom.name}': {exc}") from exc
    log.info("compression cache of %s set to %d bytes", dom.name, size)


async def start_postcopy(daemon: Daemon, dom: DomainObj) -> None:
    _require_active(dom)
    job = _outgoing(dom)
    if job is None or not job.phase.streaming:
        raise OperationInvalid(
            "post-copy can only be started while outgoing migration is in progress")
    if not job.flags & MigrateFlags.POSTCOPY:
        raise OperationInvalid("switching to post-copy requires migration to be started with "
                               "VIR_MIGRATE_POSTCOPY flag")
    try:
        await daemon.backend.start_postcopy(dom.uuid)
    except BackendError as exc:
        raise OperationFailed(f"cannot switch to post-copy: {exc}") from exc


def check_limit(daemon: Daemon, kind: AsyncJob) -> None:
    """virtmig's per-daemon limits on concurrent migrations."""
    if kind is AsyncJob.MIGRATION_OUT:
        limit, key, what = (daemon.config.max_outgoing_migrations, "max_outgoing_migrations",
                            "outgoing")
    else:
        limit, key, what = (daemon.config.max_incoming_migrations, "max_incoming_migrations",
                            "incoming")
    if not limit:
        return
    running = len(daemon.registry.jobs(kind))  # O(jobs): the registry keeps them
    if running >= limit:
        raise ResourceExhausted(
            f"too many {what} migrations: {running} running, the limit {key} is {limit}")


# --- following an outgoing stream ----------------------------------------------------------------


async def src_watch(daemon: Daemon, dom: DomainObj, job: MigrationJob) -> None:
    """Runs while Perform waits for the backend; reports through the job, never raises."""
    try:
        await _src_watch(daemon, dom, job)
    except asyncio.CancelledError:
        raise
    except Exception:  # pragma: no cover - a bug here must not break the migration
        log.exception("job watcher of %s failed", dom.name)


async def _src_watch(daemon: Daemon, dom: DomainObj, job: MigrationJob) -> None:
    params = job.params
    stall = float(params.get_int(MigrateParam.STALL_TIMEOUT) or daemon.config.stall_timeout_s)
    per_gib = float(params.get_int(MigrateParam.COMPLETION_TIMEOUT)
                    or daemon.config.completion_timeout_per_gib_s)
    action = (params.get_str(MigrateParam.COMPLETION_TIMEOUT_ACTION)
              or daemon.config.completion_timeout_action)
    memory_gib = dom.definition.memory_kib / (1024 * 1024)
    deadline = time.monotonic() + per_gib * max(memory_gib, 1 / 1024) if per_gib else None
    last_processed, last_change, last_iteration = -1, time.monotonic(), 0
    timed_out = False
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        p = daemon.backend.progress(dom.uuid)
        if p.status not in _RUNNING:
            continue
        job.progress = p
        await daemon.registry.job_changed(dom)
        if p.iteration != last_iteration:
            last_iteration = p.iteration
            daemon.events.publish(Event(EventKind.MIGRATION_ITERATION, dom.name, dom.uuid,
                                        iteration=p.iteration))
        now = time.monotonic()
        if p.processed_bytes != last_processed or p.status is MigrationStatus.POSTCOPY_ACTIVE:
            last_processed, last_change = p.processed_bytes, now
        elif stall and now - last_change >= stall:
            await _fail(daemon, dom, job,
                        f"migration stalled: no progress for {now - last_change:.0f} s with "
                        f"{p.remaining_bytes} bytes remaining")
            return
        if deadline is not None and not timed_out and now >= deadline:
            timed_out = True
            limit = per_gib * max(memory_gib, 1 / 1024)
            await _completion_timeout(daemon, dom, job, action, limit)


async def _fail(daemon: Daemon, dom: DomainObj, job: MigrationJob, reason: str) -> None:
    log.warning("migration of %s: %s", dom.name, reason)
    await fail_job(daemon, dom, job, OperationTimeout(f"job 'migration out' failed: {reason}"))


async def fail_job(daemon: Daemon, dom: DomainObj, job: MigrationJob,
                   error: OperationFailed | OperationTimeout) -> None:
    """Stop a running outgoing stream for a reason of the daemon's; Perform reports ``error``."""
    if job.fail_error is None:
        job.fail_error = error
    with contextlib.suppress(BackendError):
        await daemon.backend.cancel(dom.uuid)


async def _completion_timeout(daemon: Daemon, dom: DomainObj, job: MigrationJob, action: str,
                              limit: float) -> None:
    log.warning("migration of %s did not complete within %.0f s: %s", dom.name, limit, action)
    if action == CompletionAction.SUSPEND:
        async with daemon.registry.state_change(dom, "completion timeout",
                                                allowed_during=frozenset(AsyncJob)):
            if dom.state is DomainState.RUNNING:
                await daemon.backend.pause(dom.uuid)
                daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
        return
    if action == CompletionAction.POSTCOPY and job.flags & MigrateFlags.POSTCOPY:
        try:
            await daemon.backend.start_postcopy(dom.uuid)
            return
        except BackendError as exc:
            log.warning("cannot switch %s to post-copy: %s", dom.name, exc)
    await _fail(daemon, dom, job, f"migration did not complete within {limit:.0f} s "
                                  "(completion timeout)")
