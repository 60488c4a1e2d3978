"""Generated domain XML (a small grammar of valid-ish documents, then random edits: cuts,
splices of markup, entities, DOCTYPEs, deep nesting, duplicated parts) through Define, and
through the lifecycle of whatever Define accepted: start, XML, info, state, suspend, resume,
destroy, undefine.  A refused document is a typed error and leaves nothing; an accepted one
behaves like any domain and is gone after undefine (see :mod:`tests.fuzz.harness`).
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from tests.fuzz.harness import Caller, DaemonBug, Env, finish_example
from tests.fuzz.strategies import xml_docs
from virtmig.proto import virtmig_pb2 as pb
from virtmig.testing import domain_xml


@example(xml=domain_xml("fz", memory_mib=4), redefine=domain_xml("fz", memory_mib=8),
         start=True, role="src")
@given(xml=xml_docs(), redefine=st.one_of(st.none(), xml_docs()),
       start=st.booleans(), role=st.sampled_from(["src", "dst"]))
def test_define_any_xml(env: Env, xml: str, redefine: str | None, start: bool,
                        role: str) -> None:
    """Any document: refused cleanly, or defined (and redefined) and undefined cleanly; a
    defined domain, whatever its declared memory, through a lifecycle (the daemon's limit
    refuses the start or not)."""

    async def example() -> None:
        caller = await Caller(env).open(sessions=False)
        try:
            dom = await caller.call(role, "Domains", "Define", pb.DefineRequest(xml=xml))
            if dom is None:
                return
            ref = pb.DomainRef(uuid=dom.uuid)
            if redefine is not None:
                await caller.call(role, "Domains", "Define", pb.DefineRequest(xml=redefine))
            info = await caller.call(role, "Domains", "GetInfo", pb.DomainRequest(domain=ref))
            if info is None:
                raise DaemonBug(f"GetInfo of the domain Define returned failed: {dom}")
            if start:
                await lifecycle(caller, role, ref)
        finally:
            await finish_example(env, caller)

    env.run(example())


async def lifecycle(caller: Caller, role: str, ref: pb.DomainRef) -> None:
    req = pb.DomainRequest(domain=ref)
    await caller.call(role, "Domains", "Start", pb.StartRequest(domain=ref))
    await caller.call(role, "Domains", "GetXML", pb.GetXMLRequest(domain=ref, migratable=True))
    await caller.call(role, "Domains", "GetState", req)
    await caller.call(role, "Domains", "Suspend", req)
    await caller.call(role, "Domains", "Resume", req)
    await caller.call(role, "Migration", "GetJobInfo", pb.JobInfoRequest(domain=ref))
