"""The failure matrix's late rows on the ``qemu`` backend, with the real test guest.

Finish fails, Confirm fails, Finish's reply is lost (the outcome then asked for, or unknown),
in regular and in peer-to-peer mode: the same rows ``test_migration`` and ``test_p2p`` run on the
``test`` backend, with the same end states, and QEMU's own word (``query-status``) on where the
guest runs: on exactly one side, or paused where nobody knows the outcome.  Skipped without QEMU
or the guest (failing instead under VIRTMIG_REQUIRE_QEMU=1).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Host, hosts, qemu_domain_xml
from tests.daemon.migration_helpers import ConfirmFailsSource, FinishFailsDest, LostReplyDest
from virtmig.client import sequence
from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import Trace, run_v3
from virtmig.daemon import p2p
from virtmig.daemon.backend.base import BackendError, GuestRunState
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.proto.errors import NoDomain, OperationFailed
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import guest_or_skip, qemu_binary_or_skip, wait_until

pytestmark = pytest.mark.qemu

F = MigrateFlags
MEMORY_MIB = 256  # what the test guest's kernel needs


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    qemu_binary_or_skip()
    guest_or_skip()
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", {})) as (src, dst):
        yield src, dst


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Trace:
    """The calls the source daemon's driver makes in peer-to-peer mode."""
    t = Trace()
    real = sequence.run_v3

    async def traced(*args: Any, **kw: Any) -> str:
        kw["trace"] = t
        return await real(*args, **kw)

    monkeypatch.setattr(p2p, "run_v3", traced)
    return t


async def guest(host: Host) -> str:
    """The test guest, idle (1 MiB/s dirtied); returns its uuid."""
    xml = qemu_domain_xml(guest_or_skip(), "vm1", MEMORY_MIB, dirty_mb=16, dirty_rate=1)
    dom = await host.conn.define(xml)
    await host.conn.start("vm1")
    return dom.uuid


async def qemu_status(host: Host, uuid: str) -> str:
    """QEMU's own run state of the guest ("running", "postmigrate", ...), or "gone".

    A QEMU that the daemon stops meanwhile (a source copy shut off as migrated once the
    destination answered) may close its monitor under the query: then it is "gone" once the
    backend says so (bounded); a monitor lost with the guest still there fails."""
    backend = host.daemon.backend
    assert isinstance(backend, QemuBackend)
    if backend.state(uuid) is GuestRunState.SHUTOFF:
        return "gone"
    try:
        status: str = (await backend.query(uuid, "query-status"))["status"]
    except BackendError:
        await wait_until(lambda: backend.state(uuid) is GuestRunState.SHUTOFF, timeout=30,
                         what="a guest whose monitor closed under the query to be gone")
        return "gone"
    return status


async def regular(src: Host, dst: RemoteDest, trace: Trace | None = None,
                  source: RemoteSource | None = None) -> str:
    return await run_v3(source or RemoteSource(src.conn, True), dst, "vm1", TypedParams(),
                        F.LIVE, protection=True, trace=trace)


def p2p_migrate(src: Host, dst: Host) -> Any:
    return src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER)


async def no_jobs(*hosts_: Host) -> None:
    for host in hosts_:
        assert not [d.name for d in host.daemon.registry if d.job is not None]


async def home_again(src: Host, dst: Host, uuid: str) -> None:
    """Rolled back: the guest runs on the source (again), nothing is left on the destination."""
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 6, "migration-canceled")
    assert await qemu_status(src, uuid) == "running"
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    assert await qemu_status(dst, uuid) == "gone"
    assert not dst.daemon.ports._used
    await no_jobs(src, dst)
    assert (await src.conn.job_info("vm1", completed=True)).type is JobType.FAILED


async def moved(src: Host, dst: Host, uuid: str) -> None:
    """The guest runs on the destination only; the source's QEMU is gone."""
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert await qemu_status(dst, uuid) == "running"
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert await qemu_status(src, uuid) == "gone"
    await no_jobs(src, dst)


async def left_paused(src: Host, dst: Host, uuid: str) -> None:
    """The outcome was not known to the source: it keeps its guest paused (never running on
    both sides); the destination runs it."""
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert await qemu_status(dst, uuid) == "running"
    assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
    assert await qemu_status(src, uuid) == "postmigrate"


# --- regular mode ------------------------------------------------------------------------------


async def test_row_finish_fails_on_qemu(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    uuid = await guest(src)
    trace = Trace()
    with pytest.raises(OperationFailed, match="guest unexpectedly quit"):
        await regular(src, FinishFailsDest(dst.conn, dst), trace)
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm(cancelled)"]
    await home_again(src, dst, uuid)


async def test_row_confirm_fails_on_qemu(pair: tuple[Host, Host],
                                         caplog: pytest.LogCaptureFixture) -> None:
    src, dst = pair
    uuid = await guest(src)
    assert await regular(src, RemoteDest(dst.conn, True),
                         source=ConfirmFailsSource(src.conn, True)) == "vm1"
    assert "probably left in 'paused' state on source" in caplog.text
    await left_paused(src, dst, uuid)
    assert (await src.conn.job_info("vm1")).phase == "perform3_done"
    await src.conn.destroy("vm1")  # the admin's way out ends the job too
    assert await qemu_status(src, uuid) == "gone"
    await no_jobs(src, dst)


async def test_lost_finish_reply_is_resolved_by_asking_on_qemu(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    uuid = await guest(src)
    trace = Trace()
    assert await regular(src, LostReplyDest(dst.conn, True), trace) == "vm1"
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm"]
    await moved(src, dst, uuid)


async def test_lost_finish_reply_unknown_outcome_leaves_source_paused_on_qemu(
    pair: tuple[Host, Host]
) -> None:
    src, dst = pair
    uuid = await guest(src)
    trace = Trace()
    with pytest.raises(OperationFailed, match="left paused here"):
        await regular(src, LostReplyDest(dst.conn, False), trace)
    assert trace.calls == ["begin", "prepare", "perform", "finish"]  # no Confirm: no resume
    await left_paused(src, dst, uuid)


# --- peer-to-peer --------------------------------------------------------------------------------


async def test_p2p_row_finish_fails_on_qemu(pair: tuple[Host, Host], trace: Trace,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    uuid = await guest(src)

    class Dest(FinishFailsDest):
        def __init__(self, conn: AsyncConnection, use_params: bool) -> None:
            super().__init__(conn, dst)

    monkeypatch.setattr(p2p, "RemoteDest", Dest)
    with pytest.raises(OperationFailed, match="guest unexpectedly quit"):
        await p2p_migrate(src, dst)
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm(cancelled)"]
    await home_again(src, dst, uuid)


async def test_p2p_row_confirm_fails_on_qemu(pair: tuple[Host, Host],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    uuid = await guest(src)

    async def broken(self: Any, *args: Any) -> None:
        raise OperationFailed("confirm broke")

    monkeypatch.setattr(p2p.LocalSource, "confirm", broken)
    await p2p_migrate(src, dst)  # the result is Finish's
    # The source's copy is never resumed: it stays paused until the source daemon has asked the
    # destination about this migration (its run ended without a Confirm), then it is shut off
    # as migrated and its QEMU goes.
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert await qemu_status(src, uuid) in ("postmigrate", "gone")

    async def settled() -> bool:
        state, _code, reason = await src.conn.state("vm1")
        assert state is not DomainState.RUNNING
        return state is DomainState.SHUTOFF and reason == "migrated"

    await wait_until(settled, timeout=60, what="the source's copy shut off as migrated")
    assert await qemu_status(src, uuid) == "gone"
    await no_jobs(src, dst)
