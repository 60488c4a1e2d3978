"""The fault harness's migration client, run as its own process (``python -m
tests.faults.client``) so that a case can SIGKILL it between two phases.

It drives one migration of ``--domain`` from ``--src`` to ``--dst`` (both ``virtmig+unix://``
URIs of daemons the harness started) and reports on stdout, one line each, where it is:
``CALL <phase>`` before a call to a party, ``DONE <phase>`` after it, then ``RESULT ok`` or
``RESULT error <message>``.  ``--pause-after PHASE`` (regular mode: ``begin``, ``prepare``,
``perform``, ``finish``) stops it after that phase returned: it prints ``PAUSED <phase>`` and
goes on only when a line arrives on stdin (the harness kills it there, or lets it go on).

Regular mode runs the sequence driver itself (:func:`virtmig.client.sequence.run_v3`, as
``migrate3`` does for two current daemons), with ``virtmig.dest_uri`` naming the destination's
TLS address as the source host reaches it; ``p2p`` and ``tunnelled`` make the one
peer-to-peer call to the source daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.proto.errors import VirtmigError
from virtmig.proto.flags import Feature, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams

F = MigrateFlags
P = MigrateParam


def say(line: str) -> None:
    print(line, flush=True)


class Stepper:
    """Reports each phase and pauses after the one asked for."""

    def __init__(self, pause_after: str) -> None:
        self.pause_after = pause_after

    async def after(self, phase: str) -> None:
        say(f"DONE {phase}")
        if phase == self.pause_after:
            say(f"PAUSED {phase}")
            await asyncio.to_thread(sys.stdin.readline)
            say(f"GO {phase}")


class SteppedSource(RemoteSource):
    stepper: Stepper

    async def begin(self, dom: str, params: TypedParams, flags: int) -> tuple[str, bytes]:
        say("CALL begin")
        out = await super().begin(dom, params, flags)
        await self.stepper.after("begin")
        return out

    async def perform(self, dom: str, params: TypedParams, cookie: bytes, flags: int) -> bytes:
        say("CALL perform")
        out = await super().perform(dom, params, cookie, flags)
        await self.stepper.after("perform")
        return out

    async def confirm(self, dom: str, params: TypedParams, cookie: bytes, flags: int,
                      cancelled: bool) -> None:
        say("CALL confirm")
        await super().confirm(dom, params, cookie, flags, cancelled)
        await self.stepper.after("confirm")


class SteppedDest(RemoteDest):
    stepper: Stepper

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        say("CALL prepare")
        out = await super().prepare(params, cookie, flags)
        await self.stepper.after("prepare")
        return out

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        say("CALL finish")
        out = await super().finish(params, cookie, flags, cancelled)
        await self.stepper.after("finish")
        return out


async def regular(args: argparse.Namespace, params: TypedParams, flags: int) -> None:
    src = await AsyncConnection.open(args.src)
    dst = await AsyncConnection.open(args.dst)
    try:
        protection = Feature.CHANGE_PROTECTION in (await src.host()).features
        await src.open_session()
        await dst.open_session()
        stepper = Stepper(args.pause_after)
        source, dest = SteppedSource(src, True), SteppedDest(dst, True)
        source.stepper = dest.stepper = stepper
        await run_v3(source, dest, args.domain, params, flags, protection=protection)
    finally:
        await src.close()
        await dst.close()


async def peer_to_peer(args: argparse.Namespace, params: TypedParams, flags: int) -> None:
    async with await AsyncConnection.open(args.src) as src:
        say("CALL perform")
        await src.migrate_to_uri3(args.domain, args.dest_uri, params, flags)
        say("DONE perform")


async def run(args: argparse.Namespace) -> int:
    params = TypedParams.of({P.BANDWIDTH: args.bandwidth} if args.bandwidth else {})
    flags = F.LIVE | F.PERSIST_DEST
    try:
        if args.mode == "regular":
            params.set(P.DEST_URI, args.dest_uri)
            await regular(args, params, int(flags))
        else:
            flags |= F.PEER2PEER | (F.TUNNELLED if args.mode == "tunnelled" else 0)
            await peer_to_peer(args, params, int(flags))
    except VirtmigError as exc:
        say(f"RESULT error {type(exc).__name__}: {exc}")
        return 1
    say("RESULT ok")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="faults-client")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dest-uri", required=True, help="the destination as the source reaches it")
    p.add_argument("--domain", default="vm1")
    p.add_argument("--mode", choices=["regular", "p2p", "tunnelled"], default="regular")
    p.add_argument("--bandwidth", type=int, default=0, help="MiB/s (0: no limit)")
    p.add_argument("--pause-after", default="",
                   choices=["", "begin", "prepare", "perform", "finish"])
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
