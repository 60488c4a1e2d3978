"""The v3 sequence driver to the letter: cookies, flags and params each step gets, which error
wins, and the lost-Finish and abort paths.

Written against mutmut's survivors in ``virtmig.client.sequence`` (``make mutate``): each test pins
a detail that a mutant changed and the other tests did not notice.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import pytest

from virtmig.client.sequence import Trace, run_v3
from virtmig.proto.errors import (
    ConnectionFailed,
    InternalError,
    MigrateFinishOk,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing.wait import wait_until

F = MigrateFlags
P = MigrateParam


@dataclass
class Call:
    name: str
    flags: int
    cookie: bytes
    params: TypedParams
    cancelled: bool | None = None


@dataclass
class Parties:
    """Both parties, scripted: ``fail`` maps a step to its error; every call is recorded."""

    fail: dict[str, VirtmigError] = field(default_factory=dict)
    state: DomainState = DomainState.RUNNING
    uri_out: str | None = "tcp:dst:49152"
    finish_result: tuple[str, bytes] | None = None  # a non-cancelled Finish's reply
    finished_answer: bool | VirtmigError = False
    abort: asyncio.Event | None = None  # set: the source's job is aborted
    finish_gate: asyncio.Event | None = None  # a non-cancelled Finish waits for it
    calls: list[Call] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)

    def step(self, name: str, flags: int, cookie: bytes, params: TypedParams,
             cancelled: bool | None = None) -> None:
        self.calls.append(Call(name, flags, cookie, params.copy(), cancelled))
        if name in self.fail:
            raise self.fail[name]

    def call(self, name: str) -> Call:
        return next(c for c in self.calls if c.name == name)

    # source
    async def begin(self, dom: str, params: TypedParams, flags: int) -> tuple[str, bytes]:
        self.step("begin", flags, b"", params)
        return "<domain/>", b"A"

    async def get_state(self, dom: str) -> DomainState:
        if "get_state" in self.fail:
            raise self.fail["get_state"]
        return self.state

    async def perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes:
        self.step("perform", flags, cookie, params)
        return b"C"

    async def confirm(self, dom: str, params: TypedParams, cookie: bytes, flags: int,
                      cancelled: bool) -> None:
        self.step("confirm", flags, cookie, params, cancelled)

    async def wait_abort(self, dom: str) -> None:
        if "wait_abort" in self.fail:
            raise self.fail["wait_abort"]
        await (self.abort or asyncio.Event()).wait()

    # destination
    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        self.step("prepare", flags, cookie, params)
        return b"B", self.uri_out

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        self.step("finish", flags, cookie, params, cancelled)
        if cancelled:
            raise MigrateFinishOk()
        if self.finish_gate is not None:
            await self.finish_gate.wait()
        return self.finish_result or (params.get_str(P.DEST_NAME) or "", b"D")

    async def finished(self, dname: str) -> bool:
        self.asked.append(dname)
        if isinstance(self.finished_answer, VirtmigError):
            raise self.finished_answer
        return self.finished_answer


async def run(s: Parties, flags: int = F.LIVE, params: TypedParams | None = None, *,
              protection: bool = True, p2p: bool = False,
              trace: Trace | None = None) -> tuple[str | None, VirtmigError | None]:
    try:
        return await run_v3(s, s, "vm1", params or TypedParams(), flags, protection=protection,
                            p2p=p2p, trace=trace), None
    except VirtmigError as exc:
        return None, exc


def steps(s: Parties) -> list[str]:
    return [f"{c.name}(cancelled)" if c.cancelled else c.name for c in s.calls]


# --- what each step gets -------------------------------------------------------------------------


async def test_cookies_flow_from_step_to_step() -> None:
    s = Parties()
    assert await run(s) == ("vm1", None)
    assert [(c.name, c.cookie) for c in s.calls] == [
        ("begin", b""), ("prepare", b"A"), ("perform", b"B"), ("finish", b"C"),
        ("confirm", b"D")]
    assert [c.cancelled for c in s.calls] == [None, None, None, False, False]


async def test_trace_records_the_calls_given_to_it() -> None:
    s = Parties(fail={"finish": OperationFailed("x")})
    t = Trace()
    await run(s, trace=t)
    assert t.calls == ["begin", "prepare", "perform", "finish", "confirm(cancelled)"]
    t.add("x", False)
    assert t.calls[-1] == "x"


async def test_callers_params_are_not_changed() -> None:
    s = Parties()
    params = TypedParams.of({P.BANDWIDTH: 5})
    await run(s, params=params)
    assert list(params) == list(TypedParams.of({P.BANDWIDTH: 5}))
    assert s.call("begin").params.get(P.BANDWIDTH) == 5


async def test_dest_xml_goes_to_prepare_only() -> None:
    s = Parties()
    await run(s, params=TypedParams.of({P.DEST_XML: "<user/>"}))
    assert s.call("prepare").params.get(P.DEST_XML) == "<domain/>"
    assert s.call("perform").params.get(P.DEST_XML) == "<user/>"
    assert s.call("confirm").params.get(P.DEST_XML) == "<user/>"
    assert s.call("confirm").params.get(P.URI) == "tcp:dst:49152"


async def test_empty_uri_out_keeps_the_callers_uri() -> None:
    s = Parties(uri_out="")
    await run(s, params=TypedParams.of({P.URI: "tcp://h:5"}))
    assert s.call("perform").params.get(P.URI) == "tcp://h:5"


async def test_change_protection_asked_by_the_caller_stays_on_the_source() -> None:
    s = Parties()
    await run(s, F.LIVE | F.CHANGE_PROTECTION)
    for c in s.calls:
        source = c.name in ("begin", "perform", "confirm")
        assert bool(c.flags & F.CHANGE_PROTECTION) is source, c.name
        assert c.flags & F.LIVE


async def test_without_protection_the_callers_flags_pass_unchanged() -> None:
    s = Parties()
    await run(s, F.LIVE | F.AUTO_CONVERGE, protection=False)
    assert s.call("begin").flags == s.call("perform").flags == F.LIVE | F.AUTO_CONVERGE
    assert s.call("prepare").flags == s.call("finish").flags == F.LIVE


async def test_paused_source_resuming_postcopy_gets_no_paused_flag() -> None:
    s = Parties(state=DomainState.PAUSED)
    await run(s, F.LIVE | F.POSTCOPY | F.POSTCOPY_RESUME)
    assert not any(c.flags & F.PAUSED for c in s.calls)


async def test_running_source_gets_no_paused_flag() -> None:
    s = Parties(state=DomainState.RUNNING)
    await run(s)
    assert not any(c.flags & F.PAUSED for c in s.calls)


async def test_tunnelled_needs_no_uri() -> None:
    s = Parties(uri_out=None)
    assert await run(s, F.LIVE | F.TUNNELLED | F.PEER2PEER) == ("vm1", None)
    assert steps(s) == ["begin", "prepare", "perform", "finish", "confirm"]
    assert P.URI not in s.call("perform").params


async def test_missing_uri_message_and_cookies() -> None:
    s = Parties(uri_out=None)
    _name, err = await run(s)
    assert type(err) is InternalError
    assert str(err) == "internal error: domainMigratePrepare3 did not set uri"
    assert s.call("finish").cookie == b"" and s.call("confirm").cookie == b""


async def test_offline_finish_gets_no_cookie_and_is_not_cancelled() -> None:
    s = Parties(uri_out=None)
    await run(s, F.OFFLINE | F.PERSIST_DEST)
    assert s.call("finish").cookie == b"" and s.call("finish").cancelled is False
    assert s.call("confirm").cancelled is False


async def test_dest_name_given_is_passed_to_finish() -> None:
    s = Parties()
    assert await run(s, params=TypedParams.of({P.DEST_NAME: "vm2"})) == ("vm2", None)
    assert s.call("finish").params.get(P.DEST_NAME) == "vm2"


# --- failures ----------------------------------------------------------------------------------


async def test_state_query_failure_releases_the_protected_job() -> None:
    s = Parties(fail={"get_state": OperationInvalid("no state")})
    _name, err = await run(s, F.LIVE)
    assert str(err) == "Requested operation is not valid: no state"
    assert steps(s) == ["begin", "confirm(cancelled)"]
    confirm = s.call("confirm")
    assert confirm.cookie == b"" and confirm.flags == F.LIVE | F.CHANGE_PROTECTION


async def test_state_query_failure_without_protection_confirms_nothing() -> None:
    s = Parties(fail={"get_state": OperationInvalid("no state")})
    _name, err = await run(s, protection=False)
    assert str(err) == "Requested operation is not valid: no state"
    assert steps(s) == ["begin"]


async def test_failed_release_is_logged_and_the_first_error_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    s = Parties(fail={"prepare": OperationFailed("clash"), "confirm": OperationFailed("gone")})
    _name, err = await run(s)
    assert str(err) == "operation failed: clash"
    assert "cannot release migration job of vm1: operation failed: gone" in caplog.text


async def test_prepare_failure_releases_with_protection_flag() -> None:
    s = Parties(fail={"prepare": OperationFailed("clash")})
    await run(s, F.LIVE)
    assert s.call("confirm").flags == F.LIVE | F.CHANGE_PROTECTION


async def test_p2p_confirms_after_a_failed_perform() -> None:
    s = Parties(fail={"perform": OperationFailed("stream broke")})
    _name, err = await run(s, p2p=True)
    assert str(err) == "operation failed: stream broke"
    assert steps(s) == ["begin", "prepare", "perform", "finish(cancelled)", "confirm(cancelled)"]
    assert s.call("finish").cookie == b"" and s.call("confirm").cookie == b""


async def test_finish_ok_after_success_is_the_generic_error() -> None:
    s = Parties(fail={"finish": MigrateFinishOk()})
    _name, err = await run(s)
    assert type(err) is OperationFailed
    assert str(err) == "operation failed: migration failed"
    assert steps(s)[-1] == "confirm(cancelled)"
    assert s.call("confirm").cookie == b""


async def test_lookup_error_from_finish_does_not_replace_perform_error() -> None:
    s = Parties(fail={"perform": OperationFailed("generic"), "finish": NoDomain("no domain")})
    _name, err = await run(s)
    assert str(err) == "operation failed: generic"


async def test_hypervisor_error_replaces_only_a_plain_operation_failed() -> None:
    s = Parties(fail={"perform": OperationFailed("generic"),
                      "finish": OperationFailed("qemu died")})
    _name, err = await run(s)
    assert str(err) == "operation failed: qemu died"
    s = Parties(fail={"perform": OperationAborted("aborted"),
                      "finish": InternalError("qemu died")})
    _name, err = await run(s)
    assert str(err) == "operation aborted: aborted"


async def test_finish_error_after_a_good_perform_is_the_error() -> None:
    s = Parties(fail={"finish": NoDomain("no domain")})
    _name, err = await run(s)
    assert type(err) is NoDomain


async def test_cancelled_finish_that_returns_a_domain_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    class Returns(Parties):
        async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                         cancelled: bool) -> tuple[str, bytes]:
            self.step("finish", flags, cookie, params, cancelled)
            return "vm1", b"D"

    s = Returns(fail={"perform": OperationFailed("broke")})
    with caplog.at_level(logging.WARNING):
        assert await run(s) == ("vm1", None)
    assert steps(s) == ["begin", "prepare", "perform", "finish(cancelled)"]


# --- Finish's reply lost ---------------------------------------------------------------------


async def test_lost_finish_reply_but_guest_runs_there() -> None:
    s = Parties(fail={"finish": ConnectionFailed("reset")}, finished_answer=True)
    assert await run(s, params=TypedParams.of({P.DEST_NAME: "vm2"})) == ("vm2", None)
    assert s.asked == ["vm2"]
    assert steps(s)[-1] == "confirm"
    assert s.call("confirm").cookie == b""


async def test_lost_finish_reply_and_guest_rolled_back() -> None:
    s = Parties(fail={"finish": ConnectionFailed("reset")}, finished_answer=False)
    _name, err = await run(s)
    assert type(err) is ConnectionFailed and str(err) == "reset"
    assert s.asked == ["vm1"]
    assert steps(s)[-1] == "confirm(cancelled)"
    assert s.call("confirm").cookie == b""  # not Perform's cookie C: Finish gave none


async def test_lost_finish_reply_and_destination_unreachable() -> None:
    s = Parties(fail={"finish": ConnectionFailed("reset")},
                finished_answer=ConnectionFailed("no route"))
    _name, err = await run(s)
    assert type(err) is OperationFailed
    assert str(err) == ("operation failed: the destination could not be reached after Finish; "
                        "whether 'vm1' runs there is unknown, so it is left paused here: reset")
    assert steps(s) == ["begin", "prepare", "perform", "finish"]


async def test_connection_lost_in_a_cancelled_finish_asks_nothing() -> None:
    class Lost(Parties):
        async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                         cancelled: bool) -> tuple[str, bytes]:
            self.step("finish", flags, cookie, params, cancelled)
            raise ConnectionFailed("reset")

    s = Lost(fail={"perform": OperationFailed("broke")}, finished_answer=True)
    _name, err = await run(s)
    assert str(err) == "operation failed: broke"
    assert s.asked == []
    s = Lost(uri_out=None, finished_answer=True)
    _name, err = await run(s)
    assert type(err) is InternalError
    assert steps(s)[-1] == "confirm(cancelled)"


# --- abort while Finish waits --------------------------------------------------------------------


async def test_abort_during_finish_cancels_it_and_raises_aborted() -> None:
    abort = asyncio.Event()
    abort.set()
    s = Parties(abort=abort, finish_gate=asyncio.Event(), finished_answer=False)
    _name, err = await run(s, params=TypedParams.of({P.DEST_NAME: "vm2"}))
    assert type(err) is OperationAborted
    assert str(err) == "operation aborted: job 'migration out' canceled by client"
    assert s.asked == ["vm2"]
    assert steps(s)[-1] == "confirm(cancelled)"


async def test_abort_that_came_too_late() -> None:
    abort = asyncio.Event()
    abort.set()
    s = Parties(abort=abort, finish_gate=asyncio.Event(), finished_answer=True)
    assert await run(s) == ("vm1", None)
    assert s.asked == ["vm1"]
    assert steps(s)[-1] == "confirm"
    assert s.call("confirm").cookie == b""


async def test_finish_that_completes_with_the_abort_wins() -> None:
    abort = asyncio.Event()
    abort.set()
    s = Parties(abort=abort)  # Finish returns at once
    assert await run(s) == ("vm1", None)
    assert s.asked == []
    assert s.call("confirm").cookie == b"D"


async def settled(s: Parties) -> None:
    """Until Finish waits at its gate, then until every callback that is ready has run: the
    driver has then seen the abort watch end (no timer or I/O is involved in between)."""
    await wait_until(lambda: "finish" in steps(s), timeout=10, what="Finish to be called")
    for _ in range(20):
        await asyncio.sleep(0)


async def test_broken_abort_watch_lets_finish_run() -> None:
    gate = asyncio.Event()
    s = Parties(fail={"wait_abort": OperationFailed("watch broke")}, finish_gate=gate)
    task = asyncio.ensure_future(run(s))
    await settled(s)
    assert not task.done()
    gate.set()
    assert await task == ("vm1", None)
    assert s.asked == []


async def test_cancelled_abort_watch_lets_finish_run() -> None:
    gate = asyncio.Event()

    class Cancelled(Parties):
        async def wait_abort(self, dom: str) -> None:
            raise asyncio.CancelledError

    s = Cancelled(finish_gate=gate)
    task = asyncio.ensure_future(run(s))
    await settled(s)
    gate.set()
    assert await task == ("vm1", None)
    assert s.asked == []


async def test_finish_error_at_the_moment_of_the_abort_is_the_error() -> None:
    abort = asyncio.Event()
    abort.set()
    s = Parties(abort=abort, fail={"finish": OperationFailed("qemu died")},
                finished_answer=True)
    _name, err = await run(s)
    assert str(err) == "operation failed: qemu died"
    assert s.asked == []


async def test_finish_that_fails_when_cancelled_by_the_abort_is_asked_about() -> None:
    class FailsOnCancel(Parties):
        async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                         cancelled: bool) -> tuple[str, bytes]:
            self.step("finish", flags, cookie, params, cancelled)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise OperationFailed("call cancelled") from None
            raise AssertionError("not reached")

    abort = asyncio.Event()
    abort.set()
    s = FailsOnCancel(abort=abort, finished_answer=False)
    _name, err = await run(s)
    assert type(err) is OperationAborted
    assert s.asked == ["vm1"]


async def test_paused_source_keeps_the_callers_flags() -> None:
    s = Parties(state=DomainState.PAUSED)
    await run(s, F.LIVE | F.PERSIST_DEST, protection=False)
    assert s.call("prepare").flags == F.LIVE | F.PERSIST_DEST | F.PAUSED
    assert s.call("perform").flags == F.LIVE | F.PERSIST_DEST | F.PAUSED
