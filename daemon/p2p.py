"""Peer-to-peer migration: the source daemon drives the destination daemon itself.

A client makes one Perform3(Params) call (or protocol v2's Perform, ``uri`` naming the
destination) with PEER2PEER and ``dconnuri`` (the destination daemon as this host sees it).  This
daemon chooses the protocol with the destination as the client does (``choose_protocol``, with
its own features and the destination's: libvirt's Peer2Peer picks v3 or v2 by the destination's)
and runs the *same* sequence driver the client runs in regular mode (``run_v3`` or ``run_v2``),
with its own source phases called locally (:class:`LocalSource`) and the destination's over gRPC
(``RemoteDest``).  As libvirt's Peer2Peer3 does, v3 always runs its own Confirm, so a failed
Perform is followed by Finish(cancelled) and Confirm(cancelled); as Peer2Peer2 does, v2 stops the
source's guest only once Finish2 reports it on the destination, and resumes it otherwise.
Either way the source job records ``dconnuri`` (or the caller's ``virtmig.dest_uri``) as the
destination daemon's URI, which :mod:`virtmig.daemon.locate` asks when the outcome is unknown
(in v2: Finish2's answer lost, or a restart in perform2).

Identity: the destination is ``dconnuri``; over ``virtmig+tls`` this daemon presents the client
certificate of its own PKI dir (``pki_dir``: the host certificate ``virtmig pki issue --host``
wrote) and the destination authorizes it as it does any client; with ``VIR_MIGRATE_TLS`` the
same certificate is the data stream's client certificate.  A ``?pkipath=`` in
``dconnuri`` is refused: the caller does not choose the files this daemon reads or the identity
it shows.  A TUNNELLED stream rides this connection, so it is encrypted only over
``virtmig+tls``: with VIR_MIGRATE_TLS or ``migrate_tls_force`` a plain ``virtmig+tcp``
``dconnuri`` is refused before anything changes.

Liveness: the connection to the destination carries a session stream and keepalive pings; when
it ends during Perform the stream is stopped and the migration fails with "Lost connection to
destination host" (the source resumes); the destination, whose Prepare caller was this daemon's
session, destroys its incoming guest by itself.  The source job is owned by a session of this
daemon's own for the run (:mod:`virtmig.daemon.migration.owner`): it is never reaped as unowned
while the run drives it, and whatever job the run leaves is abandoned when it ends.

Fault injection (test-only, :mod:`virtmig.daemon.stall`): the driver has a stall point at each
phase boundary, ``p2p-after-begin``, ``p2p-after-prepare`` (the destination answered),
``p2p-after-perform``, ``p2p-after-finish`` (the destination answered) and ``p2p-after-confirm``
(v2: after the migratable XML, Prepare2, the stream, Finish2 and the settling of the source);
each is reached only when its phase succeeded, and is inert unless ``VIRTMIG_TEST_STALL`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass

from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteDest, check_param_types
from virtmig.client.sequence import Trace, choose_protocol, run_v2, run_v3
from virtmig.daemon import jobctl, migration, stall
from virtmig.daemon.core import Daemon
from virtmig.daemon.domxml import format_domain_xml
from virtmig.daemon.job import AsyncJob, Phase
from virtmig.daemon.migration.common import TLS_FORCED
from virtmig.daemon.registry import DomainObj
from virtmig.daemon.tunnel import SrcTunnel
from virtmig.proto import logsafe
from virtmig.proto.aio import within
from virtmig.proto.errors import (
    ArgumentUnsupported,
    InvalidArgument,
    OperationFailed,
    OperationInvalid,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, Feature, MigrateFlags, MigrationProtocol
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.proto.uri import check_not_local, parse_uri

log = logsafe.logger(__name__)

F = MigrateFlags
LOST_GRACE_S = 1.0


@dataclass(frozen=True)
class P2PRun:
    """What a peer-to-peer run tells its caller: the protocol it used with the destination and
    the migration's id (read from the cookies, as a client's run does)."""

    protocol: str
    migration_id: str


class LocalSource:
    """The source party of the sequence driver, run by this daemon on its own domain."""

    def __init__(self, daemon: Daemon, peer: AsyncConnection | None = None,
                 session: str = "", dest_uri: str = "", protocol: str = "") -> None:
        self.daemon = daemon
        self.peer = peer
        # The destination daemon as this host reaches it, recorded by Perform (dconnuri).
        self.dest_uri = dest_uri
        # This daemon's own session for the run: it owns the source job (migration.owner).
        self.session = session
        # The protocol of the run, recorded in the source job.
        self.protocol = protocol

    def _dom(self, name: str) -> DomainObj:
        return self.daemon.registry.by_name(name)

    async def begin(self, dom: str, params: TypedParams, flags: int) -> tuple[str, bytes]:
        out = await migration.src_begin(self.daemon, self._dom(dom), params, flags,
                                        self.session, self.protocol)
        await _stall("p2p-after-begin")
        return out

    async def get_state(self, dom: str) -> DomainState:
        return self._dom(dom).state

    async def perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes:
        out = await self._perform(dom, params, cookie, flags)
        await _stall("p2p-after-perform")
        return out

    async def _perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes:
        try:
            if not flags & F.TUNNELLED:
                return await migration.src_perform(self.daemon, self._dom(dom), None, params,
                                                   cookie, flags, owner=self.session,
                                                   dest_uri=self.dest_uri,
                                                   protocol=self.protocol)
            assert self.peer is not None
            async with SrcTunnel(self.peer, params.get_str(MigrateParam.DEST_NAME) or dom) as end:
                return await migration.src_perform(self.daemon, self._dom(dom), None, params,
                                                   cookie, flags, tunnel=end,
                                                   owner=self.session, dest_uri=self.dest_uri,
                                                   protocol=self.protocol)
        except VirtmigError as exc:
            if self.peer is not None and await _lost(self.peer):
                raise OperationFailed("Lost connection to destination host") from exc
            raise

    # --- protocol v2 (libvirt's Peer2Peer2) ---

    async def migratable_xml(self, dom: str) -> str:
        # As Begin's: pinned as the backend pins definitions.
        xml = format_domain_xml(self.daemon.canonical(self._dom(dom).definition),
                                migratable=True)
        await _stall("p2p-after-begin")
        return xml

    async def perform2(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> None:
        """The stream; the guest stays paused here until :meth:`settle2`."""
        await self._perform2(dom, params, cookie, flags)
        await _stall("p2p-after-perform")

    async def _perform2(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> None:
        try:
            if not flags & F.TUNNELLED:
                await migration.src_perform2(self.daemon, self._dom(dom), params, cookie, flags,
                                             owner=self.session, complete=False,
                                             dest_uri=self.dest_uri)
                return
            assert self.peer is not None
            async with SrcTunnel(self.peer, params.get_str(MigrateParam.DEST_NAME) or dom) as end:
                await migration.src_perform2(self.daemon, self._dom(dom), params, cookie, flags,
                                             owner=self.session, tunnel=end, complete=False,
                                             dest_uri=self.dest_uri)
        except VirtmigError as exc:
            if self.peer is not None and await _lost(self.peer):
                raise OperationFailed("Lost connection to destination host") from exc
            raise

    async def settle2(self, dom: str, migrated: bool | None) -> None:
        await migration.src_settle2(self.daemon, self._dom(dom), migrated)
        await _stall("p2p-after-confirm")

    async def confirm(self, dom: str, params: TypedParams, cookie: bytes, flags: int,
                      cancelled: bool) -> None:
        obj = self.daemon.registry.find_name(dom)
        if obj is None and cancelled:
            return
        await migration.src_confirm(self.daemon, self._dom(dom), params, cookie, flags,
                                    cancelled)
        await _stall("p2p-after-confirm")

    async def wait_abort(self, dom: str) -> None:
        job = self._dom(dom).job
        if job is None:
            await asyncio.Event().wait()
            return
        await job.abort_event.wait()


class StallingDest:
    """The destination party with the test-only stall points after Prepare and Finish answered
    (:mod:`virtmig.daemon.stall`); the driver uses it only when ``VIRTMIG_TEST_STALL`` is set."""

    def __init__(self, inner: RemoteDest) -> None:
        self.inner = inner

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        out = await self.inner.prepare(params, cookie, flags)
        await stall.at("p2p-after-prepare")
        return out

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        out = await self.inner.finish(params, cookie, flags, cancelled)
        await stall.at("p2p-after-finish")
        return out

    async def finished(self, dname: str) -> bool:
        return await self.inner.finished(dname)

    async def prepare2(self, params: TypedParams, flags: int) -> tuple[bytes, str | None]:
        out = await self.inner.prepare2(params, flags)
        await stall.at("p2p-after-prepare")
        return out

    async def finish2(self, params: TypedParams, cookie: bytes, flags: int, retcode: int) -> str:
        out = await self.inner.finish2(params, cookie, flags, retcode)
        await stall.at("p2p-after-finish")
        return out


async def _stall(point: str) -> None:
    if stall.POINT:
        await stall.at(point)


async def src_perform_p2p(
    daemon: Daemon, dom: DomainObj, dconnuri: str | None, params: TypedParams,
    cookie_in: bytes, flags: int,
) -> P2PRun:
    """libvirt's PerformJob → Peer2Peer → Peer2Peer3 or Peer2Peer2, on this daemon; returns
    the protocol (``MigrationProtocol``) it used with the destination and the migration's id."""
    f = migration.any_check(daemon, flags, params, "virDomainMigratePerform3Params")
    if cookie_in:
        raise OperationInvalid("received unexpected cookie with P2P migration")
    if not dconnuri:
        raise InvalidArgument("dconnuri must not be NULL for peer-to-peer migration")
    check_not_local(dconnuri)
    if _names_pkipath(dconnuri):
        raise InvalidArgument(
            "a peer-to-peer destination URI must not name a pkipath: the source daemon "
            "connects with the certificate of its own pki_dir")
    _check_tunnel_tls(daemon, dconnuri, f)
    check_param_types(params)
    try:
        dconn = await AsyncConnection.open(dconnuri, pki_dir=daemon.config.pki_dir or None)
    except VirtmigError as exc:
        raise OperationFailed(f"Failed to connect to remote virtmig URI {dconnuri}: {exc}") from exc
    watcher: asyncio.Task[None] | None = None
    # The run's own session: it owns the source job while this task drives it, and its end
    # abandons whatever job the run left (as a regular caller's session end does).
    session = secrets.token_hex(16)
    daemon.sessions.add(session)
    try:
        protocol = _choose(daemon, (await dconn.host()).features, params, f)
        await dconn.open_session()
        watcher = asyncio.get_running_loop().create_task(_watch_peer(daemon, dom, dconn))
        dest_uri = params.get_str(MigrateParam.DEST_URI) or dconnuri
        source = LocalSource(daemon, dconn, session, dest_uri, protocol.value)
        remote = RemoteDest(dconn, protocol is MigrationProtocol.V3_PARAMS)
        dest = StallingDest(remote) if stall.POINT else remote
        trace = Trace()
        if protocol is MigrationProtocol.V2:
            # Change protection is implicit here (one job): never sent to the destination.
            await run_v2(source, dest, dom.name, params, int(f & ~F.CHANGE_PROTECTION),
                         p2p=True, trace=trace)
        else:
            await run_v3(source, dest, dom.name, params, int(f), protection=True, p2p=True,
                         trace=trace)
        return P2PRun(protocol.value, trace.migration_id)
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await dconn.close()
        await _unsettled(daemon, dom, session)
        await migration.any_session_closed(daemon, session)


def _choose(daemon: Daemon, dst: frozenset[str], params: TypedParams,
            f: MigrateFlags) -> MigrationProtocol:
    """libvirt's Peer2Peer checks of the destination's features, then the protocol both
    daemons speak (the client's one choice, with this daemon's features as the source's)."""
    if Feature.P2P not in dst:
        raise OperationFailed(
            "Destination virtmig does not support peer-to-peer migration protocol")
    if f & F.OFFLINE and Feature.OFFLINE not in dst:
        raise ArgumentUnsupported("offline migration is not supported by the destination host")
    return choose_protocol(daemon.features, dst, params, int(f & ~F.CHANGE_PROTECTION))


async def _unsettled(daemon: Daemon, dom: DomainObj, session: str) -> None:
    """A v2 run that ended between its stream and Finish2's answer (cancelled, a bug) leaves its
    job busy in perform2: end it, the guest left paused (where it runs is unknown)."""
    job = dom.job
    if job is not None and job.owner == session and job.phase is Phase.PERFORM2 and job.busy:
        with contextlib.suppress(VirtmigError):
            await migration.src_settle2(daemon, dom, None)


def _check_tunnel_tls(daemon: Daemon, dconnuri: str, f: MigrateFlags) -> None:
    """A tunnelled stream has the protection of the connection to the destination: with
    VIR_MIGRATE_TLS or ``migrate_tls_force``, a plain ``virtmig+tcp`` ``dconnuri`` is refused
    (:class:`OperationInvalid`), before anything changes."""
    if not f & F.TUNNELLED or not (f & F.TLS or daemon.config.migrate_tls_force):
        return
    try:
        plain = parse_uri(dconnuri).transport == "tcp"
    except InvalidArgument:  # a bad URI fails where it is opened, with its own message
        return
    if plain:
        why = "VIR_MIGRATE_TLS" if f & F.TLS else TLS_FORCED
        raise OperationInvalid(
            f"{why}: a tunnelled migration is protected by its destination URI's TLS, and "
            f"'{dconnuri}' is plain TCP (use virtmig+tls://)")


def _names_pkipath(uri: str) -> bool:
    try:
        return bool(parse_uri(uri).pki_dir)
    except InvalidArgument:  # a bad URI fails where it is opened, with its own message
        return False


async def _lost(peer: AsyncConnection) -> bool:
    """Whether the destination went away (the stream's failure may be noticed a moment first)."""
    with contextlib.suppress(TimeoutError):
        await within(peer.session_lost.wait(), LOST_GRACE_S)
    return peer.session_lost.is_set()


async def _watch_peer(daemon: Daemon, dom: DomainObj, dconn: AsyncConnection) -> None:
    """Fail a running stream when the destination daemon goes away."""
    await dconn.session_lost.wait()
    job = dom.job
    log.warning("lost connection to the destination of %s's migration", dom.name)
    if job is not None and job.kind is AsyncJob.MIGRATION_OUT and job.phase.streaming:
        await jobctl.fail_job(daemon, dom, job,
                              OperationFailed("Lost connection to destination host"))
