"""The v3 sequence driver: Begin → Prepare → Perform → Finish → Confirm, with libvirt's exact call
order and failure handling (those of virDomainMigrateVersion3Full).  There is one copy of this
logic: the client runs it in regular mode with two remote parties; peer-to-peer runs it inside the
source daemon.

Beyond libvirt: when Finish's reply is lost (a transport error), the driver asks the destination
whether the guest runs there before it resumes anything on the source; if the destination cannot
be reached the source guest stays paused (never on both hosts) and the error says so.

Failure handling, regular mode (peer-to-peer differs in one place: the source daemon always
runs its own Confirm, so a failed Perform is followed by Finish(cancelled) and Confirm(cancelled))::

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
import logging
from dataclasses import dataclass, field
from typing import Protocol

from virtmig.proto.errors import (
    ConnectionFailed,
    InternalError,
    MigrateFinishOk,
    OperationAborted,
    OperationFailed,
    VirtmigError,
)
from virtmig.proto.flags import SOURCE_ONLY_FLAGS, DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams

log = logging.getLogger(__name__)

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
        destination's job is over: True if it is active, False if it was rolled back)."""
        ...


@dataclass
class Trace:
    """What the driver called, in order (``"finish(cancelled)"``...), for logs and tests."""

    calls: list[str] = field(default_factory=list)

    def add(self, name: str, cancelled: bool | None = None) -> None:
        self.calls.append(f"{name}(cancelled)" if cancelled else name)


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

    cancelled = True
    notify_source = True
    error: VirtmigError | None = None
    ddom: str | None = None
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
        cookie, uri_out = await dst.prepare(dparams, cookie, destflags)
    except VirtmigError as exc:
        return await _confirm_then_raise(src, dom, params, flags | protect, exc, t, protection)

    if uri_out:
        params.set(P.URI, uri_out)
    offline = bool(flags & F.OFFLINE)
    if offline:
        cookie = b""
        cancelled = False
    elif P.URI not in params and not flags & F.TUNNELLED:
        error = InternalError("domainMigratePrepare3 did not set uri")
        cookie = b""
    else:
        t.add("perform")
        try:
            cookie = await src.perform(dom, params, cookie, flags | protect)
            cancelled = False
        except VirtmigError as exc:
            error = exc
            # Perform rolled the source back itself; in p2p the source confirms anyway.
            notify_source = p2p
            cookie = b""

    fparams = params.copy()
    if P.DEST_NAME not in fparams:
        fparams.set(P.DEST_NAME, dom)
    t.add("finish", cancelled)
    try:
        if cancelled:
            ddom, cookie = await dst.finish(fparams, cookie, destflags, cancelled)
        else:
            ddom, cookie = await _finish_unless_aborted(src, dst, dom, fparams, cookie,
                                                        destflags)
        if cancelled:
            log.warning("finish step ignored that migration was cancelled")
    except ConnectionFailed as exc:
        ddom, cookie = None, b""
        if not cancelled:
            # The reply may be what was lost: ask the destination before resuming anything.
            outcome = await _ask_outcome(dst, fparams.get_str(P.DEST_NAME) or dom)
            if outcome is None:
                log.error("outcome of the migration of %s is unknown: the destination cannot "
                          "be reached; the source guest stays paused", dom)
                notify_source = False
                error = OperationFailed(
                    "the destination could not be reached after Finish; "
                    f"whether '{dom}' runs there is unknown, so it is left paused here: {exc}")
            elif outcome:
                ddom = fparams.get_str(P.DEST_NAME) or dom
        if ddom is None and error is None:
            error = exc
    except VirtmigError as exc:
        ddom, cookie = None, b""
        if not isinstance(exc, MigrateFinishOk) and (
            error is None
            or (cancelled and type(error) is OperationFailed and _explains_failure(exc))
        ):
            error = exc
    cancelled = ddom is None

    if notify_source:
        t.add("confirm", cancelled)
        try:
            await src.confirm(dom, params, cookie, flags | protect, cancelled)
        except VirtmigError as exc:
            log.warning("Guest %s probably left in 'paused' state on source: %s", dom, exc)

    if ddom is None:
        raise error or OperationFailed("migration failed")
    return ddom


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


async def _ask_outcome(dst: DestParty, dname: str) -> bool | None:
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
