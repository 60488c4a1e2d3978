"""``migrate3`` and ``migrate_to_uri3``: libvirt's client-side checks, then the sequence driver.

The protocol is chosen from the daemons' features by the one function
:func:`~virtmig.client.sequence.choose_protocol` (libvirt's order: v3 with extensible parameters,
v3, v2).  The remote parties here adapt the sequence drivers to a daemon's RPCs: the ``*Params``
RPCs when both daemons advertise MIGRATION_PARAMS, otherwise the non-params v3 RPCs, which can
carry only URI, DEST_NAME, DEST_XML and BANDWIDTH; and protocol v2's GetXML (migratable),
Prepare2, Perform and Finish2.  The source learns its destination's daemon URI
(``virtmig.dest_uri``, :func:`with_dest_uri`) only in v3 with parameters: the other forms
cannot carry it.

Logs (logger ``virtmig.client``, INFO): a line per phase of a regular migration and one for
its outcome, each with the migration's id once a daemon's cookie gave it
(:mod:`virtmig.proto.migid`); a peer-to-peer migration's source daemon logs its phases, and
the client its start and outcome (the id from Perform's reply, or after a failure from the
source's job statistics).

A regular migration's round trips before Begin are few (issue 17): the caller's domain handle
is not looked up again, and both daemons' sessions are opened at once (:func:`open_sessions`).

The drivers work on :class:`~virtmig.client.rpc.RpcConnection`; ``AsyncConnection.migrate3`` and
``AsyncConnection.migrate_to_uri3`` (:mod:`virtmig.client.connection`) call them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from virtmig.client.rpc import RpcConnection
from virtmig.client.sequence import Trace, choose_protocol, run_v2, run_v3
from virtmig.client.values import Domain, DomainKey
from virtmig.proto import logsafe
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.compat import Layer, check_known_flags, check_rules
from virtmig.proto.errors import (
    ArgumentUnsupported,
    InternalError,
    InvalidArgument,
    NoDomain,
    OperationFailed,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, Feature, JobType, MigrateFlags, MigrationProtocol
from virtmig.proto.migid import MIGRATION_ID_STAT, is_migration_id
from virtmig.proto.params import (
    MIGRATION_PARAMS,
    MigrateParam,
    TypedParams,
    check_param_values,
)
from virtmig.proto.uri import check_not_local
from virtmig.proto.wire import to_wire

F = MigrateFlags
P = MigrateParam

# How long a call that an abort of the source's job may cancel (Finish) runs before the job is
# watched for one (a WatchJob stream): a watch per migration cost a 4 MiB test guest's
# migration ~14 % of the client's CPU and ~7 % of the daemons' (bench/README.md, session 12),
# and an abort asked for in the meantime is seen as the watch starts.
ABORT_WATCH_DELAY = 0.05
# After an interrupted Finish, how long the destination's job is waited for before its
# outcome counts as unknown: FINISHED_POLLS looks, FINISHED_POLL_S apart.
FINISHED_POLLS = 600
FINISHED_POLL_S = 0.05
client_log = logsafe.logger("virtmig.client")  # a line per phase, with the migration id


def _legacy(req: Any, params: TypedParams, **fields: str) -> None:
    """Non-params RPCs: set each optional request field whose param is present (libvirt's
    mapping of URI, DEST_NAME and DEST_XML to driver arguments; the daemon's inverse is
    ``virtmig.daemon.wire.legacy_params``)."""
    for field, name in fields.items():
        value = params.get_str(name)
        if value is not None:
            setattr(req, field, value)


class RemoteSource:
    def __init__(self, conn: RpcConnection, use_params: bool) -> None:
        self.conn = conn
        self.use_params = use_params

    async def begin(self, dom: str, params: TypedParams, flags: int) -> tuple[str, bytes]:
        ref = await self.conn.ref(dom)
        stub = self.conn.migration_stub
        if self.use_params:
            req_p = pb.Begin3ParamsRequest(domain=ref, params=to_wire(params), flags=flags)
            reply = await self.conn._call(stub.Begin3Params, req_p)
        else:
            req = pb.Begin3Request(domain=ref, flags=flags,
                                   resource=params.get_int(P.BANDWIDTH))
            _legacy(req, params, xmlin=P.DEST_XML, dname=P.DEST_NAME)
            reply = await self.conn._call(stub.Begin3, req)
        return reply.xml, reply.cookie_out

    async def get_state(self, dom: str) -> DomainState:
        state, _reason, _name = await self.conn.state(dom)
        return state

    async def perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes:
        ref = await self.conn.ref(dom)
        stub = self.conn.migration_stub
        if self.use_params:
            req_p = pb.Perform3ParamsRequest(domain=ref, params=to_wire(params),
                                             cookie_in=cookie, flags=flags)
            reply: pb.Perform3Reply = await self.conn._call(stub.Perform3Params, req_p)
        else:
            req = pb.Perform3Request(domain=ref, cookie_in=cookie, flags=flags,
                                     resource=params.get_int(P.BANDWIDTH))
            _legacy(req, params, xmlin=P.DEST_XML, uri=P.URI, dname=P.DEST_NAME)
            reply = await self.conn._call(stub.Perform3, req)
        return reply.cookie_out

    async def migratable_xml(self, dom: str) -> str:
        # (secure: the destination needs the guest's VNC password too, as libvirt's v2 flow)
        return await self.conn.xml_desc(dom, migratable=True, secure=True)

    async def perform2(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> None:
        req = pb.PerformRequest(domain=await self.conn.ref(dom), cookie_in=cookie, flags=flags,
                                resource=params.get_int(P.BANDWIDTH))
        _legacy(req, params, uri=P.URI, dname=P.DEST_NAME)
        await self.conn._call(self.conn.migration_stub.Perform, req)

    async def settle2(self, dom: str, migrated: bool | None) -> None:
        """Regular v2: Perform settled the source itself."""

    async def wait_abort(self, dom: str) -> None:
        # Watched only once the call it guards has run for ABORT_WATCH_DELAY: most Finish calls
        # end sooner and open no stream; an abort asked for before is in the first message.
        await asyncio.sleep(ABORT_WATCH_DELAY)
        # The job's messages as they come: only their abort flag is read (no JobInfo values).
        call = self.conn.migration_stub.WatchJob(pb.JobInfoRequest(domain=await self.conn.ref(dom)))
        async for info in self.conn._stream(call):
            if info.abort_requested:
                return
        await asyncio.Event().wait()  # the job ended without an abort: never return

    async def confirm(self, dom: str, params: TypedParams, cookie: bytes, flags: int,
                      cancelled: bool) -> None:
        ref = await self.conn.ref(dom)
        stub = self.conn.migration_stub
        if self.use_params:
            await self.conn._call(stub.Confirm3Params, pb.Confirm3ParamsRequest(
                domain=ref, params=to_wire(params), cookie_in=cookie, flags=flags,
                cancelled=cancelled))
        else:
            await self.conn._call(stub.Confirm3, pb.Confirm3Request(
                domain=ref, cookie_in=cookie, flags=flags, cancelled=cancelled))


class RemoteDest:
    def __init__(self, conn: RpcConnection, use_params: bool) -> None:
        self.conn = conn
        self.use_params = use_params
        # The domain as the last successful Finish's reply described it (libvirt's Finish3
        # returns the destination's domain too): migrate3 returns it without another Lookup.
        self.arrived: Domain | None = None

    def _alive(self) -> None:
        """The session with the destination ended (its daemon went away, perhaps restarted):
        a Prepare now would leave an incoming job no session owns, which nothing ends until
        ``incoming_job_timeout``.  libvirt never goes on over a dead destination connection."""
        if self.conn.session_lost.is_set():
            raise OperationFailed("Lost connection to destination host")

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        self._alive()
        stub = self.conn.migration_stub
        if self.use_params:
            reply = await self.conn._call(stub.Prepare3Params, pb.Prepare3ParamsRequest(
                params=to_wire(params), cookie_in=cookie, flags=flags))
        else:
            req = pb.Prepare3Request(cookie_in=cookie, flags=flags,
                                     resource=params.get_int(P.BANDWIDTH),
                                     dom_xml=params.get_str(P.DEST_XML) or "")
            _legacy(req, params, uri_in=P.URI, dname=P.DEST_NAME)
            reply = await self.conn._call(stub.Prepare3, req)
        return reply.cookie_out, reply.uri_out if reply.HasField("uri_out") else None

    async def prepare2(self, params: TypedParams, flags: int) -> tuple[bytes, str | None]:
        self._alive()
        req = pb.Prepare2Request(flags=flags, resource=params.get_int(P.BANDWIDTH),
                                 dom_xml=params.get_str(P.DEST_XML) or "")
        _legacy(req, params, uri_in=P.URI, dname=P.DEST_NAME)
        reply = await self.conn._call(self.conn.migration_stub.Prepare2, req)
        return reply.cookie_out, reply.uri_out if reply.HasField("uri_out") else None

    async def finish2(self, params: TypedParams, cookie: bytes, flags: int, retcode: int) -> str:
        req = pb.Finish2Request(dname=params.get_str(P.DEST_NAME) or "", cookie_in=cookie,
                                flags=flags, retcode=retcode)
        _legacy(req, params, uri=P.URI)
        reply = await self.conn._call(self.conn.migration_stub.Finish2, req)
        return str(reply.domain.name)

    async def finished(self, dname: str) -> bool:
        for _ in range(FINISHED_POLLS):
            try:  # (the incoming guest may go between the two calls: then it is gone)
                info = await self.conn.job_info(dname)
                if info.type is JobType.NONE:
                    # The state is read after the job is seen over: a rolled-back guest is
                    # shut off (or gone) by then, an arrived one runs.  Read before, it could
                    # be the state of the job's last moment (a guest still paused in Finish).
                    return (await self.conn.lookup(dname)).state is not DomainState.SHUTOFF
            except NoDomain:
                return False
            await asyncio.sleep(FINISHED_POLL_S)
        # Neither arrived nor rolled back: nobody knows yet (the caller leaves the source
        # paused, or its Confirm(cancelled) asks the destination again).
        raise OperationFailed(
            f"the destination's job for '{dname}' has not ended after "
            f"{FINISHED_POLLS * FINISHED_POLL_S:g} s: whether the guest runs there is unknown")

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        stub = self.conn.migration_stub
        if self.use_params:
            reply = await self.conn._call(stub.Finish3Params, pb.Finish3ParamsRequest(
                params=to_wire(params), cookie_in=cookie, flags=flags, cancelled=cancelled))
        else:
            req = pb.Finish3Request(cookie_in=cookie, flags=flags, cancelled=cancelled)
            _legacy(req, params, dname=P.DEST_NAME, uri=P.URI)
            reply = await self.conn._call(stub.Finish3, req)
        if reply.domain.name and reply.domain.uuid:
            self.arrived = Domain.from_msg(reply.domain)
        return reply.domain.name, reply.cookie_out


def check_param_types(params: TypedParams) -> None:
    """Names, types and values against the table (libvirt's client validates what it sends;
    the daemon checks them again with the same table)."""
    for p in params:
        spec = MIGRATION_PARAMS.get(p.name)
        if spec is None:
            raise InvalidArgument(f"parameter '{p.name}' not supported")
        if spec.type is not p.type:
            raise InvalidArgument(
                f"invalid type '{p.type.value}' for parameter '{p.name}', "
                f"expected '{spec.type.value}'"
            )
    check_param_values(params)


def with_dest_uri(params: TypedParams, dconn: RpcConnection) -> TypedParams:
    """``params`` with ``virtmig.dest_uri``: the destination daemon's URI as this client used
    it (a network URI, its ``pkipath`` left out), which the source records to ask that daemon
    later where the guest runs; a URI the caller gave, or a unix socket's, is left alone."""
    uri = dconn.uri
    if P.DEST_URI in params or uri.transport == "unix":
        return params
    out = params.copy()
    out.set(P.DEST_URI, str(dataclasses.replace(uri, pki_dir="")))
    return out


async def migrate3(
    conn: RpcConnection, key: DomainKey, dconn: RpcConnection, params: TypedParams,
    flags: int, *, trace: Trace | None = None,
) -> Domain:
    """libvirt's virDomainMigrate3: its checks, the protocol (:func:`choose_protocol`), then
    the sequence driver of that protocol; ``trace`` gets the calls and the protocol."""
    f = check_known_flags(flags, "virDomainMigrate3")
    check_rules(f, params, Layer.CLIENT)
    check_param_types(params)
    if f & F.PEER2PEER:
        raise InvalidArgument("use virDomainMigrateToURI3 for peer-to-peer migration")
    if f & F.TUNNELLED:
        raise InvalidArgument("cannot perform tunnelled migration without using peer2peer flag")
    src_host, dst_host = await conn.host(), await dconn.host()
    if f & F.OFFLINE:
        if Feature.OFFLINE not in src_host.features:
            raise ArgumentUnsupported("offline migration is not supported by the source host")
        if Feature.OFFLINE not in dst_host.features:
            raise ArgumentUnsupported(
                "offline migration is not supported by the destination host"
            )
    protection = Feature.CHANGE_PROTECTION in src_host.features
    if f & F.CHANGE_PROTECTION and not protection:
        raise ArgumentUnsupported("cannot enforce change protection")
    f &= ~F.CHANGE_PROTECTION  # re-added for the source's v3 calls only
    protocol = choose_protocol(src_host.features, dst_host.features, params, int(f))
    t = trace if trace is not None else Trace()
    t.protocol = protocol.value
    if protocol is MigrationProtocol.V3_PARAMS:
        # Only the *Params RPCs carry it (v3 without params and v2 refuse extended params).
        params = with_dest_uri(params, dconn)
    # A handle the caller looked up names the domain already (Begin fails if it went since).
    dom = key if isinstance(key, Domain) else await conn.lookup(key)
    await open_sessions(conn, dconn)
    use_params = protocol is MigrationProtocol.V3_PARAMS
    src, dst = RemoteSource(conn, use_params), RemoteDest(dconn, use_params)
    t.domain, t.announce = dom.name, True
    try:
        if protocol is MigrationProtocol.V2:
            name = await run_v2(src, dst, dom.name, params, int(f), trace=t)
        else:
            name = await run_v3(src, dst, dom.name, params, int(f), protection=protection,
                                trace=t)
    except VirtmigError as exc:
        _log_outcome(t, exc)
        raise
    _log_outcome(t, None)
    if dst.arrived is not None and dst.arrived.name == name:
        return dst.arrived  # Finish's reply: no Lookup round trip
    return await dconn.lookup(name)


async def open_sessions(conn: RpcConnection, dconn: RpcConnection) -> None:
    """Both daemons' sessions, opened at once (one round trip instead of two); a failure is
    the source's first, as if they were opened one after the other (a session that did open is
    closed with its connection)."""
    if dconn is conn:
        await conn.open_session()
        return
    loop = asyncio.get_running_loop()
    src, dst = loop.create_task(conn.open_session()), loop.create_task(dconn.open_session())
    try:
        await src
    except BaseException:
        dst.cancel()
        await asyncio.gather(src, dst, return_exceptions=True)
        raise
    await dst


def _log_outcome(t: Trace, error: VirtmigError | None) -> None:
    """The client's last line of a migration, at INFO, with its id."""
    if error is None:
        client_log.info("migration %s of %s: succeeded (protocol %s)",
                        t.migration_id or "(id unknown)", t.domain, t.protocol)
    else:
        client_log.info("migration %s of %s: failed (protocol %s): %s",
                        t.migration_id or "(id unknown)", t.domain, t.protocol, error)


async def _p2p_migration_id(conn: RpcConnection, key: DomainKey) -> str:
    """After a failed peer-to-peer call (no reply): the id of the migration the source ran,
    from its last job's statistics ("" if it cannot tell)."""
    try:
        info = await conn.job_info(key, completed=True)
    except VirtmigError as exc:
        client_log.debug("cannot read the migration id of %s: %s", key, exc)
        return ""
    mid = info.stat(MIGRATION_ID_STAT)
    return mid if isinstance(mid, str) and is_migration_id(mid) else ""


async def migrate_to_uri3(
    conn: RpcConnection, key: DomainKey, dconnuri: str | None, params: TypedParams,
    flags: int, *, trace: Trace | None = None,
) -> None:
    """libvirt's virDomainMigrateToURI3 (peer-to-peer): one Perform call on the source, in the
    newest form the source speaks; ``trace.protocol`` gets the protocol the source then used
    with the destination, ``trace.migration_id`` the migration's id (logged at INFO)."""
    f = check_known_flags(flags, "virDomainMigrateToURI3")
    check_rules(f, params, Layer.CLIENT)
    check_param_types(params)
    features = (await conn.host()).features
    if f & F.TUNNELLED and not f & F.PEER2PEER:
        raise InvalidArgument("cannot perform tunnelled migration without using peer2peer flag")
    if not f & F.PEER2PEER:
        raise ArgumentUnsupported("direct migration is not supported by the source host")
    if not dconnuri:
        raise InvalidArgument("dconnuri in virDomainMigrateToURI3 must not be NULL")
    if Feature.P2P not in features:
        raise ArgumentUnsupported("p2p migration is not supported by the source host")
    if f & F.OFFLINE and Feature.OFFLINE not in features:
        raise ArgumentUnsupported("offline migration is not supported by the source host")
    check_not_local(dconnuri)
    # The call to the source: the choice with the source on both sides.
    protocol = choose_protocol(features, features, params, int(f & ~F.CHANGE_PROTECTION))
    if protocol is MigrationProtocol.V2 and P.URI in params:
        raise InternalError("Unable to override peer2peer migration URI")
    t = trace if trace is not None else Trace()
    t.domain = key.name if isinstance(key, Domain) else str(key)
    client_log.info("migration of %s: peer-to-peer to %s (the source daemon runs it)",
                    t.domain, dconnuri)
    try:
        t.protocol, mid = await _perform_p2p(conn, key, dconnuri, params, f, protocol)
    except VirtmigError as exc:
        t.migration_id = await _p2p_migration_id(conn, key)
        _log_outcome(t, exc)
        raise
    t.migration_id = mid if is_migration_id(mid) else ""
    _log_outcome(t, None)


async def _perform_p2p(conn: RpcConnection, key: DomainKey, dconnuri: str, params: TypedParams,
                       f: MigrateFlags, protocol: MigrationProtocol) -> tuple[str, str]:
    """The one peer-to-peer call, in ``protocol``'s form; the protocol the source used and the
    migration's id (both "" from a source that does not say)."""
    ref = await conn.ref(key)
    stub = conn.migration_stub
    if protocol is MigrationProtocol.V3_PARAMS:
        reply = await conn._call(stub.Perform3Params, pb.Perform3ParamsRequest(
            domain=ref, dconnuri=dconnuri, params=to_wire(params), flags=int(f)))
        return str(reply.protocol), str(reply.migration_id)
    if protocol is MigrationProtocol.V3:
        req = pb.Perform3Request(domain=ref, dconnuri=dconnuri, flags=int(f),
                                 resource=params.get_int(P.BANDWIDTH))
        _legacy(req, params, xmlin=P.DEST_XML, uri=P.URI, dname=P.DEST_NAME)
        reply = await conn._call(stub.Perform3, req)
        return str(reply.protocol), str(reply.migration_id)
    # v2: ``uri`` carries the destination daemon's URI (libvirt's MigrateUnmanagedProto2).
    req2 = pb.PerformRequest(domain=ref, uri=dconnuri, flags=int(f & ~F.CHANGE_PROTECTION),
                             resource=params.get_int(P.BANDWIDTH))
    _legacy(req2, params, dname=P.DEST_NAME)
    reply2 = await conn._call(stub.Perform, req2)
    return str(reply2.protocol), str(reply2.migration_id)
