"""Domain lifecycle: define, undefine, start, destroy, suspend, resume.

Each call checks its preconditions with libvirt's messages before anything changes, runs as a
state change on the domain (waiting, bounded, for a conflicting migration job), and leaves the
state, reason and files consistent whether it succeeds or fails.  What an offline Prepare left
(an inactive domain with an idle incoming job) never blocks an operator: destroy rolls it back,
and so does define when no caller's session owns the job any more.

A guest runs in one place: ``start`` of a guest that was migrated away asks its destination
first, and ``resume`` of one whose migration's outcome is unknown is refused
(:mod:`virtmig.daemon.locate`).
"""

from __future__ import annotations

from collections.abc import Awaitable

from virtmig.daemon import locate
from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.core import Daemon
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.daemon.events import Lifecycle
from virtmig.daemon.job import AsyncJob
from virtmig.daemon.registry import DomainObj
from virtmig.proto.errors import OperationFailed, OperationInvalid
from virtmig.proto.flags import (
    DomainState,
    JobType,
    PausedReason,
    RunningReason,
    ShutoffReason,
)

_DURING_OUT = frozenset({AsyncJob.MIGRATION_OUT})


def not_running(dom: DomainObj) -> OperationInvalid:
    return OperationInvalid("domain is not running")


async def define(daemon: Daemon, xml: str) -> DomainObj:
    d = daemon.canonical(parse_domain_xml(xml), define=True)
    daemon.validate(d)
    existing = daemon.registry.check_define(d)
    if existing is not None and _abandoned_incoming(daemon, existing):
        # An incoming migration nobody drives any more (its caller's session is gone or never
        # was) must not block the operator: it is rolled back first.
        await _discard_incoming(daemon, existing, "replaced by a new definition")
        existing = daemon.registry.check_define(d)
    if existing is None:
        dom = daemon.registry.add(DomainObj(uuid=d.uuid, name=d.name, config=d))
        daemon.registry.save_config(dom)
        daemon.events.lifecycle(dom.name, dom.uuid, Lifecycle.DEFINED, 0)
        return dom
    async with daemon.registry.state_change(existing, "define") as dom:
        dom.config = d
        daemon.registry.save_config(dom)
        daemon.registry.save_status(dom)
        daemon.events.lifecycle(dom.name, dom.uuid, Lifecycle.DEFINED, 1)
        return dom


async def undefine(daemon: Daemon, dom: DomainObj) -> None:
    async with daemon.registry.state_change(dom, "undefine"):
        if not dom.persistent:
            raise OperationInvalid("cannot undefine transient domain")
        dom.config = None
        daemon.registry.save_config(dom)
        daemon.events.lifecycle(dom.name, dom.uuid, Lifecycle.UNDEFINED, 0)
        if not dom.active:
            daemon.registry.remove(dom)
        else:
            daemon.registry.save_status(dom)


async def start(daemon: Daemon, dom: DomainObj, *, paused: bool, force: bool = False) -> None:
    """``force``: skip the one-place check (a guest migrated away is started only when its
    destination says it does not run it there: virtmig.daemon.locate)."""
    async with daemon.registry.state_change(dom, "start"):
        if dom.active:
            raise OperationInvalid("domain is already running")
        await locate.check_start(daemon, dom, force=force)
        try:
            d = await daemon.expanded(dom.definition)  # host-model CPU made concrete, say
        except BackendError as exc:
            raise OperationFailed(f"cannot start domain '{dom.name}': {exc}") from exc
        spec = daemon.validate(d)  # the limits may have changed since define
        try:
            await daemon.backend.start(spec, paused=paused)
        except BackendError as exc:
            raise OperationFailed(f"cannot start domain '{dom.name}': {exc}") from exc
        dom.live = daemon.live(d)
        dom.id = daemon.registry.new_id()
        locate.started(daemon, dom)
        if paused:
            daemon.set_state(dom, DomainState.PAUSED, PausedReason.USER)
        else:
            daemon.set_state(dom, DomainState.RUNNING, RunningReason.BOOTED)


async def destroy(daemon: Daemon, dom: DomainObj) -> None:
    """Destroy works whatever job runs: it is how an admin gets out of any stuck state; on an
    inactive domain with an idle incoming job (an offline Prepare), it rolls that job back."""
    if not dom.active:
        job = dom.job
        if job is not None and job.kind is AsyncJob.MIGRATION_IN and not job.busy:
            await _discard_incoming(daemon, dom, "domain destroyed")
            return
        raise not_running(dom)
    await daemon.backend.destroy(dom.uuid)
    job = dom.job
    if job is not None and not job.busy:
        # No phase is running to notice: the job ends here.
        if job.port:
            daemon.ports.release(job.port)
        await daemon.registry.end_job(dom, job.record(JobType.FAILED, "domain destroyed"))
    daemon.mark_inactive(dom, ShutoffReason.DESTROYED)


def _abandoned_incoming(daemon: Daemon, dom: DomainObj) -> bool:
    job = dom.job
    return (job is not None and job.kind is AsyncJob.MIGRATION_IN and not job.busy
            and not dom.active and not daemon.session_alive(job.owner))


async def _discard_incoming(daemon: Daemon, dom: DomainObj, why: str) -> None:
    async with dom.lock:
        job = dom.job
        if job is None or job.busy or job.kind is not AsyncJob.MIGRATION_IN:
            raise OperationInvalid(f"domain '{dom.name}' incoming migration is busy")
        await daemon.discard_incoming(dom, existed=dom.config is not None,
                                      record=job.record(JobType.FAILED, why))


async def suspend(daemon: Daemon, dom: DomainObj) -> None:
    async with daemon.registry.state_change(dom, "suspend", allowed_during=_DURING_OUT):
        if not dom.active:
            raise not_running(dom)
        if dom.state is DomainState.PAUSED:
            return
        await _backend_call(daemon.backend.pause(dom.uuid), "suspend", dom)
        daemon.set_state(dom, DomainState.PAUSED, PausedReason.USER)


async def resume(daemon: Daemon, dom: DomainObj) -> None:
    async with daemon.registry.state_change(dom, "resume"):
        if not dom.active:
            raise not_running(dom)
        if dom.state is not DomainState.PAUSED:
            raise OperationInvalid("domain is not paused")
        locate.refuse_uncertain(daemon, dom, "resume")
        await _backend_call(daemon.backend.resume(dom.uuid), "resume", dom)
        daemon.set_state(dom, DomainState.RUNNING, RunningReason.UNPAUSED)


async def _backend_call(coro: Awaitable[None], what: str, dom: DomainObj) -> None:
    try:
        await coro
    except BackendError as exc:
        raise OperationFailed(f"cannot {what} domain '{dom.name}': {exc}") from exc
