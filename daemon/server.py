"""The gRPC services: Host, Domains and Migration, over one :class:`~virtmig.daemon.core.Daemon`.

Servicer methods are thin: request -> :mod:`~virtmig.daemon.wire` -> core call -> ``wire`` ->
reply.  Each migration RPC first checks that the daemon speaks its protocol
(``Daemon.speaks``: ``migration_protocols``, ``migration_params``), as an older daemon without
it would refuse it; a Prepare also checks that a TUNNELLED stream would not ride a plain TCP
connection under ``migrate_tls_force`` (:func:`check_tunnel_transport`, which needs the call's
connection).  They neither build messages nor map errors: an exception raised here
becomes a gRPC status in the server interceptor (:mod:`virtmig.daemon.interceptor`), for every
handler alike.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import grpc

from virtmig.daemon import jobctl, lifecycle, locate, migration, p2p, tunnel, wire
from virtmig.daemon.authz import Policy
from virtmig.daemon.core import Daemon
from virtmig.daemon.domxml import format_domain_xml
from virtmig.daemon.health import GenericOnly, add_observability
from virtmig.daemon.interceptor import StatusInterceptor
from virtmig.daemon.migration.common import TLS_FORCED
from virtmig.daemon.registry import DomainObj
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto import virtmig_pb2_grpc as pbg
from virtmig.proto.errors import OperationInvalid
from virtmig.proto.flags import Feature, MigrateFlags, MigrationProtocol
from virtmig.proto.params import TypedParams

SESSION_METADATA_KEY = "virtmig-session"
_V3, _V3_PARAMS = MigrationProtocol.V3.value, MigrationProtocol.V3_PARAMS.value
DEFAULT_HEARTBEAT_S = 5


def session_of(context: Any) -> str:
    """The caller's session id from the call metadata ("" when it named none)."""
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def check_tunnel_transport(daemon: Daemon, flags: int, context: Any) -> None:
    """``migrate_tls_force`` on a destination: a TUNNELLED Prepare over a plain TCP connection
    (a ``listen_insecure_tcp`` listener) is refused, since the stream would ride that same
    connection in clear; over TLS or the local unix socket it is accepted, as libvirt does."""
    if not (flags & MigrateFlags.TUNNELLED and daemon.config.migrate_tls_force):
        return
    auth = context.auth_context() or {}
    if any(v == b"ssl" for v in auth.get("transport_security_type", ())):
        return
    if str(context.peer() or "").startswith(("ipv4:", "ipv6:")):
        raise OperationInvalid(
            f"{TLS_FORCED}: a tunnelled migration is protected by the TLS of the connection it "
            "rides, and this one is plain TCP")


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
            yield wire.session_event(session)
            while True:
                await asyncio.sleep(interval)
                yield wire.session_event(session)
        finally:
            # The handler is being cancelled: run the cleanup as its own task.
            task = asyncio.get_running_loop().create_task(
                migration.any_session_closed(self.daemon, session)
            )
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def GetHost(self, request: pb.GetHostRequest, context: Any) -> pb.HostInfo:
        return wire.host_info_msg(self.daemon.host_info())


class DomainsService(pbg.DomainsServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def _dom(self, ref: pb.DomainRef) -> DomainObj:
        return wire.resolve(self.daemon.registry, ref)

    async def Define(self, request: pb.DefineRequest, context: Any) -> pb.Domain:
        return wire.domain_msg(await lifecycle.define(self.daemon, request.xml))

    async def Undefine(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.undefine(self.daemon, self._dom(request.domain))
        return wire.empty()

    async def Start(self, request: pb.StartRequest, context: Any) -> pb.Domain:
        dom = self._dom(request.domain)
        await lifecycle.start(self.daemon, dom, paused=request.paused, force=request.force)
        return wire.domain_msg(dom)

    async def Destroy(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.destroy(self.daemon, self._dom(request.domain))
        return wire.empty()

    async def Suspend(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.suspend(self.daemon, self._dom(request.domain))
        return wire.empty()

    async def Resume(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await lifecycle.resume(self.daemon, self._dom(request.domain))
        return wire.empty()

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListReply:
        return wire.domain_list_msg(self._listing(request))

    async def ListStream(self, request: pb.ListRequest,
                         context: Any) -> AsyncIterator[pb.ListReply]:
        for chunk in wire.domain_list_chunks(self._listing(request)):
            yield chunk

    def _listing(self, request: pb.ListRequest) -> list[DomainObj]:
        return self.daemon.registry.listing(active=request.active or not request.inactive,
                                            inactive=request.inactive)

    async def Lookup(self, request: pb.DomainRequest, context: Any) -> pb.Domain:
        return wire.domain_msg(self._dom(request.domain))

    async def GetXML(self, request: pb.GetXMLRequest, context: Any) -> pb.GetXMLReply:
        dom = self._dom(request.domain)
        d = dom.config if request.inactive and dom.config is not None else dom.definition
        return wire.xml_msg(format_domain_xml(d, migratable=request.migratable,
                                              secure=request.secure))

    async def GetInfo(self, request: pb.DomainRequest, context: Any) -> pb.DomainInfo:
        dom = self._dom(request.domain)
        return wire.domain_info_msg(dom, self.daemon.backend.cpu_time_ns(dom.uuid))

    async def Events(self, request: pb.EventsRequest, context: Any) -> AsyncIterator[pb.Event]:
        uuid = self._dom(request.domain).uuid if request.HasField("domain") else ""
        with self.daemon.events.subscribe(uuid) as queue:
            while True:
                yield wire.event_msg(await queue.get())

    async def GetState(self, request: pb.DomainRequest, context: Any) -> pb.DomainStateReply:
        dom = self._dom(request.domain)
        return wire.domain_state_msg(dom, locate.note(self.daemon, dom.uuid))

    async def GuestLocation(self, request: pb.GuestLocationRequest,
                            context: Any) -> pb.GuestLocationReply:
        return wire.guest_location_msg(locate.answer(self.daemon, request.uuid,
                                                     request.migration_id))

    async def ResolveMigration(self, request: pb.ResolveMigrationRequest,
                               context: Any) -> pb.DomainStateReply:
        dom = self._dom(request.domain)
        await locate.resolve(self.daemon, dom, request.dest_uri)
        return wire.domain_state_msg(dom, locate.note(self.daemon, dom.uuid))


class MigrationService(pbg.MigrationServicer):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._p2p: set[asyncio.Task[p2p.P2PRun]] = set()

    def _dom(self, ref: pb.DomainRef) -> DomainObj:
        return wire.resolve(self.daemon.registry, ref)

    # --- Begin ----------------------------------------------------------------------------------

    async def Begin3(self, request: pb.Begin3Request, context: Any) -> pb.Begin3Reply:
        self.daemon.speaks(Feature.V3, "virDomainMigrateBegin3")
        xml, cookie = await migration.src_begin(
            self.daemon, self._dom(request.domain), wire.begin3_params(request), request.flags,
            session_of(context), _V3,
        )
        return wire.begin3_reply(xml, cookie)

    async def Begin3Params(self, request: pb.Begin3ParamsRequest, context: Any) -> pb.Begin3Reply:
        self.daemon.speaks(Feature.MIGRATION_PARAMS, "virDomainMigrateBegin3Params")
        xml, cookie = await migration.src_begin(
            self.daemon, self._dom(request.domain), wire.typed_params(request.params),
            request.flags, session_of(context), _V3_PARAMS,
        )
        return wire.begin3_reply(xml, cookie)

    # --- Prepare --------------------------------------------------------------------------------

    async def Prepare3(self, request: pb.Prepare3Request, context: Any) -> pb.Prepare3Reply:
        self.daemon.speaks(Feature.V3, "virDomainMigratePrepare3")
        check_tunnel_transport(self.daemon, request.flags, context)
        return wire.prepare3_reply(*await migration.dst_prepare(
            self.daemon, wire.prepare3_params(request), request.cookie_in, request.flags,
            session_of(context), _V3,
        ))

    async def Prepare3Params(
        self, request: pb.Prepare3ParamsRequest, context: Any
    ) -> pb.Prepare3Reply:
        self.daemon.speaks(Feature.MIGRATION_PARAMS, "virDomainMigratePrepare3Params")
        check_tunnel_transport(self.daemon, request.flags, context)
        return wire.prepare3_reply(*await migration.dst_prepare(
            self.daemon, wire.typed_params(request.params), request.cookie_in, request.flags,
            session_of(context), _V3_PARAMS,
        ))

    # --- Perform --------------------------------------------------------------------------------

    async def Perform3(self, request: pb.Perform3Request, context: Any) -> pb.Perform3Reply:
        self.daemon.speaks(Feature.V3, "virDomainMigratePerform3")
        return await self._perform(request.domain, wire.optional(request, "dconnuri"),
                                   wire.perform3_params(request), request.cookie_in,
                                   request.flags, session_of(context), _V3)

    async def Perform3Params(
        self, request: pb.Perform3ParamsRequest, context: Any
    ) -> pb.Perform3Reply:
        self.daemon.speaks(Feature.MIGRATION_PARAMS, "virDomainMigratePerform3Params")
        return await self._perform(request.domain, wire.optional(request, "dconnuri"),
                                   wire.typed_params(request.params), request.cookie_in,
                                   request.flags, session_of(context), _V3_PARAMS)

    async def _perform(self, ref: pb.DomainRef, dconnuri: str | None, params: TypedParams,
                       cookie: bytes, flags: int, session: str,
                       protocol: str) -> pb.Perform3Reply:
        dom = self._dom(ref)
        if not flags & (MigrateFlags.PEER2PEER | MigrateFlags.TUNNELLED):
            return wire.perform3_reply(await migration.src_perform(
                self.daemon, dom, dconnuri, params, cookie, flags, owner=session,
                protocol=protocol))
        run = await self._p2p_run(dom, dconnuri, params, cookie, flags)
        return wire.perform3_reply(protocol=run.protocol, migration_id=run.migration_id)

    async def _p2p_run(self, dom: DomainObj, dconnuri: str | None, params: TypedParams,
                       cookie: bytes, flags: int) -> p2p.P2PRun:
        """Peer-to-peer: the whole migration runs here.  It goes on if the caller disconnects
        (as libvirt's does); the caller follows it through the source's job.  Returns the
        protocol the run used with the destination and the migration's id."""
        task = asyncio.get_running_loop().create_task(
            p2p.src_perform_p2p(self.daemon, dom, dconnuri, params, cookie, flags))
        self._p2p.add(task)
        task.add_done_callback(self._p2p.discard)
        return await asyncio.shield(task)

    # --- Finish ---------------------------------------------------------------------------------

    async def Finish3(self, request: pb.Finish3Request, context: Any) -> pb.Finish3Reply:
        self.daemon.speaks(Feature.V3, "virDomainMigrateFinish3")
        return wire.finish3_reply(*await migration.dst_finish(
            self.daemon, wire.finish3_params(request), request.cookie_in, request.flags,
            request.cancelled,
        ))

    async def Finish3Params(
        self, request: pb.Finish3ParamsRequest, context: Any
    ) -> pb.Finish3Reply:
        self.daemon.speaks(Feature.MIGRATION_PARAMS, "virDomainMigrateFinish3Params")
        return wire.finish3_reply(*await migration.dst_finish(
            self.daemon, wire.typed_params(request.params), request.cookie_in, request.flags,
            request.cancelled,
        ))

    # --- Confirm --------------------------------------------------------------------------------

    async def Confirm3(self, request: pb.Confirm3Request, context: Any) -> pb.Confirm3Reply:
        self.daemon.speaks(Feature.V3, "virDomainMigrateConfirm3")
        await migration.src_confirm(
            self.daemon, self._dom(request.domain), TypedParams(), request.cookie_in,
            request.flags, request.cancelled,
        )
        return wire.confirm3_reply()

    async def Confirm3Params(
        self, request: pb.Confirm3ParamsRequest, context: Any
    ) -> pb.Confirm3Reply:
        self.daemon.speaks(Feature.MIGRATION_PARAMS, "virDomainMigrateConfirm3Params")
        await migration.src_confirm(
            self.daemon, self._dom(request.domain), wire.typed_params(request.params),
            request.cookie_in, request.flags, request.cancelled,
        )
        return wire.confirm3_reply()

    # --- Protocol v2 ---------------------------------------------------------------------------

    async def Prepare2(self, request: pb.Prepare2Request, context: Any) -> pb.Prepare2Reply:
        self.daemon.speaks(Feature.V2, "virDomainMigratePrepare2")
        check_tunnel_transport(self.daemon, request.flags, context)
        return wire.prepare2_reply(*await migration.dst_prepare2(
            self.daemon, wire.prepare2_params(request), request.flags, session_of(context)))

    async def Perform(self, request: pb.PerformRequest, context: Any) -> pb.PerformReply:
        self.daemon.speaks(Feature.V2, "virDomainMigratePerform")
        dom = self._dom(request.domain)
        if not request.flags & (MigrateFlags.PEER2PEER | MigrateFlags.TUNNELLED):
            await migration.src_perform2(self.daemon, dom, wire.perform2_params(request),
                                         request.cookie_in, request.flags,
                                         owner=session_of(context))
            return wire.perform_reply()
        # libvirt's v2 Perform with PEER2PEER: ``uri`` is the destination daemon's URI.
        run = await self._p2p_run(dom, wire.optional(request, "uri"),
                                  wire.perform2_p2p_params(request), request.cookie_in,
                                  request.flags)
        return wire.perform_reply(run.protocol, run.migration_id)

    async def Finish2(self, request: pb.Finish2Request, context: Any) -> pb.Finish2Reply:
        self.daemon.speaks(Feature.V2, "virDomainMigrateFinish2")
        return wire.finish2_reply(await migration.dst_finish2(
            self.daemon, wire.finish2_params(request), request.flags, request.retcode))

    # --- Jobs ---------------------------------------------------------------------------------

    async def GetJobInfo(self, request: pb.JobInfoRequest, context: Any) -> pb.JobInfo:
        return wire.job_info_msg(jobctl.job_info(self.daemon, self._dom(request.domain),
                                                 completed=request.completed))

    async def WatchJob(self, request: pb.JobInfoRequest,
                       context: Any) -> AsyncIterator[pb.JobInfo]:
        async for info in jobctl.watch(self.daemon, self._dom(request.domain)):
            yield wire.job_info_msg(info)

    async def Tunnel(self, request_iterator: AsyncIterator[pb.TunnelChunk],
                     context: Any) -> AsyncIterator[pb.TunnelChunk]:
        async for chunk in tunnel.dst_tunnel(self.daemon, request_iterator):
            yield chunk

    async def AbortJob(self, request: pb.AbortJobRequest, context: Any) -> pb.Empty:
        await jobctl.abort(self.daemon, self._dom(request.domain), request.flags)
        return wire.empty()

    async def SetMaxDowntime(self, request: pb.DowntimeRequest, context: Any) -> pb.Empty:
        await jobctl.set_max_downtime(self.daemon, self._dom(request.domain), request.downtime_ms)
        return wire.empty()

    async def GetMaxDowntime(self, request: pb.DomainRequest, context: Any) -> pb.DowntimeReply:
        return wire.downtime_reply(
            jobctl.get_max_downtime(self.daemon, self._dom(request.domain)))

    async def SetMaxSpeed(self, request: pb.SpeedRequest, context: Any) -> pb.Empty:
        await jobctl.set_max_speed(self.daemon, self._dom(request.domain), request.bandwidth_mib,
                                   request.flags)
        return wire.empty()

    async def GetMaxSpeed(self, request: pb.SpeedRequest, context: Any) -> pb.SpeedReply:
        return wire.speed_reply(jobctl.get_max_speed(self._dom(request.domain), request.flags))

    async def GetCompressionCache(self, request: pb.CompressionCacheRequest,
                                  context: Any) -> pb.CompressionCacheReply:
        return pb.CompressionCacheReply(cache_size=await jobctl.get_compression_cache(
            self.daemon, self._dom(request.domain), request.flags))

    async def SetCompressionCache(self, request: pb.CompressionCacheRequest,
                                  context: Any) -> pb.Empty:
        await jobctl.set_compression_cache(self.daemon, self._dom(request.domain),
                                           request.cache_size, request.flags)
        return wire.empty()

    async def StartPostCopy(self, request: pb.DomainRequest, context: Any) -> pb.Empty:
        await jobctl.start_postcopy(self.daemon, self._dom(request.domain))
        return wire.empty()

    async def GetHistory(self, request: pb.HistoryRequest, context: Any) -> pb.HistoryReply:
        entries = self.daemon.history.read(request.domain[:256], request.limit)
        return wire.history_reply(entries)


def make_server(daemon: Daemon, options: list[tuple[str, Any]] | None = None,
                policy: Policy | None = None, *,
                interceptor: StatusInterceptor | None = None) -> grpc.aio.Server:
    """A server with the daemon's services, every handler behind the interceptor, which
    authorizes each call by ``policy`` (default: :class:`~virtmig.daemon.authz.Policy`) and
    admits it within the daemon's call limits (``daemon.calls``, shared by its servers).
    ``interceptor``: that interceptor, made by the caller (who may change its ``policy`` later:
    a SIGHUP reload); ``policy`` is then not used."""
    gate = interceptor or StatusInterceptor(policy, daemon.calls, daemon.metrics)
    server = grpc.aio.server(options=options, interceptors=[gate])
    add_services(server, daemon)
    return server


def add_services(server: grpc.aio.Server, daemon: Daemon) -> None:
    """virtmig's services, the gRPC health service (``daemon.health``) and server reflection,
    as generic handlers only (:class:`GenericOnly`)."""
    generic: Any = GenericOnly(server)
    pbg.add_HostServicer_to_server(HostService(daemon), generic)
    pbg.add_DomainsServicer_to_server(DomainsService(daemon), generic)
    pbg.add_MigrationServicer_to_server(MigrationService(daemon), generic)
    add_observability(server, daemon.health)
