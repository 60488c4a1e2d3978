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

from virtmig.daemon import jobctl, lifecycle, migration, p2p, tunnel
from virtmig.daemon.core import VERSION, Daemon
from virtmig.daemon.domxml import format_domain_xml
from virtmig.daemon.registry import DomainObj
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto import virtmig_pb2_grpc as pbg
from virtmig.proto.errors import InvalidArgument, to_status
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.proto.wire import from_wire

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

    async def Events(self, request: pb.EventsRequest, context: Any) -> AsyncIterator[pb.Event]:
        uuid = ""
        if request.HasField("domain"):
            try:
                uuid = resolve(self.daemon, request.domain).uuid
            except Exception as exc:
                await _abort_stream(context, exc)
                return
        with self.daemon.events.subscribe(uuid) as queue:
            while True:
                yield await queue.get()

    @rpc
    async def GetState(self, request: pb.DomainRequest, context: Any) -> pb.DomainStateReply:
        dom = resolve(self.daemon, request.domain)
        return pb.DomainStateReply(
            state=int(dom.state),  # type: ignore[arg-type]
            reason=dom.reason,
            reason_name=dom.reason_label,
        )


class MigrationService(pbg.MigrationServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._p2p: set[asyncio.Task[None]] = set()

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
        return await self._perform(request.domain, _opt(request, "dconnuri"), params,
                                   request.cookie_in, request.flags)

    @rpc
    async def Perform3Params(
        self, request: pb.Perform3ParamsRequest, context: Any
    ) -> pb.Perform3Reply:
        return await self._perform(request.domain, _opt(request, "dconnuri"),
                                   from_wire(request.params), request.cookie_in, request.flags)

    async def _perform(self, ref: pb.DomainRef, dconnuri: str | None, params: TypedParams,
                       cookie: bytes, flags: int) -> pb.Perform3Reply:
        dom = self._dom(ref)
        if not flags & (MigrateFlags.PEER2PEER | MigrateFlags.TUNNELLED):
            return pb.Perform3Reply(cookie_out=await migration.src_perform(
                self.daemon, dom, dconnuri, params, cookie, flags))
        # Peer-to-peer: the whole migration runs here.  It goes on if the caller disconnects
        # (as libvirt's does); the caller follows it through the source's job.
        task = asyncio.get_running_loop().create_task(
            p2p.src_perform_p2p(self.daemon, dom, dconnuri, params, cookie, flags))
        self._p2p.add(task)
        task.add_done_callback(self._p2p.discard)
        await asyncio.shield(task)
        return pb.Perform3Reply()

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

    # --- Jobs ---------------------------------------------------------------------------------

    @rpc
    async def GetJobInfo(self, request: pb.JobInfoRequest, context: Any) -> pb.JobInfo:
        return jobctl.job_info(self.daemon, self._dom(request.domain),
                               completed=request.completed)

    async def WatchJob(self, request: pb.JobInfoRequest,
                       context: Any) -> AsyncIterator[pb.JobInfo]:
        try:
            dom = self._dom(request.domain)
        except Exception as exc:
            await _abort_stream(context, exc)
            return
        async for info in jobctl.watch(self.daemon, dom):
            yield info

    async def Tunnel(self, request_iterator: AsyncIterator[pb.TunnelChunk],
                     context: Any) -> AsyncIterator[pb.TunnelChunk]:
        try:
            async for chunk in tunnel.dst_tunnel(self.daemon, request_iterator):
                yield chunk
        except Exception as exc:
            await _abort_stream(context, exc)

    @rpc
    async def AbortJob(self, request: pb.AbortJobRequest, context: Any) -> pb.Empty:
        await jobctl.abort(self.daemon, self._dom(request.domain), request.flags)
        return pb.Empty()

    @rpc
    async def SetMaxDowntime(self, request: pb.DowntimeRequest, context: Any) -> pb.Empty:
        await jobctl.set_max_downtime(self.daemon, self._dom(request.domain), request.downtime_ms)
        return pb.Empty()

    @rpc
    async def GetMaxDowntime(self, request: pb.DomainRequest, context: Any) -> pb.DowntimeReply:
        return pb.DowntimeReply(
            downtime_ms=jobctl.get_max_downtime(self.daemon, self._dom(request.domain)))

    @rpc
    async def SetMaxSpeed(self, request: pb.SpeedRequest, context: Any) -> pb.Empty:
        await jobctl.set_max_speed(self.daemon, self._dom(request.domain), request.bandwidth_mib,
                                   request.flags)
        return pb.Empty()

    @rpc
    async def GetMaxSpeed(self, request: pb.SpeedRequest, context: Any) -> pb.SpeedReply:
        return pb.SpeedReply(
            bandwidth_mib=jobctl.get_max_speed(self._dom(request.domain), request.flags))

    @rpc
    async def StartPostCopy(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await jobctl.start_postcopy(self.daemon, self._dom(request.domain))
        return pb.Empty()


async def _abort_stream(context: Any, exc: BaseException) -> None:
    """Streaming handlers map errors the same way as unary ones."""
    code, details, trailers = to_status(exc)
    context.set_trailing_metadata(trailers)
    await context.abort(code, details)


def add_services(server: grpc.aio.Server, daemon: Daemon) -> None:
    pbg.add_HostServicer_to_server(HostService(daemon), server)
    pbg.add_DomainsServicer_to_server(DomainsService(daemon), server)
    pbg.add_MigrationServicer_to_server(MigrationService(daemon), server)
