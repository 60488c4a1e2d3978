"""Where one virtmig migration's time goes: each v3 phase as the client sees it.

``python bench/phases.py SRC_URI DST_URI DOMAIN [--runs N]`` (``bench/libvirt_vs_virtmig.py`` runs
it inside host A's network namespace): opens one connection to each daemon (outside the timing,
as a connection is made once per ``virtmig`` process) and migrates ``DOMAIN`` there and back ``N``
times with the library's ``migrate3``, timing the driver's calls: Begin, Prepare (starts the
destination QEMU), Perform (the memory), Finish (the destination resumes the guest), Confirm (the
source QEMU ends), and ``other``: the rest of ``migrate3`` (host checks, lookups, sessions, the
domain's state).  Prints JSON: per
phase the seconds of every migration, and each migration's total.  The client's certificate comes
from ``$VIRTMIG_PKI_DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from virtmig.client import migrate
from virtmig.client.connection import AsyncConnection
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams

PHASES = ("begin", "prepare", "perform", "finish", "confirm")
PAUSE_S = 0.5


def _timed(spent: dict[str, float], name: str,
           method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def instrument(spent: dict[str, float]) -> None:
    """Time the five phase calls of :mod:`virtmig.client.migrate`'s parties into ``spent``."""
    for cls, names in ((migrate.RemoteSource, ("begin", "perform", "confirm")),
                       (migrate.RemoteDest, ("prepare", "finish"))):
        for name in names:
            setattr(cls, name, _timed(spent, name, getattr(cls, name)))


async def main(src_uri: str, dst_uri: str, dom: str, runs: int) -> dict[str, list[float]]:
    spent: dict[str, float] = {}
    instrument(spent)
    conns = [await AsyncConnection.open(src_uri), await AsyncConnection.open(dst_uri)]
    out: dict[str, list[float]] = {name: [] for name in (*PHASES, "other", "total")}
    try:
        for i in range(2 * runs):
            src, dst = conns[i % 2], conns[(i + 1) % 2]
            spent.clear()
            t0 = time.perf_counter()
            await src.migrate3(dom, dst, TypedParams(), MigrateFlags.LIVE)
            total = time.perf_counter() - t0
            for name in PHASES:
                out[name].append(spent.get(name, 0.0))
            out["other"].append(total - sum(spent.values()))
            out["total"].append(total)
            await asyncio.sleep(PAUSE_S)
    finally:
        for conn in conns:
            await conn.close()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("src_uri")
    p.add_argument("dst_uri")
    p.add_argument("domain")
    p.add_argument("--runs", type=int, default=3, help="round trips (two migrations each)")
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.src_uri, a.dst_uri, a.domain, a.runs))))
