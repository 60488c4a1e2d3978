"""A guest runs in one place (virtmig.daemon.placement, virtmig.daemon.locate): after a migration
the source asks the destination before it starts or resumes its own copy.

Real daemons on loopback over mutual TLS (the ``test`` backend); an unreachable destination is a
closed loopback port (:class:`Gate` shut).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import F, P, migrate, running_guest
from tests.daemon.placement_helpers import FAST, Gate, LostFinishDest
from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon.placement import Away, Peer, PlacementStore
from virtmig.proto.errors import (
    ConnectionFailed,
    GuestElsewhere,
    InvalidArgument,
    OperationFailed,
)
from virtmig.proto.flags import DomainState
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, hosts, start_host, stop_host, wait_until


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[list[Host]]:
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", dict(FAST))) as started:
        yield started


async def migrated(src: Host, dst: Host, mode: str = "regular",
                   dest_uri: str | None = None) -> str:
    """vm1 running on ``src``, migrated live to ``dst``; its uuid."""
    await running_guest(src)
    params = TypedParams.of({P.DEST_URI: dest_uri}) if dest_uri else TypedParams()
    if mode == "p2p":
        await src.conn.migrate_to_uri3("vm1", dest_uri or dst.uri, TypedParams(),
                                       F.LIVE | F.PEER2PEER)
    else:
        await migrate(src, dst, F.LIVE, params)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF
    return (await src.conn.lookup("vm1")).uuid


@pytest.mark.parametrize("mode", ["regular", "p2p"])
async def test_start_on_source_refused_naming_destination(trio: list[Host], mode: str) -> None:
    src, dst = trio
    uuid = await migrated(src, dst, mode)
    record = src.state_dir / "placement" / f"{uuid}.json"
    assert record.exists()
    with pytest.raises(GuestElsewhere, match=r"runs on host dst\.test \(" + dst.daemon.host_uuid):
        await src.conn.start("vm1")
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF


async def test_start_force_overrides_and_is_logged(
    trio: list[Host], caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = trio
    uuid = await migrated(src, dst)
    with caplog.at_level(logging.WARNING, logger="virtmig.daemon.locate"):
        await src.conn.start("vm1", force=True)
    assert "with --force although it was migrated to host dst.test" in caplog.text
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert src.daemon.placement.away(uuid) is None  # it runs here now


async def test_destination_unreachable_refused_then_stopped_there_allowed(
    trio: list[Host]
) -> None:
    src, dst = trio
    gate = Gate(dst)
    await gate.open()
    try:
        uuid = await migrated(src, dst, dest_uri=gate.uri)
        assert src.daemon.placement.away(uuid).peer.uri == gate.uri  # type: ignore[union-attr]
        await gate.shut()
        with pytest.raises(GuestElsewhere, match=r"dst\.test .* cannot be asked"):
            await src.conn.start("vm1")
        await gate.open()
        await dst.conn.destroy("vm1")  # it no longer runs there: it may start here
        await src.conn.start("vm1")
        assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
        assert src.daemon.placement.away(uuid) is None
    finally:
        await gate.shut()


async def test_migrated_back_clears_the_record(trio: list[Host]) -> None:
    src, dst = trio
    await running_guest(src)
    await migrate(src, dst, F.LIVE | F.PERSIST_DEST)  # defined on both hosts now
    uuid = (await src.conn.lookup("vm1")).uuid
    assert src.daemon.placement.away(uuid) is not None
    await migrate(dst, src)  # and back
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert src.daemon.placement.away(uuid) is None
    # Now the destination remembers where it went, and refuses its own start.
    away = dst.daemon.placement.away(uuid)
    assert away is not None and away.peer.host_uuid == src.daemon.host_uuid
    with pytest.raises(GuestElsewhere, match=r"runs on host src\.test"):
        await dst.conn.start("vm1")


async def test_record_survives_a_source_restart(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", dict(FAST))) as (src, dst):
        await migrated(src, dst)
        await stop_host(src)
        again = await start_host(tmp_path, "src", **FAST)  # type: ignore[arg-type]
        try:
            with pytest.raises(GuestElsewhere, match=r"runs on host dst\.test"):
                await again.conn.start("vm1")
        finally:
            await stop_host(again)


async def test_confirm_cancelled_never_resumes_when_the_destination_runs_it(
    trio: list[Host]
) -> None:
    """A caller that takes a lost Finish reply for a failure sends Confirm(cancelled): the
    source asks the destination about that migration first, and does not resume."""
    src, dst = trio
    await running_guest(src)

    class BelievesItFailed(LostFinishDest):
        async def finished(self, dname: str) -> bool:
            return False

    params = TypedParams.of({P.DEST_URI: dst.uri})
    with pytest.raises(ConnectionFailed):
        await run_v3(RemoteSource(src.conn, True), BelievesItFailed(dst.conn, reaches=True),
                     "vm1", params, F.LIVE, protection=True)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert src.daemon.placement.away((await src.conn.lookup("vm1")).uuid) is not None


async def lost_finish(src: Host, dst: Host, dest_uri: str, *, reaches: bool) -> None:
    """A migration whose Finish reply is lost and whose outcome the client cannot learn: the
    source is left paused in perform3_done; its unowned job is abandoned soon after."""
    await running_guest(src)
    with pytest.raises(OperationFailed, match="left paused here"):
        await run_v3(RemoteSource(src.conn, True), LostFinishDest(dst.conn, reaches),
                     "vm1", TypedParams.of({P.DEST_URI: dest_uri}), F.LIVE, protection=True)
    uuid = (await src.conn.lookup("vm1")).uuid

    def abandoned() -> bool:
        return (src.daemon.registry.by_uuid(uuid).job is None
                and src.daemon.placement.away(uuid) is not None)

    await wait_until(abandoned, timeout=30, what="the source's job to be abandoned")


async def test_lost_finish_reply_source_never_resumes(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", {**FAST, "incoming_job_timeout": 0.3}),
                     ("dst", dict(FAST))) as (src, dst):
        await lost_finish(src, dst, dst.uri, reaches=True)

        async def settled() -> bool:
            return await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")

        await wait_until(settled, timeout=30, what="the source to learn the guest arrived")
        assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
        with pytest.raises(GuestElsewhere, match=r"runs on host dst\.test"):
            await src.conn.start("vm1")


async def test_undecidable_stays_paused_then_resolve_settles(tmp_path: Path) -> None:
    """The destination cannot be asked: paused, with a reason that says so; the settling gives
    up (one try here); ``migrate-resolve`` settles it once the destination answers."""
    src_settings = {**FAST, "incoming_job_timeout": 0.3, "settle_attempts": 1}
    async with hosts(tmp_path, "test", ("src", src_settings), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)
        try:
            await lost_finish(src, dst, gate.uri, reaches=True)  # the gate is shut

            async def gave_up() -> str | None:
                _s, _r, _n, detail = await src.conn.state_detail("vm1")
                return detail if "gave up" in detail else None

            detail = await wait_until(gave_up, timeout=30, what="the settling to give up")
            assert "outcome of migration" in detail and "dst.test" in detail
            assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
            with pytest.raises(GuestElsewhere, match="migrate-resolve"):
                await src.conn.resume("vm1")
            with pytest.raises(OperationFailed, match="cannot be asked"):
                await src.conn.resolve_migration("vm1")
            await gate.open()
            state = await src.conn.resolve_migration("vm1")
            assert state[:3] == (DomainState.SHUTOFF, 4, "migrated")
            assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
        finally:
            await gate.shut()


async def test_resolve_resumes_when_the_migration_never_arrived(tmp_path: Path) -> None:
    src_settings = {**FAST, "incoming_job_timeout": 0.3, "settle_attempts": 1}
    async with hosts(tmp_path, "test", ("src", src_settings), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)
        try:
            await lost_finish(src, dst, gate.uri, reaches=False)
            # The unfinished incoming guest goes (as it would once its job is abandoned there).
            await dst.conn.destroy("vm1")
            assert dst.daemon.registry.find_name("vm1") is None
            await gate.open()
            state = await src.conn.resolve_migration("vm1", gate.uri)
            assert state[:3] == (DomainState.RUNNING, 6, "migration-canceled")
            assert src.daemon.placement.away((await src.conn.lookup("vm1")).uuid) is None
        finally:
            await gate.shut()


async def test_restart_with_unreachable_peer_does_not_block_and_settles_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src_settings = {**FAST, "incoming_job_timeout": 0.3}
    async with hosts(tmp_path, "test", ("src", src_settings), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)
        again: Host | None = None
        try:
            await lost_finish(src, dst, gate.uri, reaches=True)
            uuid = (await src.conn.lookup("vm1")).uuid
            await wait_until(lambda: src.daemon.placement.notes.get(uuid, "").find("waiting") >= 0,
                             timeout=30, what="the source to wait for the destination")
            await running_guest(src, "vm2")
            await stop_host(src)
            # The peer still does not answer: the daemon starts, and its other guests work.
            with caplog.at_level(logging.WARNING, logger="virtmig.daemon.locate"):
                again = await start_host(tmp_path, "src",
                                         **src_settings)  # type: ignore[arg-type]
                await again.conn.start("vm2")
                assert (await again.conn.state("vm2"))[0] is DomainState.RUNNING

                async def waiting() -> str | None:
                    assert again is not None
                    _s, _r, _n, detail = await again.conn.state_detail("vm1")
                    return detail if "waiting for its daemon" in detail else None

                detail = await wait_until(waiting, timeout=30, what="the reason to say so")
            assert gate.uri in detail and "unknown" in detail
            assert "waiting for its daemon" in caplog.text
            with pytest.raises(GuestElsewhere, match="cannot be asked"):
                await again.conn.start("vm1")
            await gate.open()

            async def settled() -> bool:
                assert again is not None
                away = again.daemon.placement.away(uuid)
                return away is not None and not away.uncertain

            await wait_until(settled, timeout=30, what="the outcome to be settled")
            assert (await again.conn.state_detail("vm1"))[3] == ""
            with pytest.raises(GuestElsewhere, match=r"runs on host dst\.test"):
                await again.conn.start("vm1")
        finally:
            await gate.shut()
            if again is not None:
                await stop_host(again)


async def test_guest_location_answers_what_the_host_knows(trio: list[Host]) -> None:
    src, dst = trio
    uuid = await migrated(src, dst)
    loc = await dst.conn.guest_location(uuid)
    assert loc.active and loc.known and loc.arrived_migration_id
    assert loc.host_uuid == dst.daemon.host_uuid
    there = await src.conn.guest_location(uuid)
    assert not there.active and there.away_host_uuid == dst.daemon.host_uuid
    assert there.away_migration_id == loc.arrived_migration_id
    assert there.away_uri == dst.uri
    nobody = await src.conn.guest_location("00000000-0000-0000-0000-00000000abcd")
    assert not nobody.known and not nobody.active


async def test_bad_dest_uri_is_refused_before_anything_changes(trio: list[Host]) -> None:
    src, dst = trio
    await running_guest(src)
    with pytest.raises(InvalidArgument, match="pkipath"):
        await migrate(src, dst, F.LIVE, TypedParams.of(
            {P.DEST_URI: "virtmig+tls://127.0.0.1:1?pkipath=/etc"}))
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.job_info("vm1")).phase == ""


async def test_start_follows_the_guest_host_to_host(tmp_path: Path) -> None:
    """src → dst → third: src's start asks dst, which sent it on, then asks third."""
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", dict(FAST)),
                     ("third", dict(FAST))) as (src, dst, third):
        await running_guest(src)
        await migrate(src, dst, F.LIVE | F.PERSIST_DEST)
        await migrate(dst, third, F.LIVE | F.PERSIST_DEST)
        with pytest.raises(GuestElsewhere, match=r"runs on host third\.test"):
            await src.conn.start("vm1")
        await third.conn.destroy("vm1")  # stopped where it ran last: it may start again
        await src.conn.start("vm1")
        assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING


def test_a_bad_placement_record_is_moved_aside(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "placement"
    folder.mkdir()
    uuid = "00000000-0000-0000-0000-000000000001"
    (folder / f"{uuid}.json").write_text('{"uuid": "00000000-0000-0000-0000-000000000002"}')
    good = PlacementStore(folder)
    good.departed(uuid, Away(Peer("h", "host-h", "virtmig+tls://127.0.0.1:1"), "a" * 32))
    assert (folder / f"{uuid}.json.rejected").exists()
    assert "does not match its file name" in caplog.text
    again = PlacementStore(folder)  # the good one, written since, is read back
    away = again.away(uuid)
    assert away is not None and away.peer.hostname == "host-h" and not away.uncertain
