"""The server interceptor: every handler's errors reach the caller as a status with trailers.

Through a real daemon (unary and streaming RPCs, raw stubs, so the status is seen before the
client library maps it), on single wrapped behaviours with a stand-in context (logging, aborts,
streams that fail part-way), and over the generated service descriptor: every RPC the services
declare is registered and comes out of the interceptor wrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import domain_xml, start_host, stop_host
from virtmig.daemon import interceptor
from virtmig.daemon.authz import Policy
from virtmig.daemon.health import Health
from virtmig.daemon.interceptor import StatusInterceptor, wrap_handler
from virtmig.daemon.limits import CallLimits
from virtmig.daemon.metrics import Metrics
from virtmig.daemon.server import add_services
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import ERROR_METADATA_KEY, NoDomain

Status = tuple[grpc.StatusCode, str, dict[str, str]]


async def status_of(call: Any) -> Status:
    """Run a call to its end; its status code, details and trailing metadata."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    trailers = {str(k): str(v) for k, v in await call.trailing_metadata()}
    return await call.code(), await call.details(), trailers


async def tunnel_to(conn: Any, dname: str) -> Any:
    call = conn.migration_stub.Tunnel()
    await call.write(pb.TunnelChunk(dname=dname))
    await call.done_writing()
    return call


NOPE = pb.DomainRef(name="nope")
NO_DOMAIN = "Domain not found: no domain with matching name 'nope'"

CALLS: dict[str, Callable[[Any], Any]] = {
    # unary
    "Lookup": lambda c: c.domains_stub.Lookup(pb.DomainRequest(domain=NOPE)),
    "GetJobInfo": lambda c: c.migration_stub.GetJobInfo(pb.JobInfoRequest(domain=NOPE)),
    # unary -> stream
    "WatchJob": lambda c: c.migration_stub.WatchJob(pb.JobInfoRequest(domain=NOPE)),
    "Events": lambda c: c.domains_stub.Events(pb.EventsRequest(domain=NOPE)),
}


@pytest.fixture
async def conn(tmp_path: Path) -> AsyncIterator[Any]:
    host = await start_host(tmp_path, "h")
    try:
        await host.conn.define(domain_xml("vm1"))
        yield host.conn
    finally:
        await stop_host(host)


@pytest.mark.parametrize("rpc", sorted(CALLS))
async def test_an_error_reaches_the_caller_as_status_and_trailers(conn: Any, rpc: str) -> None:
    code, details, trailers = await status_of(CALLS[rpc](conn))
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, NO_DOMAIN)
    assert trailers[ERROR_METADATA_KEY] == "NoDomain"


async def test_a_bidirectional_stream_error_is_mapped_too(conn: Any) -> None:
    code, details, trailers = await status_of(await tunnel_to(conn, "nope"))
    assert (code, details, trailers[ERROR_METADATA_KEY]) == (
        grpc.StatusCode.NOT_FOUND, NO_DOMAIN, "NoDomain")
    code, details, trailers = await status_of(await tunnel_to(conn, "vm1"))
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert details == ("Requested operation is not valid: domain 'vm1' is not waiting for a "
                       "tunnelled migration")
    assert trailers[ERROR_METADATA_KEY] == "OperationInvalid"


async def test_a_missing_domain_key_is_an_invalid_argument(conn: Any) -> None:
    code, details, trailers = await status_of(
        conn.domains_stub.GetState(pb.DomainRequest(domain=pb.DomainRef())))
    assert (code, trailers[ERROR_METADATA_KEY]) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                    "InvalidArgument")
    assert details == "invalid argument: a domain name or uuid is required"


# --- single behaviours, with a stand-in context -------------------------------------------------


class Context:
    """What the wrapper uses of ``grpc.aio.ServicerContext``; ``abort`` raises as gRPC's does.

    ``auth``: the connection's ``auth_context()`` (default: a plain one, as on the unix
    socket).
    """

    def __init__(self, auth: dict[str, list[bytes]] | None = None) -> None:
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.auth = auth if auth is not None else {"transport_security_type": [b"insecure"]}

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def peer(self) -> str:
        return "unix:"

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


METHOD = "/virtmig.v1.Domains/Lookup"


async def test_expected_failure_is_logged_at_info(caplog: pytest.LogCaptureFixture) -> None:
    async def behaviour(request: object, context: object) -> object:
        raise NoDomain("gone")

    ctx = Context()
    caplog.set_level(logging.INFO, logger=interceptor.__name__)
    with pytest.raises(grpc.aio.AbortError):
        await wrapped(grpc.unary_unary_rpc_method_handler(behaviour)).unary_unary(None, ctx)
    assert ctx.aborted == (grpc.StatusCode.NOT_FOUND, "Domain not found: gone")
    assert ctx.trailers == ((ERROR_METADATA_KEY, "NoDomain"),)
    [record] = caplog.records
    assert (record.levelno, record.getMessage()) == (logging.INFO,
                                                     "Lookup failed: Domain not found: gone")
    assert record.exc_info is None


async def test_internal_error_is_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def behaviour(request: object, context: object) -> object:
        raise RuntimeError("bug")

    ctx = Context()
    with pytest.raises(grpc.aio.AbortError):
        await wrapped(grpc.unary_unary_rpc_method_handler(behaviour)).unary_unary(None, ctx)
    assert ctx.aborted == (grpc.StatusCode.INTERNAL, "internal error: RuntimeError: bug")
    assert ctx.trailers == ((ERROR_METADATA_KEY, "InternalError"),)
    [record] = [r for r in caplog.records if r.name == interceptor.__name__]
    assert (record.levelno, record.getMessage()) == (logging.ERROR, "internal error in Lookup")
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_a_stream_fails_after_what_it_sent() -> None:
    async def behaviour(request: object, context: object) -> AsyncIterator[int]:
        yield 1
        raise NoDomain("gone")

    ctx = Context()
    got = []
    with pytest.raises(grpc.aio.AbortError):
        async for item in wrapped(grpc.unary_stream_rpc_method_handler(behaviour)).unary_stream(
                None, ctx):
            got.append(item)
    assert got == [1]
    assert ctx.aborted == (grpc.StatusCode.NOT_FOUND, "Domain not found: gone")


async def test_a_handlers_own_abort_and_cancellation_pass_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def aborts(request: object, context: Context) -> object:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "own")
        return None

    async def cancelled(request: object, context: object) -> object:
        raise asyncio.CancelledError()

    ctx = Context()
    with pytest.raises(grpc.aio.AbortError):
        await wrapped(grpc.unary_unary_rpc_method_handler(aborts)).unary_unary(None, ctx)
    assert ctx.aborted == (grpc.StatusCode.UNAVAILABLE, "own") and ctx.trailers == ()
    ctx = Context()
    with pytest.raises(asyncio.CancelledError):
        await wrapped(grpc.unary_unary_rpc_method_handler(cancelled)).unary_unary(None, ctx)
    assert ctx.aborted is None
    assert not [r for r in caplog.records if r.name == interceptor.__name__]


async def test_a_stream_closed_by_grpc_closes_the_handler_at_once() -> None:
    closed = []

    async def behaviour(request: object, context: object) -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    stream = wrapped(grpc.unary_stream_rpc_method_handler(behaviour)).unary_stream(None, Context())
    assert await anext(stream) == 1
    await stream.aclose()
    assert closed == [True]


class CountingContext(Context):
    """A context whose ``abort`` (which, in gRPC, sends the status before it raises) records
    how many calls of ``METHOD`` the metrics had counted by then, by code."""

    def __init__(self, metrics: Metrics, auth: dict[str, list[bytes]] | None = None) -> None:
        super().__init__(auth)
        self.metrics = metrics
        self.counted_at_abort: dict[str, float] = {}

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.counted_at_abort = rpc_counts(self.metrics)
        await super().abort(code, details)


def rpc_counts(metrics: Metrics) -> dict[str, float]:
    return {s.labels["code"]: s.value for m in metrics.rpcs.collect() for s in m.samples
            if s.name == "virtmig_rpc_total" and s.labels["method"] == METHOD.lstrip("/")}


async def test_a_call_is_counted_before_its_status_goes_out() -> None:
    """A client that has its status and scrapes at once finds its call counted: a failed call,
    a refused one, and one that succeeded."""
    async def fails(request: object, context: object) -> object:
        raise NoDomain("gone")

    async def answers(request: object, context: object) -> object:
        return "answer"

    metrics = Metrics(cast(Any, ()))  # no domains: only the RPC counters are read
    ctx = CountingContext(metrics)
    with pytest.raises(grpc.aio.AbortError):
        await counted(fails, metrics)(None, ctx)
    assert ctx.counted_at_abort == {"NOT_FOUND": 1}
    refused = CountingContext(metrics, auth={"transport_security_type": [b"ssl"]})
    with pytest.raises(grpc.aio.AbortError):
        await counted(answers, metrics, Policy(allowed_dns=("O=virtmig,CN=nobody",)))(
            None, refused)
    assert refused.aborted is not None and refused.aborted[0] is grpc.StatusCode.PERMISSION_DENIED
    assert refused.counted_at_abort == {"NOT_FOUND": 1, "PERMISSION_DENIED": 1}
    assert await counted(answers, metrics)(None, Context()) == "answer"
    assert rpc_counts(metrics) == {"NOT_FOUND": 1, "PERMISSION_DENIED": 1, "OK": 1}


async def test_a_failed_call_gives_its_slot_back_before_its_status_goes_out() -> None:
    """A client allowed one call at a time, whose call failed, may call again as soon as it has
    the status: unary and streaming."""
    async def fails(request: object, context: object) -> object:
        raise NoDomain("gone")

    async def fails_streaming(request: object, context: object) -> AsyncIterator[int]:
        yield 1
        raise NoDomain("gone")

    limits = CallLimits(max_clients=1, max_calls_per_client=1)
    in_flight_at_abort: list[int] = []

    class Watching(Context):
        def add_done_callback(self, callback: Callable[[object], None]) -> None:
            pass  # (gRPC calls it when the call is over: after the status went out)

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            in_flight_at_abort.append(limits.clients)
            await super().abort(code, details)

    unary: Any = wrap_handler(grpc.unary_unary_rpc_method_handler(fails), METHOD, None, limits)
    with pytest.raises(grpc.aio.AbortError):
        await unary.unary_unary(None, Watching())
    streaming: Any = wrap_handler(grpc.unary_stream_rpc_method_handler(fails_streaming),
                                  METHOD, None, limits)
    with pytest.raises(grpc.aio.AbortError):
        async for _ in streaming.unary_stream(None, Watching()):
            pass
    assert in_flight_at_abort == [0, 0]


async def test_a_stream_is_counted_too() -> None:
    """A stream that ends, one that fails part-way (counted before its status goes out) and one
    that gRPC closes (the client went away): OK, NOT_FOUND, CANCELLED."""
    async def two(request: object, context: object) -> AsyncIterator[int]:
        yield 1
        yield 2

    async def fails(request: object, context: object) -> AsyncIterator[int]:
        yield 1
        raise NoDomain("gone")

    metrics = Metrics(cast(Any, ()))

    def stream(behaviour: Any, ctx: Context) -> Any:
        handler: Any = wrap_handler(grpc.unary_stream_rpc_method_handler(behaviour), METHOD,
                                    metrics=metrics)
        return handler.unary_stream(None, ctx)

    assert [item async for item in stream(two, Context())] == [1, 2]
    ctx = CountingContext(metrics)
    with pytest.raises(grpc.aio.AbortError):
        async for _ in stream(fails, ctx):
            pass
    assert ctx.counted_at_abort == {"OK": 1, "NOT_FOUND": 1}
    closed = stream(two, Context())
    assert await anext(closed) == 1
    await closed.aclose()
    assert rpc_counts(metrics) == {"OK": 1, "NOT_FOUND": 1, "CANCELLED": 1}


def counted(behaviour: Any, metrics: Metrics, policy: Policy | None = None) -> Any:
    """``behaviour`` as a unary method of ``METHOD`` wrapped with ``metrics``."""
    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    return wrap_handler(handler, METHOD, policy, metrics=metrics).unary_unary


def wrapped(handler: Any) -> Any:
    return wrap_handler(handler, METHOD)


# --- every RPC is covered ------------------------------------------------------------------------


class Recorder:
    """Stands in for the server in ``add_services``: keeps the generic handlers it is given
    (and the "registered methods", which it should not be given)."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.registered[f"/{service}/{name}"] = handler

    def handler(self, method: str) -> Any:
        """The handler the server finds for ``method``, as grpc.aio's does for a method that is
        not registered: the first generic handler's that serves it."""
        for generic in self.generic:
            found = generic.service(Details(method))
            if found is not None:
                return found
        return None


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def _behaviour(handler: Any) -> Any:
    [behaviour] = [getattr(handler, kind) for kind in
                   ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                   if getattr(handler, kind) is not None]
    return behaviour


async def test_every_rpc_of_the_descriptor_is_registered_and_wrapped() -> None:
    recorder = Recorder()
    add_services(cast(Any, recorder), cast(Any, SimpleNamespace(health=Health())))
    # virtmig's services, and the standard health and reflection services beside them
    declared = {f"/{service.full_name}/{m.name}": m
                for f in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
                for service in f.services_by_name.values() for m in service.methods}
    assert len(declared) > 30
    assert recorder.handler("/virtmig.v1.Domains/NoSuchCall") is None
    for name, method in declared.items():
        original = recorder.handler(name)
        assert original is not None, name

        async def continuation(details: object, original: Any = original) -> Any:
            return original

        handler = await StatusInterceptor().intercept_service(continuation,
                                                              cast(Any, Details(name)))
        assert (handler.request_streaming, handler.response_streaming) == (
            method.client_streaming, method.server_streaming), name
        behaviour = _behaviour(handler)
        assert behaviour.__wrapped__ is _behaviour(original), name
        assert behaviour.__code__.co_filename == interceptor.__file__, name
        # gRPC picks its calling convention from the function it is given.
        if method.server_streaming:
            assert inspect.isasyncgenfunction(behaviour), name
        else:
            assert inspect.iscoroutinefunction(behaviour), name


def test_no_method_is_given_to_the_server_as_a_registered_method() -> None:
    """grpc.aio's server waits on a pending request per registered method for every call it
    receives (issue 17: that wait cost more than dispatching the call): virtmig's services,
    health and reflection are generic handlers only."""
    recorder = Recorder()
    add_services(cast(Any, recorder), cast(Any, SimpleNamespace(health=Health())))
    assert recorder.registered == {}
    assert recorder.generic
