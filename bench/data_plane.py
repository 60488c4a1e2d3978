"""The test backend's data plane with the daemons as processes (issue 17), against a raw socket.

``python bench/data_plane.py [--runs 8] [--sizes 256,1024]`` starts two ``virtmigd`` processes
(``test`` backend, mutual TLS on loopback for the calls, as ``control_plane.py`` and ``make
demo`` run them) and migrates an idle guest of each size back and forth through the client
library, ``--runs`` times; after each migration (before it, every other round) the same bytes
go through the blocking loopback socket pair of ``run.py`` (``run.blocking_socket``: two
threads, ``sendall`` of 1 MiB, ``recv_into`` a 1 MiB buffer; what issue 17 calls "a raw
loopback socket") in this process.  The migration stream is plain TCP, as the socket pair
(no ``--tls``).

``run.py`` measures the same ratio with both daemons *in one process*: there the source's and
the destination's Python share one interpreter lock and the two cores with the socket pair's
threads, which no deployment does (``virtmigd`` is a process per host).  Both are kept: this
one is what a user running the daemons sees.

Per size: the migrations' times (``samples_s``) and both daemons' CPU per migration
(``daemon_cpu_samples_s``, from ``/proc``), the socket pair's (``blocking_samples_s``,
``blocking_cpu_samples_s``), the medians' MiB/s and ``ratio`` (migration over socket pair,
issue 17's figure: at least 0.6 on a 1 GiB guest), and ``ratio_cpu`` (the socket pair's CPU over
the daemons'). Written to ``bench/results/data-plane-procs.json``.  Nothing here is asserted by
tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from control_plane import Daemon, machine, two_daemons
from run import MIB, blocking_socket

from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import domain_xml

RESULTS = Path(__file__).resolve().parent / "results"


async def size_case(a: Daemon, b: Daemon, memory_mib: int, runs: int) -> dict[str, Any]:
    ca, cb = await a.connect(), await b.connect()
    name = f"vm{memory_mib}"
    try:
        await ca.define(domain_xml(name, memory_mib))
        await ca.start(name)
        conns = ((ca, cb), (cb, ca))
        await ca.migrate3(name, cb, TypedParams(), MigrateFlags.LIVE)  # warm-up, both ways
        await cb.migrate3(name, ca, TypedParams(), MigrateFlags.LIVE)
        start = machine()
        times: list[float] = []
        cpu: list[float] = []
        blk: list[float] = []
        blk_cpu: list[float] = []

        def socket_pair() -> None:
            wall, used = blocking_socket(memory_mib * MIB)
            blk.append(wall)
            blk_cpu.append(used)

        for i in range(runs):
            if i % 2:
                socket_pair()
            src, dst = conns[i % 2]
            c0 = a.cpu_s() + b.cpu_s()
            t0 = time.perf_counter()
            await src.migrate3(name, dst, TypedParams(), MigrateFlags.LIVE)
            times.append(time.perf_counter() - t0)
            cpu.append(a.cpu_s() + b.cpu_s() - c0)
            if not i % 2:
                socket_pair()
        if runs % 2:  # back where it started, so that the undefine below finds it on A
            await cb.migrate3(name, ca, TypedParams(), MigrateFlags.LIVE)
        await ca.destroy(name)
        await ca.undefine(name)
    finally:
        await ca.close()
        await cb.close()
    mib_s = memory_mib / statistics.median(times)
    blk_mib_s = memory_mib / statistics.median(blk)
    return {
        "name": f"data-plane-{memory_mib}m", "memory_mib": memory_mib, "runs": runs,
        "machine": start, "loadavg_end": os.getloadavg(),
        "samples_s": times, "daemon_cpu_samples_s": cpu,
        "blocking_samples_s": blk, "blocking_cpu_samples_s": blk_cpu,
        "median_s": statistics.median(times), "throughput_mib_s": mib_s,
        "blocking_mib_s": blk_mib_s, "ratio": mib_s / blk_mib_s,
        "ratio_cpu": statistics.median(blk_cpu) / statistics.median(cpu),
    }


async def main(args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp, two_daemons(Path(tmp), 4) as (a, b):
        for size in sizes:
            r = await size_case(a, b, size, args.runs)
            results.append(r)
            print(f"data-plane-procs  {size} MiB: {r['throughput_mib_s']:.0f} MiB/s "
                  f"(median {r['median_s'] * 1000:.0f} ms), blocking socket "
                  f"{r['blocking_mib_s']:.0f} MiB/s: ratio {r['ratio']:.2f} (CPU "
                  f"{r['ratio_cpu']:.2f}; daemons' CPU "
                  f"{statistics.median(r['daemon_cpu_samples_s']) * 1000:.0f} ms a "
                  f"migration; load {r['machine']['loadavg_start'][0]:.1f})", flush=True)
    (RESULTS / "data-plane-procs.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--sizes", default="256,1024", help="guest sizes, MiB (comma-separated)")
    asyncio.run(main(p.parse_args()))
