"""The server interceptor: the one place where a handler's exception becomes a gRPC status.

Every RPC handler, unary or streaming, runs inside a wrapper made here.  An exception becomes the
status code, details and ``virtmig-error`` trailer of :func:`virtmig.proto.errors.to_status`
(the client turns them back into the same class); an expected failure is logged at INFO, an
INTERNAL one (a bug) with its traceback.  Cancellation and a handler's own ``context.abort``
pass through untouched.

The wrapper knows the RPC's full method name (``/virtmig.v1.Migration/Begin3``) before the
handler runs: authentication, authorization (one table of RPC -> role) and metrics hook in at
:meth:`StatusInterceptor.intercept_service`, before any handler.

Streaming handlers must be async generator functions (as every virtmig servicer's are): gRPC
picks its calling convention from the wrapper, which is one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from virtmig.proto.errors import to_status

log = logging.getLogger(__name__)

Handler = grpc.RpcMethodHandler  # generic in grpc-stubs only: annotations say Handler[Any, Any]
UnaryBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehaviour = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


class StatusInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every handler the server finds so that its errors map to gRPC status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        return wrap_handler(handler, handler_call_details.method)


def wrap_handler(handler: Handler[Any, Any], method: str) -> Handler[Any, Any]:
    """``handler`` with its behaviour wrapped; ``method`` is the RPC's full name."""
    codecs: dict[str, Any] = {"request_deserializer": handler.request_deserializer,
                              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, method), **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response(handler.unary_stream, method), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(handler.stream_unary, method), **codecs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _stream_response(handler.stream_stream, method), **codecs)
    raise TypeError(f"{method}: the handler has no behaviour")


def _unary_response(behaviour: Any, method: str) -> UnaryBehaviour:
    @functools.wraps(behaviour)
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return wrapper


def _stream_response(behaviour: Any, method: str) -> StreamBehaviour:
    @functools.wraps(behaviour)
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                      ) -> AsyncIterator[Any]:
        try:
            # aclosing: when gRPC closes this generator, the handler's own `finally` runs now.
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, method, exc)

    return wrapper


async def _abort(context: grpc.aio.ServicerContext[Any, Any], method: str,
                 exc: Exception) -> NoReturn:
    """Called while ``exc`` is being handled: log it, then end the RPC with its status."""
    code, details, trailers = to_status(exc)
    name = method.rsplit("/", 1)[-1]
    if code is grpc.StatusCode.INTERNAL:
        log.exception("internal error in %s", name)
    else:
        log.info("%s failed: %s", name, details)
    context.set_trailing_metadata(trailers)
    await context.abort(code, details)
