"""``migrate3`` and ``migrate_to_uri3``: libvirt's client-side checks, then the sequence driver.

The remote parties here adapt the sequence driver to a daemon's RPCs: the ``*Params`` RPCs when
both daemons advertise MIGRATION_PARAMS, otherwise the non-params v3 RPCs, which can carry only
URI, DEST_NAME, DEST_XML and BANDWIDTH.

The drivers work on :class:`~virtmig.client.rpc.RpcConnection`; ``AsyncConnection.migrate3`` and
``AsyncConnection.migrate_to_uri3`` (:mod:`virtmig.client.connection`) call them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from virtmig.client.rpc import RpcConnection
from virtmig.client.sequence import Trace, run_v3
from virtmig.client.values import Domain, DomainKey
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.compat import Layer, check_known_flags, check_rules
from virtmig.proto.errors import ArgumentUnsupported, InvalidArgument, NoDomain, NoSupport
from virtmig.proto.flags import DomainState, Feature, JobType, MigrateFlags
from virtmig.proto.params import (
    MIGRATION_PARAMS,
    NON_PARAMS_ALLOWED,
    MigrateParam,
    TypedParams,
    check_param_values,
)
from virtmig.proto.uri import check_not_local
from virtmig.proto.wire import to_wire

F = MigrateFlags
P = MigrateParam


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

    async def wait_abort(self, dom: str) -> None:
        async for info in self.conn.watch_job(dom):
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

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
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

    async def finished(self, dname: str) -> bool:
        for _ in range(600):
            try:  # (the incoming guest may go between the two calls: then it is gone)
                dom = await self.conn.lookup(dname)
                info = await self.conn.job_info(dname)
            except NoDomain:
                return False
            if info.type is JobType.NONE:
                return dom.state is not DomainState.SHUTOFF
            await asyncio.sleep(0.05)
        return False

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
    if Feature.V3 not in src_host.features or Feature.V3 not in dst_host.features:
        raise NoSupport("migration protocol v3")
    use_params = (Feature.MIGRATION_PARAMS in src_host.features
                  and Feature.MIGRATION_PARAMS in dst_host.features)
    if not use_params and params.names() - NON_PARAMS_ALLOWED:
        raise ArgumentUnsupported(
            "Migration APIs with extensible parameters are not supported but extended "
            "parameters were passed"
        )
    if use_params:
        params = with_dest_uri(params, dconn)
    dom = await conn.lookup(key)
    await conn.open_session()
    await dconn.open_session()
    name = await run_v3(
        RemoteSource(conn, use_params), RemoteDest(dconn, use_params), dom.name, params,
        int(f), protection=protection, trace=trace,
    )
    return await dconn.lookup(name)


async def migrate_to_uri3(
    conn: RpcConnection, key: DomainKey, dconnuri: str | None, params: TypedParams,
    flags: int,
) -> None:
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
    check_not_local(dconnuri)
    use_params = Feature.MIGRATION_PARAMS in features
    if not use_params and params.names() - NON_PARAMS_ALLOWED:
        raise ArgumentUnsupported(
            "Migration APIs with extensible parameters are not supported but extended "
            "parameters were passed"
        )
    ref = await conn.ref(key)
    stub = conn.migration_stub
    if use_params:
        await conn._call(stub.Perform3Params, pb.Perform3ParamsRequest(
            domain=ref, dconnuri=dconnuri, params=to_wire(params), flags=int(f)))
        return
    req = pb.Perform3Request(domain=ref, dconnuri=dconnuri, flags=int(f),
                             resource=params.get_int(P.BANDWIDTH))
    _legacy(req, params, xmlin=P.DEST_XML, uri=P.URI, dname=P.DEST_NAME)
    await conn._call(stub.Perform3, req)
