"""``make bench``: timings of test-backend migrations between two in-process daemons.

Writes ``bench/results/<name>.json`` and prints a summary.  Nothing here is asserted by tests.

* ``migrate-idle-256m``: a 256 MiB idle guest, regular v3 migration, loopback (median of N);
* ``migrate-dirty-256m``: the same guest dirtying 32 MiB/s;
* ``control-plane``: a 4 MiB guest, so the time is mostly the five RPCs and their bookkeeping
  (``--control-plane-runs``, 200 by default: its distribution is drawn by ``bench/figures.py``);
* ``throughput``: idle guests of 16 MiB to 1 GiB (``--throughput-runs`` each), MiB/s by size.

Every case keeps its samples (``samples_s``, in the order they ran), the date, the number of
cores and the load average when it started (``machine``).
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

from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import domain_xml, start_host, stop_host

RESULTS = Path(__file__).resolve().parent / "results"
THROUGHPUT_SIZES_MIB = (16, 64, 256, 1024)


async def case(name: str, memory_mib: int, dirty_mib: int, runs: int) -> dict[str, object]:
    machine = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        a = await start_host(Path(tmp), "a")
        b = await start_host(Path(tmp), "b")
        try:
            await a.conn.define(domain_xml("vm", memory_mib, dirty_rate_mib=dirty_mib))
            await a.conn.start("vm")
            times = []
            hosts = (a, b)
            for i in range(runs):
                src, dst = hosts[i % 2], hosts[(i + 1) % 2]
                t0 = time.perf_counter()
                await src.conn.migrate3("vm", dst.conn, TypedParams(), MigrateFlags.LIVE)
                times.append(time.perf_counter() - t0)
        finally:
            await stop_host(a)
            await stop_host(b)
    return {
        "name": name,
        "machine": machine,
        "samples_s": times,
        "memory_mib": memory_mib,
        "dirty_rate_mib": dirty_mib,
        "runs": runs,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "throughput_mib_s": memory_mib / statistics.median(times),
    }


def show(result: dict[str, object]) -> None:
    ms = {k: float(result[k]) * 1000 for k in ("median_s", "min_s", "max_s")}  # type: ignore[arg-type]
    print(f"{result['name']!s:22} median {ms['median_s']:8.1f} ms "
          f"(min {ms['min_s']:.1f}, max {ms['max_s']:.1f})", flush=True)


async def main(runs: int, control_plane_runs: int, throughput_runs: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    for name, mem, dirty, n in (("migrate-idle-256m", 256, 0, runs),
                                ("migrate-dirty-256m", 256, 32, runs),
                                ("control-plane", 4, 0, control_plane_runs)):
        result = await case(name, mem, dirty, n)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        show(result)
    sizes = []
    for mib in THROUGHPUT_SIZES_MIB:
        result = await case(f"idle-{mib}m", mib, 0, throughput_runs)
        sizes.append(result)
        show(result)
    (RESULTS / "throughput.json").write_text(json.dumps(sizes, indent=2) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--control-plane-runs", type=int, default=200)
    p.add_argument("--throughput-runs", type=int, default=3)
    a = p.parse_args()
    asyncio.run(main(a.runs, a.control_plane_runs, a.throughput_runs))
