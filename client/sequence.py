"""The sequence drivers: v3 (Begin → Prepare → Perform → Finish → Confirm, libvirt's
virDomainMigrateVersion3Full), v2 (Prepare2 → Perform → Finish2, virDomainMigrateVersion2; see
:func:`run_v2`), and the one choice between them (:func:`choose_protocol`), each with libvirt's
exact call order and failure handling.  There is one copy of this logic: the client runs it in
regular mode with two remote parties; peer-to-peer runs it inside the source daemon.

Beyond libvirt: when Finish's reply is lost (a transport error), the driver asks the destination
whether the guest runs there before it resumes anything on the source; if the destination cannot
be reached the source guest stays paused (never on both hosts) and the error says so.

Failure handling, regular mode (peer-to-peer differs in two places: the source daemon always
runs its own Confirm, so a failed Perform is followed by Finish(cancelled) and Confirm(cancelled);
and an abort of the source's job cancels a Prepare still running, which may be waiting for a
migration port on the destination, where the regular client's Ctrl-C cancels it itself)::

    Begin fails           → error; nothing else is called
    Prepare fails         → Confirm(cancelled) if change-protected; error
    no URI from Prepare   → Finish(cancelled), Confirm(cancelled); error
    Perform fails         → Finish(cancelled); no Confirm (Perform rolled the source back); error
    Finish fails          → Confirm(cancelled); error
    Confirm fails         → warning only: the result is Finish's

The first error wins (Perform's, else Finish's), except that a hypervisor error from Finish
replaces a generic "operation failed" from Perform, as it explains why the destination died.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import field, replace
from typing import Protocol

from virtmig.proto import logsafe
from virtmig.proto.compat import check_v2_flags
from virtmig.proto.errors import (
    ArgumentUnsupported,
    ConnectionFailed,
    InternalError,
    MigrateFinishOk,
    NoSupport,
    OperationAborted,
    OperationFailed,
    VirtmigError,
)
from virtmig.proto.flags import (
    SOURCE_ONLY_FLAGS,
    DomainState,
    Feature,
    MigrateFlags,
    MigrationProtocol,
)
from virtmig.proto.migid import migration_id_in_cookie
from virtmig.proto.params import NON_PARAMS_ALLOWED, MigrateParam, TypedParams
from virtmig.proto.record import record

log = logsafe.logger(__name__)
client_log = logsafe.logger("virtmig.client")  # the phases of the client's own runs

F = MigrateFlags
P = MigrateParam


class SourceParty(Protocol):
    """The source side: remote stubs in regular mode, the daemon's own phases in p2p."""

    async def begin(self, dom: str, params: TypedParams, flags: int) -> tuple[str, bytes]: ...

    async def get_state(self, dom: str) -> DomainState: ...

    async def perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes: ...

    async def confirm(
        self, dom: str, params: TypedParams, cookie: bytes, flags: int, cancelled: bool
    ) -> None: ...

    async def wait_abort(self, dom: str) -> None:
        """Return once an abort of the domain's outgoing job is requested (never otherwise)."""
        ...


class DestParty(Protocol):
    async def prepare(
        self, params: TypedParams, cookie: bytes, flags: int
    ) -> tuple[bytes, str | None]: ...

    async def finish(
        self, params: TypedParams, cookie: bytes, flags: int, cancelled: bool
    ) -> tuple[str, bytes]:
        """Returns the new domain's name on the destination and cookie D."""
        ...

    async def finished(self, dname: str) -> bool:
        """After an interrupted Finish: whether the guest ended up running here (once the
        destination's job is over: True if it is active, False if it was rolled back); a
        :class:`VirtmigError` when that cannot be told (the job does not end, no answer)."""
        ...


@record(frozen=False)
class Trace:
    """What the driver called, in order (``"finish(cancelled)"``...), for logs and tests, the
    protocol the migration ran with (``MigrationProtocol``) and its id (read from the daemons'
    cookies; both are what ``--verbose`` prints).

    ``announce`` (the client's own runs; a peer-to-peer source daemon logs phases itself): each
    call is logged at INFO on the ``virtmig.client`` logger, with the migration id once known.
    """

    calls: list[str] = field(default_factory=list)
    protocol: str = ""
    migration_id: str = ""
    domain: str = ""
    announce: bool = False

    def add(self, name: str, cancelled: bool | None = None) -> None:
        call = f"{name}(cancelled)" if cancelled else name
        self.calls.append(call)
        if self.announce:
            client_log.info("migration %s of %s: %s", self.migration_id or "(id not known yet)",
                            self.domain, call)

    def learn_id(self, cookie: bytes) -> None:
        """Take the migration id from a daemon's cookie (the first one that carries it)."""
        if self.migration_id:
            return
        self.migration_id = migration_id_in_cookie(cookie)
        if self.migration_id and self.announce:
            client_log.info("Migration id: %s (migration of %s)", self.migration_id,
                            self.domain)


@record
class _Outcome:
    """Where a run stands after a step: the cookie for the next call, whether the migration is
    cancelled, the error that wins so far, whether the source is called again (Confirm), and the
    domain's name on the destination once Finish succeeded."""

    cookie: bytes
    cancelled: bool = True
    error: VirtmigError | None = None
    notify_source: bool = True
    ddom: str | None = None


async def run_v3(
    src: SourceParty,
    dst: DestParty,
    dom: str,
    params: TypedParams,
    flags: int,
    *,
    protection: bool,
    p2p: bool = False,
    trace: Trace | None = None,
) -> str:
    """Run one migration; return the domain's name on the destination, or raise the error.

    ``p2p``: the source daemon runs this itself and always calls its own Confirm, also after a
    failed Perform (libvirt's Peer2Peer3), where the client would not.
    """
    t = trace if trace is not None else Trace()
    params = params.copy()
    protect = int(F.CHANGE_PROTECTION) if protection else 0
    flags &= ~protect

    t.add("begin")
    dom_xml, cookie = await src.begin(dom, params, flags | protect)
    t.learn_id(cookie)

    try:
        state = await src.get_state(dom)
    except VirtmigError as exc:
        return await _confirm_then_raise(src, dom, params, flags | protect, exc, t, protection)
    if state is DomainState.PAUSED and not flags & F.POSTCOPY_RESUME:
        flags |= F.PAUSED
    destflags = flags & ~int(SOURCE_ONLY_FLAGS)

    dparams = params.copy()
    dparams.set(P.DEST_XML, dom_xml)
    t.add("prepare")
    try:
        if p2p:
            cookie, uri_out = await _prepare_unless_aborted(src, dst, dom, dparams, cookie,
                                                            destflags)
        else:
            cookie, uri_out = await dst.prepare(dparams, cookie, destflags)
    except VirtmigError as exc:
        return await _confirm_then_raise(src, dom, params, flags | protect, exc, t, protection)
    t.learn_id(cookie)
    if uri_out:
        params.set(P.URI, uri_out)

    run = await _perform(src, dom, params, cookie, flags | protect, p2p, t)
    run = await _finish(src, dst, dom, params, destflags, run, t)
    if run.notify_source:
        await _confirm(src, dom, params, flags | protect, run, t)

    if run.ddom is None:
        raise run.error or OperationFailed("migration failed")
    return run.ddom


async def _perform(
    src: SourceParty, dom: str, params: TypedParams, cookie: bytes, flags: int, p2p: bool,
    t: Trace,
) -> _Outcome:
    """Perform, with cookie B; not called when offline (nothing streams, nothing is cancelled)
    nor when Prepare gave no URI (an error: Finish and Confirm are cancelled)."""
    if flags & F.OFFLINE:
        return _Outcome(cookie=b"", cancelled=False)
    if P.URI not in params and not flags & F.TUNNELLED:
        return _Outcome(cookie=b"", error=InternalError("domainMigratePrepare3 did not set uri"))
    t.add("perform")
    try:
        return _Outcome(cookie=await src.perform(dom, params, cookie, flags), cancelled=False)
    except VirtmigError as exc:
        # Perform rolled the source back itself; in p2p the source confirms anyway.
        return _Outcome(cookie=b"", error=exc, notify_source=p2p)


async def _finish(
    src: SourceParty, dst: DestParty, dom: str, params: TypedParams, flags: int, run: _Outcome,
    t: Trace,
) -> _Outcome:
    """Finish, cancelled unless Perform succeeded: the domain's name on the destination, or no
    name and the error that wins (Perform's first; see the module docstring)."""
    fparams = params.copy()
    if P.DEST_NAME not in fparams:
        fparams.set(P.DEST_NAME, dom)
    cancelled = run.cancelled
    t.add("finish", cancelled)
    try:
        if cancelled:
            ddom, cookie = await dst.finish(fparams, run.cookie, flags, cancelled)
        else:
            ddom, cookie = await _finish_unless_aborted(src, dst, dom, fparams, run.cookie,
                                                        flags)
        if cancelled:
            log.warning("finish step ignored that migration was cancelled")
    except ConnectionFailed as exc:
        return await _finish_lost(dst, dom, fparams.get_str(P.DEST_NAME) or dom, run, exc)
    except VirtmigError as exc:
        error = run.error
        if not isinstance(exc, MigrateFinishOk) and (
            error is None
            or (cancelled and type(error) is OperationFailed and _explains_failure(exc))
        ):
            error = exc
        return replace(run, cookie=b"", error=error)
    return replace(run, cookie=cookie, ddom=ddom)


async def _finish_lost(
    dst: DestParty, dom: str, dname: str, run: _Outcome, exc: ConnectionFailed
) -> _Outcome:
    """Finish's reply never came.  After a Perform that succeeded the reply may be what was
    lost: the destination is asked whether the guest runs there before anything is resumed."""
    if not run.cancelled:
        outcome = await _ask_outcome(dst, dname)
        if outcome is None:
            log.error("outcome of the migration of %s is unknown: the destination cannot "
                      "be reached; the source guest stays paused", dom)
            return replace(run, cookie=b"", notify_source=False, error=OperationFailed(
                "the destination could not be reached after Finish; "
                f"whether '{dom}' runs there is unknown, so it is left paused here: {exc}"))
        if outcome:
            return replace(run, cookie=b"", ddom=dname)
    return replace(run, cookie=b"", error=run.error if run.error is not None else exc)


async def _confirm(
    src: SourceParty, dom: str, params: TypedParams, flags: int, run: _Outcome, t: Trace
) -> None:
    """Confirm, with cookie D, cancelled unless Finish succeeded; its failure is a warning only:
    the result is Finish's."""
    cancelled = run.ddom is None
    t.add("confirm", cancelled)
    try:
        await src.confirm(dom, params, run.cookie, flags, cancelled)
    except VirtmigError as exc:
        log.warning("Guest %s probably left in 'paused' state on source: %s", dom, exc)


async def _prepare_unless_aborted(
    src: SourceParty, dst: DestParty, dom: str, params: TypedParams, cookie: bytes, flags: int
) -> tuple[bytes, str | None]:
    """Peer-to-peer: Prepare, unless the source's job is aborted while Prepare runs (it may
    wait for a migration port): then the call is cancelled, which rolls the destination back,
    and the migration fails as aborted.  A Prepare that completed all the same goes on: the
    abort then stops Perform."""
    prepare = asyncio.ensure_future(dst.prepare(params, cookie, flags))
    aborted = asyncio.ensure_future(src.wait_abort(dom))
    try:
        await asyncio.wait({prepare, aborted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        aborted.cancel()
    if prepare.done() or not aborted.done() or aborted.cancelled() or aborted.exception():
        return await prepare
    prepare.cancel()
    with contextlib.suppress(asyncio.CancelledError, VirtmigError):
        return await prepare  # it completed after all
    raise OperationAborted("job 'migration out' canceled by client")


async def _finish_unless_aborted(
    src: SourceParty, dst: DestParty, dom: str, params: TypedParams, cookie: bytes, flags: int
) -> tuple[str, bytes]:
    """Finish, unless the source's job is aborted while Finish waits: then Finish is cancelled.

    A cancelled call may still have completed on the destination (its reply lost in flight), so
    the outcome is asked of the destination before anything is rolled back: if the guest runs
    there, the migration succeeded and the abort came too late.
    """
    finish = asyncio.ensure_future(dst.finish(params, cookie, flags, False))
    aborted = asyncio.ensure_future(src.wait_abort(dom))
    try:
        await asyncio.wait({finish, aborted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        aborted.cancel()
    if finish.done() or not aborted.done() or aborted.cancelled() or aborted.exception():
        return await finish
    finish.cancel()
    with contextlib.suppress(asyncio.CancelledError, VirtmigError):
        return await finish  # it completed after all
    dname = params.get_str(P.DEST_NAME) or dom
    if await dst.finished(dname):
        log.warning("abort of %s came too late: the guest runs on the destination", dom)
        return dname, b""
    raise OperationAborted("job 'migration out' canceled by client")


async def _ask_outcome(dst: DestParty | DestParty2, dname: str) -> bool | None:
    """Whether the guest runs on the destination after a Finish whose reply was lost (None:
    the destination cannot be reached, so nobody knows)."""
    try:
        return await dst.finished(dname)
    except VirtmigError as exc:
        log.warning("cannot ask the destination about %s: %s", dname, exc)
        return None


def _explains_failure(exc: VirtmigError) -> bool:
    """A hypervisor-level error from Finish says why the destination died; a lookup error not."""
    return isinstance(exc, OperationFailed | InternalError) and not isinstance(
        exc, MigrateFinishOk
    )


async def _confirm_then_raise(
    src: SourceParty, dom: str, params: TypedParams, flags: int, exc: VirtmigError, t: Trace,
    protection: bool,
) -> str:
    """After Prepare (or the state query) failed: release the change-protected source job."""
    if protection:
        t.add("confirm", True)
        try:
            await src.confirm(dom, params, b"", flags, True)
        except VirtmigError as cexc:
            log.warning("cannot release migration job of %s: %s", dom, cexc)
    raise exc


# =================================================================================================
# Which protocol


EXTENSIBLE_PARAMS = ("Migration APIs with extensible parameters are not supported but extended "
                     "parameters were passed")
V2_DEST_XML = "Unable to change target guest XML during migration"


def choose_protocol(src: frozenset[str], dst: frozenset[str], params: TypedParams,
                    flags: int) -> MigrationProtocol:
    """The newest protocol both daemons speak, in libvirt's order (virDomainMigrate3), or the
    error for what the protocol it falls back to cannot carry:

    * both advertise MIGRATION_PARAMS: v3 with extensible parameters;
    * else only URI, DEST_NAME, DEST_XML and BANDWIDTH may be passed ("Migration APIs with
      extensible parameters are not supported ..."); both advertise V3: v3;
    * else both advertise V2: v2, which cannot change the destination's XML ("Unable to change
      target guest XML during migration") nor carry the flags it never had (virCheckFlags'
      "unsupported flags (0x...) in function virDomainMigratePrepare2");
    * else none: "this function is not supported by the connection driver".

    The client calls it with both daemons' features (``migrate3``) or the source's twice (the
    call a peer-to-peer client makes to the source, ``migrate_to_uri3``); a peer-to-peer source
    daemon with its own features and its destination's.
    """
    if Feature.MIGRATION_PARAMS in src and Feature.MIGRATION_PARAMS in dst:
        return MigrationProtocol.V3_PARAMS
    if params.names() - NON_PARAMS_ALLOWED:
        raise ArgumentUnsupported(EXTENSIBLE_PARAMS)
    if Feature.V3 in src and Feature.V3 in dst:
        return MigrationProtocol.V3
    if Feature.V2 in src and Feature.V2 in dst:
        if P.DEST_XML in params:
            raise ArgumentUnsupported(V2_DEST_XML)
        check_v2_flags(flags, "virDomainMigratePrepare2")
        return MigrationProtocol.V2
    raise NoSupport("virDomainMigrate3")


# =================================================================================================
# Protocol v2


class SourceParty2(Protocol):
    """The source side of protocol v2."""

    async def migratable_xml(self, dom: str) -> str: ...

    async def get_state(self, dom: str) -> DomainState: ...

    async def perform2(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> None:
        """Regular mode: stops the guest on success; peer-to-peer: leaves it paused for
        :meth:`settle2`.  On failure the source is put back."""
        ...

    async def settle2(self, dom: str, migrated: bool | None) -> None:
        """Peer-to-peer only, after Finish2: stop the guest (True), put it back (False), or
        leave it paused (None: nobody knows where it runs)."""
        ...


class DestParty2(Protocol):
    async def prepare2(self, params: TypedParams, flags: int) -> tuple[bytes, str | None]: ...

    async def finish2(self, params: TypedParams, cookie: bytes, flags: int,
                      retcode: int) -> str: ...

    async def finished(self, dname: str) -> bool: ...


async def run_v2(
    src: SourceParty2,
    dst: DestParty2,
    dom: str,
    params: TypedParams,
    flags: int,
    *,
    p2p: bool = False,
    trace: Trace | None = None,
) -> str:
    """One migration with protocol v2; the domain's name on the destination, or the error.

    libvirt's virDomainMigrateVersion2 (``p2p``: the source daemon's Peer2Peer2)::

        migratable XML, state (paused: PAUSED is added)
        Prepare2 fails        → error; nothing else is called (nothing changed on the source)
        no URI from Prepare2  → Finish2(cancelled); error
        Perform fails         → Finish2(cancelled): Perform put the source back; error
        Finish2 fails         → error.  Regular mode: Perform already stopped the source, so no
                                copy runs any more (v2's hazard).  Peer-to-peer: the source
                                is resumed (or, when the destination cannot be reached to ask,
                                left paused: its daemon asks again later), and stopped only
                                once Finish2 succeeded.
    """
    t = trace if trace is not None else Trace()
    params = params.copy()
    t.add("getxml")
    dom_xml = await src.migratable_xml(dom)
    if await src.get_state(dom) is DomainState.PAUSED:
        flags |= F.PAUSED
    destflags = flags & ~int(SOURCE_ONLY_FLAGS)
    dparams = params.copy()
    dparams.set(P.DEST_XML, dom_xml)
    t.add("prepare2")
    cookie, uri_out = await dst.prepare2(dparams, destflags)
    t.learn_id(cookie)
    if uri_out:
        params.set(P.URI, uri_out)
    error: VirtmigError | None = None
    if P.URI not in params and not flags & F.TUNNELLED:
        error = InternalError("domainMigratePrepare2 did not set uri")
    else:
        t.add("perform")
        try:
            await src.perform2(dom, params, cookie, flags)
        except VirtmigError as exc:
            error = exc
    ddom, unknown, error = await _finish2(dst, dom, params, cookie, destflags, error, t)
    if p2p:
        await src.settle2(dom, None if unknown else ddom is not None)
    if ddom is None:
        raise error or OperationFailed("migration failed")
    return ddom


async def _finish2(
    dst: DestParty2, dom: str, params: TypedParams, cookie: bytes, flags: int,
    error: VirtmigError | None, t: Trace,
) -> tuple[str | None, bool, VirtmigError | None]:
    """Finish2 with Perform's return code: the domain's name on the destination (or None),
    whether that is unknown (the reply was lost and the destination cannot be asked), and the
    error that wins (Perform's first)."""
    cancelled = error is not None
    fparams = TypedParams()
    if (uri := params.get_str(P.URI)) is not None:
        fparams.set(P.URI, uri)
    dname = params.get_str(P.DEST_NAME) or dom
    fparams.set(P.DEST_NAME, dname)
    t.add("finish2", cancelled)
    try:
        ddom = await dst.finish2(fparams, cookie, flags, -1 if cancelled else 0)
    except ConnectionFailed as exc:
        if cancelled:
            return None, False, error
        outcome = await _ask_outcome(dst, dname)
        return (dname if outcome else None), outcome is None, exc
    except VirtmigError as exc:
        if error is None and not isinstance(exc, MigrateFinishOk):
            error = exc
        return None, False, error
    if cancelled:
        log.warning("finish step ignored that migration was cancelled")
    return ddom, False, error
