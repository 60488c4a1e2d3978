"""The test-only stall points (virtmig.daemon.stall): inert without VIRTMIG_TEST_STALL, a bad
value refused, and a daemon stopped at its point until the file goes, once; the peer-to-peer
driver's points sit at its phase boundaries."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from virtmig.daemon import stall
from virtmig.daemon.backend.base import GuestRunState
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, domain_xml, wait_until

F = MigrateFlags


def test_unset_is_inert() -> None:
    assert stall._parse("") == ("", None)
    assert stall.POINT == ""  # the test session does not set it


@pytest.mark.parametrize("spec", ["finish3", "finish3:", "perform3:/tmp/x", ":/tmp/x"])
def test_bad_value_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="VIRTMIG_TEST_STALL"):
        stall._parse(spec)


def test_value_names_point_and_file() -> None:
    assert stall._parse("confirm3:/tmp/f") == ("confirm3", Path("/tmp/f"))


async def test_stops_at_its_point_until_the_file_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "stalled"
    monkeypatch.setattr(stall, "POINT", "finish3")
    monkeypatch.setattr(stall, "_FILE", file)
    monkeypatch.setattr(stall, "_passed", False)
    await stall.at("confirm3")  # another point: no stop
    assert not file.exists()
    task = asyncio.create_task(stall.at("finish3"))
    await wait_until(file.exists, timeout=10, what="the stall file")
    assert not task.done()
    file.unlink()
    await asyncio.wait_for(task, 10)
    await asyncio.wait_for(stall.at("finish3"), 1)  # once only
    assert not file.exists()


@pytest.mark.parametrize("point", ["finish3", "finish3-resumed", "confirm3"])
async def test_a_migration_stops_there(
    pair: tuple[Host, Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """Each point sits inside its phase: the migration waits there, with the job in that phase
    (the guest already resumed on the destination at finish3-resumed), then completes."""
    src, dst = pair
    file = tmp_path / "stalled"
    monkeypatch.setattr(stall, "POINT", point)
    monkeypatch.setattr(stall, "_FILE", file)
    monkeypatch.setattr(stall, "_passed", False)
    await src.conn.define(domain_xml("vm1", 64, dirty_rate_mib=4))
    await src.conn.start("vm1")
    task = asyncio.create_task(src.conn.migrate3("vm1", dst.conn, TypedParams(), F.LIVE))
    await wait_until(file.exists, timeout=30, what=f"the stall at {point}")
    stalled = dst if point.startswith("finish3") else src
    job = stalled.daemon.registry.by_name("vm1").job
    assert job is not None and job.phase.label == point.removesuffix("-resumed")
    resumed = dst.daemon.backend.state((await dst.conn.lookup("vm1")).uuid)
    assert (resumed is GuestRunState.RUNNING) == (point != "finish3")
    assert not task.done()
    file.unlink()
    await asyncio.wait_for(task, 30)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_destination_persists_before_the_guest_runs(
    pair: tuple[Host, Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --persistent, once the guest runs on the destination its definition is on disk
    there: a destination daemon killed right then keeps it (found by the fault matrix,
    tests/faults: it used to be saved only after the vCPUs started)."""
    src, dst = pair
    file = tmp_path / "stalled"
    monkeypatch.setattr(stall, "POINT", "finish3-resumed")
    monkeypatch.setattr(stall, "_FILE", file)
    monkeypatch.setattr(stall, "_passed", False)
    await src.conn.define(domain_xml("vm1", 64, dirty_rate_mib=4))
    await src.conn.start("vm1")
    task = asyncio.create_task(
        src.conn.migrate3("vm1", dst.conn, TypedParams(), F.LIVE | F.PERSIST_DEST))
    await wait_until(file.exists, timeout=30, what="the stall at finish3-resumed")
    dom = await dst.conn.lookup("vm1")
    assert dom.persistent
    assert list((dst.state_dir).rglob(f"{dom.uuid}.xml")), "no definition file on disk"
    file.unlink()
    await asyncio.wait_for(task, 30)


# Where each boundary of the p2p driver sits: the source job's phase there ("" once Confirm
# ended it), the destination's job phase ("" for none; "absent": no guest there yet), and
# whether the guest runs on the destination.
P2P_BOUNDARIES = {
    "p2p-after-begin": ("begin3", "absent", False),
    "p2p-after-prepare": ("begin3", "prepare", False),
    "p2p-after-perform": ("perform3_done", "prepare", False),
    "p2p-after-finish": ("perform3_done", "", True),
    "p2p-after-confirm": ("", "", True),
}


async def _dst_job(dst: Host) -> tuple[str, bool]:
    obj = dst.daemon.registry.find_name("vm1")
    if obj is None:
        return "absent", False
    running = dst.daemon.backend.state(obj.uuid) is GuestRunState.RUNNING
    return (obj.job.phase.label if obj.job is not None else ""), running


@pytest.mark.parametrize("point", sorted(P2P_BOUNDARIES))
@pytest.mark.parametrize("tunnelled", [False, True], ids=["p2p", "tunnelled"])
async def test_a_p2p_migration_stops_at_its_boundary(
    pair: tuple[Host, Host], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str,
    tunnelled: bool,
) -> None:
    """The source daemon's p2p driver (also tunnelled) waits at each phase boundary, the phase
    before it done and the next not called, then completes."""
    assert point in stall.POINTS
    src, dst = pair
    file = tmp_path / "stalled"
    monkeypatch.setattr(stall, "POINT", point)
    monkeypatch.setattr(stall, "_FILE", file)
    monkeypatch.setattr(stall, "_passed", False)
    await src.conn.define(domain_xml("vm1", 64, dirty_rate_mib=4))
    await src.conn.start("vm1")
    flags = F.LIVE | F.PEER2PEER | (F.TUNNELLED if tunnelled else 0)
    task = asyncio.create_task(
        src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), flags))
    await wait_until(file.exists, timeout=30, what=f"the stall at {point}")
    src_job = src.daemon.registry.by_name("vm1").job
    seen = (src_job.phase.label if src_job is not None else "", *await _dst_job(dst))
    assert seen == P2P_BOUNDARIES[point]
    assert not task.done()
    file.unlink()
    await asyncio.wait_for(task, 30)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF
