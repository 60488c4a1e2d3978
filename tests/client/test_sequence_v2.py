"""The protocol v2 sequence driver (``run_v2``, libvirt's virDomainMigrateVersion2 and, with
``p2p``, Peer2Peer2) against scripted parties: what each call gets (the migratable XML, the
destination's flags, the URI, Perform's return code), the branches the daemons never take on
their own (no URI from Prepare2, a lost Finish2 reply) and which error wins."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from virtmig.client.sequence import Trace, run_v2
from virtmig.proto.errors import (
    ConnectionFailed,
    InternalError,
    MigrateFinishOk,
    OperationFailed,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams

F = MigrateFlags
P = MigrateParam
XML = "<domain type='test'><name>vm1</name></domain>"
NOT_SET = object()  # settle2 never called


@dataclass
class Script:
    """Which step fails, what the destination answers, and what each party saw."""

    fail: dict[str, VirtmigError] = field(default_factory=dict)
    state: DomainState = DomainState.RUNNING
    uri_out: str | None = "tcp:127.0.0.1:49152"
    finished: bool | VirtmigError = False  # the destination's answer after a lost reply
    calls: list[tuple[str, int, TypedParams]] = field(default_factory=list)
    retcodes: list[int] = field(default_factory=list)
    settled: object = NOT_SET

    def step(self, name: str, flags: int, params: TypedParams) -> None:
        self.calls.append((name, flags, params.copy()))
        if name in self.fail:
            raise self.fail[name]

    def call(self, name: str) -> tuple[int, TypedParams]:
        (found,) = [(f, p) for n, f, p in self.calls if n == name]
        return found


class Src:
    def __init__(self, s: Script) -> None:
        self.s = s

    async def migratable_xml(self, dom: str) -> str:
        self.s.step("getxml", 0, TypedParams())
        return XML

    async def get_state(self, dom: str) -> DomainState:
        return self.s.state

    async def perform2(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> None:
        assert cookie == b"B"
        self.s.step("perform", flags, params)

    async def settle2(self, dom: str, migrated: bool | None) -> None:
        assert self.s.settled is NOT_SET, "settled twice"
        self.s.settled = migrated


class Dst:
    def __init__(self, s: Script) -> None:
        self.s = s

    async def prepare2(self, params: TypedParams, flags: int) -> tuple[bytes, str | None]:
        self.s.step("prepare2", flags, params)
        return b"B", self.s.uri_out

    async def finish2(self, params: TypedParams, cookie: bytes, flags: int,
                      retcode: int) -> str:
        assert cookie == b"B"
        self.s.retcodes.append(retcode)
        self.s.step("finish2", flags, params)
        if retcode:  # as a daemon does: the incoming guest is gone, nothing to return
            raise MigrateFinishOk()
        return params.get_str(P.DEST_NAME) or ""

    async def finished(self, dname: str) -> bool:
        if isinstance(self.s.finished, VirtmigError):
            raise self.s.finished
        return self.s.finished


async def run(s: Script, flags: int = F.LIVE, params: TypedParams | None = None,
              p2p: bool = False) -> tuple[str | None, VirtmigError | None, list[str]]:
    t = Trace()
    try:
        name = await run_v2(Src(s), Dst(s), "vm1", params or TypedParams(), flags, p2p=p2p,
                            trace=t)
        return name, None, t.calls
    except VirtmigError as exc:
        return None, exc, t.calls


async def test_success_reads_the_xml_then_prepare2_perform_finish2() -> None:
    s = Script()
    flags = F.LIVE | F.PERSIST_DEST | F.AUTO_CONVERGE | F.ABORT_ON_ERROR
    name, err, calls = await run(s, flags, TypedParams.of({P.BANDWIDTH: 10}))
    assert (name, err) == ("vm1", None)
    assert calls == ["getxml", "prepare2", "perform", "finish2"]
    assert [n for n, _f, _p in s.calls] == calls
    pflags, pparams = s.call("prepare2")
    # The source's migratable XML goes to Prepare2; the source-only flags do not.
    assert pparams.get_str(P.DEST_XML) == XML and pparams.get_int(P.BANDWIDTH) == 10
    assert pflags == F.LIVE | F.PERSIST_DEST
    perform_flags, perform_params = s.call("perform")
    assert perform_flags == flags and perform_params.get_str(P.URI) == "tcp:127.0.0.1:49152"
    assert P.DEST_XML not in perform_params
    fflags, fparams = s.call("finish2")
    assert fflags == F.LIVE | F.PERSIST_DEST and s.retcodes == [0]
    assert fparams.get_str(P.URI) == "tcp:127.0.0.1:49152"
    assert fparams.get_str(P.DEST_NAME) == "vm1"  # defaulted to the source's name
    assert s.settled is NOT_SET  # regular v2: Perform settled the source itself


async def test_dest_name_is_carried() -> None:
    s = Script()
    name, _err, _calls = await run(s, params=TypedParams.of({P.DEST_NAME: "vm2"}))
    assert name == "vm2"
    assert s.call("prepare2")[1].get_str(P.DEST_NAME) == "vm2"
    assert s.call("finish2")[1].get_str(P.DEST_NAME) == "vm2"


async def test_paused_source_adds_paused() -> None:
    s = Script(state=DomainState.PAUSED)
    await run(s)
    for step in ("prepare2", "perform", "finish2"):
        assert s.call(step)[0] & F.PAUSED, step


async def test_prepare2_failure_calls_nothing_else() -> None:
    s = Script(fail={"prepare2": OperationFailed("clash")})
    _name, err, calls = await run(s, p2p=True)
    assert str(err) == "operation failed: clash"
    assert calls == ["getxml", "prepare2"]
    assert s.settled is NOT_SET  # nothing changed on the source: nothing to settle


async def test_no_uri_from_prepare2_cancels_finish2() -> None:
    s = Script(uri_out=None)
    _name, err, calls = await run(s)
    assert isinstance(err, InternalError)
    assert str(err) == "internal error: domainMigratePrepare2 did not set uri"
    assert calls == ["getxml", "prepare2", "finish2(cancelled)"]
    assert s.retcodes == [-1]


async def test_the_callers_uri_is_enough_without_one_from_prepare2() -> None:
    s = Script(uri_out=None)
    _name, err, calls = await run(s, params=TypedParams.of({P.URI: "tcp:127.0.0.1:5"}))
    assert err is None and calls == ["getxml", "prepare2", "perform", "finish2"]
    assert s.call("perform")[1].get_str(P.URI) == "tcp:127.0.0.1:5"


@pytest.mark.parametrize("p2p", [False, True])
async def test_perform_failure_finishes_with_its_return_code(p2p: bool) -> None:
    s = Script(fail={"perform": OperationFailed("stream broke")})
    _name, err, calls = await run(s, p2p=p2p)
    assert str(err) == "operation failed: stream broke"  # FINISH_OK never replaces it
    assert calls == ["getxml", "prepare2", "perform", "finish2(cancelled)"]
    assert s.retcodes == [-1]
    assert s.settled is (False if p2p else NOT_SET)


@pytest.mark.parametrize("p2p", [False, True])
async def test_finish2_failure_after_perform(p2p: bool) -> None:
    """Regular: the error only (Perform already stopped the source: v2's hazard); peer-to-peer:
    the source, left paused by Perform, is put back."""
    s = Script(fail={"finish2": OperationFailed("guest unexpectedly quit")})
    _name, err, calls = await run(s, p2p=p2p)
    assert str(err) == "operation failed: guest unexpectedly quit"
    assert calls == ["getxml", "prepare2", "perform", "finish2"] and s.retcodes == [0]
    assert s.settled is (False if p2p else NOT_SET)


async def test_p2p_success_stops_the_source_after_finish2() -> None:
    s = Script()
    name, err, _calls = await run(s, p2p=True)
    assert (name, err, s.settled) == ("vm1", None, True)


LOST = ConnectionFailed("unable to connect to the daemon: connection reset")


@pytest.mark.parametrize(("answer", "name", "settled"), [
    (True, "vm1", True),  # the guest runs there: the reply was what got lost
    (False, None, False),  # it does not: the source is put back
    (ConnectionFailed("no route"), None, None),  # nobody can tell: left paused
])
async def test_lost_finish2_reply_asks_the_destination(
    answer: bool | VirtmigError, name: str | None, settled: bool | None,
) -> None:
    s = Script(fail={"finish2": LOST}, finished=answer)
    got, err, _calls = await run(s, p2p=True)
    assert got == name and s.settled is settled
    assert err is (None if name else LOST)


async def test_lost_finish2_reply_after_a_failed_perform_is_not_asked() -> None:
    """Finish2 was cancelled: the guest cannot run there; Perform's error wins."""
    s = Script(fail={"perform": OperationFailed("stream broke"), "finish2": LOST},
               finished=True)
    _name, err, _calls = await run(s, p2p=True)
    assert str(err) == "operation failed: stream broke"
    assert s.settled is False
