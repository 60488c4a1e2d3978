"""The registry keeps the active domains and the domains with a migration job as they change
(issue 17: ``max_*_migrations``' check, ``GetHost``'s counts, the session cleanup and the job
reaper cost the same with 100,000 domains defined): after every change, through define,
undefine, start, destroy, migrations in and out, a failed one and an aborted one, they equal
what a walk over every domain finds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon import jobctl
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import AsyncJob
from virtmig.daemon.registry import DomainObj, Registry
from virtmig.proto.errors import OperationAborted, VirtmigError
from virtmig.proto.flags import MigrateFlags as F
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    ClosedPortDest,
    domain_xml,
    hosts,
    wait_job_streaming,
    wait_until,
)

from .migration_helpers import migrate, running_guest


def consistent(registry: Registry) -> None:
    """The kept sets against a walk over every domain."""
    every = list(registry)
    assert set(registry._active) == {d for d in every if d.active}
    assert set(registry.jobs()) == {d for d in every if d.job is not None}
    for kind in AsyncJob:
        assert set(registry.jobs(kind)) == {
            d for d in every if d.job is not None and d.job.kind is kind}
    assert registry.active_count() == sum(1 for d in every if d.active)
    assert all(d.holder is registry for d in every)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Check the sets after every change a registry is told of, and at every limit check."""
    seen: list[str] = []
    track, check_limit = Registry.track, jobctl.check_limit

    def checked_track(self: Registry, dom: DomainObj) -> None:
        track(self, dom)
        consistent(self)
        seen.append("track")

    def checked_limit(daemon: Daemon, kind: AsyncJob) -> None:
        consistent(daemon.registry)
        seen.append(f"limit {kind.value}")
        check_limit(daemon, kind)

    monkeypatch.setattr(Registry, "track", checked_track)
    monkeypatch.setattr(jobctl, "check_limit", checked_limit)
    yield seen


async def test_the_kept_sets_follow_every_change(tmp_path: Path, checks: list[str]) -> None:
    limits: dict[str, object] = {"max_outgoing_migrations": 1, "max_incoming_migrations": 1}
    async with hosts(tmp_path, "test", ("src", limits), ("dst", limits)) as (src, dst):
        for name in ("vm1", "vm2", "vm3"):
            await running_guest(src, name)
        await src.conn.define(domain_xml("idle"))
        await migrate(src, dst, name="vm1")  # out of src, into dst
        with pytest.raises(VirtmigError):  # Perform fails: the job ends on both sides
            await run_v3(RemoteSource(src.conn, True), ClosedPortDest(dst.conn, True), "vm2",
                         TypedParams(), F.LIVE, protection=True)
        slow = asyncio.ensure_future(migrate(src, dst, name="vm3", params=TypedParams.of(
            {MigrateParam.BANDWIDTH: 1})))
        await wait_job_streaming(src.conn, "vm3")
        for daemon in (src.daemon, dst.daemon):
            consistent(daemon.registry)
            assert len(daemon.registry.jobs()) == 1
        await src.conn.abort_job("vm3")
        with pytest.raises(OperationAborted):
            await slow
        await src.conn.destroy("vm2")
        await src.conn.undefine("vm2")
        await src.conn.undefine("idle")
        await migrate(dst, src, name="vm1")  # and back
        await dst.conn.define(domain_xml("vm4"))
        await dst.conn.start("vm4")
        await dst.conn.destroy("vm4")
        for daemon in (src.daemon, dst.daemon):
            consistent(daemon.registry)
            assert not daemon.registry.jobs()
        assert src.daemon.registry.active_count() == 2  # vm1 back, vm3 never left
        host = await src.conn.host(refresh=True)
        assert (host.active_domains, host.inactive_domains) == (2, 0)
    assert checks.count("track") > 50
    assert {"limit migration out", "limit migration in"} <= set(checks)


async def test_a_migration_and_a_connection_never_walk_every_domain(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a migration (Begin's and Prepare's limit checks, the end of its sessions, the job
    reaper) and a new connection (GetHost's counts) read is kept, not counted over every
    domain: with the walk made to fail, they still work."""
    limits: dict[str, object] = {"max_outgoing_migrations": 4, "max_incoming_migrations": 4,
                                 "incoming_job_timeout": 0.5}
    async with hosts(tmp_path, "test", ("src", limits), ("dst", limits)) as (src, dst):
        await running_guest(src, "vm1")
        await src.conn.define(domain_xml("idle"))
        walks: list[int] = []

        def no_walk(self: Registry) -> Iterator[DomainObj]:
            walks.append(len(self))
            raise AssertionError("a walk over every domain")

        looks: list[AsyncJob | None] = []
        jobs = Registry.jobs

        def counted_jobs(self: Registry, kind: AsyncJob | None = None) -> list[DomainObj]:
            looks.append(kind)
            return jobs(self, kind)

        monkeypatch.setattr(Registry, "__iter__", no_walk)
        monkeypatch.setattr(Registry, "jobs", counted_jobs)
        await migrate(src, dst, name="vm1", params=TypedParams.of({MigrateParam.BANDWIDTH: 64}))
        async with await type(src.conn).open(src.uri, pki_dir=src.conn.uri.pki_dir) as other:
            host = await other.host()
            await other.open_session()  # its end: the daemon looks for the jobs it owned
        assert (host.active_domains, host.inactive_domains) == (0, 2)  # vm1 stays defined
        seen = len(looks)  # the job reaper looks again (the walk would fail it: logged)
        await wait_until(lambda: len(looks) > seen + 1, timeout=30, what="the job reaper")
        monkeypatch.undo()
        assert walks == []
        assert (await dst.conn.state("vm1"))[0].name == "RUNNING"
