"""Run by tests/daemon/test_eventloop.py in a process of its own: on uvloop, migrations between
two in-process daemons over mutual TLS while processes keep starting (uvloop forks to start
them).  ``python -m tests.daemon.eventloop_stress MIGRATIONS [grpc-first]``: prints one JSON
line.  ``grpc-first`` imports gRPC before virtmig.daemon (its fork handlers stay on) and only
reports what :func:`virtmig.daemon.eventloop.check` says."""

from __future__ import annotations

import sys

if "grpc-first" in sys.argv[2:]:
    import grpc  # noqa: F401

import asyncio
import json
import tempfile
from pathlib import Path

import uvloop

from virtmig.daemon import GRPC_FORK_HANDLERS_OFF, eventloop
from virtmig.proto.errors import InvalidArgument
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import domain_xml, hosts


async def migrations(count: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        async with hosts(Path(tmp), "test", ("src", {}), ("dst", {})) as (a, b):
            await a.conn.define(domain_xml("vm", 4))
            await a.conn.start("vm")
            stop = asyncio.Event()

            async def spawn() -> int:
                started = 0
                while not stop.is_set():
                    proc = await asyncio.create_subprocess_exec("true")
                    await proc.wait()
                    started += 1
                return started

            spawner = asyncio.ensure_future(spawn())
            errors: list[str] = []
            for i in range(count):
                src, dst = (a, b) if i % 2 == 0 else (b, a)
                try:
                    await src.conn.migrate3("vm", dst.conn, TypedParams(), MigrateFlags.LIVE)
                except Exception as exc:  # reported, not raised: the test reads the line
                    errors.append(str(exc))
                    break
            stop.set()
            return {"migrated": i + 1 - len(errors), "spawned": await spawner,
                    "errors": errors}


def main() -> None:
    out: dict[str, object] = {"handlers_off": GRPC_FORK_HANDLERS_OFF}
    try:
        eventloop.check("uvloop")
    except InvalidArgument as exc:
        out["refused"] = str(exc)
    if "refused" not in out:
        out.update(uvloop.run(migrations(int(sys.argv[1]))))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
