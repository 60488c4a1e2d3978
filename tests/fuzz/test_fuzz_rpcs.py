"""Every RPC of the three services with generated requests: any field set or not, any flags,
typed params of any name and type, foreign and garbage cookies, loopback-only URIs, names and
UUIDs that exist or not, with the caller's session, a foreign session or none; the streams
(OpenSession, Events, WatchJob, Tunnel) opened, read a little and dropped; and raw bytes that
may not even decode as the request message.

After every example the daemons must be as they were (see :mod:`tests.fuzz.harness`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import grpc
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import (
    MAX_MEMORY_MIB,
    Caller,
    Env,
    check_code,
    check_status,
    expanded,
    finish_example,
)
from tests.fuzz.strategies import RequestContext, messages, texts
from virtmig.proto import virtmig_pb2 as pb
from virtmig.testing import domain_xml

_SERVICES = pb.DESCRIPTOR.services_by_name.values()
UNARY = [(s.name, m.name, getattr(pb, m.input_type.name)) for s in _SERVICES for m in s.methods
         if not m.client_streaming and not m.server_streaming]
SERVER_STREAMS = [(s.name, m.name, getattr(pb, m.input_type.name)) for s in _SERVICES
                  for m in s.methods if m.server_streaming and not m.client_streaming]
ROLES = st.sampled_from(["src", "dst"])
SESSIONS = st.sampled_from(["own", "foreign", None])
# The status gRPC's client core gives a call whose write raced the daemon's end of it.
CLIENT_WRITE_RACE = "Internal error from Core"
# What the example starts from on each daemon: no domain "fz", defined, running or paused.
SETUPS = st.sampled_from(["none", "defined", "running", "paused"])


def test_every_rpc_is_generated() -> None:
    """The generators cover every RPC the contract has (a new one joins by itself)."""
    streams = {"OpenSession", "Events", "WatchJob", "ListStream", "Tunnel"}
    methods = {m.name for s in _SERVICES for m in s.methods}
    assert {m for _s, m, _c in UNARY} | {m for _s, m, _c in SERVER_STREAMS} | {"Tunnel"} \
        == methods
    assert streams <= methods and len(UNARY) == len(methods) - len(streams)


def context(env: Env, uuid: str) -> RequestContext:
    return RequestContext(names=("fz",), uuids=(uuid,), conn_uris=(env.dst.uri, env.src.uri))


async def setup(caller: Caller, role: str, how: str, uuid: str, mib: int) -> None:
    """Domain ``fz`` on ``role`` as ``how`` says, through the public API."""
    if how == "none":
        return
    ref = pb.DomainRef(name="fz")
    xml = domain_xml("fz", memory_mib=mib, uuid=uuid)
    assert await caller.call(role, "Domains", "Define", pb.DefineRequest(xml=xml)) is not None
    if how != "defined":
        assert await caller.call(role, "Domains", "Start", pb.StartRequest(
            domain=ref, paused=how == "paused")) is not None


@st.composite
def _plans(draw: st.DrawFn, env: Env, calls: Any,
           count: int) -> tuple[Plan, list[Any]]:
    """What an example starts from, and its calls (drawn here: hypothesis draws only in the
    test's thread, never in the daemons' loop)."""
    uuid = str(draw(st.uuids(), label="uuid"))
    plan = Plan(uuid, draw(st.booleans(), label="sessions"),
                draw(st.one_of(st.integers(1, 8), st.integers(1, MAX_MEMORY_MIB["src"])),
                     label="MiB"),
                draw(SETUPS, label="src"), draw(st.sampled_from(["none", "none", "defined"]),
                                                label="dst"))
    return plan, draw(st.lists(calls_for(env, uuid, calls), min_size=1, max_size=count))


def calls_for(env: Env, uuid: str, kind: Any) -> st.SearchStrategy[Any]:
    strategy: st.SearchStrategy[Any] = kind(context(env, uuid))
    return strategy


@dataclass(frozen=True)
class Plan:
    uuid: str
    sessions: bool
    mib: int
    src: str
    dst: str


async def _start(env: Env, plan: Plan) -> Caller:
    caller = await Caller(env).open(sessions=plan.sessions)
    await setup(caller, "src", plan.src, plan.uuid, plan.mib)
    await setup(caller, "dst", plan.dst, plan.uuid, plan.mib)
    return caller


def unary_calls(ctx: RequestContext) -> st.SearchStrategy[tuple[str, str, str, Any, Any]]:
    return st.sampled_from(UNARY).flatmap(lambda rpc: st.tuples(
        ROLES, st.just(rpc[0]), st.just(rpc[1]), messages(rpc[2], ctx), SESSIONS))


@given(data=st.data())
def test_unary_calls(env: Env, data: st.DataObject) -> None:
    """A few unary calls of any RPC, on either daemon."""
    plan, calls = data.draw(_plans(env, unary_calls, 5))

    async def example() -> None:
        caller = await _start(env, plan)
        try:
            for role, service, method, request, session in calls:
                await caller.call(role, service, method, request, session=session)
        finally:
            await finish_example(env, caller)

    env.run(example())


def stream_calls(ctx: RequestContext) -> st.SearchStrategy[tuple[str, str, str, Any]]:
    server = st.sampled_from(SERVER_STREAMS).flatmap(lambda rpc: st.tuples(
        ROLES, st.just(rpc[0]), st.just(rpc[1]), messages(rpc[2], ctx)))
    tunnel = st.tuples(ROLES, st.just("Migration"), st.just("Tunnel"),
                       st.lists(messages(pb.TunnelChunk, ctx), max_size=3))
    return st.one_of(server, tunnel)


@given(data=st.data())
def test_streams(env: Env, data: st.DataObject) -> None:
    """Server streams opened, read a little and dropped; a tunnel fed chunks and dropped."""
    plan, calls = data.draw(_plans(env, stream_calls, 3))

    async def example() -> None:
        caller = await _start(env, plan)
        try:
            for role, service, method, request in calls:
                if method == "Tunnel":
                    await tunnel(caller, role, request)
                else:
                    await caller.stream(role, service, method, request)
        finally:
            await finish_example(env, caller)

    env.run(example())


async def tunnel(caller: Caller, role: str, chunks: list[Any]) -> None:
    """Chunks written one by one (until the daemon ends the call), then its final status."""
    call = caller.stub(role, "Migration").Tunnel(timeout=5)
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        for chunk in chunks:
            if call.done():
                break
            await call.write(expanded(chunk))
        if not call.done():
            await call.done_writing()
        while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
            pass
    code, details = await call.code(), await call.details()
    trailers = await call.trailing_metadata()
    if code is grpc.StatusCode.INTERNAL and details == CLIENT_WRITE_RACE and not trailers:
        return  # this client wrote to a call the daemon had just ended: the client's own status
    if code is not grpc.StatusCode.OK:
        check_code("Tunnel", code, details, trailers)


def raw_calls(ctx: RequestContext) -> st.SearchStrategy[tuple[str, str, str, bytes]]:
    def raw(rpc: tuple[str, str, Any]) -> st.SearchStrategy[tuple[str, str, str, bytes]]:
        valid = messages(rpc[2], ctx).map(lambda m: m.SerializeToString())
        data = st.one_of(st.binary(max_size=80), valid.flatmap(_mutate),
                         texts.map(str.encode))
        return st.tuples(ROLES, st.just(rpc[0]), st.just(rpc[1]), data)
    return st.sampled_from(UNARY).flatmap(raw)


@given(data=st.data())
def test_raw_request_bytes(env: Env, data: st.DataObject) -> None:
    """Bytes that need not decode as the request: a typed refusal, never UNKNOWN or INTERNAL."""
    plan, calls = data.draw(_plans(env, raw_calls, 4))

    async def example() -> None:
        caller = await _start(env, plan)
        try:
            for role, service, method, raw in calls:
                await raw_call(caller, role, service, method, raw)
        finally:
            await finish_example(env, caller)

    env.run(example())


def _mutate(data: bytes) -> st.SearchStrategy[bytes]:
    return st.tuples(st.integers(0, len(data)), st.binary(max_size=8)).map(
        lambda t: data[:t[0]] + t[1] + data[t[0] + len(t[1]):])


async def raw_call(caller: Caller, role: str, service: str, method: str, raw: bytes) -> None:
    channel = caller.conns[role]._channel
    call = channel.unary_unary(f"/virtmig.v1.{service}/{method}")  # type: ignore[call-arg]
    try:
        await call(raw, timeout=5)
    except grpc.aio.AioRpcError as exc:
        check_status(method, exc)
