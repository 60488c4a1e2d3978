"""A guest runs in one place: how a source settles a migration whose outcome it does not know
(virtmig.daemon.locate's verdicts and backoff, virtmig.daemon.recovery's restart rules, a
Confirm(cancelled) whose destination cannot be asked, Begin's refusal), and the CLI's words
for it (``domstate --reason``'s detail, ``migrate-resolve``).

Real daemons on loopback over mutual TLS (the ``test`` backend); an unreachable destination is a
closed loopback port (:class:`Gate` shut).  The backoff is checked against a recording sleep,
not a clock.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from lxml import etree

from tests.daemon.migration_helpers import F, P, migrate, running_guest
from tests.daemon.placement_helpers import FAST, Gate, LostFinishDest
from tests.daemon.test_one_place import lost_finish
from virtmig.client.cli import app as cli
from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon import locate, recovery
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.placement import Away, Peer, PlacementStore
from virtmig.proto.errors import ConnectionFailed, GuestElsewhere, NoDomain, OperationFailed
from virtmig.proto.flags import DomainState, PausedReason
from virtmig.proto.params import TypedParams
from virtmig.testing import hosts, session_pki, wait_until

GIVES_UP = {**FAST, "incoming_job_timeout": 0.3, "settle_attempts": 1}


# --- the verdicts ---------------------------------------------------------------------------------


async def test_pending_then_conflict_never_resume_then_failed_does(tmp_path: Path) -> None:
    """The destination still holds the incoming guest of that migration (pending), then runs a
    copy this migration did not bring (conflict): the source stays paused both times; once no
    copy runs there (failed), ``migrate-resolve`` resumes it."""
    async with hosts(tmp_path, "test", ("src", GIVES_UP), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)
        try:
            await lost_finish(src, dst, gate.uri, reaches=False)  # Finish never got there
            uuid = (await src.conn.lookup("vm1")).uuid
            await wait_until(lambda: "gave up" in locate.note(src.daemon, uuid), timeout=30,
                             what="the background settling to give up")
            xml = await src.conn.xml_desc("vm1", inactive=True)
            await gate.open()
            paused = (DomainState.PAUSED, 2, "migration")

            with pytest.raises(OperationFailed, match=r"yet: .*still finishing there"):
                await src.conn.resolve_migration("vm1")
            assert await src.conn.state("vm1") == paused

            await dst.conn.destroy("vm1")  # the incoming guest goes; then another copy runs
            with pytest.raises(NoDomain):
                await dst.conn.lookup("vm1")
            await dst.conn.define(xml)
            await dst.conn.start("vm1")
            with pytest.raises(OperationFailed, match="runs a copy this migration did not bring"):
                await src.conn.resolve_migration("vm1")
            assert await src.conn.state("vm1") == paused
            with pytest.raises(GuestElsewhere, match="migrate-resolve"):
                await src.conn.resume("vm1")
            detail = (await src.conn.state_detail("vm1"))[3]
            assert "stop one copy by hand" in detail

            await dst.conn.destroy("vm1")  # no copy runs there any more
            state = await src.conn.resolve_migration("vm1")
            assert state[:3] == (DomainState.RUNNING, 6, "migration-canceled")
            assert src.daemon.placement.away(uuid) is None
        finally:
            await gate.shut()


# --- the backoff ----------------------------------------------------------------------------------


async def test_settling_backs_off_doubling_to_the_cap_then_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreachable destination: one try per attempt, the waits doubling from
    ``settle_retry_min`` up to ``settle_retry_max``, each try logged with what it waits for,
    and after ``settle_attempts`` tries a note that says to run migrate-resolve."""
    config = SimpleNamespace(settle_retry_min=1.0, settle_retry_max=5.0, settle_attempts=6)
    fake = SimpleNamespace(config=config, placement=PlacementStore(tmp_path / "placement"))
    daemon = cast(Daemon, fake)
    asked: list[str] = []
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def unreachable(_d: Daemon, peer: Peer, uuid: str, mid: str = "") -> object:
        asked.append(mid)
        raise locate.PeerUnreachable("connection refused")

    async def recorded(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(locate, "ask", unreachable)
    monkeypatch.setattr(asyncio, "sleep", recorded)  # (no other task runs here)
    uuid = "00000000-0000-0000-0000-0000000000aa"
    away = Away(Peer("h", "host-b", "virtmig+tls://127.0.0.1:1"), "c" * 32)
    with caplog.at_level(logging.WARNING, logger="virtmig.daemon.locate"):
        locate.settle_later(daemon, uuid, away, "a lost Finish reply")
        await fake.placement.tasks[uuid]
    assert asked == ["c" * 32] * 6
    assert waits == [1, 2, 4, 5, 5]  # none after the last try: it gives up at once
    assert "try 3 of 6, next in 4 s" in caplog.text
    assert "(try 6 of 6)" in caplog.text and "try 6 of 6, next" not in caplog.text
    assert caplog.text.count("waiting for its daemon (virtmig+tls://127.0.0.1:1)") == 6
    assert "gave up after 6 tries" in locate.note(daemon, uuid)
    still = fake.placement.away(uuid)
    assert still is not None and still.uncertain  # nothing decided on a guess


# --- a restart ------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", [Phase.PERFORM3, Phase.PERFORM3_DONE,
                                   Phase.CONFIRM3_CANCELLED])
async def test_restart_recovery_never_resumes_a_paused_source_on_a_guess(
    tmp_path: Path, phase: Phase
) -> None:
    """libvirt's tables resume a paused source after a restart in perform3 or
    confirm3_cancelled; virtmig asks the destination first.  The test backend's guests do
    not outlive their daemon, so the restart's recovery gets the status file the daemon wrote
    for a paused guest with that job."""
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)  # shut: the destination cannot be asked
        try:
            await running_guest(src)
            dom = src.daemon.registry.find_name("vm1")
            assert dom is not None
            await src.daemon.backend.pause(dom.uuid)  # as Perform leaves it
            src.daemon.set_state(dom, DomainState.PAUSED, PausedReason.MIGRATION)
            dom.job = MigrationJob(
                kind=AsyncJob.MIGRATION_OUT, phase=phase, flags=F.LIVE, params=TypedParams(),
                pre_state=DomainState.RUNNING, migration_id="d" * 32,
                peer_hostuuid=dst.daemon.host_uuid, peer_hostname="dst.test", dest_uri=gate.uri)
            src.daemon.registry.save_status(dom)
            status = etree.parse(src.state_dir / "status" / f"{dom.uuid}.xml").getroot()
            dom.job = None
            await recovery.recover(src.daemon, [(dom, status)])

            assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
            away = src.daemon.placement.away(dom.uuid)
            assert away is not None and away.uncertain and away.migration_id == "d" * 32
            await wait_until(lambda: "waiting for its daemon" in locate.note(src.daemon,
                                                                             dom.uuid),
                             timeout=30, what="the source to say what it waits for")
            with pytest.raises(GuestElsewhere, match="migrate-resolve"):
                await src.conn.resume("vm1")
            await gate.open()  # no copy there: the guest is put back as it was

            async def resumed() -> bool:
                return await src.conn.state("vm1") == (DomainState.RUNNING, 6,
                                                       "migration-canceled")

            await wait_until(resumed, timeout=30, what="the source to be resumed")
            assert src.daemon.placement.away(dom.uuid) is None
        finally:
            await gate.shut()


# --- Confirm(cancelled) ---------------------------------------------------------------------------


async def test_confirm_cancelled_with_the_destination_unreachable_stays_paused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that takes a lost Finish reply for a failure sends Confirm(cancelled) while the
    destination cannot be asked: the guest (running there) is not resumed here; it stays
    paused until the destination answers, then it is shut off as migrated."""
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)  # shut
        try:
            await running_guest(src)

            class BelievesItFailed(LostFinishDest):
                async def finished(self, dname: str) -> bool:
                    return False

            with pytest.raises(ConnectionFailed), caplog.at_level(logging.WARNING,
                                                                  "virtmig.daemon.locate"):
                await run_v3(RemoteSource(src.conn, True), BelievesItFailed(dst.conn, True),
                             "vm1", TypedParams.of({P.DEST_URI: gate.uri}), F.LIVE,
                             protection=True)
            assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
            assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
            assert (await src.conn.job_info("vm1")).phase == ""  # the job ended
            assert "Confirm(cancelled), and the destination cannot be asked" in caplog.text
            detail = (await src.conn.state_detail("vm1"))[3]
            assert "unknown" in detail and gate.uri in detail
            await gate.open()

            async def settled() -> bool:
                return await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")

            await wait_until(settled, timeout=30, what="the source to learn it arrived")
            assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
        finally:
            await gate.shut()


# --- Begin ----------------------------------------------------------------------------------------


async def test_begin_refuses_a_guest_whose_outcome_is_unknown(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", dict(FAST)), ("dst", dict(FAST))) as (src, dst):
        await running_guest(src)
        uuid = (await src.conn.lookup("vm1")).uuid
        src.daemon.placement.departed(uuid, Away(Peer(dst.daemon.host_uuid, "dst.test"),
                                                 "e" * 32, uncertain=True))
        with pytest.raises(GuestElsewhere, match=r"cannot migrate domain 'vm1'.*"
                                                 r"migrate-resolve"):
            await migrate(src, dst, F.LIVE)
        assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
        assert (await src.conn.job_info("vm1")).phase == ""
        with pytest.raises(NoDomain):
            await dst.conn.lookup("vm1")


# --- the CLI --------------------------------------------------------------------------------------


async def test_cli_domstate_reason_and_migrate_resolve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``domstate --reason`` prints what the guest waits for; ``migrate-resolve`` fails while
    the destination cannot be asked, and settles it once it answers."""
    async with hosts(tmp_path, "test", ("src", GIVES_UP), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)
        try:
            await lost_finish(src, dst, gate.uri, reaches=True)
            uuid = (await src.conn.lookup("vm1")).uuid
            await wait_until(lambda: "gave up" in locate.note(src.daemon, uuid), timeout=30,
                             what="the background settling to give up")
            uri = f"{src.uri}?pkipath={session_pki().client()}"

            async def virtmig(*argv: str) -> tuple[int, str, str]:
                code = await asyncio.to_thread(cli.main, ["-q", "-c", uri, *argv])
                out = capsys.readouterr()
                return code, out.out, out.err

            code, out, _ = await virtmig("domstate", "--reason", "vm1")
            assert code == 0
            assert out.startswith("paused (migrating): outcome of migration ")
            assert f"to host dst.test ({dst.daemon.host_uuid}) unknown: gave up" in out
            assert "run 'virtmig migrate-resolve' once that host answers" in out
            code, out, err = await virtmig("migrate-resolve", "vm1")
            assert (code, out) == (1, "")
            assert err.startswith("error: Failed to resolve the migration of domain 'vm1'\n"
                                  "error: operation failed: cannot settle the migration of "
                                  "'vm1': host dst.test (")
            assert "cannot be asked" in err
            await gate.open()
            assert await virtmig("migrate-resolve", "vm1") == (
                0, "Domain 'vm1' resolved: shut off (migrated)\n", "")
            assert await virtmig("domstate", "--reason", "vm1") == (
                0, "shut off (migrated)\n", "")
            assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
        finally:
            await gate.shut()


async def test_stopping_ends_settling_even_when_the_cancel_meets_an_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon stops (its settling tasks are cancelled) in the very step the destination's
    connection opens: the task ends then, instead of swallowing the cancel and asking again
    for up to ``settle_attempts`` tries (Python 3.11's ``asyncio.wait_for`` returns an inner
    result that is ready as the cancel arrives, and drops the cancel)."""
    config = SimpleNamespace(settle_retry_min=0.01, settle_retry_max=0.01, settle_attempts=50,
                             peer_timeout=5.0, pki_dir="")
    fake = SimpleNamespace(config=config, placement=PlacementStore(tmp_path / "placement"))
    daemon = cast(Daemon, fake)
    uuid = "00000000-0000-0000-0000-0000000000ab"
    mid = "d" * 32
    opened: list[int] = []

    class Pending:
        async def guest_location(self, *_a: object, **_k: object) -> object:
            return SimpleNamespace(host_uuid="", active=False, arrived_migration_id="",
                                   incoming_migration_id=mid, incoming_phase="prepare3")

        async def close(self) -> None:
            return None

    async def opens_as_the_daemon_stops(*_a: object, **_k: object) -> Pending:
        opened.append(1)
        fake.placement.tasks[uuid].cancel()  # the stop, in the step the connection opens
        return Pending()

    monkeypatch.setattr(AsyncConnection, "open", opens_as_the_daemon_stops)
    away = Away(Peer("", "host-b", "virtmig+tls://127.0.0.1:1"), mid)
    locate.settle_later(daemon, uuid, away, "a lost Finish reply")
    task = fake.placement.tasks[uuid]
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done, f"the settling went on after its cancel: {len(opened)} tries"
    assert task.cancelled() and opened == [1]
