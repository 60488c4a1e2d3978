"""Nothing left behind: a migration job no caller's session owns is rolled back by the daemon
itself after ``incoming_job_timeout`` (a short one here), and what an offline Prepare left can be
destroyed, aborted or redefined by an operator.

The callers here open no session (the RPCs are called directly), as a hostile or crashed
client would.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tests.daemon.migration_helpers import P, running_guest
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.daemon import migration
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.job import AsyncJob, Phase
from virtmig.daemon.migration.owner import unowned_expired
from virtmig.proto.errors import InvalidArgument, NoDomain, OperationInvalid
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, domain_xml, hosts, wait_until

F = MigrateFlags
SHORT = 0.3  # incoming_job_timeout of the daemons that reap


@pytest.fixture
async def reaping(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    settings: dict[str, object] = {"incoming_job_timeout": SHORT}
    async with hosts(tmp_path, "test", ("src", settings), ("dst", settings)) as pair:
        yield pair[0], pair[1]


async def _prepare_without_session(src: Host, dst: Host, name: str,
                                   flags: int = F.LIVE) -> str | None:
    xml, cookie = await RemoteSource(src.conn, True).begin(name, TypedParams(), flags)
    _cookie, uri = await RemoteDest(dst.conn, True).prepare(
        TypedParams.of({P.DEST_XML: xml}), cookie, flags)
    return uri


def _gone(host: Host, name: str) -> bool:
    return host.daemon.registry.find_name(name) is None


async def test_prepare_without_session_is_rolled_back(reaping: tuple[Host, Host]) -> None:
    src, dst = reaping
    await running_guest(src)
    uri = await _prepare_without_session(src, dst, "vm1")
    assert uri is not None and dst.daemon.ports._used
    await wait_until(lambda: _gone(dst, "vm1"), timeout=30,
                     what="the unowned incoming guest to be rolled back")
    assert not dst.daemon.ports._used
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    # The port range is not exhausted: the next Prepare gets a port again.
    assert await _prepare_without_session(src, dst, "vm1") is not None


async def test_a_job_taken_up_while_the_reaper_waits_is_kept(tmp_path: Path) -> None:
    """The reaper checks an expired job again once it holds the domain's lock: a job a phase
    call took up meanwhile (idle since just now) is not rolled back under that call."""
    settings: dict[str, object] = {"incoming_job_timeout": 2.0}  # (time to take the lock first)
    async with hosts(tmp_path, "test", ("src", {}), ("dst", settings)) as (src, dst):
        await running_guest(src)
        await _prepare_without_session(src, dst, "vm1")
        ddom = dst.daemon.registry.by_name("vm1")
        job = ddom.job
        assert job is not None
        async with ddom.lock:  # a phase call runs
            await wait_until(lambda: bool(getattr(ddom.lock, "_waiters", None)), timeout=30,
                             what="the reaper to wait for the domain's lock")
            job.idle_since = time.monotonic()  # (what the call's end does)
        async with ddom.lock:  # (the reaper, waiting first, has had its turn)
            assert ddom.job is job


async def test_prepare_keeps_a_prior_persistent_definition(reaping: tuple[Host, Host]) -> None:
    src, dst = reaping
    await running_guest(src)
    await dst.conn.define(domain_xml("vm1", uuid=(await src.conn.lookup("vm1")).uuid))
    await _prepare_without_session(src, dst, "vm1")
    dom = dst.daemon.registry.by_name("vm1")
    # The job ends, then the rolled-back guest is marked shut off: wait for both.
    await wait_until(lambda: dom.job is None and dom.state is DomainState.SHUTOFF, timeout=30,
                     what="the incoming job to end and its guest to be shut off")
    assert await dst.conn.state("vm1") == (DomainState.SHUTOFF, 6, "failed")
    assert dom.persistent and dom.live is None
    done = await dst.conn.job_info("vm1", completed=True)
    assert done.type is JobType.FAILED and "no caller session" in done.error


async def test_offline_prepare_without_session_is_rolled_back(
        reaping: tuple[Host, Host]) -> None:
    src, dst = reaping
    await src.conn.define(domain_xml("vm1"))
    await _prepare_without_session(src, dst, "vm1", F.OFFLINE | F.PERSIST_DEST)
    assert dst.daemon.registry.by_name("vm1").job is not None
    await wait_until(lambda: _gone(dst, "vm1"), timeout=30,
                     what="the offline incoming domain to be rolled back")
    assert not list(dst.state_dir.joinpath("status").glob("*.xml"))
    await dst.conn.define(domain_xml("vm1"))  # nothing blocks the name any more


async def test_begin_with_change_protection_without_session_ends(
        reaping: tuple[Host, Host]) -> None:
    src, _dst = reaping
    await running_guest(src)
    await RemoteSource(src.conn, True).begin("vm1", TypedParams(), F.LIVE | F.CHANGE_PROTECTION)
    dom = src.daemon.registry.by_name("vm1")
    assert dom.job is not None
    await wait_until(lambda: dom.job is None, timeout=30, what="the source job to end")
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
    await src.conn.suspend("vm1")  # a state change no longer waits for a job


async def test_perform_without_session_leaves_source_paused(reaping: tuple[Host, Host]) -> None:
    """The caller vanished after Perform: outcome unknown, the source stays paused and its job
    ends.  (The destination's side is driven over a connection with a session, so that the
    incoming guest lives until that session ends, after Perform.)"""
    src, dst = reaping
    await running_guest(src)
    dconn = await type(dst.conn).open(dst.uri)
    try:
        await dconn.open_session()
        s, d = RemoteSource(src.conn, True), RemoteDest(dconn, True)
        xml, cookie = await s.begin("vm1", TypedParams(), F.LIVE)
        cookie, uri = await d.prepare(TypedParams.of({P.DEST_XML: xml}), cookie, F.LIVE)
        assert uri is not None
        await s.perform("vm1", TypedParams.of({P.URI: uri}), cookie, F.LIVE)
    finally:
        await dconn.close()
    dom = src.daemon.registry.by_name("vm1")
    await wait_until(lambda: dom.job is None and _gone(dst, "vm1"), timeout=30,
                     what="both jobs to be abandoned")
    assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
    done = await src.conn.job_info("vm1", completed=True)
    assert done.type is JobType.FAILED and "no caller session" in done.error
    assert not dst.daemon.ports._used


async def test_a_job_whose_session_lives_is_kept(reaping: tuple[Host, Host]) -> None:
    src, dst = reaping
    await running_guest(src, "kept")
    await running_guest(src, "marker")
    await dst.conn.open_session()  # Prepare below is owned by this session
    await _prepare_without_session(src, dst, "kept")
    # Another connection, without a session, leaves a job the reaper will take.
    other = await type(dst.conn).open(dst.uri)
    try:
        await _prepare_without_session(src, Host(dst.running, other, dst.uri, dst.state_dir),
                                       "marker")
    finally:
        await other.close()
    await wait_until(lambda: _gone(dst, "marker"), timeout=30, what="the unowned job to go")
    kept = dst.daemon.registry.by_name("kept")
    assert kept.job is not None and kept.job.kind is AsyncJob.MIGRATION_IN


async def test_p2p_source_job_is_owned_by_the_run(
        reaping: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """In peer-to-peer the source daemon owns its job for the run: never reaped as unowned."""
    src, dst = reaping
    await running_guest(src)
    seen: list[bool] = []
    real = migration.dst_prepare

    async def prepare(*args: object, **kwargs: object) -> tuple[bytes, str | None]:
        job = src.daemon.registry.by_name("vm1").job
        assert job is not None and job.owner
        seen.append(unowned_expired(src.daemon, job, job.idle_since + 1e6))
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(migration, "dst_prepare", prepare)
    await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER)
    assert seen == [False]
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    await wait_until(lambda: not src.daemon.sessions, timeout=30,
                     what="the run's session to end")


async def test_owner_gone_stops_a_prepare_waiting_for_a_port(pair: tuple[Host, Host]) -> None:
    """A Prepare that waits for a migration port (busy, without the domain's lock) is told to
    stop, with the owner's error: it rolls back itself (test_port_wait.py runs it whole)."""
    src, dst = pair
    await running_guest(src)
    await _prepare_without_session(src, dst, "vm1")
    dom = dst.daemon.registry.by_name("vm1")
    job = dom.job
    assert job is not None
    job.waiting_port, job.busy = True, True  # as _dst_port leaves it while it waits
    await migration.any_owner_gone(dst.daemon, dom)
    assert job.abort_requested and dom.job is job
    assert str(job.fail_error) == "operation failed: migration caller went away"
    job.waiting_port, job.busy = False, False


def _expired(phase: Phase, idle: float, timeout: float = 60.0) -> bool:
    """:func:`unowned_expired` of an idle job without a live owner, ``idle`` s after its last
    phase call."""
    daemon = SimpleNamespace(session_alive=lambda owner: False,
                             config=SimpleNamespace(incoming_job_timeout=timeout))
    job = SimpleNamespace(busy=False, phase=phase, owner="gone", idle_since=1000.0)
    return unowned_expired(cast(Any, daemon), cast(Any, job), 1000.0 + idle)


def test_a_job_expires_when_its_timeout_is_reached() -> None:
    """Idle for exactly ``incoming_job_timeout``: expired (mutation testing: ``>``)."""
    assert _expired(Phase.PREPARE, 60.0)
    assert not _expired(Phase.PREPARE, 59.5)


def test_a_post_copy_failed_job_never_expires() -> None:
    """Only post-copy recovery settles a post-copy-failed job: the reaper never counts it
    (mutation testing: ``<=``), nor a phase after it."""
    assert _expired(Phase.FINISH3, 1e6)
    assert not _expired(Phase.POSTCOPY_FAILED, 1e6)
    assert not _expired(Phase.PREPARE_RESUME, 1e6)


# --- what an offline Prepare left, for an operator (the reaper's timeout is long here) --------


async def _offline_leftover(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await src.conn.define(domain_xml("vm1"))
        await _prepare_without_session(src, dst, "vm1", F.OFFLINE | F.PERSIST_DEST)
        assert dst.daemon.registry.by_name("vm1").job is not None
        yield src, dst


leftover = pytest.fixture(_offline_leftover)


async def test_offline_leftover_can_be_destroyed(leftover: tuple[Host, Host]) -> None:
    _src, dst = leftover
    await dst.conn.destroy("vm1")
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")


async def test_offline_leftover_can_be_aborted(leftover: tuple[Host, Host]) -> None:
    _src, dst = leftover
    await dst.conn.abort_job("vm1")
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")


async def test_offline_leftover_can_be_redefined(leftover: tuple[Host, Host]) -> None:
    _src, dst = leftover
    uuid = dst.daemon.registry.by_name("vm1").uuid
    await dst.conn.define(domain_xml("vm1", 128, uuid=uuid))
    dom = dst.daemon.registry.by_name("vm1")
    assert dom.job is None and dom.persistent
    assert (await dst.conn.info("vm1")).max_memory_kib == 128 * 1024


async def test_incoming_with_a_guest_still_refuses_abort(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await running_guest(src)
        await _prepare_without_session(src, dst, "vm1")
        with pytest.raises(OperationInvalid, match="use virDomainDestroy"):
            await dst.conn.abort_job("vm1")
        await dst.conn.destroy("vm1")
        assert not dst.daemon.ports._used


@pytest.mark.parametrize("value", ["0", "-1", "\"x\"", "true"])
def test_incoming_job_timeout_must_be_positive(tmp_path: Path, value: str) -> None:
    conf = tmp_path / "virtmigd.toml"
    conf.write_text(f"incoming_job_timeout = {value}\n")
    with pytest.raises(InvalidArgument, match="incoming_job_timeout"):
        load_config(build_parser().parse_args(["--config", str(conf)]))


def test_incoming_job_timeout_default_and_setting(tmp_path: Path) -> None:
    assert load_config(build_parser().parse_args([])).incoming_job_timeout == 60
    conf = tmp_path / "virtmigd.toml"
    conf.write_text("incoming_job_timeout = 5\n")
    assert load_config(build_parser().parse_args(["--config", str(conf)])
                       ).incoming_job_timeout == 5
