"""The async client library: one :class:`AsyncConnection` per daemon, typed values in and out.

Every RPC goes through :meth:`AsyncConnection._call`, the one place where a failed RPC becomes a
virtmig exception.  ``virtmig.client.Connection`` is the synchronous facade over this.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto import virtmig_pb2_grpc as pbg
from virtmig.proto.errors import ConnectionFailed, NoDomain, from_status
from virtmig.proto.flags import DomainState, JobOperation, JobType, MigrateFlags
from virtmig.proto.params import TypedParam, TypedParams, from_wire
from virtmig.proto.uri import ConnectURI, parse_uri

T = TypeVar("T")

SESSION_METADATA_KEY = "virtmig-session"
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lacks it


@dataclass(frozen=True)
class Domain:
    """A domain handle, as the daemon described it at the time of the call."""

    name: str
    uuid: str
    id: int
    persistent: bool
    state: DomainState
    reason: int
    reason_name: str

    @classmethod
    def from_msg(cls, m: pb.Domain) -> Domain:
        return cls(m.name, m.uuid, m.id, m.persistent, DomainState(m.state), m.reason,
                   m.reason_name)


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    host_uuid: str
    version: str
    backend: str
    features: frozenset[str]
    cpus: int
    memory_kib: int
    arch: str
    active_domains: int
    inactive_domains: int


@dataclass(frozen=True)
class DomainInfo:
    domain: Domain
    max_memory_kib: int
    memory_kib: int
    vcpus: int
    cpu_time_ns: int
    os_type: str


@dataclass(frozen=True)
class JobInfo:
    type: JobType
    operation: JobOperation
    time_elapsed_ms: int
    data_total: int
    data_processed: int
    data_remaining: int
    mem_total: int
    mem_processed: int
    mem_remaining: int
    stats: tuple[TypedParam, ...]
    phase: str
    error: str


DomainKey = str | Domain


class AsyncConnection:
    """A connection to one daemon.  Use ``await AsyncConnection.open(uri)``; close when done."""

    def __init__(self, uri: ConnectURI, channel: grpc.aio.Channel) -> None:
        self.uri = uri
        self._channel = channel
        self.host_stub = pbg.HostStub(channel)
        self.domains_stub = pbg.DomainsStub(channel)
        self.migration_stub = pbg.MigrationStub(channel)
        self._host: HostInfo | None = None
        self._session = ""
        self._session_call: Any = None
        self._session_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, uri: str | None = None, *, connect_timeout: float = 10.0
    ) -> AsyncConnection:
        parsed = parse_uri(uri)
        channel = grpc.aio.insecure_channel(parsed.grpc_target)
        conn = cls(parsed, channel)
        try:
            await conn.host(refresh=True, timeout=connect_timeout)
        except BaseException:
            await channel.close(None)
            raise
        return conn

    async def close(self) -> None:
        if self._session_call is not None:
            self._session_call.cancel()
        if self._session_task is not None:
            self._session_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._session_task
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any,
                    timeout: float | None = None) -> T:
        """The one place where a failed RPC becomes a virtmig exception."""
        metadata = ((SESSION_METADATA_KEY, self._session),) if self._session else None
        try:
            return await method(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise from_status(exc.code(), exc.details(), exc.trailing_metadata()) from None

    async def open_session(self) -> str:
        """Open (once) the session that ties this caller's migration jobs to its life.

        The daemon abandons the jobs this connection starts (libvirt's connection-closed
        handling) when the session ends: the process died, or the network went away.
        """
        if not self._session:
            call = self.host_stub.OpenSession(pb.OpenSessionRequest())
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise from_status(exc.code(), exc.details(), exc.trailing_metadata()) from None
            if first is _EOF:
                raise ConnectionFailed("the daemon closed the session at once")
            self._session_call = call
            self._session = first.session_id
            self._session_task = asyncio.get_running_loop().create_task(self._drain(call))
        return self._session

    async def _drain(self, call: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            while await call.read() is not _EOF:
                pass
        self._session = ""

    # --- host -----------------------------------------------------------------------------------

    async def host(self, *, refresh: bool = False, timeout: float | None = None) -> HostInfo:
        if self._host is None or refresh:
            m = await self._call(self.host_stub.GetHost, pb.GetHostRequest(), timeout)
            self._host = HostInfo(m.hostname, m.host_uuid, m.version, m.backend,
                                  frozenset(m.features), m.cpus, m.memory_kib, m.arch,
                                  m.active_domains, m.inactive_domains)
        return self._host

    async def supports(self, feature: str) -> bool:
        return feature in (await self.host()).features

    # --- domains --------------------------------------------------------------------------------

    async def ref(self, key: DomainKey) -> pb.DomainRef:
        """A domain reference from a handle, name, UUID or (virsh-style) numeric id."""
        if isinstance(key, Domain):
            return pb.DomainRef(uuid=key.uuid)
        if key.isdigit():
            for d in await self.list_domains(active=True):
                if d.id == int(key):
                    return pb.DomainRef(uuid=d.uuid)
        try:
            return pb.DomainRef(uuid=str(uuidlib.UUID(key)))
        except ValueError:
            return pb.DomainRef(name=key)

    async def lookup(self, key: DomainKey) -> Domain:
        ref = await self.ref(key)
        try:
            m = await self._call(self.domains_stub.Lookup, pb.DomainRequest(domain=ref))
        except NoDomain:
            if ref.WhichOneof("key") == "uuid" and isinstance(key, str):
                m = await self._call(self.domains_stub.Lookup,
                                     pb.DomainRequest(domain=pb.DomainRef(name=key)))
            else:
                raise
        return Domain.from_msg(m)

    async def define(self, xml: str) -> Domain:
        return Domain.from_msg(await self._call(self.domains_stub.Define,
                                                pb.DefineRequest(xml=xml)))

    async def undefine(self, key: DomainKey) -> None:
        await self._call(self.domains_stub.Undefine, pb.DomainRequest(domain=await self.ref(key)))

    async def start(self, key: DomainKey, *, paused: bool = False) -> Domain:
        m = await self._call(self.domains_stub.Start,
                             pb.StartRequest(domain=await self.ref(key), paused=paused))
        return Domain.from_msg(m)

    async def destroy(self, key: DomainKey) -> None:
        await self._call(self.domains_stub.Destroy, pb.DomainRequest(domain=await self.ref(key)))

    async def suspend(self, key: DomainKey) -> None:
        await self._call(self.domains_stub.Suspend, pb.DomainRequest(domain=await self.ref(key)))

    async def resume(self, key: DomainKey) -> None:
        await self._call(self.domains_stub.Resume, pb.DomainRequest(domain=await self.ref(key)))

    async def list_domains(self, *, active: bool = True, inactive: bool = False) -> list[Domain]:
        m = await self._call(self.domains_stub.List,
                             pb.ListRequest(active=active, inactive=inactive))
        return [Domain.from_msg(d) for d in m.domains]

    async def xml_desc(self, key: DomainKey, *, inactive: bool = False,
                       migratable: bool = False) -> str:
        m: pb.GetXMLReply = await self._call(self.domains_stub.GetXML, pb.GetXMLRequest(
            domain=await self.ref(key), inactive=inactive, migratable=migratable))
        return m.xml

    async def info(self, key: DomainKey) -> DomainInfo:
        m = await self._call(self.domains_stub.GetInfo,
                             pb.DomainRequest(domain=await self.ref(key)))
        return DomainInfo(Domain.from_msg(m.domain), m.max_memory_kib, m.memory_kib, m.vcpus,
                          m.cpu_time_ns, m.os_type)

    async def state(self, key: DomainKey) -> tuple[DomainState, int, str]:
        m = await self._call(self.domains_stub.GetState,
                             pb.DomainRequest(domain=await self.ref(key)))
        return DomainState(m.state), m.reason, m.reason_name

    async def job_info(self, key: DomainKey, *, completed: bool = False) -> JobInfo:
        m = await self._call(self.migration_stub.GetJobInfo, pb.JobInfoRequest(
            domain=await self.ref(key), completed=completed))
        return JobInfo(JobType(m.type), JobOperation(m.operation), m.time_elapsed_ms,
                       m.data_total, m.data_processed, m.data_remaining, m.mem_total,
                       m.mem_processed, m.mem_remaining, tuple(from_wire(m.stats)), m.phase,
                       m.error)

    # --- migration ------------------------------------------------------------------------------

    async def migrate3(self, key: DomainKey, dconn: AsyncConnection, params: TypedParams,
                       flags: int | MigrateFlags) -> Domain:
        """libvirt's ``virDomainMigrate3``: the client drives the v3 sequence."""
        from virtmig.client.migrate import migrate3

        return await migrate3(self, key, dconn, params, int(flags))

    async def migrate_to_uri3(self, key: DomainKey, dconnuri: str | None, params: TypedParams,
                              flags: int | MigrateFlags) -> None:
        """libvirt's ``virDomainMigrateToURI3`` (peer-to-peer or direct)."""
        from virtmig.client.migrate import migrate_to_uri3

        await migrate_to_uri3(self, key, dconnuri, params, int(flags))

