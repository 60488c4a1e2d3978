"""Protocol v2 when something fails, on the ``test`` backend: the guest keeps running on the
source (resumed when the stream had paused it) and nothing is left on the destination, regular
and peer-to-peer, whether Prepare2, Perform before or during the stream, or Finish2 fails; and
v2's one hazard in regular mode (a Finish2 that fails after Perform stopped the source), which
peer-to-peer v2 avoids by stopping the source only once Finish2 reports the guest on the
destination.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.migration_helpers import running_guest
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import Trace, run_v2
from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.job import Phase
from virtmig.daemon.registry import DomainObj
from virtmig.proto.errors import (
    ConnectionFailed,
    NoDomain,
    OperationAborted,
    OperationFailed,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    ClosedPortDest,
    Host,
    domain_xml,
    free_port,
    hosts,
    wait_job_streaming,
    wait_until,
)

F = MigrateFlags
P = MigrateParam
V2_ONLY: dict[str, object] = {"migration_protocols": (2,)}


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    """A current source and a destination that speaks only v2."""
    async with hosts(tmp_path, "test", ("src", {}), ("dst", V2_ONLY)) as (src, dst):
        yield src, dst


async def nothing_on(dst: Host) -> None:
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    assert not list(dst.daemon.registry)
    assert not dst.daemon.ports._used


async def home_again(src: Host, dst: Host, *, stopped: bool = True,
                     job: JobType = JobType.FAILED) -> None:
    """The guest runs on the source (resumed after the attempt; untouched, ``running
    (booted)``, when the stream never ``stopped`` it), nothing is on the destination, no job
    is left, and the source's ended job (``job``: failed, or cancelled) says it was v2."""
    assert await src.conn.state("vm1") == ((DomainState.RUNNING, 6, "migration-canceled")
                                           if stopped else (DomainState.RUNNING, 1, "booted"))
    await nothing_on(dst)
    assert not [d for d in src.daemon.registry if d.job is not None]
    done = await src.conn.job_info("vm1", completed=True)
    assert done.type is job
    assert done.stat("virtmig.protocol") == "v2"


async def kill_incoming(dst: Host, name: str) -> None:
    """The incoming guest dies (its daemon lives)."""
    await dst.daemon.backend.destroy((await dst.conn.lookup(name)).uuid)


class DiesBeforeFinish2(RemoteDest):
    """The incoming guest dies between Perform and Finish2."""

    def __init__(self, dst: Host) -> None:
        super().__init__(dst.conn, False)
        self.dst = dst

    async def finish2(self, params: TypedParams, cookie: bytes, flags: int, retcode: int) -> str:
        await kill_incoming(self.dst, params.get_str(P.DEST_NAME) or "")
        return await super().finish2(params, cookie, flags, retcode)


# --- regular -----------------------------------------------------------------------------------


async def test_perform_fails_stream_port_closed(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    with pytest.raises(VirtmigError, match="migration out"):
        await run_v2(RemoteSource(src.conn, False), ClosedPortDest(dst.conn, False), "vm1",
                     TypedParams(), F.LIVE, trace=trace)
    assert trace.calls == ["getxml", "prepare2", "perform", "finish2(cancelled)"]
    await home_again(src, dst, stopped=False)  # the stream never connected


async def test_perform_refused_by_the_source(pair: tuple[Host, Host]) -> None:
    """Perform fails before the stream (a caller's URI outside every rule): Finish2(cancelled)
    destroys the prepared guest; the source never stopped."""
    src, dst = pair
    await running_guest(src)
    trace = Trace()

    class BadUriDest(RemoteDest):
        async def prepare2(self, params: TypedParams, flags: int) -> tuple[bytes, str | None]:
            cookie, _uri = await super().prepare2(params, flags)
            return cookie, "rdma://127.0.0.1:1"

    with pytest.raises(VirtmigError):
        await run_v2(RemoteSource(src.conn, False), BadUriDest(dst.conn, False), "vm1",
                     TypedParams(), F.LIVE, trace=trace)
    assert trace.calls == ["getxml", "prepare2", "perform", "finish2(cancelled)"]
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
    await nothing_on(dst)
    assert not [d for d in src.daemon.registry if d.job is not None]


async def test_prepare2_fails_nothing_else_is_called(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    # The destination already defines another "vm1": Prepare2 refuses it.
    await dst.conn.define(domain_xml("vm1", uuid="00000000-0000-0000-0000-00000000abcd"))
    trace = Trace()
    with pytest.raises(VirtmigError, match=r"already (defined|exists)"):
        await run_v2(RemoteSource(src.conn, False), RemoteDest(dst.conn, False), "vm1",
                     TypedParams(), F.LIVE, trace=trace)
    assert trace.calls == ["getxml", "prepare2"]
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
    assert (await dst.conn.lookup("vm1")).state is DomainState.SHUTOFF  # its own, untouched


async def test_finish2_failing_after_perform_leaves_no_running_copy(
    pair: tuple[Host, Host],
) -> None:
    """v2's hazard in regular mode, documented in the README: Perform stopped the source, the
    destination's guest died before Finish2, so the guest runs nowhere.  (v3 would resume the
    source in Confirm; this is why v2 is used only when one side lacks v3.)"""
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    with pytest.raises(OperationFailed, match="guest unexpectedly quit"):
        await run_v2(RemoteSource(src.conn, False), DiesBeforeFinish2(dst), "vm1",
                     TypedParams(), F.LIVE, trace=trace)
    assert trace.calls == ["getxml", "prepare2", "perform", "finish2"]
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    await nothing_on(dst)


async def test_finish2_keeps_a_guest_that_cannot_be_resumed_paused(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Perform stopped the source already: a guest whose vCPUs cannot start on the
    destination is kept there, paused, for an admin (libvirt's Finish2), not destroyed as v3's
    Finish would; the job runs in phase finish2."""
    src, dst = pair
    await running_guest(src)
    phases: list[Phase] = []

    async def broken(uuid: str) -> None:
        job = dst.daemon.registry.by_uuid(uuid).job
        phases.append(job.phase if job is not None else Phase.NONE)
        raise BackendError("the vCPUs cannot start")

    monkeypatch.setattr(dst.daemon.backend, "resume", broken)
    writes = 0
    save_status = dst.daemon.registry.save_status

    def counted(dom: DomainObj) -> None:
        nonlocal writes
        writes += 1
        save_status(dom)

    save_durably = dst.daemon.registry.save_status_durably

    async def counted_durably(dom: DomainObj) -> None:
        nonlocal writes
        writes += 1
        await save_durably(dom)

    monkeypatch.setattr(dst.daemon.registry, "save_status", counted)
    monkeypatch.setattr(dst.daemon.registry, "save_status_durably", counted_durably)
    await run_v2(RemoteSource(src.conn, False), RemoteDest(dst.conn, False), "vm1",
                 TypedParams(), F.LIVE)
    assert phases == [Phase.FINISH2]
    assert writes == 3  # as a resumed guest's (test_status_writes_per_migration): no extra one
    assert await dst.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert (await dst.conn.job_info("vm1", completed=True)).type is JobType.COMPLETED


@pytest.mark.parametrize("cause", ["aborted", "incoming-died"])
@pytest.mark.parametrize("peer2peer", [False, True], ids=["regular", "p2p"])
async def test_failure_mid_stream_resumes_the_paused_source(
    pair: tuple[Host, Host], peer2peer: bool, cause: str,
) -> None:
    """The migration fails while the guest streams, the source guest paused by the stream (not
    live): the job is aborted, or the incoming guest dies.  Perform puts the source back and
    Finish2(cancelled) destroys what is left of the incoming guest: the guest runs on the
    source only (resumed), and nothing is left on the destination."""
    src, dst = pair
    await running_guest(src)
    params = TypedParams.of({P.BANDWIDTH: 8})
    task = asyncio.ensure_future(
        src.conn.migrate_to_uri3("vm1", dst.uri, params, F.PEER2PEER) if peer2peer
        else src.conn.migrate3("vm1", dst.conn, params, 0))
    try:
        info = await wait_job_streaming(src.conn, "vm1")
        assert info.phase == "perform2"
        assert (await src.conn.state("vm1"))[0] is DomainState.PAUSED  # stopped by the stream
        assert (await dst.conn.lookup("vm1")).state is DomainState.PAUSED  # incoming there
        if cause == "aborted":
            await src.conn.abort_job("vm1")
            with pytest.raises(OperationAborted, match="canceled by client"):
                await task
        else:
            await kill_incoming(dst, "vm1")
            with pytest.raises(OperationFailed):
                await task
    finally:
        task.cancel()
    await home_again(src, dst, job=JobType.CANCELLED if cause == "aborted" else JobType.FAILED)


# --- peer-to-peer -------------------------------------------------------------------------------


def p2p(src: Host, dst: Host) -> Any:
    return src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER)


async def test_p2p_stream_port_closed(pair: tuple[Host, Host],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    await running_guest(src)
    real = RemoteDest.prepare2

    async def closed(self: RemoteDest, params: TypedParams,
                     flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await real(self, params, flags)
        return cookie, f"tcp:127.0.0.1:{free_port()}"

    monkeypatch.setattr(RemoteDest, "prepare2", closed)
    with pytest.raises(VirtmigError, match="migration out"):
        await p2p(src, dst)
    await home_again(src, dst, stopped=False)  # the stream never connected


async def test_p2p_source_stopped_only_after_finish2_succeeds(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Peer-to-peer v2 (libvirt's Peer2Peer2): the stream completed, Finish2 failed: the source,
    still paused, is resumed: the guest runs on the source and nothing is on the destination."""
    src, dst = pair
    await running_guest(src)
    real = RemoteDest.finish2
    states: list[tuple[DomainState, int, str]] = []

    async def dies(self: RemoteDest, params: TypedParams, cookie: bytes, flags: int,
                   retcode: int) -> str:
        assert retcode == 0
        states.append(await src.conn.state("vm1"))
        await kill_incoming(dst, params.get_str(P.DEST_NAME) or "")
        return await real(self, params, cookie, flags, retcode)

    monkeypatch.setattr(RemoteDest, "finish2", dies)
    with pytest.raises(OperationFailed, match="guest unexpectedly quit"):
        await p2p(src, dst)
    assert states == [(DomainState.PAUSED, 2, "migration")]  # not stopped before Finish2
    await home_again(src, dst)
    # (the source's record of the attempt says why it ended: src_settle2 put the guest back)
    assert (await src.conn.job_info("vm1", completed=True)).error == "migration cancelled"


async def test_p2p_lost_finish2_reply_is_resolved_by_asking(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finish2 succeeded but its reply was lost: the source asks the destination before it
    resumes anything, finds the guest there, and stops its own copy."""
    src, dst = pair
    await running_guest(src)
    real = RemoteDest.finish2

    async def lost(self: RemoteDest, params: TypedParams, cookie: bytes, flags: int,
                   retcode: int) -> str:
        await real(self, params, cookie, flags, retcode)
        raise ConnectionFailed("unable to connect to the daemon: connection reset")

    monkeypatch.setattr(RemoteDest, "finish2", lost)
    await p2p(src, dst)
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert not [d for d in src.daemon.registry if d.job is not None]


async def test_p2p_unknown_outcome_leaves_the_source_paused(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finish2's reply lost and the sequence driver cannot ask the destination: never run on
    both hosts: the source keeps its guest paused, and its daemon asks the destination about
    that migration in the background (virtmig.daemon.locate), which here answers that the guest
    arrived: the source's copy is shut off as migrated, never resumed."""
    src, dst = pair
    await running_guest(src)
    real = RemoteDest.finish2

    async def lost(self: RemoteDest, params: TypedParams, cookie: bytes, flags: int,
                   retcode: int) -> str:
        await real(self, params, cookie, flags, retcode)
        raise ConnectionFailed("unable to connect to the daemon: connection reset")

    async def unreachable(self: RemoteDest, dname: str) -> bool:
        raise ConnectionFailed("unable to connect to the daemon: no route")

    monkeypatch.setattr(RemoteDest, "finish2", lost)
    monkeypatch.setattr(RemoteDest, "finished", unreachable)
    with pytest.raises(ConnectionFailed):
        await p2p(src, dst)
    assert not [d for d in src.daemon.registry if d.job is not None]
    assert (await src.conn.job_info("vm1", completed=True)).error == (
        "outcome unknown: the destination cannot be reached")

    async def settled() -> bool:
        state = await src.conn.state("vm1")
        assert state[0] is not DomainState.RUNNING  # paused until the destination answered
        return state == (DomainState.SHUTOFF, 4, "migrated")

    await wait_until(settled, timeout=30, what="the source to learn the guest arrived")
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
