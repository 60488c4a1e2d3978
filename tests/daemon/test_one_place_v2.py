"""A guest runs in one place with protocol v2 too (virtmig.daemon.migration.v2 with
virtmig.daemon.locate): v2 has no cookie A, so the destination's Prepare2 makes the migration id
and cookie B carries it to Perform; a Perform that stops the guest records where it went; a
peer-to-peer v2 source whose Finish2 answer is lost never resumes on a guess; Perform makes
Begin's checks (an unknown outcome, an unsafe disk).

Real daemons on loopback over mutual TLS (the ``test`` backend), the destination speaking only
v2; an unreachable destination is a closed loopback port (:class:`Gate` shut).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import F, migrate, running_guest
from tests.daemon.placement_helpers import FAST, Gate
from virtmig.client.migrate import RemoteDest
from virtmig.client.sequence import Trace
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.placement import Away, Peer
from virtmig.proto.errors import (
    ConnectionFailed,
    GuestElsewhere,
    MigrateUnsafe,
    NoDomain,
    VirtmigError,
)
from virtmig.proto.flags import DomainState
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, hosts, start_host, stop_host, wait_until

V2_ONLY: dict[str, object] = {**FAST, "migration_protocols": (2,)}


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    """A current source and a destination that speaks only v2."""
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", V2_ONLY)) as (src, dst):
        yield src, dst


def p2p(src: Host, uri: str) -> asyncio.Future[None]:
    return asyncio.ensure_future(src.conn.migrate_to_uri3("vm1", uri, TypedParams(),
                                                          F.LIVE | F.PEER2PEER))


async def test_regular_v2_records_where_the_guest_went(pair: tuple[Host, Host]) -> None:
    """The id Prepare2 made reaches the source through cookie B: the source's record and the
    destination's arrival name the same migration; the source's start is refused (its daemon's
    URI is unknown in regular v2: it cannot be asked), and --force overrides."""
    src, dst = pair
    await running_guest(src)
    trace = Trace()
    await migrate(src, dst, F.LIVE, trace=trace)
    assert trace.protocol == "v2"
    uuid = (await src.conn.lookup("vm1")).uuid
    away = src.daemon.placement.away(uuid)
    assert away is not None and not away.uncertain
    assert away.peer.host_uuid == dst.daemon.host_uuid and away.peer.uri == ""
    assert len(away.migration_id) == 32
    assert dst.daemon.placement.get(uuid).arrived == away.migration_id
    with pytest.raises(GuestElsewhere, match=r"dst\.test .*cannot be asked.*URI of its daemon"):
        await src.conn.start("vm1")
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF
    await dst.conn.destroy("vm1")
    await src.conn.start("vm1", force=True)
    assert src.daemon.placement.away(uuid) is None


async def test_p2p_v2_start_on_source_asks_the_destination(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await p2p(src, dst.uri)
    uuid = (await src.conn.lookup("vm1")).uuid
    away = src.daemon.placement.away(uuid)
    assert away is not None and away.peer.uri == dst.uri
    with pytest.raises(GuestElsewhere, match=r"runs on host dst\.test \(" + dst.daemon.host_uuid):
        await src.conn.start("vm1")
    await dst.conn.destroy("vm1")  # no copy runs there any more: it may start here
    await src.conn.start("vm1")
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_p2p_v2_lost_finish2_reply_never_resumes_on_a_guess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finish2 ran the guest on the destination, its reply was lost, and the destination cannot
    be asked: the source stays paused (resume refused, the reason says what it waits for) until
    the destination answers, then it is shut off as migrated."""
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", V2_ONLY)) as (src, dst):
        gate = Gate(dst)
        await gate.open()
        real = RemoteDest.finish2

        async def lost(self: RemoteDest, params: TypedParams, cookie: bytes, flags: int,
                       retcode: int) -> str:
            await real(self, params, cookie, flags, retcode)
            await gate.shut()
            raise ConnectionFailed("unable to connect to the daemon: connection reset")

        monkeypatch.setattr(RemoteDest, "finish2", lost)
        try:
            await running_guest(src)
            with pytest.raises(VirtmigError):
                await p2p(src, gate.uri)
            uuid = (await src.conn.lookup("vm1")).uuid

            async def waiting() -> str | None:
                state, _r, _n, detail = await src.conn.state_detail("vm1")
                assert state is DomainState.PAUSED  # never resumed
                return detail if "waiting for its daemon" in detail else None

            detail = await wait_until(waiting, timeout=30, what="the source to say so")
            assert gate.uri in detail
            with pytest.raises(GuestElsewhere, match="migrate-resolve"):
                await src.conn.resume("vm1")
            assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
            await gate.open()

            async def settled() -> bool:
                return await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")

            await wait_until(settled, timeout=30, what="the outcome to be settled")
            away = src.daemon.placement.away(uuid)
            assert away is not None and not away.uncertain
        finally:
            await gate.shut()


async def test_p2p_v2_source_restarted_before_finish2_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The source daemon goes down in perform2 while Finish2 runs the guest on the
    destination: after its restart the guest is not started here on a guess: the start asks
    the destination, which runs it."""
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", V2_ONLY)) as (src, dst):
        real = RemoteDest.finish2
        finished = asyncio.Event()

        async def hangs(self: RemoteDest, params: TypedParams, cookie: bytes, flags: int,
                        retcode: int) -> str:
            await real(self, params, cookie, flags, retcode)
            finished.set()
            await asyncio.Event().wait()  # the answer never comes back
            raise AssertionError("unreachable")

        monkeypatch.setattr(RemoteDest, "finish2", hangs)
        await running_guest(src)
        uuid = (await src.conn.lookup("vm1")).uuid
        run = p2p(src, dst.uri)
        await wait_until(finished.is_set, timeout=30, what="Finish2 to run the guest there")
        job = src.daemon.registry.by_uuid(uuid).job
        assert job is not None and job.phase is Phase.PERFORM2
        await stop_host(src)
        with contextlib.suppress(VirtmigError, asyncio.CancelledError):
            await run
        again = await start_host(tmp_path, "src", **FAST)  # type: ignore[arg-type]
        try:
            async def known() -> bool:
                away = again.daemon.placement.away(uuid)
                return away is not None and not away.uncertain

            await wait_until(known, timeout=30, what="the source to learn where it went")
            with pytest.raises(GuestElsewhere, match=r"runs on host dst\.test"):
                await again.conn.start("vm1")
            assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
        finally:
            await stop_host(again)


async def test_v2_perform_refuses_a_guest_whose_outcome_is_unknown(
    pair: tuple[Host, Host]
) -> None:
    src, dst = pair
    await running_guest(src)
    uuid = (await src.conn.lookup("vm1")).uuid
    src.daemon.placement.departed(uuid, Away(Peer(dst.daemon.host_uuid, "dst.test"),
                                             "0" * 32, uncertain=True))
    trace = Trace()
    with pytest.raises(GuestElsewhere, match=r"cannot migrate domain 'vm1'.*migrate-resolve"):
        await migrate(src, dst, F.LIVE, trace=trace)
    assert trace.calls == ["getxml", "prepare2", "perform", "finish2(cancelled)"]
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")


async def test_v2_perform_refuses_an_unsafe_migration_without_the_flag(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """v2 has no Begin: its Perform makes Begin's unsafe-disk check (the test backend told its
    guest is unsafe); ``VIR_MIGRATE_UNSAFE`` overrides it."""
    src, dst = pair
    await running_guest(src)
    monkeypatch.setattr(src.daemon.backend, "migration_unsafe", lambda spec: "cache is unsafe")
    with pytest.raises(MigrateUnsafe, match="cache is unsafe"):
        await migrate(src, dst, F.LIVE)
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    await migrate(src, dst, F.LIVE | F.UNSAFE)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING


def test_perform2_asks_after_a_restart_only_when_the_destination_is_known() -> None:
    """The recovery rule (MigrationJob.asks_in_perform2): peer-to-peer v2 knows its destination's
    daemon and asks; a regular v2 job (no daemon URI) keeps v2's rule."""
    def job(phase: Phase, dest_uri: str) -> MigrationJob:
        return MigrationJob(kind=AsyncJob.MIGRATION_OUT, phase=phase, flags=F(0),
                            params=TypedParams(), migration_id="a" * 32, dest_uri=dest_uri)

    assert job(Phase.PERFORM2, "virtmig+tls://127.0.0.1:1").asks_in_perform2
    assert not job(Phase.PERFORM2, "").asks_in_perform2
    assert not job(Phase.PERFORM3, "virtmig+tls://127.0.0.1:1").asks_in_perform2
