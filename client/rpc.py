"""One daemon's connection at the RPC level: channel, stubs, session, one typed method per RPC.

:class:`RpcConnection` turns requests into wire messages and replies into the values of
:mod:`virtmig.client.values`; a failed RPC becomes a virtmig exception here (``_call`` for unary
RPCs, ``_stream`` for server streams, and the session's first read).  Driving a migration across
two daemons is not here: that is :mod:`virtmig.client.migrate`, built on this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc

from virtmig.client.transport import Dialing, connect_error, dial
from virtmig.client.values import Domain, DomainKey, HostInfo
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto import virtmig_pb2_grpc as pbg
from virtmig.proto.errors import ConnectionFailed, NoDomain, NoSupport, from_status
from virtmig.proto.flags import DomainState
from virtmig.proto.uri import ConnectURI

if TYPE_CHECKING:
    from virtmig.client.records import DomainInfo, Event, GuestLocation, HistoryEntry, JobInfo

T = TypeVar("T")

SESSION_METADATA_KEY = "virtmig-session"

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lacks it


def canonical_uuid(text: str) -> str:
    """``str(uuid.UUID(text))`` when ``text`` is a UUID in any spelling ``uuid.UUID`` accepts
    (hyphens or not, braces, ``urn:uuid:``, any case), else "": the same parse, without importing
    ``uuid`` (which imports ``platform``: a tenth of what ``import grpc`` costs a command)."""
    digits = text.replace("urn:", "").replace("uuid:", "").strip("{}").replace("-", "")
    if len(digits) != 32:
        return ""
    try:
        value = int(digits, 16)
    except ValueError:
        return ""
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _retrieved(task: asyncio.Task[None]) -> None:
    """A background task's failure is read here: whoever awaits it gets it; nobody may (a
    command that failed before it needed its session)."""
    if not task.cancelled():
        task.exception()


class RpcConnection:
    """A connection to one daemon.  Use ``await cls.open(uri)``; close when done."""

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
        self._session_opening: asyncio.Task[None] | None = None
        # Set when the session stream ends for any reason other than close().
        self.session_lost = asyncio.Event()

    @classmethod
    async def open(cls, uri: str | None = None, *, connect_timeout: float = 10.0,
                   pki_dir: str | os.PathLike[str] | None = None) -> Self:
        """Connect to the daemon at ``uri``.  ``pki_dir``: the PKI dir of a ``virtmig+tls`` URI
        that names none with ``?pkipath=`` (a peer-to-peer source passes its own)."""
        return await cls.open_dialed(dial(uri, pki_dir=pki_dir), connect_timeout=connect_timeout)

    @classmethod
    async def open_dialed(cls, dialing: Dialing, *, connect_timeout: float = 10.0) -> Self:
        """:meth:`open` on a channel :func:`~virtmig.client.transport.dial` made (in this event
        loop): ``connect_timeout`` counts from the dial.  The channel is closed if the daemon
        does not answer."""
        parsed, channel = dialing.uri, dialing.channel
        conn = cls(parsed, channel)
        try:
            reply = await conn.host_stub.GetHost(pb.GetHostRequest(),
                                                 timeout=dialing.remaining(connect_timeout))
        except grpc.aio.AioRpcError as exc:
            await channel.close(None)
            raise connect_error(parsed, exc, connect_timeout) from None
        except BaseException:
            await channel.close(None)
            raise
        conn._host = HostInfo.from_msg(reply)
        return conn

    async def close(self) -> None:
        opening = self._session_opening
        if opening is not None and not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
        if self._session_call is not None:
            self._session_call.cancel()
        if self._session_task is not None:
            self._session_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._session_task
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
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
        handling) when the session ends: the process died, or the network went away.  Callers
        at the same time share one opening (one session); a failed one is tried again by the
        next call.  :meth:`start_session` starts it without waiting.
        """
        if not self._session:
            await asyncio.shield(self.start_session())
        return self._session

    def start_session(self) -> asyncio.Task[None]:
        """The session's opening, on its way in the background (started unless it is; done if
        the session is open): a caller that will need the session later starts it while it does
        something else.  Its failure is what :meth:`open_session` then raises."""
        opening = self._session_opening
        if opening is None or (opening.done() and not self._session):
            opening = self._session_opening = asyncio.ensure_future(self._open_session())
            opening.add_done_callback(_retrieved)
        return opening

    async def _open_session(self) -> None:
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

    async def _drain(self, call: Any) -> None:
        try:
            with contextlib.suppress(grpc.aio.AioRpcError):
                while await call.read() is not _EOF:
                    pass
        except asyncio.CancelledError:
            self._session = ""
            raise
        self._session = ""
        self.session_lost.set()

    # --- host -----------------------------------------------------------------------------------

    async def host(self, *, refresh: bool = False, timeout: float | None = None) -> HostInfo:
        if self._host is None or refresh:
            m = await self._call(self.host_stub.GetHost, pb.GetHostRequest(), timeout)
            self._host = HostInfo.from_msg(m)
        return self._host

    # --- domains --------------------------------------------------------------------------------

    async def ref(self, key: DomainKey) -> pb.DomainRef:
        """A domain reference from a handle, name, UUID or (virsh-style) numeric id."""
        if isinstance(key, Domain):
            return pb.DomainRef(uuid=key.uuid)
        if key.isdigit():
            for d in await self.list_domains(active=True):
                if d.id == int(key):
                    return pb.DomainRef(uuid=d.uuid)
        canonical = canonical_uuid(key)
        return pb.DomainRef(uuid=canonical) if canonical else pb.DomainRef(name=key)

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

    async def start(self, key: DomainKey, *, paused: bool = False, force: bool = False
                    ) -> Domain:
        """``force``: start even though the guest was migrated away and its destination runs
        it or cannot be asked (the daemon logs it at WARNING)."""
        m = await self._call(self.domains_stub.Start, pb.StartRequest(
            domain=await self.ref(key), paused=paused, force=force))
        return Domain.from_msg(m)

    async def destroy(self, key: DomainKey) -> None:
        await self._call(self.domains_stub.Destroy, pb.DomainRequest(domain=await self.ref(key)))

    async def suspend(self, key: DomainKey) -> None:
        await self._call(self.domains_stub.Suspend, pb.DomainRequest(domain=await self.ref(key)))

    async def resume(self, key: DomainKey) -> None:
        await self._call(self.domains_stub.Resume, pb.DomainRequest(domain=await self.ref(key)))

    async def list_domains(self, *, active: bool = True, inactive: bool = False) -> list[Domain]:
        """Every domain asked for, however many: ``ListStream``'s chunks.  A daemon from before
        ``ListStream`` answers it UNIMPLEMENTED: then its one ``List`` reply, which holds all of
        its domains (such a daemon holds at most 10000)."""
        return [Domain.from_msg(d)
                for d in await self.list_domain_msgs(active=active, inactive=inactive)]

    async def list_domain_msgs(self, *, active: bool = True,
                               inactive: bool = False) -> list[pb.Domain]:
        """:meth:`list_domains` as the wire messages (``virtmig list`` reads three fields of
        each: a :class:`Domain` per entry would cost it more than the call)."""
        request = pb.ListRequest(active=active, inactive=inactive)
        out: list[pb.Domain] = []
        try:
            async for m in self._stream(self.domains_stub.ListStream(request)):
                out.extend(m.domains)
        except NoSupport:
            if out:
                raise
            m = await self._call(self.domains_stub.List, request)
            out = list(m.domains)
        return out

    async def xml_desc(self, key: DomainKey, *, inactive: bool = False,
                       migratable: bool = False, secure: bool = False) -> str:
        """The domain's XML; ``secure`` (libvirt's VIR_DOMAIN_XML_SECURE, a write call): with
        the graphics passwords."""
        m: pb.GetXMLReply = await self._call(self.domains_stub.GetXML, pb.GetXMLRequest(
            domain=await self.ref(key), inactive=inactive, migratable=migratable,
            secure=secure))
        return m.xml

    async def info(self, key: DomainKey) -> DomainInfo:
        m = await self._call(self.domains_stub.GetInfo,
                             pb.DomainRequest(domain=await self.ref(key)))
        from virtmig.client.records import DomainInfo

        return DomainInfo.from_msg(m)

    async def state(self, key: DomainKey) -> tuple[DomainState, int, str]:
        m = await self._call(self.domains_stub.GetState,
                             pb.DomainRequest(domain=await self.ref(key)))
        return DomainState(m.state), m.reason, m.reason_name

    async def state_detail(self, key: DomainKey) -> tuple[DomainState, int, str, str]:
        """:meth:`state` and virtmig's words beside the reason (what a guest whose migration's
        outcome is unknown waits for; "" when nothing)."""
        m = await self._call(self.domains_stub.GetState,
                             pb.DomainRequest(domain=await self.ref(key)))
        return DomainState(m.state), m.reason, m.reason_name, m.detail

    async def guest_location(self, uuid: str, migration_id: str = "", *,
                             timeout: float | None = None) -> GuestLocation:
        """Where the guest of ``uuid`` is, as this daemon knows it."""
        from virtmig.client.records import GuestLocation

        return GuestLocation.from_msg(await self._call(
            self.domains_stub.GuestLocation,
            pb.GuestLocationRequest(uuid=uuid, migration_id=migration_id), timeout))

    async def resolve_migration(self, key: DomainKey, dest_uri: str = ""
                                ) -> tuple[DomainState, int, str, str]:
        """Settle a guest whose migration's outcome is unknown, asking its destination (at
        ``dest_uri``, "": the URI recorded) now; its state afterwards, as :meth:`state_detail`."""
        m = await self._call(self.domains_stub.ResolveMigration, pb.ResolveMigrationRequest(
            domain=await self.ref(key), dest_uri=dest_uri))
        return DomainState(m.state), m.reason, m.reason_name, m.detail

    async def job_info(self, key: DomainKey, *, completed: bool = False) -> JobInfo:
        m = await self._call(self.migration_stub.GetJobInfo, pb.JobInfoRequest(
            domain=await self.ref(key), completed=completed))
        from virtmig.client.records import JobInfo

        return JobInfo.from_msg(m)

    async def _stream(self, call: Any) -> AsyncIterator[Any]:
        """Read a server stream, mapping its failure like ``_call`` does."""
        try:
            while (item := await call.read()) is not _EOF:
                yield item
        except grpc.aio.AioRpcError as exc:
            raise from_status(exc.code(), exc.details(), exc.trailing_metadata()) from None
        finally:
            call.cancel()

    async def watch_job(self, key: DomainKey) -> AsyncIterator[JobInfo]:
        """The job's info each time it changes (pushed by the daemon), then its final record."""
        from virtmig.client.records import JobInfo

        call = self.migration_stub.WatchJob(pb.JobInfoRequest(domain=await self.ref(key)))
        async for m in self._stream(call):
            yield JobInfo.from_msg(m)

    async def events(self, key: DomainKey | None = None) -> AsyncIterator[Event]:
        """Domain events as they happen, for one domain or all; runs until the caller stops."""
        from virtmig.client.records import Event

        req = pb.EventsRequest()
        if key is not None:
            req.domain.CopyFrom(await self.ref(key))
        async for m in self._stream(self.domains_stub.Events(req)):
            yield Event.from_msg(m)

    async def abort_job(self, key: DomainKey, *, postcopy: bool = False) -> None:
        await self._call(self.migration_stub.AbortJob, pb.AbortJobRequest(
            domain=await self.ref(key), flags=2 if postcopy else 0))

    async def set_max_downtime(self, key: DomainKey, downtime_ms: int) -> None:
        from virtmig.proto.params import check_max_downtime  # (not needed by other commands)

        check_max_downtime(downtime_ms)  # the daemon's check too, before anything is sent
        await self._call(self.migration_stub.SetMaxDowntime, pb.DowntimeRequest(
            domain=await self.ref(key), downtime_ms=downtime_ms))

    async def get_max_downtime(self, key: DomainKey) -> int:
        m: pb.DowntimeReply = await self._call(self.migration_stub.GetMaxDowntime,
                                               pb.DomainRequest(domain=await self.ref(key)))
        return m.downtime_ms

    async def set_max_speed(self, key: DomainKey, bandwidth_mib: int, *,
                            postcopy: bool = False) -> None:
        from virtmig.proto.params import check_max_speed

        check_max_speed(bandwidth_mib)  # the daemon's check too, before anything is sent
        await self._call(self.migration_stub.SetMaxSpeed, pb.SpeedRequest(
            domain=await self.ref(key), bandwidth_mib=bandwidth_mib, flags=1 if postcopy else 0))

    async def get_max_speed(self, key: DomainKey, *, postcopy: bool = False) -> int:
        m: pb.SpeedReply = await self._call(self.migration_stub.GetMaxSpeed, pb.SpeedRequest(
            domain=await self.ref(key), flags=1 if postcopy else 0))
        return m.bandwidth_mib

    async def get_compression_cache(self, key: DomainKey) -> int:
        """libvirt's virDomainMigrateGetCompressionCache: the running domain's xbzrle cache
        size in bytes (what its next migrations use)."""
        m: pb.CompressionCacheReply = await self._call(
            self.migration_stub.GetCompressionCache,
            pb.CompressionCacheRequest(domain=await self.ref(key)))
        return m.cache_size

    async def set_compression_cache(self, key: DomainKey, size: int) -> None:
        """libvirt's virDomainMigrateSetCompressionCache (a power of two, at least 4096: the
        daemon checks it, after whether its backend has a cache at all, as libvirt's)."""
        await self._call(self.migration_stub.SetCompressionCache, pb.CompressionCacheRequest(
            domain=await self.ref(key), cache_size=size))

    async def start_postcopy(self, key: DomainKey) -> None:
        await self._call(self.migration_stub.StartPostCopy,
                         pb.DomainRequest(domain=await self.ref(key)))

    async def migration_history(self, domain: str = "", *, limit: int = 0) -> list[HistoryEntry]:
        """The daemon's finished migrations, newest first; only ``domain``'s (a name or UUID,
        which need not exist any more) if given; at most ``limit`` (0: the daemon's maximum)."""
        m: pb.HistoryReply = await self._call(self.migration_stub.GetHistory,
                                              pb.HistoryRequest(domain=domain, limit=limit))
        from virtmig.client.records import HistoryEntry

        return [HistoryEntry.from_msg(e) for e in m.entries]
