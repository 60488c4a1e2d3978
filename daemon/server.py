"""The gRPC services: Host, Domains and Migration, over one :class:`~virtmig.daemon.core.Daemon`.

Servicer methods are thin: they convert wire messages to plain values (non-params migration RPCs
become typed params here, so the phases see one form), call the daemon, and convert back.  Errors
are mapped to gRPC status in one place, :func:`rpc`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from virtmig.daemon import lifecycle, migration
from virtmig.daemon.backend.base import MigrationProgress, MigrationStatus
from virtmig.daemon.core import VERSION, Daemon
from virtmig.daemon.domxml import format_domain_xml
from virtmig.daemon.job import AsyncJob, Phase
from virtmig.daemon.registry import DomainObj
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto import virtmig_pb2_grpc as pbg
from virtmig.proto.errors import InvalidArgument, to_status
from virtmig.proto.flags import JobType
from virtmig.proto.params import (
    MigrateParam,
    ParamType,
    TypedParam,
    TypedParams,
    from_wire,
    to_wire,
)

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Rep = TypeVar("Rep")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Rep]], Awaitable[Rep]]


def rpc(fn: Handler[Req, Rep]) -> Handler[Req, Rep]:
    """The one place where exceptions become gRPC status codes."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Rep]) -> Rep:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, details, trailers = to_status(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.exception("internal error in %s", fn.__name__)
            else:
                log.info("%s failed: %s", fn.__name__, details)
            context.set_trailing_metadata(trailers)
            await context.abort(code, details)

    return wrapper


def domain_msg(dom: DomainObj) -> pb.Domain:
    return pb.Domain(
        name=dom.name,
        uuid=dom.uuid,
        id=dom.id,
        persistent=dom.persistent,
        state=int(dom.state),  # type: ignore[arg-type]
        reason=dom.reason,
        reason_name=dom.reason_label,
    )


def resolve(daemon: Daemon, ref: pb.DomainRef) -> DomainObj:
    key = ref.WhichOneof("key")
    if key == "name":
        return daemon.registry.by_name(ref.name)
    if key == "uuid":
        return daemon.registry.by_uuid(ref.uuid)
    raise InvalidArgument("invalid argument: a domain name or uuid is required")


SESSION_METADATA_KEY = "virtmig-session"
DEFAULT_HEARTBEAT_S = 5


def session_of(context: Any) -> str:
    """The caller's session id from the call metadata ("" when it named none)."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _opt(msg: Any, field: str) -> str | None:
    return str(getattr(msg, field)) if msg.HasField(field) else None


def legacy_params(
    *, xml: str | None = None, dname: str | None = None, uri: str | None = None,
    bandwidth: int = 0,
) -> TypedParams:
    """Non-params RPC arguments as the params the core uses (libvirt's mapping, §2.2)."""
    params = TypedParams()
    if uri is not None:
        params.add(MigrateParam.URI, uri)
    if dname is not None:
        params.add(MigrateParam.DEST_NAME, dname)
    if xml is not None:
        params.add(MigrateParam.DEST_XML, xml)
    if bandwidth:
        params.add(MigrateParam.BANDWIDTH, bandwidth)
    return params


class HostService(pbg.HostServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._cleanups: set[asyncio.Task[None]] = set()

    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: Any
    ) -> AsyncIterator[pb.SessionEvent]:
        """Stays open while the caller lives; its end abandons the jobs the session owns."""
        session = secrets.token_hex(16)
        self.daemon.sessions.add(session)
        interval = request.heartbeat_seconds or DEFAULT_HEARTBEAT_S
        try:
            yield pb.SessionEvent(session_id=session)
            while True:
                await asyncio.sleep(interval)
                yield pb.SessionEvent(session_id=session)
        finally:
            # The handler is being cancelled: run the cleanup as its own task.
            task = asyncio.get_running_loop().create_task(
                migration.any_session_closed(self.daemon, session)
            )
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    @rpc
    async def GetHost(self, request: pb.GetHostRequest, context: Any) -> pb.HostInfo:
        d = self.daemon
        doms = list(d.registry)
        active = sum(1 for x in doms if x.active)
        return pb.HostInfo(
            hostname=d.hostname,
            host_uuid=d.host_uuid,
            version=VERSION,
            backend=d.backend.name,
            features=sorted(d.features),
            cpus=os.cpu_count() or 1,
            memory_kib=_memory_kib(),
            arch=os.uname().machine,
            active_domains=active,
            inactive_domains=len(doms) - active,
        )


def _memory_kib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class DomainsService(pbg.DomainsServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    @rpc
    async def Define(self, request: pb.DefineRequest, context: Any) -> pb.Domain:
        return domain_msg(await lifecycle.define(self.daemon, request.xml))

    @rpc
    async def Undefine(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.undefine(self.daemon, resolve(self.daemon, request.domain))
        return pb.Empty()

    @rpc
    async def Start(self, request: pb.StartRequest, context: Any) -> pb.Domain:
        dom = resolve(self.daemon, request.domain)
        await lifecycle.start(self.daemon, dom, paused=request.paused)
        return domain_msg(dom)

    @rpc
    async def Destroy(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.destroy(self.daemon, resolve(self.daemon, request.domain))
        return pb.Empty()

    @rpc
    async def Suspend(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.suspend(self.daemon, resolve(self.daemon, request.domain))
        return pb.Empty()

    @rpc
    async def Resume(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.resume(self.daemon, resolve(self.daemon, request.domain))
        return pb.Empty()

    @rpc
    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListReply:
        want_active = request.active or not request.inactive
        want_inactive = request.inactive
        doms = [
            domain_msg(d)
            for d in self.daemon.registry
            if (d.active and want_active) or (not d.active and want_inactive)
        ]
        doms.sort(key=lambda m: (m.id < 0, m.id if m.id >= 0 else 0, m.name))
        return pb.ListReply(domains=doms)

    @rpc
    async def Lookup(self, request: pb.DomainRequest, context: Any) -> pb.Domain:
        return domain_msg(resolve(self.daemon, request.domain))

    @rpc
    async def GetXML(self, request: pb.GetXMLRequest, context: Any) -> pb.GetXMLReply:
        dom = resolve(self.daemon, request.domain)
        d = dom.config if request.inactive and dom.config is not None else dom.definition
        return pb.GetXMLReply(xml=format_domain_xml(d, migratable=request.migratable))

    @rpc
    async def GetInfo(self, request: pb.DomainRequest, context: Any) -> pb.DomainInfo:
        dom = resolve(self.daemon, request.domain)
        d = dom.definition
        return pb.DomainInfo(
            domain=domain_msg(dom),
            max_memory_kib=d.memory_kib,
            memory_kib=d.current_memory_kib,
            vcpus=d.vcpus,
            os_type=d.os_type,
        )

    @rpc
    async def GetState(self, request: pb.DomainRequest, context: Any) -> pb.DomainStateReply:
        dom = resolve(self.daemon, request.domain)
        return pb.DomainStateReply(
            state=int(dom.state),  # type: ignore[arg-type]
            reason=dom.reason,
            reason_name=dom.reason_label,
        )


def job_stats(progress: MigrationProgress, elapsed_ms: int, completed: bool) -> list[TypedParam]:
    """libvirt's job stats names for what the backend reports."""
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
        TypedParam("setup_time", u, progress.setup_time_ms),
    ]
    if completed:
        items.append(TypedParam("downtime", u, progress.downtime_ms))
    else:
        items.append(TypedParam("downtime", u, progress.expected_downtime_ms))
    return items


class MigrationService(pbg.MigrationServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _dom(self, ref: pb.DomainRef) -> DomainObj:
        return resolve(self.daemon, ref)

    # --- Begin ----------------------------------------------------------------------------------

    @rpc
    async def Begin3(self, request: pb.Begin3Request, context: Any) -> pb.Begin3Reply:
        params = legacy_params(xml=_opt(request, "xmlin"), dname=_opt(request, "dname"),
                               bandwidth=request.resource)
        xml, cookie = await migration.src_begin(
            self.daemon, self._dom(request.domain), params, request.flags, session_of(context)
        )
        return pb.Begin3Reply(xml=xml, cookie_out=cookie)

    @rpc
    async def Begin3Params(self, request: pb.Begin3ParamsRequest, context: Any) -> pb.Begin3Reply:
        xml, cookie = await migration.src_begin(
            self.daemon, self._dom(request.domain), from_wire(request.params), request.flags,
            session_of(context),
        )
        return pb.Begin3Reply(xml=xml, cookie_out=cookie)

    # --- Prepare --------------------------------------------------------------------------------

    @rpc
    async def Prepare3(self, request: pb.Prepare3Request, context: Any) -> pb.Prepare3Reply:
        params = legacy_params(xml=request.dom_xml, dname=_opt(request, "dname"),
                               uri=_opt(request, "uri_in"), bandwidth=request.resource)
        return self._prepared(
            await migration.dst_prepare(self.daemon, params, request.cookie_in, request.flags,
                                        session_of(context))
        )

    @rpc
    async def Prepare3Params(
        self, request: pb.Prepare3ParamsRequest, context: Any
    ) -> pb.Prepare3Reply:
        return self._prepared(
            await migration.dst_prepare(
                self.daemon, from_wire(request.params), request.cookie_in, request.flags,
                session_of(context),
            )
        )

    @staticmethod
    def _prepared(result: tuple[bytes, str | None]) -> pb.Prepare3Reply:
        cookie, uri_out = result
        reply = pb.Prepare3Reply(cookie_out=cookie)
        if uri_out is not None:
            reply.uri_out = uri_out
        return reply

    # --- Perform --------------------------------------------------------------------------------

    @rpc
    async def Perform3(self, request: pb.Perform3Request, context: Any) -> pb.Perform3Reply:
        params = legacy_params(xml=_opt(request, "xmlin"), dname=_opt(request, "dname"),
                               uri=_opt(request, "uri"), bandwidth=request.resource)
        cookie = await migration.src_perform(
            self.daemon, self._dom(request.domain), _opt(request, "dconnuri"), params,
            request.cookie_in, request.flags,
        )
        return pb.Perform3Reply(cookie_out=cookie)

    @rpc
    async def Perform3Params(
        self, request: pb.Perform3ParamsRequest, context: Any
    ) -> pb.Perform3Reply:
        cookie = await migration.src_perform(
            self.daemon, self._dom(request.domain), _opt(request, "dconnuri"),
            from_wire(request.params), request.cookie_in, request.flags,
        )
        return pb.Perform3Reply(cookie_out=cookie)

    # --- Finish ---------------------------------------------------------------------------------

    @rpc
    async def Finish3(self, request: pb.Finish3Request, context: Any) -> pb.Finish3Reply:
        params = legacy_params(dname=_opt(request, "dname"), uri=_opt(request, "uri"))
        dom, cookie = await migration.dst_finish(
            self.daemon, params, request.cookie_in, request.flags, request.cancelled
        )
        return pb.Finish3Reply(domain=domain_msg(dom), cookie_out=cookie)

    @rpc
    async def Finish3Params(
        self, request: pb.Finish3ParamsRequest, context: Any
    ) -> pb.Finish3Reply:
        dom, cookie = await migration.dst_finish(
            self.daemon, from_wire(request.params), request.cookie_in, request.flags,
            request.cancelled,
        )
        return pb.Finish3Reply(domain=domain_msg(dom), cookie_out=cookie)

    # --- Confirm --------------------------------------------------------------------------------

    @rpc
    async def Confirm3(self, request: pb.Confirm3Request, context: Any) -> pb.Confirm3Reply:
        await migration.src_confirm(
            self.daemon, self._dom(request.domain), TypedParams(), request.cookie_in,
            request.flags, request.cancelled,
        )
        return pb.Confirm3Reply()

    @rpc
    async def Confirm3Params(
        self, request: pb.Confirm3ParamsRequest, context: Any
    ) -> pb.Confirm3Reply:
        await migration.src_confirm(
            self.daemon, self._dom(request.domain), from_wire(request.params), request.cookie_in,
            request.flags, request.cancelled,
        )
        return pb.Confirm3Reply()

    # --- Jobs -----------------------------------------------------------------------------------

    @rpc
    async def GetJobInfo(self, request: pb.JobInfoRequest, context: Any) -> pb.JobInfo:
        dom = self._dom(request.domain)
        if request.completed:
            rec = dom.completed
            if rec is None:
                return pb.JobInfo(type=pb.JOB_TYPE_NONE)
            return _job_info(int(rec.type), int(rec.operation), rec.time_elapsed_ms,
                             rec.progress, completed=True, error=rec.error)
        job = dom.job
        if job is None:
            return pb.JobInfo(type=pb.JOB_TYPE_NONE)
        progress = job.progress
        if job.kind is AsyncJob.MIGRATION_OUT and job.phase is Phase.PERFORM3:
            live = self.daemon.backend.progress(dom.uuid)
            if live.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
                progress = live
        info = _job_info(int(JobType.UNBOUNDED), int(job.kind.operation), job.elapsed_ms(),
                         progress, completed=False)
        info.phase = job.phase.label
        return info


def _job_info(jtype: int, operation: int, elapsed: int, progress: MigrationProgress, *,
              completed: bool, error: str = "") -> pb.JobInfo:
    return pb.JobInfo(
        type=jtype,  # type: ignore[arg-type]
        operation=operation,
        time_elapsed_ms=elapsed,
        data_total=progress.total_bytes,
        data_processed=progress.processed_bytes,
        data_remaining=progress.remaining_bytes,
        mem_total=progress.total_bytes,
        mem_processed=progress.processed_bytes,
        mem_remaining=progress.remaining_bytes,
        stats=to_wire(job_stats(progress, elapsed, completed)),
        error=error,
    )


def add_services(server: grpc.aio.Server, daemon: Daemon) -> None:
    pbg.add_HostServicer_to_server(HostService(daemon), server)
    pbg.add_DomainsServicer_to_server(DomainsService(daemon), server)
    pbg.add_MigrationServicer_to_server(MigrationService(daemon), server)
