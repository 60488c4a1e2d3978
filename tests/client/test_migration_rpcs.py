"""The RPCs of one regular migration through the library (issue 17: round trips on the control
plane's critical path).  ``migrate3`` returns the destination's domain from Finish's reply, as
libvirt's Finish3 does, instead of looking it up again; the list below fails if a call is added
or one comes back.  Real daemons in this process (the ``test`` backend, mutual TLS).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from virtmig.client import migrate, rpc
from virtmig.client.migrate import RemoteDest
from virtmig.proto.errors import OperationFailed
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, domain_xml, hosts


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[list[Host]]:
    async with hosts(tmp_path, "test", ("a", {}), ("b", {})) as started:
        yield started


async def test_a_migration_makes_these_calls_and_no_more(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    await a.conn.define(domain_xml("vm", 4))
    await a.conn.start("vm")
    await a.conn.host()
    await b.conn.host()  # features, cached per connection (as a session is)
    calls: list[str] = []
    real_call, real_stream = rpc.RpcConnection._call, rpc.RpcConnection._stream

    async def call(self: rpc.RpcConnection, method: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(f"{'a' if self is a.conn else 'b'} {method._method.decode()}")
        return await real_call(self, method, *args, **kwargs)

    def stream(self: rpc.RpcConnection, *args: Any, **kwargs: Any) -> Any:
        calls.append(f"{'a' if self is a.conn else 'b'} stream")
        return real_stream(self, *args, **kwargs)

    monkeypatch.setattr(rpc.RpcConnection, "_call", call)
    monkeypatch.setattr(rpc.RpcConnection, "_stream", stream)
    # (a Finish that ends within the delay: however long a busy machine makes this one take)
    monkeypatch.setattr(migrate, "ABORT_WATCH_DELAY", 3600)
    got = await a.conn.migrate3("vm", b.conn, TypedParams(), MigrateFlags.LIVE)
    monkeypatch.undo()
    names = [c for c in calls if "stream" not in c]
    assert names == [
        "a /virtmig.v1.Domains/Lookup",
        "a /virtmig.v1.Migration/Begin3Params",
        "a /virtmig.v1.Domains/GetState",
        "b /virtmig.v1.Migration/Prepare3Params",
        "a /virtmig.v1.Migration/Perform3Params",
        "b /virtmig.v1.Migration/Finish3Params",
        "a /virtmig.v1.Migration/Confirm3Params",
    ]
    # The job watch that lets domjobabort reach Finish opens only for a Finish that lasts.
    assert calls.count("a stream") == 0
    # What it returned is the destination's domain, as a lookup now sees it.
    assert got == await b.conn.lookup("vm")
    assert got.state is DomainState.RUNNING


class _EndingFinish:
    """A destination whose cancelled Finish rolls back while the client asks: the job is there
    at the first call the client makes, and over at every later one, with the guest shut off
    by then (what the daemon guarantees: the guest is shut off before the job ends)."""

    def __init__(self) -> None:
        self.calls = 0

    def _now(self) -> bool:
        self.calls += 1
        return self.calls > 1  # over since the first call

    async def job_info(self, name: str) -> Any:
        return SimpleNamespace(type=JobType.NONE if self._now() else JobType.UNBOUNDED)

    async def lookup(self, name: str) -> Any:
        state = DomainState.SHUTOFF if self._now() else DomainState.PAUSED
        return SimpleNamespace(state=state)


async def test_a_cancelled_finish_is_judged_on_the_state_after_its_job() -> None:
    """After a cancelled Finish, the client reads whether the guest runs there only once it has
    seen the job over: a state read before could be the job's last moment (paused in Finish),
    and a rolled-back migration taken for a finished one loses the guest on both hosts."""
    dest = RemoteDest(cast(rpc.RpcConnection, _EndingFinish()), use_params=True)
    assert await dest.finished("vm") is False


class _NeverEnding:
    """A destination whose incoming job never ends while the client asks."""

    async def job_info(self, name: str) -> Any:
        return SimpleNamespace(type=JobType.UNBOUNDED)

    async def lookup(self, name: str) -> Any:
        raise AssertionError("the state is read only once the job is over")


async def test_a_destination_job_that_does_not_end_leaves_the_outcome_unknown(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked after an interrupted Finish, a destination whose job is still running when the
    bound runs out has neither a guest that arrived nor one rolled back: the answer is an error
    (the source stays paused or asks again), not "it did not arrive", which would resume the
    source's copy of a guest that may yet run there."""
    monkeypatch.setattr(migrate, "FINISHED_POLLS", 3)
    monkeypatch.setattr(migrate, "FINISHED_POLL_S", 0.0)
    dest = RemoteDest(cast(rpc.RpcConnection, _NeverEnding()), use_params=True)
    with pytest.raises(OperationFailed, match="has not ended after 0 s: whether the guest runs "
                                              "there is unknown"):
        await dest.finished("vm")
