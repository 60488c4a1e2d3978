"""The v3 sequence driver against scripted parties: call order, flags and which error wins."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from virtmig.client.sequence import Trace, run_v3
from virtmig.proto.errors import (
    InternalError,
    MigrateFinishOk,
    OperationFailed,
    OperationInvalid,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams

F = MigrateFlags
P = MigrateParam


@dataclass
class Script:
    """Which step fails, and what each party saw."""

    fail: dict[str, VirtmigError] = field(default_factory=dict)
    state: DomainState = DomainState.RUNNING
    uri_out: str | None = "tcp:dst:49152"
    calls: list[tuple[str, int, bool | None, TypedParams]] = field(default_factory=list)

    def step(self, name: str, flags: int, params: TypedParams,
             cancelled: bool | None = None) -> None:
        self.calls.append((name, flags, cancelled, params.copy()))
        if name in self.fail:
            raise self.fail[name]


class Src:
    async def wait_abort(self, dom: str) -> None:
        await asyncio.Event().wait()

    def __init__(self, s: Script) -> None:
        self.s = s

    async def begin(self, dom: str, params: TypedParams, flags: int) -> tuple[str, bytes]:
        self.s.step("begin", flags, params)
        return "<domain/>", b"A"

    async def get_state(self, dom: str) -> DomainState:
        if "get_state" in self.s.fail:
            raise self.s.fail["get_state"]
        return self.s.state

    async def perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes:
        assert cookie == b"B"
        self.s.step("perform", flags, params)
        return b"C"

    async def confirm(self, dom: str, params: TypedParams, cookie: bytes, flags: int,
                      cancelled: bool) -> None:
        self.s.step("confirm", flags, params, cancelled)


class Dst:
    async def finished(self, dname: str) -> bool:
        return False

    def __init__(self, s: Script) -> None:
        self.s = s

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        assert cookie == b"A"
        self.s.step("prepare", flags, params)
        return b"B", self.s.uri_out

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        self.s.step("finish", flags, params, cancelled)
        if cancelled:  # as a daemon does: the incoming guest is gone, nothing to return
            raise MigrateFinishOk()
        return params.get_str(P.DEST_NAME) or "", b"D"


async def run(s: Script, flags: int = F.LIVE, params: TypedParams | None = None,
              protection: bool = True) -> tuple[str | None, VirtmigError | None, list[str]]:
    t = Trace()
    try:
        name = await run_v3(Src(s), Dst(s), "vm1", params or TypedParams(), flags,
                            protection=protection, trace=t)
        return name, None, t.calls
    except VirtmigError as exc:
        return None, exc, t.calls


def names(s: Script) -> list[str]:
    return [f"{n}(cancelled)" if c else n for n, _f, c, _p in s.calls]


async def test_success_calls_all_five_in_order() -> None:
    s = Script()
    name, err, calls = await run(s)
    assert err is None and name == "vm1"
    assert names(s) == calls == ["begin", "prepare", "perform", "finish", "confirm"]


async def test_change_protection_goes_to_source_calls_only() -> None:
    s = Script()
    await run(s, F.LIVE | F.ABORT_ON_ERROR)
    flags = {n: f for n, f, _c, _p in s.calls}
    for step in ("begin", "perform", "confirm"):
        assert flags[step] & F.CHANGE_PROTECTION
        assert flags[step] & F.ABORT_ON_ERROR
    for step in ("prepare", "finish"):
        assert not flags[step] & F.CHANGE_PROTECTION
        assert not flags[step] & F.ABORT_ON_ERROR  # destflags strip source-only flags


async def test_without_protection_no_flag_added() -> None:
    s = Script()
    await run(s, protection=False)
    assert all(not f & F.CHANGE_PROTECTION for _n, f, _c, _p in s.calls)


async def test_paused_source_adds_paused_flag() -> None:
    s = Script(state=DomainState.PAUSED)
    await run(s)
    assert all(f & F.PAUSED for n, f, _c, _p in s.calls if n != "begin")


async def test_prepare_gets_begin_xml_and_perform_gets_uri_out() -> None:
    s = Script()
    params = TypedParams.of({P.DEST_XML: "<user/>", P.URI: "tcp://user:1"})
    await run(s, params=params)
    by = {n: p for n, _f, _c, p in s.calls}
    assert by["prepare"].get(P.DEST_XML) == "<domain/>"
    assert by["prepare"].get(P.URI) == "tcp://user:1"
    assert by["perform"].get(P.URI) == "tcp:dst:49152"
    assert by["finish"].get(P.DEST_NAME) == "vm1"  # defaulted to the source name


async def test_dest_name_is_kept() -> None:
    s = Script()
    name, _err, _calls = await run(s, params=TypedParams.of({P.DEST_NAME: "vm2"}))
    assert name == "vm2"


async def test_begin_failure_calls_nothing_else() -> None:
    s = Script(fail={"begin": OperationInvalid("domain is not running")})
    _name, err, _calls = await run(s)
    assert isinstance(err, OperationInvalid)
    assert names(s) == ["begin"]


async def test_prepare_failure_confirms_cancelled_with_protection() -> None:
    s = Script(fail={"prepare": OperationFailed("clash")})
    _name, err, _calls = await run(s)
    assert str(err) == "operation failed: clash"
    assert names(s) == ["begin", "prepare", "confirm(cancelled)"]


async def test_prepare_failure_without_protection_returns() -> None:
    s = Script(fail={"prepare": OperationFailed("clash")})
    await run(s, protection=False)
    assert names(s) == ["begin", "prepare"]


async def test_no_uri_out_finishes_and_confirms_cancelled() -> None:
    s = Script(uri_out=None)
    _name, err, _calls = await run(s)
    assert isinstance(err, InternalError)
    assert "did not set uri" in str(err)
    assert names(s) == ["begin", "prepare", "finish(cancelled)", "confirm(cancelled)"]


async def test_user_uri_is_enough_without_uri_out() -> None:
    s = Script(uri_out=None)
    _name, err, _calls = await run(s, params=TypedParams.of({P.URI: "tcp://h:5"}))
    assert err is None
    assert names(s) == ["begin", "prepare", "perform", "finish", "confirm"]


async def test_perform_failure_finishes_cancelled_and_skips_confirm() -> None:
    s = Script(fail={"perform": OperationFailed("stream broke")})
    _name, err, _calls = await run(s)
    assert str(err) == "operation failed: stream broke"  # FINISH_OK never replaces the real error
    assert names(s) == ["begin", "prepare", "perform", "finish(cancelled)"]


async def test_real_finish_error_replaces_generic_perform_error() -> None:
    s = Script(fail={"perform": OperationFailed("generic"),
                     "finish": InternalError("guest crashed on destination")})
    _name, err, _calls = await run(s)
    assert str(err) == "internal error: guest crashed on destination"


async def test_specific_perform_error_wins_over_finish_error() -> None:
    s = Script(fail={"perform": OperationInvalid("specific"),
                     "finish": InternalError("other")})
    _name, err, _calls = await run(s)
    assert str(err) == "Requested operation is not valid: specific"


async def test_finish_failure_confirms_cancelled() -> None:
    s = Script(fail={"finish": OperationFailed("guest unexpectedly quit")})
    _name, err, _calls = await run(s)
    assert str(err) == "operation failed: guest unexpectedly quit"
    assert names(s) == ["begin", "prepare", "perform", "finish", "confirm(cancelled)"]


async def test_confirm_failure_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    s = Script(fail={"confirm": OperationFailed("lost")})
    name, err, _calls = await run(s)
    assert err is None and name == "vm1"
    assert "probably left in 'paused' state on source" in caplog.text


async def test_offline_skips_perform() -> None:
    s = Script(uri_out=None)
    name, err, _calls = await run(s, F.OFFLINE | F.PERSIST_DEST)
    assert err is None and name == "vm1"
    assert names(s) == ["begin", "prepare", "finish", "confirm"]
