"""What a migration makes durable (issue 17): the fsyncs per migration, by file and phase.

Only a power loss (or a kernel crash) needs an fsync; every status write that recovery after one
does not read skips it (``virtmig.daemon.statusxml.status_needs_fsync``).  These tests pin the
fsyncs of one regular v3 migration there and back, so that one coming back (or one going that
recovery needs) fails here; and the order that keeps a crash between the source's last writes
recoverable.  Real daemons in this process, ``os.fsync`` counted by the file it syncs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lxml import etree

from virtmig.daemon import state as files
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.statusxml import job_from_status, status_needs_fsync
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, domain_xml, hosts, wait_until, wait_until_sync

F = MigrateFlags


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[list[Host]]:
    async with hosts(tmp_path, "test", ("a", {}), ("b", {})) as started:
        yield started


class Syncs:
    """``os.fsync`` recorded as (host, what): ``status:<phase or none>``, ``placement``, or
    a folder's name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, roots: dict[str, Path]) -> None:
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()
        self.roots = roots
        real = os.fsync

        def fsync(fd: int) -> None:
            self.seen[self._what(os.readlink(f"/proc/self/fd/{fd}"), fd)] += 1
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    def _what(self, path: str, fd: int) -> tuple[str, str]:
        for host, root in self.roots.items():
            if not path.startswith(f"{root}/"):
                continue
            rel = Path(path).relative_to(root)
            if os.path.isdir(path):
                return host, f"dir:{rel}"
            if rel.parts[0] == "status":
                data = Path(f"/proc/self/fd/{fd}").read_bytes()
                job = job_from_status(etree.fromstring(data))
                return host, f"status:{job.phase.label if job else 'none'}"
            return host, rel.parts[0]
        return "?", path


async def test_fsyncs_of_a_migration_there_and_back(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    await a.conn.define(domain_xml("vm", 4))
    await a.conn.start("vm")
    syncs = Syncs(monkeypatch, {"a": a.state_dir, "b": b.state_dir})
    await a.conn.migrate3("vm", b.conn, TypedParams(), F.LIVE)
    # The source: perform3_done (before Perform's reply nothing can run on the destination)
    # and where the guest went (placement; its status file is then removed); the destination:
    # its guest's placement (arrived) and its final, job-less status (which replaces whatever
    # status an earlier departure of this guest left there).  Nothing for begin3, perform3,
    # confirm3, prepare, finish3, nor the source's job-less status the removal supersedes.
    assert syncs.seen == {
        ("a", "status:perform3_done"): 1,
        ("a", "placement"): 1, ("a", "dir:placement"): 1,
        ("b", "placement"): 1, ("b", "dir:placement"): 1,
        ("b", "status:none"): 1,
    }
    syncs.seen.clear()
    await b.conn.migrate3("vm", a.conn, TypedParams(), F.LIVE)
    # Back: the transient copy on b leaves no status behind (removed, as before).
    assert syncs.seen == {
        ("b", "status:perform3_done"): 1,
        ("a", "placement"): 1, ("a", "dir:placement"): 1,
        ("a", "status:none"): 1,
    }


async def test_departure_is_durable_before_the_job_leaves_the_status(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the source's last writes must find either confirm3 in the status (and
    recover it: the guest is away) or the placement record: never a job-less status alone."""
    a, b = pair
    await a.conn.define(domain_xml("vm", 4))
    await a.conn.start("vm")
    uuid = (await a.conn.lookup("vm")).uuid
    seen: list[Phase | None] = []
    real = a.daemon.placement.departed_durably

    async def departed(*args: object, **kwargs: object) -> None:
        status = a.state_dir / "status" / f"{uuid}.xml"
        job = job_from_status(etree.fromstring(status.read_bytes()))
        seen.append(job.phase if job else None)
        await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(a.daemon.placement, "departed_durably", departed)
    await a.conn.migrate3("vm", b.conn, TypedParams(), F.LIVE)
    assert seen == [Phase.CONFIRM3]


@pytest.mark.parametrize(("kind", "phase", "flags", "durable"), [
    (None, None, F(0), True),
    (AsyncJob.MIGRATION_OUT, Phase.BEGIN3, F.LIVE, False),
    (AsyncJob.MIGRATION_OUT, Phase.PERFORM3, F.LIVE, False),
    (AsyncJob.MIGRATION_OUT, Phase.PERFORM3, F.LIVE | F.POSTCOPY, True),
    (AsyncJob.MIGRATION_OUT, Phase.PERFORM3_DONE, F.LIVE, True),
    (AsyncJob.MIGRATION_OUT, Phase.CONFIRM3, F.LIVE, False),
    (AsyncJob.MIGRATION_OUT, Phase.CONFIRM3_CANCELLED, F.LIVE, False),
    (AsyncJob.MIGRATION_OUT, Phase.PERFORM2, F.LIVE, True),
    (AsyncJob.MIGRATION_OUT, Phase.POSTCOPY_FAILED, F.LIVE | F.POSTCOPY, True),
    (AsyncJob.MIGRATION_IN, Phase.PREPARE, F.LIVE, False),
    (AsyncJob.MIGRATION_IN, Phase.FINISH3, F.LIVE, False),
    (AsyncJob.MIGRATION_IN, Phase.POSTCOPY_FAILED, F.LIVE | F.POSTCOPY, False),
])
def test_which_status_writes_are_fsynced(kind: AsyncJob | None, phase: Phase | None,
                                         flags: MigrateFlags, durable: bool) -> None:
    job = None if kind is None or phase is None else MigrationJob(kind=kind, phase=phase,
                                                                  flags=flags)
    assert status_needs_fsync(job) is durable


def test_replaced_files_are_released(tmp_path: Path) -> None:
    """The file a write replaces is closed by the background thread: no descriptor is left."""
    target = tmp_path / "f"
    files.atomic_write(target, b"first", fsync=False, sync_dir=False)
    before = len(os.listdir("/proc/self/fd"))
    synced = files.SYNC_COUNTER["file"]
    for i in range(50):
        files.atomic_write(target, b"x" * 5000 + str(i).encode(), fsync=False,
                           sync_dir=False)
    assert files.SYNC_COUNTER["file"] == synced  # fsync=False: none
    files.remove(target)
    assert not target.exists()
    wait_until_sync(lambda: len(os.listdir("/proc/self/fd")) <= before, timeout=10,
                    what="the replaced files' descriptors closed")


async def test_migration_fsyncs_leave_the_event_loop_free(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fsync on a migration's path runs in a worker thread: the daemon's event loop
    serves other migrations meanwhile (200 at once share the journal's commits)."""
    a, b = pair
    await a.conn.define(domain_xml("vm", 4))
    await a.conn.start("vm")
    loop_thread = threading.get_ident()
    on_loop: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.get_ident() == loop_thread:
            on_loop.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await a.conn.migrate3("vm", b.conn, TypedParams(), F.LIVE)
    await b.conn.migrate3("vm", a.conn, TypedParams(), F.LIVE)
    assert on_loop == []


async def test_a_durable_write_never_replaces_a_newer_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write made while a durable write of the same file waits for its fsync wins, and is
    what is made durable."""
    target = tmp_path / "status.xml"
    files.atomic_write(target, b"old", sync_dir=False)
    gate, entered = threading.Event(), threading.Event()
    synced: list[bytes] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if threading.get_ident() != loop_thread:
            entered.set()
            gate.wait(10)
        with contextlib.suppress(OSError):
            synced.append(Path(f"/proc/self/fd/{fd}").read_bytes())
        real(fd)

    loop_thread = threading.get_ident()
    monkeypatch.setattr(os, "fsync", fsync)
    durable = asyncio.ensure_future(files.atomic_write_durably(target, b"durable",
                                                               sync_dir=False))
    # it runs up to its fsync, in a worker thread, held by the gate
    await wait_until(entered.is_set, timeout=30, what="the durable write's fsync")
    assert not durable.done()
    files.atomic_write(target, b"newer", sync_dir=False, fsync=False)
    gate.set()
    await durable
    assert target.read_bytes() == b"newer"
    assert synced[-1] == b"newer"  # the newer file was fsynced in its place
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporary left
