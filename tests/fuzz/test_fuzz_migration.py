"""Migration sequences, structurally valid and semantically wrong: the v3 phases in libvirt's
order, then shuffled, repeated, dropped; cookies of the right phase, of another phase, of
another migration or garbage; legacy and *Params forms; base flags or any flags; with the
caller's session, a foreign one or none; aborts, destroys and tuning calls in between.

Each example migrates guest ``fz`` (test backend; usually a few MiB, up to twice the source's
memory limit; any dirty rate, absurd ones included: a guest that never converges is aborted by
the daemons' completion timeout) from ``src`` to ``dst`` as far as its steps get; afterwards
both daemons must be as they were (see :mod:`tests.fuzz.harness`):
whatever the order, no job, guest, port or file is left behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.harness import MAX_MEMORY_MIB, Caller, Env, finish_example
from tests.fuzz.strategies import (
    conn_uris,
    dirty_rates,
    flags_words,
    foreign_cookies,
    migrate_uris,
    names,
    raw_cookies,
    typed_param,
    xml_docs,
)
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.flags import MigrateFlags as F
from virtmig.proto.params import MigrateParam as P
from virtmig.testing import domain_xml

PHASES = ("begin", "prepare", "perform", "finish", "confirm")
# The phase whose output cookie a phase takes in libvirt's order.
PREVIOUS = {"prepare": "begin", "perform": "prepare", "finish": "perform", "confirm": "finish"}
OTHER_STEPS = ("abort", "destroy_src", "destroy_dst", "speed", "postcopy", "jobinfo")
BASE_FLAGS = [F.LIVE, F.LIVE | F.CHANGE_PROTECTION, F.LIVE | F.PERSIST_DEST,
              F.LIVE | F.PAUSED | F.UNDEFINE_SOURCE | F.PERSIST_DEST,
              F.OFFLINE | F.PERSIST_DEST, F.LIVE | F.POSTCOPY, F.PEER2PEER | F.LIVE,
              F.PEER2PEER | F.TUNNELLED | F.LIVE, F(0)]


@dataclass(frozen=True)
class Step:
    kind: str
    params_form: bool = True
    flags: int | None = None  # None: the example's base flags
    cookie: str | bytes = "prev"  # "prev", "any", "none", or the bytes to send
    cancelled: bool = False
    session: str | None = "own"
    dname: str | None = None
    uri: str | None = None  # None: Prepare's uri_out (Perform), the daemon's choice (Prepare)
    extra: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Plan:
    uuid: str
    mib: int
    dirty_mib: str  # the guest's dirty-rate-mib option
    paused: bool
    persistent: bool
    sessions: bool
    flags: int
    steps: tuple[Step, ...]


def steps(xml: st.SearchStrategy[str]) -> st.SearchStrategy[Step]:
    cookie = st.one_of(st.sampled_from(["prev", "prev", "any", "none"]), raw_cookies,
                       foreign_cookies())
    uri = st.one_of(st.none(), st.none(), migrate_uris(), conn_uris())
    return st.builds(
        Step, st.sampled_from(PHASES + OTHER_STEPS), st.booleans(),
        st.one_of(st.none(), st.none(), flags_words), cookie, st.booleans(),
        st.sampled_from(["own", "own", "foreign", None]),
        st.one_of(st.none(), st.none(), st.just("fz"), names), uri,
        st.lists(typed_param(xml), max_size=2).map(tuple))


def canonical(flags: int) -> st.SearchStrategy[list[Step]]:
    """libvirt's order, each step as the sequence driver would call it, or slightly off."""
    order = [Step(p) for p in PHASES]
    if flags & F.PEER2PEER:
        order = [Step("perform")]
    return st.just(order)


@st.composite
def perturbed(draw: st.DrawFn, base: list[Step], step: st.SearchStrategy[Step]) -> list[Step]:
    out = list(base)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "dup", "swap", "insert", "replace"]))
        i = draw(st.integers(0, max(0, len(out) - 1)))
        if op == "drop" and out:
            del out[i]
        elif op == "dup" and out:
            out.insert(i, out[i])
        elif op == "swap" and len(out) > 1:
            j = draw(st.integers(0, len(out) - 1))
            out[i], out[j] = out[j], out[i]
        elif op == "insert":
            out.insert(i, draw(step))
        elif out:
            out[i] = draw(step)
    return out


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    flags = int(draw(st.sampled_from(BASE_FLAGS), label="flags"))
    step = steps(xml_docs())
    kind = draw(st.sampled_from(["canonical", "perturbed", "perturbed", "random"]))
    seq = draw({"canonical": canonical(flags),
                "perturbed": canonical(flags).flatmap(lambda b: perturbed(b, step)),
                "random": st.lists(step, min_size=1, max_size=7)}[kind], label=kind)
    mib = st.one_of(st.integers(1, 4), st.integers(1, 4),
                    st.integers(1, 2 * MAX_MEMORY_MIB["src"]))  # (the source's limit)
    return Plan(str(draw(st.uuids())), draw(mib, label="MiB"), draw(dirty_rates, label="dirty"),
                draw(st.booleans(), label="paused"), draw(st.booleans(), label="persistent"),
                draw(st.booleans(), label="sessions"), flags, tuple(seq))


@dataclass
class Run:
    """What the example's steps handed on: the XML from Begin, cookies by phase, the URI."""

    xml: str
    cookies: dict[str, bytes] = field(default_factory=dict)
    last: bytes = b""
    uri_out: str = ""

    def cookie(self, step: Step) -> bytes:
        if isinstance(step.cookie, bytes):
            return step.cookie
        if step.cookie == "prev":
            return self.cookies.get(PREVIOUS.get(step.kind, ""), b"")
        return self.last if step.cookie == "any" else b""

    def keep(self, phase: str, cookie: bytes) -> None:
        self.cookies[phase] = cookie
        self.last = cookie


@given(plan=plans())
def test_migration_sequences(env: Env, plan: Plan) -> None:
    async def example() -> None:
        caller = await Caller(env).open(sessions=plan.sessions)
        try:
            xml = domain_xml("fz", memory_mib=plan.mib, uuid=plan.uuid,
                             extra_options=f"dirty-rate-mib={quoteattr(plan.dirty_mib)}")
            ref = pb.DomainRef(name="fz")
            await caller.call("src", "Domains", "Define", pb.DefineRequest(xml=xml))
            await caller.call("src", "Domains", "Start", pb.StartRequest(
                domain=ref, paused=plan.paused))
            if not plan.persistent:  # a transient guest: its definition dropped while it runs
                await caller.call("src", "Domains", "Undefine", pb.DomainRequest(domain=ref))
            run = Run(xml)
            for step in plan.steps:
                await do_step(env, caller, plan, run, step)
        finally:
            await finish_example(env, caller)

    env.run(example())


def _params(*pairs: tuple[str, Any], extra: tuple[Any, ...] = ()) -> list[pb.TypedParam]:
    out = []
    for name, value in pairs:
        if value is None:
            continue
        kind = "ullong" if isinstance(value, int) else "string"
        out.append(pb.TypedParam(name=name, **{kind: value}))
    return out + list(extra)


async def do_step(env: Env, caller: Caller, plan: Plan, run: Run, step: Step) -> None:
    flags = plan.flags if step.flags is None else step.flags
    ref = pb.DomainRef(name="fz")
    cookie = run.cookie(step)
    s = step.session
    if step.kind == "begin":
        if step.params_form:
            req: Any = pb.Begin3ParamsRequest(domain=ref, flags=flags, params=_params(
                (P.DEST_NAME, step.dname), extra=step.extra))
            reply = await caller.call("src", "Migration", "Begin3Params", req, session=s)
        else:
            req = pb.Begin3Request(domain=ref, flags=flags)
            if step.dname is not None:
                req.dname = step.dname
            reply = await caller.call("src", "Migration", "Begin3", req, session=s)
        if reply is not None:
            run.xml = reply.xml
            run.keep("begin", reply.cookie_out)
    elif step.kind == "prepare":
        if step.params_form:
            req = pb.Prepare3ParamsRequest(cookie_in=cookie, flags=flags, params=_params(
                (P.DEST_XML, run.xml), (P.DEST_NAME, step.dname), (P.URI, step.uri),
                extra=step.extra))
            reply = await caller.call("dst", "Migration", "Prepare3Params", req, session=s)
        else:
            req = pb.Prepare3Request(cookie_in=cookie, flags=flags, dom_xml=run.xml)
            if step.uri is not None:
                req.uri_in = step.uri
            reply = await caller.call("dst", "Migration", "Prepare3", req, session=s)
        if reply is not None:
            run.keep("prepare", reply.cookie_out)
            run.uri_out = reply.uri_out if reply.HasField("uri_out") else ""
    elif step.kind == "perform":
        await _perform(env, caller, run, step, flags, cookie)
    elif step.kind == "finish":
        params = _params((P.DEST_NAME, step.dname or "fz"), (P.URI, step.uri), extra=step.extra)
        reply = await caller.call("dst", "Migration", "Finish3Params", pb.Finish3ParamsRequest(
            cookie_in=cookie, flags=flags, cancelled=step.cancelled, params=params), session=s)
        if reply is not None:
            run.keep("finish", reply.cookie_out)
    elif step.kind == "confirm":
        await caller.call("src", "Migration", "Confirm3Params", pb.Confirm3ParamsRequest(
            domain=ref, cookie_in=cookie, flags=flags, cancelled=step.cancelled,
            params=list(step.extra)), session=s)
    else:
        await _other(caller, step, ref, flags)


async def _perform(env: Env, caller: Caller, run: Run, step: Step, flags: int,
                   cookie: bytes) -> None:
    ref = pb.DomainRef(name="fz")
    uri = step.uri if step.uri is not None else run.uri_out or None
    dconnuri = env.dst.uri if flags & (F.PEER2PEER | F.TUNNELLED) else None
    if step.params_form:
        req: Any = pb.Perform3ParamsRequest(domain=ref, cookie_in=cookie, flags=flags,
                                            params=_params((P.URI, uri), extra=step.extra))
        if dconnuri is not None:
            req.dconnuri = dconnuri
        reply = await caller.call("src", "Migration", "Perform3Params", req,
                                  session=step.session)
    else:
        req = pb.Perform3Request(domain=ref, cookie_in=cookie, flags=flags)
        if uri is not None:
            req.uri = uri
        if dconnuri is not None:
            req.dconnuri = dconnuri
        reply = await caller.call("src", "Migration", "Perform3", req, session=step.session)
    if reply is not None:
        run.keep("perform", reply.cookie_out)


async def _other(caller: Caller, step: Step, ref: pb.DomainRef, flags: int) -> None:
    req = pb.DomainRequest(domain=ref)
    if step.kind == "abort":
        await caller.call("src", "Migration", "AbortJob", pb.AbortJobRequest(
            domain=ref, flags=flags & 2))
    elif step.kind == "destroy_src":
        await caller.call("src", "Domains", "Destroy", req)
    elif step.kind == "destroy_dst":
        await caller.call("dst", "Domains", "Destroy", req)
    elif step.kind == "speed":
        await caller.call("src", "Migration", "SetMaxSpeed", pb.SpeedRequest(
            domain=ref, bandwidth_mib=flags % 4096, flags=flags & 1))
    elif step.kind == "postcopy":
        await caller.call("src", "Migration", "StartPostCopy", req)
    else:
        for role in ("src", "dst"):
            await caller.call(role, "Migration", "GetJobInfo", pb.JobInfoRequest(domain=ref))
