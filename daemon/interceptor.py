"""The server interceptor: the one place where a call is authorized and admitted, and where a
handler's exception becomes a gRPC status.

Every RPC handler, unary or streaming, runs inside a wrapper made here.  Before the handler runs
(before it reads a request of a stream, too), the wrapper asks the server's
:class:`~virtmig.daemon.authz.Policy` whether this caller may call this method (its full name,
``/virtmig.v1.Migration/Begin3``, has a role in :data:`~virtmig.daemon.authz.ROLES`); a refused
call ends with PERMISSION_DENIED naming the caller, is logged once at WARNING, and the handler
never runs.

Which listener a call came on: a daemon runs one gRPC server per trust level, each with its own
interceptor and policy: the main server (TLS listeners, the main unix socket, and plain TCP
listeners the operator asked for) and, if configured, the read-only socket's server.  On the
main server, ``auth_context()`` tells a TLS connection (``transport_security_type`` "ssl", with
the client's certificate) from the others, which all have full access; so nothing depends on
parsing ``context.peer()``, and gRPC, which exposes no local address to a handler, never has to
tell two unix sockets apart.

Once authorized, a call takes a slot of the daemon's :class:`~virtmig.daemon.limits.CallLimits`
(``max_clients``, ``max_calls_per_client``), shared by all its servers; a call beyond them ends
with RESOURCE_EXHAUSTED naming the limit, logged at WARNING, and the handler never runs.  The
slot is given back when the call ends however it ends: when the handler returns or raises (before
the status goes out: a client that calls again at once finds it free), and
(through ``context.add_done_callback``) when gRPC ends the call, so that a stream cancelled
while it waits to send frees its slot at once.

An exception becomes the status code, details and ``virtmig-error`` trailer of
:func:`virtmig.proto.errors.to_status` (the client turns them back into the same class).  A
:class:`~virtmig.proto.errors.VirtmigError` (the caller's mistake, or a failure the daemon
foresaw) is logged in one line without a traceback: at INFO, at WARNING for an InternalError;
any other exception is a bug of the daemon's: INTERNAL, logged with its traceback.  Log
arguments are escaped and truncated (:mod:`virtmig.proto.logsafe`).  Cancellation and a
handler's own ``context.abort`` pass through untouched.

A request gRPC cannot decode (bytes that are not UTF-8 in a string field, a garbled message) is
INVALID_ARGUMENT like any other bad input (:mod:`virtmig.daemon.decode`), not gRPC's UNKNOWN.

With a :class:`~virtmig.daemon.metrics.Metrics`, every call that passed the interceptor, unary or
streaming, is counted by its method and final status code (a refusal too; ``CANCELLED`` for a
stream gRPC closed because its client went away) and timed, before its status or last reply goes
out (so a client that scrapes right after a call finds it counted).

Streaming handlers must be async generator functions (as every virtmig servicer's are): gRPC
picks its calling convention from the wrapper, which is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from virtmig.daemon import decode
from virtmig.daemon.authz import Policy
from virtmig.daemon.limits import CallLimits, Slot
from virtmig.daemon.metrics import Metrics
from virtmig.proto import logsafe
from virtmig.proto.errors import (
    InternalError,
    PermissionDenied,
    ResourceExhausted,
    VirtmigError,
    to_status,
)

log = logsafe.logger(__name__)

#: The most methods whose wrapped handlers an interceptor keeps (the servicers' methods are
#: fewer; unknown methods have no handler and are never kept).
_MAX_WRAPPED = 256

Handler = grpc.RpcMethodHandler  # generic in grpc-stubs only: annotations say Handler[Any, Any]
UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler the server finds: authorized by ``policy``, admitted by ``limits``
    (None: no limits), errors mapped to gRPC status."""

    def __init__(self, policy: Policy | None = None, limits: CallLimits | None = None,
                 metrics: Metrics | None = None) -> None:
        self.policy = policy or Policy()
        self.limits = limits
        self.metrics = metrics
        # Each method's handler as wrapped last, with what it was wrapped with: a call reuses
        # it while the servicer's handler and the policy (a reload replaces it) are the same.
        self._wrapped: dict[str, tuple[Handler[Any, Any], Policy, Handler[Any, Any]]] = {}
        self.wraps = 0  # handlers wrapped (tests count them)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        method, policy = handler_call_details.method, self.policy
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler and known[1] is policy:
            return known[2]
        wrapped = wrap_handler(handler, method, policy, self.limits, self.metrics)
        self.wraps += 1
        if len(self._wrapped) < _MAX_WRAPPED or method in self._wrapped:
            self._wrapped[method] = (handler, policy, wrapped)
        return wrapped


def wrap_handler(handler: Handler[Any, Any], method: str, policy: Policy | None = None,
                 limits: CallLimits | None = None,
                 metrics: Metrics | None = None) -> Handler[Any, Any]:
    """``handler`` with its behaviour wrapped; ``method`` is the RPC's full name; ``metrics``
    (if any) counts each call by its status code and times it."""
    gate = _Gate(method, policy or Policy(), limits, metrics)
    codecs: dict[str, Any] = {"request_deserializer": decode.checked(
                                  handler.request_deserializer),
                              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, gate, decode.check), **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response(handler.unary_stream, gate, decode.check), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(handler.stream_unary, gate, decode.checked_stream), **codecs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(handler.stream_stream, gate, decode.checked_stream), **codecs)
    raise TypeError(f"{method}: the handler has no behaviour")


class _Gate:
    """What a call passes before its handler runs: authorization, then admission.

    A call is counted in the metrics *before* its status goes out: gRPC's ``context.abort``
    sends the status and only then raises, so a client that has seen the status (and scrapes
    at once) would otherwise find its call not counted yet."""

    def __init__(self, method: str, policy: Policy, limits: CallLimits | None,
                 metrics: Metrics | None = None) -> None:
        self.method, self.policy, self.limits, self.metrics = method, policy, limits, metrics

    def count(self, code: str, started: float) -> None:
        """Count the call that ends with ``code`` (``OK``, ``NOT_FOUND``...), which began at
        ``started`` (monotonic clock), in the metrics."""
        if self.metrics is not None:
            self.metrics.rpc(self.method, code, time.monotonic() - started)

    async def refuse(self, context: grpc.aio.ServicerContext[Any, Any], exc: Exception,
                     started: float) -> NoReturn:
        """End the call with ``exc``'s status, counted first."""
        code, details, trailers = to_status(exc)
        self.count(code.name, started)
        context.set_trailing_metadata(trailers)
        await context.abort(code, details)

    async def enter(self, context: grpc.aio.ServicerContext[Any, Any], request: object,
                    started: float) -> Slot | None:
        """The call's slot (None without limits); a call that ends here, refused (aborted) or
        otherwise, is counted.  ``request``: a unary request, whose fields may raise the role
        (authz.SECRET_FIELDS)."""
        try:
            return await self._admit(context, request, started)
        except grpc.aio.AbortError:  # refused: counted by refuse
            raise
        except BaseException as exc:
            self.count(_ended_by(context, exc), started)
            raise

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], request: object,
                     started: float) -> Slot | None:
        try:
            self.policy.check(self.method, context.auth_context(), request)
        except PermissionDenied as exc:
            log.warning("refused %s from %s: %s", self.method.rsplit("/", 1)[-1],
                        context.peer(), exc)
            await self.refuse(context, exc, started)
        if self.limits is None:
            return None
        try:
            slot = self.limits.admit(context.peer())
        except ResourceExhausted as exc:
            log.warning("refused %s from %s: %s", self.method.rsplit("/", 1)[-1],
                        context.peer(), exc)
            await self.refuse(context, exc, started)
        # (grpc-stubs declare the callback as a class of their own: any callable is taken)
        context.add_done_callback(lambda _context: slot.release())  # type: ignore[arg-type]
        return slot


def _unary_response(behaviour: Any, gate: _Gate,
                    decoded: Callable[[Any], Any]) -> UnaryBehaviour:
    @functools.wraps(behaviour)
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = time.monotonic()
        slot = await gate.enter(context, request, started)
        try:
            response = await behaviour(decoded(request), context)
        except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
            gate.count(_ended_by(context, exc), started)
            raise
        except Exception as exc:
            await _abort(context, gate, exc, started, slot)
        finally:
            if slot is not None:
                slot.release()
        gate.count("OK", started)
        return response

    return wrapper


def _stream_response(behaviour: Any, gate: _Gate,
                     decoded: Callable[[Any], Any]) -> StreamBehaviour:
    @functools.wraps(behaviour)
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> AsyncIterator[Any]:
        started = time.monotonic()
        slot = await gate.enter(context, request, started)
        try:
            # aclosing: when gRPC closes this generator, the handler's own `finally` runs now.
            async with contextlib.aclosing(behaviour(decoded(request), context)) as responses:
                async for response in responses:
                    yield response
        except (grpc.aio.AbortError, asyncio.CancelledError) as exc:
            gate.count(_ended_by(context, exc), started)
            raise
        except GeneratorExit:  # gRPC closed the stream: the client went away
            gate.count("CANCELLED", started)
            raise
        except Exception as exc:
            await _abort(context, gate, exc, started, slot)
        finally:
            if slot is not None:
                slot.release()
        gate.count("OK", started)

    return wrapper


def _ended_by(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> str:
    """The status code, as its name, of a call that ``exc`` (not raised by the gate) ended."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    try:
        code = context.code()
    except Exception:  # a context without the call's state (in unit tests)
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


async def _abort(context: grpc.aio.ServicerContext[Any, Any], gate: _Gate, exc: Exception,
                 started: float, slot: Slot | None) -> NoReturn:
    """Called while ``exc`` is being handled: log it, give the call's slot back, then end the
    RPC with its status (counted): all before the status goes out, so a client that calls or
    scrapes again at once finds the call over."""
    if slot is not None:
        slot.release()
    code, details, _ = to_status(exc)
    name = gate.method.rsplit("/", 1)[-1]
    if not isinstance(exc, VirtmigError):
        log.exception("internal error in %s", name)  # a bug of the daemon's: its traceback
    elif isinstance(exc, InternalError) and code is grpc.StatusCode.INTERNAL:
        log.warning("%s failed: %s", name, details)
    else:
        log.info("%s failed: %s", name, details)
    await gate.refuse(context, exc, started)
