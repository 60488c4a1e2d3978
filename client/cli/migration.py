"""``migrate``: the migration call, and virsh's watching around it (``virshWatchJob``): the
``--verbose`` progress line (and, at the end, the migration's id and the protocol that was used;
after a failure the id on stderr), Ctrl-C aborting the job, the one-shot ``--timeout`` action and
the switch to post-copy after pre-copy (``--postcopy-after-precopy``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from virtmig.client.cli.base import Session, lookup, on_sigint
from virtmig.client.cli.options import MigrateOptions, build_migration
from virtmig.client.cli.output import ProgressLine, job_progress
from virtmig.client.sequence import Trace
from virtmig.proto import logsafe
from virtmig.proto.errors import OperationInvalid, VirtmigError
from virtmig.proto.flags import JobType

if TYPE_CHECKING:
    from virtmig.client.connection import AsyncConnection, Domain

log = logsafe.logger(__name__)
T = TypeVar("T")

# Before the source's job exists (Begin, Prepare), a job watch has nothing to follow: it is
# opened again after this long.  Once the job exists, the daemon pushes every change.
JOB_WATCH_RETRY = 0.2
# Ctrl-C before the source's job exists: the abort is tried again after this long.
ABORT_RETRY = 0.2

_RUNNING_JOBS = (JobType.BOUNDED, JobType.UNBOUNDED)


async def _show_progress(conn: AsyncConnection, dom: Domain, work: asyncio.Future[object],
                         line: ProgressLine) -> None:
    """Follow the source's job as the daemon pushes it (``watch_job``) and keep the progress
    line; until the job exists (Begin, Prepare) the watch is opened again."""
    seen = False
    while not work.done():
        try:
            async for info in conn.watch_job(dom):
                if info.type not in _RUNNING_JOBS:
                    continue  # not started yet, or its final record: the call reports
                seen = True
                progress = job_progress(info.data_remaining, info.data_total)
                if progress is not None and not work.done():
                    line.show(progress)
        except VirtmigError as exc:
            log.debug("cannot watch the job of %s: %s", dom.name, exc)  # the call decides
        if seen:
            return
        await asyncio.sleep(JOB_WATCH_RETRY)


async def _abort(conn: AsyncConnection, dom: Domain, work: asyncio.Future[object]) -> None:
    """Ctrl-C: virsh's ``virDomainAbortJob`` on the source; before the job exists (Begin,
    Prepare), tried again until it does or the call ends.  Failures are only logged: the
    migration call's own result is reported."""
    while not work.done():
        try:
            await conn.abort_job(dom)
            return
        except OperationInvalid as exc:
            if "no job is active" not in str(exc):
                log.debug("cannot abort the migration of %s: %s", dom.name, exc)
                return
        except VirtmigError as exc:
            log.debug("cannot abort the migration of %s: %s", dom.name, exc)
            return
        await asyncio.sleep(ABORT_RETRY)


async def _after_timeout(conn: AsyncConnection, dom: Domain, seconds: int, action: str) -> None:
    """virsh's ``virshMigrateTimeout``: once, suspend the source or switch to post-copy;
    a failure is only logged."""
    await asyncio.sleep(seconds)
    try:
        if action == "postcopy":
            log.debug("migration timed out; switching to post-copy")
            await conn.start_postcopy(dom)
        else:
            log.debug("migration timed out; suspending domain")
            await conn.suspend(dom)
    except VirtmigError as exc:
        log.debug("migration timeout action %s failed: %s", action, exc)


async def _postcopy_after_precopy(conn: AsyncConnection, dom: Domain) -> None:
    """virsh's ``virshMigrateIteration``: switch to post-copy when iteration 2 starts (the
    first full pass is done); ``>= 2`` so that a missed event does not lose the switch."""
    try:
        async for ev in conn.events(dom):
            if ev.kind == "migration-iteration" and ev.iteration >= 2:
                log.debug("iteration %d finished, switching to post-copy", ev.iteration - 1)
                await conn.start_postcopy(dom)
                return
    except VirtmigError as exc:
        log.debug("failed to switch to post-copy: %s", exc)


async def watch_migration(conn: AsyncConnection, dom: Domain,
                          start: Callable[[], Awaitable[object]], opts: MigrateOptions, *,
                          label: str = "Migration") -> None:
    """virsh's ``virshWatchJob`` around the migration call ``start()``.

    Alongside the call: the progress line (``verbose``), the one-shot ``--timeout`` action, the
    switch after pre-copy (subscribed to the source's events before the call starts), and
    Ctrl-C, which aborts the job and keeps waiting for the call to fail; a second Ctrl-C
    raises :class:`KeyboardInterrupt` at once.
    """
    loop = asyncio.get_running_loop()
    helpers: list[asyncio.Task[None]] = []
    if opts.postcopy_after_precopy:
        helpers.append(loop.create_task(_postcopy_after_precopy(conn, dom)))
        await asyncio.sleep(0)  # the subscription goes out before the migration's first call
    work: asyncio.Future[object] = asyncio.ensure_future(start())
    line = ProgressLine(label)
    if opts.verbose:
        helpers.append(loop.create_task(_show_progress(conn, dom, work, line)))
    if opts.timeout:
        helpers.append(loop.create_task(
            _after_timeout(conn, dom, opts.timeout, opts.timeout_action)))
    interrupts = 0

    def interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        helpers.append(loop.create_task(_abort(conn, dom, work)))

    try:
        with on_sigint(interrupt):
            await work
    except BaseException:
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
        line.interrupted()
        raise
    finally:
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    if opts.verbose:
        line.done()


async def _source_domain(s: Session, key: str) -> tuple[AsyncConnection, Domain]:
    conn = await s.conn()
    return conn, await lookup(conn, key)


async def _loading_drivers(work: Awaitable[T]) -> T:
    """``work`` (the connections' first steps) with the migration drivers imported meanwhile:
    the import is CPU work of this thread, the TLS handshakes are gRPC's, on its own threads,
    so the import no longer waits for them to finish (nor they for it)."""
    task = asyncio.ensure_future(work)
    await asyncio.sleep(0)  # (the connections are on their way)
    import virtmig.client.migrate  # noqa: F401

    return await task


async def _connect_both(s: Session, key: str, desturi: str
                        ) -> tuple[AsyncConnection, Domain, AsyncConnection]:
    """The source's connection and domain, and the destination's connection, opened at once:
    the two TLS handshakes (each verified as any connection is) and first calls overlap instead
    of following each other, and each daemon's session (the migration needs both) opens as
    soon as its connection is up, the source's while the domain is looked up.  Failures are
    reported in the order of the sequential steps (the source's connection, its domain, then
    the destination; a session's, when the migration opens them); whatever opened is closed
    with the session."""
    loop = asyncio.get_running_loop()
    dest = loop.create_task(s.open(desturi, f"failed to connect to the destination '{desturi}'"))
    try:
        conn = await s.conn()
        conn.start_session()
        dom = await lookup(conn, key)
    except BaseException:
        dest.cancel()
        with contextlib.suppress(BaseException):
            await dest
        raise
    dconn = await dest
    dconn.start_session()
    return conn, dom, dconn


async def cmd_migrate(s: Session, args: argparse.Namespace) -> None:
    opts = build_migration(args)
    start: Callable[[], Awaitable[object]]
    trace = Trace()
    # The daemons connect (TCP, TLS) while the client library and the drivers are imported.
    s.dial(s.uri)
    if opts.unmanaged:
        conn, dom = await _loading_drivers(_source_domain(s, args.domain))
        dconnuri = args.desturi if args.p2p else None
        start = functools.partial(conn.migrate_to_uri3, dom, dconnuri, opts.params, opts.flags,
                                  trace=trace)
    else:
        s.dial(args.desturi)
        conn, dom, dconn = await _loading_drivers(_connect_both(s, args.domain, args.desturi))
        start = functools.partial(conn.migrate3, dom, dconn, opts.params, opts.flags, trace=trace)
    try:
        await watch_migration(conn, dom, start, opts)
    except BaseException:
        if opts.verbose and trace.migration_id:  # (the error follows on stderr)
            print(f"Migration id: {trace.migration_id}", file=sys.stderr)
        raise
    if opts.verbose:
        # On stdout: stderr keeps virsh's progress line, ending in "Migration: [100.00 %]".
        if trace.migration_id:
            print(f"Migration id: {trace.migration_id}")
        if trace.protocol:
            print(f"Migration protocol: {trace.protocol}")

