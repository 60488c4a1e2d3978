"""Commands on a domain's running job: ``domjobinfo``, ``domjobabort``, the maximum downtime and
speed (``migrate-set/getmaxdowntime``, ``migrate-set/getspeed``), ``migrate-postcopy``, and
``event``, which prints domain events (job ones included) as they come.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from virtmig.client.cli.base import (
    INT_MAX,
    LLONG_MAX,
    LLONG_MIN,
    ULLONG_MAX,
    CliError,
    Session,
    exclusive,
    lookup,
    number,
    on_sigint,
    require,
)
from virtmig.client.cli.jsonout import dumps, event_json, job_json
from virtmig.client.cli.output import (
    format_event,
    format_job_info,
    format_job_rawstats,
    pretty_capacity,
)
from virtmig.client.cli.parsers import EVENT_NAMES
from virtmig.client.values import JobInfo
from virtmig.proto.flags import JobType


async def cmd_domjobinfo(s: Session, args: argparse.Namespace) -> None:
    require(args, "keep_completed", "completed")
    exclusive(args, "completed", "watch")
    conn = await s.conn()
    dom = await lookup(conn, args.domain)

    exclusive(args, "json", "rawstats")

    def block(info: JobInfo, completed: bool) -> str:
        if args.json:
            return dumps(job_json(info), line=args.watch)
        if args.rawstats:
            return format_job_rawstats(info)
        return format_job_info(info, completed=completed, anystats=args.anystats)

    if not args.watch:
        info = await conn.job_info(dom, completed=args.completed)
        if (args.completed and info.type is JobType.CANCELLED and not args.anystats
                and not args.json):
            # libvirt 9.0 keeps no statistics of a job aborted by its caller: None.
            info = JobInfo(JobType.NONE, info.operation, 0, 0, 0, 0, 0, 0, 0, (), "", "")
        sys.stdout.write(block(info, args.completed))
        return
    # virtmig's extension: a block each time the daemon pushes a change, the last one being
    # the job's completed (or failed) record; blocks are separated by a blank line.
    first = True
    async for info in conn.watch_job(dom):
        final = info.type in (JobType.COMPLETED, JobType.FAILED, JobType.CANCELLED)
        sys.stdout.write(("" if first or args.json else "\n") + block(info, final))
        sys.stdout.flush()
        first = False


async def cmd_domjobabort(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    await conn.abort_job(dom, postcopy=args.postcopy)


async def cmd_migrate_setmaxdowntime(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    downtime = number("downtime", args.downtime, LLONG_MIN, LLONG_MAX)
    if downtime < 1:
        raise CliError("migrate: Invalid downtime")
    await conn.set_max_downtime(dom, downtime)


async def cmd_migrate_getmaxdowntime(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    print(await conn.get_max_downtime(dom))


async def cmd_migrate_setspeed(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    # virsh's vshCommandOptULWrap: a negative value wraps around (-1 is the largest).
    bandwidth = number("bandwidth", args.bandwidth, LLONG_MIN, ULLONG_MAX) % 2**64
    await conn.set_max_speed(dom, bandwidth, postcopy=args.postcopy)


async def cmd_migrate_getspeed(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    print(await conn.get_max_speed(dom, postcopy=args.postcopy))


async def cmd_migrate_compcache(s: Session, args: argparse.Namespace) -> None:
    """virsh's ``migrate-compcache``: with ``--size``, set the running domain's xbzrle cache
    (its next migrations use it; ``migrate --comp-xbzrle-cache`` overrides it for one); then
    print it, ``Compression cache: %.3lf %s`` with virsh's capacity units (no newline of its
    own, as virsh: the blank line after the output ends it)."""
    size = number("size", args.size, 0, ULLONG_MAX) if args.size is not None else None
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    if size is not None:
        await conn.set_compression_cache(dom, size)
    value, unit = pretty_capacity(await conn.get_compression_cache(dom))
    print(f"Compression cache: {value:.3f} {unit}", end="")


async def cmd_migrate_postcopy(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    await conn.start_postcopy(dom)


async def cmd_event(s: Session, args: argparse.Namespace) -> None:
    """virsh's ``event``: print domain events as they come; one (or, with ``--loop``, all
    until ``--timeout`` or Ctrl-C), then how many.  Exit status 1 when none came, as virsh."""
    exclusive(args, "all", "event")
    exclusive(args, "list", "all")
    exclusive(args, "list", "event")
    if args.list:
        for name in EVENT_NAMES:
            print(name)
        return
    if args.event is None and not args.all:
        raise CliError("one of --list, --all, or --event <type> is required")
    if args.event is not None and args.event not in EVENT_NAMES:
        raise CliError(f"unknown event type {args.event}")
    timeout = 0
    if args.timeout is not None:
        timeout = number("timeout", args.timeout, 1, INT_MAX // 1000)
    conn = await s.conn()
    dom = await lookup(conn, args.domain) if args.domain is not None else None
    count = 0

    async def receive() -> None:
        nonlocal count
        async for ev in conn.events(dom):
            if ev.kind not in EVENT_NAMES or args.event not in (None, ev.kind):
                continue
            sys.stdout.write(dumps(event_json(ev), line=True) if args.json
                             else format_event(ev, timestamp=args.timestamp))
            sys.stdout.flush()
            count += 1
            if not args.loop:
                return

    interrupted = asyncio.Event()
    receiving = asyncio.ensure_future(receive())
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        with on_sigint(interrupted.set):
            await asyncio.wait({receiving, stop}, timeout=timeout or None,
                               return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (receiving, stop):
            if not task.done():
                task.cancel()
        await asyncio.gather(receiving, stop, return_exceptions=True)
    if receiving.done() and not receiving.cancelled():
        receiving.result()  # the stream's failure, if any
    elif args.json:
        pass  # stdout holds the events' JSON lines only
    elif interrupted.is_set():
        print("event loop interrupted")
    else:
        print("event loop timed out")
    if not args.json:
        print(f"events received: {count}", flush=True)
    if not count:
        raise CliError()
